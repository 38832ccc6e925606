"""Catalog mode: with storage.catalog and storage.schema set, every table is `catalog`.`schema`.`name`
(Unity Catalog on Databricks). Here the catalog is Spark's own session catalog, with Delta's catalog
behind it: a whole nightly, a rerun of the same date that writes no data file, and a forget that leaves
no row and no file of the person. Nothing may be written by path under storage.warehouse."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from types import SimpleNamespace

import pytest
from pyspark.sql import functions as F

from conftest import SHORT_TEXTS, data_files, files_holding, is_key, make_settings, session_conf
from userlens.privacy import load_key
from userlens.runs import StageRun
from userlens.sample import SampleSpec, generate_sample
from userlens.stages.forget import RETENTION_CHECK, run_forget, user_key_of
from userlens.stages.nightly import run_nightly
from userlens.tables import Tables

CATALOG, SCHEMA = "spark_catalog", "userlens_catalog_mode"
USERS, DAYS, START = 120, 10, dt.date(2026, 10, 1)
RAW_ID = "u0000007"
OVERRIDES = [
    "train.epochs=2",
    "train.patience=1",
    "train.batch_size=32",
    "train.min_users=30",
    "train.min_class_users=3",
    "train.num_processes=1",  # two DDP processes: tests/test_train.py and the cluster test
    "profile.segments=3",
    "privacy.min_segment_size=5",
    "nightly.report=false",
    "privacy.forget_retention_hours=0",
    f"spark.conf.{RETENTION_CHECK}=false",
    SHORT_TEXTS,
]
PERSONAL = ["events", "user_texts", "user_embeddings", "user_scores", "user_profiles"]


@pytest.fixture(scope="module")
def world(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("catalog")
    spark.sql(f"CREATE SCHEMA IF NOT EXISTS {CATALOG}.{SCHEMA} LOCATION '{root / 'schema'}'")
    settings = make_settings(root, f"storage.catalog={CATALOG}", f"storage.schema={SCHEMA}", *OVERRIDES)
    key = load_key(settings.privacy)
    generate_sample(
        spark, settings.source.path, SampleSpec(users=USERS, days=DAYS, items=100, seed=11, start_date=START)
    )
    w = SimpleNamespace(root=root, settings=settings, tables=Tables(spark, settings.storage))
    w.first = run_nightly(spark, settings, key)
    w.files_first = data_files(w.tables)
    w.users, w.profiles = w.tables.read("user_embeddings").count(), w.tables.read("user_profiles").count()
    w.again = run_nightly(spark, settings, key)
    w.files_again = data_files(w.tables)
    w.target = user_key_of(RAW_ID, key)
    w.folders = {
        t: Path(w.tables.delta(t).detail().select("location").first()[0].removeprefix("file:")) for t in PERSONAL
    }
    w.held = {t: files_holding(w.folders[t], "user_key", is_key(w.target)) for t in PERSONAL}
    w.before = {t: w.tables.read(t).where(F.col("user_key") == w.target).count() for t in PERSONAL}
    with session_conf(spark, {RETENTION_CHECK: "false"}):
        w.forgot = run_forget(spark, settings, key, RAW_ID, StageRun("forget", "r-forget"))
    yield w
    spark.sql(f"DROP SCHEMA IF EXISTS {CATALOG}.{SCHEMA} CASCADE")


def test_nightly_writes_catalog_tables_only(spark, world):
    tables, first = world.tables, world.first
    assert tables.use_catalog
    assert list(first.stages) == [
        "ingest",
        "textualize",
        "embed",
        "train",
        "score",
        "profile",
        "quarantine_retention",
        "privacy_check",
    ]
    listed = {r.tableName for r in spark.sql(f"SHOW TABLES IN {CATALOG}.{SCHEMA}").collect()}
    assert set(PERSONAL) | {"items", "pipeline_runs", "segments"} <= listed
    assert world.users > 90 and world.profiles == world.users  # (counted before the forget below)
    assert first.stages["score"].scored == world.users
    # the change data feed is on for user_profiles, as in path mode (created with its table properties)
    assert tables.properties("user_profiles").get("delta.enableChangeDataFeed") == "true"
    assert not (world.root / "warehouse").exists()  # nothing by path


def test_second_run_of_the_same_date_writes_no_data_file(world):
    assert world.again.as_of_date == world.first.as_of_date
    assert "train" not in world.again.stages  # the model of the first run is recent enough
    assert world.again.stages["embed"].users.embedded == 0 and world.again.stages["score"].scored == 0
    assert world.files_first and world.files_again == world.files_first
    # the privacy check read only what was written since the first night's (catalog tables' new files)
    check = world.again.stages["privacy_check"]
    assert not check.scope.full and {t.table: t.rows for t in check.tables}["events"] == 0


def test_forget_leaves_no_row_and_no_file_of_the_person(world):
    tables, target = world.tables, world.target
    assert all(world.before[t] > 0 for t in PERSONAL), world.before
    for t in PERSONAL:
        assert tables.read(t).where(F.col("user_key") == target).count() == 0, t
        assert world.held[t] and not [p for p in world.held[t] if p.exists()], t  # vacuumed from disk
        assert not files_holding(world.folders[t], "user_key", is_key(target)), t
    assert world.forgot.rows_found >= sum(world.before.values())
    audit = tables.read("forget_log").where(F.col("user_key") == target).collect()
    assert len(audit) == 1 and audit[0].run_id == "r-forget"
