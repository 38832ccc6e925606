"""Pre-flight: check paths and the source mapping before Spark starts, and before any write.

A wrong ``source.mapping`` must fail as one line naming the key, the column and the columns the
source has, not as an ingest run that "succeeds" with every row quarantined. For a local source
(a path without a scheme, or ``file:``) the columns are read here in plain Python, in well under a
second: the CSV header, the Parquet footer, the Delta log's schema, or the keys of a sample of JSON
lines. A source on a distributed file system (``s3a://``, ``abfss://``, ``dbfs:/``...) is read by
:func:`spark_columns` once Spark is up, still before any write.

This module imports no Spark: the CLI calls it before a session exists.
"""

from __future__ import annotations

import bz2
import csv
import difflib
import gzip
import io
import itertools
import json
import logging
import re
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from userlens.config import Settings, SourceSettings
from userlens.errors import ConfigError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

# canonical fields without which no row can become an event (or an item)
REQUIRED_EVENT_FIELDS = ("user_id", "event_time", "event_type")
REQUIRED_ITEM_FIELDS = ("item_id",)
# JSON has no schema: the keys of the first lines of the first files stand for it
JSON_SAMPLE_LINES = 2000
JSON_SAMPLE_FILES = 8
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_OPENERS: dict[str, Callable[[Path, Literal["rb"]], gzip.GzipFile | bz2.BZ2File]] = {".gz": gzip.open, ".bz2": bz2.open}
_UNREADABLE_HERE = {".snappy", ".zst", ".lz4", ".deflate", ".xz", ".zip"}  # Spark's codecs without a stdlib reader


@dataclass(frozen=True)
class SourceColumns:
    """The columns a source offers: its schema, or (JSON) the keys seen in a sample of its lines."""

    location: str
    format: str
    columns: tuple[str, ...]
    exhaustive: bool  # False: JSON keys seen in ``sampled`` lines, absent keys may still occur later
    sampled: int = 0
    first_line: str | None = None  # JSON: the first non-empty line, when no line parsed as an object
    files: int | None = None  # data files found (local sources)
    newest_too: bool = False  # JSON: the sample also read the newest files, not only the first ones

    def describe_sample(self) -> str:
        if self.newest_too:
            return f"{self.sampled:,} lines sampled from the oldest and the newest files"
        return f"the first {self.sampled:,} lines"

    def describe(self) -> str:
        if self.files == 0:
            return "no data files there"
        if self.columns:
            shown = ", ".join(self.columns[:12]) + (", ..." if len(self.columns) > 12 else "")
        else:
            shown = "none"
            if self.first_line is not None:
                line = self.first_line if len(self.first_line) <= 60 else self.first_line[:57] + "..."
                shown += f"; its first line is {line!r}"
        return f"columns: {shown}"


# --------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------
def local_path(location: str) -> Path | None:
    """The local path of ``location``; None for a location on another file system (``s3a://`` ...)."""
    if location.startswith("file:"):
        return Path(re.sub(r"^file:(//)?", "", location) or "/")
    if _SCHEME.match(location):
        return None
    return Path(location)


def require_local_path(location: str, key: str, hint: str = "") -> None:
    """ConfigError (one line naming ``key``) when a local ``location`` does not exist; remote ones pass."""
    path = local_path(location)
    if path is not None and not path.exists():
        raise ConfigError(f"{key}: {location} does not exist{hint}")


def events_key(source: SourceSettings) -> str:
    return "source.events_path" if source.events_path else "source.path"


def items_key(source: SourceSettings) -> str:
    return "source.items_path" if source.items_path else "source.path"


def check_source_paths(settings: Settings, items: bool = True) -> None:
    """The raw paths a command reads exist (local paths; others are checked once Spark is up)."""
    source = settings.source
    if settings.dataset.adapter:
        require_local_path(source.path, "source.path")
        return
    require_local_path(source.events_location(), events_key(source))
    if items:
        require_local_path(source.items_location(), items_key(source))


def check_warehouse(settings: Settings) -> None:
    """The warehouse a command reads exists (local path mode; catalog tables are the platform's)."""
    storage = settings.storage
    if storage.catalog or storage.schema_name:
        return
    require_local_path(
        storage.warehouse,
        "storage.warehouse",
        ": run `userlens ingest` (or `userlens demo`) first, or point storage.warehouse at a warehouse",
    )


# --------------------------------------------------------------------------
# columns of a local source
# --------------------------------------------------------------------------
def data_files(root: Path) -> list[Path]:
    """The data files of a file or folder as Spark lists them: hidden (``.``) and ``_`` names skipped."""
    if root.is_file():
        return [root]
    found = []
    for path in sorted(root.rglob("*")):
        parts = path.relative_to(root).parts
        if path.is_file() and not any(p.startswith((".", "_")) for p in parts):
            found.append(path)
    return found


def partition_columns(root: Path, files: Sequence[Path]) -> list[str]:
    """Names of ``key=value`` folders between ``root`` and its files (Spark's partition discovery)."""
    names: dict[str, None] = {}
    for path in files[:100]:
        for part in path.relative_to(root).parts[:-1] if root.is_dir() else ():
            if "=" in part:
                names[part.split("=", 1)[0]] = None
    return list(names)


def _open_text(path: Path) -> IO[str] | None:
    """A text stream of a plain, gzip or bzip2 file; None for a codec read here cannot (snappy, zstd...)."""
    suffix = path.suffix.lower()
    if suffix in _UNREADABLE_HERE:
        return None
    opener = _OPENERS.get(suffix)
    if opener is not None:
        return io.TextIOWrapper(opener(path, "rb"), encoding="utf-8", errors="replace")
    return path.open("r", encoding="utf-8", errors="replace", newline="")


# a file that cannot be read here is left to Spark, whose read names it (ingest.on_unreadable_file)
_UNREADABLE = (OSError, EOFError, zlib.error, UnicodeError)


def _lines(files: Sequence[Path], limit: int) -> Iterator[str]:
    seen = 0
    for path in files[:JSON_SAMPLE_FILES]:
        stream = _open_text(path)
        if stream is None:
            continue
        lines = []
        try:
            with stream:
                for line in stream:
                    if line.strip():
                        lines.append(line)
                        if seen + len(lines) >= limit:
                            break
        except _UNREADABLE:
            log.debug("pre-flight: %s is not readable here; Spark will tell", path)
        yield from lines
        seen += len(lines)
        if seen >= limit:
            return


def _csv_header(files: Sequence[Path], header: bool) -> list[str] | None:
    for path in files:
        stream = _open_text(path)
        if stream is None:
            return None
        try:
            with stream:
                for row in csv.reader(stream):
                    if row:
                        # Spark names header-less columns _c0, _c1, ... and empty header cells the same way
                        return [name if header and name else f"_c{i}" for i, name in enumerate(row)]
        except _UNREADABLE:
            log.debug("pre-flight: %s is not readable here; Spark will tell", path)
    return []


def _delta_columns(root: Path) -> list[str] | None:
    log_dir = root / "_delta_log"
    if not log_dir.is_dir():
        return None
    for commit in sorted(log_dir.glob("*.json"), reverse=True):
        with commit.open(encoding="utf-8") as stream:
            for line in stream:
                action = json.loads(line)
                if "metaData" in action:
                    schema = json.loads(action["metaData"]["schemaString"])
                    return [f["name"] for f in schema["fields"]]
    return None  # the schema sits in a checkpoint only: Spark reads it


def local_columns(location: str, fmt: str, csv_header: bool = True) -> SourceColumns | None:
    """The columns of a local source; None when it is not local or not readable here (Spark decides)."""
    root = local_path(location)
    if root is None or not root.exists():
        return None
    if fmt == "delta":
        names = _delta_columns(root)
        return SourceColumns(location, fmt, tuple(names), True) if names is not None else None
    files = data_files(root)
    parts = partition_columns(root, files)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        for path in files:
            try:
                names = pq.read_schema(path).names
            except (OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError
                continue
            return SourceColumns(location, fmt, tuple(dict.fromkeys([*names, *parts])), True, files=len(files))
        return SourceColumns(location, fmt, (), True, files=0) if not files else None
    if fmt == "csv":
        header = _csv_header(files, csv_header)
        if header is None:
            return None
        return SourceColumns(location, fmt, tuple(dict.fromkeys([*header, *parts])), True, files=len(files))
    keys: dict[str, None] = {}
    sampled, first = 0, None
    # half from the oldest files, half from the newest (when there are more): an optional field the first
    # days lack (reviews of earlier purchases) is in the newest ones
    newest = files[JSON_SAMPLE_FILES:][::-1]
    half = JSON_SAMPLE_LINES // 2 if newest else JSON_SAMPLE_LINES
    for line in itertools.chain(_lines(files, half), _lines(newest, half)):
        sampled += 1
        first = first if first is not None else line.strip()
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            keys.update(dict.fromkeys(record))
    return SourceColumns(
        location,
        fmt,
        tuple([*keys, *[p for p in parts if p not in keys]]),
        False,
        sampled,
        None if keys else first,
        len(files),
        bool(newest),
    )


def spark_columns(spark: "SparkSession", location: str, fmt: str, csv_header: bool = True) -> SourceColumns:
    """The columns of any source, through Spark (schema only; JSON: a sample of lines)."""
    if fmt == "json":
        lines = [r[0] for r in spark.read.text(location).limit(JSON_SAMPLE_LINES).collect()]
        keys: dict[str, None] = {}
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                keys.update(dict.fromkeys(record))
        first = next((x.strip() for x in lines if x.strip()), None)
        return SourceColumns(location, fmt, tuple(keys), False, len(lines), None if keys else first)
    reader = spark.read.option("header", str(csv_header).lower()) if fmt == "csv" else spark.read
    return SourceColumns(location, fmt, tuple(reader.format(fmt).load(location).columns), True)


# --------------------------------------------------------------------------
# the mapping
# --------------------------------------------------------------------------
def check_mapping(
    columns: SourceColumns, mapping: Mapping[str, str | None], key: str, required: Sequence[str]
) -> list[str]:
    """Raise ConfigError for the first mapped column the source lacks; return warnings (JSON only) for
    optional fields not seen in the sample, which may still occur in later lines."""
    present = set(columns.columns)
    unseen = []
    for field, column in mapping.items():
        if not column or column in present:
            continue
        if columns.exhaustive or field in required:
            where = "the source" if columns.exhaustive else f"{columns.describe_sample()} of the source"
            raise ConfigError(
                f"{key}.{field}: column {column!r} not in {where} "
                f"({columns.describe()}){_suggestion(column, columns.columns)}"
            )
        unseen.append(f"{field} ({column!r})")
    if not unseen:
        return []
    return [
        f"{key}: not seen in {columns.describe_sample()} of {columns.location}: {', '.join(unseen)}; "
        "rows without them get no value there"
    ]


def _suggestion(column: str, names: Sequence[str]) -> str:
    same_case = [n for n in names if n.lower() == column.lower()]
    close = same_case or difflib.get_close_matches(column, list(names), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def source_columns(
    settings: Settings, spark: "SparkSession | None" = None, items: bool = True
) -> dict[str, SourceColumns]:
    """The events' (and items') columns: read locally, else through ``spark``; a source that needs Spark
    is left out when ``spark`` is None."""
    source = settings.source
    wanted = {"events": (source.events_location(), source.format)}
    if items:
        wanted["items"] = (source.items_location(), source.items_format or source.format)
    out = {}
    for name, (location, fmt) in wanted.items():
        found = local_columns(location, fmt, source.csv_header)
        if found is None and spark is not None:
            found = spark_columns(spark, location, fmt, source.csv_header)
        if found is not None:
            out[name] = found
    return out


def check_source(settings: Settings, spark: "SparkSession | None" = None, items: bool = True) -> list[str]:
    """Paths, then every mapped column; ConfigError on the first problem, else the warnings (logged).

    Dataset adapters (``dataset.adapter``) read fixed files and check them themselves; only the path is
    checked here."""
    check_source_paths(settings, items)
    if settings.dataset.adapter:
        return []
    source = settings.source
    found = source_columns(settings, spark, items)
    warnings = []
    if "events" in found:
        warnings += check_mapping(found["events"], source.mapping.model_dump(), "source.mapping", REQUIRED_EVENT_FIELDS)
    if "items" in found:
        warnings += check_mapping(
            found["items"], source.items_mapping.model_dump(), "source.items_mapping", REQUIRED_ITEM_FIELDS
        )
    for warning in warnings:
        log.warning("%s", warning)
    return warnings


def field_roles(mapping: Mapping[str, Any]) -> dict[str, str]:
    """Source column -> the canonical field it is mapped to (the first, if several share a column)."""
    roles: dict[str, str] = {}
    for field, column in mapping.items():
        if column and column not in roles:
            roles[str(column)] = field
    return roles
