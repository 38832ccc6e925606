"""Arrays of the recommendation head from the training snapshot's list columns (numpy + pyarrow): the
users' history and purchase lists become index matrices over the catalogue, and one next purchase is
sampled per user. The head itself is :mod:`userlens.models.sequential`."""

from __future__ import annotations

from typing import Any

import numpy as np

# --------------------------------------------------------------------------- arrays from lists


def padded_indices(values: np.ndarray, lengths: np.ndarray, lookup: Any, width: int, pad: int) -> np.ndarray:
    """(n, width) int64 matrix of ``lookup.get_indexer(values)`` per row (first ``width`` values), ``pad``
    where a row is shorter or a value is unknown. ``values`` is the flat list data, ``lengths`` per row."""
    n = len(lengths)
    out = np.full((n, width), pad, np.int64)
    if len(values) == 0:
        return out
    idx = lookup.get_indexer(values).astype(np.int64)
    idx[idx < 0] = pad
    rows = np.repeat(np.arange(n), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    pos = np.arange(len(values)) - starts
    keep = pos < width
    out[rows[keep], pos[keep]] = idx[keep]
    return out


def list_column(column: Any) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, lengths) of a pyarrow list array (nulls count as empty lists)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return column.flatten().to_numpy(zero_copy_only=False), lengths


def sample_positive(positives: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """One random non-pad entry per row of (n, M) (pad when the row has none)."""
    valid = positives != pad
    counts = valid.sum(1)
    pick = (rng.random(len(positives)) * np.maximum(counts, 1)).astype(np.int64)
    # the pick-th valid entry: valid entries come first in every row (padded_indices fills from the left,
    # unknown items in the middle become pad too, so rank the valid ones)
    order = np.argsort(~valid, axis=1, kind="stable")
    chosen = positives[np.arange(len(positives)), order[np.arange(len(positives)), pick]]
    return np.where(counts > 0, chosen, pad)
