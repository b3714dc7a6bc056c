from instructdiff.report.cli import main

raise SystemExit(main())
