"""spark-submit entry point: `spark-submit jobs/textualize.py [options]` == `userlens textualize [options]`."""

import sys

from userlens.cli import main

if __name__ == "__main__":
    sys.exit(main(["textualize", *sys.argv[1:]]))
