"""python scripts/report.py <multirun dir> [--out DIR]: same as the `instructdiff-report` console script.

The logic lives in instructdiff/report.py because scripts/ is not a package (a console script cannot point
here).
"""

from instructdiff.report import main

if __name__ == "__main__":
    raise SystemExit(main())
