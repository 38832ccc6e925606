"""spark-submit entry point: `spark-submit jobs/train.py [options]` == `userlens train [options]`."""

import sys

from userlens.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
