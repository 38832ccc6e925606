"""spark-submit entry point: `spark-submit jobs/forget.py [options]` == `userlens forget [options]`."""

import sys

from userlens.cli import main

if __name__ == "__main__":
    sys.exit(main(["forget", *sys.argv[1:]]))
