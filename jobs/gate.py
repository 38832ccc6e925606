"""spark-submit entry point: `spark-submit jobs/gate.py [options]` == `userlens gate [options]`."""

import sys

from userlens.cli import main

if __name__ == "__main__":
    sys.exit(main(["gate", *sys.argv[1:]]))
