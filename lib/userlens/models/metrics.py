"""Evaluation metrics in plain numpy: binary classification, multiclass and top-N ranking.

Used by the train stage and ``userlens evaluate``; no Spark and no scikit-learn
at runtime. Scalar metrics return python floats. Bad input (empty, different
lengths, labels that are not 0/1, probabilities outside [0, 1], non-finite
scores) raises :class:`MetricInputError`, a ``ValueError`` whose message names
the metric and the problem. The binary and multiclass metrics equal
scikit-learn's (``roc_auc_score``, ``average_precision_score``, ``log_loss``,
``top_k_accuracy_score``), and ``ndcg_at_k`` equals ``ndcg_score`` for binary
relevance and untied scores; tests/test_metrics.py checks each against it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Sequence

import numpy as np
import numpy.typing as npt

from userlens.errors import UserlensError

Ranked = Sequence[Sequence[Hashable]] | np.ndarray
Relevant = Sequence[Collection[Hashable]]


class MetricInputError(UserlensError, ValueError):
    """Metric inputs are empty, of different lengths or out of range; the message says which."""


# --- input checks --------------------------------------------------------------------------------


def _binary_inputs(name: str, y: npt.ArrayLike, p: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y_arr, p_arr = np.asarray(y), np.asarray(p, dtype=float)
    if y_arr.ndim != 1 or p_arr.ndim != 1:
        raise MetricInputError(f"{name}: y and p must be 1-D, got shapes {y_arr.shape} and {p_arr.shape}")
    if len(y_arr) != len(p_arr):
        raise MetricInputError(f"{name}: y and p differ in length ({len(y_arr)} vs {len(p_arr)})")
    if len(y_arr) == 0:
        raise MetricInputError(f"{name}: empty input")
    if y_arr.dtype.kind not in "biuf" or not np.isin(y_arr, (0, 1)).all():
        raise MetricInputError(f"{name}: y must hold 0/1 labels, got values {np.unique(y_arr)[:5].tolist()}")
    if not np.isfinite(p_arr).all():
        raise MetricInputError(f"{name}: p has {int((~np.isfinite(p_arr)).sum())} non-finite value(s)")
    return y_arr.astype(float), p_arr


def _both_classes(name: str, y: np.ndarray) -> tuple[int, int]:
    positives = int(y.sum())
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        raise MetricInputError(f"{name}: needs both classes, got {positives} positive(s) and {negatives} negative(s)")
    return positives, negatives


def _probabilities(name: str, p: np.ndarray) -> None:
    if p.min() < 0.0 or p.max() > 1.0:
        raise MetricInputError(f"{name}: p must lie in [0, 1], got range [{p.min():g}, {p.max():g}]")


def _positive_int(name: str, what: str, value: int) -> None:
    if int(value) != value or value < 1:
        raise MetricInputError(f"{name}: {what} must be a positive integer, got {value!r}")


# --- binary classification -----------------------------------------------------------------------


def roc_auc(y: npt.ArrayLike, p: npt.ArrayLike) -> float:
    """Area under the ROC curve, as Mann-Whitney U with average ranks for tied scores."""
    y_arr, p_arr = _binary_inputs("roc_auc", y, p)
    positives, negatives = _both_classes("roc_auc", y_arr)
    _, inverse, counts = np.unique(p_arr, return_inverse=True, return_counts=True)
    # 1-based rank of each distinct score: the midpoint of the run of ranks its ties occupy
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = average_rank[inverse.ravel()][y_arr == 1].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def roc_auc_se(auc: float, positives: int, negatives: int) -> float:
    """The standard error of a ROC AUC (Hanley & McNeil 1982, exponential approximation)."""
    if positives < 1 or negatives < 1:
        return 0.0
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc)) / (
        positives * negatives
    )
    return float(np.sqrt(max(var, 0.0)))


def pr_auc(y: npt.ArrayLike, p: npt.ArrayLike) -> float:
    """Average precision: sum over distinct score thresholds of (recall gained) x (precision there)."""
    y_arr, p_arr = _binary_inputs("pr_auc", y, p)
    positives = int(y_arr.sum())
    if positives == 0:
        raise MetricInputError(f"pr_auc: needs at least one positive, got 0 of {len(y_arr)}")
    order = np.argsort(-p_arr, kind="stable")
    p_sorted = p_arr[order]
    # tied scores form one threshold: cut after the last row of each run of equal scores
    cut = np.r_[np.flatnonzero(np.diff(p_sorted)), len(p_sorted) - 1]
    true_pos = np.cumsum(y_arr[order])[cut]
    precision = true_pos / (cut + 1)
    return float(np.sum(np.diff(true_pos, prepend=0.0) / positives * precision))


def log_loss(y: npt.ArrayLike, p: npt.ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy in nats, p clipped to [eps, 1 - eps] so 0 and 1 stay finite."""
    y_arr, p_arr = _binary_inputs("log_loss", y, p)
    _probabilities("log_loss", p_arr)
    if not 0.0 < eps < 0.5:
        raise MetricInputError(f"log_loss: eps must lie in (0, 0.5), got {eps!r}")
    clipped = np.clip(p_arr, eps, 1.0 - eps)
    return float(-np.mean(y_arr * np.log(clipped) + (1.0 - y_arr) * np.log1p(-clipped)))


def calibration_curve(y: npt.ArrayLike, p: npt.ArrayLike, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty bin, ascending: (mean p, observed fraction positive, row count); bins as in ECE."""
    y_arr, p_arr = _binary_inputs("calibration_curve", y, p)
    _probabilities("calibration_curve", p_arr)
    _positive_int("calibration_curve", "bins", bins)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # digitize on the inner edges: bin i holds edges[i] <= p < edges[i+1], and p == 1.0 the last bin
    index = np.digitize(p_arr, edges[1:-1])
    count = np.bincount(index, minlength=bins)
    sum_p = np.bincount(index, weights=p_arr, minlength=bins)
    sum_y = np.bincount(index, weights=y_arr, minlength=bins)
    kept = count > 0
    return sum_p[kept] / count[kept], sum_y[kept] / count[kept], count[kept]


def expected_calibration_error(y: npt.ArrayLike, p: npt.ArrayLike, bins: int = 10) -> float:
    """Row-weighted mean |mean(p) - mean(y)| over bins [i/bins, (i+1)/bins), the last closed at 1.0."""
    mean_p, observed, count = calibration_curve(y, p, bins)
    return float(np.sum(count * np.abs(mean_p - observed)) / count.sum())


def binary_metrics(y: npt.ArrayLike, p: npt.ArrayLike) -> dict[str, float]:
    """auc, pr_auc, log_loss, ece (10 bins), n and positives for 0/1 labels y and probabilities p."""
    y_arr, p_arr = _binary_inputs("binary_metrics", y, p)
    return {
        "auc": roc_auc(y_arr, p_arr),
        "pr_auc": pr_auc(y_arr, p_arr),
        "log_loss": log_loss(y_arr, p_arr),
        "ece": expected_calibration_error(y_arr, p_arr),
        "n": len(y_arr),
        "positives": int(y_arr.sum()),
    }


# --- multiclass ----------------------------------------------------------------------------------


def _multiclass_inputs(name: str, y: npt.ArrayLike, proba: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y_arr, scores = np.asarray(y), np.asarray(proba, dtype=float)
    if y_arr.size == 0 or scores.size == 0:
        raise MetricInputError(f"{name}: empty input")
    if y_arr.ndim != 1 or scores.ndim != 2:
        raise MetricInputError(
            f"{name}: y must be 1-D and proba 2-D (n, classes), got shapes {y_arr.shape} and {scores.shape}"
        )
    if len(y_arr) != len(scores):
        raise MetricInputError(f"{name}: y and proba differ in length ({len(y_arr)} vs {len(scores)})")
    if y_arr.dtype.kind not in "iu" or y_arr.min() < 0 or y_arr.max() >= scores.shape[1]:
        raise MetricInputError(f"{name}: y must hold class indices 0..{scores.shape[1] - 1}")
    if not np.isfinite(scores).all():
        raise MetricInputError(f"{name}: proba has {int((~np.isfinite(scores)).sum())} non-finite value(s)")
    return y_arr, scores


def accuracy(y: npt.ArrayLike, proba: npt.ArrayLike) -> float:
    """Fraction of rows whose highest score is the true class index (ties go to the lower index)."""
    y_arr, scores = _multiclass_inputs("accuracy", y, proba)
    return float(np.mean(scores.argmax(axis=1) == y_arr))


def top_k_accuracy(y: npt.ArrayLike, proba: npt.ArrayLike, k: int = 3) -> float:
    """Fraction of rows whose true class is among the k highest scores (ties rank the lower index first)."""
    y_arr, scores = _multiclass_inputs("top_k_accuracy", y, proba)
    _positive_int("top_k_accuracy", "k", k)
    true_score = scores[np.arange(len(y_arr)), y_arr][:, None]
    lower_index = np.arange(scores.shape[1])[None, :] < y_arr[:, None]
    # the same tie rule as argmax, so k=1 equals accuracy()
    ahead = (scores > true_score) | ((scores == true_score) & lower_index)
    return float(np.mean(ahead.sum(axis=1) < k))


def multiclass_metrics(y: npt.ArrayLike, proba: npt.ArrayLike) -> dict[str, float]:
    """accuracy, top3_accuracy and n for class indices y and (n, classes) scores proba."""
    return {"accuracy": accuracy(y, proba), "top3_accuracy": top_k_accuracy(y, proba, 3), "n": len(np.asarray(y))}


# --- ranking -------------------------------------------------------------------------------------
# Per user: `gains` is 1.0 at each rank holding a relevant item not already seen higher up (so a
# repeated item counts once), cut at k. A ranking shorter than k still divides precision by k.


def _gains(ranking: Sequence[Hashable], relevant: Collection[Hashable], k: int | None) -> np.ndarray:
    seen: set[Hashable] = set()
    gains = np.zeros(len(ranking[:k]))
    for rank, item in enumerate(ranking[:k]):
        if item in relevant and item not in seen:
            gains[rank] = 1.0
        seen.add(item)
    return gains


def _discounted(gains: np.ndarray) -> float:
    return float(np.sum(gains / np.log2(np.arange(2, len(gains) + 2))))


def _ndcg(gains: np.ndarray, n_relevant: int, k: int) -> float:
    return _discounted(gains) / _discounted(np.ones(min(n_relevant, k)))


def _average_precision(gains: np.ndarray, n_relevant: int, k: int) -> float:
    precision_at_rank = np.cumsum(gains) / np.arange(1, len(gains) + 1)
    return float(np.sum(gains * precision_at_rank) / min(n_relevant, k))


_AT_K: dict[str, Callable[[np.ndarray, int, int], float]] = {
    "hr": lambda gains, n_relevant, k: float(gains.any()),
    "recall": lambda gains, n_relevant, k: float(gains.sum() / n_relevant),
    "precision": lambda gains, n_relevant, k: float(gains.sum() / k),
    "ndcg": _ndcg,
    "map": _average_precision,
}


def _users(name: str, ranked: Ranked, relevant: Relevant) -> list[tuple[list[Hashable], set[Hashable]]]:
    if isinstance(ranked, np.ndarray) and ranked.ndim != 2:
        raise MetricInputError(f"{name}: ranked must be 2-D (users, ranks), got shape {ranked.shape}")
    rows = ranked.tolist() if isinstance(ranked, np.ndarray) else list(ranked)
    relevant_sets = [set(r) for r in relevant]
    if len(rows) != len(relevant_sets):
        raise MetricInputError(f"{name}: ranked has {len(rows)} user(s), relevant has {len(relevant_sets)}")
    if not rows:
        raise MetricInputError(f"{name}: empty input")
    users = [(list(row), rel) for row, rel in zip(rows, relevant_sets) if rel]
    if not users:
        raise MetricInputError(f"{name}: all {len(rows)} user(s) have an empty relevant set")
    return users


def _mean_at_k(name: str, metric: str, ranked: Ranked, relevant: Relevant, k: int) -> float:
    _positive_int(name, "k", k)
    per_user = _AT_K[metric]
    users = _users(name, ranked, relevant)
    return float(np.mean([per_user(_gains(row, rel, k), len(rel), k) for row, rel in users]))


def hit_rate_at_k(ranked: Ranked, relevant: Relevant, k: int) -> float:
    """Mean over users with relevant items of 1 if any relevant item is in the top k, else 0."""
    return _mean_at_k("hit_rate_at_k", "hr", ranked, relevant, k)


def recall_at_k(ranked: Ranked, relevant: Relevant, k: int) -> float:
    """Mean over users with relevant items of |relevant & top k| / |relevant|."""
    return _mean_at_k("recall_at_k", "recall", ranked, relevant, k)


def precision_at_k(ranked: Ranked, relevant: Relevant, k: int) -> float:
    """Mean over users with relevant items of |relevant & top k| / k."""
    return _mean_at_k("precision_at_k", "precision", ranked, relevant, k)


def ndcg_at_k(ranked: Ranked, relevant: Relevant, k: int) -> float:
    """Mean binary-relevance NDCG@k, discount 1/log2(rank + 1); the ideal DCG has min(|relevant|, k) hits."""
    return _mean_at_k("ndcg_at_k", "ndcg", ranked, relevant, k)


def map_at_k(ranked: Ranked, relevant: Relevant, k: int) -> float:
    """Mean of average_precision_at_k over users with relevant items (normalised by min(|relevant|, k))."""
    return _mean_at_k("map_at_k", "map", ranked, relevant, k)


def average_precision_at_k(ranking: Sequence[Hashable], relevant: Collection[Hashable], k: int) -> float:
    """One user's AP@k: sum of precision@i at each relevant rank i <= k, divided by min(|relevant|, k)."""
    _positive_int("average_precision_at_k", "k", k)
    rel = set(relevant)
    if not rel:
        raise MetricInputError("average_precision_at_k: the relevant set is empty")
    return _average_precision(_gains(list(ranking), rel, k), len(rel), k)


def _reciprocal_rank(gains: np.ndarray) -> float:
    hits = np.flatnonzero(gains)
    return 1.0 / (hits[0] + 1) if len(hits) else 0.0


def mrr(ranked: Ranked, relevant: Relevant) -> float:
    """Mean reciprocal rank of each user's first relevant item in the full ranking given (0 if none)."""
    users = _users("mrr", ranked, relevant)
    return float(np.mean([_reciprocal_rank(_gains(row, rel, None)) for row, rel in users]))


def mrr_from_ranks(first_ranks: npt.ArrayLike) -> float:
    """Mean reciprocal rank from each user's 1-based rank of their first relevant item in a full ranking
    (``inf``: never ranked, counts 0). Equals :func:`mrr` given the full rankings, without building them."""
    ranks = np.asarray(first_ranks, dtype=float)
    if ranks.ndim != 1 or len(ranks) == 0:
        raise MetricInputError(f"mrr_from_ranks: needs a non-empty 1-D array of ranks, got shape {ranks.shape}")
    finite = ranks[np.isfinite(ranks)]
    if np.isnan(ranks).any() or (finite < 1).any() or (finite != np.floor(finite)).any():
        raise MetricInputError("mrr_from_ranks: ranks must be integers >= 1 (or inf for never ranked)")
    return float(np.mean(np.where(np.isfinite(ranks), 1.0 / ranks, 0.0)))


def ranking_metrics(ranked: Ranked, relevant: Relevant, ks: Sequence[int] = (5, 10, 20)) -> dict[str, float]:
    """hr@k, recall@k, precision@k, ndcg@k, map@k for each k in ks, plus mrr and users (those evaluated);
    each metric's standard error over users as ``<metric>_se``."""
    for k in ks:
        _positive_int("ranking_metrics", "k", k)
    users = _users("ranking_metrics", ranked, relevant)
    # a user's gains at k are the first k of its full-ranking gains, so compute them once
    full = [(_gains(row, rel, None), len(rel)) for row, rel in users]
    result: dict[str, float] = {}
    for k in ks:
        for metric, per_user in _AT_K.items():
            values = np.array([per_user(g[:k], n, k) for g, n in full])
            result[f"{metric}@{k}"], result[f"{metric}@{k}_se"] = float(values.mean()), standard_error(values)
    reciprocal = np.array([_reciprocal_rank(g) for g, _ in full])
    result["mrr"], result["mrr_se"] = float(reciprocal.mean()), standard_error(reciprocal)
    result["users"] = len(users)
    return result


def standard_error(values: npt.ArrayLike) -> float:
    """The standard error of the mean of per-user values (sample standard deviation / sqrt(n); 0 for n < 2)."""
    v = np.asarray(values, dtype=float)
    return float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


# --- distributions -----------------------------------------------------------------------------------


def population_stability_index(expected: npt.ArrayLike, actual: npt.ArrayLike, floor: float = 1e-4) -> float:
    """PSI = sum over bins of (a - e) * ln(a / e), with e and a the bins' shares of each population's count
    (shares below ``floor`` raised to it, so an empty bin does not make it infinite)."""
    e = np.maximum(np.asarray(expected, dtype=float) / max(float(np.sum(expected)), 1.0), floor)
    a = np.maximum(np.asarray(actual, dtype=float) / max(float(np.sum(actual)), 1.0), floor)
    return float(np.sum((a - e) * np.log(a / e)))
