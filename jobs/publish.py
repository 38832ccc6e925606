"""spark-submit entry point: `spark-submit jobs/publish.py [options]` == `userlens publish [options]`."""

import sys

from userlens.cli import main

if __name__ == "__main__":
    sys.exit(main(["publish", *sys.argv[1:]]))
