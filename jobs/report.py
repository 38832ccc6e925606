"""spark-submit entry point: `spark-submit jobs/report.py [options]` == `userlens report [options]`."""

import sys

from userlens.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
