"""``userlens``: one entry point for every command.

Each stage command also runs as ``spark-submit jobs/<stage>.py`` with the same
options. Exit code 0 on success; otherwise one line on stderr naming the cause
(2 for configuration and secret errors, 1 for everything else).
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from userlens import __version__
from userlens.config import Settings, load_settings
from userlens.errors import UserlensError, first_line

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger("userlens")

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

    score = sub.add_parser("score", parents=[common], help="the latest model over changed users -> user_scores")
    score.add_argument("--date", type=_date, help="as-of date (default: the newest embedding date)")

    profile = sub.add_parser("profile", parents=[common],
                             help="embeddings, scores, segments, interests, RFM -> user_profiles")
    profile.add_argument("--date", type=_date, help="as-of date (default: the newest embedding date)")

    nightly = sub.add_parser("nightly", parents=[common], help="every stage for one as-of date, incrementally")
    nightly.add_argument("--date", type=_date, help="as-of date (default: the newest raw date)")
    nightly.add_argument("--report-out", metavar="FILE.html", help="where the report goes "
                                                                   "(default: nightly.report_dir)")

    forget = sub.add_parser("forget", parents=[common], help="delete one person from every table (erasure)")
    forget.add_argument("--user-id", required=True, help="the raw user id as it appears in the source logs")

    check = sub.add_parser("privacy-check", parents=[common],
                           help="scan every table for raw user ids and PII; a pass/fail table (exit 1 on fail)")
    check.add_argument("--full", action="store_true",
                       help="scan every row, not only the rows added since the last passing check "
                            "(see privacy.check_full_every_days)")

    report = sub.add_parser("report", parents=[common], help="one self-contained HTML report")
    report.add_argument("--out", metavar="FILE.html", help="output file (default: nightly.report_dir)")

    demo = sub.add_parser("demo", parents=[common], help="sample data + the pipeline on the embedded default")
    demo.add_argument("--users", type=int, help="number of sample users (default: sample.users)")

    evaluate = sub.add_parser("evaluate", parents=[common],
                              help="a public dataset under a published protocol: userlens beside baselines")
    evaluate.add_argument("--dataset", required=True, metavar="NAME",
                          help="a preset in conf/datasets (movielens-100k, movielens, amazon, sequences, "
                               "retailrocket) or a preset YAML file; docs/datasets.md")
    evaluate.add_argument("--path", required=True, metavar="DIR", help="your downloaded copy (sets source.path)")
    evaluate.add_argument("--protocol", required=True, choices=["loo-full", "stratified-75", "next-window"])
    evaluate.add_argument("--k", type=int, nargs="+", metavar="K",
                          help="cut-offs (default: 5 10 20 for loo-full, 10 for stratified-75)")
    evaluate.add_argument("--date", type=_date, help="next-window as-of date; the cutoff is date - "
                                                     "evaluate.horizon_days (default: the latest event date)")
    evaluate.add_argument("--out", metavar="FILE.md", help="also write the table to this file")

    sub.add_parser("check-source", parents=[common],
                   help="check source.path and source.mapping and print 5 mapped rows, pseudonymized "
                        "(docs/own-data.md)")
    return parser


def _source_preflight(items: bool) -> Callable[[argparse.Namespace, Settings], None]:
    def check(args: argparse.Namespace, settings: Settings) -> None:
        from userlens.sources.preflight import check_source

        check_source(settings, items=items)
    return check


def _warehouse_preflight(args: argparse.Namespace, settings: Settings) -> None:
    from userlens.sources.preflight import check_warehouse

    check_warehouse(settings)


def _privacy_check_preflight(args: argparse.Namespace, settings: Settings) -> None:
    _warehouse_preflight(args, settings)
    _source_preflight(items=False)(args, settings)


def _evaluate_preflight(args: argparse.Namespace, settings: Settings) -> None:
    from userlens.sources.preflight import require_local_path

    require_local_path(args.path, "--path")


# Checks that need no Spark: a missing path or a wrong mapping fails in a second, before a session starts
PREFLIGHT: dict[str, Callable[[argparse.Namespace, Settings], None]] = {
    "ingest": _source_preflight(items=True), "nightly": _source_preflight(items=True),
    "check-source": _source_preflight(items=True), "privacy-check": _privacy_check_preflight,
    "evaluate": _evaluate_preflight,
    **dict.fromkeys(("textualize", "embed", "train", "score", "profile", "report", "forget"), _warehouse_preflight),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        settings = load_settings(args.conf or None, args.overrides)
        if args.command in PREFLIGHT:
            PREFLIGHT[args.command](args, settings)
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
    from userlens.runs import run_stage

    return run_stage(name, settings, spark, body)


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
          f"{result.duplicates} duplicates; {result.items_out} items (as of {result.as_of_date})"
          + (f"; {len(result.skipped_files)} unreadable file(s) skipped" if result.skipped_files else ""))
    return 0


def cmd_check_source(args: argparse.Namespace, settings: Settings) -> int:
    from userlens.privacy import load_key
    from userlens.stages.ingest import check_source_sample

    key = load_key(settings.privacy)
    print(check_source_sample(_spark(settings), settings, key).describe())
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
        if task == "recommend":
            continue
        if "auc" in values:
            print(f"  {task:<14} test AUC {values['auc']:.3f}  PR-AUC {values['pr_auc']:.3f}  "
                  f"log loss {values['log_loss']:.3f}  ECE {values['ece']:.3f}   "
                  f"baseline AUC {base.get('auc', float('nan')):.3f}" +
                  ("   (head: the baseline's regression, which validated better)"
                   if result.heads.get(task) == "baseline" else ""))
        else:
            print(f"  {task:<14} test accuracy {values['accuracy']:.3f}  top-3 {values['top3_accuracy']:.3f}   "
                  f"baseline {base.get('accuracy', float('nan')):.3f} / {base.get('top3_accuracy', float('nan')):.3f}")
    if "recommend" in result.model:
        methods = {"two-tower": result.model["recommend"], "popularity": result.baseline.get("recommend_popularity", {}),
                   "ALS": result.baseline.get("recommend_als", {})}
        names = [n for n in result.model["recommend"] if n != "users"]
        print(f"  recommendations ({result.model['recommend'].get('users', 0)} test users with a next purchase): " +
              "; ".join(f"{m} " + " ".join(f"{n} {v.get(n, float('nan')):.3f}" for n in names)
                        for m, v in methods.items()))
    if result.dp:
        print(f"  DP-SGD: epsilon {result.dp['epsilon']:.2f} at delta {result.dp['delta']:g}")


def cmd_score(args: argparse.Namespace, settings: Settings) -> int:
    from userlens.stages.score import require_model, run_score

    require_model(settings)  # before Spark starts
    spark = _spark(settings)
    _print_score(_stage("score", settings, spark, lambda run: run_score(spark, settings, run, args.date)))
    return 0


def _print_score(r: object) -> None:
    print(f"score: {r.scored} users scored, {r.unchanged} unchanged (model {r.model_version}, as of {r.as_of_date})")


def cmd_profile(args: argparse.Namespace, settings: Settings) -> int:
    from userlens.stages.profile import run_profile

    spark = _spark(settings)
    _print_profile(_stage("profile", settings, spark, lambda run: run_profile(spark, settings, run, args.date)))
    return 0


def _print_profile(r: object) -> None:
    print(f"profile: {r.users} users as of {r.as_of_date} ({r.inserted} new, {r.updated} changed rows); "
          f"{r.segments_published} segments published, {r.segments_suppressed} suppressed as smaller than "
          f"privacy.min_segment_size ({r.users_in_suppressed_segments} users)")


def cmd_nightly(args: argparse.Namespace, settings: Settings) -> int:
    from userlens.privacy import load_key
    from userlens.stages.train import check_train_settings

    key = load_key(settings.privacy)
    check_train_settings(settings)
    spark = _spark(settings)
    _print_nightly(_run_nightly(spark, settings, key, args.date, args.report_out))
    return 0


def _run_nightly(spark: "SparkSession", settings: Settings, key: object, date: dt.date | None,
                 report_out: str | None) -> object:
    from userlens.stages.nightly import run_nightly

    return run_nightly(spark, settings, key, date, report_out)


def _print_nightly(result: object) -> None:
    printers = {"embed": _print_embed, "train": _print_train, "score": _print_score, "profile": _print_profile,
                "quarantine_retention": _print_retention, "privacy_check": _print_privacy_check}
    print(f"nightly: as of {result.as_of_date}")
    for name, stage_result in result.stages.items():
        if name in printers:
            printers[name](stage_result)
    if result.report:
        print(f"report: {result.report}")


def cmd_forget(args: argparse.Namespace, settings: Settings) -> int:
    from userlens.privacy import load_key
    from userlens.stages.forget import describe, run_forget

    key = load_key(settings.privacy)
    spark = _spark(settings)
    result = _stage("forget", settings, spark, lambda run: run_forget(spark, settings, key, args.user_id, run))
    print(describe(result))
    return 0


def _print_retention(r: object) -> None:
    print(f"quarantine_retention: {r.deleted} quarantined rows dated before {r.cutoff} deleted, {r.kept} kept")


def _print_privacy_check(result: object) -> None:
    from userlens.stages.privacy_check import format_table

    print(format_table(result))


def cmd_privacy_check(args: argparse.Namespace, settings: Settings) -> int:
    from userlens.stages.privacy_check import PrivacyCheckFailed, run_privacy_check

    spark = _spark(settings)
    try:
        result = _stage("privacy_check", settings, spark,
                        lambda run: run_privacy_check(spark, settings, run, args.full))
    except PrivacyCheckFailed as failed:
        _print_privacy_check(failed.result)  # the table first; main() prints the one-line cause
        raise
    _print_privacy_check(result)
    return 0


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from userlens.report import build_report

    spark = _spark(settings)
    result = _stage("report", settings, spark, lambda run: build_report(spark, settings, args.out))
    print(f"report: {result.path}")
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from userlens.privacy import load_key
    from userlens.sample import SampleSpec, generate_sample
    from userlens.stages.train import check_train_settings, latest_version, models_root
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
    result = _run_nightly(spark, settings, key, None, None)
    _print_nightly(result)
    tables = Tables(spark, settings.storage)
    print(f"\nuserlens demo: tables in {tables.root}")
    for name in TABLES:
        if tables.exists(name):
            print(f"  {name:<20} {tables.read(name).count():>10,d} rows   {tables.location(name)}")
    if latest_version(settings):
        print(f"  {'model':<20} {latest_version(settings):>21}   {models_root(settings)}")
    if result.report:
        print(f"  {'report':<20} {'':>21}   {result.report}")
    example = tables.read("user_texts").orderBy(F.desc("n_events")).select("text").first()
    if example is not None:
        print("\nthe text of the most active user:\n  " + example[0].replace("\n", "\n  "))
    return 0


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    import json
    from pathlib import Path

    from userlens.config import DEFAULT_CONF
    from userlens.datasets import preset_path
    from userlens.errors import ConfigError
    from userlens.privacy import load_key
    from userlens.stages.evaluate import run_evaluate

    if args.k and min(args.k) < 1:
        raise ConfigError(f"--k: cut-offs must be >= 1, got {' '.join(map(str, args.k))}")
    preset = preset_path(args.dataset)
    # the preset layers over the --conf files; --path and then --set win over both
    settings = load_settings([*(args.conf or [DEFAULT_CONF]), preset],
                             [f"source.path={json.dumps(args.path)}", *args.overrides])
    key = load_key(settings.privacy)
    spark = _spark(settings)
    result = _stage("evaluate", settings, spark, lambda run: run_evaluate(
        spark, settings, key, run, preset.stem, args.protocol, args.k, args.date))
    print(result.table, end="")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(result.table, encoding="utf-8")
        print(f"evaluate: table written to {out}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "sample": cmd_sample, "ingest": cmd_ingest, "textualize": cmd_textualize, "embed": cmd_embed,
    "train": cmd_train, "score": cmd_score, "profile": cmd_profile, "nightly": cmd_nightly,
    "forget": cmd_forget, "report": cmd_report, "demo": cmd_demo, "privacy-check": cmd_privacy_check,
    "evaluate": cmd_evaluate, "check-source": cmd_check_source,
}


if __name__ == "__main__":
    sys.exit(main())
