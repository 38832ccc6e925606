"""``userlens``: one entry point for every command.

Each stage command also runs as ``spark-submit jobs/<stage>.py`` with the same
options. Exit code 0 on success; otherwise one line on stderr naming the cause
(2 for configuration and secret errors, 1 for everything else).
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from userlens import __version__
from userlens.config import Settings, load_settings
from userlens.errors import UserlensError, first_line

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger("userlens")

STAGES_NOT_BUILT = ("score", "profile", "nightly", "forget", "report")


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--conf", action="append", default=[], metavar="FILE",
                        help="config file layered over conf/base.yaml (repeatable; default conf/local.yaml)")
    common.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="override one dotted config key, e.g. storage.warehouse=/data/wh (repeatable)")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")

    parser = argparse.ArgumentParser(prog="userlens", description="Spark batch jobs for user-behavior modeling.")
    parser.add_argument("--version", action="version", version=f"userlens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sample = sub.add_parser("sample", parents=[common], help="write synthetic raw logs and an item catalog")
    sample.add_argument("--out", help="output folder (default: sample.out)")
    sample.add_argument("--users", type=int, help="number of users (default: sample.users)")
    sample.add_argument("--days", type=int, help="number of days (default: sample.days)")
    sample.add_argument("--seed", type=int, help="random seed (default: sample.seed)")
    sample.add_argument("--start-date", type=_date, help="first day, YYYY-MM-DD (default: sample.start_date)")

    ingest = sub.add_parser("ingest", parents=[common], help="raw logs -> events, events_quarantine, items")
    ingest.add_argument("--date", type=_date, help="ingest raw dates up to this one (default: the latest)")
    ingest.add_argument("--full", action="store_true", help="re-ingest every raw date")

    textualize = sub.add_parser("textualize", parents=[common], help="events -> one text per user (user_texts)")
    textualize.add_argument("--date", type=_date, help="as-of date (default: the latest event date)")

    embed = sub.add_parser("embed", parents=[common], help="user_texts, items -> user_embeddings, item_embeddings")
    embed.add_argument("--date", type=_date, help="as-of date of the texts (default: the latest)")

    train = sub.add_parser("train", parents=[common], help="point-in-time labels -> TorchDistributor -> model")
    train.add_argument("--date", type=_date, help="as-of date; the cutoff is date - train.horizon_days "
                                                  "(default: the latest event date)")

    for name in STAGES_NOT_BUILT:
        stage = sub.add_parser(name, parents=[common], help=f"{name} stage (not built yet)")
        stage.add_argument("--date", type=_date)
        if name == "forget":
            stage.add_argument("--user-id")
        if name == "report":
            stage.add_argument("--out")

    demo = sub.add_parser("demo", parents=[common], help="sample data + the pipeline on the embedded default")
    demo.add_argument("--users", type=int, help="number of sample users (default: sample.users)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        settings = load_settings(args.conf or None, args.overrides)
        return COMMANDS[args.command](args, settings)
    except UserlensError as exc:
        log.debug("failure", exc_info=True)
        print(f"userlens: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("userlens: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one-line contract holds for the unexpected too
        log.debug("failure", exc_info=True)
        print(f"userlens: error: {type(exc).__name__}: {first_line(exc)} (rerun with -v for details)",
              file=sys.stderr)
        return 1


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s userlens %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)
    for noisy in ("py4j", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _spark(settings: Settings) -> "SparkSession":
    from userlens.spark import get_spark

    return get_spark(settings)


def _stage(name: str, settings: Settings, spark: "SparkSession", body: Callable[..., object]) -> object:
    """Run ``body(run)`` and record its pipeline_runs row, failed or not."""
    from userlens.runs import StageRun, new_run_id
    from userlens.tables import Tables

    run = StageRun(stage=name, run_id=os.environ.get("USERLENS_RUN_ID") or new_run_id())
    tables = Tables(spark, settings.storage)
    try:
        result = body(run)
    except BaseException as exc:
        run.details["error"] = f"{type(exc).__name__}: {first_line(exc)}"
        try:
            run.record(tables, "failed")
        except Exception:  # noqa: BLE001 - the original error is the one to report
            log.debug("could not record the failed run", exc_info=True)
        raise
    run.record(tables, "succeeded")
    return result


def cmd_sample(args: argparse.Namespace, settings: Settings) -> int:
    from userlens.sample import SampleSpec, generate_sample

    cfg = settings.sample
    spec = SampleSpec(users=args.users or cfg.users, days=args.days or cfg.days,
                      seed=cfg.seed if args.seed is None else args.seed,
                      start_date=args.start_date or cfg.start_date, items=cfg.items,
                      malformed_fraction=cfg.malformed_fraction, pii_fraction=cfg.pii_fraction)
    out = args.out or cfg.out
    summary = generate_sample(_spark(settings), out, spec)
    print(f"sample: {summary.lines_written} raw event lines ({summary.first_date} .. {summary.last_date}) "
          f"in {summary.events_dir}, {summary.items_written} items in {summary.items_dir}")
    return 0


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    from userlens.privacy import load_key
    from userlens.stages.ingest import run_ingest

    key = load_key(settings.privacy)  # before Spark: a missing secret writes nothing
    spark = _spark(settings)
    result = _stage("ingest", settings, spark, lambda run: run_ingest(spark, settings, key, run, args.date, args.full))
    print(f"ingest: {result.rows_in} rows in -> {result.rows_out} events, {result.quarantined} quarantined, "
          f"{result.duplicates} duplicates; {result.items_out} items (as of {result.as_of_date})")
    return 0


def cmd_textualize(args: argparse.Namespace, settings: Settings) -> int:
    from userlens.stages.textualize import run_textualize

    spark = _spark(settings)
    result = _stage("textualize", settings, spark, lambda run: run_textualize(spark, settings, run, args.date))
    print(f"textualize: {result.users} user texts as of {result.as_of_date} ({result.texts_inserted} new, "
          f"{result.texts_updated} changed)")
    return 0


def cmd_embed(args: argparse.Namespace, settings: Settings) -> int:
    from userlens.stages.embed import run_embed

    spark = _spark(settings)
    result = _stage("embed", settings, spark, lambda run: run_embed(spark, settings, run, args.date))
    _print_embed(result)
    return 0


def _print_embed(result: object) -> None:
    users, items = result.users, result.items
    print(f"embed: users {users.embedded} embedded ({users.texts_embedded} distinct texts), {users.unchanged} "
          f"unchanged, {users.empty} empty; items {items.embedded} embedded, {items.unchanged} unchanged "
          f"(model {result.model_id}, as of {result.as_of_date})")


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from userlens.stages.train import check_train_settings, run_train

    check_train_settings(settings)  # before Spark starts
    spark = _spark(settings)
    result = _stage("train", settings, spark, lambda run: run_train(spark, settings, run, args.date))
    _print_train(result)
    return 0


def _print_train(result: object) -> None:
    print(f"train: model {result.version} in {result.path}")
    print(f"  cutoff {result.cutoff} (as of {result.as_of_date}); users " +
          ", ".join(f"{s} {n}" for s, n in result.users.items()))
    for task, values in result.model.items():
        base = result.baseline.get(task, {})
        if "auc" in values:
            print(f"  {task:<14} test AUC {values['auc']:.3f}  PR-AUC {values['pr_auc']:.3f}  "
                  f"log loss {values['log_loss']:.3f}  ECE {values['ece']:.3f}   "
                  f"baseline AUC {base.get('auc', float('nan')):.3f}")
        else:
            print(f"  {task:<14} test accuracy {values['accuracy']:.3f}  top-3 {values['top3_accuracy']:.3f}   "
                  f"baseline {base.get('accuracy', float('nan')):.3f} / {base.get('top3_accuracy', float('nan')):.3f}")
    if result.dp:
        print(f"  DP-SGD: epsilon {result.dp['epsilon']:.2f} at delta {result.dp['delta']:g}")


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from userlens.privacy import load_key
    from userlens.sample import SampleSpec, generate_sample
    from userlens.stages.ingest import run_ingest
    from userlens.stages.embed import run_embed
    from userlens.stages.textualize import run_textualize
    from userlens.stages.train import check_train_settings, latest_version, models_root, run_train
    from userlens.tables import TABLES, Tables

    from pyspark.sql import functions as F

    key = load_key(settings.privacy)
    check_train_settings(settings)
    spark = _spark(settings)
    cfg = settings.sample
    spec = SampleSpec(users=args.users or cfg.users, days=cfg.days, seed=cfg.seed, start_date=cfg.start_date,
                      items=cfg.items, malformed_fraction=cfg.malformed_fraction, pii_fraction=cfg.pii_fraction)
    log.info("demo: writing sample logs for %d users x %d days to %s", spec.users, spec.days, settings.source.path)
    summary = generate_sample(spark, settings.source.path, spec)
    log.info("demo: %d raw event lines written", summary.lines_written)
    _stage("ingest", settings, spark, lambda run: run_ingest(spark, settings, key, run, None, True))
    _stage("textualize", settings, spark, lambda run: run_textualize(spark, settings, run))
    _print_embed(_stage("embed", settings, spark, lambda run: run_embed(spark, settings, run)))
    if latest_version(settings) is None:
        _print_train(_stage("train", settings, spark, lambda run: run_train(spark, settings, run)))
    else:
        print(f"train: model {latest_version(settings)} exists; `userlens train` trains a new one")
    tables = Tables(spark, settings.storage)
    print(f"\nuserlens demo: tables in {tables.root}")
    for name in TABLES:
        if tables.exists(name):
            print(f"  {name:<20} {tables.read(name).count():>10,d} rows   {tables.location(name)}")
    if latest_version(settings):
        print(f"  {'model':<20} {latest_version(settings):>21}   {models_root(settings)}")
    example = tables.read("user_texts").orderBy(F.desc("n_events")).select("text").first()
    if example is not None:
        print("\nthe text of the most active user:\n  " + example[0].replace("\n", "\n  "))
    return 0


def cmd_not_built(args: argparse.Namespace, settings: Settings) -> int:
    raise UserlensError(f"the {args.command} stage is not built yet (see the project's open issues)")


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "sample": cmd_sample, "ingest": cmd_ingest, "textualize": cmd_textualize, "embed": cmd_embed,
    "train": cmd_train,
    "demo": cmd_demo,
    **{name: cmd_not_built for name in STAGES_NOT_BUILT},
}


if __name__ == "__main__":
    sys.exit(main())
