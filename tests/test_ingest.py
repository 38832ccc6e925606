"""Ingest on tiny handcrafted raw logs: accounting, quarantine reasons, idempotence,
pseudonyms, PII, incremental dates. Real Spark, real Delta."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
from pathlib import Path

import pytest
from pyspark.testing import assertDataFrameEqual

from conftest import TEST_KEY, make_settings
from userlens.privacy import load_key
from userlens.runs import StageRun
from userlens.stages.ingest import run_ingest
from userlens.tables import TABLES, Tables

D1, D2 = "2026-10-01", "2026-10-02"
PLANTED_PII = ["jane.doe42@example.com", "+1 415-555-0134", "4111 1111 1111 1111", "192.168.10.23"]


def ev(event_id: str, user: str | None, ts: str, etype: str, **extra: object) -> str:
    row = {"event_id": event_id, "ts": ts, "event_type": etype, **extra}
    if user is not None:
        row["user_id"] = user
    return json.dumps(row, sort_keys=True, separators=(",", ":"))


GOOD_D1 = [
    ev("e1", "alice-001", f"{D1}T10:00:00Z", "search", query="trail shoes mail jane.doe42@example.com"),
    ev("e2", "alice-001", f"{D1}T10:01:00Z", "view", item_id="i1", category="outdoor", price=89.5),
    ev("e3", "alice-001", f"{D1}T10:02:00Z", "add_to_cart", item_id="i1", category="outdoor", price=89.5, quantity=1),
    ev("e4", "bob-002", f"{D1}T11:00:00Z", "purchase", item_id="i2", category="books", price=12.0, quantity=2),
    ev(
        "e5",
        "bob-002",
        f"{D1}T12:00:00Z",
        "review",
        item_id="i2",
        category="books",
        rating=2,
        review_text="broke after a week, call me +1 415-555-0134 or card 4111 1111 1111 1111 from 192.168.10.23",
    ),
]
BAD_D1 = {
    '{"event_id":"x1","user_id":"carol-003","ts":"2026-10-01T09:00:00Z","event_ty': "malformed_record",
    ev("x2", None, f"{D1}T09:00:00Z", "view", item_id="i1"): "missing_user_id",
    ev("x3", "carol-003", "2026-13-45T99:00:00Z", "view", item_id="i1"): "bad_timestamp",
    ev("x4", "carol-003", f"{D1}T09:00:00Z", "hover", item_id="i1"): "unknown_event_type",
    ev("x5", "carol-003", f"{D1}T09:00:00Z", "view", item_id="i1", price=-5): "negative_price",
    ev("x6", "carol-003", f"{D1}T09:00:00Z", "view"): "missing_item_id",
    ev("x7", "carol-003", f"{D1}T09:00:00Z", "purchase", item_id="i1", quantity=0): "bad_quantity",
}
GOOD_D2 = [
    ev("e6", "alice-001", f"{D2}T08:00:00Z", "purchase", item_id="i1", category="outdoor", price=89.5, quantity=1),
    ev("e7", "dave-004", f"{D2}T09:00:00Z", "view", item_id="i2", category="books", price=12.0),
]
ITEMS = [
    {
        "item_id": "i1",
        "title": "Trail Runner X",
        "category": "outdoor",
        "brand": "Peak",
        "price": 89.5,
        "description": "A light trail shoe.",
    },
    {
        "item_id": "i2",
        "title": "Deep Work",
        "category": "books",
        "brand": "Press",
        "price": 12.0,
        "description": "A book.",
    },
    {"item_id": None, "title": "No id", "category": "books", "price": 1.0},
]
RAW_IDS = ["alice-001", "bob-002", "carol-003", "dave-004"]
# the handcrafted days plant one row per quarantine reason, more than half of the input: above the
# default ingest.max_quarantine_fraction, which test_own_data.py checks
ANY_QUARANTINE = "ingest.max_quarantine_fraction=1"


def write_raw(root: Path, day_lines: dict[str, list[str]], items: list[dict] = ITEMS) -> None:
    for day, lines in day_lines.items():
        folder = root / "events" / f"event_date={day}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "part-0.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "items").mkdir(parents=True, exist_ok=True)
    (root / "items" / "items.json").write_text("\n".join(json.dumps(i) for i in items) + "\n", encoding="utf-8")


def ingest(spark, settings, as_of=None, full=False, env=None):
    key = load_key(settings.privacy, env or {"USERLENS_HMAC_KEY": TEST_KEY})
    run = StageRun("ingest", run_id=f"run-{os.urandom(4).hex()}")
    return run_ingest(spark, settings, key, run, as_of, full), run


def write_day1(root: Path):
    # e2 duplicated exactly (same line) -> one duplicate
    write_raw(root / "raw", {D1: GOOD_D1 + [GOOD_D1[1]] + list(BAD_D1)})
    return make_settings(root, ANY_QUARANTINE)


@pytest.fixture
def day1(tmp_path: Path):
    return write_day1(tmp_path)


@pytest.fixture(scope="module")
def ingested(spark, tmp_path_factory):
    """Day 1 ingested once, as the CLI runs a stage (its pipeline_runs row recorded), for the tests that only
    read what it wrote: (settings, result). An ingest of 13 lines costs ~13 s, nearly all of it fixed."""
    from userlens.runs import run_stage

    settings = write_day1(tmp_path_factory.mktemp("day1"))
    key = load_key(settings.privacy, {"USERLENS_HMAC_KEY": TEST_KEY})
    return settings, run_stage("ingest", settings, spark, lambda run: run_ingest(spark, settings, key, run))


def all_strings(spark, tables: Tables) -> list[str]:
    """Every string value (top level) of every table that exists."""
    values: list[str] = []
    for name in TABLES:
        if tables.exists(name):
            df = tables.read(name)
            cols = [f.name for f in df.schema if f.dataType.simpleString() == "string"]
            for row in df.select(cols).collect():
                values.extend(v for v in row if v is not None)
    return values


def test_accounting_and_quarantine_reasons(spark, ingested):
    day1, result = ingested
    rows_in = len(GOOD_D1) + 1 + len(BAD_D1)
    assert result.rows_in == rows_in
    assert (result.rows_out, result.quarantined, result.duplicates) == (len(GOOD_D1), len(BAD_D1), 1)
    assert result.rows_in == result.rows_out + result.quarantined + result.duplicates
    tables = Tables(spark, day1.storage)
    assert tables.read("events").count() == len(GOOD_D1)
    got = tables.read("events_quarantine").where("source = 'events'").groupBy("reason").count()
    expected = spark.createDataFrame([(r, 1) for r in BAD_D1.values()], "reason string, count long")
    assertDataFrameEqual(got, expected)
    # the item without an id is quarantined too, and counted
    assert result.items_out == 2 and result.items_quarantined == 1


def test_pipeline_run_row_has_counts(spark, ingested):
    day1, _ = ingested
    runs = Tables(spark, day1.storage).read("pipeline_runs").collect()
    assert len(runs) == 1
    row = runs[0]
    assert (row.stage, row.status, row.rows_in, row.rows_out) == ("ingest", "succeeded", 13, 5)
    details = json.loads(row.details)
    assert details["duplicates"] == 1 and details["quarantined"] == 7
    assert row.as_of_date == dt.date(2026, 10, 1)


def test_reingest_same_date_is_identical(spark, day1):
    ingest(spark, day1)
    tables = Tables(spark, day1.storage)
    first = tables.read("events").drop("run_id").collect()
    first_q = tables.read("events_quarantine").select("raw", "reason").collect()
    ingest(spark, day1)
    assertDataFrameEqual(tables.read("events").drop("run_id"), first)
    assertDataFrameEqual(tables.read("events_quarantine").select("raw", "reason"), first_q)


def test_no_raw_id_or_planted_pii_in_any_table(spark, ingested):
    day1, _ = ingested
    values = "\n".join(all_strings(spark, Tables(spark, day1.storage)))
    for raw_id in RAW_IDS:
        assert raw_id not in values
    for pii in PLANTED_PII:
        assert pii not in values
    assert "<email>" in values and "<phone>" in values and "<card>" in values and "<ip>" in values


def test_user_key_is_hmac_stable_and_key_dependent(spark, day1, tmp_path):
    ingest(spark, day1)
    expected = hmac.new(TEST_KEY.encode(), b"alice-001", hashlib.sha256).hexdigest()
    keys = {
        r[0] for r in Tables(spark, day1.storage).read("events").where("event_id = 'e2'").select("user_key").collect()
    }
    assert keys == {expected}

    other = make_settings(tmp_path, f"storage.warehouse={tmp_path / 'wh2'}", ANY_QUARANTINE)
    ingest(spark, other, env={"USERLENS_HMAC_KEY": "another-secret-key-fedcba9876"})
    other_keys = {
        r[0] for r in Tables(spark, other.storage).read("events").where("event_id = 'e2'").select("user_key").collect()
    }
    assert len(other_keys) == 1 and other_keys != keys


def test_incremental_dates_and_full(spark, tmp_path):
    raw = tmp_path / "raw"
    bad_d2 = ev("y1", "dave-004", f"{D2}T09:00:00Z", "hover", item_id="i2")
    write_raw(raw, {D1: GOOD_D1 + list(BAD_D1)})
    settings = make_settings(tmp_path, ANY_QUARANTINE)
    first, _ = ingest(spark, settings)
    assert first.dates == [dt.date(2026, 10, 1)]
    write_raw(raw, {D2: GOOD_D2 + [bad_d2]})
    second, _ = ingest(spark, settings)
    # D1 is already in events: only the new date (the as-of date) is processed;
    # the counts are this run's rows, not rows Delta copied while rewriting files
    assert second.dates == [dt.date(2026, 10, 2)]
    assert (second.rows_in, second.rows_out, second.quarantined) == (len(GOOD_D2) + 1, len(GOOD_D2), 1)
    assert (
        Tables(spark, settings.storage).read("events_quarantine").where("source = 'events'").count() == len(BAD_D1) + 1
    )
    tables = Tables(spark, settings.storage)
    assert tables.read("events").count() == len(GOOD_D1) + len(GOOD_D2)
    # an explicit earlier as-of date re-processes that date only
    third, _ = ingest(spark, settings, as_of=dt.date(2026, 10, 1))
    assert third.dates == [dt.date(2026, 10, 1)]
    assert tables.read("events").count() == len(GOOD_D1) + len(GOOD_D2)
    full, _ = ingest(spark, settings, full=True)
    assert full.dates == [dt.date(2026, 10, 1), dt.date(2026, 10, 2)]
    assert tables.read("events").count() == len(GOOD_D1) + len(GOOD_D2)


def test_tables_are_valid_delta(spark, ingested):
    from delta.tables import DeltaTable

    day1, _ = ingested
    tables = Tables(spark, day1.storage)
    for name in ("events", "events_quarantine", "items"):
        path = tables.location(name)
        assert (Path(path) / "_delta_log").is_dir()
        assert DeltaTable.forPath(spark, path).toDF().count() > 0
    assert DeltaTable.forPath(spark, tables.location("events")).detail().first().partitionColumns == ["event_date"]


def test_events_content(spark, ingested):
    day1, _ = ingested
    events = Tables(spark, day1.storage).read("events")
    row = events.where("event_id = 'e4'").first()
    assert (row.event_type, row.item_id, row.category, row.price, row.quantity) == ("purchase", "i2", "books", 12.0, 2)
    assert row.event_time == dt.datetime(2026, 10, 1, 11, 0, 0)
    assert row.event_date == dt.date(2026, 10, 1)
    query = events.where("event_id = 'e1'").first().query
    assert query == "trail shoes mail <email>"


def test_csv_source_with_mapping(spark, tmp_path):
    raw = tmp_path / "raw"
    (raw / "events").mkdir(parents=True)
    (raw / "events" / "log.csv").write_text(
        "visitor,when,kind,sku\nv-1,1759312800,view,i1\nv-1,1759316400,addtocart,i1\nv-2,oops,view,i2\n",
        encoding="utf-8",
    )
    (raw / "items").mkdir()
    (raw / "items" / "items.csv").write_text("item_id,title\ni1,Thing\ni2,Other\n", encoding="utf-8")
    settings = make_settings(
        tmp_path,
        "source.format=csv",
        "source.timestamp_format=epoch_s",
        "source.mapping={event_id: null, user_id: visitor, event_time: when, event_type: kind, item_id: sku,"
        " category: null, price: null, quantity: null, query: null, text: null}",
        "source.items_mapping={item_id: item_id, title: title, category: null, brand: null, price: null,"
        " description: null}",
        "source.event_type_map.addtocart=add_to_cart",
    )
    result, _ = ingest(spark, settings)
    assert (result.rows_in, result.rows_out, result.quarantined) == (3, 2, 1)
    tables = Tables(spark, settings.storage)
    types = sorted(r[0] for r in tables.read("events").select("event_type").collect())
    assert types == ["add_to_cart", "view"]
    bad = tables.read("events_quarantine").where("source = 'events'").first()
    assert bad.reason == "bad_timestamp" and "v-2" not in bad.raw and bad.user_key in bad.raw


def test_plan_has_no_python_udf(spark, day1):
    from userlens.privacy import load_key as lk
    from userlens.sources.raw import classify_events, read_raw

    src = day1.source
    raw = read_raw(spark, src.events_location(), "json", src.mapping.model_dump(), src)
    plan = (
        classify_events(raw, day1, lk(day1.privacy, {"USERLENS_HMAC_KEY": TEST_KEY}))
        ._jdf.queryExecution()
        .executedPlan()
        .toString()
    )
    for node in ("BatchEvalPython", "ArrowEvalPython", "MapInPandas", "PythonUDF"):
        assert node not in plan


def test_dates_to_ingest():
    from userlens.stages.ingest import dates_to_ingest

    d = [dt.date(2026, 10, i) for i in (1, 2, 3)]
    assert dates_to_ingest(d, set(), None, False) == (d[2], d)
    assert dates_to_ingest(d, {d[0], d[1], d[2]}, None, False) == (d[2], [d[2]])  # as-of date always redone
    assert dates_to_ingest(d, {d[0]}, d[1], False) == (d[1], [d[1]])
    assert dates_to_ingest(d, set(d), dt.date(2026, 9, 1), False) == (dt.date(2026, 9, 1), [])
    assert dates_to_ingest(d, set(d), d[1], True) == (d[1], d[:2])


def test_duplicates_are_marked_with_and_without_date_folders(spark, day1):
    """Exact copies, a valid event repeated with other formatting and repeated bad lines, in a source with
    date folders and in one without (no source_date): every copy but one is a duplicate whatever the input
    order, and rows outside a group keep their status."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from userlens.privacy import load_key as lk
    from userlens.sources.raw import classify_events

    key = lk(day1.privacy, {"USERLENS_HMAC_KEY": TEST_KEY})
    good = ev("d1", "erin-005", f"{D1}T10:00:00Z", "view", item_id="i1", price=1.5)
    reformatted = good.replace(",", ", ")  # the same event (user, event_id), other formatting
    bad = ev("d2", None, f"{D1}T10:00:00Z", "view", item_id="i1")
    lines = [good, good, reformatted, bad, bad, GOOD_D1[0], ev("d3", "erin-005", "nope", "view")]
    mapping = day1.source.mapping.model_dump()
    fields = T.StructType([T.StructField(c, T.StringType()) for c in sorted({c for c in mapping.values() if c})])
    schema = T.StructType([T.StructField("value", T.StringType()), T.StructField("day", T.StringType())])

    def statuses(rows: list[tuple[str, str | None]]) -> dict[str, list[str]]:
        j = F.from_json("value", fields)
        raw = spark.createDataFrame(rows, schema).select(  # the raw contract, as read_raw gives it
            F.col("value").alias("raw"),
            F.col("day").cast("date").alias("source_date"),
            F.lit(False).alias("corrupt"),
            *[(j[c] if c else F.lit(None).cast("string")).alias(f"f_{f}") for f, c in mapping.items()],
        )
        out: dict[str, list[str]] = {}
        for r in classify_events(raw, day1, key).collect():
            out.setdefault(r.status, []).append(r.reason or r.event_id)
        return {s: sorted(v) for s, v in out.items()}

    for date in (D1, None):
        rows = [(line, date) for line in lines]
        first = statuses(rows)
        assert first == {
            "ok": ["d1", "e1"],
            "duplicate": ["d1", "d1", "missing_user_id"],
            "quarantined": ["bad_timestamp", "missing_user_id"],
        }, date
        assert statuses(rows[::-1]) == first
    # the same line on two dates: no duplicates of one another
    assert statuses([(good, D1), (good, D2)]) == {"ok": ["d1", "d1"]}
