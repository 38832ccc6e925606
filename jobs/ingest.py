"""spark-submit entry point: `spark-submit jobs/ingest.py [options]` == `userlens ingest [options]`."""

import sys

from userlens.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
