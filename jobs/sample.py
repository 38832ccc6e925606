"""spark-submit entry point: `spark-submit jobs/sample.py [options]` == `userlens sample [options]`."""

import sys

from userlens.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
