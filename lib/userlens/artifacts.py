"""The model store under ``storage.models``: the one place that knows its layout (no torch, no Spark).

::

    <storage.models>/
        LATEST                      the published model version (written after a complete artifact)
        CANDIDATE                   a newer model the quality gate has not passed yet (gate.enabled)
        REFUSED                     the last model the gate refused (`userlens publish --force` takes it)
        <version>/                  one model artifact (userlens.models.predictor: model.json last)
            metrics.json            :class:`~userlens.models.contracts.ModelMetrics`
        snapshots/<snapshot_id>/    the point-in-time training sets (split=train|valid|test, items/)
        segments/LATEST             the published k-means segment model
        segments/<version>/         kmeans/ (Spark MLlib) and segments.json

Local paths and pyarrow's file systems (``s3://``, ``gs://``, ``abfs://``, ``hdfs://``) alike.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Mapping
from typing import Any

from userlens.config import Settings
from userlens.models.contracts import ModelMetrics
from userlens.models.storage import delete, exists, read_bytes, read_json, write_bytes, write_json

log = logging.getLogger(__name__)

LATEST = "LATEST"
CANDIDATE = "CANDIDATE"
REFUSED = "REFUSED"
SNAPSHOTS = "snapshots"
SEGMENTS = "segments"


class ModelStore:
    """Versioned model artifacts, their LATEST pointer, training snapshots and the segment registry."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/") if "://" in root else os.path.abspath(root)

    @classmethod
    def of(cls, settings: Settings) -> "ModelStore":
        return cls(settings.storage.models)

    # -- behaviour models ---------------------------------------------------------------------
    def path(self, version: str) -> str:
        return f"{self.root}/{version}"

    def _pointer(self, name: str) -> str | None:
        pointer = f"{self.root}/{name}"
        return read_bytes(pointer).decode().strip() if exists(pointer) else None

    def _point(self, name: str, version: str) -> None:
        write_bytes(f"{self.root}/{name}", (version + "\n").encode())

    def latest(self) -> str | None:
        """The published version, or None before the first model."""
        return self._pointer(LATEST)

    def publish(self, version: str) -> None:
        """Point LATEST at ``version`` (call it after the artifact is complete)."""
        self._point(LATEST, version)

    def candidate(self) -> str | None:
        """A newer model waiting for the quality gate, or None."""
        return self._pointer(CANDIDATE)

    def propose(self, version: str) -> None:
        """Make ``version`` the candidate (LATEST unchanged until the gate promotes it)."""
        self._point(CANDIDATE, version)

    def serving(self) -> str | None:
        """The model the score stage uses: the candidate while there is one, else the published model."""
        return self.candidate() or self.latest()

    def promote(self) -> str | None:
        """The candidate becomes LATEST; its version, or None when there was no candidate."""
        version = self.candidate()
        if version is not None:
            self.publish(version)
            delete(f"{self.root}/{CANDIDATE}")
        return version

    def refuse(self) -> str | None:
        """The candidate becomes REFUSED (kept for `userlens publish --force`); LATEST unchanged."""
        version = self.candidate()
        if version is not None:
            self._point(REFUSED, version)
            delete(f"{self.root}/{CANDIDATE}")
        return version

    def refused(self) -> str | None:
        """The last model the gate refused, or None."""
        return self._pointer(REFUSED)

    def reconsider(self) -> str | None:
        """The refused model becomes the candidate again (``publish --force``); its version or None."""
        version = self.refused()
        if version is not None:
            self.propose(version)
            delete(f"{self.root}/{REFUSED}")
        return version

    def metrics(self, version: str) -> ModelMetrics | None:
        """The version's metrics.json, or None when it has none; ValueError when it cannot be read."""
        path = f"{self.path(version)}/metrics.json"
        return ModelMetrics.from_json(read_json(path)) if exists(path) else None

    def train_due(self, as_of: dt.date, retrain_days: int) -> str | None:
        """Why a model should be trained for ``as_of`` (None: the published one is recent enough)."""
        version = self.latest()
        if version is None:
            return "no model yet"
        metrics = self.metrics(version)
        trained = dt.date.fromisoformat(metrics.data.as_of_date) if metrics is not None else None
        if trained is None or (as_of - trained).days >= retrain_days:
            return f"model {version} is from {trained}, {retrain_days}+ days before {as_of}"
        return None

    # -- training snapshots -------------------------------------------------------------------
    @property
    def snapshots(self) -> str:
        return f"{self.root}/{SNAPSHOTS}"

    def snapshot(self, snapshot_id: str) -> str:
        return f"{self.snapshots}/{snapshot_id}"

    # -- segment models -----------------------------------------------------------------------
    def segment_path(self, version: str) -> str:
        return f"{self.root}/{SEGMENTS}/{version}"

    def latest_segments(self) -> tuple[str, dict[str, Any]] | None:
        """(version, segments.json) of the published segment model, or None."""
        pointer = f"{self.root}/{SEGMENTS}/{LATEST}"
        if not exists(pointer):
            return None
        version = read_bytes(pointer).decode().strip()
        return version, read_json(f"{self.segment_path(version)}/segments.json")

    def publish_segments(self, version: str, meta: Mapping[str, Any]) -> None:
        """Write segments.json beside the saved k-means model and point segments/LATEST at it."""
        write_json(f"{self.segment_path(version)}/segments.json", dict(meta))
        write_bytes(f"{self.root}/{SEGMENTS}/{LATEST}", (version + "\n").encode())
