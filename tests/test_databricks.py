"""Databricks without a workspace: every notebook's code runs here, cell by cell, against the local Spark
session, with a stand-in for ``dbutils`` (widgets and secrets, the only fake); the bundle (databricks.yml)
parses, its tasks point at real notebooks and form the stage chain, and its wheel builds without the Spark
and Delta that a Databricks runtime brings itself.

The notebooks run in catalog mode, as on Databricks: every table is `catalog`.`schema`.`name`, with
Spark's own session catalog (``spark_catalog``, Delta's catalog behind it) standing in for Unity Catalog,
because open-source Delta's DeltaTableBuilder cannot take a three-part name of another catalog. The job
run also shows what catalog mode must: nothing is written by path under storage.warehouse, a rerun
writes no data file, and forget leaves no row and no file of the person."""

from __future__ import annotations

import ast
import builtins
import datetime as dt
import logging
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import (
    NO_EXPLAIN,
    NO_TEXT_BASELINE,
    SHORT_TEXTS,
    TEST_KEY,
    files_holding,
    is_key,
)
from userlens.config import CONF_DIR, load_settings
from userlens.errors import ConfigError, SecretError
from userlens.notebook import STAGE_NOTEBOOKS, WIDGETS, WidgetError, load_notebook_key, parse_widgets
from userlens.stages import nightly_stages

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
BUNDLE = REPO / "databricks.yml"
HEADER = "# Databricks notebook source"
CELL_BREAK = re.compile(r"^# COMMAND -{10}\s*$", re.MULTILINE)
JOB_CHAIN = [stage.name for stage in nightly_stages()]  # the registry's nightly chain
GPU_STAGES = {"embed", "train"}

USERS, DAYS, ITEMS, START = 60, 8, 40, dt.date(2026, 10, 1)
LAST = START + dt.timedelta(days=DAYS - 1)
SAMPLE_IDS = [f"u{i:07d}" for i in range(USERS)]  # userlens.sample's raw user ids
SCOPE, SECRET = "userlens-test", "hmac-key"
CATALOG, SCHEMA = "spark_catalog", "userlens_databricks"  # Spark's session catalog stands in for Unity Catalog
RETENTION_CHECK = "spark.databricks.delta.retentionDurationCheck.enabled"
TINY = [
    "spark.shuffle_partitions=2",
    "spark.conf.spark.ui.showConsoleProgress=false",
    "train.epochs=2",
    "train.patience=1",
    "train.batch_size=16",
    "train.horizon_days=3",
    "train.min_users=20",
    "train.min_class_users=2",
    "train.num_processes=1",
    "train.recommend.enabled=false",
    "embed.arrow_batch_size=64",
    "profile.segments=2",
    "privacy.min_segment_size=5",
    SHORT_TEXTS,
    NO_TEXT_BASELINE,  # tests/test_train.py fits it
    NO_EXPLAIN,  # tests/test_explain.py explains; here the stage is skipped as explain.users none skips it
    # a full VACUUM (quarantine retention) lists the table with this many tasks, 10,000 by default:
    # 30-60 s on two local cores for a table of two files
    "spark.conf.spark.sql.sources.parallelPartitionDiscovery.parallelism=2",
]


# -- the notebooks as Databricks reads them ----------------------------------------------------------
def notebook_cells(path: Path) -> list[str]:
    """The cells of a source-format notebook: the header line, then cells between COMMAND lines."""
    text = path.read_text(encoding="utf-8")
    first, _, rest = text.partition("\n")
    assert first == HEADER, f"{path.name}: first line is {first!r}"
    return [cell.strip("\n") for cell in CELL_BREAK.split(rest)]


def is_markdown(cell: str) -> bool:
    return cell.splitlines()[0] == "# MAGIC %md"


def code_cells(path: Path) -> list[str]:
    """The Python cells; %md cells are skipped, and any other magic fails (it would be skipped unseen)."""
    cells = []
    for cell in notebook_cells(path):
        if "# MAGIC" in cell.splitlines()[0]:
            assert is_markdown(cell), f"{path.name}: a magic cell other than %md: {cell.splitlines()[0]!r}"
            assert all(line.startswith("# MAGIC") for line in cell.splitlines()), f"{path.name}: mixed cell"
            continue
        cells.append(cell)
    return cells


class FakeWidgets:
    """``dbutils.widgets``: a value passed by the job (``params``) wins over the default the notebook gave."""

    def __init__(self, params: dict[str, str]) -> None:
        self.params = dict(params)
        self.defined: dict[str, str] = {}

    def text(self, name: str, defaultValue: str, label: str | None = None) -> None:  # noqa: N803 - dbutils' names
        self.defined[name] = defaultValue

    def dropdown(self, name: str, defaultValue: str, choices: list[str], label: str | None = None) -> None:  # noqa: N803
        assert defaultValue in choices, f"dropdown {name}: default {defaultValue!r} not in {choices}"
        self.defined[name] = defaultValue

    def get(self, name: str) -> str:
        if name not in self.defined:  # as on Databricks: a widget must be defined before it is read
            raise ValueError(f"InputWidgetNotDefined: no input widget named {name} is defined")
        return self.params.get(name, self.defined[name])


class FakeSecrets:
    def __init__(self, secrets: dict[tuple[str, str], str]) -> None:
        self.secrets = secrets

    def get(self, scope: str, key: str) -> str:
        if (scope, key) not in self.secrets:
            raise ValueError(f"Secret does not exist with scope: {scope} and key: {key}")
        return self.secrets[(scope, key)]


class FakeDbutils:
    def __init__(self, params: dict[str, str], secrets: dict[tuple[str, str], str] | None = None) -> None:
        self.widgets = FakeWidgets(params)
        self.secrets = FakeSecrets(secrets if secrets is not None else {(SCOPE, SECRET): TEST_KEY})


def run_notebook(
    stage: str, params: dict[str, str], secrets: dict[tuple[str, str], str] | None = None
) -> dict[str, Any]:
    """Exec the notebook's code cells in order in one namespace holding only ``dbutils``; returns it."""
    namespace: dict[str, Any] = {"__name__": "__main__", "dbutils": FakeDbutils(params, secrets)}
    for number, cell in enumerate(code_cells(NOTEBOOKS / f"{stage}.py"), 1):
        exec(compile(cell, f"notebooks/{stage}.py (code cell {number})", "exec"), namespace)  # noqa: S102
    return namespace


# -- static checks on the notebooks ------------------------------------------------------------------
def test_one_notebook_per_stage_and_nothing_else():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.py")) == sorted(STAGE_NOTEBOOKS)
    assert set(WIDGETS) == set(STAGE_NOTEBOOKS)


@pytest.mark.parametrize("stage", STAGE_NOTEBOOKS)
def test_notebook_is_a_wrapper_that_reads_its_own_widgets(stage):
    path = NOTEBOOKS / f"{stage}.py"
    cells = notebook_cells(path)
    assert is_markdown(cells[0]), "the first cell says what the notebook does"
    code = "\n\n".join(code_cells(path))
    tree = ast.parse(code)
    # no logic only in a notebook: no functions, classes or loops of its own (the nightly prints a summary)
    own = [type(n).__name__ for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.While))]
    assert own == []
    assert f'notebook.read_widgets(dbutils, "{stage}")' in code
    # every name it reads is imported or assigned in it, or is dbutils: no `spark`, `display` from the platform
    bound = {"dbutils", *dir(builtins)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    free = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - bound
    assert free == set()
    # its markdown documents exactly the widgets it has
    documented = set(re.findall(r"^# MAGIC \| `(\w+)` \|", cells[0], re.MULTILINE))
    assert documented == {w.name for w in WIDGETS[stage]}


def test_docs_list_every_notebooks_widgets():
    docs = (REPO / "docs" / "deploy.md").read_text(encoding="utf-8")
    section = docs[docs.index("## Databricks") :]
    for stage, widgets in WIDGETS.items():
        row = re.search(rf"^\| `notebooks/{stage}\.py` \|(.*)$", section, re.MULTILINE)
        assert row is not None, f"docs/deploy.md: no widgets row for notebooks/{stage}.py"
        assert set(re.findall(r"`(\w+)`", row.group(1))) == {w.name for w in widgets}, stage
    for command in (
        "databricks bundle validate",
        "databricks bundle deploy -t dev",
        "databricks bundle run -t dev userlens_nightly",
        "databricks secrets create-scope",
        "databricks secrets put-secret",
    ):
        assert command in section


# -- widget checks (no Spark) ------------------------------------------------------------------------
def test_widgets_parse_to_typed_values():
    params = parse_widgets(
        "ingest",
        {
            "date": "2026-10-08",
            "full": "True",
            "conf": "databricks.yaml",
            "set": "spark.shuffle_partitions=2; train.epochs=3\nprofile.segments=4 ;",
            "secret_scope": "",
            "secret_key": "hmac-key",
        },
    )
    assert params.date == dt.date(2026, 10, 8) and params.full is True
    assert params.conf == (CONF_DIR / "databricks.yaml",)
    assert params.overrides == ("spark.shuffle_partitions=2", "train.epochs=3", "profile.segments=4")
    assert params.secret_scope is None
    defaults = parse_widgets("textualize", {})
    assert defaults.date is None and defaults.overrides == () and defaults.conf == (CONF_DIR / "databricks.yaml",)
    gpu = parse_widgets("train", {"conf": "databricks.yaml, databricks-gpu.yaml", "when_due": "true"})
    assert gpu.conf == (CONF_DIR / "databricks.yaml", CONF_DIR / "databricks-gpu.yaml") and gpu.when_due
    assert parse_widgets("privacy_check", {"when_enabled": "TRUE"}).when_enabled
    assert not parse_widgets("privacy_check", {}).when_enabled
    assert parse_widgets("report", {"when_enabled": "true"}).when_enabled


def test_bad_widgets_fail_in_one_line_naming_each():
    with pytest.raises(WidgetError) as err:
        parse_widgets(
            "ingest", {"date": "2026-02-30", "full": "maybe", "conf": "nope.yaml", "set": "train.epochs=3; oops"}
        )
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("ingest notebook: widget date: expected a date YYYY-MM-DD")
    for part in (
        "'2026-02-30'",
        "widget full: expected one of false, true, got 'maybe'",
        "widget conf: config file 'nope.yaml' not found",
        "databricks.yaml",
        "widget set: expected dotted.key=value entries separated by ';', got 'oops'",
    ):
        assert part in message
    with pytest.raises(WidgetError, match=r"^forget notebook: widget user_id: empty; it is required$"):
        parse_widgets("forget", {})
    with pytest.raises(WidgetError, match="widget secret_key: empty, but secret_scope 'userlens' is set"):
        parse_widgets("nightly", {"secret_key": " "})


def test_unknown_override_names_the_widget(userlens_logger):
    with pytest.raises(ConfigError, match=r"^widget set: train\.epochz: unknown key$"):
        run_notebook("textualize", {"set": "train.epochz=3"})  # fails in its first cell, before Spark


def test_the_key_comes_from_the_secret_scope_or_else_the_environment(monkeypatch):
    settings = load_settings([CONF_DIR / "databricks.yaml"], env={})
    from_scope = load_notebook_key(FakeDbutils({}), settings, parse_widgets("ingest", {"secret_scope": SCOPE}))
    monkeypatch.setenv("USERLENS_HMAC_KEY", TEST_KEY)
    from_env = load_notebook_key(FakeDbutils({}, {}), settings, parse_widgets("ingest", {"secret_scope": ""}))
    assert from_scope.key_id == from_env.key_id and not from_scope.is_dev_key

    missing = parse_widgets("ingest", {"secret_scope": "other"})
    with pytest.raises(SecretError) as err:
        load_notebook_key(FakeDbutils({}), settings, missing)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(
        "secret 'hmac-key' in scope 'other' could not be read (ValueError: Secret "
        "does not exist with scope: other and key: hmac-key)"
    )
    assert "databricks secrets put-secret other hmac-key" in str(err.value)
    short = FakeDbutils({}, {(SCOPE, SECRET): "too-short"})
    with pytest.raises(SecretError, match=r"^secret 'hmac-key' in scope 'userlens-test': .* is 9 bytes"):
        load_notebook_key(short, settings, parse_widgets("ingest", {"secret_scope": SCOPE}))
    assert TEST_KEY not in repr(from_scope)


# -- the notebooks on Spark --------------------------------------------------------------------------
def _restore_logger():
    logger = logging.getLogger("userlens")
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:], logger.level = handlers, level


userlens_logger = pytest.fixture(_restore_logger)  # a notebook's first cell adds a handler (log_progress)


@pytest.fixture(scope="module")
def restore_session(spark):
    """The notebooks overlay settings on the shared session and add a log handler: undo both afterwards."""
    keys = [
        "spark.sql.shuffle.partitions",
        "spark.sql.session.timeZone",
        "spark.sql.sources.parallelPartitionDiscovery.parallelism",
        RETENTION_CHECK,
    ]
    before = {k: spark.conf.get(k, None) for k in keys}
    yield from _restore_logger()
    for key, value in before.items():
        if value is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, value)


@pytest.fixture(scope="module")
def workspace(spark, restore_session, tmp_path_factory):
    """Sample logs, a schema in the session catalog, and the job's parameters pointing conf/databricks.yaml
    at this test's schema and folders (storage.warehouse too, to show that nothing is written there)."""
    from userlens.sample import SampleSpec, generate_sample

    root = tmp_path_factory.mktemp("databricks")
    generate_sample(
        spark, str(root / "raw"), SampleSpec(users=USERS, days=DAYS, items=ITEMS, seed=11, start_date=START)
    )
    spark.sql(f"CREATE SCHEMA IF NOT EXISTS {CATALOG}.{SCHEMA} LOCATION '{root / 'schema'}'")
    overrides = [
        f"storage.catalog={CATALOG}",
        f"storage.schema={SCHEMA}",
        f"storage.warehouse={root / 'warehouse'}",
        f"storage.models={root / 'models'}",
        f"source.path={root / 'raw'}",
        f"nightly.report_dir={root / 'reports'}",
        # forget: VACUUM the person's files now (a retention of 0 hours, which Delta's check refuses)
        "privacy.forget_retention_hours=0",
        f"spark.conf.{RETENTION_CHECK}=false",
        *TINY,
    ]
    params = {"set": "; ".join(overrides), "secret_scope": SCOPE, "secret_key": SECRET}
    yield root, params, load_settings([CONF_DIR / "databricks.yaml"], overrides)
    spark.sql(f"DROP SCHEMA IF EXISTS {CATALOG}.{SCHEMA} CASCADE")


DATA_TABLES = ("events", "user_texts", "user_embeddings", "user_scores", "user_profiles")


@pytest.fixture(scope="module")
def job_run(spark, workspace):
    """The job's tasks with the parameters databricks.yml gives them (the GPU conf left out: no GPU here),
    with the nightly notebook in the middle: ingest, textualize, embed; nightly for the same date (nothing
    left to embed; no model yet, so it trains, scores, gates, profiles, retains, reports; explain.users is
    none); then train
    (when_due=true: not due), score, profile, which find nothing to change; quarantine_retention with a
    3-day retention (so that rows expire); report; privacy_check as the job passes it (nightly.privacy_check
    false: skipped), then with nightly.privacy_check=true (it checks)."""
    from pyspark.sql import functions as F

    from userlens.stages.retention import QUARANTINE
    from userlens.tables import Tables

    _, params, settings = workspace
    tasks = {t["task_key"]: t for t in bundle()["resources"]["jobs"]["userlens_nightly"]["tasks"]}

    def task(stage: str, *overrides: str) -> dict[str, Any]:
        base = dict(tasks[stage]["notebook_task"].get("base_parameters", {}))
        base.pop("conf")  # databricks.yaml, the default; the GPU tasks' databricks-gpu.yaml needs a GPU
        base.pop("secret_scope", None)  # ${var.secret_scope}: the test's scope is in params
        return run_notebook(stage, {**base, **params, "set": "; ".join([params["set"], *overrides])})

    def data_files() -> dict[str, set[str]]:
        tables = Tables(spark, settings.storage)
        return {t: set(tables.read(t).inputFiles()) for t in DATA_TABLES if tables.exists(t)}

    runs = {stage: task(stage) for stage in ("ingest", "textualize", "embed")}
    files = {"before nightly": data_files()}
    # the nightly notebook without its report (the job's report task below writes one)
    runs["nightly"] = run_notebook(
        "nightly", {**params, "date": LAST.isoformat(), "set": f"{params['set']}; nightly.report=false"}
    )
    files["after nightly"] = data_files()
    runs.update({stage: task(stage) for stage in ("train", "score", "profile")})
    files["after the job"] = data_files()
    quarantine_dates = [
        r[0]
        for r in Tables(spark, settings.storage)
        .read(QUARANTINE)
        .select(F.coalesce("source_date", F.to_date("quarantined_at")))
        .collect()
    ]
    runs["quarantine_retention"] = task("quarantine_retention", "privacy.quarantine_retention_days=3")
    runs["report"] = task("report")
    runs["report skipped"] = task("report", "nightly.report=false")
    runs["privacy_check skipped"] = task("privacy_check")
    runs["privacy_check"] = task("privacy_check", "nightly.privacy_check=true")
    return runs, files, quarantine_dates


def test_job_notebooks_and_the_nightly_notebook_share_one_warehouse(spark, workspace, job_run):
    from pyspark.sql import functions as F

    from userlens.artifacts import ModelStore
    from userlens.privacy import load_key
    from userlens.stages.forget import user_key_of
    from userlens.tables import Tables

    root, _, settings = workspace
    runs, files, quarantine_dates = job_run
    tables = Tables(spark, settings.storage)
    # catalog mode: every table is in the schema, with the properties path mode gives it; nothing by path
    assert tables.use_catalog
    listed = {r.tableName for r in spark.sql(f"SHOW TABLES IN {CATALOG}.{SCHEMA}").collect()}
    assert {*DATA_TABLES, "items", "pipeline_runs", "segments", "events_quarantine"} <= listed
    assert tables.properties("user_profiles").get("delta.enableChangeDataFeed") == "true"
    assert not (root / "warehouse").exists()
    ingest, texts, embed = (runs[s]["result"] for s in ("ingest", "textualize", "embed"))
    assert ingest.as_of_date == LAST and ingest.rows_in == ingest.rows_out + ingest.quarantined + ingest.duplicates
    users = texts.users
    assert users > 40 and tables.read("events").select("user_key").distinct().count() == users
    assert embed.users.embedded == users and embed.items.embedded == ITEMS

    nightly = runs["nightly"]["result"]
    assert nightly.as_of_date == LAST
    # trained: there was no model yet; no privacy_check: nightly.privacy_check is false here; no explain:
    # explain.users is none; no report: nightly.report is false for this run
    assert list(nightly.stages) == [s for s in JOB_CHAIN if s not in ("privacy_check", "explain", "report")]
    assert nightly.stages["quarantine_retention"].deleted == 0  # 30 days: nothing in 8 days of logs is due
    assert nightly.stages["textualize"].texts_inserted == nightly.stages["textualize"].texts_updated == 0
    assert nightly.stages["embed"].users.embedded == 0 and nightly.stages["embed"].users.unchanged == users
    # what the ingest, textualize and embed notebooks wrote, nightly left as it was
    before, after = files["before nightly"], files["after nightly"]
    assert {t: after[t] for t in before} == before
    version = nightly.stages["train"].version
    assert nightly.stages["score"].scored == users and nightly.stages["score"].model_version == version
    assert tables.read("user_profiles").where(F.col("model_version") == version).count() == users

    # the job's train task (when_due=true) right after: not due, no new model
    assert runs["train"]["result"] is None and "recent enough" in runs["train"]["skipped"]
    assert ModelStore.of(settings).latest() == version
    assert runs["score"]["result"].scored == 0 and runs["score"]["result"].unchanged == users
    assert runs["profile"]["result"].inserted == runs["profile"]["result"].updated == 0
    assert files["after the job"] == files["after nightly"]  # no data file written
    # the job's quarantine_retention task, no date given: the as-of date of the newest ingest, as nightly's
    retention = runs["quarantine_retention"]["result"]
    cutoff = LAST - dt.timedelta(days=3)
    assert (retention.as_of_date, retention.cutoff) == (LAST, cutoff)
    expired = sum(d < cutoff for d in quarantine_dates)
    assert 0 < expired < len(quarantine_dates)
    assert (retention.deleted, retention.kept) == (expired, len(quarantine_dates) - expired)
    left = tables.read("events_quarantine").select(F.coalesce("source_date", F.to_date("quarantined_at")).alias("d"))
    assert left.count() == retention.kept and left.where(F.col("d") < cutoff).count() == 0
    report = Path(runs["report"]["result"].path)
    assert report.parent == Path(settings.nightly.report_dir).resolve() and report.stat().st_size > 1000
    # with nightly.report=false the job's report task writes nothing, as nightly would not
    assert runs["report skipped"]["result"] is None
    assert "nightly.report is false" in runs["report skipped"]["skipped"]
    # the job's privacy_check task: skipped as nightly skips it, and with nightly.privacy_check=true a pass
    assert runs["privacy_check skipped"]["result"] is None
    assert "nightly.privacy_check is false" in runs["privacy_check skipped"]["skipped"]
    check = runs["privacy_check"]["result"]
    assert check.passed and check.ids_searched >= users
    assert {t.table for t in check.tables if t.exists} >= {*DATA_TABLES, "events_quarantine", "pipeline_runs"}

    statuses = {(r["stage"], r["status"]) for r in tables.read("pipeline_runs").collect()}
    assert {stage for stage, _ in statuses} >= set(JOB_CHAIN) - {"explain"}
    assert {status for _, status in statuses} == {"succeeded"}
    # the key came from the secret scope: every user_key is HMAC(that secret, a sample user id)
    key = load_key(settings.privacy, {"USERLENS_HMAC_KEY": TEST_KEY})
    keys = {r[0] for r in tables.read("events").select("user_key").distinct().collect()}
    assert keys <= {user_key_of(raw_id, key) for raw_id in SAMPLE_IDS}


def test_forget_notebook_erases_one_person(spark, workspace, job_run):
    """No row of the person in any table, and no data file that held one (vacuumed from disk); the others
    stay; one forget_log row."""
    from pyspark.sql import functions as F

    from userlens.privacy import load_key
    from userlens.stages.forget import user_key_of
    from userlens.tables import Tables

    _, params, settings = workspace
    tables = Tables(spark, settings.storage)
    key = load_key(settings.privacy, {"USERLENS_HMAC_KEY": TEST_KEY})
    raw_id = next(
        r for r in SAMPLE_IDS if tables.read("user_profiles").where(F.col("user_key") == user_key_of(r, key)).count()
    )
    user_key = user_key_of(raw_id, key)
    folders = {
        t: Path(tables.delta(t).detail().select("location").first()[0].removeprefix("file:")) for t in DATA_TABLES
    }
    held = {t: files_holding(folders[t], "user_key", is_key(user_key)) for t in DATA_TABLES}
    assert all(held.values()), held
    others = tables.read("user_profiles").where(F.col("user_key") != user_key).count()
    run_notebook("forget", {**params, "user_id": raw_id})
    for table in DATA_TABLES:
        assert tables.read(table).where(F.col("user_key") == user_key).count() == 0, table
        assert not [p for p in held[table] if p.exists()], table  # vacuumed from disk
        assert not files_holding(folders[table], "user_key", is_key(user_key)), table
    assert tables.read("user_profiles").count() == others > 0
    audit = tables.read("forget_log").where(F.col("user_key") == user_key).collect()
    assert len(audit) == 1


def test_a_bad_widget_stops_the_notebook_before_it_writes(spark, restore_session, tmp_path):
    params = {"date": "2026/10/08", "set": f"storage.catalog=null; storage.warehouse={tmp_path / 'wh'}"}
    with pytest.raises(
        WidgetError,
        match=r"^ingest notebook: widget date: expected a date YYYY-MM-DD "
        r"\(or empty for the latest\), got '2026/10/08'$",
    ):
        run_notebook("ingest", params)
    with pytest.raises(SecretError, match=r"^secret 'hmac-key' in scope 'userlens-test' could not be read"):
        run_notebook("ingest", {"set": params["set"], "secret_scope": SCOPE}, secrets={})
    # retention with no date and no ingest run to take one from: nothing to guess, nothing deleted
    with pytest.raises(
        WidgetError,
        match=r"^quarantine_retention notebook: widget date: empty, and pipeline_runs "
        r"has no succeeded ingest run",
    ):
        run_notebook("quarantine_retention", {"set": params["set"]})
    assert not (tmp_path / "wh").exists()


# -- the bundle --------------------------------------------------------------------------------------
def bundle() -> dict[str, Any]:
    return yaml.safe_load(BUNDLE.read_text(encoding="utf-8"))


def resolve(value: Any, variables: dict[str, Any]) -> Any:
    """``${var.x}`` replaced by the variable's default (what `databricks bundle validate` would show)."""
    if isinstance(value, str):
        return re.sub(r"\$\{var\.(\w+)\}", lambda m: str(variables[m.group(1)]["default"]), value)
    return value


def test_bundle_variables_are_defined_and_every_reference_resolves():
    text = BUNDLE.read_text(encoding="utf-8")
    doc = bundle()
    used = set(re.findall(r"\$\{var\.(\w+)\}", text))
    assert used and used <= set(doc["variables"])
    assert all("default" in v for v in doc["variables"].values())
    for ref in set(re.findall(r"\$\{resources\.(\w+)\.(\w+)\.name\}", text)):
        assert ref[1] in doc["resources"][ref[0]], ref
    assert set(re.findall(r"\$\{(\w+)\.", text)) <= {"var", "resources", "bundle"}


def test_bundle_job_is_the_stage_chain_on_the_right_clusters():
    doc = bundle()
    variables = doc["variables"]
    job = doc["resources"]["jobs"]["userlens_nightly"]
    tasks = {t["task_key"]: t for t in job["tasks"]}
    assert set(tasks) == set(JOB_CHAIN)

    # dependencies: known tasks, acyclic, and each stage after the one before it
    deps = {k: {d["task_key"] for d in t.get("depends_on", [])} for k, t in tasks.items()}
    assert all(d <= set(tasks) for d in deps.values())
    order: list[str] = []
    while len(order) < len(tasks):
        ready = sorted(k for k in tasks if k not in order and deps[k] <= set(order))
        assert ready, f"dependency cycle among {sorted(set(tasks) - set(order))}"
        order += ready

    def upstream(key: str) -> set[str]:
        return set().union(*({d} | upstream(d) for d in deps[key])) if deps[key] else set()

    for before, after in zip(JOB_CHAIN, JOB_CHAIN[1:]):
        assert before in upstream(after), f"{after} does not wait for {before}"

    clusters = {c["job_cluster_key"]: c["new_cluster"] for c in job["job_clusters"]}
    for key, task in tasks.items():
        notebook = (BUNDLE.parent / task["notebook_task"]["notebook_path"]).resolve()
        assert notebook == NOTEBOOKS / f"{key}.py" and notebook.is_file()
        widgets = {w.name for w in WIDGETS[key]}
        assert set(task["notebook_task"].get("base_parameters", {})) <= widgets, key
        parse_widgets(key, {k: resolve(v, variables) for k, v in task["notebook_task"]["base_parameters"].items()})
        assert task["libraries"] == [{"whl": "./dist/databricks/*.whl"}]
        cluster = clusters[task["job_cluster_key"]]
        gpu_conf = cluster.get("spark_conf", {})
        conf = task["notebook_task"]["base_parameters"]["conf"]
        if key in GPU_STAGES:
            assert "gpu" in resolve(cluster["spark_version"], variables)
            assert re.match(r"^(g\d|p\d|Standard_N)", resolve(cluster["node_type_id"], variables))
            assert float(gpu_conf["spark.executor.resource.gpu.amount"]) >= 1
            assert float(gpu_conf["spark.task.resource.gpu.amount"]) > 0
            assert conf == "databricks.yaml,databricks-gpu.yaml"
        else:
            assert "gpu" not in resolve(cluster["spark_version"], variables) and not gpu_conf
            assert conf == "databricks.yaml"
    assert tasks["train"]["notebook_task"]["base_parameters"]["when_due"] == "true"
    assert tasks["privacy_check"]["notebook_task"]["base_parameters"]["when_enabled"] == "true"
    assert tasks["report"]["notebook_task"]["base_parameters"]["when_enabled"] == "true"
    assert tasks["ingest"]["notebook_task"]["base_parameters"]["secret_scope"] == "${var.secret_scope}"
    # job parameters become widgets of the same name in every task that has one
    assert {p["name"] for p in job["parameters"]} <= {w.name for ws in WIDGETS.values() for w in ws}
    # the clusters point conf/databricks.yaml at the bundle's schema and volumes
    for cluster in clusters.values():
        env = cluster["spark_env_vars"]
        assert env["USERLENS_SCHEMA"] == "${resources.schemas.userlens.name}"
        assert env["USERLENS_MODELS"].endswith("/${resources.volumes.models.name}")
        assert cluster["data_security_mode"] == "SINGLE_USER"
    assert clusters["gpu"]["spark_env_vars"]["USERLENS_TRAIN_PROCESSES"] == "${var.gpu_workers}"

    forget = doc["resources"]["jobs"]["userlens_forget"]["tasks"][0]["notebook_task"]
    assert (BUNDLE.parent / forget["notebook_path"]).resolve() == NOTEBOOKS / "forget.py"


def test_bundle_targets_dev_and_a_scheduled_prod():
    targets = bundle()["targets"]
    assert targets["dev"]["mode"] == "development" and targets["dev"]["default"] is True
    assert targets["prod"]["mode"] == "production"
    schedule = targets["prod"]["resources"]["jobs"]["userlens_nightly"]["schedule"]
    assert schedule["pause_status"] == "UNPAUSED" and schedule["timezone_id"] == "UTC"
    assert len(schedule["quartz_cron_expression"].split()) == 6
    assert "schedule" not in bundle()["resources"]["jobs"]["userlens_nightly"]  # dev and validate: no schedule


def test_databricks_conf_uses_unity_catalog_and_the_bundle_environment():
    env = {
        "USERLENS_CATALOG": "cat",
        "USERLENS_SCHEMA": "sch",
        "USERLENS_MODELS": "/Volumes/cat/sch/models",
        "USERLENS_SOURCE": "/Volumes/cat/sch/raw",
        "USERLENS_REPORTS": "/Volumes/cat/sch/reports",
        "USERLENS_TRAIN_PROCESSES": "4",
    }
    cpu = load_settings([CONF_DIR / "databricks.yaml"], env=env)
    assert (cpu.env, cpu.storage.catalog, cpu.storage.schema_name) == ("databricks", "cat", "sch")
    assert (cpu.storage.models, cpu.source.path, cpu.nightly.report_dir) == (
        "/Volumes/cat/sch/models",
        "/Volumes/cat/sch/raw",
        "/Volumes/cat/sch/reports",
    )
    assert cpu.spark.delta_jars == "provided" and cpu.privacy.dev_key is None
    assert cpu.embed.device == "auto" and not cpu.train.use_gpu
    gpu = load_settings([CONF_DIR / "databricks.yaml", CONF_DIR / "databricks-gpu.yaml"], env=env)
    assert gpu.embed.device == "cuda" and gpu.train.use_gpu and not gpu.train.local_mode
    assert gpu.train.num_processes == 4
    defaults = load_settings([CONF_DIR / "databricks.yaml"], env={})
    assert defaults.storage.catalog == "main" and defaults.storage.models.startswith("/Volumes/main/userlens/")


def test_bundle_wheel_builds_without_spark_and_delta(tmp_path):
    """The artifact's build command on a copy of the project (offline: with this Python's setuptools)."""
    import base64
    import hashlib

    artifact = bundle()["artifacts"]["userlens_wheel"]
    assert artifact["type"] == "whl" and (BUNDLE.parent / artifact["path"] / "setup.py").is_file()
    command = artifact["build"].split()
    assert command[:2] == ["python3", "scripts/databricks_wheel.py"]
    source, out = tmp_path / "src", tmp_path / "dist"
    source.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("lib", "conf"):  # lib/userlens/conf is a link to ../../conf
        shutil.copytree(
            REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / command[1]),
            *command[2:],
            "--source",
            str(source),
            "--out",
            str(out),
            "--no-build-isolation",
        ],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "requirements left to the runtime: pyspark==4.0.1, delta-spark==4.0.1" in done.stdout
    wheels = list(out.glob("userlens-*.whl"))
    assert len(wheels) == 1
    with zipfile.ZipFile(wheels[0]) as whl:
        files = {name: whl.read(name) for name in whl.namelist()}
    metadata = next(data for name, data in files.items() if name.endswith(".dist-info/METADATA")).decode()
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert not [r for r in core if r.startswith(("pyspark", "delta-spark"))]
    assert any(r.startswith("torch") for r in core) and any("extra ==" in r for r in requires)
    assert {"userlens/notebook.py", "userlens/conf/databricks.yaml", "userlens/conf/databricks-gpu.yaml"} <= set(files)
    # RECORD still matches every file (pip and Databricks install from it)
    record = next(data for name, data in files.items() if name.endswith(".dist-info/RECORD")).decode()
    for row in filter(None, record.splitlines()):
        name, digest, size = row.rsplit(",", 2)
        if digest:
            expected = base64.urlsafe_b64encode(hashlib.sha256(files[name]).digest()).rstrip(b"=").decode()
            assert digest == f"sha256={expected}" and int(size) == len(files[name]), name
