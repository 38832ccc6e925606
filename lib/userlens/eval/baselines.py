"""Recommendation baselines and full ranking for ``userlens evaluate`` (numpy + torch, no Spark).

Every model scores all items for a batch of users (``scores(users) -> (B, n_items)``) on one
integer index space; :func:`rank_batch` removes each user's seen items, takes the top k with
ties broken by the lower item index, and gives the exact full-ranking rank of the held-out
items under the same tie rule. An item a model cannot score (score ``-inf`` or NaN, e.g. no ALS
factor) ranks after every item it can, still by index.

* :class:`Popularity`: interaction counts in the fit data.
* :class:`FactorScores`: ``U @ V.T`` from factor matrices (Spark MLlib ALS fits them).
* :class:`ItemKNN`: SAR-style item-to-item co-occurrence, Jaccard-normalised, the ``neighbors``
  most similar items kept per item; a user's score is their time-decayed affinity to their
  items (``0.5 ** (age / half_life)``, age from the user's own latest event) times the similarity.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

UNSCORED = -1e300  # below any real score, above removed (seen) items


class Popularity:
    """Items by their number of interactions in the fit data, the same list for every user."""

    def __init__(self, users: np.ndarray, items: np.ndarray, n_items: int) -> None:
        self.counts = np.bincount(items, minlength=n_items).astype(np.float64)

    def scores(self, users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(users), len(self.counts))).copy()


class FactorScores:
    """Dot products of user and item factors; a NaN row (no factor) scores nothing."""

    def __init__(self, user_factors: np.ndarray, item_factors: np.ndarray) -> None:
        self.user_factors = user_factors
        self.item_factors = item_factors

    def scores(self, users: np.ndarray) -> np.ndarray:
        return self.user_factors[users] @ self.item_factors.T


class ItemKNN:
    """SAR-style: Jaccard co-occurrence of items within users' newest ``history`` distinct items."""

    def __init__(
        self,
        users: np.ndarray,
        items: np.ndarray,
        ts: np.ndarray,
        n_users: int,
        n_items: int,
        half_life_days: float | None = 30.0,
        neighbors: int = 100,
        history: int = 200,
    ) -> None:
        self.n_items = n_items
        users, items, ts = np.asarray(users, np.int64), np.asarray(items, np.int64), np.asarray(ts, np.int64)
        # affinity: every event counts, decayed by its age relative to the user's latest event
        if half_life_days is None:
            weight = np.ones(len(users))
        else:
            latest = np.full(n_users, np.iinfo(np.int64).min)
            np.maximum.at(latest, users, ts)
            weight = 0.5 ** ((latest[users] - ts) / (half_life_days * 86400.0))
        self.affinity = _coalesce(users, items, weight, (n_users, n_items))

        # co-occurrence over each user's newest `history` distinct items (caps power users)
        order = np.lexsort((-ts, users))
        u_sorted, i_sorted = users[order], items[order]
        first = _first_occurrence(u_sorted * n_items + i_sorted)
        u_d, i_d = u_sorted[first], i_sorted[first]
        keep = _rank_within(u_d) < history
        # torch documents the indices as array_like (ndarray included); its stub says Tensor
        x = torch.sparse_coo_tensor(
            np.vstack([u_d[keep], i_d[keep]]),  # type: ignore[arg-type]
            torch.ones(int(keep.sum())),
            (n_users, n_items),
            check_invariants=True,
        ).coalesce()
        with warnings.catch_warnings():  # torch calls its sparse x sparse product "beta"
            warnings.simplefilter("ignore", UserWarning)
            co = torch.sparse.mm(x.t().coalesce(), x).coalesce()
        rows, cols = co.indices().numpy()
        counts = co.values().numpy().astype(np.float64)
        occurrences = np.zeros(n_items)
        diagonal = rows == cols
        occurrences[rows[diagonal]] = counts[diagonal]
        off = ~diagonal
        rows, cols, counts = rows[off], cols[off], counts[off]
        jaccard = counts / (occurrences[rows] + occurrences[cols] - counts)
        # the `neighbors` most similar items of each item (ties: lower index first)
        order = np.lexsort((cols, -jaccard, rows))
        rows, cols, jaccard = rows[order], cols[order], jaccard[order]
        keep = _rank_within(rows) < neighbors
        # stored transposed: scores.T = S.T @ affinity.T
        self.similarity_t = torch.sparse_coo_tensor(
            np.vstack([cols[keep], rows[keep]]),  # type: ignore[arg-type]
            torch.from_numpy(jaccard[keep]),
            (n_items, n_items),
            check_invariants=True,
        ).coalesce()

    def scores(self, users: np.ndarray) -> np.ndarray:
        dense = np.zeros((len(users), self.n_items))
        indptr, indices, values = self.affinity
        for row, user in enumerate(users):
            start, end = indptr[user], indptr[user + 1]
            dense[row, indices[start:end]] = values[start:end]
        return torch.sparse.mm(self.similarity_t, torch.from_numpy(dense.T.copy())).numpy().T


def _first_occurrence(keys: np.ndarray) -> np.ndarray:
    """Positions of the first occurrence of each key (in array order)."""
    _, first = np.unique(keys, return_index=True)
    return np.sort(first)


def _rank_within(groups: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal values of a grouped (sorted) array."""
    starts = np.r_[0, np.flatnonzero(np.diff(groups)) + 1]
    lengths = np.diff(np.r_[starts, len(groups)])
    return np.arange(len(groups)) - np.repeat(starts, lengths)


def _coalesce(
    rows: np.ndarray, cols: np.ndarray, values: np.ndarray, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, indices, data) of the row-compressed sum of duplicate (row, col) entries."""
    keys = rows * shape[1] + cols
    unique, inverse = np.unique(keys, return_inverse=True)
    data = np.bincount(inverse.ravel(), weights=values)
    r, c = unique // shape[1], unique % shape[1]
    indptr = np.r_[0, np.cumsum(np.bincount(r, minlength=shape[0]))]
    return indptr, c, data


def rank_batch(
    scores: np.ndarray, seen: Sequence[np.ndarray], targets: Sequence[np.ndarray] | None, k: int
) -> tuple[list[list[int]], np.ndarray]:
    """Top-``k`` item indices per user (best first, seen items removed, ties by lower index) and the
    1-based full-ranking rank of each user's best-placed target (inf when all its targets were seen).

    ``scores`` is (users, n_items); ``seen[u]`` and ``targets[u]`` are item-index arrays.
    """
    s = np.array(scores, dtype=np.float64)
    s[~np.isfinite(s) & ~(s == np.inf)] = UNSCORED  # -inf and NaN: the model cannot score the item
    for row, items in enumerate(seen):
        s[row, items] = -np.inf
    n_items = s.shape[1]
    kk = min(k, n_items)
    kth = np.partition(s, n_items - kk, axis=1)[:, n_items - kk]
    index = np.arange(n_items)
    tops: list[list[int]] = []
    ranks = np.full(len(s), np.inf)
    for row in range(len(s)):
        r = s[row]
        candidates = np.flatnonzero((r >= kth[row]) & (r > -np.inf))
        order = np.lexsort((candidates, -r[candidates]))
        tops.append(candidates[order[:kk]].tolist())
        if targets is None:
            continue
        t = np.asarray(targets[row], np.int64)
        t = t[r[t] > -np.inf]
        if len(t):
            eligible = r > -np.inf
            st = r[t][:, None]
            ahead = eligible[None, :] & ((r[None, :] > st) | ((r[None, :] == st) & (index[None, :] < t[:, None])))
            ranks[row] = ahead.sum(axis=1).min() + 1
    return tops, ranks
