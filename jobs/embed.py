"""spark-submit entry point: `spark-submit jobs/embed.py [options]` == `userlens embed [options]`."""

import sys

from userlens.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
