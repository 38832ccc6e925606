"""A model's quality by group of users: AUC (with its standard error), calibration (ECE) and the
recommender's recall@k on the test split, per activity decile and per published segment, so that a model
that works for heavy users and fails new ones is visible (``metrics.json`` ``by_group``; the report's
"Quality by segment" section).

* **activity**: deciles of the number of events before the cutoff over the test users (fewer, equal groups
  when the test split has fewer than ten times ``min_users`` users); equal counts stay in one group, so
  there may be fewer groups still (a group is labelled with its range of events).
* **segment**: each test user's nearest centroid of the published segment model (k-means over the user
  embeddings), from the user's embedding *as of the cutoff* (the snapshot's), so that the grouping uses
  nothing from the label window. Only segments that are published (at least ``privacy.min_segment_size``
  users overall) are shown.

In both, a group with fewer than ``min_users`` test users is left out and counted (``suppressed``): its
figures would be noise, and for segments its size alone is withheld by the privacy rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from userlens.models import metrics as M
from userlens.models.tasks import MULTICLASS_TASKS

ACTIVITY_FEATURE = "n_events"
DECILES = 10


@dataclass(frozen=True)
class Segments:
    """A published segment model as the quality by segment needs it (the holdout's ``segment`` is each user's
    nearest of ``centroids``)."""

    version: str
    centroids: np.ndarray  # (k, embedding dim)
    published: frozenset[int]  # the segment ids shown in profiles


@dataclass
class Holdout:
    """The test split's labels, the model's probabilities and what users are grouped by, one row per user;
    ``ranked`` / ``relevant``: the recommender's top k and the next purchases of the users it is judged on
    (``rec_rows``: their rows)."""

    labels: dict[str, np.ndarray]
    probs: dict[str, np.ndarray]
    activity: np.ndarray
    segment: np.ndarray | None  # each user's nearest centroid (:func:`nearest_segment`); None: no segment model
    ranked: list[list[int]]
    relevant: list[set[int]]
    rec_rows: np.ndarray


def activity_groups(activity: np.ndarray, groups: int = DECILES) -> tuple[np.ndarray, list[str]]:
    """Each user's activity decile (0 = the least active) and the groups' labels ("3-5 events"); users
    with the same activity share a group."""
    activity = np.asarray(activity, dtype=np.float64)
    if len(activity) == 0:
        return np.zeros(0, np.int64), []
    edges = np.unique(np.quantile(activity, np.arange(1, groups) / groups))
    index = np.searchsorted(edges, activity, side="left")  # group i: edges[i-1] < activity <= edges[i]
    present = np.unique(index)
    relabel = np.full(len(edges) + 1, -1, np.int64)
    relabel[present] = np.arange(len(present))
    names = []
    for g in present:
        lo, hi = activity[index == g].min(), activity[index == g].max()
        names.append(f"{lo:.0f} events" if lo == hi else f"{lo:.0f}-{hi:.0f} events")
    return relabel[index], names


def nearest_segment(embedding: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The index of each row's nearest centroid (squared Euclidean, as Spark MLlib's k-means assigns)."""
    x = np.asarray(embedding, np.float64)
    c = np.asarray(centroids, np.float64)
    distance = (x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
    return distance.argmin(1)


def group_rows(
    group: np.ndarray,
    names: Sequence[str],
    test: Holdout,
    tasks: Sequence[str],
    k: int,
    min_users: int,
) -> dict[str, Any]:
    """{"groups": [one row per group with at least ``min_users`` users], "suppressed": the others' count}:
    users, and per task AUC, its standard error, ECE and positives (binary) or accuracy (next_category);
    the recommender's recall@k over the group's users it is judged on."""
    rows, suppressed = [], 0
    rec_group = group[test.rec_rows] if len(test.rec_rows) else np.zeros(0, np.int64)
    for g, name in enumerate(names):
        mask = group == g
        users = int(mask.sum())
        if users == 0:
            continue
        if users < min_users:
            suppressed += 1
            continue
        row: dict[str, Any] = {"group": name, "users": users}
        for task in tasks:
            y, p = test.labels[task][mask], test.probs[task][mask]
            row[task] = _multiclass(y, p) if task in MULTICLASS_TASKS else _binary(y, p)
        if test.ranked:
            picked = np.flatnonzero(rec_group == g)
            ranked = [test.ranked[i] for i in picked]
            relevant = [test.relevant[i] for i in picked]
            row["recommend"] = (
                {f"recall@{k}": M.recall_at_k(ranked, relevant, k), "users": len(picked)}
                if len(picked) >= min_users
                else {"users": len(picked), "note": f"fewer than {min_users} users to judge"}
            )
        rows.append(row)
    return {"groups": rows, "suppressed": suppressed, "min_users": min_users}


def quality_by_group(
    test: Holdout, tasks: Sequence[str], k: int, min_users: int, segments: Segments | None
) -> dict[str, Any]:
    """``metrics.json``'s ``by_group``: the activity deciles, and the published segments where there is
    a segment model (else a note)."""
    # deciles where the test split has ten groups of min_users; fewer, equal groups where it is smaller
    quantiles = max(1, min(DECILES, len(test.activity) // max(1, min_users)))
    decile, names = activity_groups(test.activity, quantiles)
    out: dict[str, Any] = {"activity": {**group_rows(decile, names, test, tasks, k, min_users), "quantiles": quantiles}}
    if segments is None or test.segment is None:
        out["segment"] = {"note": "no published segment model yet (profile publishes one)"}
        return out
    nearest = test.segment
    shown = sorted(segments.published)
    index = {s: i for i, s in enumerate(shown)}
    group = np.array([index.get(int(s), -1) for s in nearest], np.int64)
    rows = group_rows(group, [f"segment {s}" for s in shown], test, tasks, k, min_users)
    rows["segment_model_version"] = segments.version
    rows["unpublished_users"] = int((group < 0).sum())
    out["segment"] = rows
    return out


def _binary(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    positives = int((y == 1).sum())
    out: dict[str, Any] = {
        "positives": positives,
        "rate": positives / len(y),
        "mean_score": float(p.mean()),
        "ece": M.expected_calibration_error(y, p),
    }
    if 0 < positives < len(y):
        auc = M.roc_auc(y, p)
        out.update(auc=auc, auc_se=M.roc_auc_se(auc, positives, len(y) - positives))
    return out


def _multiclass(y: np.ndarray, proba: np.ndarray) -> dict[str, Any]:
    labelled = y >= 0
    if not labelled.any():
        return {"labelled": 0}
    return {"labelled": int(labelled.sum()), "accuracy": M.accuracy(y[labelled], proba[labelled])}


def quality_line(by_group: dict[str, Any]) -> str:
    """One log line: each view's groups shown, and the range of the first binary task's AUC over them."""
    parts = []
    for view in ("activity", "segment"):
        found = by_group.get(view, {})
        rows = found.get("groups")
        if rows is None:
            parts.append(f"{view}: {found.get('note', 'none')}")
            continue
        text = f"{view}: {len(rows)} groups"
        first = rows[0] if rows else {}
        task = next((t for t, v in first.items() if isinstance(v, dict) and "ece" in v), None)
        aucs = [r[task]["auc"] for r in rows if task and "auc" in r[task]]
        if aucs:
            text += f", {task} AUC {min(aucs):.3f}-{max(aucs):.3f}"
        if found.get("suppressed"):
            text += f" ({found['suppressed']} under {found['min_users']} users left out)"
        parts.append(text)
    return "; ".join(parts)
