"""The layers of lib/userlens (docs/architecture.md): imports run downward only, stage modules are runners
that do not import each other, there is no import cycle, and the light modules import no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "lib"
PACKAGE = LIB / "userlens"
# the registry, the nightly that iterates it, and the summaries it prints may name stage modules
STAGE_INDEX = {"userlens.stages", "userlens.stages.nightly", "userlens.stages.summaries"}


def module_name(path: Path) -> str:
    parts = path.relative_to(LIB).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every userlens module ``path`` imports, at the top or inside a function (``from x import y``
    counts as x.y when that is a module, else x)."""
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names
            ]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] == "userlens" and n in modules}
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) - {module_name(p)} for p in PACKAGE.rglob("*.py")}


def test_no_stage_module_imports_another_stage_module():
    graph = import_graph()
    offenders = {
        m: sorted(i for i in imports if i.startswith("userlens.stages.") and i not in STAGE_INDEX)
        for m, imports in graph.items()
        if m.startswith("userlens.stages.") and m not in STAGE_INDEX
    }
    assert {m: i for m, i in offenders.items() if i} == {}


def test_no_layer_below_the_stages_imports_a_stage_or_an_entry_point():
    above = ("userlens.stages", "userlens.cli", "userlens.notebook")
    graph = import_graph()
    upward = {
        m: sorted(i for i in imports if i.startswith(above))
        for m, imports in graph.items()
        if not m.startswith(above) and m != "userlens.report"
    }
    assert {m: i for m, i in upward.items() if i} == {}


def test_models_import_no_spark_and_no_layer_above_them():
    allowed = ("userlens.models", "userlens.errors")
    for path in (PACKAGE / "models").rglob("*.py"):
        spark = [
            node
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, (ast.Import, ast.ImportFrom))
            and any((getattr(node, "module", None) or a.name).startswith("pyspark") for a in node.names)
        ]
        # the one exception: the encoder reads the GPU a Spark task was given, where there is a task
        # (the one place that decides the device; it works without pyspark installed)
        expected = 1 if path.name == "encoder.py" else 0
        assert len(spark) == expected, path.name
        assert all(i.startswith(allowed) for i in imports_of(path)), (path.name, imports_of(path))


def test_there_is_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # a package and its own __init__ aside (userlens.x imports userlens.x.y, which Python loads after it)
    assert cycles == []


def test_the_graph_sees_real_imports():
    graph = import_graph()
    assert "userlens.features" in graph["userlens.stages.train"]
    assert "userlens.sources.raw" in graph["userlens.stages.ingest"]
    assert "userlens.embedding" in graph["userlens.stages.embed"]


def test_report_profile_and_nightly_import_no_torch():
    code = (
        "import sys; import userlens.report, userlens.stages.profile, userlens.stages.nightly, userlens.cli, "
        "userlens.artifacts; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    assert "| userlens.report" in done.stderr  # importtime ran and listed what was imported


def _run_writes(path: Path) -> list[str]:
    """``run.rows_in = ...``, ``run.details[...] = ...``, ``run.details.update(...)`` in ``path``, where
    ``run`` is a parameter annotated ``StageRun``."""
    found = []
    for func in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        runs = {a.arg for a in func.args.args if a.annotation is not None and "StageRun" in ast.unparse(a.annotation)}
        for node in ast.walk(func):
            targets = node.targets if isinstance(node, ast.Assign) else []
            for target in [t for tt in targets for t in (tt.elts if isinstance(tt, ast.Tuple) else [tt])]:
                base = target.value if isinstance(target, ast.Subscript) else target
                if isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name) and base.value.id in runs:
                    if base.attr in ("rows_in", "rows_out", "details"):
                        found.append(f"{path.name}:{node.lineno} {ast.unparse(target)}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "update"
                and ast.unparse(node.func.value) in {f"{r}.details" for r in runs}
            ):
                found.append(f"{path.name}:{node.lineno} {ast.unparse(node.func)}")
    return found


def test_runners_report_once_through_their_result(tmp_path):
    """A runner's counts and details reach pipeline_runs from its result (``run_record``), or from the
    error it raises, in ``runs.run_stage``; no runner writes them onto its StageRun as well."""
    runners = [*PACKAGE.joinpath("stages").glob("*.py"), PACKAGE / "eval" / "evaluate.py"]
    assert len(runners) > 8
    assert [w for path in runners for w in _run_writes(path)] == []
    # the check sees such a write where there is one
    probe = LIB.parent / "tests" / "_probe_runner.py"
    try:
        probe.write_text(
            "def run_x(run: StageRun):\n    run.rows_in, run.rows_out = 1, 2\n    run.details.update({})\n"
        )
        assert len(_run_writes(probe)) == 3
    finally:
        probe.unlink()
