"""python scripts/report.py <multirun dir> [--out DIR]: same as the `instructdiff-report` console script.

The logic lives in the instructdiff/report/ package because scripts/ is not a package (a console script cannot point
here).
"""

from instructdiff.report import main

if __name__ == "__main__":
    raise SystemExit(main())
