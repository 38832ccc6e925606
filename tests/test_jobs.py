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
        done = subprocess.run(
            [sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120
        )
        assert done.returncode == 0, f"{script.name}: {done.stderr.strip().splitlines()[-1:]}"
        assert "usage: userlens" in done.stdout, script.name


def job_script(stage_name: str) -> Path:
    """jobs/<stage>.py, or jobs/profiles.py for profile (profile.py would shadow Python's profile module)."""
    return JOBS / ("profiles.py" if stage_name == "profile" else f"{stage_name}.py")


def test_every_stage_of_the_registry_has_a_job_script_running_its_command():
    from userlens.stages import STAGES

    for stage in STAGES:
        script = job_script(stage.name)
        assert script.is_file(), f"{stage.name}: no {script.name}"
        assert f'main(["{stage.command}", *sys.argv[1:]])' in script.read_text(encoding="utf-8"), script.name
