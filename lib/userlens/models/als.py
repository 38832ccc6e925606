"""Implicit ALS served from its item factors: each user's vector is folded in from their own items at
scoring time (torch only, no Spark), so a user who was not in the fit, or whose history changed since,
is scored without refitting.

Spark MLlib's implicit ALS (Hu, Koren and Volinsky 2008, as ``ALS.computeFactors`` solves it) gives a
user with items ``I``, ratings ``r_i`` and item factors ``Y`` the vector

    x = (YᵀY + Σ_{i∈I} α r_i y_i y_iᵀ + λ |I| 1)⁻¹ Σ_{i∈I} (1 + α r_i) y_i

(confidence 1 + α r, preference 1, regularisation scaled by the number of ratings). :class:`FoldIn`
solves exactly that, in batches, from what the recommendation head reads per user: the newest distinct
history items, with rating 4 for an item the user bought and 1 otherwise (the ALS baseline's
weights: a purchase 4, any other item event 1, an add-to-cart 2 counted as 1 here).

Cost per user: O(|I| rank² + rank³); memory: the (n_items, rank) factors and their (rank, rank) Gram.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
import torch

from userlens.models.storage import exists, read_bytes, write_bytes

BOUGHT_RATING, OTHER_RATING = 4.0, 1.0
FUSION_WEIGHTS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)  # weights a fusion tries on validation


@dataclass
class FoldIn:
    """Item factors of an implicit ALS model, in the catalogue's order (zeros: an item ALS never saw)."""

    items: np.ndarray  # (n_items, rank)
    reg_param: float
    alpha: float
    _y: torch.Tensor = field(init=False, repr=False)
    _gram: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._y = torch.as_tensor(np.asarray(self.items, np.float64))
        self._gram = self._y.T @ self._y

    @property
    def n_items(self) -> int:
        return int(self._y.shape[0])

    def user_vectors(self, hist_idx: np.ndarray, pad: int, bought: np.ndarray) -> torch.Tensor:
        """(U, rank) from newest-first history indices (``pad`` = none) and bought indices (``pad`` or -1 =
        none); a user without history gets zeros."""
        users, rank = len(hist_idx), self._y.shape[1]
        hist = torch.as_tensor(np.asarray(hist_idx, np.int64))
        present = hist != pad
        safe = torch.where(present, hist, torch.zeros_like(hist))
        b = torch.as_tensor(np.asarray(bought, np.int64))
        was_bought = ((safe[:, :, None] == b[:, None, :]) & (b[:, None, :] >= 0) & (b[:, None, :] != pad)).any(2)
        rating = torch.where(was_bought, BOUGHT_RATING, OTHER_RATING).to(torch.float64) * present
        c1 = self.alpha * rating  # (U, L): zero at padding
        y = self._y[safe]  # (U, L, rank)
        a = self._gram.expand(users, rank, rank) + torch.einsum("ul,ulr,uls->urs", c1, y, y)
        n = present.sum(1).to(torch.float64)
        a = a + (self.reg_param * n)[:, None, None] * torch.eye(rank, dtype=torch.float64)
        rhs = torch.einsum("ul,ulr->ur", (1.0 + c1) * present, y)
        out = torch.zeros(users, rank, dtype=torch.float64)
        some = n > 0
        if some.any():
            out[some] = torch.linalg.solve(a[some], rhs[some])
        return out

    def scores(self, hist_idx: np.ndarray, pad: int, bought: np.ndarray) -> torch.Tensor:
        """(U, n_items) float32 preference scores."""
        return (self.user_vectors(hist_idx, pad, bought) @ self._y.T).to(torch.float32)


def standardised(scores: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """Per row, ``scores`` standardised over the entries not ``excluded`` (those become -inf)."""
    keep = (~excluded).to(scores.dtype)
    n = keep.sum(1, keepdim=True).clamp(min=1)
    s = torch.where(excluded, torch.zeros_like(scores), scores)
    mean = (s * keep).sum(1, keepdim=True) / n
    std = ((((s - mean) * keep) ** 2).sum(1, keepdim=True) / n).sqrt().clamp(min=1e-12)
    return torch.where(excluded, torch.full_like(scores, -torch.inf), (s - mean) / std)


@dataclass(frozen=True)
class Fusion:
    """The recommender that ships: the sequential head's scores plus ``weight`` x ALS's (fold-in), each
    standardised per user over the items that may be recommended; ``weight`` 0 is the head alone."""

    als: FoldIn
    weight: float


def write_fusion(path: str, fusion: Fusion) -> None:
    """``als.npz`` (the item factors in the catalogue's order) and ``als.json`` in a model directory."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(fusion.als.items, np.float32))
    write_bytes(f"{path}/als_items.npy", buffer.getvalue())
    meta = {"reg_param": fusion.als.reg_param, "alpha": fusion.als.alpha, "weight": fusion.weight}
    write_bytes(f"{path}/als.json", json.dumps(meta, sort_keys=True).encode())


def read_fusion(path: str) -> Fusion | None:
    """The model directory's fusion, None where it has none (a model trained without ALS)."""
    if not exists(f"{path}/als.json"):
        return None
    meta = json.loads(read_bytes(f"{path}/als.json"))
    items = np.load(io.BytesIO(read_bytes(f"{path}/als_items.npy")))
    return Fusion(FoldIn(items, float(meta["reg_param"]), float(meta["alpha"])), float(meta["weight"]))
