"""spark-submit entry point: `spark-submit jobs/quarantine_retention.py [options]`
== `userlens quarantine-retention [options]`."""

import sys

from userlens.cli import main

if __name__ == "__main__":
    sys.exit(main(["quarantine-retention", *sys.argv[1:]]))
