"""Nightly cost: the whole pipeline against its embed stage, per-event scaling, and the next-day refresh.

    .venv/bin/python bench/nightly.py [--sizes 100000 1000000] [--days 30] [--active 0.01]

For each size (raw sample events): sample logs -> a first full nightly (ingest,
textualize, embed, train, score, profile, report; timed as one call) in a fresh
warehouse, then a second day whose only new events are those of ``--active`` of
the users (replayed from the last day) -> a second nightly. Stage durations
come from the ``pipeline_runs`` rows. Printed per size:

  nightly ÷ embed        first nightly wall time ÷ its embed stage   (goal <= 1.5 at 10^6)
  ÷ all embedding        the same ÷ (embed stage + the train stage's embedding of the
                         texts as of the cutoff: the first night trains, and a model needs
                         point-in-time texts, so every text is embedded twice)
  next day ÷ first       second-day nightly ÷ first full nightly      (goal <= 0.1)
  full night ÷ embed     (``--full-night``, on by default) a third day whose nightly
                         re-embeds every user without training (``textualize.template_version``
                         raised, so every text changes; the model is two days old, so not due):
                         its wall time ÷ its embed stage

and across sizes: per-event nightly cost, largest ÷ smallest (goal <= 1.1).
Everything runs in one Spark session with the embedded local default
(conf/local.yaml), CPU encoder; the sample users are scaled to the event count
measured on a probe.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

from userlens.config import load_settings  # noqa: E402
from userlens.privacy import load_key  # noqa: E402
from userlens.sample import SampleSpec, generate_sample, replay_day  # noqa: E402
from userlens.spark import get_spark  # noqa: E402
from userlens.stages.nightly import run_nightly  # noqa: E402
from userlens.tables import Tables  # noqa: E402

BASE = ["spark.ui=false", "spark.log_level=ERROR", "spark.conf.spark.ui.showConsoleProgress=false"]


def stage_details(tables: Tables, since: dt.datetime, stage: str) -> dict[str, object]:
    from pyspark.sql import functions as F

    row = (
        tables.read("pipeline_runs")
        .where((F.col("started_at") >= F.lit(since)) & (F.col("stage") == stage))
        .select("details")
        .first()
    )
    return json.loads(row["details"]) if row is not None and row["details"] else {}


def timed_nightly(spark, settings, key, tables: Tables, day: dt.date | None):
    """One nightly: its result, wall seconds, seconds per stage (pipeline_runs) and its train details."""
    t0 = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    start = time.perf_counter()
    result = run_nightly(spark, settings, key, day)
    wall = time.perf_counter() - start
    return result, wall, stage_seconds(tables, t0), stage_details(tables, t0, "train")


def stage_seconds(tables: Tables, since: dt.datetime) -> dict[str, float]:
    from pyspark.sql import functions as F

    rows = (
        tables.read("pipeline_runs")
        .where(F.col("started_at") >= F.lit(since))
        .select("stage", (F.col("finished_at").cast("double") - F.col("started_at").cast("double")).alias("s"))
        .collect()
    )
    out: dict[str, float] = {}
    for r in rows:
        out[r["stage"]] = out.get(r["stage"], 0.0) + float(r["s"])
    return out


def one_size(
    spark,
    work: Path,
    events: int,
    users_per_event: float,
    days: int,
    active: float,
    train_overrides: list[str],
    full_night: bool = True,
) -> dict[str, object]:
    root = work / f"n{events}"
    users = max(200, round(events * users_per_event))
    overrides = BASE + [
        f"storage.warehouse={root / 'warehouse'}",
        f"storage.models={root / 'models'}",
        f"source.path={root / 'raw'}",
        f"nightly.report_dir={root / 'reports'}",
        *train_overrides,
    ]
    settings = load_settings(None, overrides)
    key = load_key(settings.privacy, {"USERLENS_HMAC_KEY": "bench-key-0123456789abcdef"})
    spec = SampleSpec(users=users, days=days, seed=7)
    summary = generate_sample(spark, str(root / "raw"), spec)
    tables = Tables(spark, settings.storage)

    first, first_wall, first_stages, trained = timed_nightly(spark, settings, key, tables, None)
    cutoff_embed = float(trained.get("cutoff_embed_seconds", 0.0))

    last = first.as_of_date
    day = last + dt.timedelta(days=1)
    n_active = max(1, round(users * active))
    replay_day(str(root / "raw"), last, day, n_active)
    second, second_wall, second_stages, _ = timed_nightly(spark, settings, key, tables, day)
    out = {
        "raw_events": summary.lines_written,
        "users": users,
        "events_ingested": first.stages["ingest"].rows_out,
        "first_wall": first_wall,
        "first_stages": first_stages,
        "nightly_over_embed": first_wall / first_stages["embed"],
        "cutoff_texts_embedded": trained.get("cutoff_texts_embedded"),
        "cutoff_embed_seconds": cutoff_embed,
        "nightly_over_all_embedding": first_wall / (first_stages["embed"] + cutoff_embed),
        "second_wall": second_wall,
        "second_stages": second_stages,
        "active_users": n_active,
        "second_embedded": second.stages["embed"].users.embedded,
        "second_scored": second.stages["score"].scored,
        "next_day_over_first": second_wall / first_wall,
        "trained_second_day": "train" in second.stages,
    }
    if full_night:
        third_day = day + dt.timedelta(days=1)
        replay_day(str(root / "raw"), day, third_day, n_active)
        version = str(int(settings.textualize.template_version) + 1)
        resettled = load_settings(None, overrides + [f"textualize.template_version={version}"])
        third, third_wall, third_stages, _ = timed_nightly(spark, resettled, key, tables, third_day)
        out.update(
            {
                "full_wall": third_wall,
                "full_stages": third_stages,
                "full_trained": "train" in third.stages,
                "full_embedded": third.stages["embed"].users.embedded,
                "full_night_over_embed": third_wall / third_stages["embed"],
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--active", type=float, default=0.01)
    parser.add_argument(
        "--full-night",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time a third nightly that re-embeds every user without training",
    )
    parser.add_argument(
        "--set", dest="train_overrides", action="append", default=[], help="extra settings (e.g. train.epochs=10)"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="userlens-bench-nightly-"))
    spark = get_spark(load_settings(None, BASE))
    try:
        probe = generate_sample(spark, str(work / "probe"), SampleSpec(users=200, days=args.days, seed=7))
        users_per_event = 200 / probe.lines_written
        results = {}
        for size in sorted(args.sizes):
            print(f"== {size:,} raw events", flush=True)
            results[size] = r = one_size(
                spark, work, size, users_per_event, args.days, args.active, args.train_overrides, args.full_night
            )
            stages = ", ".join(f"{k} {v:.0f}s" for k, v in r["first_stages"].items())
            print(
                f"   {r['raw_events']:,} raw lines, {r['users']:,} users; first nightly {r['first_wall']:.0f}s "
                f"({stages})",
                flush=True,
            )
            print(
                f"   nightly ÷ embed = {r['nightly_over_embed']:.2f} (goal <= 1.5); the train stage embedded "
                f"{r['cutoff_texts_embedded']} texts as of the cutoff in {r['cutoff_embed_seconds']:.0f}s; "
                f"nightly ÷ all embedding = {r['nightly_over_all_embedding']:.2f}"
            )
            stages = ", ".join(f"{k} {v:.0f}s" for k, v in r["second_stages"].items())
            print(
                f"   next day, {r['active_users']} active users: {r['second_wall']:.0f}s ({stages}); "
                f"{r['second_embedded']} re-embedded, {r['second_scored']} re-scored; "
                f"next day ÷ first = {r['next_day_over_first']:.3f} (goal <= 0.1)",
                flush=True,
            )
            if "full_wall" in r:
                stages = ", ".join(f"{k} {v:.0f}s" for k, v in r["full_stages"].items())
                print(
                    f"   full night (new template, {r['full_embedded']} re-embedded, "
                    f"{'trained' if r['full_trained'] else 'no training'}): {r['full_wall']:.0f}s ({stages}); "
                    f"nightly ÷ embed = {r['full_night_over_embed']:.2f} (goal <= 1.5)",
                    flush=True,
                )
        if len(results) > 1:
            small, large = min(results), max(results)
            per = {n: results[n]["first_wall"] / results[n]["raw_events"] for n in (small, large)}
            print(f"per-event nightly cost {large:,} ÷ {small:,} = {per[large] / per[small]:.2f} (goal <= 1.1)")
        print(json.dumps({str(k): v for k, v in results.items()}, default=str))
    finally:
        spark.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
