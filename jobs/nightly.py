"""spark-submit entry point: `spark-submit jobs/nightly.py [options]` == `userlens nightly [options]`."""

import sys

from userlens.cli import main

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
