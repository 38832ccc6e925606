"""Textualize cost against a plain Spark aggregation of the same events.

    .venv/bin/python bench/textualize.py [--sizes 100000 1000000] [--repeat 2]

For each size: sample logs -> ingest (not timed) -> then, in the same session,
  (ref)        events.groupBy(user_key).count()  -> noop sink
  (sort)       all event columns shuffled by user_key and sorted by time -> noop
               (the floor for any design that brings a user's events together)
  (textualize) the textualize stage, Delta MERGE included, into a fresh user_texts
and print textualize ÷ ref (goal <= 3) and the per-event cost ratio between the
largest and smallest size (goal <= 1.1). Finally one user with 10^6 events is
added to the smallest data set and textualize runs with the default local
settings (driver memory from conf/local.yaml).
"""

from __future__ import annotations

import argparse
import datetime as dt
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
from userlens.stages.textualize import run_textualize  # noqa: E402
from userlens.tables import Tables  # noqa: E402

EVENTS_PER_USER_30D = 100


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--power-events", type=int, default=1_000_000)
    args = parser.parse_args()

    from pyspark.sql import functions as F

    work = Path(tempfile.mkdtemp(prefix="userlens-bench-textualize-"))
    base = ["spark.ui=false", "spark.log_level=ERROR", "spark.conf.spark.ui.showConsoleProgress=false"]
    spark = get_spark(load_settings(None, base))
    key = load_key(load_settings(None, base).privacy, {"USERLENS_HMAC_KEY": "bench-key-0123456789abcdef"})
    rows = []
    try:
        for size in sorted(args.sizes):
            raw = work / f"raw-{size}"
            users = max(1, round(size / EVENTS_PER_USER_30D))
            generate_sample(spark, str(raw), SampleSpec(users=users, days=30, seed=5))
            settings = load_settings(None, [*base, f"storage.warehouse={work}/wh-{size}", f"source.path={raw}"])
            ingest = run_ingest(spark, settings, key, StageRun("ingest", "bench"), None, True)
            tables = Tables(spark, settings.storage)
            events = tables.read("events")
            ref_times, sort_times, text_times = [], [], []
            shuffle_sort = events.repartition("user_key").sortWithinPartitions("user_key", F.desc("event_time"))
            for _ in range(args.repeat):
                t_ref, _ = timed(
                    lambda: events.groupBy("user_key").count().write.format("noop").mode("overwrite").save()
                )
                ref_times.append(t_ref)
                t_sort, _ = timed(lambda: shuffle_sort.write.format("noop").mode("overwrite").save())
                sort_times.append(t_sort)
                shutil.rmtree(Path(tables.location("user_texts")), ignore_errors=True)
                tables._existing.discard("user_texts")
                t_text, result = timed(lambda: run_textualize(spark, settings, StageRun("textualize", "bench")))
                text_times.append(t_text)
            rows.append((ingest.rows_out, result.users, min(ref_times), min(text_times), min(sort_times)))
            print(
                f"events {ingest.rows_out:,d}: textualize {min(text_times):.1f}s, groupBy count {min(ref_times):.2f}s",
                flush=True,
            )

        # skew: one user with 10^6 events beside the smallest data set's users
        size = sorted(args.sizes)[0]
        settings = load_settings(None, [*base, f"storage.warehouse={work}/wh-{size}", f"source.path={work}/raw-{size}"])
        tables = Tables(spark, settings.storage)
        as_of = tables.read("events").agg(F.max("event_date")).first()[0]
        power = spark.range(args.power_events).select(
            F.lit("POWER-USER").alias("user_key"),
            F.format_string("pw%09d", "id").alias("event_id"),
            F.timestamp_seconds(
                F.lit(int(dt.datetime(2026, 10, 1, tzinfo=dt.timezone.utc).timestamp())) + F.col("id") % (29 * 86400)
            ).alias("event_time"),
            F.lit(as_of).alias("event_date"),
            F.lit("view").alias("event_type"),
            F.format_string("i%05d", F.col("id") % 400).alias("item_id"),
            F.lit(None).cast("string").alias("category"),
            F.lit(None).cast("double").alias("price"),
            F.lit(None).cast("int").alias("quantity"),
            F.lit(None).cast("string").alias("query"),
            F.lit(None).cast("string").alias("text"),
            F.lit("bench").alias("run_id"),
        )
        tables.replace_where(
            "events",
            tables.read("events").where(F.col("event_date") == F.lit(as_of)).unionByName(power),
            f"event_date = DATE'{as_of.isoformat()}'",
        )
        t_power, power_result = timed(lambda: run_textualize(spark, settings, StageRun("textualize", "bench-power")))
        power_text = tables.read("user_texts").where("user_key = 'POWER-USER'").first()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\n| events | users | groupBy count s | shuffle+sort s | textualize s | ÷ groupBy count | ÷ shuffle+sort |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, users, t_ref, t_text, t_sort in rows:
        print(
            f"| {n:,d} | {users:,d} | {t_ref:.2f} | {t_sort:.2f} | {t_text:.1f} | {t_text / t_ref:.1f} | "
            f"{t_text / t_sort:.1f} |"
        )
    if len(rows) >= 2:
        (n_small, _, _, t_small, _), (n_big, _, _, t_big, _) = rows[0], rows[-1]
        print(
            f"\nper-event cost at {n_big:,d} ÷ at {n_small:,d} events: {(t_big / n_big) / (t_small / n_small):.2f} "
            "(goal <= 1.1)"
        )
    print(
        f"power user with {args.power_events:,d} events among {rows[0][1]:,d} users: textualize completed in "
        f"{t_power:.1f}s, its text covers n_events={power_text.n_events} ({len(power_text.text)} chars); "
        f"users={power_result.users}"
    )


if __name__ == "__main__":
    main()
