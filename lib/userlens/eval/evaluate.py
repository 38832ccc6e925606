"""Evaluate: a public dataset under a published protocol, userlens beside baselines, one markdown table.

Protocols (``--protocol``; docs/datasets.md has the details and the commands):

* ``loo-full``: chronological leave-one-out. Per user with at least 3 interactions the last is the
  test item and the second-to-last the validation item. Validation: every method is fitted on the
  rest; test: refitted with the validation item added. Full ranking over every item of the
  dataset with the user's fitted items removed; HR@k (= Recall@k, one relevant item), NDCG@k and
  MRR (the exact rank in the full ranking).
* ``stratified-75``: one row per (user, item); per user a seeded 75/25 random split; top-k with
  the user's training items removed, every held-out item relevant; MAP@k, nDCG@k, Precision@k,
  Recall@k (MAP@k divides by min(relevant, k), as Spark MLlib does).
* ``cold-items``: a seeded 20% of the items lose every interaction from training (half of them
  validate, half test); the users who interacted with them rank those items only. What no id-only
  method can serve: category popularity and zero-shot text cosine are its references, and
  ``userlens`` fuses them with the sequential encoder that knows the cold items by their text
  (``eval.recommenders.cold_methods``, weights on validation).
* ``next-window``: cutoff C = as-of date - H days; users with an event up to C; labels: any event
  (activity), any purchase and any rating of at least 4 in (C, as-of] (the last two where the data has
  them); users split 70/30 by a seeded hash; ROC AUC on the 30.

Every method runs in the same process on the same split. Ranking protocols: popularity and the
tuned baselines (Spark MLlib ALS over ``evaluate.als_*``, EASE over ``evaluate.ease_lambdas``,
SAR-style item-kNN over ``evaluate.knn_half_lives``), each setting chosen on a validation split and
the winner refitted and scored on test once; then userlens' components (``eval.recommenders``: the
sequential encoder of ``models.sequential`` with and without item text, EASE, ALS) and their fusion,
whose weights are fitted on validation (``eval.ranking.fuse``): ``userlens`` and ``userlens without
text``. Next-window: recency, frequency, MLlib logistic regression on the train stage's numeric
features and userlens (the user text's embedding beside the same features), each regression's regParam
chosen on a held-out fifth of the train users; a userlens row that is not above the RFM regression there
scores with it, as the train stage's fallback ships the baseline.

The data path is the pipeline's: the dataset adapter, then ingest's ``classify_events`` /
``classify_items`` (validation, quarantine counts, pseudonyms, PII scrubbing). Nothing is written
to the warehouse (``userlens evaluate --record`` adds the ``pipeline_runs`` row). Splits and
features are Spark transforms; the split interactions (user, item, time) are then collected to the
driver once, where the models rank items and ``models.metrics`` scores them: this is a benchmark for
datasets that fit one machine (the userlens model's interface takes a pandas frame), not a pipeline
stage.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from userlens.config import AlsSettings, Settings
from userlens.embedding import item_texts
from userlens.errors import UserlensError
from userlens.eval import spark_baselines
from userlens.eval.baselines import FactorScores, ItemKNN, Popularity
from userlens.eval.ranking import Fold, Method, Tuned, make_folds, tune
from userlens.models import metrics as M
from userlens.models.ease import EASE, CatalogueTooLarge
from userlens.runs import RunRecord, StageRun
from userlens.sources.raw import DUPLICATE, OK, QUARANTINED, classify_events, classify_items

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import SparkSession

    from userlens.privacy import PseudonymKey

log = logging.getLogger(__name__)

PROTOCOLS = ("loo-full", "stratified-75", "cold-items", "next-window")
DEFAULT_KS = {"loo-full": (5, 10, 20), "stratified-75": (10,), "cold-items": (10, 20)}
STRATIFIED_TRAIN = 0.75
COLD_ITEMS = 0.2  # cold-items: the share of items whose interactions are all held out (half valid, half test)
NEXT_WINDOW_TEST = 0.3


@dataclass(frozen=True)
class EvaluateResult:
    dataset: str
    protocol: str
    table: str  # the markdown the command prints
    metrics: dict[str, dict[str, Any] | str]  # a method's metrics, or why it has none
    counts: dict[str, Any] = field(default_factory=dict)
    rows_read: int | None = None  # the dataset's rows, and those that became events
    events: int | None = None

    def run_record(self) -> RunRecord:
        return RunRecord(
            self.rows_read,
            self.events,
            {"dataset": self.dataset, "protocol": self.protocol, "counts": self.counts, "metrics": self.metrics},
        )


# --------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------
# the score a rating event's text starts with ("4/5. Great fit": 4.0), as the dataset adapters write it
SCORE_PATTERN = r"^\s*(\d+(?:\.\d+)?)/5(?:\D|$)"


def interactions(events: DataFrame, types: Sequence[str]) -> DataFrame:
    """(user, item, ts, event_id, score): item events of ``types``, ts in epoch seconds, score the rating
    the event's text starts with (null for an event without one)."""
    score = F.regexp_extract(F.coalesce(F.col("text"), F.lit("")), SCORE_PATTERN, 1)
    return events.where(F.col("item_id").isNotNull() & F.col("event_type").isin(*types)).select(
        F.col("user_key").alias("user"),
        F.col("item_id").alias("item"),
        F.col("event_time").cast("long").alias("ts"),
        "event_id",
        F.when(score != "", score.cast("double")).alias("score"),
    )


def leave_one_out(inter: DataFrame) -> DataFrame:
    """``split``: a user's newest interaction 'test', the one before 'valid', the rest 'train';
    users with fewer than 3 interactions are all 'train'. Ties in time go by event_id."""
    newest_first = Window.partitionBy("user").orderBy(F.desc("ts"), F.desc("event_id"))
    n = F.count(F.lit(1)).over(Window.partitionBy("user"))
    rank = F.row_number().over(newest_first)
    split = F.when(n < 3, "train").when(rank == 1, "test").when(rank == 2, "valid").otherwise("train")
    return inter.withColumn("split", split)


def _pairs(inter: DataFrame) -> DataFrame:
    """One row per (user, item): its first time and event, and (where there are scores) its highest score."""
    score = [F.max("score").alias("score")] if "score" in inter.columns else []
    return inter.groupBy("user", "item").agg(F.min("ts").alias("ts"), F.min("event_id").alias("event_id"), *score)


def stratified_split(inter: DataFrame, train_fraction: float, seed: int) -> DataFrame:
    """One row per (user, item) at its first time; per user, round(n * train_fraction) rows in a
    seeded hash order are 'train', the rest 'test' (the same split on any partitioning)."""
    pairs = _pairs(inter)
    shuffled = Window.partitionBy("user").orderBy(F.xxhash64(F.lit(seed), "user", "item"), "item")
    n = F.count(F.lit(1)).over(Window.partitionBy("user"))
    rank = F.row_number().over(shuffled)
    return pairs.withColumn("split", F.when(rank <= F.round(n * train_fraction), "train").otherwise("test"))


def with_valid(split: DataFrame, train_fraction: float, seed: int) -> DataFrame:
    """The stratified split with a validation part carved out of each user's 'train' rows the same way
    (round(n * train_fraction) of them stay 'train', the rest become 'valid'; another seed)."""
    train = F.col("split") == "train"
    order = Window.partitionBy("user", "split").orderBy(F.xxhash64(F.lit(seed + 1), "user", "item"), "item")
    n = F.count(F.lit(1)).over(Window.partitionBy("user", "split"))
    rank = F.row_number().over(order)
    return split.withColumn(
        "split", F.when(train & (rank > F.round(n * train_fraction)), "valid").otherwise(F.col("split"))
    )


def cold_items_split(inter: DataFrame, fraction: float, seed: int) -> DataFrame:
    """One row per (user, item) at its first time; ``split`` 'valid' or 'test' for the interactions with a
    cold item (a seeded hash ``fraction`` of the items: half valid-cold, half test-cold), 'train' for the rest."""
    pairs = _pairs(inter)
    h = F.pmod(F.xxhash64(F.lit(seed + 2), "item"), F.lit(1_000_000)) / F.lit(1_000_000.0)
    split = F.when(h < fraction / 2, "valid").when(h < fraction, "test").otherwise("train")
    return pairs.withColumn("split", split)


def k_core(inter: DataFrame, k: int, max_rounds: int = 50) -> DataFrame:
    """The interactions whose user and item both have at least ``k`` of them, iterated until stable
    (a k-core, as papers preprocess: ``evaluate.k_core``)."""
    from pyspark import StorageLevel as Level

    current = inter.persist(Level.MEMORY_AND_DISK)
    n = current.count()
    for _ in range(max_rounds):
        users = current.groupBy("user").count().where(F.col("count") >= k).select("user")
        items = current.groupBy("item").count().where(F.col("count") >= k).select("item")
        kept = current.join(users, "user").join(items, "item").persist(Level.MEMORY_AND_DISK)
        m = kept.count()
        current.unpersist()
        current = kept
        if m == n:
            break
        n = m
    return current


# next-window's targets: column -> (table heading, how the window line counts its positives)
NEXT_WINDOW_TARGETS = {
    "active": ("AUC activity", "active"),
    "purchase": ("AUC purchase", "purchased"),
    "liked": ("AUC rated >= 4", "rated >= 4"),
}
LIKED = 4.0  # next-window's "rated >= 4 in the window" target: a rating event's score of at least this


def next_window_users(events: DataFrame, cut: dt.date, as_of: dt.date, event_types: list[str], seed: int) -> DataFrame:
    """(user_key, split, features, active, purchase, liked) for users with an event up to ``cut``; labels
    from (cut, as_of]: any event, any purchase, any rating of at least ``LIKED`` (the score a rating event's
    text starts with, "4/5"); 'test' for a seeded-hash NEXT_WINDOW_TEST share of users."""
    from userlens.features import labels, numeric_features

    future = labels(events, cut, as_of)
    score = F.regexp_extract(F.coalesce(F.col("text"), F.lit("")), SCORE_PATTERN, 1)
    liked = (
        events.where((F.col("event_date") > F.lit(cut)) & (F.col("event_date") <= F.lit(as_of)))
        .where((score != "") & (score.cast("double") >= LIKED))
        .select("user_key")
        .distinct()
        .withColumn("liked", F.lit(1))
    )
    u = F.pmod(F.xxhash64(F.lit(seed), F.col("user_key")), F.lit(1_000_000)) / F.lit(1_000_000.0)
    return (
        numeric_features(events, cut, event_types)
        .join(future, "user_key", "left")
        .join(liked, "user_key", "left")
        .select(
            "user_key",
            F.when(u < NEXT_WINDOW_TEST, "test").otherwise("train").alias("split"),
            "features",
            F.col("purchase").isNotNull().cast("int").alias("active"),
            F.coalesce("purchase", F.lit(0)).alias("purchase"),
            F.coalesce("liked", F.lit(0)).alias("liked"),
        )
    )


# --------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Data:
    events: DataFrame
    items: DataFrame
    counts: dict[str, Any]


def load_dataset(spark: "SparkSession", settings: Settings, key: "PseudonymKey") -> tuple[_Data, DataFrame]:
    """Events and items as ingest would write them, with ingest's accounting; (data, persisted frame)."""
    from userlens.sources.datasets import read_events, read_items

    classified = classify_events(read_events(spark, settings).frame, settings, key)
    classified = classified.persist(StorageLevel.MEMORY_AND_DISK)
    rows = classified.groupBy("status", "reason").agg(F.count(F.lit(1)).alias("n")).collect()
    counts: dict[str, Any] = {
        "rows_in": sum(r["n"] for r in rows),
        "events": sum(r["n"] for r in rows if r["status"] == OK),
        "quarantined": sum(r["n"] for r in rows if r["status"] == QUARANTINED),
        "duplicates": sum(r["n"] for r in rows if r["status"] == DUPLICATE),
        "reasons": {r["reason"]: r["n"] for r in rows if r["status"] == QUARANTINED},
    }
    events = classified.where(F.col("status") == OK).drop("raw", "source_date", "reason", "status")
    items = (
        classify_items(read_items(spark, settings).frame)
        .where(F.col("status") == OK)
        .select("item_id", "title", "category", "brand", "price", "description")
    )
    return _Data(events, items, counts), classified


def run_evaluate(
    spark: "SparkSession",
    settings: Settings,
    key: "PseudonymKey",
    run: StageRun,
    dataset: str,
    protocol: str,
    ks: Sequence[int] | None = None,
    as_of: dt.date | None = None,
) -> EvaluateResult:
    """Read the dataset, split it by ``protocol``, run every method, return the markdown table."""
    if protocol not in PROTOCOLS:
        raise UserlensError(f"unknown protocol {protocol!r}; protocols: {', '.join(PROTOCOLS)}")
    data, classified = load_dataset(spark, settings, key)
    try:
        if data.counts["events"] == 0:
            raise UserlensError(
                f"{dataset}: no valid events in {settings.source.path} "
                f"({data.counts['rows_in']} rows read, {data.counts['quarantined']} quarantined: "
                f"{_reasons(data.counts)})"
            )
        if protocol == "next-window":
            result = _next_window(spark, settings, data, dataset, as_of)
        else:
            result = _ranking(spark, settings, data, dataset, protocol, tuple(ks or DEFAULT_KS[protocol]))
    finally:
        classified.unpersist()
    return replace(result, rows_read=data.counts["rows_in"], events=data.counts["events"])


def _reasons(counts: dict[str, Any]) -> str:
    return ", ".join(f"{r} {n}" for r, n in sorted(counts["reasons"].items())) or "none"


def _data_line(counts: dict[str, Any]) -> str:
    reasons = f" ({_reasons(counts)})" if counts["quarantined"] else ""
    return (
        f"{counts['rows_in']:,} rows read: {counts['events']:,} events, {counts['quarantined']:,} quarantined"
        f"{reasons}, {counts['duplicates']:,} duplicates"
    )


# --------------------------------------------------------------------------
# ranking protocols
# --------------------------------------------------------------------------
def _strength(strength: str) -> dict[str, str]:
    """The grid entry of an interaction strength ("count", the default, is left out of the setting shown)."""
    return {} if strength == "count" else {"strength": strength}


def pair_strength(fold: Fold, strength: str) -> np.ndarray | None:
    """Per fit row, what the row adds to its (user, item) cell: None for "count" (a count, or 1 in a
    binary matrix); for "score" the rating's score (1.0 for a row without one)."""
    if strength == "count":
        return None
    if strength != "score":
        raise UserlensError(f"evaluate.strengths: unknown strength {strength!r} (count, score)")
    return fold.fit["score"].fillna(1.0).to_numpy(np.float64)


def baseline_methods(spark: "SparkSession", settings: Settings, scored: bool = False) -> list[Method]:
    """Popularity and the collaborative baselines, each with the grid it is tuned over on validation
    (``scored``: the interactions carry ratings, so their strength is a choice too)."""
    cfg = settings.evaluate
    rec = settings.train.recommend

    def popularity(fold: Fold, params: Mapping[str, Any]) -> Popularity:
        return Popularity(fold.fit["u"].to_numpy(), fold.fit["i"].to_numpy(), fold.n_items)

    def als(fold: Fold, params: Mapping[str, Any]) -> FactorScores:
        settings = rec.als.model_copy(update={k: v for k, v in params.items() if k != "strength"})
        return fit_als(spark, fold, settings, cfg.seed, params.get("strength", "count"))

    def ease(fold: Fold, params: Mapping[str, Any]) -> EASE:
        return EASE(params["lam"], rec.ease_max_items).fit(
            fold.fit["u"].to_numpy(),
            fold.fit["i"].to_numpy(),
            fold.n_users,
            fold.n_items,
            pair_strength(fold, params.get("strength", "count")),
        )

    def knn(fold: Fold, params: Mapping[str, Any]) -> ItemKNN:
        return ItemKNN(
            fold.fit["u"].to_numpy(),
            fold.fit["i"].to_numpy(),
            fold.fit["ts"].to_numpy(),
            fold.n_users,
            fold.n_items,
            params["half_life_days"],
            cfg.knn_neighbors,
            cfg.knn_history,
        )

    base = rec.als
    # a rating's score as the interaction's strength is tried only where the data has scores
    strengths = [s for s in cfg.strengths if s == "count" or scored]
    return [
        Method("popularity", [{}], popularity),
        Method(
            "ALS (Spark MLlib, implicit)",
            [
                {"rank": base.rank, "max_iter": base.max_iter, "reg_param": r, "alpha": a, **_strength(s)}
                for s in strengths
                for r in cfg.als_reg_params
                for a in cfg.als_alphas
            ],
            als,
            component="als",
        ),
        Method(
            "EASE",
            [{"lam": lam, **_strength(s)} for s in strengths for lam in cfg.ease_lambdas],
            ease,
            component="ease",
        ),
        Method("item-kNN (SAR co-occurrence)", [{"half_life_days": h} for h in cfg.knn_half_lives], knn),
    ]


def _ranking(
    spark: "SparkSession", settings: Settings, data: _Data, dataset: str, protocol: str, ks: tuple[int, ...]
) -> EvaluateResult:
    import pandas as pd

    cfg = settings.evaluate
    types = cfg.interactions or settings.ingest.item_event_types
    inter = interactions(data.events, types)
    if cfg.k_core > 1:
        inter = k_core(inter, cfg.k_core)
    if protocol == "loo-full":
        split = leave_one_out(inter)
    elif protocol == "cold-items":
        split = cold_items_split(inter, COLD_ITEMS, cfg.seed)
    else:
        split = with_valid(stratified_split(inter, STRATIFIED_TRAIN, cfg.seed), STRATIFIED_TRAIN, cfg.seed)
    frame: pd.DataFrame = split.select("user", "item", "ts", "event_id", "score", "split").toPandas()
    if frame.empty:
        raise UserlensError(f"{dataset}: no interactions of type {', '.join(types)} (evaluate.interactions)")
    frame = frame.sort_values(["user", "ts", "event_id"], kind="stable").reset_index(drop=True)
    item_index = pd.Index(sorted(frame["item"].unique()))
    user_index = pd.Index(sorted(frame["user"].unique()))
    frame["u"] = user_index.get_indexer(frame["user"])
    frame["i"] = item_index.get_indexer(frame["item"])
    n_users, n_items = len(user_index), len(item_index)
    cold = protocol == "cold-items"
    folds = make_folds(frame, n_users, n_items, cold=cold)
    valid, test = folds
    if len(test.users) == 0 or len(valid.users) == 0:
        need = "at least 3 interactions" if protocol == "loo-full" else "at least 3 distinct items"
        raise UserlensError(f"{dataset}: no user has {need}, so there is nothing to evaluate")
    counts = {
        **data.counts,
        "users": n_users,
        "items": n_items,
        "interactions": len(frame),
        "evaluated_users": len(test.users),
        "validation_users": len(valid.users),
    }
    log.info(
        "evaluate: %s %s: %d users, %d items, %d interactions; %d users evaluated (%d in validation)",
        dataset,
        protocol,
        n_users,
        n_items,
        len(frame),
        len(test.users),
        len(valid.users),
    )

    with_ranks = protocol == "loo-full"
    primary = f"ndcg@{10 if 10 in ks else max(ks)}"
    if cold:
        from userlens.eval.recommenders import cold_methods

        methods = cold_methods(spark, settings, data.items, item_index, folds, int(primary.split("@")[1]))
    else:
        methods = baseline_methods(spark, settings, scored=bool(frame["score"].notna().any()))
    if cfg.userlens and not cold:
        from userlens.eval.recommenders import userlens_methods

        methods += userlens_methods(spark, settings, data.items, item_index, protocol, int(primary.split("@")[1]))
    results: dict[str, dict[str, Any] | str] = {}
    tuned: dict[str, Tuned] = {}
    for method in methods:
        try:
            tuned[method.name] = tune(method, folds, ks, with_ranks, primary)
        except CatalogueTooLarge as exc:  # the row says why, the others stand
            results[method.name] = f"n/a: {exc}"
            continue
        results[method.name] = tuned[method.name].row
        log.info(
            "evaluate: %s done in %.1fs (%s)",
            method.name,
            tuned[method.name].row["seconds"],
            tuned[method.name].row["setting"],
        )
    if cold:
        from userlens.eval.recommenders import cold_fused_row

        results = {**cold_fused_row(tuned, folds, ks, primary, cfg.seed), **results}
    elif cfg.userlens:
        from userlens.eval.recommenders import fused_rows

        results = {**fused_rows(tuned, folds, ks, with_ranks, primary, cfg.seed), **results}
    table = _ranking_table(dataset, protocol, ks, counts, types, results)
    return EvaluateResult(dataset, protocol, table, results, counts)


def fit_als(spark: "SparkSession", fold: Fold, als: AlsSettings, seed: int, strength: str = "count") -> FactorScores:
    """Spark MLlib ALS with implicit feedback; the rating is the user's number of events with the item
    ("count"), or the sum of their scores ("score", :func:`pair_strength`)."""
    values = pair_strength(fold, strength)
    fit = fold.fit[["u", "i"]].assign(r=1.0 if values is None else values)
    pairs = fit.groupby(["u", "i"], as_index=False)["r"].sum()
    model = spark_baselines.fit_als(
        spark.createDataFrame(pairs.astype({"u": "int32", "i": "int32", "r": "float32"})), als, seed
    )
    return FactorScores(
        _factors(model.userFactors, fold.n_users, als.rank), _factors(model.itemFactors, fold.n_items, als.rank)
    )


def _factors(factors: DataFrame, n: int, rank: int) -> np.ndarray:
    rows: Any = factors.toPandas()
    out = np.full((n, rank), np.nan)
    if len(rows):
        out[rows["id"].to_numpy()] = np.stack(rows["features"].to_numpy())
    return out


def item_texts_of(settings: Settings, items: DataFrame) -> dict[str, str]:
    """item_id -> the text the embed stage would embed for it (items without text left out)."""
    rows = item_texts(items, list(settings.embed.item_text_fields)).where(F.length("text") > 0).collect()
    return {r["item_id"]: r["text"] for r in rows}


def _ranking_table(
    dataset: str,
    protocol: str,
    ks: tuple[int, ...],
    counts: dict[str, Any],
    types: Sequence[str],
    results: dict[str, dict[str, Any] | str],
) -> str:
    if protocol == "loo-full":
        columns = [(f"HR@{k}", f"hr@{k}") for k in ks] + [(f"NDCG@{k}", f"ndcg@{k}") for k in ks] + [("MRR", "mrr")]
        k_valid = 10 if 10 in ks else max(ks)
        columns.append((f"valid NDCG@{k_valid}", f"valid.ndcg@{k_valid}"))
        split = (
            f"chronological leave-one-out: test = each user's last interaction, valid = the one before "
            f"({counts['evaluated_users']:,} users with at least 3); full ranking over all "
            f"{counts['items']:,} items, the user's fitted items removed; HR@k = Recall@k here"
        )
    elif protocol == "cold-items":
        columns = [(f"HR@{k}", f"hr@{k}") for k in ks] + [(f"NDCG@{k}", f"ndcg@{k}") for k in ks]
        columns.append(("valid NDCG@10", "valid.ndcg@10"))
        split = (
            f"cold items: a seeded {COLD_ITEMS:.0%} of the items have every interaction held out of the fit "
            f"data (half for validation, half for test); each user who interacts with a test-cold item is "
            f"ranked over the test-cold items only ({counts['evaluated_users']:,} users; validation "
            f"{counts['validation_users']:,})"
        )
    else:
        columns = [
            (name.format(k=k), key.format(k=k))
            for k in ks
            for name, key in (
                ("MAP@{k}", "map@{k}"),
                ("nDCG@{k}", "ndcg@{k}"),
                ("Precision@{k}", "precision@{k}"),
                ("Recall@{k}", "recall@{k}"),
            )
        ]
        k_valid = 10 if 10 in ks else max(ks)
        columns.append((f"valid nDCG@{k_valid}", f"valid.ndcg@{k_valid}"))
        split = (
            f"per-user random 75/25 split of distinct (user, item) pairs ({counts['evaluated_users']:,} users "
            f"with held-out items); top-{max(ks)} over {counts['items']:,} items, training items removed; "
            f"validation: the same 75/25 split of each user's training pairs ({counts['validation_users']:,} users)"
        )
    lines = [
        f"### userlens evaluate: {dataset}, {protocol}",
        "",
        f"- data: {_data_line(counts)}; {counts['users']:,} users, {counts['items']:,} items, "
        f"{counts['interactions']:,} interactions ({', '.join(types)})",
        f"- split: {split}",
        "",
    ]
    lines += _table(columns, results)
    lines += [
        "",
        "- every setting, the fusion weights and the epochs were chosen on the validation fold "
        "(fitted without the validation targets); the test split was scored once, fitted with them; "
        "± is the standard error over users",
    ]
    return "\n".join(lines) + "\n"


def _table(columns: list[tuple[str, str]], results: dict[str, dict[str, Any] | str]) -> list[str]:
    with_setting = any(isinstance(v, dict) and "setting" in v for v in results.values())
    header = ["method", *[name for name, _ in columns], *(["chosen on validation"] if with_setting else []), "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for method, values in results.items():
        if isinstance(values, str):
            cells = [values] + [""] * (len(header) - 2)
        else:
            cells = [_cell(_lookup(values, key), _lookup(values, key + "_se")) for _, key in columns]
            if with_setting:
                cells.append(str(values.get("setting", "")))
            cells.append(f"{values['seconds']:.1f}")
        lines.append("| " + " | ".join([method, *cells]) + " |")
    return lines


def _lookup(values: dict[str, Any], key: str) -> Any:
    if key.startswith("valid."):
        valid = values.get("valid") or {}
        return valid.get(key[len("valid.") :])
    return values.get(key)


def _cell(value: Any, se: Any = None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return f"{value:.4f} ± {se:.4f}" if isinstance(se, float) else f"{value:.4f}"


# --------------------------------------------------------------------------
# next-window
# --------------------------------------------------------------------------
def _next_window(
    spark: "SparkSession", settings: Settings, data: _Data, dataset: str, as_of: dt.date | None
) -> EvaluateResult:
    from userlens.features import feature_names

    cfg = settings.evaluate
    horizon = cfg.horizon_days or settings.train.horizon_days
    max_row = data.events.agg(F.max("event_date")).first()
    assert max_row is not None  # an aggregate without groupBy has one row
    latest = max_row[0]
    as_of = as_of or latest
    cut = as_of - dt.timedelta(days=horizon)
    event_types = list(settings.ingest.event_types)
    users = next_window_users(data.events, cut, as_of, event_types, cfg.seed).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        stats = (
            users.groupBy("split")
            .agg(
                F.count(F.lit(1)).alias("n"),
                *(F.sum(t).alias(t) for t in NEXT_WINDOW_TARGETS),
            )
            .collect()
        )
        by_split = {r["split"]: {"users": r["n"], **{t: int(r[t] or 0) for t in NEXT_WINDOW_TARGETS}} for r in stats}
        if not by_split.get("test") or not by_split.get("train"):
            raise UserlensError(
                f"{dataset}: {sum(s['users'] for s in by_split.values())} users have events up to "
                f"the cutoff {cut}; too few for a train and a test split"
            )
        names = feature_names(event_types)
        recency, frequency = names.index("recency_days"), names.index("n_events")
        # activity always; purchase and "rated >= 4" where the data has them (a ratings dataset has no
        # purchase, a shop's log no ratings): a target without a positive training user is left out
        shown = [t for t in NEXT_WINDOW_TARGETS if t == "active" or by_split["train"][t] > 0]
        test: pd.DataFrame = (
            users.where(F.col("split") == "test")
            .select(
                "user_key",
                *shown,
                F.col("features")[recency].alias("recency"),
                F.col("features")[frequency].alias("frequency"),
            )
            .toPandas()
        )
        targets = {t: test[t].to_numpy() for t in shown}
        results: dict[str, dict[str, Any] | str] = {}
        started = time.perf_counter()
        results["recency (days since last event)"] = _auc_row(
            targets, {t: -test["recency"].to_numpy() for t in targets}, started
        )
        started = time.perf_counter()
        results["frequency (events up to the cutoff)"] = _auc_row(
            targets, {t: test["frequency"].to_numpy() for t in targets}, started
        )
        reg_params = settings.train.linear_reg_params
        started = time.perf_counter()
        rfm = _logistic(users, None, test["user_key"], targets, reg_params, cfg.seed)
        results[RFM_ROW] = _fitted_row(targets, rfm, started)
        if cfg.userlens:
            started = time.perf_counter()
            with_text = _with_text_embeddings(spark, settings, data, users, cut, event_types)
            try:
                embedded = time.perf_counter() - started  # the texts' embedding, counted in each view's row

                def vector(column: str) -> Column:
                    return F.transform(column, lambda v: v.cast("double"))

                views = {"history": [vector("embedding")]}
                if settings.textualize.state.enabled:
                    views["state"] = [vector("state_embedding")]
                    views["history + state"] = [vector("embedding"), vector("state_embedding")]
                for view, parts in views.items():
                    started = time.perf_counter() - embedded
                    name = (
                        "userlens (user-text embedding + RFM, MLlib LR)"
                        if view == "history"
                        else f"userlens: {view} (embeddings + RFM, MLlib LR)"
                    )
                    fitted = _logistic(with_text, F.concat(*parts), test["user_key"], targets, reg_params, cfg.seed)
                    results[name] = _fitted_row(targets, fitted, started, rfm)
                started = time.perf_counter()
                results["bag of words + RFM (MLlib LR, regParam chosen on valid)"] = _bag_of_words_row(
                    with_text, targets, settings.train.linear_reg_params, cfg.seed, started
                )
            finally:
                with_text.unpersist()
    finally:
        users.unpersist()
    counts = {
        **data.counts,
        "cutoff": cut.isoformat(),
        "as_of": as_of.isoformat(),
        "horizon_days": horizon,
        **{f"{s}_{k}": v for s, c in by_split.items() for k, v in c.items()},
    }
    t = by_split["test"]
    lines = [
        f"### userlens evaluate: {dataset}, next-window",
        "",
        f"- data: {_data_line(data.counts)}",
        f"- window: cutoff {cut}, labels from the {horizon} days after it (to {as_of}); "
        f"{sum(s['users'] for s in by_split.values()):,} users with an event up to the cutoff, "
        f"{t['users']:,} of them held out for test ("
        + ", ".join(f"{t[target]:,} {NEXT_WINDOW_TARGETS[target][1]}" for target in targets)
        + ")",
        "",
    ]
    lines += _table([(NEXT_WINDOW_TARGETS[target][0], target) for target in targets], results)
    lines += ["", "- ± is the ROC AUC's standard error (Hanley & McNeil 1982)"]
    return EvaluateResult(dataset, "next-window", "\n".join(lines) + "\n", results, counts)


def _held_out_split(seed: int) -> Column:
    """``split`` with a seeded fifth of the train users as ``valid``: next-window's regressions choose their
    regParam there (the protocol's own split has no validation users)."""
    held = F.pmod(F.xxhash64(F.lit(seed + 1), F.col("user_key")), F.lit(5)) == 0
    return F.when((F.col("split") == "train") & held, "valid").otherwise(F.col("split"))


def _bag_of_words_row(
    frame: DataFrame, targets: dict[str, np.ndarray], reg_params: list[float], seed: int, started: float
) -> dict[str, Any]:
    """The bag-of-words baseline (:func:`userlens.eval.spark_baselines.bag_of_words_baseline`: TF-IDF of the
    history and state texts beside log1p(features)) on the next-window split, a seeded fifth of the train
    users held out to choose its regParam; its test AUC per target with the standard error."""
    from userlens.eval.spark_baselines import bag_of_words_baseline

    split = _held_out_split(seed)
    text = F.concat_ws("\n", "text", "state_text")
    found = bag_of_words_baseline(
        frame.select(split.alias("split"), "features", text.alias("text"), *targets), list(targets), reg_params
    )
    row: dict[str, Any] = {}
    for target, y in targets.items():
        if y.min() == y.max():
            row[target] = f"n/a (test users all {'positive' if y.min() else 'negative'})"
            continue
        auc, positives = found[target]["auc"], int(found[target]["positives"])
        row[target] = auc
        row[f"{target}_se"] = M.roc_auc_se(auc, positives, int(found[target]["n"]) - positives)
    row["seconds"] = time.perf_counter() - started
    return row


def _auc_row(targets: dict[str, np.ndarray], scores: dict[str, np.ndarray | str], started: float) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for target, y in targets.items():
        p = scores[target]
        if isinstance(p, str):
            row[target] = p
        elif y.min() == y.max():
            row[target] = f"n/a (test users all {'positive' if y.min() else 'negative'})"
        else:
            row[target] = M.roc_auc(y, p)
            row[f"{target}_se"] = M.roc_auc_se(row[target], int(y.sum()), int(len(y) - y.sum()))
    row["seconds"] = time.perf_counter() - started
    return row


RFM_ROW = "logistic regression (MLlib, RFM features)"


@dataclass
class _Fitted:
    """One next-window logistic regression per target: test P(1) in ``test_users`` order (or why there is
    none), the held-out train users' AUC, and the regParam that won there."""

    p: dict[str, np.ndarray | str]
    valid_auc: dict[str, float]
    reg: dict[str, float]


def _logistic(
    frame: DataFrame,
    vectors: Column | None,
    test_users: "pd.Series",
    targets: dict[str, np.ndarray],
    reg_params: Sequence[float],
    seed: int,
) -> _Fitted:
    """Per target: MLlib logistic regression on ``vectors`` (embeddings, or none) beside log1p(features),
    fitted on four fifths of the train split, its regParam chosen on the held-out fifth's AUC (the same seeded
    fifth as the bag of words), P(1) for ``test_users``.

    The penalty falls on the embeddings, not on the counts: both are standardized, the counts then scaled by
    ``COUNT_SCALE``, and the regression runs unstandardized (as the bag of words does). Left unstandardized, a
    MiniLM dimension that barely varies over a few hundred users carries a penalty of regParam / std^2, and
    MLlib's L-BFGS stopped at its first step with every weight zero."""
    from pyspark.ml import Pipeline
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.feature import StandardScaler, VectorAssembler
    from pyspark.ml.functions import array_to_vector, vector_to_array

    split = _held_out_split(seed)
    log1p = F.transform("features", lambda v: F.log1p(F.greatest(v, F.lit(0.0))))
    first = frame.select(F.size("features")).first()
    n_counts = first[0] if first is not None else 0
    stages: list[Any] = spark_baselines.scaled_counts(n_counts)
    inputs = ["counts_x"]
    columns = [F.col("user_key"), split.alias("split"), array_to_vector(log1p).alias("counts")]
    if vectors is not None:
        columns.append(array_to_vector(vectors).alias("vectors"))
        stages.append(StandardScaler(inputCol="vectors", outputCol="vectors_std", withMean=True, withStd=True))
        inputs.insert(0, "vectors_std")
    stages.append(VectorAssembler(inputCols=inputs, outputCol="x"))
    data = frame.select(*columns, *(F.col(t).cast("double").alias(t) for t in targets))
    rows = Pipeline(stages=stages).fit(data.where(F.col("split") == "train")).transform(data)
    rows = rows.select("user_key", "split", "x", *targets).cache()
    fitted = _Fitted({}, {}, {})
    try:
        fit_rows = rows.where(F.col("split") == "train")
        labels: pd.DataFrame = fit_rows.select(*targets).toPandas()
        scored = rows.where(F.col("split") != "train")
        for target in targets:
            if labels[target].nunique() < 2:
                fitted.p[target] = "n/a (one class in train)"
                continue
            best: tuple[float, float, "pd.DataFrame"] | None = None
            for reg in reg_params:
                model = LogisticRegression(
                    featuresCol="x", labelCol=target, maxIter=100, regParam=reg, standardization=False
                ).fit(fit_rows)
                got = model.transform(scored).select(
                    "user_key", "split", target, vector_to_array(F.col("probability"))[1].alias("p")
                )
                out = got.toPandas()  # valid and test in one pass: the test rows of the winner are kept
                valid = out[out.split == "valid"]
                y = valid[target].to_numpy()
                auc = M.roc_auc(y, valid["p"].to_numpy()) if 0 < y.sum() < len(y) else float("nan")
                if best is None or auc > best[0] or np.isnan(best[0]):
                    best = (auc, reg, out[out.split == "test"])
            assert best is not None  # reg_params is not empty (config validation)
            fitted.valid_auc[target], fitted.reg[target] = best[0], best[1]
            fitted.p[target] = best[2].set_index("user_key")["p"].reindex(test_users).to_numpy()
    finally:
        rows.unpersist()
    return fitted


def _fitted_row(
    targets: dict[str, np.ndarray], fitted: _Fitted, started: float, rfm: _Fitted | None = None
) -> dict[str, Any]:
    """A next-window row from :func:`_logistic`; with ``rfm``, the fallback the train stage ships: a target
    whose held-out AUC is not above the RFM regression's on the same users scores with the RFM regression."""
    scores: dict[str, np.ndarray | str] = {}
    chosen = []
    for target in targets:
        mine, theirs = fitted.valid_auc.get(target, float("nan")), (rfm.valid_auc.get(target) if rfm else None)
        if rfm is not None and theirs is not None and not mine > theirs:
            scores[target] = rfm.p[target]
            chosen.append(f"{target}: RFM (valid AUC {mine:.3f} <= {theirs:.3f})")
        else:
            scores[target] = fitted.p[target]
            if target in fitted.reg:
                chosen.append(f"{target}: regParam={fitted.reg[target]:g}")
    row = _auc_row(targets, scores, started)
    row["setting"] = "; ".join(chosen)
    return row


def _with_text_embeddings(
    spark: "SparkSession", settings: Settings, data: _Data, users: DataFrame, cut: dt.date, event_types: list[str]
) -> DataFrame:
    """``users`` with each user's texts as of ``cut`` (text, state_text) and their embeddings (embedding,
    state_embedding: textualize, then the embed stage's encoder, one pass), persisted: the caller unpersists."""
    from userlens.embedding import Embedder, EncoderSpec, user_vectors, with_user_vectors
    from userlens.text.user_texts import build_user_texts

    def model_id(s: Settings) -> str:
        return EncoderSpec.from_settings(s.embed).model_id

    texts = build_user_texts(
        data.events.where(F.col("event_date") <= F.lit(cut)), data.items, settings.textualize, event_types, cut
    ).select("user_key", "text", "text_hash", "state_text", "state_hash")
    state = settings.textualize.state.enabled
    vectors = user_vectors(Embedder(spark, settings), texts, None, model_id(settings), state)
    joined = with_user_vectors(users.join(texts, "user_key"), vectors.frame, state)
    joined = joined.persist(StorageLevel.MEMORY_AND_DISK)
    joined.count()
    vectors.release()
    return joined
