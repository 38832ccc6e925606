"""Segment models: the published k-means over user embeddings, when profile would reuse it, and the
assignment of users to its segments (profile fits and publishes them; the quality gate reads them)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from userlens.artifacts import ModelStore
from userlens.config import Settings

if TYPE_CHECKING:
    from pyspark.ml.clustering import KMeansModel

    from userlens.models.quality import Segments
    from userlens.tables import Tables


@dataclass(frozen=True)
class SegmentModel:
    model: "KMeansModel"
    version: str
    fitted: bool


def reusable_segment_model(settings: Settings, model_id: str, as_of: dt.date) -> SegmentModel | None:
    """The published k-means model when profile would reuse it for ``as_of`` (young enough, same encoder,
    same k), else None (profile refits)."""
    from pyspark.ml.clustering import KMeansModel

    store = ModelStore.of(settings)
    published = store.latest_segments()
    if published is None:
        return None
    version, meta = published
    age = (as_of - dt.date.fromisoformat(meta["as_of_date"])).days
    cfg = settings.profile
    if meta["embed_model_id"] == model_id and meta["k"] == cfg.segments and 0 <= age < cfg.segment_refit_days:
        return SegmentModel(KMeansModel.load(f"{store.segment_path(version)}/kmeans"), version, False)
    return None


def assign_segments(model: "KMeansModel", embeddings: DataFrame) -> DataFrame:
    """(user_key, segment_id) for every user."""
    from pyspark.ml.functions import array_to_vector

    return model.transform(embeddings.select("user_key", array_to_vector(F.col("embedding")).alias("x"))).select(
        "user_key", F.col("prediction").cast("int").alias("segment_id")
    )


def quality_segments(model: "KMeansModel", version: str, published_ids: Iterable[int]) -> "Segments":
    """A segment model's centroids and published segment ids, for the model's quality by segment."""
    import numpy as np

    from userlens.models.quality import Segments

    centroids = np.stack([np.asarray(c, np.float64) for c in model.clusterCenters()])  # numpy arrays in pyspark
    return Segments(version, centroids, frozenset(int(s) for s in published_ids))


def published_segments(tables: "Tables", settings: Settings, model_id: str) -> "Segments | None":
    """The published segment model (its published segments only) where it was fitted on embeddings of
    ``model_id``, else None."""
    from pyspark.ml.clustering import KMeansModel

    store = ModelStore.of(settings)
    latest = store.latest_segments()
    if latest is None or latest[1].get("embed_model_id") != model_id or not tables.exists("segments"):
        return None
    version = latest[0]
    published = (
        tables.read("segments")
        .where((F.col("model_version") == version) & F.col("published"))
        .select("segment_id")
        .collect()
    )
    model = KMeansModel.load(f"{store.segment_path(version)}/kmeans")
    return quality_segments(model, version, [r[0] for r in published])
