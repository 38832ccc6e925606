"""spark-submit entry point: `spark-submit jobs/explain.py [options]` == `userlens explain [options]`."""

import sys

from userlens.cli import main

if __name__ == "__main__":
    sys.exit(main(["explain", *sys.argv[1:]]))
