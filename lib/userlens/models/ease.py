"""EASE (Steck 2019): a closed-form item-item model, ``B = I - P / diag(P)`` with ``P = (X'X + lambda I)^-1``.

A user's scores are their interaction row times ``B``. It needs the dense item x item matrix: memory
``8 n_items^2`` bytes while fitting (float64) and ``4 n_items^2`` after, time ``O(n_items^3)`` once
plus ``O(users x n_items^2)`` to score; above ``max_items`` items it refuses with one line instead of
running out of memory (torch and numpy only, no Spark).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from userlens.errors import UserlensError


class CatalogueTooLarge(UserlensError):
    """The catalogue is too large for EASE's dense item x item matrix."""


class EASE:
    """Fit on (user, item) index pairs; :meth:`scores` for a batch of users, seen items not removed."""

    def __init__(self, lam: float = 300.0, max_items: int = 20_000) -> None:
        self.lam, self.max_items = lam, max_items
        self.B: torch.Tensor | None = None
        self.history: list[np.ndarray] = []
        self.weights: list[np.ndarray] = []  # the users' row values, beside history

    def fit(
        self, users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, values: np.ndarray | None = None
    ) -> EASE:
        """``values`` (one per pair row): the matrix holds each (user, item)'s mean value; None: binary."""
        if n_items > self.max_items:
            gib = 8 * n_items**2 / 2**30
            raise CatalogueTooLarge(
                f"EASE: {n_items:,} items need a dense {n_items:,} x {n_items:,} matrix ({gib:.1f} GiB to fit), "
                f"above train.recommend.ease_max_items={self.max_items:,}; raise it or leave EASE out"
            )
        pairs, inverse = np.unique(np.stack([users, items], 1).astype(np.int64), axis=0, return_inverse=True)
        inverse = inverse.ravel()
        if values is None:
            weight = np.ones(len(pairs))
        else:
            total = np.bincount(inverse, weights=np.asarray(values, np.float64), minlength=len(pairs))
            weight = total / np.bincount(inverse, minlength=len(pairs))
        x = torch.sparse_coo_tensor(
            torch.from_numpy(pairs.T.copy()), torch.from_numpy(weight), (n_users, n_items)
        ).coalesce()
        gram = torch.sparse.mm(x.t(), x).to_dense()
        gram.diagonal().add_(self.lam)
        p = torch.linalg.inv(gram)
        b = -p / p.diagonal()[None, :]
        b.diagonal().zero_()
        self.B = b.to(torch.float32)
        order = np.argsort(pairs[:, 0], kind="stable")
        bounds = np.searchsorted(pairs[order, 0], np.arange(n_users + 1))
        self.history = [pairs[order[bounds[u] : bounds[u + 1]], 1] for u in range(n_users)]
        self.weights = [weight[order[bounds[u] : bounds[u + 1]]].astype(np.float32) for u in range(n_users)]
        return self

    def scores(self, users: Sequence[int] | np.ndarray) -> np.ndarray:
        """(len(users), n_items) scores: the users' interaction rows times B."""
        assert self.B is not None, "fit first"
        # the users' rows are sparse: a sparse x dense product costs (their items) x n_items, not n_items^2
        items = [self.history[int(u)] for u in users]
        rows = np.repeat(np.arange(len(users)), [len(i) for i in items])
        cols = np.concatenate(items) if items else np.zeros(0, np.int64)
        values = np.concatenate([self.weights[int(u)] for u in users]) if items else np.zeros(0, np.float32)
        x = torch.sparse_coo_tensor(
            torch.from_numpy(np.stack([rows, cols]).astype(np.int64)),
            torch.from_numpy(values),
            (len(users), self.B.shape[0]),
        )
        return torch.sparse.mm(x, self.B).numpy()
