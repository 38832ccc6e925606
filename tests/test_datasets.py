"""Dataset adapters: each public format read with Spark into ingest's raw contract, then through ingest's
own classify_events / classify_items; counts, types, text fields, encodings; one-line errors."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from pyspark.sql import Row
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

import dataset_files as D
from conftest import SPARK_OVERRIDES, TEST_KEY
from userlens.cli import main
from userlens.config import CONF_DIR, load_settings
from userlens.errors import SourceError
from userlens.privacy import load_key
from userlens.sources import datasets
from userlens.sources.raw import classify_events, classify_items
from userlens.tables import Tables
from userlens.text.user_texts import build_user_texts

KEY = load_key(load_settings().privacy, {"USERLENS_HMAC_KEY": TEST_KEY})
LOCAL = str(CONF_DIR / "local.yaml")


def preset_settings(name: str, root: Path, *overrides: str):
    return load_settings(
        [LOCAL, CONF_DIR / "datasets" / f"{name}.yaml"], [*SPARK_OVERRIDES, f"source.path={root}", *overrides]
    )


def events_of(spark, settings):
    source = datasets.read_events(spark, settings)
    return source, classify_events(source.frame, settings, KEY)


def items_of(spark, settings):
    return classify_items(datasets.read_items(spark, settings).frame).where("status = 'ok'")


def utc(seconds: float) -> dt.datetime:
    # the session time zone is UTC; collected timestamps are naive local (UTC) datetimes
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).replace(tzinfo=None)


def test_movielens_100k_ratings_and_latin1_catalogue(spark, tmp_path):
    settings = preset_settings("movielens-100k", D.write_ml100k(tmp_path / "ml-100k"))
    source, events = events_of(spark, settings)
    assert source.user_field == "user_id"
    expected = [
        Row(
            item_id=str(item),
            event_type="rate",
            text=f"{(user + item) % 5 + 1}/5",
            event_time=utc(D.T0 + user * 1000 + n * D.DAY),
        )
        for user, items in D.ML100K_HISTORIES.items()
        for n, item in enumerate(items)
    ]
    assertDataFrameEqual(events.where("status = 'ok'").select("item_id", "event_type", "text", "event_time"), expected)
    assert events.where("status != 'ok'").count() == 0
    items = items_of(spark, settings)
    assertDataFrameEqual(
        items.where("item_id IN ('1', '5')").select("item_id", "title", "category", "description"),
        [
            Row(
                item_id="1",
                title="Toy Story (1995)",
                category="Animation",
                description="Genres: Animation, Children's, Comedy. Released 01-Jan-1995",
            ),
            Row(
                item_id="5",
                title="Misérables, Les (1995)",
                category="Crime",
                description="Genres: Crime, Drama, Thriller. Released 01-Jan-1995",
            ),
        ],
    )
    assert items.count() == 6


def test_movielens_csv_half_stars_tags_and_quoted_titles(spark, tmp_path):
    settings = preset_settings("movielens", D.write_movielens_csv(tmp_path / "ml-latest-small"))
    source, events = events_of(spark, settings)
    assert source.user_field == "userId"
    assertDataFrameEqual(
        events.select("status", "event_type", "item_id", "text"),
        [
            Row(status="ok", event_type="rate", item_id="1", text="4/5"),
            Row(status="ok", event_type="rate", item_id="3", text="3.5/5"),
            Row(status="ok", event_type="rate", item_id="3", text="5/5"),
            Row(status="ok", event_type="rate", item_id="6", text="0.5/5"),
            Row(status="ok", event_type="tag", item_id="1", text="pixar"),
            Row(status="ok", event_type="tag", item_id="3", text="funny, smart"),
        ],
    )
    assertDataFrameEqual(
        items_of(spark, settings).select("item_id", "title", "category", "description"),
        [
            Row(
                item_id="1",
                title="Toy Story (1995)",
                category="Adventure",
                description="Genres: Adventure, Animation, Children, Comedy, Fantasy",
            ),
            Row(
                item_id="3",
                title="American President, The (1995)",
                category="Comedy",
                description="Genres: Comedy, Drama, Romance",
            ),
            Row(item_id="6", title='"Great Performances" Cats (1998)', category=None, description=None),
        ],
    )


def test_movielens_dat_files_and_latin1_movies(spark, tmp_path):
    settings = preset_settings("movielens", D.write_movielens_dat(tmp_path / "ml-1m"))
    source, events = events_of(spark, settings)
    assert source.user_field == "UserID"
    assertDataFrameEqual(
        events.select("status", "item_id", "text", "event_time"),
        [
            Row(status="ok", item_id="1193", text="5/5", event_time=utc(978300760)),
            Row(status="ok", item_id="661", text="3/5", event_time=utc(978302109)),
            Row(status="ok", item_id="1193", text="4/5", event_time=utc(978298413)),
        ],
    )
    titles = {r["item_id"]: r["title"] for r in items_of(spark, settings).collect()}
    assert titles["5"] == "Père Noël est une ordure, Le (1982)" and len(titles) == 5


def test_amazon_2014_reviews_with_python_literal_metadata(spark, tmp_path):
    settings = preset_settings("amazon", D.write_amazon_2014(tmp_path / "beauty"))
    source, events = events_of(spark, settings)
    assert source.user_field == "reviewerID"
    assertDataFrameEqual(
        events.select("status", "reason", "item_id", "text", "event_time"),
        [
            Row(
                status="ok",
                reason=None,
                item_id="B001",
                text="5/5. Lovely. Smells great and lasts.",
                event_time=utc(1252800000),
            ),
            Row(status="ok", reason=None, item_id="B002", text="2/5. Meh", event_time=utc(1252886400)),
            Row(status="ok", reason=None, item_id="B001", text="3/5. Too strong.", event_time=utc(1252972800)),
            # the cut-off last line is accounted for, not dropped
            Row(status="quarantined", reason="malformed_record", item_id=None, text=None, event_time=None),
        ],
    )
    assert {r[0] for r in events.select("event_type").collect()} == {"rate"}
    assertDataFrameEqual(
        items_of(spark, settings).select("item_id", "title", "category", "brand", "price", "description"),
        [
            Row(
                item_id="B001",
                title="Rose Water Toner",
                category="Toners",
                brand="Petal",
                price=12.5,
                description="Beauty > Skin Care > Face > Toners",
            ),
            Row(
                item_id="B002",
                title="Men's Shave Gel",
                category="Shave",
                brand=None,
                price=None,
                description="Beauty > Shave. A gel.",
            ),
        ],
    )


def test_amazon_2018_gzipped_with_dollar_prices(spark, tmp_path):
    settings = preset_settings("amazon", D.write_amazon_2018(tmp_path / "beauty18"))
    _, events = events_of(spark, settings)
    assertDataFrameEqual(
        events.select("status", "item_id", "text"),
        [
            Row(status="ok", item_id="C1", text="4/5. Four Stars. Nice."),
            Row(status="ok", item_id="C2", text="1/5. No. Broke."),
        ],
    )
    assertDataFrameEqual(
        items_of(spark, settings).select("item_id", "category", "brand", "price", "description"),
        [
            Row(
                item_id="C1",
                category="Shampoos",
                brand="Oaty",
                price=1012.99,
                description="Beauty & Personal Care > Hair Care > Shampoos. Mild. For all.",
            ),
            Row(item_id="C2", category=None, brand=None, price=None, description=None),
        ],
    )  # a price range: no price


def test_sequence_file_keeps_order_across_lines_with_synthetic_times(spark, tmp_path):
    root = D.write_sequences(tmp_path / "sasrec")
    # source.path is the sequence file; the item text file is named relative to its folder
    settings = preset_settings("sequences", root / "Beauty.txt", "dataset.items_file=Beauty.text")
    _, events = events_of(spark, settings)
    assert events.where("status != 'ok'").count() == 0  # the blank line is no record
    # a user's n-th event is at SEQUENCE_EPOCH + n minutes
    minutes = ((F.col("event_time").cast("long") - datasets.SEQUENCE_EPOCH) / 60).cast("int")
    by_user: dict[str, list[tuple[int, str]]] = {}
    for r in events.select("user_key", "item_id", minutes.alias("n")).collect():
        by_user.setdefault(r["user_key"], []).append((r["n"], r["item_id"]))
    assert sorted(sorted(s) for s in by_user.values()) == [
        # user 1's second line continues its sequence; the repeated item 10 is kept
        [(0, "10"), (1, "11"), (2, "12"), (3, "10"), (4, "13")],
        [(0, "11"), (1, "12")],
        [(0, "12"), (1, "10"), (2, "11"), (3, "13")],
    ]
    assertDataFrameEqual(
        items_of(spark, settings).select("item_id", "title"),
        [
            Row(item_id="10", title="Rose water toner"),
            Row(item_id="11", title="Oat shampoo"),
            Row(item_id="12", title="Shave gel"),
        ],
    )


def test_retailrocket_event_names_milliseconds_and_latest_category(spark, tmp_path):
    settings = preset_settings("retailrocket", D.write_retailrocket(tmp_path / "rr", visitors=4))
    source, events = events_of(spark, settings)
    assert source.user_field == "visitorid"
    counts = {
        r["event_type"]: r["count"] for r in events.where("status = 'ok'").groupBy("event_type").count().collect()
    }
    # visitors 0 and 2 view three times (0 also carts and buys), 1 and 3 twice, plus the as-of marker
    assert counts == {"view": 11, "add_to_cart": 1, "purchase": 1}
    first = events.where("event_type = 'add_to_cart'").select("event_time").first()[0]
    assert first == dt.datetime(2015, 6, 14, 12, 1)
    categories = {r["item_id"]: r["category"] for r in items_of(spark, settings).collect()}
    assert categories["100"] == "1017" and categories["101"] == "809" and categories["102"] is None


def test_ingest_reads_a_preset_and_textualize_renders_ratings(spark, tmp_path, capsys):
    root = D.write_ml100k(tmp_path / "ml-100k")
    warehouse = f"storage.warehouse={tmp_path / 'wh'}"
    assert (
        main(
            [
                "ingest",
                "--conf",
                LOCAL,
                "--conf",
                str(CONF_DIR / "datasets" / "movielens-100k.yaml"),
                *[x for o in SPARK_OVERRIDES for x in ("--set", o)],
                "--set",
                f"source.path={root}",
                "--set",
                warehouse,
            ]
        )
        == 0
    )
    assert "ingest: 19 rows in -> 19 events, 0 quarantined, 0 duplicates; 6 items" in capsys.readouterr().out
    settings = preset_settings("movielens-100k", root, warehouse)
    tables = Tables(spark, settings.storage)
    events, items = tables.read("events"), tables.read("items")
    assert {r[0] for r in events.select("event_type").distinct().collect()} == {"rate"}
    texts = (
        build_user_texts(events, items, settings.textualize, settings.ingest.event_types, dt.date(1997, 12, 31))
        .select("text")
        .collect()
    )
    assert len(texts) == 5
    # user 1 rated Toy Story first: (1 + 1) % 5 + 1 = 3; the preset's header label counts ratings
    assert any("rated 'Toy Story (1995)' 3/5" in r[0] for r in texts)
    assert all(r[0].startswith(("3 events", "4 events")) and " ratings " in r[0] for r in texts)


def test_missing_file_and_wrong_format_fail_before_any_job_naming_file_and_preset(spark, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError) as missing:
        datasets.read_events(spark, preset_settings("movielens-100k", empty))
    assert str(missing.value) == f"movielens-100k: {empty}/u.data not found (MovieLens 100K ratings)"
    with pytest.raises(SourceError, match=r"^movielens: neither .*/empty/movies.csv nor movies.dat found"):
        datasets.read_items(spark, preset_settings("movielens", empty))
    with pytest.raises(SourceError, match=r"^sequences: expected one sequence file \(\*.txt\) in .*, found none"):
        datasets.read_events(spark, preset_settings("sequences", empty))
    csv = D.write_movielens_csv(tmp_path / "ml")
    with pytest.raises(SourceError, match=r"^retailrocket: .*/ml/ratings.csv is not a RetailRocket events.csv file"):
        datasets.read_events(spark, preset_settings("retailrocket", csv, "dataset.events_file=ratings.csv"))


def test_cli_errors_are_one_line(spark, tmp_path, capsys):
    wrong = D.write_ml100k(tmp_path / "wrong")
    (wrong / "u.data").write_text("1,1,5,881250949\n")
    common = [
        "--protocol",
        "loo-full",
        *[x for o in SPARK_OVERRIDES for x in ("--set", o)],
        "--set",
        f"storage.warehouse={tmp_path / 'wh'}",
    ]
    code = main(["evaluate", "--dataset", "movielens-100k", "--path", str(wrong), *common])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("userlens: ")]
    assert code == 1 and err == [
        f"userlens: error: movielens-100k: {wrong}/u.data is not a MovieLens 100K u.data file (tab-separated "
        f"user id, item id, rating, timestamp); its first line is '1,1,5,881250949'"
    ]
    code = main(["evaluate", "--dataset", "movielens-1b", "--path", str(wrong), *common])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("userlens: ")]
    assert code == 2 and err == [
        "userlens: error: --dataset: unknown dataset 'movielens-1b'; presets: amazon, "
        "movielens, movielens-100k, retailrocket, sequences (or a YAML file)"
    ]


def test_presets_load_and_name_their_adapter():
    for path in sorted((CONF_DIR / "datasets").glob("*.yaml")):
        settings = load_settings([LOCAL, path])
        assert settings.dataset.adapter == path.stem
        assert settings.source.timestamp_format == "epoch_s"
        assert set(settings.evaluate.interactions) <= set(settings.ingest.item_event_types)
    assert sorted(datasets.ADAPTERS) == sorted(p.stem for p in (CONF_DIR / "datasets").glob("*.yaml"))
