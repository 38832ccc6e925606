"""spark-submit entry point: `spark-submit jobs/profiles.py [options]` (not profile.py: that name would shadow
Python's own profile module) == `userlens profile [options]`."""

import sys

from userlens.cli import main

if __name__ == "__main__":
    sys.exit(main(["profile", *sys.argv[1:]]))
