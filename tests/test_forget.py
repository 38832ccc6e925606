"""Forget (GDPR erasure) on a real ingested warehouse: every table, the quarantine's raw text,
deletion vectors, change data, training snapshots, VACUUM to disk, the audit row, and no raw id
anywhere. Real Spark, real Delta; the forget runs once per module."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from pyspark.sql import functions as F

from conftest import TEST_KEY, files_holding, is_key, make_settings, session_conf
from userlens.errors import ConfigError, SecretError
from userlens.privacy import PseudonymKey, load_key, pseudonymize
from userlens.runs import StageRun
from userlens.sample import SampleSpec, generate_sample
from userlens.stages.forget import (
    RETENTION_CHECK,
    SNAPSHOTS,
    describe,
    file_retention_hours,
    holds_raw_id,
    run_forget,
    user_key_of,
)
from userlens.stages.ingest import run_ingest
from userlens.tables import Tables, table_schema

RAW_ID = "u0000003"
OTHERS = ["u0000004", "u0000012"]
UNKNOWN_ID = "u9999999"
ERASED = ["events", "events_quarantine", "user_texts", "user_embeddings", "user_scores", "user_profiles"]
D1, D2 = dt.date(2026, 10, 4), dt.date(2026, 10, 5)
NOW = dt.datetime(2026, 10, 5, 12, tzinfo=dt.timezone.utc)
# planted quarantine lines: (raw, erased?) - an unredacted id, an id in free text, and longer ids that stay
PLANTED = [
    ('{"event_id":"p1","ts":"never","user_id":"u0000003"}', True),
    ('{"event_id":"p2","review_text":"ask u0000003. he knows","user_id":"<redacted>"}', True),
    ('{"event_id":"p3","ts":"never","user_id":"u00000031"}', False),
    ('{"event_id":"p4","ts":"never","user_id":"xu0000003"}', False),
    ('{"event_id":"p5","ref":"u0000003-b","user_id":"<redacted>"}', False),
]


def test_user_key_of_equals_spark_pseudonymize(spark):
    keys = [
        PseudonymKey(secret=TEST_KEY.encode(), key_id="test"),
        PseudonymKey(secret=b"k" * 100, key_id="long"),
    ]  # longer than a SHA-256 block: hashed first
    ids = ["u0000003", "  u0000003 ", "\tu0000003\n", "ünï cødé 🙂", 'a"b\\c']
    df = spark.createDataFrame([(i,) for i in ids], "id string")
    for key in keys:
        got = [r[0] for r in df.select(pseudonymize(F.col("id"), key)).collect()]
        assert got == [user_key_of(i, key) for i in ids]
    assert user_key_of(" u0000003 ", keys[0]) == user_key_of("u0000003", keys[0])


def test_raw_id_matches_whole_tokens_only(spark):
    lines = {
        '{"user_id":"u12"}': True,
        '{"user_id": "u12", "x":1}': True,
        '{"text":"ask u12."}': True,
        '{"text":"(u12)"}': True,
        '{"user_id":"u123"}': False,
        '{"user_id":"xu12"}': False,
        '{"ref":"u12-b"}': False,
        '{"v":"u12.5"}': False,
        '{"m":"u12@example.com"}': False,
        '{"text":"u12_x"}': False,
    }
    df = spark.createDataFrame([(k,) for k in lines], "raw string")
    got = {r.raw: r.hit for r in df.select("raw", holds_raw_id(F.col("raw"), "u12").alias("hit")).collect()}
    assert got == lines
    # regex syntax in an id is matched literally; JSON-escaped forms are found too
    odd = spark.createDataFrame([('{"user_id":"a.b*c"}',), ('{"user_id":"aXbbbc"}',), ('{"t":"q\\"d"}',)], "raw string")
    assert [r[0] for r in odd.select(holds_raw_id(F.col("raw"), "a.b*c")).collect()] == [True, False, False]
    assert [r[0] for r in odd.select(holds_raw_id(F.col("raw"), 'q"d')).collect()] == [False, False, True]


def test_file_retention_hours():
    assert file_retention_hours({}) == 168
    assert file_retention_hours({"delta.deletedFileRetentionDuration": "interval 2 days 12 hours"}) == 60
    assert file_retention_hours({"delta.deletedFileRetentionDuration": "soon"}) is None


# --------------------------------------------------------------------------
# the warehouse, forgotten once
# --------------------------------------------------------------------------
class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage() + (self.format(record) if record.exc_info else ""))


def is_erased_line(values):
    return pc.is_in(values, value_set=pa.array([raw for raw, erased in PLANTED if erased]))


def plant(spark, tables: Tables, keys: dict[str, str], snapshot: str) -> None:
    """Rows of the target and two other users in the tables ingest does not fill, and a snapshot."""
    q = [(raw, "malformed_record", "planted", "r0", D1, None, NOW) for raw, _ in PLANTED]
    # a redacted line as ingest writes it: the user_key in place of the id
    q.append(
        (
            f'{{"event_id":"p0","ts":"never","user_id":"{keys[RAW_ID]}"}}',
            "bad_timestamp",
            "planted",
            "r0",
            D1,
            keys[RAW_ID],
            NOW,
        )
    )
    tables.replace_where(
        "events_quarantine", spark.createDataFrame(q, table_schema("events_quarantine")), "source = 'planted'"
    )
    users = list(keys.values())
    vec = [0.5, 0.25]
    texts = [
        (k, d, f"text {k[:6]} {d}", f"h{k[:6]}{d}", 3, "1", f"Last active {d}.", f"s{k[:6]}{d}")
        for k in users
        for d in (D1, D2)
    ]
    tables.merge("user_texts", spark.createDataFrame(texts, table_schema("user_texts")))
    embeddings = [(k, D2, f"h{k[:6]}", "m", vec, f"s{k[:6]}{D2}", vec) for k in users]
    tables.merge("user_embeddings", spark.createDataFrame(embeddings, table_schema("user_embeddings")))
    tables.ensure("user_scores")
    spark.sql(f"ALTER TABLE {tables.sql_name('user_scores')} SET TBLPROPERTIES ('delta.enableDeletionVectors'='true')")
    scores = [(k, d, "v1", "h", 0.3, 0.1, "books", 0.4, NOW, ["i1"], None) for k in users for d in (D1, D2)]
    tables.merge("user_scores", spark.createDataFrame(scores, table_schema("user_scores")))
    profiles = [(k, D2, vec, 0.3, 0.1, "books", ["books"], 1, ["i1"], 2, 5, 20.0, "v1", NOW, "m", "s1") for k in users]
    tables.merge("user_profiles", spark.createDataFrame(profiles, table_schema("user_profiles")))
    # an update: change data files now hold the target's profile before and after
    tables.merge(
        "user_profiles",
        spark.createDataFrame(
            [(keys[RAW_ID], *profiles[0][1:3], 0.9, *profiles[0][4:])], table_schema("user_profiles")
        ),
    )
    rows = [(k, split, vec, [1.0, 2.0], 1.0, 0.0, 2) for k in users for split in ("train", "test")]
    (
        spark.createDataFrame(
            rows,
            "user_key string, split string, embedding array<float>, features array<float>, "
            "purchase double, churn double, next_category int",
        )
        .repartition(2)
        .write.partitionBy("split")
        .parquet(snapshot)
    )


@pytest.fixture(scope="module")
def world(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("forget")
    settings = make_settings(root, f"spark.conf.{RETENTION_CHECK}=false", "privacy.forget_retention_hours=0")
    key = load_key(settings.privacy, {"USERLENS_HMAC_KEY": TEST_KEY})
    generate_sample(spark, settings.source.path, SampleSpec(users=30, days=5, seed=3, malformed_fraction=0.05))
    run_ingest(spark, settings, key, StageRun("ingest", "r1"), None, True)
    tables = Tables(spark, settings.storage)
    keys = {raw: user_key_of(raw, key) for raw in [RAW_ID, *OTHERS]}
    target = keys[RAW_ID]
    snapshot = root / "models" / SNAPSHOTS / "2026-09-28-r0"
    plant(spark, tables, keys, str(snapshot))
    folder = {name: Path(tables.location(name)) for name in ERASED}

    who = F.when(F.col("user_key") == target, "target").otherwise(F.coalesce("user_key", F.lit(""))).alias("k")

    def counts():  # rows per user_key ("target" for the person, "" for none)
        return {
            name: {r[0]: r[1] for r in tables.read(name).select(who).groupBy("k").count().collect()} for name in ERASED
        }

    before = counts()
    q_before = [r.raw for r in tables.read("events_quarantine").select("raw").collect()]
    held_before = {name: files_holding(folder[name], "user_key", is_key(target)) for name in ERASED}
    held_before["events_quarantine"] |= files_holding(folder["events_quarantine"], "raw", is_erased_line)
    snapshot_before = spark.read.parquet(str(snapshot)).groupBy("user_key").count().collect()

    records = Records()
    logger = logging.getLogger("userlens")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(records)
    run, unknown_run = StageRun("forget", "r-forget"), StageRun("forget", "r-unknown")
    try:
        with session_conf(spark, {RETENTION_CHECK: settings.spark.conf[RETENTION_CHECK]}):
            result = run_forget(spark, settings, key, RAW_ID, run)
            unknown = run_forget(spark, settings, key, UNKNOWN_ID, unknown_run)
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    return SimpleNamespace(
        root=root,
        settings=settings,
        key=key,
        tables=tables,
        keys=keys,
        target=target,
        folder=folder,
        before=before,
        after=counts(),
        q_before=q_before,
        q_after=[r.raw for r in tables.read("events_quarantine").select("raw").collect()],
        held_before=held_before,
        snapshot=snapshot,
        snapshot_before={r[0]: r[1] for r in snapshot_before},
        result=result,
        run=run,
        unknown=unknown,
        unknown_run=unknown_run,
        logs=records.lines,
    )


def test_every_table_loses_the_person_and_nobody_else(world):
    for name in ERASED:
        assert world.before[name].get("target", 0) > 0, name
        assert "target" not in world.after[name], name
        others_before = {k: n for k, n in world.before[name].items() if k not in ("target", "")}
        assert {k: n for k, n in world.after[name].items() if k != ""} == others_before, name
    # the result and the Delta metrics agree with the counts
    quarantine_by_raw = sum(erased for _, erased in PLANTED)
    expected = {name: world.before[name]["target"] for name in ERASED}
    expected["events_quarantine"] += quarantine_by_raw
    assert world.result.rows == expected
    # sample lines that lost their user_key (missing id) are not the person's and stay
    assert world.after["events_quarantine"][""] == world.before["events_quarantine"][""] - quarantine_by_raw


def test_quarantine_rows_with_the_raw_id_are_gone_and_longer_ids_stay(world):
    assert sorted(raw for raw in world.q_after if RAW_ID in raw) == sorted(raw for raw, erased in PLANTED if not erased)
    assert not [raw for raw in world.q_after if world.target in raw]
    assert len(world.q_before) - len(world.q_after) == world.result.rows["events_quarantine"]


def test_vacuum_removed_the_old_files_from_disk(world):
    for name in ERASED:
        assert world.held_before[name], name
        assert not [p for p in world.held_before[name] if p.exists()], name
        # every data file left, read directly with pyarrow, change data and deletion-vector tables included
        assert not files_holding(world.folder[name], "user_key", is_key(world.target)), name
    assert not files_holding(world.folder["events_quarantine"], "raw", is_erased_line)
    assert list((world.folder["user_profiles"] / "_change_data").glob("*.parquet")) == []
    assert world.result.files_purged and world.result.retention_hours == 0


def test_snapshot_files_rewritten_without_the_person(spark, world):
    result = world.result
    assert result.snapshot_rows == world.snapshot_before[world.target] == 2
    assert len(result.snapshot_files) == 2
    assert not files_holding(world.snapshot, "user_key", is_key(world.target))
    # still a readable Spark dataset (stale Hadoop checksums removed), split column and other users intact
    after = spark.read.parquet(str(world.snapshot))
    assert {r[0]: r[1] for r in after.groupBy("user_key").count().collect()} == {
        k: n for k, n in world.snapshot_before.items() if k != world.target
    }
    assert sorted(r[0] for r in after.select("split").distinct().collect()) == ["test", "train"]
    assert result.rows_found == sum(result.rows.values()) + result.snapshot_rows


def test_audit_row_and_no_raw_id_anywhere(world):
    log_rows = world.tables.read("forget_log").collect()
    row = next(r for r in log_rows if r.user_key == world.target)
    assert (row.rows_found, row.files_purged, row.run_id) == (world.result.rows_found, True, "r-forget")
    assert json.loads(row.tables) == {**world.result.rows, SNAPSHOTS: 2}
    assert row.requested_at is not None
    assert not any(RAW_ID in str(v) or UNKNOWN_ID in str(v) for r in log_rows for v in r)
    # logs: a line per table, never the raw id
    for name in ERASED:
        assert any(f"forget: {name}" in line for line in world.logs), name
    assert not [line for line in world.logs if RAW_ID in line or UNKNOWN_ID in line]
    assert RAW_ID not in json.dumps(world.result.run_record().details) and RAW_ID not in repr(world.result)
    assert RAW_ID not in describe(world.result) and world.target in describe(world.result)
    # the Delta commit records (predicates) of every table
    for name in [*ERASED, "forget_log"]:
        log_dir = Path(world.tables.location(name)) / "_delta_log"
        for commit in log_dir.glob("*.json"):
            for line in commit.read_text().splitlines():
                if '"commitInfo"' in line:
                    assert RAW_ID not in line, (name, commit.name)


def test_unknown_id_finds_nothing_and_is_audited(world):
    unknown = world.unknown
    assert unknown.rows_found == 0 and unknown.snapshot_rows == 0 and unknown.snapshot_files == ()
    assert unknown.rows == {name: 0 for name in ERASED}
    assert describe(unknown).endswith("no data held for this id")
    row = next(r for r in world.tables.read("forget_log").collect() if r.user_key == user_key_of(UNKNOWN_ID, world.key))
    assert (row.rows_found, row.run_id) == (0, "r-unknown")
    assert world.unknown.run_record().rows_in == 0


def test_zero_retention_refused_by_delta_check_before_deleting(spark, world):
    settings = make_settings(world.root, "privacy.forget_retention_hours=0")  # the session's check is on
    victim = world.keys[OTHERS[0]]
    with pytest.raises(ConfigError) as err:
        run_forget(spark, settings, world.key, OTHERS[0], StageRun("forget", "r-refused"))
    message = str(err.value)
    assert "privacy.forget_retention_hours" in message and RETENTION_CHECK in message
    assert "\n" not in message and OTHERS[0] not in message
    assert world.tables.read("events").where(F.col("user_key") == victim).count() > 0
    assert not world.tables.read("forget_log").where(F.col("run_id") == "r-refused").count()


def test_forget_with_another_key_is_refused_before_deleting(spark, world):
    """Another key gives another user_key: the person would be "not found" and stay everywhere."""
    other = load_key(world.settings.privacy, {"USERLENS_HMAC_KEY": TEST_KEY + "-rotated"})
    victim = world.keys[OTHERS[0]]
    with pytest.raises(SecretError) as err:
        run_forget(spark, world.settings, other, OTHERS[0], StageRun("forget", "r-other-key"))
    message = str(err.value)
    assert f"key id {world.key.key_id}" in message and f"key id {other.key_id}" in message
    assert "\n" not in message and OTHERS[0] not in message and TEST_KEY not in message
    assert world.tables.read("events").where(F.col("user_key") == victim).count() > 0
    assert not world.tables.read("forget_log").where(F.col("run_id") == "r-other-key").count()
