"""Segment models: the published k-means over user embeddings, when profile would reuse it, and the
assignment of users to its segments (profile fits and publishes them; the quality gate reads them)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from userlens.artifacts import ModelStore
from userlens.config import Settings

if TYPE_CHECKING:
    from pyspark.ml.clustering import KMeansModel


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
