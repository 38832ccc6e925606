"""Per-user explanations (occlusion over days) on real Spark, Delta and MiniLM, with a model whose purchase
head is known: it reads only the count of cart adds in the last 7 days. One user's cart add is planted on
one day; the explanation must put that day first for purchase, with the weight the model implies, and
give every other day (and every other user's days) no weight."""

from __future__ import annotations

import datetime as dt
import math

import pytest
import torch
from pyspark.sql import functions as F

from conftest import make_settings
from userlens.artifacts import ModelStore
from userlens.embedding import EncoderSpec
from userlens.features import feature_names
from userlens.models.contracts import FeatureSpec, ModelConfig
from userlens.models.predictor import BehaviourModel, write_artifact
from userlens.runs import StageRun
from userlens.stages import BY_NAME
from userlens.stages.explain import day_lines, run_explain
from userlens.tables import Tables, table_schema

AS_OF = dt.date(2026, 10, 20)
PLANTED = AS_OF - dt.timedelta(days=2)
USERS = ("planted", "plain-a", "plain-b")
VERSION = "explain-test-model"
CART_WEIGHT, BIAS = 3.0, -1.0


def write_events(spark, tables: Tables) -> None:
    rows = []
    for user in USERS:
        for back in range(5):
            day = AS_OF - dt.timedelta(days=back)
            for n in range(2):
                rows.append((user, f"{user}-{day}-{n}", day, "view"))
            if user == "planted" and day == PLANTED:
                rows.append((user, f"{user}-{day}-cart", day, "add_to_cart"))
    schema = table_schema("events")
    given = spark.createDataFrame(rows, "user_key string, event_id string, event_date date, event_type string")
    extra = {
        "event_time": F.col("event_date").cast("timestamp") + F.expr("INTERVAL 9 HOURS"),
        "item_id": F.lit("i1"),
        "category": F.lit("books"),
        "price": F.lit(12.5),
        "quantity": F.lit(1),
    }
    tables.append(
        "events",
        given.select(
            *[
                (F.col(f.name) if f.name in given.columns else extra.get(f.name, F.lit(None)))
                .cast(f.dataType)
                .alias(f.name)
                for f in schema.fields
            ]
        ),
    )
    items = spark.createDataFrame(
        [("i1", "Quiet Garden Novel", "books", "Inkwell", 12.5, None, None)], table_schema("items")
    )
    tables.append("items", items)


def write_model(settings) -> int:
    """A model whose purchase probability is sigmoid(3 log1p(cart adds in 7 days) - 1) and whose churn head
    is constant; published as LATEST. Returns the index of the cart feature."""
    names = feature_names(settings.ingest.event_types)
    cart = names.index("n_add_to_cart_7d")
    dim = 384
    config = ModelConfig(
        tasks=["purchase", "churn"],
        classes=["books"],
        hidden=[8],
        dropout=0.0,
        input_dim=dim + len(names),
        numeric_dim=len(names),
    )
    features = FeatureSpec(
        names, [0.0] * len(names), [1.0] * len(names), dim, EncoderSpec.from_settings(settings.embed).model_id
    )
    model = BehaviourModel(config)
    weight = [0.0] * len(names)
    weight[cart] = CART_WEIGHT
    with torch.no_grad():
        model.set_linear_heads(
            {"purchase": {"weight": [weight], "bias": [BIAS]}, "churn": {"weight": [[0.0] * len(names)], "bias": [0.0]}}
        )
    store = ModelStore.of(settings)
    write_artifact(store.path(VERSION), config, features, model.state_dict(), {})
    store.publish(VERSION)
    return cart


def test_the_planted_cart_day_explains_the_purchase_score_and_nothing_else_does(spark, tmp_path):
    settings = make_settings(tmp_path, "explain.users=all")
    tables = Tables(spark, settings.storage)
    write_events(spark, tables)
    write_model(settings)
    scores = [(u, AS_OF, VERSION, "h", 0.5, 0.5, None, None, dt.datetime(2026, 10, 21), None, None) for u in USERS]
    tables.merge("user_scores", spark.createDataFrame(scores, table_schema("user_scores")))

    result = run_explain(spark, settings, StageRun("explain", "r1"))
    assert result.users == 3 and result.variants == 3 * 6  # each user whole and without each of its 5 days
    got = {r["user_key"]: r["explanations"] for r in tables.read("user_scores").collect()}
    planted = [e for e in got["planted"] if e["task"] == "purchase"]
    assert len(planted) == settings.explain.top
    first = planted[0]
    expected = 1 / (1 + math.exp(-(CART_WEIGHT * math.log1p(1) + BIAS))) - 1 / (1 + math.exp(-BIAS))
    assert first["day"] == PLANTED and first["weight"] == pytest.approx(expected, abs=1e-4)
    assert first["text"].startswith(PLANTED.isoformat()) and "cart" in first["text"]
    assert all(abs(e["weight"]) < 1e-6 for e in planted[1:])
    for user in ("plain-a", "plain-b"):
        assert len(got[user]) == 2 * settings.explain.top
        assert all(abs(e["weight"]) < 1e-6 for e in got[user])
    assert all(abs(e["weight"]) < 1e-6 for e in got["planted"] if e["task"] == "churn")
    assert "explained" in BY_NAME["explain"].summary(result)

    # a second run for the same date: everyone is explained already, nothing is written
    version = tables.version("user_scores")
    again = run_explain(spark, settings, StageRun("explain", "r2"))
    assert again.users == 0 and tables.version("user_scores") == version


def test_day_lines_are_found_by_their_leading_date():
    text = "header: 3 events\n2026-10-18: viewed 'A'; added 'A' to the cart\n  2026-10-17: viewed 'B'\nno date"
    assert day_lines(text) == {
        "2026-10-18": "2026-10-18: viewed 'A'; added 'A' to the cart",
        "2026-10-17": "2026-10-17: viewed 'B'",
    }
