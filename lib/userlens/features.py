"""A user's features and labels at a point in time (pure Spark transforms; no I/O, no actions but the
count helpers that say so).

For an as-of date D and horizon H the cutoff is C = D - H. Features use events with
``event_date <= C``; labels use only the H days after it, ``C < event_date <= D``:

* ``purchase``: any purchase in (C, D];
* ``churn``: no event at all in (C, D];
* ``next_category``: category of the first purchase in (C, D], else of the first view
  (no label for churned users).

Users go to train / valid / test by a salted hash of user_key, so a user stays in its split
from run to run. The train, score and profile stages and ``userlens evaluate`` share these.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from userlens.config import TrainSettings
from userlens.errors import UserlensError, require_columns
from userlens.models.tasks import BINARY_TASKS

WINDOWS = (7, 30, 90)


OTHER = "other"


SPLITS = ("train", "valid", "test")


def cutoff(as_of: dt.date, horizon_days: int) -> dt.date:
    return as_of - dt.timedelta(days=horizon_days)


def feature_names(event_types: list[str]) -> list[str]:
    names = ["recency_days", "tenure_days", "n_events", "active_days"]
    names += [f"active_days_{w}d" for w in WINDOWS] + [f"spend_{w}d" for w in WINDOWS]
    names += [f"n_{t}_{w}d" for t in event_types for w in WINDOWS]
    return names


def numeric_features(events: DataFrame, cut: dt.date, event_types: list[str]) -> DataFrame:
    """(user_key, features array<double>) from events up to ``cut`` only (RFM and counts by window)."""
    require_columns(events, ("user_key", "event_date", "event_type", "price", "quantity"), "train features")
    c = F.lit(cut)
    known = events.where(F.col("event_date") <= c)

    def recent(w: int) -> Column:
        return F.col("event_date") > F.date_sub(c, w)

    spend = F.when(
        F.col("event_type") == "purchase",
        F.coalesce(F.col("price"), F.lit(0.0)) * F.coalesce(F.col("quantity"), F.lit(1)),
    )
    aggs = [
        F.datediff(c, F.max("event_date")),
        F.datediff(c, F.min("event_date")),
        F.count(F.lit(1)),
        F.count_distinct("event_date"),
        *[F.count_distinct(F.when(recent(w), F.col("event_date"))) for w in WINDOWS],
        *[F.sum(F.when(recent(w), spend)) for w in WINDOWS],
        *[F.sum(F.when(recent(w) & (F.col("event_type") == t), 1)) for t in event_types for w in WINDOWS],
    ]
    agg = known.groupBy("user_key").agg(*[a.alias(f"f{i}") for i, a in enumerate(aggs)])
    return agg.select(
        "user_key",
        F.array(*[F.coalesce(F.col(f"f{i}").cast("double"), F.lit(0.0)) for i in range(len(aggs))]).alias("features"),
    )


def labels(events: DataFrame, cut: dt.date, as_of: dt.date) -> DataFrame:
    """(user_key, purchase, next_category_name) for users active in (cut, as_of]; absent users churned."""
    window = events.where((F.col("event_date") > F.lit(cut)) & (F.col("event_date") <= F.lit(as_of)))

    def first_category(event_type: str) -> Column:
        hit = (F.col("event_type") == event_type) & F.col("category").isNotNull()
        return F.min(F.when(hit, F.struct("event_time", "event_id", "category")))["category"]

    return window.groupBy("user_key").agg(
        F.max((F.col("event_type") == "purchase").cast("int")).alias("purchase"),
        F.coalesce(first_category("purchase"), first_category("view")).alias("next_category_name"),
    )


def item_history(events: DataFrame, cut: dt.date, as_of: dt.date, history: int) -> DataFrame:
    """The recommendation head's inputs and labels, one row per user with an item event:

    * ``hist_items`` / ``hist_ages``: the newest ``history`` distinct items of any event up to ``cut``,
      newest first, and the days between their last event and ``cut``;
    * ``bought``: items purchased up to ``cut`` (never recommended again);
    * ``next_items``: items purchased in (cut, as_of] that were not bought before (the positives).
    """
    c = F.lit(cut)
    with_item = events.where(F.col("item_id").isNotNull())
    purchase = (F.col("event_type") == "purchase").cast("int")
    past = (
        with_item.where(F.col("event_date") <= c)
        .groupBy("user_key", "item_id")
        .agg(
            F.max("event_time").alias("last"),
            F.max("event_date").alias("last_date"),
            F.max(purchase).alias("was_bought"),
        )
    )
    newest = F.slice(F.sort_array(F.collect_list(F.struct("last", "item_id", "last_date")), asc=False), 1, history)
    hist = past.groupBy("user_key").agg(
        newest.alias("_h"),
        F.array_sort(F.collect_list(F.when(F.col("was_bought") == 1, F.col("item_id")))).alias("bought"),
    )
    hist = hist.select(
        "user_key",
        F.transform("_h", lambda x: x["item_id"]).alias("hist_items"),
        F.transform("_h", lambda x: F.datediff(c, x["last_date"])).alias("hist_ages"),
        "bought",
    )
    future = (
        with_item.where(
            (F.col("event_date") > c) & (F.col("event_date") <= F.lit(as_of)) & (F.col("event_type") == "purchase")
        )
        .groupBy("user_key")
        .agg(F.array_sort(F.collect_set("item_id")).alias("_next"))
    )
    empty = F.array().cast("array<string>")
    joined = hist.join(future, "user_key", "full")
    return joined.select(
        "user_key",
        F.coalesce("hist_items", empty).alias("hist_items"),
        F.coalesce("hist_ages", F.array().cast("array<int>")).alias("hist_ages"),
        F.coalesce("bought", empty).alias("bought"),
        F.array_except(F.coalesce("_next", empty), F.coalesce("bought", empty)).alias("next_items"),
    )


def split_of(user_key: Column, split: Any) -> Column:
    """'train' | 'valid' | 'test' from a salted 64-bit hash of user_key (stable across runs)."""
    u = F.pmod(F.xxhash64(F.lit(split.salt), user_key), F.lit(1_000_000)) / F.lit(1_000_000.0)
    return F.when(u < split.train, "train").when(u < split.train + split.valid, "valid").otherwise("test")


def labelled_users(
    events: DataFrame, cut: dt.date, as_of: dt.date, event_types: list[str], train: TrainSettings
) -> DataFrame:
    """user_key, split, features, purchase, churn, next_category_name: one row per user known at ``cut``."""
    feats = numeric_features(events, cut, event_types)
    future = labels(events, cut, as_of)
    joined = feats.join(future, "user_key", "left")
    return joined.select(
        "user_key",
        split_of(F.col("user_key"), train.split).alias("split"),
        "features",
        F.coalesce("purchase", F.lit(0)).alias("purchase"),
        F.when(F.col("purchase").isNull(), 1).otherwise(0).alias("churn"),
        "next_category_name",
    )


def split_counts(frame: DataFrame) -> dict[str, dict[str, int]]:
    rows = (
        frame.groupBy("split")
        .agg(
            F.count(F.lit(1)).alias("users"),
            F.sum("purchase").alias("purchase"),
            F.sum("churn").alias("churn"),
            F.count("next_category_name").alias("next_category"),
        )
        .collect()
    )
    return {
        r["split"]: {
            "users": r["users"],
            "purchase": int(r["purchase"] or 0),
            "churn": int(r["churn"] or 0),
            "next_category": r["next_category"],
        }
        for r in rows
    }


def check_counts(counts: dict[str, dict[str, int]], train: TrainSettings, classes: list[str]) -> None:
    """Clear errors before any training: too few users, a single-class label, an empty split."""
    for split in SPLITS:
        if counts.get(split, {}).get("users", 0) == 0:
            raise UserlensError(f"train: the {split} split is empty ({describe_counts(counts)}); more users are needed")
    n = counts["train"]["users"]
    if n < train.min_users:
        raise UserlensError(
            f"train: only {n} labelled users in the train split, below train.min_users="
            f"{train.min_users} ({describe_counts(counts)})"
        )
    for task in train.tasks:
        if task in BINARY_TASKS:
            for split, need in (("train", train.min_class_users), ("test", 1)):
                pos = counts[split][task]
                neg = counts[split]["users"] - pos
                if min(pos, neg) < need:
                    raise UserlensError(
                        f"train: task {task} has {pos} positive and {neg} negative users in the {split} split; "
                        f"need at least {need} of each (train.min_class_users)"
                    )
        elif len(classes) < 2:
            raise UserlensError(
                f"train: task next_category has {len(classes)} class(es) in the train split "
                f"({counts['train']['next_category']} labelled users); need at least 2"
            )


def describe_counts(counts: dict[str, dict[str, int]]) -> str:
    return ", ".join(f"{s} {counts.get(s, {}).get('users', 0)}" for s in SPLITS)


def category_classes(frame: DataFrame, max_categories: int) -> list[str]:
    """The most frequent next_category labels of the train split; the rest become 'other'."""
    rows = (
        frame.where((F.col("split") == "train") & F.col("next_category_name").isNotNull())
        .groupBy("next_category_name")
        .count()
        .orderBy(F.desc("count"), "next_category_name")
        .collect()
    )
    names = [r[0] for r in rows]
    if len(names) <= max_categories:
        return names
    return names[: max_categories - 1] + [OTHER]


def class_index(name: Column, classes: list[str]) -> Column:
    if not classes:
        return F.lit(-1)
    mapping = F.create_map(*[x for i, c in enumerate(classes) if c != OTHER for x in (F.lit(c), F.lit(i))])
    fallback = F.lit(classes.index(OTHER)) if OTHER in classes else F.lit(-1)
    return F.when(name.isNull(), -1).otherwise(F.coalesce(F.element_at(mapping, name), fallback))


def normalization(train_rows: DataFrame, n: int) -> tuple[list[float], list[float]]:
    """Mean and standard deviation of log1p(feature) over the train split (std 0 -> 1)."""
    x = [F.log1p(F.greatest(F.col("features")[i], F.lit(0.0))) for i in range(n)]
    row = train_rows.agg(*[F.avg(v) for v in x], *[F.stddev_pop(v) for v in x]).first()
    assert row is not None  # an aggregate without groupBy has one row
    mean = [float(row[i] or 0.0) for i in range(n)]
    std = [float(row[n + i] or 0.0) or 1.0 for i in range(n)]
    return mean, std


def latest_per_user(df: DataFrame, order: str) -> DataFrame:
    """Each user's newest row by ``order``."""
    newest = Window.partitionBy("user_key").orderBy(F.col(order).desc())
    return df.withColumn("_rn", F.row_number().over(newest)).where("_rn = 1").drop("_rn")
