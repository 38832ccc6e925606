"""The ranking protocols' machinery: folds, methods tuned on validation, fusion, the metrics table.

Every method is a grid of settings and a fit (a fold, a setting -> something with
``scores(users) -> (users, n_items)``). Each setting is fitted on the validation fold (the fit
data without the validation targets) and scored on it; the setting with the best validation
``PRIMARY`` metric is refitted on the test fold (fit data with the validation targets) and the
test split is scored once with it. A fit may choose more on validation itself (a neural model's
epochs by early stopping): it returns that as ``chosen`` and the test fit uses it. The table says
which setting won and gives every metric with its standard error over users.

Userlens' own components are methods too (:mod:`userlens.eval.recommenders`); the shipped userlens
model fuses the components' per-user normalised scores with weights chosen on validation
(:func:`fuse`).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from userlens.eval.baselines import rank_batch
from userlens.models import metrics as M
from userlens.models.als import FUSION_WEIGHTS, standardised

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

SCORE_CELLS = 20_000_000  # users x items scored per batch
FUSION_USERS = 3000  # validation users the fusion weights are fitted on (a seeded sample above this)
FUSION_GRID = FUSION_WEIGHTS  # the train stage's fusion tries the same weights


@dataclass
class Fold:
    """One fit/target pair of a protocol: ``fit`` rows (user, item, ts, u, i, and score where the protocol
    has one; chronological per user)
    and, per evaluated user, the held-out targets and the fitted items (removed from the ranking)."""

    name: str
    fit: "pd.DataFrame"
    users: np.ndarray
    targets: list[np.ndarray]
    seen: list[np.ndarray]
    n_users: int
    n_items: int
    candidates: np.ndarray | None = None  # the items that are ranked (None: every item)


def make_folds(frame: "pd.DataFrame", n_users: int, n_items: int, cold: bool = False) -> tuple[Fold, Fold]:
    """(valid, test): fit on 'train', target 'valid'; fit on 'train' + 'valid', target 'test'. With
    ``cold`` both folds fit on 'train' only and rank only their targets' items (the cold items)."""

    def fold(name: str, fit_splits: tuple[str, ...], target_split: str) -> Fold:
        fit = frame[frame["split"].isin(fit_splits)]
        held = frame[frame["split"] == target_split]
        targets = held.groupby("u")["i"].apply(lambda s: s.to_numpy())
        seen = fit[fit["u"].isin(targets.index)].groupby("u")["i"].apply(lambda s: np.unique(s.to_numpy()))
        if cold:  # a user is evaluated on cold items only with a history to go on
            targets = targets[targets.index.isin(seen.index)]
        users = targets.index.to_numpy()
        return Fold(
            name,
            fit[[c for c in ("user", "item", "ts", "u", "i", "score") if c in fit.columns]],
            users,
            list(targets),
            [seen.get(u, np.array([], np.int64)) for u in users],
            n_users,
            n_items,
            np.unique(held["i"].to_numpy()) if cold else None,
        )

    return fold("valid", ("train",), "valid"), fold("test", ("train",) if cold else ("train", "valid"), "test")


@dataclass(frozen=True)
class Method:
    """A row of the table: its grid of settings and how to fit one on a fold."""

    name: str
    grid: Sequence[Mapping[str, Any]]
    fit: Callable[[Fold, Mapping[str, Any]], Any]
    component: str | None = None  # the userlens component it is (fused by the userlens row)


@dataclass
class Tuned:
    """A method after tuning: its table row and its fitted models on both folds."""

    row: dict[str, Any]
    models: dict[str, Any] = field(default_factory=dict)


def setting_label(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "-"


def fold_metrics(model: Any, fold: Fold, ks: Sequence[int], with_ranks: bool) -> dict[str, float]:
    """The fold's ranking metrics of ``model`` (with standard errors), MRR from exact full-ranking ranks."""
    return _metrics(lambda users: model.scores(users), fold, ks, with_ranks)


def _metrics(scores: Callable[[np.ndarray], np.ndarray], fold: Fold, ks: Sequence[int], with_ranks: bool) -> dict:
    batch = max(1, min(4096, SCORE_CELLS // max(fold.n_items, 1)))
    if fold.candidates is not None:  # rank the candidates only: every other item scores -inf (as if seen)
        inner = scores
        outside = np.setdiff1d(np.arange(fold.n_items), fold.candidates)

        def scores(users: np.ndarray) -> np.ndarray:
            s = np.array(inner(users), dtype=np.float64)
            s[:, outside] = -np.inf
            return s

    tops: list[list[int]] = []
    ranks: list[np.ndarray] = []
    for start in range(0, len(fold.users), batch):
        end = start + batch
        t, r = rank_batch(
            scores(fold.users[start:end]),
            fold.seen[start:end],
            fold.targets[start:end] if with_ranks else None,
            max(ks),
        )
        tops.extend(t)
        ranks.append(r)
    values = M.ranking_metrics(tops, [set(t.tolist()) for t in fold.targets], ks)
    if with_ranks:
        reciprocal = np.where(np.isfinite(r := np.concatenate(ranks)), 1.0 / r, 0.0)
        values["mrr"], values["mrr_se"] = float(reciprocal.mean()), M.standard_error(reciprocal)
    else:
        values.pop("mrr", None)
        values.pop("mrr_se", None)
    return values


def tune(method: Method, folds: tuple[Fold, Fold], ks: Sequence[int], with_ranks: bool, primary: str) -> Tuned:
    """Each setting fitted and scored on the validation fold; the best refitted on the test fold and scored
    once (module docstring)."""
    valid, test = folds
    started = time.perf_counter()
    trials = []
    for params in method.grid:
        model = method.fit(valid, params)
        metrics = fold_metrics(model, valid, ks, with_ranks)
        trials.append((dict(params), metrics, model))
        log.info("evaluate: %s %s: valid %s %.4f", method.name, setting_label(params), primary, metrics[primary])
    params, valid_metrics, valid_model = max(trials, key=lambda t: t[1][primary])  # ties: the first
    params = {**params, **getattr(valid_model, "chosen", {})}
    test_model = method.fit(test, params)
    row = {
        **fold_metrics(test_model, test, ks, with_ranks),
        "valid": valid_metrics,
        "setting": setting_label(params),
        "grid": [(setting_label(p), m[primary]) for p, m, _ in trials],
        "seconds": time.perf_counter() - started,
    }
    return Tuned(row, {"valid": valid_model, "test": test_model})


def subsample(fold: Fold, n: int, seed: int) -> Fold:
    """The fold with a seeded sample of at most ``n`` of its evaluated users (in their order)."""
    pick = np.sort(np.random.default_rng(seed).choice(len(fold.users), min(n, len(fold.users)), replace=False))
    return Fold(
        fold.name,
        fold.fit,
        fold.users[pick],
        [fold.targets[i] for i in pick],
        [fold.seen[i] for i in pick],
        fold.n_users,
        fold.n_items,
        fold.candidates,
    )


# --------------------------------------------------------------------------
# fusion
# --------------------------------------------------------------------------
def normalised(scores: np.ndarray, seen: Sequence[np.ndarray], candidates: np.ndarray | None = None) -> torch.Tensor:
    """Per user, the scores standardised over the items that can be ranked (seen items, and items
    outside ``candidates`` where given, -inf); the train stage's fusion standardises the same way."""
    s = torch.as_tensor(np.asarray(scores, np.float32))
    mask = torch.zeros_like(s, dtype=torch.bool)
    if candidates is not None:
        mask[:] = True
        mask[:, torch.as_tensor(candidates, dtype=torch.long)] = False
    for row, items in enumerate(seen):
        mask[row, torch.as_tensor(items, dtype=torch.long)] = True
    return standardised(torch.nan_to_num(s, nan=0.0, neginf=0.0, posinf=0.0), mask)


class Fused:
    """Weighted sum of components' normalised scores."""

    def __init__(self, models: Sequence[Any], weights: Sequence[float], fold: Fold) -> None:
        self.models, self.weights = list(models), list(weights)
        self.seen = dict(zip(fold.users.tolist(), fold.seen))
        self.candidates = fold.candidates

    def scores(self, users: np.ndarray) -> np.ndarray:
        seen = [self.seen.get(int(u), np.array([], np.int64)) for u in users]
        total = None
        for model, w in zip(self.models, self.weights):
            if w:
                part = w * normalised(model.scores(users), seen, self.candidates)
                total = part if total is None else total + part
        assert total is not None
        return total.numpy()


def fuse(
    components: Mapping[str, Tuned],
    folds: tuple[Fold, Fold],
    ks: Sequence[int],
    with_ranks: bool,
    primary: str,
    seed: int = 13,
) -> Tuned:
    """The fusion of ``components`` (first one's weight fixed at 1): weights by coordinate ascent over
    FUSION_GRID on (a sample of) the validation users, then the test fold scored once with them."""
    valid, test = folds
    started = time.perf_counter()
    names = list(components)
    sample = subsample(valid, FUSION_USERS, seed)
    parts = [
        normalised(components[n].models["valid"].scores(sample.users), sample.seen, sample.candidates) for n in names
    ]

    def value(weights: Sequence[float]) -> float:
        total = sum((w * p for w, p in zip(weights, parts) if w), torch.zeros_like(parts[0]))

        def scores(users: np.ndarray) -> np.ndarray:
            return total[np.searchsorted(sample.users, users)].numpy()

        return _metrics(scores, sample, ks, False)[primary]

    weights = [1.0] + [0.0] * (len(names) - 1)
    best = value(weights)
    for _ in range(3):
        changed = False
        for j, w in itertools.product(range(1, len(names)), FUSION_GRID):
            if w == weights[j]:
                continue
            trial = [*weights[:j], w, *weights[j + 1 :]]
            v = value(trial)
            if v > best + 1e-9:
                best, weights, changed = v, trial, True
        if not changed:
            break
    fused_valid = Fused([components[n].models["valid"] for n in names], weights, valid)
    fused_test = Fused([components[n].models["test"] for n in names], weights, test)
    row = {
        **fold_metrics(fused_test, test, ks, with_ranks),
        "valid": fold_metrics(fused_valid, valid, ks, with_ranks),
        "setting": ", ".join(f"{n} {w:g}" for n, w in zip(names, weights) if w),
        "seconds": time.perf_counter() - started + sum(components[n].row["seconds"] for n in names),
    }
    return Tuned(row, {"valid": fused_valid, "test": fused_test})
