"""Userlens' recommender in ``userlens evaluate``: its components as methods of the table, and the
fused model that ships.

Components (each tuned on validation like any baseline, :mod:`userlens.eval.ranking`):

* ``userlens: sequential``: the causal transformer over the user's item history
  (:mod:`userlens.models.sequential`), item vectors = learned ids + the embed stage's encoder's
  item-text embedding; epochs by early stopping on the validation fold. With ``ids only``: the same
  without text (the row that shows what text is worth).
* the collaborative components are the tuned EASE and ALS rows of the table.

``userlens`` fuses the sequential component with EASE and ALS (per-user standardised scores, weights
chosen on validation, :func:`userlens.eval.ranking.fuse`); ``userlens without text`` fuses the ids-only
sequential component with the same collaborative ones.

Under leave-one-out the sequential model trained for the validation fold also scores the test fold,
with the validation item appended to each history (as RecBole and the SASRec papers do); under the
random stratified split it is retrained on the test fold's fit data for the chosen number of epochs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from userlens.config import Settings
from userlens.eval.ranking import Fold, Method, Tuned, fold_metrics, fuse, setting_label, subsample
from userlens.models.sequential import SequentialConfig, SequentialEncoder, fit

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

VALIDATION_USERS = 5000  # validation users the early stopping scores (a seeded sample above this)
SEQUENTIAL, SEQUENTIAL_IDS = "userlens: sequential (ids + item text)", "userlens: sequential (ids only)"
COLLABORATIVE = ("EASE", "ALS (Spark MLlib, implicit)")


def histories(fold: Fold) -> list[np.ndarray]:
    """Each user's fitted items in time order (the fit rows are chronological per user)."""
    out = [np.zeros(0, np.int64) for _ in range(fold.n_users)]
    fit = fold.fit
    users, items = fit["u"].to_numpy(), fit["i"].to_numpy()
    order = np.argsort(users, kind="stable")
    bounds = np.searchsorted(users[order], np.arange(fold.n_users + 1))
    for u in range(fold.n_users):
        out[u] = items[order[bounds[u] : bounds[u + 1]]]
    return out


class HistoryScorer:
    """A sequential model scoring a fold's users from their histories."""

    def __init__(self, model: SequentialEncoder, fold: Fold, chosen: Mapping[str, Any] | None = None) -> None:
        self.model, self.histories = model, histories(fold)
        self.chosen = dict(chosen or {})

    def scores(self, users: np.ndarray) -> np.ndarray:
        return self.model.scores([self.histories[int(u)] for u in users])


def item_text_vectors(
    spark: "SparkSession", settings: Settings, items: "DataFrame", item_index: "pd.Index"
) -> np.ndarray:
    """(n_items, dim) item-text embeddings by the embed stage's encoder, in ``item_index`` order (zeros
    for an item without text)."""
    from pyspark.sql import functions as F

    from userlens.embedding import Embedder, EncoderSpec, is_empty_text, item_texts, vectors_for

    texts = item_texts(items, list(settings.embed.item_text_fields)).where(~is_empty_text("text"))
    model_id = EncoderSpec.from_settings(settings.embed).model_id
    vectors = vectors_for(Embedder(spark, settings), texts, None, model_id)
    try:
        rows = texts.join(vectors.frame, "text_hash").select("item_id", F.col("embedding")).collect()
    finally:
        vectors.release()
    if not rows:
        raise ValueError("no item has a text")
    out = np.zeros((len(item_index), len(rows[0]["embedding"])), np.float32)
    position = item_index.get_indexer([r["item_id"] for r in rows])
    for row, at in zip(rows, position):
        if at >= 0:
            out[at] = row["embedding"]
    log.info(
        "evaluate: %d of %d items have a text embedding (%s)", int((position >= 0).sum()), len(item_index), model_id
    )
    return out


def sequential_method(
    name: str,
    config: SequentialConfig,
    text: np.ndarray | None,
    reuse_for_test: bool,
    primary_k: int,
    unknown: np.ndarray | None = None,
    grid: Sequence[Mapping[str, Any]] = ({},),
) -> Method:
    """The sequential encoder as a method of the table. ``grid``: SequentialConfig fields tried on
    validation (each with its own early stopping); with ``reuse_for_test`` the chosen setting's
    validation model scores the test fold too."""
    trained: dict[str, SequentialEncoder] = {}

    def fit_fold(fold: Fold, params: Mapping[str, Any]) -> HistoryScorer:
        setting = {k: v for k, v in params.items() if k != "epochs"}
        key = setting_label(setting)
        if fold.name == "test" and reuse_for_test and key in trained:
            return HistoryScorer(trained[key], fold, params)  # under loo-full the validation item joins each history
        cfg = dataclasses.replace(config, **setting)
        model = SequentialEncoder(fold.n_items, cfg, text, unknown)
        hist = histories(fold)
        if fold.name == "valid":
            sample = subsample(fold, VALIDATION_USERS, cfg.seed)

            def validate(m: SequentialEncoder) -> float:
                return fold_metrics(HistoryScorer(m, sample), sample, (primary_k,), False)[f"ndcg@{primary_k}"]

            summary = fit(model, hist, validate=validate)
            trained[key] = model
            log.info(
                "evaluate: %s %s: best epoch %d of %d (%.0fs)",
                name,
                key,
                summary["best_epoch"],
                summary["epochs_run"],
                summary["seconds"],
            )
            return HistoryScorer(model, fold, {**setting, "epochs": int(summary["best_epoch"])})
        fit(model, hist, epochs=int(params["epochs"]))
        return HistoryScorer(model, fold, params)

    return Method(name, list(grid), fit_fold, component=name)


def userlens_methods(
    spark: "SparkSession", settings: Settings, items: "DataFrame", item_index: "pd.Index", protocol: str, primary_k: int
) -> list[Method]:
    """The sequential components, with and without item text."""
    rec = settings.train.recommend
    config = SequentialConfig.of(rec, settings.evaluate.seed)
    reuse = protocol == "loo-full"
    methods = []
    try:
        text = item_text_vectors(spark, settings, items, item_index)
    except ValueError as exc:
        log.warning("evaluate: no item text (%s): only the ids-only sequential model", exc)
        text = None
    if text is not None:
        methods.append(sequential_method(SEQUENTIAL, config, text, reuse, primary_k))
    methods.append(sequential_method(SEQUENTIAL_IDS, config, None, reuse, primary_k))
    return methods


def fused_rows(
    tuned: Mapping[str, Tuned], folds: tuple[Fold, Fold], ks: Sequence[int], with_ranks: bool, primary: str, seed: int
) -> dict[str, dict[str, Any]]:
    """``userlens`` and ``userlens without text``: each sequential component fused with the collaborative
    ones that could run (the best on validation leads, weight 1)."""
    collaborative = [n for n in COLLABORATIVE if n in tuned]
    out = {}
    pairs = [("userlens", SEQUENTIAL), ("userlens without text", SEQUENTIAL_IDS)]
    if SEQUENTIAL not in tuned:  # no item text in this dataset: userlens is the ids-only model
        pairs = [("userlens", SEQUENTIAL_IDS)]
    for label, sequential in pairs:
        if sequential not in tuned:
            continue
        names = sorted([sequential, *collaborative], key=lambda n: -tuned[n].row["valid"][primary])
        out[label] = fuse({n: tuned[n] for n in names}, folds, ks, with_ranks, primary, seed).row
    return out


# --------------------------------------------------------------------------
# cold items
# --------------------------------------------------------------------------
class TextCosine:
    """Zero-shot: the cosine between the mean of a user's items' text embeddings and each item's."""

    def __init__(self, text: np.ndarray, fold: Fold) -> None:
        norms = np.linalg.norm(text, axis=1, keepdims=True)
        self.text = text / np.maximum(norms, 1e-12)
        self.histories = histories(fold)

    def scores(self, users: np.ndarray) -> np.ndarray:
        u = np.stack(
            [
                self.text[self.histories[int(x)]].mean(0)
                if len(self.histories[int(x)])
                else np.zeros(self.text.shape[1], np.float32)
                for x in users
            ]
        )
        u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
        return u @ self.text.T


class CategoryPopularity:
    """An item scores the fit data's number of interactions with items of its category."""

    def __init__(self, category: np.ndarray, fold: Fold) -> None:
        codes, names = pd_factorize(category)
        counts = np.bincount(
            codes[fold.fit["i"].to_numpy()][codes[fold.fit["i"].to_numpy()] >= 0], minlength=len(names)
        ).astype(float)
        self.item_scores = np.where(codes >= 0, counts[np.maximum(codes, 0)], -np.inf)

    def scores(self, users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.item_scores, (len(users), len(self.item_scores))).copy()


def pd_factorize(values: np.ndarray) -> tuple[np.ndarray, Any]:
    import pandas as pd

    return pd.factorize(pd.Series(values), use_na_sentinel=True)


COLD_TEXT, COLD_CATEGORY = "text cosine (zero-shot)", "category popularity"
COLD_SEQUENTIAL = "userlens: sequential (cold items by their text)"


def cold_methods(
    spark: "SparkSession",
    settings: Settings,
    items: "DataFrame",
    item_index: "pd.Index",
    folds: tuple[Fold, Fold],
    primary_k: int,
) -> list[Method]:
    """The cold-item protocol's rows: category popularity, zero-shot text cosine, and userlens'
    sequential component (the cold items known by their text alone; ``id_dropout`` from
    ``evaluate.cold_id_dropouts`` chosen on validation). :func:`cold_fused_row` fuses them."""
    rec = settings.train.recommend
    config = SequentialConfig.of(rec, settings.evaluate.seed)
    methods = []
    rows = {r["item_id"]: r["category"] for r in items.select("item_id", "category").collect()}
    category = np.array([rows.get(i) for i in item_index], dtype=object)
    if any(c is not None for c in category):
        methods.append(Method(COLD_CATEGORY, [{}], lambda fold, p: CategoryPopularity(category, fold)))
    text = item_text_vectors(spark, settings, items, item_index)
    methods.append(Method(COLD_TEXT, [{}], lambda fold, p: TextCosine(text, fold)))
    cold = np.zeros(len(item_index), bool)
    for fold in folds:
        assert fold.candidates is not None
        cold[fold.candidates] = True
    grid = [{"id_dropout": float(p)} for p in settings.evaluate.cold_id_dropouts]
    methods.append(
        sequential_method(
            COLD_SEQUENTIAL, config, text, reuse_for_test=True, primary_k=primary_k, unknown=cold, grid=grid
        )
    )
    return methods


def cold_fused_row(
    tuned: Mapping[str, Tuned], folds: tuple[Fold, Fold], ks: Sequence[int], primary: str, seed: int
) -> dict[str, dict[str, Any]]:
    """``userlens`` under cold-items: the sequential component fused with text cosine and category
    popularity (the best on validation leads at weight 1, the others' weights chosen on validation, so
    on the validation users it is never below its best component)."""
    names = [n for n in (COLD_SEQUENTIAL, COLD_TEXT, COLD_CATEGORY) if n in tuned]
    if COLD_SEQUENTIAL not in names:
        return {}
    names.sort(key=lambda n: -tuned[n].row["valid"][primary])
    return {"userlens": fuse({n: tuned[n] for n in names}, folds, ks, False, primary, seed).row}
