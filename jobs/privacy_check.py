"""spark-submit entry point: `spark-submit jobs/privacy_check.py [options]` == `userlens privacy-check [options]`."""

import sys

from userlens.cli import main

if __name__ == "__main__":
    sys.exit(main(["privacy-check", *sys.argv[1:]]))
