"""Ingest throughput and scaling, against plain Spark reads of the same files.

    .venv/bin/python bench/ingest.py [--sizes 100000 1000000] [--repeat 2]

For each size: generate sample logs (about that many raw lines), then time in
the same Spark session
  (ref-count) spark.read.text(events).count()              plain read + count
  (ref-parse) spark.read.schema(S).json(events) -> noop     read + JSON parse, no output
  (ingest)    the full ingest stage into a fresh warehouse
and print events/s per core, ingest / ref ratios, and the per-event cost ratio
between the largest and smallest size (linear scaling: goal <= 1.1).
Best of --repeat runs for each figure; absolute times on a noisy machine mean
little, the ratios are the result.
"""

from __future__ import annotations

import argparse
import os
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
from userlens.stages.ingest import run_ingest  # noqa: E402

EVENTS_PER_USER_30D = 100  # docs/sample-data.md: events ~ 100 x users x days / 30


def best(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--days", type=int, default=30)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="userlens-bench-ingest-"))
    cores = os.cpu_count() or 1
    settings = load_settings(None, ["spark.ui=false", "spark.log_level=ERROR", f"storage.warehouse={work}/wh"])
    spark = get_spark(settings)
    key = load_key(settings.privacy, {"USERLENS_HMAC_KEY": "bench-key-0123456789abcdef"})
    from pyspark.sql import types as T

    json_schema = T.StructType(
        [
            T.StructField(c, T.StringType())
            for c in (
                "event_id",
                "user_id",
                "ts",
                "event_type",
                "item_id",
                "category",
                "price",
                "quantity",
                "query",
                "review_text",
            )
        ]
    )
    rows = []
    try:
        for size in sorted(args.sizes):
            users = max(1, round(size / (EVENTS_PER_USER_30D * args.days / 30)))
            raw = work / f"raw-{size}"
            summary = generate_sample(spark, str(raw), SampleSpec(users=users, days=args.days, seed=11))
            events = summary.events_dir
            t_count, n_lines = best(lambda: spark.read.text(events).count(), args.repeat)
            t_parse, _ = best(
                lambda: spark.read.schema(json_schema).json(events).write.format("noop").mode("overwrite").save(),
                args.repeat,
            )
            run_settings = load_settings(
                None, ["spark.ui=false", f"storage.warehouse={work}/wh-{size}", f"source.path={raw}"]
            )

            def ingest_once():
                shutil.rmtree(work / f"wh-{size}", ignore_errors=True)
                return run_ingest(spark, run_settings, key, StageRun("ingest", "bench"), None, True)

            t_ingest, result = best(ingest_once, args.repeat)
            rows.append((size, n_lines, result.rows_out, t_count, t_parse, t_ingest))
            print(
                f"size {size:>9,d}: {n_lines:,d} raw lines, ingest {t_ingest:.1f}s, read+count {t_count:.2f}s, "
                f"read+parse {t_parse:.2f}s",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\n| raw lines | events out | ingest s | events/s/core | ingest ÷ read+count | ingest ÷ read+parse |")
    print("|---:|---:|---:|---:|---:|---:|")
    for size, n, out, t_count, t_parse, t_ingest in rows:
        print(
            f"| {n:,d} | {out:,d} | {t_ingest:.1f} | {n / t_ingest / cores:,.0f} | {t_ingest / t_count:.1f} | "
            f"{t_ingest / t_parse:.1f} |"
        )
    if len(rows) >= 2:
        (_, n_small, _, _, _, t_small), (_, n_big, _, _, _, t_big) = rows[0], rows[-1]
        ratio = (t_big / n_big) / (t_small / n_small)
        print(f"\nper-event cost at {n_big:,d} ÷ at {n_small:,d} lines: {ratio:.2f} (goal <= 1.1)")
    print(f"cores: {cores}")


if __name__ == "__main__":
    main()
