"""``userlens privacy-check``: scan every userlens table for raw user ids and PII; pass or fail.

For each table of ``TABLES`` that exists, every ``string`` and ``array<string>``
column (array elements joined by newlines) is searched, in Spark, for

* **raw user ids**: the distinct raw ids of the configured source (``source.path``
  read as ingest reads it, trimmed), as whole tokens. A token is a run of letters,
  digits and ``_ @ + -``, with inner dots (``u12.5``, ``a@b.com`` are one token):
  ``u12`` is found in ``"ask u12."`` and ``{"user_id":"u12"}``, not in ``u123``,
  ``xu12``, ``u12-b`` or ``u12@mail.com``. The tables' tokens are counted per
  (column, token) and joined to the ids on the token (an equi-join, never a
  cross join); an id that is not one token itself (``user 7``, ``a:b``) is joined
  on its first token and then looked up in the text. Ids shorter than
  ``privacy.check_min_id_chars`` are not searched (and counted).
* **PII**: ingest's own scrubber (``privacy.scrub_pii``, the ``PII_PATTERNS`` in
  their order) run again over the stored text; the placeholders it adds, per type
  (email, iban, card, ip, phone), are the hits. Text that ingest scrubbed is left
  unchanged by a second scrub, so only PII that got past ingest (or was written
  by something else) counts. Card numbers are counted as the scrubber masks them:
  every card-shaped digit run, Luhn-valid or not (docs/privacy.md).

Only counts reach the driver: per table and column, never a matched value. The
result is a pass/fail table (:func:`format_table`); a fail raises
:class:`PrivacyCheckFailed`, one line naming the tables and columns.

**Full or incremental** (:func:`plan_scope`). Delta data files never change once
written, so rows a passing check read stay checked. A passing check records each
table's Delta version in its ``pipeline_runs`` row; the next check scans, per
table, only the rows of the files the table's snapshot holds now and did not
hold at that version (appends, and the files a MERGE, UPDATE or DELETE rewrote),
against every raw id of the source. A full scan (every row) runs the first time,
when the last full pass is ``privacy.check_full_every_days`` or more days old
(7; 0 = always), with ``full=True`` (``userlens privacy-check --full``), and for a
table whose recorded version cannot be read back (its log cleaned up, the table
re-created). The full scans are what find a raw id that became a user's only
after the text holding it had been checked. ``user_texts`` gets a new row per
user every night, most with the text of the night before: a new row's text
equal (as a string) to a text of the newest partition the table had at the
checked version is not scanned again (:data:`SEEN_TEXTS`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from userlens.config import Settings
from userlens.errors import SourceError, UserlensError, first_line
from userlens.privacy import PII_PATTERNS, scrub_pii
from userlens.runs import RunRecord, StageRun
from userlens.sources.preflight import check_source
from userlens.sources.redact import without_epoch_values
from userlens.tables import TABLES, Tables

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

# letters, digits, _ @ + -, with dots inside (never at either end)
_CHAR = r"[\p{L}\p{N}_@+-]"
TOKEN = rf"{_CHAR}+(?:\.{_CHAR}+)*"
CONCURRENT_TABLES = 4  # tables scanned at once (Spark jobs from driver threads)
# (hash, text, date partition): in an incremental check a new row's text is not scanned again when it equals
# the text of a row with the same hash in the newest partition the table had at the checked version
# (user_texts gets a row per user every night, most of them unchanged)
SEEN_TEXTS: dict[str, tuple[str, str, str]] = {"user_texts": ("text_hash", "text", "as_of_date")}
# a text's tokens that equal a given sequence of tokens: no token character (or inner dot) on either side
_BEFORE, _AFTER = r"(?<![\p{L}\p{N}_.@+-])", rf"(?!{_CHAR}|\.{_CHAR})"
PII_TYPES: tuple[str, ...] = tuple(dict.fromkeys(kind for kind, _, _ in PII_PATTERNS))
PLACEHOLDERS: dict[str, str] = {kind: placeholder for kind, _, placeholder in PII_PATTERNS}


class PrivacyCheckFailed(UserlensError):
    """Raw ids or PII were found; the message is one line, ``result`` holds the table."""

    def __init__(self, result: "PrivacyCheckResult") -> None:
        super().__init__(result.failure_line())
        self.result = result

    def run_record(self) -> RunRecord:  # the failed run's row holds the table too
        return self.result.run_record()


# --------------------------------------------------------------------------
# column helpers and transforms
# --------------------------------------------------------------------------
def _struct_strings(t: T.DataType) -> list[str]:
    """The string fields of an ``array<struct>`` column's elements (user_scores.explanations), else []."""
    if isinstance(t, T.ArrayType) and isinstance(t.elementType, T.StructType):
        return [f.name for f in t.elementType.fields if isinstance(f.dataType, T.StringType)]
    return []


def text_columns(schema: T.StructType) -> list[str]:
    """Names of the ``string``, ``array<string>`` and ``array<struct>`` with string fields columns."""
    return [
        f.name
        for f in schema.fields
        if isinstance(f.dataType, T.StringType)
        or (isinstance(f.dataType, T.ArrayType) and isinstance(f.dataType.elementType, T.StringType))
        or _struct_strings(f.dataType)
    ]


def column_text(df: DataFrame, name: str) -> Column:
    """A column as one string: array elements (an array of structs: their string fields) joined by newlines
    (a token never spans two)."""
    column = F.col(f"`{name}`")
    fields = _struct_strings(df.schema[name].dataType)
    if fields:
        return F.concat_ws("\n", F.flatten(F.transform(column, lambda e: F.array(*[e[f] for f in fields]))))
    return F.concat_ws("\n", column) if isinstance(df.schema[name].dataType, T.ArrayType) else column


def tokens(text: Column) -> Column:
    """The tokens of a string (see the module docstring); an empty array for null."""
    return F.coalesce(F.regexp_extract_all(text, F.lit(TOKEN), F.lit(0)), F.array().cast("array<string>"))


def raw_id_table(raw_ids: DataFrame, min_chars: int) -> DataFrame:
    """(raw_id, anchor, single, searched) from a column ``raw_id``: the first token of each id, whether
    the id is that one token, and whether it is long enough to be searched."""
    ids = raw_ids.select(F.trim("raw_id").alias("raw_id")).where(F.length("raw_id") > 0).distinct()
    parts = tokens(F.col("raw_id"))
    first = F.try_element_at(parts, F.lit(1))  # null for an id without a token character
    return ids.select(
        "raw_id",
        first.alias("anchor"),
        ((F.size(parts) == 1) & (first == F.col("raw_id"))).alias("single"),
        (F.length("raw_id") >= min_chars).alias("searched"),
    )


def whole_tokens_pattern(text: Column) -> Column:
    """A Java regex (a Column, per row) that finds ``text`` literally, bounded as a whole token."""
    quoted = F.concat(F.lit("\\Q"), F.replace(text, F.lit("\\E"), F.lit("\\E\\\\E\\Q")), F.lit("\\E"))
    return F.concat(F.lit(_BEFORE), quoted, F.lit(_AFTER))


def _tagged(column: str):
    return lambda token: F.struct(F.lit(column).alias("column"), token.alias("token"))


def raw_id_hits(df: DataFrame, ids: DataFrame, multi_token_ids: bool = True) -> DataFrame:
    """(column, hits): raw ids found as whole tokens per text column of ``df``.

    ``ids`` is :func:`raw_id_table` (searched ids only). One-token ids count every
    occurrence; other ids (looked for only with ``multi_token_ids``) count the values that hold them.
    """
    columns = text_columns(df.schema)
    if not columns:
        return df.sparkSession.createDataFrame([], "column string, hits long")
    pairs = F.flatten(F.array(*[F.transform(tokens(column_text(df, c)), _tagged(c)) for c in columns]))
    counted = (
        df.select(F.explode(pairs).alias("p"))
        .select("p.column", "p.token")
        .groupBy("column", "token")
        .agg(F.count(F.lit(1)).alias("n"))
    )
    single = ids.where("single").select(F.col("raw_id").alias("token"))
    hits = counted.join(single, "token").select("column", "n")
    if not multi_token_ids:
        return hits.groupBy("column").agg(F.sum("n").cast("long").alias("hits"))

    multi = ids.where(~F.col("single")).select("raw_id", F.col("anchor").alias("token"))
    values = F.array(*[F.struct(F.lit(c).alias("column"), column_text(df, c).alias("value")) for c in columns])
    by_value = (
        df.select(F.explode(values).alias("v"))
        .select("v.column", "v.value")
        .where("value IS NOT NULL")
        .select("column", "value", F.explode(F.array_distinct(tokens(F.col("value")))).alias("token"))
        .join(F.broadcast(multi), "token")
        .where(F.rlike(F.col("value"), whole_tokens_pattern(F.col("raw_id"))))
        .select("column", F.lit(1).cast("long").alias("n"))
    )
    return hits.unionByName(by_value).groupBy("column").agg(F.sum("n").cast("long").alias("hits"))


# columns whose text is a redacted raw record: the epoch times it keeps on purpose are not card numbers
RAW_RECORDS: dict[str, tuple[str, ...]] = {"events_quarantine": ("raw",)}


def pii_counts(df: DataFrame, raw_records: tuple[str, ...] = ()) -> DataFrame:
    """One row: ``rows`` and, per text column and PII type, ``<column>|<type>``: the placeholders a
    second scrub adds (occurrences of PII ingest's scrubber finds in the stored text). In the
    ``raw_records`` columns, JSON values that are whole epoch times are not scanned
    (:func:`userlens.sources.redact.without_epoch_values`)."""
    columns = text_columns(df.schema)

    def text(c: str) -> Column:
        return without_epoch_values(column_text(df, c)) if c in raw_records else column_text(df, c)

    # scrub once per value, in a projection, then count each placeholder on its output
    projected = df.select(
        F.lit(1).alias("_row"),
        *[
            F.struct(text(c).alias("text"), scrub_pii(text(c)).alias("scrubbed")).alias(f"_{i}")
            for i, c in enumerate(columns)
        ],
    )
    aggregates = [F.count("_row").alias("rows")]
    for i, c in enumerate(columns):
        for kind in PII_TYPES:
            placeholder = F.lit(PLACEHOLDERS[kind])
            added = F.regexp_count(F.col(f"_{i}.scrubbed"), placeholder) - F.regexp_count(
                F.col(f"_{i}.text"), placeholder
            )
            aggregates.append(F.coalesce(F.sum(added), F.lit(0)).cast("long").alias(f"{c}|{kind}"))
    return projected.agg(*aggregates)


# --------------------------------------------------------------------------
# raw ids of the source
# --------------------------------------------------------------------------
def source_raw_ids(spark: "SparkSession", settings: Settings) -> DataFrame:
    """The raw user ids of ``source.path`` (column ``raw_id``), read the way ingest reads the source."""
    check_source(settings, spark, items=False)  # a mapping that names no column of the source: one line
    try:
        if settings.dataset.adapter:
            from userlens.sources.datasets import read_events

            raw = read_events(spark, settings).frame
        else:
            from userlens.sources.raw import read_raw

            source = settings.source
            only_ids = {"user_id": source.mapping.user_id}  # parse one field, not the whole event
            raw = read_raw(spark, source.events_location(), source.format, only_ids, source)
        return raw.select(F.col("f_user_id").alias("raw_id"))
    except UserlensError as exc:
        raise SourceError(f"privacy-check needs the raw user ids of source.path: {first_line(exc)}") from exc


# --------------------------------------------------------------------------
# runner
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckScope:
    """What a check reads: every row (``full``), or per table the files added since ``since[table]``."""

    full: bool
    why: str
    since: dict[str, int] = field(default_factory=dict)  # table -> Delta version a passing check read

    def since_version(self, table: str) -> int | None:
        return None if self.full else self.since.get(table)


@dataclass(frozen=True)
class TableCheck:
    table: str
    exists: bool
    rows: int = 0  # rows scanned
    version: int | None = None  # the table's Delta version scanned
    scanned: str = "all"  # "all", or "new since vN" (the rows of the files added after version N)
    raw_id_hits: dict[str, int] = field(default_factory=dict)  # column -> hits (hits only)
    pii_hits: dict[str, dict[str, int]] = field(default_factory=dict)  # column -> type -> hits (hits only)

    @property
    def raw_ids(self) -> int:
        return sum(self.raw_id_hits.values())

    def pii(self, kind: str) -> int:
        return sum(kinds.get(kind, 0) for kinds in self.pii_hits.values())

    @property
    def passed(self) -> bool:
        return not self.raw_id_hits and not self.pii_hits


@dataclass(frozen=True)
class PrivacyCheckResult:
    tables: list[TableCheck]
    ids_searched: int
    ids_skipped: int
    min_id_chars: int
    scope: CheckScope

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.tables)

    def findings(self) -> list[str]:
        """``table.column: what`` for every hit (counts only)."""
        out = []
        for t in self.tables:
            for column, n in sorted(t.raw_id_hits.items()):
                out.append(f"{t.table}.{column}: {n} raw user id(s)")
            for column, kinds in sorted(t.pii_hits.items()):
                out.append(f"{t.table}.{column}: " + ", ".join(f"{n} {k}" for k, n in kinds.items()))
        return out

    def run_record(self) -> RunRecord:
        checked = [t for t in self.tables if t.exists]
        return RunRecord(
            sum(t.rows for t in self.tables),
            None,
            {
                "result": "pass" if self.passed else "fail",
                "raw_ids_searched": self.ids_searched,
                "raw_ids_skipped": self.ids_skipped,
                "scope": "full" if self.scope.full else "incremental",
                "why": self.scope.why,
                "versions": {t.table: t.version for t in checked},
                "tables": {
                    t.table: {"rows": t.rows, "scanned": t.scanned, "raw_ids": t.raw_id_hits, "pii": t.pii_hits}
                    for t in checked
                },
            },
        )

    def failure_line(self) -> str:
        found = self.findings()
        shown = "; ".join(found[:6]) + (f"; and {len(found) - 6} more" if len(found) > 6 else "")
        return f"privacy-check failed: {shown}"


def plan_scope(tables: Tables, settings: Settings, full: bool = False, today: dt.date | None = None) -> CheckScope:
    """Full or incremental, from the ``privacy_check`` rows of ``pipeline_runs`` (module docstring)."""
    every = settings.privacy.check_full_every_days
    if full:
        return CheckScope(True, "full scan asked for")
    if every == 0:
        return CheckScope(True, "privacy.check_full_every_days is 0")
    passed = [
        json.loads(r["details"] or "{}") | {"_started": r["started_at"]}
        for r in (
            tables.read("pipeline_runs")
            .where((F.col("stage") == "privacy_check") & (F.col("status") == "succeeded"))
            .orderBy(F.col("started_at").desc())
            .select("details", "started_at")
            .limit(200)
            .collect()
        )
    ]
    last_full = next((d["_started"] for d in passed if d.get("scope", "full") == "full"), None)
    if not passed or "versions" not in passed[0] or last_full is None:
        return CheckScope(True, "no passing check has recorded its table versions")
    today = today or dt.datetime.now(dt.timezone.utc).date()
    age = (today - last_full.date()).days
    if age >= every:
        return CheckScope(True, f"the last full scan passed {age} day(s) ago (privacy.check_full_every_days={every})")
    return CheckScope(
        False,
        f"files added since the passing check of {passed[0]['_started']:%Y-%m-%d %H:%M} "
        f"(full scan {age} day(s) ago; privacy.check_full_every_days={every})",
        {t: int(v) for t, v in passed[0]["versions"].items()},
    )


def run_privacy_check(
    spark: "SparkSession", settings: Settings, run: StageRun, full: bool = False
) -> PrivacyCheckResult:
    """Scan the tables (all rows, or those added since the last passing check: :func:`plan_scope`); the result,
    or :class:`PrivacyCheckFailed` (after logging the findings)."""
    from pyspark import StorageLevel

    tables = Tables(spark, settings.storage)
    min_chars = settings.privacy.check_min_id_chars
    scope = plan_scope(tables, settings, full)
    log.info("privacy-check: %s: %s", "every row" if scope.full else "new rows", scope.why)
    ids = raw_id_table(source_raw_ids(spark, settings), min_chars).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        id_counts = ids.agg(
            F.count(F.when(F.col("searched"), 1)).alias("searched"),
            F.count(F.when(~F.col("searched"), 1)).alias("skipped"),
            F.count(F.when(F.col("searched") & ~F.col("single"), 1)).alias("multi"),
        ).first()
        assert id_counts is not None  # an aggregate without groupBy has one row
        if id_counts["searched"] + id_counts["skipped"] == 0:
            # nothing to search for would pass every table: the mapping or the source is wrong
            source = settings.source.path if settings.dataset.adapter else settings.source.events_location()
            raise SourceError(f"privacy-check: 0 raw ids read from the source ({source}): check source.mapping.user_id")
        searched = ids.where("searched")
        # each table's scan is a few small Spark jobs: one table at a time leaves the executors idle
        # between them, so up to CONCURRENT_TABLES tables are scanned at once (results in TABLES order)
        with ThreadPoolExecutor(max_workers=CONCURRENT_TABLES, thread_name_prefix="privacy-check") as pool:
            checks = list(
                pool.map(
                    lambda name: _check_table(
                        tables, name, searched, id_counts["multi"] > 0, scope.since_version(name)
                    ),
                    TABLES,
                )
            )
    finally:
        ids.unpersist()
    result = PrivacyCheckResult(checks, id_counts["searched"], id_counts["skipped"], min_chars, scope)
    log.info(
        "privacy-check: %d table(s), %d row(s) scanned, %d raw ids searched (%d shorter than "
        "privacy.check_min_id_chars=%d not searched): %s",
        sum(t.exists for t in checks),
        sum(t.rows for t in checks),
        result.ids_searched,
        result.ids_skipped,
        min_chars,
        "pass" if result.passed else "FAIL",
    )
    for finding in result.findings():
        log.warning("privacy-check: %s", finding)
    if not result.passed:
        raise PrivacyCheckFailed(result)
    return result


def rows_to_check(tables: Tables, name: str, version: int, since: int | None) -> tuple[DataFrame | None, str]:
    """The rows of ``name`` at ``version`` to scan, and how they were chosen: all of them (``since`` None),
    or those of the data files the table holds at ``version`` and did not hold at ``since`` (None when
    there are none). A ``since`` that cannot be read back (a newer version than the table's, its log
    cleaned up) means all rows."""
    current = tables.read_version(name, version)
    if since is None:
        return current, "all"
    if since == version:
        return None, f"new since v{since}"
    try:
        if since > version:
            raise ValueError(f"the table is at version {version}")
        before = set(tables.read_version(name, since).inputFiles())
    except Exception as exc:  # noqa: BLE001 - any failure to read the old snapshot: scan everything
        log.info(
            "privacy-check: %s: version %d cannot be read back (%s); scanning every row", name, since, first_line(exc)
        )
        return current, "all"
    added = [f for f in current.inputFiles() if f not in before]
    if not added:
        return None, f"new since v{since}"
    if tables.use_catalog:  # a catalog table's files are not read by path; Delta prunes no file on this filter
        return _skip_checked_texts(tables, name, current.where(F.col("_metadata.file_path").isin(added)), since)
    # Path mode: read exactly those Parquet files with the table's schema (columns a file predates are
    # null; partition columns, dates here, are not in the files and hold no text). Rows a deletion vector
    # removes are read too: scanned, never missed.
    partitions = set(TABLES[name].partition_by)
    schema = T.StructType([f for f in current.schema.fields if f.name not in partitions])
    return _skip_checked_texts(tables, name, tables.spark.read.schema(schema).parquet(*added), since)


def _skip_checked_texts(tables: Tables, name: str, new: DataFrame, since: int) -> tuple[DataFrame, str]:
    """``new`` with the text of :data:`SEEN_TEXTS` nulled where it equals (as a string: the hash only finds
    the candidate) a text the table held at ``since`` in its newest partition, which was checked then;
    every other column is scanned as it is."""
    if name not in SEEN_TEXTS:
        return new, f"new since v{since}"
    hash_column, text_column, partition = SEEN_TEXTS[name]
    old = tables.read_version(name, since)
    max_row = old.agg(F.max(partition)).first()
    assert max_row is not None  # an aggregate without groupBy has one row
    newest = max_row[0]
    if newest is None:
        return new, f"new since v{since}"
    seen = (
        old.where(F.col(partition) == F.lit(newest))
        .select(hash_column, F.col(text_column).alias("_seen"))
        .dropDuplicates([hash_column])
    )
    unseen = (
        new.join(seen, hash_column, "left")
        .withColumn(text_column, F.when(~F.col(text_column).eqNullSafe(F.col("_seen")), F.col(text_column)))
        .drop("_seen")
    )
    return unseen, f"new since v{since}; {text_column} equal to one checked on {newest} skipped"


def _check_table(tables: Tables, name: str, ids: DataFrame, multi_token_ids: bool, since: int | None) -> TableCheck:
    """One table: every row (``since`` None) or the rows added after version ``since``."""
    if not tables.exists(name):
        return TableCheck(name, exists=False)
    version = tables.version(name)  # after Tables.ensure has added the columns a newer userlens declares
    df, scanned = rows_to_check(tables, name, version, since)
    if df is None:
        return TableCheck(name, True, 0, version, scanned)
    counts_row = pii_counts(df, RAW_RECORDS.get(name, ())).first()
    assert counts_row is not None  # an aggregate without groupBy has one row
    counts = counts_row.asDict()
    pii: dict[str, dict[str, int]] = {}
    for key, n in counts.items():
        if key != "rows" and n:
            column, kind = key.rsplit("|", 1)
            pii.setdefault(column, {})[kind] = n
    raw = {r["column"]: r["hits"] for r in raw_id_hits(df, ids, multi_token_ids).collect() if r["hits"]}
    return TableCheck(name, True, counts["rows"], version, scanned, raw, pii)


def format_table(result: PrivacyCheckResult) -> str:
    """The pass/fail table: one row per table, then the findings and a summary line."""
    head = ["table", "rows", "raw-id hits", *PII_TYPES, "result"]
    rows = [
        [t.table, f"{t.rows:,}", str(t.raw_ids), *[str(t.pii(k)) for k in PII_TYPES], "pass" if t.passed else "FAIL"]
        if t.exists
        else [t.table, "-", "-", *["-"] * len(PII_TYPES), "absent"]
        for t in result.tables
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(head), line(["-" * w for w in widths]), *[line(r) for r in rows]]
    out += [f"FAIL {finding}" for finding in result.findings()]
    skipped = (
        f", {result.ids_skipped:,} shorter than privacy.check_min_id_chars={result.min_id_chars} not searched"
        if result.ids_skipped
        else ""
    )
    out.append(f"scanned: {'every row' if result.scope.full else 'new rows'}: {result.scope.why}")
    out.append(
        f"privacy-check: {'pass' if result.passed else 'FAIL'} "
        f"({sum(t.exists for t in result.tables)} tables, {'every row' if result.scope.full else 'new rows'}"
        f"; {result.ids_searched:,} raw user ids searched{skipped})"
    )
    return "\n".join(out)
