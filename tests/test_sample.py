"""Tests for userlens.sample: the synthetic e-commerce log generator."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from userlens.sample import (
    _CATS,
    CATEGORIES,
    CONSIDERED_CATEGORIES,
    EVENT_TYPES,
    IMPULSE_CATEGORIES,
    SampleSpec,
    SampleSummary,
    build_catalog,
    generate_sample,
    generate_user_lines,
    generate_user_truth,
    luhn_valid,
)

NOUNS = {category: info.nouns for category, info in _CATS.items()}

# The malformed-kinds check must hold for exactly this size (see the module brief).
SMALL = SampleSpec(users=200, days=14, seed=7, malformed_fraction=0.05, pii_fraction=0.05)
# Clean and a bit longer, for the behavioural signal checks.
SIGNAL = SampleSpec(users=300, days=28, seed=11, malformed_fraction=0.0, pii_fraction=0.05)

TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
EMAIL_RE = re.compile(r"[a-z0-9._]+@[a-z0-9.]+\.[a-z]{2,}")
PHONE_RE = re.compile(r"\+1 \d{3}-\d{3}-\d{4}|\(\d{3}\) \d{3}-\d{4}|\+44 \d{2} \d{4} \d{4}|\b0\d{2} \d{7}\b")
CARD_RE = re.compile(r"\b\d{4}([ -])\d{4}\1\d{4}\1\d{4}\b")
IPV4_RE = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")


# --------------------------------------------------------------------------
# Helpers and fixtures (the Spark session is the shared `spark` fixture in conftest.py)
# --------------------------------------------------------------------------


def read_events(events_dir: str) -> list[tuple[str, str]]:
    """(partition date, raw line) for every line under events/event_date=*/."""
    out: list[tuple[str, str]] = []
    for part in sorted(Path(events_dir).glob("event_date=*")):
        date = part.name.split("=", 1)[1]
        for f in sorted(part.iterdir()):
            if f.name.startswith(("_", ".")):
                continue
            out.extend((date, line) for line in f.read_text("utf-8").splitlines())
    return out


def read_items(items_dir: str) -> list[dict]:
    items: list[dict] = []
    for f in sorted(Path(items_dir).iterdir()):
        if not f.name.startswith(("_", ".")):
            items.extend(json.loads(line) for line in f.read_text("utf-8").splitlines())
    return items


def parse_ok(line: str) -> dict | None:
    """The parsed event if the line is well-formed, else None."""
    try:
        ev = json.loads(line)
    except ValueError:
        return None
    if "user_id" not in ev or not TS_RE.match(str(ev.get("ts", ""))):
        return None
    try:
        datetime.datetime.strptime(ev["ts"], "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None
    if ev.get("event_type") not in EVENT_TYPES:
        return None
    if "price" in ev and ev["price"] < 0:
        return None
    return ev


def classify(line: str) -> str:
    try:
        ev = json.loads(line)
    except ValueError:
        return "broken_json"
    if "user_id" not in ev:
        return "missing_user_id"
    try:
        datetime.datetime.strptime(str(ev.get("ts")), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return "bad_timestamp"
    if "price" in ev and ev["price"] < 0:
        return "negative_price"
    if ev.get("event_type") not in EVENT_TYPES:
        return "unknown_event_type"
    return "ok"


@pytest.fixture(scope="module")
def small(spark, tmp_path_factory) -> tuple[SampleSummary, list[tuple[str, str]]]:
    out = tmp_path_factory.mktemp("small")
    summary = generate_sample(spark, str(out), SMALL)
    return summary, read_events(summary.events_dir)


@pytest.fixture(scope="module")
def signal_events() -> pd.DataFrame:
    """A clean sample as a DataFrame, generated per user without Spark (the same
    lines Spark writes: see test_deterministic_and_partition_independent)."""
    catalog = build_catalog(SIGNAL)
    rows = [json.loads(line) for i in range(SIGNAL.users) for _, line in generate_user_lines(SIGNAL, i, catalog)]
    df = pd.DataFrame(rows)
    df["ts"] = pd.to_datetime(df["ts"], utc=True)
    return df


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


def test_summary_and_layout(small):
    summary, events = small
    assert summary.lines_written == len(events)
    # ~100 lines per user per 30 days: 200 users x 14 days -> about 9300
    assert 0.6 * 9333 < summary.lines_written < 1.4 * 9333
    assert summary.first_date == datetime.date(2026, 10, 1)
    assert summary.last_date == datetime.date(2026, 10, 14)
    assert summary.items_written == SMALL.items
    dates = {d for d, _ in events}
    window = {(SMALL.start_date + datetime.timedelta(days=k)).isoformat() for k in range(14)}
    assert dates <= window and len(dates) >= 12


def test_partition_dirs_match_ts_dates(small):
    _, events = small
    checked = 0
    for date, line in events:
        ev = parse_ok(line)
        if ev is not None:
            assert ev["ts"][:10] == date, line
            checked += 1
    assert checked > 0.9 * len(events)


def test_deterministic_and_partition_independent(spark, small, tmp_path):
    summary, events = small
    again = generate_sample(spark, str(tmp_path / "again"), SMALL)
    assert sorted(read_events(again.events_dir)) == sorted(events)
    assert read_items(again.items_dir) == read_items(summary.items_dir)
    # Spark output == plain sequential per-user generation (any partitioning).
    catalog = build_catalog(SMALL)
    direct = [pair for i in range(SMALL.users) for pair in generate_user_lines(SMALL, i, catalog)]
    assert sorted(direct) == sorted(events)
    # A different seed gives different data.
    other = dataclasses.replace(SMALL, seed=8)
    other_catalog = build_catalog(other)
    assert other_catalog.records != catalog.records
    other_lines = {line for i in range(SMALL.users) for _, line in generate_user_lines(other, i, other_catalog)}
    assert len(other_lines) > 0.5 * len(events)
    assert len(other_lines & {line for _, line in events}) < 0.01 * len(events)


def test_every_malformed_kind_appears(small):
    _, events = small
    lines = [line for _, line in events]
    kinds = collections.Counter(classify(line) for line in lines)
    for kind in ("broken_json", "missing_user_id", "bad_timestamp", "negative_price", "unknown_event_type"):
        assert kinds[kind] >= 1, (kind, kinds)
    dup = [line for line, n in collections.Counter(lines).items() if n > 1]
    assert dup, "no exact duplicate lines"
    assert all(classify(line) == "ok" for line in dup)  # duplicates are otherwise well-formed
    # Broken JSON is cut after the user id: it stays recoverable.
    for line in lines:
        if classify(line) == "broken_json":
            assert re.search(r'"user_id":"u\d{7}"', line), line
    bad = sum(n for k, n in kinds.items() if k != "ok") + len(dup)
    assert 0.03 < bad / len(lines) < 0.08


def test_clean_events_are_well_formed(small):
    _, events = small
    parsed = [ev for _, line in events if (ev := parse_ok(line)) is not None]
    ids = collections.Counter(ev["event_id"] for ev in parsed)
    # Event ids are unique except for the deliberate exact duplicates.
    assert all(n <= 2 for n in ids.values())
    assert sum(1 for n in ids.values() if n == 2) < 0.03 * len(parsed)
    seen_types = set()
    for ev in parsed:
        seen_types.add(ev["event_type"])
        assert re.fullmatch(r"u\d{7}", ev["user_id"])
        assert ev["user_id"][1:] not in ev["event_id"]  # the id does not leak the user
        assert re.fullmatch(r"[0-9a-f]{20}", ev["event_id"])
        t = ev["event_type"]
        if t == "search":
            assert ev["query"] and "item_id" not in ev and "category" not in ev
        else:
            assert re.fullmatch(r"i\d{5}", ev["item_id"]) and ev["category"] in CATEGORIES
            assert ev["price"] > 0 and "query" not in ev
        if t in ("add_to_cart", "purchase"):
            assert isinstance(ev["quantity"], int) and ev["quantity"] >= 1
        else:
            assert "quantity" not in ev
        if t == "review":
            assert ev["review_text"] and ev["rating"] in (1, 2, 3, 4, 5)
        else:
            assert "review_text" not in ev and "rating" not in ev
    assert seen_types == set(EVENT_TYPES)


def test_pii_appears_in_free_text(small):
    _, events = small
    texts = []
    for _, line in events:
        ev = parse_ok(line)
        if ev is not None:
            texts.extend(ev[k] for k in ("query", "review_text") if k in ev)
    found = collections.Counter()
    with_pii = 0
    for text in texts:
        hits = set()
        if EMAIL_RE.search(text):
            hits.add("email")
        if PHONE_RE.search(text):
            hits.add("phone")
        m = CARD_RE.search(text)
        if m:
            assert luhn_valid(m.group(0)), text
            hits.add("card")
        if IPV4_RE.search(text):
            hits.add("ipv4")
        found.update(hits)
        with_pii += bool(hits)
    assert set(found) == {"email", "phone", "card", "ipv4"}, found
    assert 0.02 < with_pii / len(texts) < 0.10


def test_pii_fraction_zero_means_no_pii():
    spec = SampleSpec(users=40, days=14, pii_fraction=0.0, malformed_fraction=0.0)
    catalog = build_catalog(spec)
    checked = 0
    for i in range(spec.users):
        for _, line in generate_user_lines(spec, i, catalog):
            ev = json.loads(line)
            for key in ("query", "review_text"):
                if key in ev:
                    text = ev[key]
                    checked += 1
                    assert not (
                        EMAIL_RE.search(text) or PHONE_RE.search(text) or CARD_RE.search(text) or IPV4_RE.search(text)
                    ), text
    # the loop saw free texts at all (40 users x 14 days write some hundreds of queries and reviews)
    assert checked >= 100


def test_luhn():
    assert luhn_valid("4111 1111 1111 1111")
    assert luhn_valid("5500-0000-0000-0004")
    assert not luhn_valid("4111 1111 1111 1112")


def test_item_catalog(small):
    summary, events = small
    items = read_items(summary.items_dir)
    assert len(items) == SMALL.items
    for it in items:
        assert set(it) == {"item_id", "title", "category", "brand", "price", "description"}
        assert it["category"] in CATEGORIES and it["price"] > 0
        assert it["title"] and it["brand"] and it["description"]
    assert {it["category"] for it in items} == set(CATEGORIES)
    ids = {it["item_id"] for it in items}
    assert len(ids) == len(items)
    by_id = {it["item_id"]: it for it in items}
    for _, line in events:
        ev = parse_ok(line)
        if ev is not None and "item_id" in ev:
            assert ev["item_id"] in ids
            assert ev["category"] == by_id[ev["item_id"]]["category"]
    # Category price levels differ: electronics cost more than grocery.
    med = pd.DataFrame(items).groupby("category")["price"].median()
    assert med["electronics"] > 3 * med["grocery"]


def test_signal_abandoned_considered_carts_come_back(signal_events):
    df = signal_events
    carts = df[df.event_type == "add_to_cart"][["user_id", "item_id", "category", "ts"]]
    carts = carts[carts.ts <= pd.Timestamp(SIGNAL.end_date, tz="UTC") - pd.Timedelta(days=7)]
    carts = carts.reset_index(drop=True).reset_index(names="cart")
    buys = df[df.event_type == "purchase"][["user_id", "item_id", "ts"]]
    m = carts.merge(buys, on="user_id", how="left", suffixes=("", "_p"))
    dt = m.ts_p - m.ts
    same_session = (m.item_id_p == m.item_id) & (dt >= pd.Timedelta(0)) & (dt <= pd.Timedelta(hours=1))
    later = (dt > pd.Timedelta(hours=1)) & (dt <= pd.Timedelta(days=7))
    per_cart = (
        pd.DataFrame(
            {
                "cart": m.cart,
                "bought_now": same_session,
                "any_later": later,
                "same_later": later & (m.item_id_p == m.item_id),
            }
        )
        .groupby("cart")
        .any()
    )
    per_cart = per_cart.join(carts.set_index("cart")["category"])
    abandoned = per_cart[~per_cart.bought_now]
    considered = abandoned[abandoned.category.isin(CONSIDERED_CATEGORIES)]
    impulse = abandoned[abandoned.category.isin(IMPULSE_CATEGORIES)]
    assert len(considered) >= 50 and len(impulse) >= 50
    # Purchase in the next 7 days: clearly more likely after a considered cart.
    assert considered.any_later.mean() > impulse.any_later.mean() + 0.15
    # ... and it is the carted item that comes back.
    assert considered.same_later.mean() > 0.5
    assert impulse.same_later.mean() < 0.2


@pytest.fixture(scope="module")
def truth() -> dict[str, dict]:
    """The generator's hidden state per raw user id (intents, complaints, fades) for the signal sample."""
    catalog = build_catalog(SIGNAL)
    return {f"u{i:07d}": generate_user_truth(SIGNAL, i, catalog) for i in range(SIGNAL.users)}


def test_signal_complaints_are_in_words_and_activity_fades_after_them(signal_events, truth):
    df = signal_events
    start = pd.Timestamp(SIGNAL.start_date, tz="UTC")
    day_of = ((df.ts - start).dt.days).rename("day")
    events = pd.concat([df[["user_id", "event_type", "rating"]], day_of], axis=1)
    reviews = events[events.event_type == "review"]
    complained = {(u, d) for u, t in truth.items() for d in t["complaints"]}
    is_complaint = [(u, d) in complained for u, d in zip(reviews.user_id, reviews.day)]
    complaints, others = reviews[is_complaint], reviews[[not c for c in is_complaint]]
    assert len(complaints) >= 25 and len(others) >= 30
    # the stars do not always show it: many complaints are rated 3 or 4, and a low rating is not always one
    assert (complaints.rating >= 3).mean() >= 0.25 and (others.rating <= 2).sum() >= 3

    def activity_ratio(user: str, day: int) -> float:
        mine = events[events.user_id == user].day
        before, after = ((mine >= day - 14) & (mine < day)).sum(), ((mine > day) & (mine <= day + 14)).sum()
        return after / max(before, 1)

    late = SIGNAL.days - 14  # a full 14 days after the review inside the window
    faded = [activity_ratio(u, t["fade"][0]) for u, t in truth.items() if t["fade"] and 7 <= t["fade"][0] <= late]
    happy = [
        activity_ratio(u, d)
        for u, d, r in zip(others.user_id, others.day, others.rating)
        if r >= 4 and 7 <= d <= late and not truth[u]["complaints"]
    ]
    assert len(faded) >= 10 and len(happy) >= 10
    # activity fades over weeks after a complaint (not within days: some is still there the week after)
    assert sum(faded) / len(faded) < 0.45 < sum(happy) / len(happy)
    week_after = [
        ((events.user_id == u) & (events.day > t["fade"][0]) & (events.day <= t["fade"][0] + 7)).sum() > 0
        for u, t in truth.items()
        if t["fade"] and t["fade"][0] <= SIGNAL.days - 8
    ]
    assert sum(week_after) / len(week_after) > 0.3


def test_signal_stated_intent_predicts_the_next_category_bought(signal_events, truth):
    df = signal_events
    start = pd.Timestamp(SIGNAL.start_date, tz="UTC")
    buys = df[df.event_type == "purchase"].assign(day=lambda b: (b.ts - start).dt.days)
    searches = df[df.event_type == "search"].assign(day=lambda b: (b.ts - start).dt.days)
    hits = stated = 0
    for user, t in truth.items():
        for day, category in t["intents"]:
            if day > SIGNAL.days - 9:
                continue
            mine = buys[(buys.user_id == user) & (buys.day > day) & (buys.day <= day + 8)]
            hits += bool((mine.category == category).any())
            # the need is said in words that name neither the category nor its products
            said = searches[(searches.user_id == user) & (searches.day == day)]["query"].str.lower().tolist()
            stated += any(category not in q and not any(n.lower() in q for n in NOUNS[category]) for q in said)
    intents = sum(1 for t in truth.values() for d, _ in t["intents"] if d <= SIGNAL.days - 9)
    assert intents >= 50
    assert hits / intents > 0.6 and stated == intents
    # without a stated need, a user buys in a given category in 8 days far less often
    per_category = buys.groupby("category").user_id.nunique() / SIGNAL.users * 8 / SIGNAL.days
    assert per_category.max() < 0.3


def test_signal_purchase_category_follows_interest(signal_events):
    df = signal_events.sort_values(["user_id", "ts"])
    hits = total = 0
    for _, g in df.groupby("user_id"):
        seen: collections.Counter = collections.Counter()
        for t, cat in zip(g.event_type, g.category):
            if t == "purchase" and sum(seen.values()) >= 10:
                total += 1
                hits += cat == seen.most_common(1)[0][0]
            if t in ("view", "click"):
                seen[cat] += 1
    assert total >= 100
    assert hits / total > 0.4  # chance would be about 1/12
