"""One Spark session for the whole test run, built by the project's own helper:
local[2], UI off, few shuffle partitions, Delta on. Each test gets its own
warehouse under tmp_path."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

from userlens.config import Settings, load_settings

TEST_KEY = "test-hmac-key-0123456789abcdef"

SPARK_OVERRIDES = [
    "spark.master=local[2]",
    "spark.ui=false",
    "spark.shuffle_partitions=2",
    "spark.driver_memory=2g",
    "spark.log_level=ERROR",
    "spark.conf.spark.ui.showConsoleProgress=false",
]


# Pipeline tests that check what the stages do, not what the texts say, render shorter texts: MiniLM's
# cost grows with the tokens, and 96 (a header and a day or two) instead of 256 makes their embedding
# (and the train stage's re-embedding at the cutoff) about three times cheaper.
SHORT_TEXTS = "textualize.max_tokens=96"
# ... and state texts of 48 (the last active day, the open cart and the newest order fit; a state text is
# about as long as a 96-token history text otherwise, and would double what the pipeline tests embed)
SHORT_STATE = "textualize.state.max_tokens=48"
# The state text and the model's state view, off by default (docs/training.md, "The state text")
STATE_ON = ("textualize.state.enabled=true", "train.views=[history, state]")


# The explain stage's occlusion embeds a text per active day of each user it explains: pipeline tests leave it
# out (the nightly skips it); tests/test_explain.py runs it and checks what an explanation says.
NO_EXPLAIN = "explain.users=none"


# The train stage's ALS baseline tries a grid of settings on the valid split (12 fits); pipeline tests
# fit the one configured setting, and tests/test_train.py's two-process run checks the tuning.
FIXED_ALS = "train.recommend.als.tune=false"
# The bag-of-words baseline and the state probe (6 MLlib fits a train run each): the DDP test of
# tests/test_train.py fits both, the fallback test the probe
NO_TEXT_BASELINE = "train.text_baseline=false"
NO_STATE_PROBE = "train.state_probe=false"


def make_settings(tmp_path: Path, *overrides: str) -> Settings:
    """Local settings with the warehouse, models and source under tmp_path (the train stage's ALS baseline
    not tuned: FIXED_ALS; no explanations: NO_EXPLAIN; no bag-of-words baseline, no state probe:
    NO_TEXT_BASELINE, NO_STATE_PROBE)."""
    return load_settings(
        None,
        [
            *SPARK_OVERRIDES,
            f"storage.warehouse={tmp_path / 'warehouse'}",
            f"storage.models={tmp_path / 'models'}",
            f"source.path={tmp_path / 'raw'}",
            FIXED_ALS,
            NO_EXPLAIN,
            NO_TEXT_BASELINE,
            NO_STATE_PROBE,
            *overrides,
        ],
    )


@contextmanager
def session_conf(spark, conf: dict[str, str]):
    """What get_spark does with a settings' spark.conf (the test session is shared), undone afterwards."""
    previous = {k: spark.conf.get(k, None) for k in conf}
    for k, v in conf.items():
        spark.conf.set(k, v)
    try:
        yield
    finally:
        for k, v in previous.items():
            spark.conf.unset(k) if v is None else spark.conf.set(k, v)


def data_files(tables) -> dict[str, set[str]]:
    """The data files of every table that exists, bookkeeping (pipeline_runs, run_locks) left out: a run
    that writes no data leaves this unchanged."""
    from userlens.tables import TABLES

    return {
        t: set(tables.read(t).inputFiles())
        for t in TABLES
        if t not in ("pipeline_runs", "run_locks") and tables.exists(t)
    }


def files_holding(folder: Path, column: str, hit) -> set[Path]:
    """The Parquet data files under a table folder (change data included, read past Delta) in which
    ``hit(column values)`` is true for some row."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    found = set()
    for path in sorted(folder.rglob("*.parquet")):
        if "_delta_log" in path.parts or path.name.startswith("."):
            continue
        parquet = pq.ParquetFile(path)
        if column in parquet.schema_arrow.names and pc.any(hit(parquet.read(columns=[column]).column(column))).as_py():
            found.add(path)
    return found


def is_key(key: str):
    import pyarrow.compute as pc

    return lambda values: pc.equal(values, key)


@pytest.fixture(scope="session")
def spark(tmp_path_factory: pytest.TempPathFactory):
    from userlens.spark import get_spark

    os.environ.setdefault("USERLENS_HMAC_KEY", TEST_KEY)
    settings = make_settings(tmp_path_factory.mktemp("session"))
    session = get_spark(settings)
    yield session
    session.stop()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


# Modules that run whole pipelines (minutes each) go first, longest first (their seconds in a clean-clone CI
# run, 2026-12-06): `make test` hands modules to its pytest-xdist processes in collection order
# (--no-loadscope-reorder), and a long module started last would run alone at the end.
LONG_MODULES = (
    "test_privacy_check.py",  # 475 s
    "test_cluster_nightly.py",  # 447 s
    "test_nightly.py",  # 426 s
    "test_databricks.py",  # 363 s
    "test_train.py",  # 256 s
    "test_evaluate.py",  # 164 s
    "test_ingest.py",  # 201 s before its tests shared one ingest
    "test_forget.py",  # 91 s
)


# Modules whose tests share a whole pipeline run, the demo or a cluster (markers: pyproject.toml); `make
# test-fast` leaves them out
PIPELINE_MODULES = (
    *LONG_MODULES,
    "test_report.py",
    "test_embed.py",
    "test_own_data.py",
    "test_textualize.py",
    "test_quarantine_retention.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in PIPELINE_MODULES:
            item.add_marker(pytest.mark.pipeline)
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_MODULES)))  # stable: file order kept otherwise
