"""``userlens``: one entry point for every command.

The stage commands come from the stage registry (:data:`userlens.stages.STAGES`): their options, help,
checks before Spark and one-line summaries. Each stage command also runs as ``spark-submit
jobs/<stage>.py`` with the same options. Exit code 0 on success; otherwise one line on stderr naming the
cause (2 for configuration and secret errors, 1 for everything else).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from userlens import __version__, progress
from userlens.config import DEFAULT_CONF, Settings, load_settings
from userlens.errors import ConfigError, UserlensError, first_line
from userlens.sources.preflight import check_source, check_warehouse, require_local_path
from userlens.stages import BY_COMMAND, BY_NAME, STAGES, Stage, StageCall, check_nightly_settings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from userlens.privacy import PseudonymKey

log = logging.getLogger("userlens")


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None


def _add_stage(sub: Any, common: argparse.ArgumentParser, stage: Stage) -> None:
    epilog = f"example: {stage.example}" if stage.example else None
    parser = sub.add_parser(
        stage.command,
        parents=[common],
        help=stage.help,
        description=stage.description or stage.help[:1].upper() + stage.help[1:] + ".",
        epilog=epilog,
    )
    if stage.date_help:
        parser.add_argument("--date", type=_date, help=stage.date_help)
    for option in stage.options:
        if option.kind == "flag":
            parser.add_argument(option.flag, dest=option.name, action="store_true", help=option.help)
        else:
            parser.add_argument(
                option.flag, dest=option.name, required=option.required, help=option.help, metavar=option.metavar
            )


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--conf",
        action="append",
        default=[],
        metavar="FILE",
        help="config file layered over conf/base.yaml (repeatable; default conf/local.yaml)",
    )
    common.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="KEY=VALUE",
        help="override one dotted config key, e.g. storage.warehouse=/data/wh (repeatable)",
    )
    loudness = common.add_mutually_exclusive_group()
    loudness.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, Spark's INFO lines and full tracebacks"
    )
    loudness.add_argument("-q", "--quiet", action="store_true", help="warnings, errors and the command's result only")
    common.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="json: one JSON object per log line on stderr, for schedulers (default: text)",
    )

    parser = argparse.ArgumentParser(prog="userlens", description="Spark batch jobs for user-behavior modeling.")
    parser.add_argument("--version", action="version", version=f"userlens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sample = sub.add_parser(
        "sample",
        parents=[common],
        help="write synthetic raw logs and an item catalog",
        description="Write synthetic raw event logs (JSON lines, one folder per date, with malformed rows and "
        "planted PII for the pipeline to catch) and an item catalog: the data `userlens demo` runs on.",
        epilog="example: userlens sample --out data/sample --users 5000",
    )
    sample.add_argument("--out", help="output folder (default: sample.out)")
    sample.add_argument("--users", type=int, help="number of users (default: sample.users)")
    sample.add_argument("--days", type=int, help="number of days (default: sample.days)")
    sample.add_argument("--seed", type=int, help="random seed (default: sample.seed)")
    sample.add_argument("--start-date", type=_date, help="first day, YYYY-MM-DD (default: sample.start_date)")

    check = sub.add_parser(
        "check-source",
        parents=[common],
        help="check source.path and source.mapping and print 5 mapped rows, pseudonymized (docs/own-data.md)",
        description="Check your source before the first ingest: its paths, format and the columns source.mapping "
        "names; prints 5 rows as ingest would map them, user ids pseudonymized. Writes nothing.",
        epilog="example: userlens check-source --conf my-source.yaml",
    )
    del check

    for stage in STAGES:
        _add_stage(sub, common, stage)

    nightly = sub.add_parser(
        "nightly",
        parents=[common],
        help="every stage for one as-of date, incrementally",
        description="Ingest, textualize, embed, train (when due), score, the quality gate, profile, quarantine "
        "retention, report and privacy check for one as-of date, under the warehouse's run lock; only changed "
        "users are re-embedded and re-scored. docs/operations.md.",
        epilog="example: userlens nightly --conf conf/cluster.yaml",
    )
    nightly.add_argument("--date", type=_date, help="as-of date (default: the newest raw date)")
    nightly.add_argument(
        "--report-out", metavar="FILE.html", help="where the report goes (default: nightly.report_dir)"
    )

    publish = sub.add_parser(
        "publish",
        parents=[common],
        help="score, gate and profile one night again: publish a night the quality gate refused (--force)",
        description="Run score, the quality gate and profile for one as-of date under the nightly's run lock. "
        "With --force the model the gate refused is the candidate again and failed checks are recorded but do "
        "not stop the publication: for an operator who has looked at why the gate refused the night. "
        "docs/operations.md.",
        epilog="example: userlens publish --force --date 2026-10-30",
    )
    publish.add_argument("--date", type=_date, help="as-of date (default: the newest embedding date)")
    publish.add_argument("--force", action="store_true", help="publish even when a check fails")

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="sample data + the pipeline on the embedded default",
        description="Write the synthetic sample to sample.out and run the nightly pipeline on it into the local "
        "warehouse, on the public development key; prints what each stage did and where the tables are.",
        epilog="example: userlens demo --users 2000",
    )
    demo.add_argument("--users", type=int, help="number of sample users (default: sample.users)")

    pseudo = sub.add_parser(
        "pseudonymize",
        parents=[common],
        help="your ids -> their user_key (the warehouse's key), written to a file; nothing printed but counts",
        description="Read a file of raw user ids (a CRM export) and write it back with a user_key column, computed "
        "with the warehouse's key exactly as ingest does, so that user_profiles can be joined to your ids. Neither "
        "the ids nor the keys are printed. docs/profiles.md.",
        epilog="example: userlens pseudonymize --in crm.csv --column customer_id --out crm_keys.parquet",
    )
    pseudo.add_argument("--in", dest="source", required=True, metavar="FILE", help="CSV (with a header) or Parquet")
    pseudo.add_argument("--column", required=True, help="the column holding the raw user ids")
    pseudo.add_argument("--out", required=True, metavar="PATH", help="output: .csv, else Parquet")

    status = sub.add_parser(
        "status",
        parents=[common],
        help="tables (rows, Delta versions), the last run of each stage, the model, the lock; no Spark job",
        description="What the warehouse holds, read from the Delta logs (no Spark): every table's version, "
        "rows and files, the last run of each stage, the published model and its headline metrics, the run lock.",
        epilog="example: userlens status --conf conf/cluster.yaml --json",
    )
    status.add_argument("--json", action="store_true", help="one JSON document instead of the tables")

    evaluate = sub.add_parser(
        "evaluate",
        parents=[common],
        help="a public dataset under a published protocol: userlens beside baselines",
        description="Fit userlens and tuned baselines (popularity, ALS, EASE, item-kNN) on a public dataset you "
        "downloaded, choose every setting on a validation split, score the test split once and print the table "
        "with standard errors. Writes nothing to the warehouse unless --record. docs/datasets.md.",
        epilog="example: userlens evaluate --dataset movielens-100k --path ~/data/ml-100k --protocol stratified-75",
    )
    evaluate.add_argument(
        "--dataset",
        required=True,
        metavar="NAME",
        help="a preset in conf/datasets (movielens-100k, movielens, amazon, sequences, "
        "retailrocket) or a preset YAML file; docs/datasets.md",
    )
    evaluate.add_argument("--path", required=True, metavar="DIR", help="your downloaded copy (sets source.path)")
    evaluate.add_argument(
        "--protocol", required=True, choices=["loo-full", "stratified-75", "cold-items", "next-window"]
    )
    evaluate.add_argument(
        "--k", type=int, nargs="+", metavar="K", help="cut-offs (default: 5 10 20 for loo-full, 10 for stratified-75)"
    )
    evaluate.add_argument(
        "--date",
        type=_date,
        help="next-window as-of date; the cutoff is date - evaluate.horizon_days (default: the latest event date)",
    )
    evaluate.add_argument("--out", metavar="FILE.md", help="also write the table to this file")
    evaluate.add_argument(
        "--record",
        action="store_true",
        help="record the run in the warehouse's pipeline_runs (default: the warehouse is not touched)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet, args.log_format)
    try:
        settings = load_settings(args.conf or None, [*_spark_log_level(args), *args.overrides])
        return COMMANDS.get(args.command, cmd_stage)(args, settings)
    except UserlensError as exc:
        log.debug("failure", exc_info=True)
        print(f"userlens: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("userlens: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one-line contract holds for the unexpected too
        log.debug("failure", exc_info=True)
        print(f"userlens: error: {type(exc).__name__}: {first_line(exc)} (rerun with -v for details)", file=sys.stderr)
        return 1


class JsonLines(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class ConsoleFilter(logging.Filter):
    """The default console: the line each stage ends with (``userlens.runs``: name, status, seconds, counts),
    the CLI's own lines, and warnings and errors, each message once. ``-v`` lets every record through."""

    SHOWN = frozenset({"userlens", "userlens.runs"})

    def __init__(self) -> None:
        super().__init__()
        self.warned: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return record.name in self.SHOWN
        message = record.getMessage()
        if message in self.warned:
            return False
        self.warned.add(message)
        return True


def _setup_logging(verbose: bool, quiet: bool = False, log_format: str = "text") -> None:
    """userlens (and pyspark's Python loggers) to stderr; results go to stdout. Every record still reaches the
    loggers' other handlers (a notebook's, pytest's): only this console handler is filtered."""
    handler = logging.StreamHandler(sys.stderr)
    if not verbose and log_format == "text":  # JSON lines are for machines: every record, each one parsed
        handler.addFilter(ConsoleFilter())
    if log_format == "json":
        handler.setFormatter(JsonLines())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s userlens %(levelname)s %(message)s", "%H:%M:%S"))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
        handlers=[handler],
        force=True,
    )
    for noisy in ("py4j", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # a task bar on a terminal (userlens.progress); never in quiet or JSON output
    progress.configure(False if quiet or log_format == "json" else None)


def _spark_log_level(args: argparse.Namespace) -> list[str]:
    """-v and -q move Spark's log level too (an explicit --set spark.log_level, given after, wins)."""
    if args.verbose:
        return ["spark.log_level=INFO", "train.log_every_epochs=1"]
    if args.quiet:
        return ["spark.log_level=ERROR"]
    return []


def _spark(settings: Settings) -> "SparkSession":
    from userlens.spark import get_spark

    return get_spark(settings)


def _key(settings: Settings) -> "PseudonymKey":
    from userlens.privacy import load_key

    return load_key(settings.privacy)


def preflight(stage: Stage, settings: Settings, alone: bool = True) -> "PseudonymKey | None":
    """What a stage checks before Spark starts: its key, the paths it reads (a missing one fails in a
    second), its settings and, run ``alone`` (not in the nightly), what must exist before it; the key, for
    stages that pseudonymize."""
    key = _key(settings) if stage.needs_key else None
    if stage.warehouse:
        check_warehouse(settings)
    if stage.source is not None:
        check_source(settings, items=stage.source == "items")
    for check in (*stage.checks, *(stage.requires if alone else ())):
        check(settings)
    return key


def cmd_stage(args: argparse.Namespace, settings: Settings) -> int:
    """Any stage of the registry: pre-flight, Spark, the run and its pipeline_runs row, the summary."""
    from userlens.runs import run_stage

    stage = BY_COMMAND[args.command]
    key = preflight(stage, settings)
    spark = _spark(settings)
    call = stage.prepare(
        StageCall(
            spark, settings, key, getattr(args, "date", None), {o.name: getattr(args, o.name) for o in stage.options}
        )
    )
    try:
        result = run_stage(stage.name, settings, spark, lambda run: stage.run(call, run))
    except UserlensError as exc:
        if getattr(exc, "result", None) is not None:  # a failure with a result (privacy-check): its table first
            print(stage.summary(exc.result))  # type: ignore[attr-defined]
        raise
    print(stage.summary(result))
    return 0


def cmd_sample(args: argparse.Namespace, settings: Settings) -> int:
    from userlens.sample import SampleSpec, generate_sample

    cfg = settings.sample
    spec = SampleSpec(
        users=args.users or cfg.users,
        days=args.days or cfg.days,
        seed=cfg.seed if args.seed is None else args.seed,
        start_date=args.start_date or cfg.start_date,
        items=cfg.items,
        malformed_fraction=cfg.malformed_fraction,
        pii_fraction=cfg.pii_fraction,
    )
    out = args.out or cfg.out
    summary = generate_sample(_spark(settings), out, spec)
    print(
        f"sample: {summary.lines_written} raw event lines ({summary.first_date} .. {summary.last_date}) "
        f"in {summary.events_dir}, {summary.items_written} items in {summary.items_dir}"
    )
    return 0


def cmd_check_source(args: argparse.Namespace, settings: Settings) -> int:
    from userlens.stages.ingest import check_source_sample

    key = _key(settings)
    check_source(settings)
    print(check_source_sample(_spark(settings), settings, key).describe())
    return 0


def _nightly_preflight(settings: Settings) -> "PseudonymKey":
    """The night's checks before Spark: its stages' (the warehouse may not exist yet), and the key."""
    key = _key(settings)
    check_source(settings)
    check_nightly_settings(settings)
    return key


def cmd_nightly(args: argparse.Namespace, settings: Settings) -> int:
    from userlens.stages.nightly import run_nightly

    key = _nightly_preflight(settings)
    print(_nightly_summary(run_nightly(_spark(settings), settings, key, args.date, args.report_out)))
    return 0


def cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
    from userlens.stages.nightly import run_publish

    check_warehouse(settings)
    print(_nightly_summary(run_publish(_spark(settings), settings, args.date, args.force)))
    return 0


def _nightly_summary(result: Any) -> str:
    return "\n".join(
        [
            f"nightly: as of {result.as_of_date}",
            *[BY_NAME[name].summary(stage_result) for name, stage_result in result.stages.items()],
        ]
    )


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from pyspark.sql import functions as F

    from userlens.artifacts import ModelStore
    from userlens.privacy import expect_dev_key
    from userlens.sample import SampleSpec, generate_sample
    from userlens.stages.nightly import run_nightly
    from userlens.tables import TABLES, Tables

    expect_dev_key()
    key = _key(settings)
    if key.is_dev_key:
        print(
            "demo: pseudonyms use the PUBLIC development key (privacy.dev_key): fine for the sample, not for real data"
        )
    spark = _spark(settings)
    cfg = settings.sample
    spec = SampleSpec(
        users=args.users or cfg.users,
        days=cfg.days,
        seed=cfg.seed,
        start_date=cfg.start_date,
        items=cfg.items,
        malformed_fraction=cfg.malformed_fraction,
        pii_fraction=cfg.pii_fraction,
    )
    log.info("demo: writing sample logs for %d users x %d days to %s", spec.users, spec.days, settings.source.path)
    summary = generate_sample(spark, settings.source.path, spec)
    log.info("demo: %d raw event lines written", summary.lines_written)
    _nightly_preflight(settings)
    result = run_nightly(spark, settings, key, None, None)
    print(_nightly_summary(result))
    tables = Tables(spark, settings.storage)
    if "privacy_check" in result.stages:  # its table above has every table's rows
        print(f"\nuserlens demo: tables in {tables.root} (their rows: the privacy-check table above)")
    else:
        print(f"\nuserlens demo: tables in {tables.root}")
        for name in TABLES:
            if tables.exists(name):
                print(f"  {name:<20} {tables.read(name).count():>10,d} rows   {tables.location(name)}")
    store = ModelStore.of(settings)
    latest = store.latest()
    if latest:
        print(f"  {'model':<20} {latest:>21}   {store.root}")
    if result.report:
        print(f"  {'report':<20} {'':>21}   {result.report}")
    example = tables.read("user_texts").orderBy(F.desc("n_events")).select("text", "state_text").first()
    if example is not None:
        print("\nthe text of the most active user:\n  " + example[0].replace("\n", "\n  "))
        if example[1]:
            print("its state text:\n  " + example[1])
    return 0


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from userlens.eval.evaluate import run_evaluate
    from userlens.runs import run_stage
    from userlens.sources.datasets import preset_path

    require_local_path(args.path, "--path")
    if args.k and min(args.k) < 1:
        raise ConfigError(f"--k: cut-offs must be >= 1, got {' '.join(map(str, args.k))}")
    preset = preset_path(args.dataset)
    # the preset layers over the --conf files; --path and then --set win over both
    settings = load_settings(
        [*(args.conf or [DEFAULT_CONF]), preset], [f"source.path={json.dumps(args.path)}", *args.overrides]
    )
    key = _key(settings)
    spark = _spark(settings)
    result = run_stage(
        "evaluate",
        settings,
        spark,
        lambda run: run_evaluate(spark, settings, key, run, preset.stem, args.protocol, args.k, args.date),
        record=args.record,
    )
    print(result.table, end="")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(result.table, encoding="utf-8")
        print(f"evaluate: table written to {out}")
    return 0


def cmd_pseudonymize(args: argparse.Namespace, settings: Settings) -> int:
    from pyspark.sql import functions as F

    from userlens.errors import MissingColumnsError
    from userlens.privacy import pseudonymize

    require_local_path(args.source, "--in")
    key = _key(settings)
    spark = _spark(settings)
    csv = args.source.lower().endswith((".csv", ".csv.gz"))
    ids = spark.read.option("header", "true").csv(args.source) if csv else spark.read.parquet(args.source)
    if args.column not in ids.columns:
        raise MissingColumnsError(f"--column: {args.source}", [args.column], ids.columns)
    keyed = ids.withColumn("user_key", pseudonymize(F.col(args.column).cast("string"), key))
    if args.out.lower().endswith(".csv"):
        keyed.write.mode("overwrite").option("header", "true").csv(args.out)
        written = spark.read.option("header", "true").csv(args.out)
    else:
        keyed.write.mode("overwrite").parquet(args.out)
        written = spark.read.parquet(args.out)
    counts = written.agg(F.count(F.lit(1)).alias("rows"), F.count("user_key").alias("keyed")).first()
    assert counts is not None  # an aggregate without groupBy has one row
    print(
        f"pseudonymize: {counts['rows']:,d} rows, {counts['keyed']:,d} with a user_key (key {key.key_id}) "
        f"written to {args.out}; rows with a blank id have none"
    )
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from userlens.status import warehouse_status

    status = warehouse_status(settings)
    print(status.to_json() if args.json else status.describe())
    return 0


# commands that are not one stage; every other command is a stage of the registry (cmd_stage)
COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "pseudonymize": cmd_pseudonymize,
    "status": cmd_status,
    "sample": cmd_sample,
    "check-source": cmd_check_source,
    "nightly": cmd_nightly,
    "publish": cmd_publish,
    "demo": cmd_demo,
    "evaluate": cmd_evaluate,
}


if __name__ == "__main__":
    sys.exit(main())
