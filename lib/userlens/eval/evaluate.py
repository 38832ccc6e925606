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
* ``next-window``: cutoff C = as-of date - H days; users with an event up to C; labels: any event
  (activity) and any purchase in (C, as-of]; users split 70/30 by a seeded hash; ROC AUC on the 30.

Every method runs in the same process on the same split: popularity, Spark MLlib ALS (implicit),
SAR-style item-kNN and the userlens two-tower (``userlens.models.recommend.TextTwoTower``) for the
ranking protocols; recency, frequency, MLlib logistic regression on the train stage's numeric
features and userlens (the user text's embedding beside the same features) for next-window.

The data path is the pipeline's: the dataset adapter, then ingest's ``classify_events`` /
``classify_items`` (validation, quarantine counts, pseudonyms, PII scrubbing). Nothing is written
but the ``pipeline_runs`` row. Splits and features are Spark transforms; the split interactions
(user, item, time) are then collected to the driver once, where the models rank items and
``models.metrics`` scores them: this is a benchmark for datasets that fit one machine (the userlens
model's interface takes a pandas frame), not a pipeline stage.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from pyspark import StorageLevel
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from userlens.config import Settings
from userlens.errors import UserlensError, first_line
from userlens.eval import spark_baselines
from userlens.eval.baselines import FactorScores, ItemKNN, Popularity, rank_batch
from userlens.models import metrics as M
from userlens.runs import StageRun
from userlens.sources.raw import DUPLICATE, OK, QUARANTINED, classify_events, classify_items

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import SparkSession

    from userlens.privacy import PseudonymKey

log = logging.getLogger(__name__)

PROTOCOLS = ("loo-full", "stratified-75", "next-window")
DEFAULT_KS = {"loo-full": (5, 10, 20), "stratified-75": (10,)}
STRATIFIED_TRAIN = 0.75
NEXT_WINDOW_TEST = 0.3
USERLENS_DEPTH = 1000  # items asked of the userlens model per user; its MRR counts ranks up to this
NOT_AVAILABLE = "n/a (userlens.models.recommend not available)"
SCORE_CELLS = 20_000_000  # users x items scored per batch


@dataclass(frozen=True)
class EvaluateResult:
    dataset: str
    protocol: str
    table: str  # the markdown the command prints
    metrics: dict[str, dict[str, Any] | str]  # a method's metrics, or why it has none
    counts: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------
def interactions(events: DataFrame, types: Sequence[str]) -> DataFrame:
    """(user, item, ts, event_id): item events of ``types``, ts in epoch seconds."""
    return events.where(F.col("item_id").isNotNull() & F.col("event_type").isin(*types)).select(
        F.col("user_key").alias("user"),
        F.col("item_id").alias("item"),
        F.col("event_time").cast("long").alias("ts"),
        "event_id",
    )


def leave_one_out(inter: DataFrame) -> DataFrame:
    """``split``: a user's newest interaction 'test', the one before 'valid', the rest 'train';
    users with fewer than 3 interactions are all 'train'. Ties in time go by event_id."""
    newest_first = Window.partitionBy("user").orderBy(F.desc("ts"), F.desc("event_id"))
    n = F.count(F.lit(1)).over(Window.partitionBy("user"))
    rank = F.row_number().over(newest_first)
    split = F.when(n < 3, "train").when(rank == 1, "test").when(rank == 2, "valid").otherwise("train")
    return inter.withColumn("split", split)


def stratified_split(inter: DataFrame, train_fraction: float, seed: int) -> DataFrame:
    """One row per (user, item) at its first time; per user, round(n * train_fraction) rows in a
    seeded hash order are 'train', the rest 'test' (the same split on any partitioning)."""
    pairs = inter.groupBy("user", "item").agg(F.min("ts").alias("ts"), F.min("event_id").alias("event_id"))
    shuffled = Window.partitionBy("user").orderBy(F.xxhash64(F.lit(seed), "user", "item"), "item")
    n = F.count(F.lit(1)).over(Window.partitionBy("user"))
    rank = F.row_number().over(shuffled)
    return pairs.withColumn("split", F.when(rank <= F.round(n * train_fraction), "train").otherwise("test"))


def next_window_users(events: DataFrame, cut: dt.date, as_of: dt.date, event_types: list[str], seed: int) -> DataFrame:
    """(user_key, split, features, active, purchase) for users with an event up to ``cut``; labels
    from (cut, as_of]; 'test' for a seeded-hash NEXT_WINDOW_TEST share of users."""
    from userlens.features import labels, numeric_features

    future = labels(events, cut, as_of)
    u = F.pmod(F.xxhash64(F.lit(seed), F.col("user_key")), F.lit(1_000_000)) / F.lit(1_000_000.0)
    return (
        numeric_features(events, cut, event_types)
        .join(future, "user_key", "left")
        .select(
            "user_key",
            F.when(u < NEXT_WINDOW_TEST, "test").otherwise("train").alias("split"),
            "features",
            F.col("purchase").isNotNull().cast("int").alias("active"),
            F.coalesce("purchase", F.lit(0)).alias("purchase"),
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
    run.rows_in, run.rows_out = data.counts["rows_in"], data.counts["events"]
    run.details.update({"dataset": dataset, "protocol": protocol, "counts": result.counts, "metrics": result.metrics})
    return result


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
@dataclass
class _Fold:
    name: str
    fit: "pd.DataFrame"  # user, item, ts (strings, epoch seconds), u, i (indices); chronological
    users: np.ndarray  # evaluated user indices
    targets: list[np.ndarray]  # held-out item indices per evaluated user
    seen: list[np.ndarray]  # fitted item indices per evaluated user (removed from the ranking)


def _folds(frame: "pd.DataFrame", protocol: str) -> list[_Fold]:
    def fold(name: str, fit_splits: tuple[str, ...], target_split: str) -> _Fold:
        fit = frame[frame["split"].isin(fit_splits)]
        held = frame[frame["split"] == target_split]
        targets = held.groupby("u")["i"].apply(lambda s: s.to_numpy())
        seen = fit[fit["u"].isin(targets.index)].groupby("u")["i"].apply(lambda s: np.unique(s.to_numpy()))
        users = targets.index.to_numpy()
        return _Fold(
            name,
            fit[["user", "item", "ts", "u", "i"]],
            users,
            list(targets),
            [seen.get(u, np.array([], np.int64)) for u in users],
        )

    if protocol == "loo-full":
        return [fold("valid", ("train",), "valid"), fold("test", ("train", "valid"), "test")]
    return [fold("test", ("train",), "test")]


def _ranking(
    spark: "SparkSession", settings: Settings, data: _Data, dataset: str, protocol: str, ks: tuple[int, ...]
) -> EvaluateResult:
    import pandas as pd

    cfg = settings.evaluate
    types = cfg.interactions or settings.ingest.item_event_types
    inter = interactions(data.events, types)
    split = leave_one_out(inter) if protocol == "loo-full" else stratified_split(inter, STRATIFIED_TRAIN, cfg.seed)
    frame: pd.DataFrame = split.select("user", "item", "ts", "event_id", "split").toPandas()
    if frame.empty:
        raise UserlensError(f"{dataset}: no interactions of type {', '.join(types)} (evaluate.interactions)")
    frame = frame.sort_values(["user", "ts", "event_id"], kind="stable").reset_index(drop=True)
    item_index = pd.Index(sorted(frame["item"].unique()))
    user_index = pd.Index(sorted(frame["user"].unique()))
    frame["u"] = user_index.get_indexer(frame["user"])
    frame["i"] = item_index.get_indexer(frame["item"])
    folds = _folds(frame, protocol)
    test = folds[-1]
    if len(test.users) == 0:
        need = "at least 3 interactions" if protocol == "loo-full" else "at least 2 distinct items"
        raise UserlensError(f"{dataset}: no user has {need}, so there is nothing to evaluate")
    n_users, n_items = len(user_index), len(item_index)
    counts = {
        **data.counts,
        "users": n_users,
        "items": n_items,
        "interactions": len(frame),
        "evaluated_users": len(test.users),
    }
    log.info(
        "evaluate: %s %s: %d users, %d items, %d interactions; %d users evaluated",
        dataset,
        protocol,
        n_users,
        n_items,
        len(frame),
        len(test.users),
    )

    k_max = max(ks)
    with_ranks = protocol == "loo-full"
    methods: list[tuple[str, Callable[[_Fold], Any]]] = [
        ("popularity", lambda f: Popularity(f.fit["u"].to_numpy(), f.fit["i"].to_numpy(), n_items)),
        ("ALS (Spark MLlib, implicit)", lambda f: fit_als(spark, f.fit, n_users, n_items, settings)),
        (
            "item-kNN (SAR co-occurrence)",
            lambda f: ItemKNN(
                f.fit["u"].to_numpy(),
                f.fit["i"].to_numpy(),
                f.fit["ts"].to_numpy(),
                n_users,
                n_items,
                cfg.knn_half_life_days,
                cfg.knn_neighbors,
                cfg.knn_history,
            ),
        ),
    ]
    results: dict[str, dict[str, Any] | str] = {}
    for name, fit in methods:
        started = time.perf_counter()
        per_fold = {}
        for f in folds:
            model = fit(f)
            tops, ranks = _rank_all(model, f, n_items, k_max, with_ranks)
            per_fold[f.name] = _fold_metrics(tops, ranks, f.targets, ks)
        row: dict[str, Any] = {
            **per_fold["test"],
            "valid": per_fold.get("valid"),
            "seconds": time.perf_counter() - started,
        }
        results[name] = row
        log.info("evaluate: %s done in %.1fs", name, row["seconds"])
    if cfg.userlens:
        results["userlens (TextTwoTower)"] = _userlens_ranking(
            settings, data, folds, item_index, user_index, ks, with_ranks
        )
    table = _ranking_table(dataset, protocol, ks, counts, types, results)
    return EvaluateResult(dataset, protocol, table, results, counts)


def _rank_all(
    model: Any, fold: _Fold, n_items: int, k: int, with_ranks: bool
) -> tuple[list[list[int]], np.ndarray | None]:
    batch = max(1, min(4096, SCORE_CELLS // max(n_items, 1)))
    tops: list[list[int]] = []
    ranks: list[np.ndarray] = []
    for start in range(0, len(fold.users), batch):
        end = start + batch
        t, r = rank_batch(
            model.scores(fold.users[start:end]),
            fold.seen[start:end],
            fold.targets[start:end] if with_ranks else None,
            k,
        )
        tops.extend(t)
        ranks.append(r)
    return tops, (np.concatenate(ranks) if with_ranks else None)


def _fold_metrics(
    tops: list[list[int]], ranks: np.ndarray | None, targets: list[np.ndarray], ks: Sequence[int]
) -> dict[str, float]:
    values = M.ranking_metrics(tops, [set(t.tolist()) for t in targets], ks)
    if ranks is not None:
        values["mrr"] = M.mrr_from_ranks(ranks)
    else:
        values.pop("mrr", None)
    return values


def fit_als(spark: "SparkSession", fit: "pd.DataFrame", n_users: int, n_items: int, settings: Settings) -> FactorScores:
    """Spark MLlib ALS with implicit feedback (``train.recommend.als``, as the train stage's baseline);
    the rating is the user's number of events with the item."""
    als = settings.train.recommend.als
    pairs = fit.groupby(["u", "i"]).size().reset_index(name="r")
    model = spark_baselines.fit_als(
        spark.createDataFrame(pairs.astype({"u": "int32", "i": "int32", "r": "float32"})), als, settings.evaluate.seed
    )
    return FactorScores(_factors(model.userFactors, n_users, als.rank), _factors(model.itemFactors, n_items, als.rank))


def _factors(factors: DataFrame, n: int, rank: int) -> np.ndarray:
    rows: pd.DataFrame = factors.toPandas()
    out = np.full((n, rank), np.nan)
    if len(rows):
        out[rows["id"].to_numpy()] = np.stack(rows["features"].to_numpy())
    return out


def _item_texts(settings: Settings, items: DataFrame) -> dict[str, str] | None:
    from userlens.embedding import item_texts

    rows = item_texts(items, list(settings.embed.item_text_fields)).where(F.length("text") > 0).collect()
    return {r["item_id"]: r["text"] for r in rows} or None


def _userlens_ranking(
    settings: Settings,
    data: _Data,
    folds: list[_Fold],
    item_index: "pd.Index",
    user_index: "pd.Index",
    ks: tuple[int, ...],
    with_ranks: bool,
) -> dict[str, Any] | str:
    try:
        from userlens.models.recommend import TextTwoTower
    except ImportError:
        log.info("evaluate: userlens.models.recommend is not available; the userlens row is n/a")
        return NOT_AVAILABLE
    started = time.perf_counter()
    depth = min(len(item_index), max(USERLENS_DEPTH, max(ks))) if with_ranks else max(ks)
    texts = _item_texts(settings, data.items)
    per_fold: dict[str, dict[str, float]] = {}
    try:
        for f in folds:
            model = TextTwoTower(settings, seed=settings.evaluate.seed).fit(
                f.fit[["user", "item", "ts"]].reset_index(drop=True), texts
            )
            tops: list[list[int]] = []
            ranks = np.full(len(f.users), np.inf)
            for start in range(0, len(f.users), 1024):
                users = f.users[start : start + 1024]
                names = [str(user_index[u]) for u in users]
                exclude = {n: set(item_index[s].tolist()) for n, s in zip(names, f.seen[start : start + 1024])}
                recs = model.recommend(names, depth, exclude)
                for row, (name, targets) in enumerate(zip(names, f.targets[start : start + 1024])):
                    ranked = item_index.get_indexer(recs.get(name, []))
                    ranked = ranked[ranked >= 0]
                    tops.append(ranked[: max(ks)].tolist())
                    hits = np.flatnonzero(np.isin(ranked, targets))
                    if len(hits):
                        ranks[start + row] = hits[0] + 1
            per_fold[f.name] = _fold_metrics(tops, ranks if with_ranks else None, f.targets, ks)
    except Exception as exc:  # noqa: BLE001 - the baselines stand; the row says why userlens has no numbers
        log.warning("evaluate: the userlens model failed", exc_info=True)
        return f"failed: {type(exc).__name__}: {first_line(exc)}"
    result: dict[str, Any] = {
        **per_fold["test"],
        "valid": per_fold.get("valid"),
        "seconds": time.perf_counter() - started,
    }
    if with_ranks and depth < len(item_index):
        result["mrr_depth"] = depth
    return result


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
        split = (
            f"per-user random 75/25 split of distinct (user, item) pairs ({counts['evaluated_users']:,} users "
            f"with held-out items); top-{max(ks)} over {counts['items']:,} items, training items removed"
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
    notes = [
        f"userlens MRR counts ranks up to {r['mrr_depth']}"
        for r in results.values()
        if isinstance(r, dict) and r.get("mrr_depth")
    ]
    if notes:
        lines += ["", f"- {notes[0]}"]
    return "\n".join(lines) + "\n"


def _table(columns: list[tuple[str, str]], results: dict[str, dict[str, Any] | str]) -> list[str]:
    header = ["method", *[name for name, _ in columns], "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for method, values in results.items():
        if isinstance(values, str):
            cells = [values] + [""] * (len(header) - 2)
        else:
            cells = [_cell(_lookup(values, key)) for _, key in columns] + [f"{values['seconds']:.1f}"]
        lines.append("| " + " | ".join([method, *cells]) + " |")
    return lines


def _lookup(values: dict[str, Any], key: str) -> Any:
    if key.startswith("valid."):
        valid = values.get("valid") or {}
        return valid.get(key[len("valid.") :])
    return values.get(key)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return f"{value:.4f}"


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
            .agg(F.count(F.lit(1)).alias("n"), F.sum("active").alias("active"), F.sum("purchase").alias("purchase"))
            .collect()
        )
        by_split = {
            r["split"]: {"users": r["n"], "active": int(r["active"] or 0), "purchase": int(r["purchase"] or 0)}
            for r in stats
        }
        if not by_split.get("test") or not by_split.get("train"):
            raise UserlensError(
                f"{dataset}: {sum(s['users'] for s in by_split.values())} users have events up to "
                f"the cutoff {cut}; too few for a train and a test split"
            )
        names = feature_names(event_types)
        recency, frequency = names.index("recency_days"), names.index("n_events")
        test: pd.DataFrame = (
            users.where(F.col("split") == "test")
            .select(
                "user_key",
                "active",
                "purchase",
                F.col("features")[recency].alias("recency"),
                F.col("features")[frequency].alias("frequency"),
            )
            .toPandas()
        )
        targets = {"active": test["active"].to_numpy(), "purchase": test["purchase"].to_numpy()}
        results: dict[str, dict[str, Any] | str] = {}
        started = time.perf_counter()
        results["recency (days since last event)"] = _auc_row(
            targets, {t: -test["recency"].to_numpy() for t in targets}, started
        )
        started = time.perf_counter()
        results["frequency (events up to the cutoff)"] = _auc_row(
            targets, {t: test["frequency"].to_numpy() for t in targets}, started
        )
        log1p = F.transform("features", lambda v: F.log1p(F.greatest(v, F.lit(0.0))))
        started = time.perf_counter()
        results["logistic regression (MLlib, RFM features)"] = _auc_row(
            targets, _logistic(users.withColumn("x", log1p), test["user_key"], targets), started
        )
        if cfg.userlens:
            started = time.perf_counter()
            with_text = _with_text_embeddings(spark, settings, data, users, cut, event_types)
            try:
                x = F.concat(F.transform("embedding", lambda v: v.cast("double")), log1p)
                results["userlens (user-text embedding + RFM, MLlib LR)"] = _auc_row(
                    targets, _logistic(with_text.withColumn("x", x), test["user_key"], targets), started
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
        f"{t['users']:,} of them held out for test ({t['active']:,} active, {t['purchase']:,} purchased)",
        "",
    ]
    lines += _table([("AUC activity", "active"), ("AUC purchase", "purchase")], results)
    return EvaluateResult(dataset, "next-window", "\n".join(lines) + "\n", results, counts)


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
    row["seconds"] = time.perf_counter() - started
    return row


def _logistic(frame: DataFrame, test_users: "pd.Series", targets: dict[str, np.ndarray]) -> dict[str, np.ndarray | str]:
    """Per target: MLlib logistic regression on ``x`` fitted on the train split, P(1) for ``test_users``."""
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.functions import array_to_vector, vector_to_array

    data = frame.select("user_key", "split", array_to_vector(F.col("x")).alias("x"), *targets)
    train = data.where(F.col("split") == "train")
    test = data.where(F.col("split") == "test")
    out: dict[str, np.ndarray | str] = {}
    for target in targets:
        classes = {r[0] for r in train.select(target).distinct().collect()}
        if len(classes) < 2:
            out[target] = "n/a (one class in train)"
            continue
        model = LogisticRegression(featuresCol="x", labelCol=target, maxIter=100, regParam=1e-3).fit(
            train.withColumn(target, F.col(target).cast("double"))
        )
        p = model.transform(test).select("user_key", vector_to_array(F.col("probability"))[1].alias("p")).toPandas()
        out[target] = p.set_index("user_key")["p"].reindex(test_users).to_numpy()
    return out


def _with_text_embeddings(
    spark: "SparkSession", settings: Settings, data: _Data, users: DataFrame, cut: dt.date, event_types: list[str]
) -> DataFrame:
    """``users`` with the embedding of each user's text as of ``cut`` (textualize, then the embed stage's
    encoder), persisted: the caller unpersists."""
    from userlens.embedding import Embedder, distinct_texts
    from userlens.text.user_texts import build_user_texts

    texts = build_user_texts(
        data.events.where(F.col("event_date") <= F.lit(cut)), data.items, settings.textualize, event_types, cut
    ).select("user_key", "text", "text_hash")
    embedder = Embedder(spark, settings)
    vectors = embedder(distinct_texts(texts, embedder.partitions(texts.count())))
    joined = users.join(texts.select("user_key", "text_hash"), "user_key").join(vectors, "text_hash")
    return joined.persist(StorageLevel.MEMORY_AND_DISK)
