"""Public behaviour datasets, read as distributed, into ingest's raw contract.

Each adapter reads one public format with Spark and returns the columns of
:func:`userlens.sources.raw.read_raw`: ``raw`` (the source record as JSON
text), ``source_date`` (null), ``corrupt`` and one string column ``f_<field>``
per canonical field. Ingest's own transforms then validate, quarantine,
pseudonymize and scrub the rows unchanged, in ``userlens ingest`` and in
``userlens evaluate`` alike. Event times come out as epoch seconds, so the
presets set ``source.timestamp_format: epoch_s``.

Formats (docs/datasets.md says where to get each and under which licence):

* ``movielens-100k``: ``u.data`` (tab-separated user, item, rating, time) and
  ``u.item`` (``|``-separated, ISO-8859-1, 19 genre flags).
* ``movielens``: latest / 20M / 25M / 32M ``ratings.csv``, ``movies.csv``,
  ``tags.csv``, or 1M / 10M ``ratings.dat``, ``movies.dat``, ``tags.dat``
  (``::``-separated; 1M's movies.dat is ISO-8859-1).
* ``amazon``: McAuley 2014 / 2018 review JSON lines (``reviewerID``,
  ``asin``, ``overall``, ``summary``, ``reviewText``, ``unixReviewTime``),
  plain or gzipped, with an optional ``meta_*`` file (2014's Python-literal
  lines are read with single quotes allowed).
* ``sequences``: SASRec / S3-Rec / BERT4Rec files, one ``user item item ...``
  per line in chronological order, with an optional ``item<TAB>text`` file.
  They carry no times: event ``n`` of a user gets 2000-01-01 + ``n`` minutes.
* ``retailrocket``: ``events.csv`` (timestamp ms, visitorid, event, itemid,
  transactionid) and, if present, ``item_properties_part*.csv`` for the
  category.

A rating becomes an event of type ``rate`` whose text starts with the score
(``"4/5"``, ``"3.5/5"``); an Amazon review appends its summary and text
(``"5/5. Great. I loved it"``); a MovieLens tag is a ``tag`` event whose text
is the tag.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, overload

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from userlens.config import CONF_DIR, Settings
from userlens.errors import ConfigError, SourceError
from userlens.sources.raw import CORRUPT, EVENT_FIELDS, ITEM_FIELDS, blank_to_null

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

PRESETS_DIR = CONF_DIR / "datasets"
LATIN_1 = "ISO-8859-1"
# sequence files carry no times: a user's event n happens at SEQUENCE_EPOCH + n minutes
SEQUENCE_EPOCH = 946_684_800  # 2000-01-01T00:00:00Z
# u.genre of MovieLens 100K, in flag order
ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)


@dataclass(frozen=True)
class RawSource:
    """Rows in ingest's raw contract, and the key of the user id inside ``raw`` (redacted in quarantine)."""

    frame: DataFrame
    user_field: str | None


def preset_path(name: str) -> Path:
    """conf/datasets/<name>.yaml, or ``name`` itself when it is a YAML file; ConfigError otherwise."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"--dataset: {name}: preset file not found")
        return path
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise ConfigError(f"--dataset: unknown dataset {name!r}; presets: {known} (or a YAML file)")
    return path


def read_events(spark: "SparkSession", settings: Settings) -> RawSource:
    """The events of ``source.path`` read by the ``dataset.adapter`` named in settings."""
    adapter = _adapter(settings)
    return adapter.events(_Files(spark, settings, adapter.name))


def read_items(spark: "SparkSession", settings: Settings) -> RawSource:
    """The item catalogue of ``source.path`` (items only seen in events when the dataset has no catalogue)."""
    adapter = _adapter(settings)
    return adapter.items(_Files(spark, settings, adapter.name))


# --------------------------------------------------------------------------
# files: resolve, check presence and format before any job
# --------------------------------------------------------------------------
class _Files:
    """The dataset's files under ``source.path``, through the Hadoop FS (local, HDFS, S3, DBFS)."""

    def __init__(self, spark: "SparkSession", settings: Settings, preset: str) -> None:
        self.spark = spark
        self.settings = settings
        self.preset = preset
        self.root = settings.source.path.rstrip("/")
        jvm = spark.sparkContext._jvm
        assert jvm is not None  # set once the context has started
        self._path = jvm.org.apache.hadoop.fs.Path
        self._fs = self._path(self.root).getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
        if not self._fs.exists(self._path(self.root)):
            raise SourceError(f"{preset}: source.path {self.root} does not exist")
        # names are relative to source.path, or to its folder when it is a file
        self.base = self.root if self.is_dir() else str(self._path(self.root).getParent())

    def path(self, name: str) -> str:
        if name.startswith("/") or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", name):
            return name
        return f"{self.base}/{name}"

    def exists(self, name: str) -> bool:
        return bool(self._fs.exists(self._path(self.path(name))))

    def is_dir(self) -> bool:
        return bool(self._fs.getFileStatus(self._path(self.root)).isDirectory())

    def listing(self) -> list[str]:
        """File names directly under source.path (empty when source.path is a file)."""
        if not self.is_dir():
            return []
        return sorted(s.getPath().getName() for s in self._fs.listStatus(self._path(self.root)) if s.isFile())

    def first(self, *names: str) -> str | None:
        """The first of ``names`` that exists under source.path."""
        return next((n for n in names if self.exists(n)), None)

    def require(self, name: str, what: str) -> str:
        if not self.exists(name):
            raise SourceError(f"{self.preset}: {self.path(name)} not found ({what})")
        return self.path(name)

    def check_format(self, path: str, pattern: str, what: str) -> None:
        """One-line error when the file's first line does not look like ``what``."""
        row = self.spark.read.text(path).where(F.length(F.trim("value")) > 0).first()
        line = "" if row is None else row[0]
        if not re.search(pattern, line):
            shown = line if len(line) <= 80 else line[:77] + "..."
            raise SourceError(f"{self.preset}: {path} is not {what}; its first line is {shown!r}")


# --------------------------------------------------------------------------
# column helpers and the raw contract
# --------------------------------------------------------------------------
def score_text(score: Column) -> Column:
    """'4/5' for '4', '4.0' or 4.0; '3.5/5' for '3.5'; null when the score is not a number."""
    number = score.cast("string").try_cast(T.DecimalType(10, 3))
    trimmed = F.regexp_replace(F.regexp_replace(number.cast("string"), r"0+$", ""), r"\.$", "")
    return F.when(number.isNotNull(), F.concat(trimmed, F.lit("/5")))


def _score_is_bad(score: Column) -> Column:
    return score.isNull() | score.cast("string").try_cast(T.DecimalType(10, 3)).isNull()


def _contract(
    df: DataFrame,
    source_columns: list[str],
    corrupt: Column,
    fields: dict[str, Column],
    names: tuple[str, ...],
    line: Column | None,
) -> DataFrame:
    """``raw``, ``source_date`` null, ``corrupt``, ``f_<name>`` strings. ``raw`` is the ``line`` of a JSON
    source, else the source columns as JSON, as ingest's read_raw writes them."""
    raw = line if line is not None else F.to_json(F.struct(*[F.col(f"`{c}`") for c in source_columns]))
    out = [raw.alias("raw"), F.lit(None).cast(T.DateType()).alias("source_date"), corrupt.alias("corrupt")]
    for name in names:
        value = fields.get(name)
        out.append((value if value is not None else F.lit(None)).cast("string").alias(f"f_{name}"))
    return df.select(out)


def _events(
    df: DataFrame, source_columns: list[str], corrupt: Column, line: Column | None = None, **fields: Column
) -> DataFrame:
    return _contract(df, source_columns, corrupt, fields, EVENT_FIELDS, line)


def _items(
    df: DataFrame, source_columns: list[str], corrupt: Column, line: Column | None = None, **fields: Column
) -> DataFrame:
    return _contract(df, source_columns, corrupt, fields, ITEM_FIELDS, line)


def _corrupt(df: DataFrame) -> Column:
    return F.col(CORRUPT).isNotNull() if CORRUPT in df.columns else F.lit(False)


def _delimited(
    spark: "SparkSession",
    path: str | list[str],
    sep: str,
    names: list[str],
    encoding: str = "UTF-8",
    header: bool = False,
    quoted: bool = False,
) -> DataFrame:
    """A delimited text file as named string columns plus ``_corrupt_record`` (wrong field count)."""
    schema = T.StructType([T.StructField(n, T.StringType()) for n in [*names, CORRUPT]])
    reader = spark.read.options(
        sep=sep,
        encoding=encoding,
        header=str(header).lower(),
        mode="PERMISSIVE",
        columnNameOfCorruptRecord=CORRUPT,
        enforceSchema="true",
    )
    # MovieLens' .dat and u.* files have no quoting: a '"' in a title is a character
    reader = reader.options(quote='"', escape='"') if quoted else reader.option("quote", "\u0000")
    return reader.schema(schema).csv(path)


def _json_lines(spark: "SparkSession", path: str | list[str], names: list[str]) -> DataFrame:
    """JSON lines as string columns (nested values as their JSON text), the line as ``value`` and
    ``_corrupt_record`` for bad lines."""
    schema = T.StructType([T.StructField(n, T.StringType()) for n in [*names, CORRUPT]])
    parsed = F.from_json(
        "value", schema, {"columnNameOfCorruptRecord": CORRUPT, "mode": "PERMISSIVE", "allowSingleQuotes": "true"}
    )
    df = spark.read.text(path).select(F.col("value"), parsed.alias("j"))
    return df.select(
        "value",
        *[F.col(f"j.`{n}`").alias(n) for n in names],
        F.when(F.col("j").isNull() | F.col(f"j.{CORRUPT}").isNotNull(), F.col("value")).alias(CORRUPT),
    )


def _json_strings(column: Column) -> Column:
    """A JSON array of strings (its text) joined by spaces; any other value as it is."""
    as_list = F.from_json(column, T.ArrayType(T.StringType()))
    return F.when(F.trim(column).startswith("["), F.array_join(as_list, " ")).otherwise(column)


def _genres(column: Column) -> tuple[Column, Column]:
    """MovieLens 'A|B|C' genres -> (first genre, 'Genres: A, B, C'); '(no genres listed)' -> nulls."""
    listed = F.when(~F.trim(column).isin("(no genres listed)", ""), F.split(F.trim(column), r"\|"))
    return F.try_element_at(listed, F.lit(1)), F.concat(F.lit("Genres: "), F.array_join(listed, ", "))


def _items_from_events(events: DataFrame) -> RawSource:
    """For datasets without a catalogue: one item row per distinct item id of the events."""
    ids = (
        events.where(~F.col("corrupt") & F.col("f_item_id").isNotNull())
        .select(F.trim("f_item_id").alias("item_id"))
        .distinct()
    )
    return RawSource(_items(ids, ["item_id"], F.lit(False), item_id=F.col("item_id")), None)


# --------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Adapter:
    name: str
    events: Callable[[_Files], RawSource]
    items: Callable[[_Files], RawSource]


def _rating_events(df: DataFrame, cols: list[str], user: str, item: str, rating: str, time: str) -> DataFrame:
    return _events(
        df,
        cols,
        _corrupt(df) | _score_is_bad(F.col(rating)),
        user_id=F.col(user),
        item_id=F.col(item),
        event_time=F.col(time),
        event_type=F.lit("rate"),
        text=score_text(F.col(rating)),
    )


def _tag_events(df: DataFrame, cols: list[str], user: str, item: str, tag: str, time: str) -> DataFrame:
    return _events(
        df,
        cols,
        _corrupt(df),
        user_id=F.col(user),
        item_id=F.col(item),
        event_time=F.col(time),
        event_type=F.lit("tag"),
        text=F.col(tag),
    )


# MovieLens 100K ------------------------------------------------------------
ML100K_RATING_COLS = ["user_id", "item_id", "rating", "timestamp"]
ML100K_ITEM_COLS = ["movie_id", "title", "release_date", "video_release_date", "imdb_url", *ML100K_GENRES]


def _ml100k_events(files: _Files) -> RawSource:
    name = files.settings.dataset.events_file or "u.data"
    path = files.require(name, "MovieLens 100K ratings")
    files.check_format(
        path,
        r"^\s*\d+\t\d+\t\d+(\.\d+)?\t\d+\s*$",
        "a MovieLens 100K u.data file (tab-separated user id, item id, rating, timestamp)",
    )
    df = _delimited(files.spark, path, "\t", ML100K_RATING_COLS)
    return RawSource(_rating_events(df, ML100K_RATING_COLS, "user_id", "item_id", "rating", "timestamp"), "user_id")


def _ml100k_items(files: _Files) -> RawSource:
    name = files.settings.dataset.items_file or "u.item"
    path = files.require(name, "MovieLens 100K movies")
    files.check_format(
        path,
        r"^\d+\|([^|]*\|){22}[01]\s*$",
        "a MovieLens 100K u.item file (movie id | title | release date | video release date | URL | 19 genre flags)",
    )
    df = _delimited(files.spark, path, "|", ML100K_ITEM_COLS, files.settings.dataset.encoding or LATIN_1)
    flagged = F.filter(
        F.array(*[F.when(F.col(f"`{g}`") == "1", F.lit(g)) for g in ML100K_GENRES if g != "unknown"]),
        lambda g: g.isNotNull(),
    )
    description = F.concat_ws(
        ". ",
        F.when(F.size(flagged) > 0, F.concat(F.lit("Genres: "), F.array_join(flagged, ", "))),
        F.when(F.length(F.trim("release_date")) > 0, F.concat(F.lit("Released "), F.trim("release_date"))),
    )
    return RawSource(
        _items(
            df,
            ML100K_ITEM_COLS,
            _corrupt(df),
            item_id=F.col("movie_id"),
            title=F.col("title"),
            category=F.try_element_at(flagged, F.lit(1)),
            description=blank_to_null(description),
        ),
        None,
    )


# MovieLens latest / 1M / 10M / 20M / 25M / 32M -----------------------------
@overload
def _ml_file(files: _Files, kind: str, configured: str | None, required: Literal[True]) -> tuple[str, bool]: ...
@overload
def _ml_file(files: _Files, kind: str, configured: str | None, required: bool) -> tuple[str, bool] | None: ...
def _ml_file(files: _Files, kind: str, configured: str | None, required: bool) -> tuple[str, bool] | None:
    """(path, is_dat) of ratings / movies / tags: the configured name, else <kind>.csv, else <kind>.dat."""
    if configured:
        return files.require(configured, f"MovieLens {kind}"), configured.endswith(".dat")
    name = files.first(f"{kind}.csv", f"{kind}.dat")
    if name is None:
        if required:
            raise SourceError(
                f"{files.preset}: neither {files.path(kind + '.csv')} nor {kind}.dat found (MovieLens {kind})"
            )
        return None
    return files.path(name), name.endswith(".dat")


def _ml_events(files: _Files) -> RawSource:
    path, is_dat = _ml_file(files, "ratings", files.settings.dataset.events_file, True)
    spark = files.spark
    if is_dat:
        cols = ["UserID", "MovieID", "Rating", "Timestamp"]
        files.check_format(
            path,
            r"^\d+::\d+::\d+(\.\d+)?::\d+\s*$",
            "a MovieLens ratings.dat file (UserID::MovieID::Rating::Timestamp)",
        )
        ratings = _delimited(spark, path, "::", cols)
        user = "UserID"
    else:
        cols = ["userId", "movieId", "rating", "timestamp"]
        files.check_format(
            path,
            r"^userId,movieId,rating,timestamp\s*$",
            "a MovieLens ratings.csv file (header userId,movieId,rating,timestamp)",
        )
        ratings = _delimited(spark, path, ",", cols, header=True, quoted=True)
        user = "userId"
    events = _rating_events(ratings, cols, *cols)
    tags = _ml_file(files, "tags", None, False)
    if tags is not None:
        tag_path, tag_dat = tags
        tag_cols = ["UserID", "MovieID", "Tag", "Timestamp"] if tag_dat else ["userId", "movieId", "tag", "timestamp"]
        if tag_dat:
            files.check_format(
                tag_path, r"^\d+::\d+::.*::\d+\s*$", "a MovieLens tags.dat file (UserID::MovieID::Tag::Timestamp)"
            )
        else:
            files.check_format(
                tag_path,
                r"^userId,movieId,tag,timestamp\s*$",
                "a MovieLens tags.csv file (header userId,movieId,tag,timestamp)",
            )
        df = (
            _delimited(spark, tag_path, "::", tag_cols)
            if tag_dat
            else _delimited(spark, tag_path, ",", tag_cols, header=True, quoted=True)
        )
        # the raw JSON names the user field as the ratings do, so one key is redacted in quarantine
        df = df.withColumnRenamed(tag_cols[0], user) if tag_cols[0] != user else df
        tag_cols = [user, *tag_cols[1:]]
        events = events.unionByName(_tag_events(df, tag_cols, *tag_cols))
    return RawSource(events, user)


def _ml_items(files: _Files) -> RawSource:
    path, is_dat = _ml_file(files, "movies", files.settings.dataset.items_file, True)
    if is_dat:
        cols = ["MovieID", "Title", "Genres"]
        files.check_format(path, r"^\d+::.*::", "a MovieLens movies.dat file (MovieID::Title::Genres)")
        df = _delimited(files.spark, path, "::", cols, files.settings.dataset.encoding or LATIN_1)
    else:
        cols = ["movieId", "title", "genres"]
        files.check_format(
            path, r"^movieId,title,genres\s*$", "a MovieLens movies.csv file (header movieId,title,genres)"
        )
        df = _delimited(
            files.spark, path, ",", cols, files.settings.dataset.encoding or "UTF-8", header=True, quoted=True
        )
    category, description = _genres(F.col(cols[2]))
    return RawSource(
        _items(
            df,
            cols,
            _corrupt(df),
            item_id=F.col(cols[0]),
            title=F.col(cols[1]),
            category=category,
            description=description,
        ),
        None,
    )


# Amazon reviews (McAuley 2014 / 2018) --------------------------------------
AMAZON_REVIEW_COLS = ["reviewerID", "asin", "overall", "summary", "reviewText", "unixReviewTime"]
AMAZON_META_COLS = ["asin", "title", "brand", "price", "category", "categories", "description"]
_JSON_NAME = re.compile(r"\.json(l)?(\.gz)?$")


def _amazon_files(files: _Files) -> tuple[list[str], list[str]]:
    """(review files, metadata files): configured, or every *.json[l][.gz] under source.path by name
    (``meta_*`` is metadata), or source.path itself when it is a file."""
    ds = files.settings.dataset
    if ds.events_file:
        reviews = [files.require(ds.events_file, "Amazon reviews")]
    elif not files.is_dir():
        reviews = [files.root]
    else:
        reviews = [files.path(n) for n in files.listing() if _JSON_NAME.search(n) and not n.startswith("meta_")]
        if not reviews:
            raise SourceError(f"{files.preset}: no review file (*.json, *.json.gz) in {files.root}")
    if ds.items_file:
        meta = [files.require(ds.items_file, "Amazon metadata")]
    elif files.is_dir():
        meta = [files.path(n) for n in files.listing() if _JSON_NAME.search(n) and n.startswith("meta_")]
    else:
        meta = []
    return reviews, meta


def _amazon_events(files: _Files) -> RawSource:
    reviews, _ = _amazon_files(files)
    for path in reviews:
        files.check_format(
            path,
            r'^\s*\{.*"reviewerID"\s*:.*"asin"\s*:|^\s*\{.*"asin"\s*:.*"reviewerID"\s*:',
            "an Amazon review JSON-lines file (McAuley 2014/2018: reviewerID, asin, overall, ...)",
        )
    df = _json_lines(files.spark, reviews, AMAZON_REVIEW_COLS)
    text = F.concat_ws(
        ". ", score_text(F.col("overall")), blank_to_null(F.col("summary")), blank_to_null(F.col("reviewText"))
    )
    events = _events(
        df,
        AMAZON_REVIEW_COLS,
        _corrupt(df) | _score_is_bad(F.col("overall")),
        F.col("value"),
        user_id=F.col("reviewerID"),
        item_id=F.col("asin"),
        event_time=F.col("unixReviewTime"),
        event_type=F.lit("rate"),
        text=text,
    )
    return RawSource(events, "reviewerID")


def _amazon_price(column: Column) -> Column:
    """2014: a number; 2018: '$12.99' ('' or a range -> null)."""
    digits = F.regexp_extract(F.trim(column), r"^\$?\s*([0-9][0-9,]*(\.[0-9]+)?)$", 1)
    return F.when(digits != "", F.regexp_replace(digits, ",", ""))


def _amazon_items(files: _Files) -> RawSource:
    _, meta = _amazon_files(files)
    if not meta:
        return _items_from_events(_amazon_events(files).frame)
    for meta_file in meta:
        files.check_format(
            meta_file, r"""^\s*\{.*['"]asin['"]\s*:""", "an Amazon metadata JSON-lines file (asin, title, ...)"
        )
    df = _json_lines(files.spark, meta, AMAZON_META_COLS)
    # 2018: category ["Beauty", "Skin Care", "Face"]; 2014: categories [["Beauty", "Skin Care", "Face"], ...]
    path = F.coalesce(
        F.from_json("category", T.ArrayType(T.StringType())),
        F.try_element_at(F.from_json("categories", T.ArrayType(T.ArrayType(T.StringType()))), F.lit(1)),
    )
    path = F.filter(path, lambda c: F.length(F.trim(c)) > 0)
    description = F.concat_ws(
        ". ", F.when(F.size(path) > 0, F.array_join(path, " > ")), blank_to_null(_json_strings(F.col("description")))
    )
    return RawSource(
        _items(
            df,
            AMAZON_META_COLS,
            _corrupt(df),
            F.col("value"),
            item_id=F.col("asin"),
            title=F.col("title"),
            category=F.try_element_at(path, F.lit(-1)),
            brand=F.col("brand"),
            price=_amazon_price(F.col("price")),
            description=blank_to_null(description),
        ),
        None,
    )


# Sequence files (SASRec, S3-Rec, BERT4Rec) ---------------------------------
def _sequence_file(files: _Files) -> str:
    ds = files.settings.dataset
    if ds.events_file:
        return files.require(ds.events_file, "the sequence file")
    if not files.is_dir():
        return files.root
    candidates = [n for n in files.listing() if n.endswith(".txt") and n != ds.items_file]
    if len(candidates) != 1:
        found = ", ".join(candidates) or "none"
        raise SourceError(
            f"{files.preset}: expected one sequence file (*.txt) in {files.root}, found {found}; "
            f"set dataset.events_file"
        )
    return files.path(candidates[0])


def _sequence_events(files: _Files) -> RawSource:
    path = _sequence_file(files)
    files.check_format(
        path, r"^\s*\S+([ \t]+\S+)+\s*$", "a sequence file (one 'user item item ...' per line, whitespace-separated)"
    )
    # file order is the order of events: monotonically_increasing_id follows the file's splits in order
    # blank lines are no records
    lines = (
        files.spark.read.text(path)
        .select(F.monotonically_increasing_id().alias("line"), "value")
        .where(F.length(F.trim("value")) > 0)
        .select("line", F.split(F.trim("value"), r"\s+").alias("tokens"))
    )
    tokens = lines.select(
        "line",
        F.try_element_at("tokens", F.lit(1)).alias("user"),
        F.posexplode_outer(F.slice("tokens", 2, 1 << 30)).alias("pos", "item"),
    )
    order = Window.partitionBy("user").orderBy("line", "pos")
    numbered = tokens.withColumn("position", F.row_number().over(order) - 1)
    df = numbered.select("user", "item", "position")
    return RawSource(
        _events(
            df,
            ["user", "position", "item"],
            F.lit(False),
            user_id=F.col("user"),
            item_id=F.col("item"),
            event_time=F.lit(SEQUENCE_EPOCH) + F.col("position") * 60,
            event_type=F.lit("rate"),
            event_id=F.concat(F.col("user"), F.lit(":"), F.col("position")),
        ),
        "user",
    )


def _sequence_items(files: _Files) -> RawSource:
    name = files.settings.dataset.items_file
    if not name:
        return _items_from_events(_sequence_events(files).frame)
    path = files.require(name, "the item text file")
    files.check_format(path, r"^\S+\t", "an item text file (item<TAB>text per line)")
    df = _delimited(files.spark, path, "\t", ["item", "text"], files.settings.dataset.encoding or "UTF-8")
    # RecBole-style files start with a header 'item_id:token<TAB>text:token_seq'
    df = df.where(~F.col("item").startswith("item_id"))
    return RawSource(_items(df, ["item", "text"], _corrupt(df), item_id=F.col("item"), title=F.col("text")), None)


# RetailRocket ---------------------------------------------------------------
RR_EVENT_COLS = ["timestamp", "visitorid", "event", "itemid", "transactionid"]


def _retailrocket_events(files: _Files) -> RawSource:
    path = files.require(files.settings.dataset.events_file or "events.csv", "RetailRocket events")
    files.check_format(
        path,
        r"^timestamp,visitorid,event,itemid,transactionid\s*$",
        "a RetailRocket events.csv file (header timestamp,visitorid,event,itemid,transactionid)",
    )
    df = _delimited(files.spark, path, ",", RR_EVENT_COLS, header=True, quoted=True)
    millis = F.col("timestamp").try_cast(T.DecimalType(20, 0))
    # event names (view, addtocart, transaction) go through source.event_type_map, as in any ingest
    return RawSource(
        _events(
            df,
            RR_EVENT_COLS,
            _corrupt(df),
            user_id=F.col("visitorid"),
            item_id=F.col("itemid"),
            event_time=(millis / 1000).cast(T.DecimalType(23, 3)),
            event_type=F.col("event"),
        ),
        "visitorid",
    )


def _retailrocket_items(files: _Files) -> RawSource:
    parts = [files.path(n) for n in files.listing() if re.fullmatch(r"item_properties_part\d+\.csv", n)]
    if files.settings.dataset.items_file:
        parts = [files.require(files.settings.dataset.items_file, "RetailRocket item properties")]
    ids = _items_from_events(_retailrocket_events(files).frame).frame.select(F.col("f_item_id").alias("item_id"))
    if parts:
        for path in parts:
            files.check_format(
                path,
                r"^timestamp,itemid,property,value\s*$",
                "a RetailRocket item_properties file (header timestamp,itemid,property,value)",
            )
        props = _delimited(
            files.spark, parts, ",", ["timestamp", "itemid", "property", "value"], header=True, quoted=True
        )
        latest = (
            props.where(F.col("property") == "categoryid")
            .groupBy(F.trim("itemid").alias("item_id"))
            .agg(F.max_by("value", F.col("timestamp").try_cast("long")).alias("categoryid"))
        )
        ids = ids.join(latest, "item_id", "left")
    else:
        ids = ids.withColumn("categoryid", F.lit(None).cast("string"))
    return RawSource(
        _items(ids, ["item_id", "categoryid"], F.lit(False), item_id=F.col("item_id"), category=F.col("categoryid")),
        None,
    )


ADAPTERS: dict[str, _Adapter] = {
    a.name: a
    for a in (
        _Adapter("movielens-100k", _ml100k_events, _ml100k_items),
        _Adapter("movielens", _ml_events, _ml_items),
        _Adapter("amazon", _amazon_events, _amazon_items),
        _Adapter("sequences", _sequence_events, _sequence_items),
        _Adapter("retailrocket", _retailrocket_events, _retailrocket_items),
    )
}


def _adapter(settings: Settings) -> _Adapter:
    name = settings.dataset.adapter
    if name is None:
        raise ConfigError("dataset.adapter: not set; use a preset (--conf conf/datasets/<name>.yaml)")
    if settings.source.timestamp_format != "epoch_s":
        raise ConfigError(
            f"source.timestamp_format: dataset adapters write epoch seconds, so it must be epoch_s "
            f"(got {settings.source.timestamp_format!r}); conf/datasets/{name}.yaml sets it"
        )
    return ADAPTERS[name]
