"""Baselines fitted in Spark, beside the model in the same run: the RFM logistic regression of the
prediction tasks, popularity and Spark MLlib ALS (implicit feedback) for recommendations.

The train stage reports them next to its model (and may keep the regression as a head:
``train.baseline_fallback``); ``userlens evaluate`` fits the same ALS on public datasets.
"""

from __future__ import annotations

import atexit
import datetime as dt
import functools
import shutil
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from userlens.config import AlsSettings
from userlens.errors import UserlensError
from userlens.models.contracts import FeatureSpec
from userlens.models.tasks import MULTICLASS_TASKS

if TYPE_CHECKING:
    from pyspark.ml.recommendation import ALSModel
    from pyspark.sql import SparkSession


def recommendation_baselines(
    snapshot: DataFrame,
    events: DataFrame,
    cut: dt.date,
    rec: Any,
    als_grid: Sequence[AlsSettings] | None = None,
    als_out: dict[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Popularity and Spark MLlib ALS (implicit) on everything known at ``cut``, evaluated like the
    sequential head: the ``rec_eval`` test users, earlier purchases excluded, next purchases relevant.

    ALS is fitted once per setting of ``als_grid`` (default: ``rec.als`` alone); the setting whose
    recall@k is best on the ``valid`` split's users with a next purchase (``rec.als`` when there is none)
    is the one scored on the test users (the fit data, events up to ``cut``, is the same for both and
    holds no next purchase). Its result carries ``reg_param``, ``alpha`` and the validation
    ``valid_recall@k``. With ``als_out``, the chosen model is put there: ``setting`` (its AlsSettings) and
    ``items`` ({item_id: factor vector}), what the shipped recommender folds users into
    (:mod:`userlens.models.als`)."""
    from pyspark.ml.feature import StringIndexer

    from userlens.models.training import ranking_summary

    k = rec.k
    grid = list(als_grid or [rec.als])
    test_users = snapshot.where("rec_eval").select("user_key", "bought", "next_items").collect()
    if not test_users:
        return {"recommend_popularity": {"users": 0}, "recommend_als": {"users": 0}}
    valid_users = (
        snapshot.where((F.col("split") == "valid") & (F.size("next_items") > 0))
        .select("user_key", "bought", "next_items")
        .orderBy(F.xxhash64(F.lit("als-valid"), "user_key"))
        .limit(rec.eval_users)
        .collect()
        if len(grid) > 1
        else []
    )
    if not valid_users:  # nothing to choose on: the configured setting
        grid = [rec.als]
    relevant = [set(u["next_items"]) for u in test_users]
    bought = [set(u["bought"]) for u in test_users]
    known = events.where((F.col("event_date") <= F.lit(cut)) & F.col("item_id").isNotNull())

    depth = k + max(len(u["bought"]) for u in [*test_users, *valid_users])
    popular = [
        r["item_id"]
        for r in known.where(F.col("event_type") == "purchase")
        .groupBy("item_id")
        .count()
        .orderBy(F.desc("count"), "item_id")
        .limit(depth)
        .collect()
    ]
    pop_ranked = [[i for i in popular if i not in b][:k] for b in bought]

    # implicit feedback: a purchase counts 4, a cart add 2, anything else with an item 1
    weight = (
        F.when(F.col("event_type") == "purchase", 4.0).when(F.col("event_type") == "add_to_cart", 2.0).otherwise(1.0)
    )
    ratings = known.groupBy("user_key", "item_id").agg(F.sum(weight).alias("rating"))
    user_ix = StringIndexer(inputCol="user_key", outputCol="u").fit(ratings)
    item_ix = StringIndexer(inputCol="item_id", outputCol="i").fit(ratings)
    data = (
        item_ix.transform(user_ix.transform(ratings))
        .select(F.col("u").cast("int").alias("u"), F.col("i").cast("int").alias("i"), F.col("rating").alias("r"))
        .cache()
    )
    spark = snapshot.sparkSession
    keys = [u["user_key"] for u in [*test_users, *valid_users]]
    wanted = (
        user_ix.transform(spark.createDataFrame([(x,) for x in dict.fromkeys(keys)], "user_key string"))
        .select(F.col("u").cast("int").alias("u"), "user_key")
        .cache()
    )
    labels = item_ix.labels

    def ranked(by_user: dict[str, list[str]], users: list[Any]) -> list[list[str]]:
        out = []
        for u in users:
            earlier = set(u["bought"])
            out.append([i for i in by_user.get(u["user_key"], []) if i not in earlier][:k])
        return out

    valid_relevant = [set(u["next_items"]) for u in valid_users]

    best: tuple[float, AlsSettings, list[list[str]], Any] | None = None
    try:
        for setting in grid:
            model = fit_als(data, setting, seed=13)
            recs = model.recommendForUserSubset(wanted, depth)
            by_user = {
                r["user_key"]: [labels[x["i"]] for x in r["recommendations"]]
                for r in recs.join(wanted, "u").select("user_key", "recommendations").collect()
            }
            value = (
                ranking_summary(ranked(by_user, valid_users), valid_relevant, k).get(f"recall@{k}", 0.0)
                if valid_users
                else 0.0
            )
            if best is None or value > best[0]:  # ties: the first
                best = (value, setting, ranked(by_user, test_users), model)
        assert best is not None
        value, chosen, als_ranked, chosen_model = best
        if als_out is not None:
            als_out["setting"] = chosen
            als_out["items"] = {labels[r["id"]]: list(r["features"]) for r in chosen_model.itemFactors.collect()}
    finally:
        data.unpersist()
        wanted.unpersist()
    als_summary: dict[str, float] = {
        **ranking_summary(als_ranked, relevant, k),
        "reg_param": chosen.reg_param,
        "alpha": chosen.alpha,
    }
    if valid_users:
        als_summary[f"valid_recall@{k}"] = value
    return {"recommend_popularity": ranking_summary(pop_ranked, relevant, k), "recommend_als": als_summary}


def als_grid(als: AlsSettings, reg_params: Sequence[float], alphas: Sequence[float]) -> list[AlsSettings]:
    """``als`` with each (regParam, alpha) of the grid; with ``als.tune`` false, ``als`` alone."""
    if not als.tune:
        return [als]
    return [als.model_copy(update={"reg_param": r, "alpha": a}) for r in reg_params for a in alphas]


def fit_baseline(
    snapshot: DataFrame,
    tasks: Sequence[str],
    n_classes: int,
    predictions_to: str | None = None,
    linear_out: dict[str, dict[str, list]] | None = None,
) -> dict[str, dict[str, float]]:
    """Spark MLlib logistic regression on log1p(numeric features) only: train split -> test metrics
    (and, with ``predictions_to``, the test labels and probabilities as .npz, no user keys). With
    ``linear_out``, each binary task's fitted model is put there as ``{"weight": [[w...]], "bias": [b]}``
    on the log1p scale (see :func:`standardized_linear`)."""
    import numpy as np
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.functions import array_to_vector, vector_to_array

    from userlens.models import metrics as M

    x = array_to_vector(F.transform("features", lambda v: F.log1p(F.greatest(v, F.lit(0.0))))).alias("x")
    data = snapshot.select("split", x, *tasks)
    train_rows, test_rows = data.where(F.col("split") == "train"), data.where(F.col("split") == "test")
    out: dict[str, dict[str, float]] = {}
    labels_out: dict[str, Any] = {}
    probs_out: dict[str, Any] = {}
    for task in tasks:
        multiclass = task in MULTICLASS_TASKS
        fit_rows = train_rows.where(F.col(task) >= 0) if multiclass else train_rows
        lr = LogisticRegression(
            featuresCol="x",
            labelCol=task,
            maxIter=50,
            regParam=1e-3,
            family="multinomial" if multiclass else "binomial",
        )
        model = lr.fit(fit_rows.withColumn(task, F.col(task).cast("double")))
        scored = model.transform(test_rows.where(F.col(task) >= 0) if multiclass else test_rows)
        rows = scored.select(F.col(task), vector_to_array(F.col("probability")).alias("p")).collect()
        y = np.array([r[0] for r in rows], dtype=np.int64)
        p = np.array([r[1] for r in rows], dtype=np.float64)
        if multiclass:
            if p.shape[1] < n_classes:  # classes above the largest train label get probability 0
                p = np.pad(p, ((0, 0), (0, n_classes - p.shape[1])))
            out[task] = M.multiclass_metrics(y, p)
        else:
            p = p[:, 1]
            out[task] = M.binary_metrics(y, p)
            if linear_out is not None:
                linear_out[task] = {"weight": [model.coefficients.toArray().tolist()], "bias": [model.intercept]}
        labels_out[task], probs_out[task] = y, p
    if predictions_to:
        from userlens.models.training import save_predictions

        save_predictions(predictions_to, labels_out, probs_out)
    return out


TEXT_BASELINE = "(bag of words)"  # metrics.json baseline["<task> (bag of words)"]
COUNT_SCALE = 100.0  # the bag-of-words regression's standardized counts, times this: their penalty 10^4 smaller


def scaled_counts(n_counts: int) -> list[Any]:
    """MLlib stages from ``counts`` (log1p of the numeric features, a vector of ``n_counts``) to ``counts_x``:
    standardized, then times ``COUNT_SCALE``, so that in an unstandardized regression their penalty is that
    much smaller than the other inputs' (the words, the embeddings)."""
    from pyspark.ml.feature import ElementwiseProduct, StandardScaler
    from pyspark.ml.linalg import Vectors

    return [
        StandardScaler(inputCol="counts", outputCol="counts_std", withMean=True, withStd=True),
        ElementwiseProduct(
            scalingVec=Vectors.dense([COUNT_SCALE] * n_counts), inputCol="counts_std", outputCol="counts_x"
        ),
    ]


def bag_of_words_baseline(
    users: DataFrame,
    tasks: Sequence[str],
    reg_params: Sequence[float],
    vocabulary: int = 20_000,
    min_users: int = 3,
) -> dict[str, dict[str, float]]:
    """The second baseline of the binary tasks: Spark MLlib logistic regression on the words of the same
    texts the model reads (TF-IDF of ``text``, the words of at least ``min_users`` train users, at most
    ``vocabulary``) beside log1p(numeric features), its regParam chosen on the valid split's AUC, scored once
    on the test split. ``users``: split, features, text and the task columns. Does a language model read
    anything in the texts that counting their words does not?

    The penalty falls on the words, not on the counts: the counts are standardized and scaled by
    ``COUNT_SCALE`` (their coefficients, hence their penalty, that much smaller) and the regression runs
    unstandardized. One penalty on both shrank the counts' fit with the words' and left this baseline below
    the counts alone on every split (docs/benchmarks.md). The TF-IDF columns are scaled to unit variance on
    the train users (not centred: they stay sparse), so that every word carries the same penalty: unscaled,
    a word few users share carried regParam / std² and MLlib's L-BFGS failed its line searches on such
    columns, spending its iterations there (docs/benchmarks.md, the acceptance run)."""
    from pyspark.ml import Pipeline
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.feature import (
        IDF,
        CountVectorizer,
        RegexTokenizer,
        StandardScaler,
        VectorAssembler,
    )
    from pyspark.ml.functions import array_to_vector

    from userlens.models import metrics as M

    binary = [t for t in tasks if t not in MULTICLASS_TASKS]
    x = array_to_vector(F.transform("features", lambda v: F.log1p(F.greatest(v, F.lit(0.0))))).alias("counts")
    # an event id per word would only add noise: words are runs of letters (any script), numbers dropped
    data = users.select("split", x, F.lower("text").alias("text"), *binary)
    first = users.select(F.size("features").alias("n")).first()
    n_counts = first["n"] if first is not None else 0
    words = Pipeline(
        stages=[
            RegexTokenizer(inputCol="text", outputCol="words", pattern=r"[^\p{L}]+", toLowercase=False),
            CountVectorizer(inputCol="words", outputCol="tf", vocabSize=vocabulary, minDF=float(min_users)),
            IDF(inputCol="tf", outputCol="tfidf"),
            StandardScaler(inputCol="tfidf", outputCol="tfidf_std", withMean=False, withStd=True),
            *scaled_counts(n_counts),
            VectorAssembler(inputCols=["tfidf_std", "counts_x"], outputCol="x"),
        ]
    ).fit(data.where(F.col("split") == "train"))
    rows = words.transform(data).select("split", "x", *binary).cache()
    try:
        out: dict[str, dict[str, float]] = {}
        for task in binary:
            fit_rows = rows.where(F.col("split") == "train").withColumn(task, F.col(task).cast("double"))
            best: tuple[float, float, Any] | None = None
            for reg in reg_params:
                model = LogisticRegression(
                    featuresCol="x", labelCol=task, maxIter=100, regParam=reg, standardization=False
                ).fit(fit_rows)
                valid = _scored(model, rows.where(F.col("split") == "valid"), task)
                auc = M.binary_metrics(*valid)["auc"] if len(set(valid[0].tolist())) == 2 else float("nan")
                if best is None or auc > best[0]:
                    best = (auc, reg, model)
            assert best is not None  # reg_params is not empty
            y, p = _scored(best[2], rows.where(F.col("split") == "test"), task)
            tested = M.binary_metrics(y, p) if len(set(y.tolist())) == 2 else {"n": len(y), "positives": int(y.sum())}
            out[task] = {**tested, "reg_param": best[1], "valid_auc": best[0]}
    finally:
        rows.unpersist()
    return out


STATE_PROBE = "(state probe)"  # metrics.json baseline["<task> (state probe)"]


def fit_state_probe(
    snapshot: DataFrame,
    tasks: Sequence[str],
    reg_params: Sequence[float],
    baseline: dict[str, dict[str, list]],
) -> tuple[dict[str, dict[str, list]], dict[str, dict[str, float]]]:
    """Per binary task of ``baseline`` (the RFM regression's ``{"weight": [[w...]], "bias": [b]}`` on
    log1p(features), :func:`fit_baseline`'s ``linear_out``): that regression plus a penalised correction read
    from the state embedding. Spark MLlib's GeneralizedLinearRegression (binomial, logit) fits the correction
    on the train split with the regression's logit as its offset, so the counts keep their exact fit and only
    the embedding's weights are shrunk; the regParam of the lowest validation log loss (the loss the heads are
    chosen by) wins. Returns (the sum as ``{"weight": [[w_state..., w_counts...]], "bias": [b]}`` on the raw
    embedding and log1p(features), the model's wide inputs in its order (:func:`standardized_linear` rewrites
    the features' part); its test metrics with ``reg_param``)."""
    from pyspark.ml.functions import array_to_vector
    from pyspark.ml.regression import GeneralizedLinearRegression

    from userlens.models import metrics as M

    counts = F.transform("features", lambda v: F.log1p(F.greatest(v, F.lit(0.0))))
    binary = [t for t in tasks if t in baseline and t not in MULTICLASS_TASKS]
    rows = snapshot.where(F.col("state_embedding").isNotNull()).select(
        "split",
        array_to_vector(F.col("state_embedding").cast("array<double>")).alias("x"),
        counts.alias("counts"),
        *binary,
    )
    rows = rows.cache()
    try:
        out: dict[str, dict[str, list]] = {}
        tested: dict[str, dict[str, float]] = {}
        for task in binary:
            w = [float(v) for v in baseline[task]["weight"][0]]
            b = float(baseline[task]["bias"][0])
            logit = F.aggregate(
                F.zip_with("counts", F.array(*[F.lit(v) for v in w]), lambda c, k: c * k), F.lit(b), lambda a, x: a + x
            )
            data = rows.withColumn("offset", logit).withColumn(task, F.col(task).cast("double"))
            best: tuple[float, float, Any] | None = None
            for reg in reg_params:
                model = GeneralizedLinearRegression(
                    family="binomial", link="logit", regParam=reg, offsetCol="offset", labelCol=task, featuresCol="x"
                ).fit(data.where(F.col("split") == "train"))
                y, p = _predicted(model, data.where(F.col("split") == "valid"), task)
                loss = M.log_loss(y, p) if len(y) else float("inf")
                if best is None or loss < best[0]:
                    best = (loss, reg, model)
            assert best is not None  # reg_params is not empty
            correction = [float(v) for v in best[2].coefficients.toArray()]
            out[task] = {"weight": [correction + w], "bias": [b + float(best[2].intercept)]}
            y, p = _predicted(best[2], data.where(F.col("split") == "test"), task)
            tested[task] = {**M.binary_metrics(y, p), "reg_param": best[1]}
    finally:
        rows.unpersist()
    return out, tested


def _predicted(model: Any, rows: DataFrame, task: str) -> tuple[Any, Any]:
    """(labels, P(1)) of a binomial GeneralizedLinearRegression model (its prediction is the mean)."""
    import numpy as np

    got = model.transform(rows).select(F.col(task), F.col("prediction")).collect()
    return np.array([r[0] for r in got], dtype=np.int64), np.array([r[1] for r in got], dtype=np.float64)


def _scored(model: Any, rows: DataFrame, task: str) -> tuple[Any, Any]:
    import numpy as np
    from pyspark.ml.functions import vector_to_array

    got = model.transform(rows).select(F.col(task), vector_to_array(F.col("probability"))[1].alias("p")).collect()
    return np.array([r[0] for r in got], dtype=np.int64), np.array([r[1] for r in got], dtype=np.float64)


def standardized_linear(linear: dict[str, dict[str, list]], features: FeatureSpec) -> dict[str, dict[str, list]]:
    """A linear model of x = log1p(features) (after any other inputs: a probe's state embedding, unchanged)
    rewritten for the model's standardized input z = (x - mean) / std: weight w * std, bias b + w . mean (the
    same logits)."""
    import numpy as np

    mean, std = np.asarray(features.mean), np.asarray(features.std)
    n = len(mean)
    out = {}
    for task, m in linear.items():
        w, b = np.asarray(m["weight"], np.float64), np.asarray(m["bias"], np.float64)
        # columns before the features' (a probe's state embedding) are read as they are
        head, counts = w[:, :-n], w[:, -n:]
        out[task] = {
            "weight": np.concatenate([head, counts * std], axis=1).tolist(),
            "bias": (b + counts @ mean).tolist(),
        }
    return out


ALS_CHECKPOINT_INTERVAL = 10  # MLlib's default: every 10th iteration cuts the lineage, if it can checkpoint


@functools.cache
def _temporary_checkpoint_dir() -> str:
    """A local session's checkpoint directory: one per process, removed when it exits."""
    folder = tempfile.mkdtemp(prefix="userlens-als-checkpoints-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


def ensure_checkpoint_dir(spark: "SparkSession", als: AlsSettings) -> None:
    """Give Spark a checkpoint directory when ALS runs longer than its checkpoint interval.

    MLlib ignores ``checkpointInterval`` while the SparkContext has no checkpoint directory, and the
    lineage of 20 or more iterations then overflows the JVM stack (a StackOverflowError deep in a job;
    SPARK-5955, the ALS guide's note on checkpointInterval). ``train.recommend.als.checkpoint_dir`` is used
    when set; a local session otherwise gets a temporary directory, removed when the process exits; on a
    cluster, where it must be storage every executor can reach, a missing one is a one-line error."""
    sc = spark.sparkContext
    if als.max_iter <= ALS_CHECKPOINT_INTERVAL or sc.getCheckpointDir() is not None:
        return
    if als.checkpoint_dir:
        sc.setCheckpointDir(als.checkpoint_dir)
    elif (sc.master or "").startswith("local"):
        sc.setCheckpointDir(_temporary_checkpoint_dir())
    else:
        raise UserlensError(
            f"train.recommend.als.max_iter={als.max_iter} needs a checkpoint directory on a cluster (ALS cuts "
            f"its lineage every {ALS_CHECKPOINT_INTERVAL} iterations only with one): set "
            "train.recommend.als.checkpoint_dir to storage every executor can reach, or max_iter to "
            f"{ALS_CHECKPOINT_INTERVAL} or less"
        )


def fit_als(ratings: DataFrame, als: AlsSettings, seed: int) -> "ALSModel":
    """Spark MLlib ALS with implicit feedback on (u int, i int, r float) ratings."""
    from pyspark.ml.recommendation import ALS

    ensure_checkpoint_dir(ratings.sparkSession, als)
    # ALS's default of 10 user and 10 item blocks: fewer where there are fewer cores (each block pair is a
    # task in every iteration's joins; on two local cores 10 blocks made ~1,100 tasks of a few ms each)
    blocks = max(1, min(10, ratings.sparkSession.sparkContext.defaultParallelism))
    return ALS(
        userCol="u",
        itemCol="i",
        ratingCol="r",
        implicitPrefs=True,
        rank=als.rank,
        maxIter=als.max_iter,
        regParam=als.reg_param,
        alpha=als.alpha,
        seed=seed,
        numUserBlocks=blocks,
        numItemBlocks=blocks,
        coldStartStrategy="drop",
        checkpointInterval=ALS_CHECKPOINT_INTERVAL,
    ).fit(ratings)
