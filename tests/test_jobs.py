"""Every spark-submit entry script imports cleanly when run as a script (its folder first on sys.path,
as `python jobs/x.py` and spark-submit do): no script may shadow a standard-library module."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def test_no_job_script_shadows_a_standard_library_module():
    stdlib = set(sys.stdlib_module_names)
    clashes = [p.name for p in JOBS.glob("*.py") if p.stem in stdlib]
    assert clashes == [], f"jobs/ scripts named like standard-library modules: {clashes}"


def test_every_job_script_reaches_the_cli(tmp_path):
    for script in sorted(JOBS.glob("*.py")):
        done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120)
        assert done.returncode == 0, f"{script.name}: {done.stderr.strip().splitlines()[-1:]}"
        assert "usage: userlens" in done.stdout, script.name
