"""Explanation cost per user: the explain stage (occlusion over days) against the score stage, same run.

    .venv/bin/python bench/explain.py [--users 1000] [--days 30] [--explained 20 100]

Sample logs for ``--users`` users -> one nightly with ``explain.users: none`` (so every user is scored
and nobody explained) -> the score stage timed again over every user (a new model version is not
needed: the score rows of the night are deleted first, so every user is scored again) -> the explain stage
with ``explain.users: sample`` for each ``--explained`` size (the explanations of the previous size
cleared first). Printed per size:

  explain s/user        explain stage seconds / users explained
  variants/user         texts scored per user (its active days left out one at a time, up to
                        explain.days, plus the whole history)
  ÷ score s/user        explain seconds per user / score seconds per user (the cost of explaining
                        a user in scored users)

Everything runs in one local Spark session with the embedded default (CPU encoder).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

from userlens.config import load_settings  # noqa: E402
from userlens.privacy import load_key  # noqa: E402
from userlens.runs import StageRun  # noqa: E402
from userlens.sample import SampleSpec, generate_sample  # noqa: E402
from userlens.spark import get_spark  # noqa: E402
from userlens.stages.explain import run_explain  # noqa: E402
from userlens.stages.nightly import run_nightly  # noqa: E402
from userlens.stages.score import run_score  # noqa: E402
from userlens.tables import EXPLANATIONS, Tables  # noqa: E402

BASE = ["spark.ui=false", "spark.log_level=ERROR", "spark.conf.spark.ui.showConsoleProgress=false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--explained", type=int, nargs="+", default=[20, 100])
    args = parser.parse_args()
    from pyspark.sql import functions as F

    root = Path(tempfile.mkdtemp(prefix="userlens-bench-explain-"))
    try:
        paths = [
            f"storage.warehouse={root / 'warehouse'}",
            f"storage.models={root / 'models'}",
            f"source.path={root / 'raw'}",
            "nightly.report=false",
            "explain.users=none",
            "train.recommend.enabled=false",
        ]
        settings = load_settings(None, [*BASE, *paths])
        spark = get_spark(settings)
        generate_sample(spark, settings.source.path, SampleSpec(users=args.users, days=args.days))
        night = run_nightly(spark, settings, load_key(settings.privacy))
        as_of = night.as_of_date
        tables = Tables(spark, settings.storage)

        tables.delta("user_scores").delete(f"as_of_date = DATE'{as_of}'")
        started = time.perf_counter()
        scored = run_score(spark, settings, StageRun("score", "bench-score"), as_of)
        score_per_user = (time.perf_counter() - started) / max(scored.scored, 1)
        print(f"score: {scored.scored} users in {score_per_user * scored.scored:.1f} s ({score_per_user:.4f} s/user)")
        print(f"{'explained':>10} {'seconds':>8} {'explain s/user':>15} {'variants/user':>14} {'÷ score s/user':>15}")
        for size in args.explained:
            tables.delta("user_scores").update(
                condition=F.col("explanations").isNotNull(), set={"explanations": F.lit(None).cast(EXPLANATIONS)}
            )
            sized = load_settings(None, [*BASE, *paths, "explain.users=sample", f"explain.sample_size={size}"])
            started = time.perf_counter()
            result = run_explain(spark, sized, StageRun("explain", f"bench-explain-{size}"), as_of)
            seconds = time.perf_counter() - started
            per_user = seconds / max(result.users, 1)
            print(
                f"{result.users:>10} {seconds:>8.1f} {per_user:>15.3f} {result.variants / max(result.users, 1):>14.1f} "
                f"{per_user / score_per_user:>15.0f}"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
