"""spark-submit entry point: `spark-submit jobs/profile.py [options]` == `userlens profile [options]`."""
import sys

from userlens.cli import main

if __name__ == "__main__":
    sys.exit(main(["profile", *sys.argv[1:]]))
