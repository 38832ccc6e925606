"""Build the userlens wheel for Databricks into dist/databricks (databricks.yml runs this on deploy).

The wheel ``pip wheel --no-deps .`` builds, less its pyspark and delta-spark requirements: a Databricks
runtime brings its own Spark and Delta, and pip installing them from PyPI as requirements of a cluster
library would shadow the platform's. Everything else (code, conf/, other requirements) is unchanged.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROVIDED = ("pyspark", "delta-spark")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "dist" / "databricks"), help="wheel folder (default: %(default)s)")
    parser.add_argument("--source", default=str(ROOT), help="project folder (default: this repository)")
    parser.add_argument(
        "--no-build-isolation",
        action="store_true",
        help="build with this Python's setuptools instead of a fresh one from the index (offline)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", scratch]
        if args.no_build_isolation:
            command.append("--no-build-isolation")
        done = subprocess.run([*command, args.source], check=False)
        if done.returncode != 0:
            return done.returncode
        built = list(Path(scratch).glob("userlens-*.whl"))
        if len(built) != 1:
            print(
                f"databricks_wheel: expected one userlens wheel, pip built {[p.name for p in built]}", file=sys.stderr
            )
            return 1
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("userlens-*.whl"):  # the job installs dist/databricks/*.whl: exactly one
            old.unlink()
        target = out / built[0].name
        removed = without_requirements(built[0], target, PROVIDED)
    print(f"databricks_wheel: {target} (requirements left to the runtime: {', '.join(removed) or 'none'})")
    return 0


def without_requirements(wheel: Path, target: Path, names: tuple[str, ...]) -> list[str]:
    """Copy ``wheel`` to ``target`` without the unconditional Requires-Dist lines of ``names``; RECORD
    gets the new METADATA's hash and size. Returns the removed requirement lines."""
    with zipfile.ZipFile(wheel) as source:
        entries = [(info, source.read(info)) for info in source.infolist()]
    metadata = next(info.filename for info, _ in entries if info.filename.endswith(".dist-info/METADATA"))
    record = metadata[: -len("METADATA")] + "RECORD"
    removed: list[str] = []
    kept: list[str] = []
    for line in next(data for info, data in entries if info.filename == metadata).decode("utf-8").split("\n"):
        requirement = line[len("Requires-Dist:") :].strip() if line.startswith("Requires-Dist:") else ""
        name = re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower()
        if requirement and name in names and ";" not in requirement:
            removed.append(requirement)
        else:
            kept.append(line)
    new_metadata = "\n".join(kept).encode("utf-8")
    digest = base64.urlsafe_b64encode(hashlib.sha256(new_metadata).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dest:
        for info, data in entries:
            if info.filename == metadata:
                data = new_metadata
            elif info.filename == record:
                rows = [
                    f"{metadata},sha256={digest},{len(new_metadata)}" if row.startswith(metadata + ",") else row
                    for row in data.decode("utf-8").split("\n")
                ]
                data = "\n".join(rows).encode("utf-8")
            dest.writestr(info, data)
    return removed


if __name__ == "__main__":
    sys.exit(main())
