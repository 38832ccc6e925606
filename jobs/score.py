"""spark-submit entry point: `spark-submit jobs/score.py [options]` == `userlens score [options]`."""

import sys

from userlens.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
