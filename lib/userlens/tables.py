"""Logical table names -> Delta tables, with explicit schemas and idempotent writes.

Local and cluster mode: ``<storage.warehouse>/<name>`` as a Delta path.
Databricks (``storage.catalog`` and ``storage.schema`` set): ``<catalog>.<schema>.<name>``.
Every stage reads and writes through :class:`Tables`.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from pyspark.sql import functions as F
from pyspark.sql import types as T

from userlens.config import StorageSettings
from userlens.errors import MissingColumnsError, UserlensError

if TYPE_CHECKING:
    from delta.tables import DeltaTable
    from pyspark.sql import Column, DataFrame, SparkSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TableSpec:
    schema: T.StructType
    key: tuple[str, ...] = ()
    partition_by: tuple[str, ...] = ()
    properties: dict[str, str] = field(default_factory=dict)


def _s(*fields: tuple[str, T.DataType, bool]) -> T.StructType:
    return T.StructType([T.StructField(name, dtype, nullable) for name, dtype, nullable in fields])


STR, LONG, INT, DBL, DATE, TS = (
    T.StringType(),
    T.LongType(),
    T.IntegerType(),
    T.DoubleType(),
    T.DateType(),
    T.TimestampType(),
)
VECTOR = T.ArrayType(T.FloatType(), containsNull=False)
STRINGS = T.ArrayType(T.StringType(), containsNull=True)
EXPLANATIONS = T.ArrayType(
    T.StructType(
        [
            T.StructField("day", T.DateType()),
            T.StructField("text", T.StringType()),
            T.StructField("task", T.StringType()),
            T.StructField("weight", T.DoubleType()),
        ]
    ),
    containsNull=True,
)
BOOL = T.BooleanType()

TABLES: dict[str, TableSpec] = {
    "events": TableSpec(
        _s(
            ("user_key", STR, False),
            ("event_id", STR, False),
            ("event_time", TS, False),
            ("event_date", DATE, False),
            ("event_type", STR, False),
            ("item_id", STR, True),
            ("category", STR, True),
            ("price", DBL, True),
            ("quantity", INT, True),
            ("query", STR, True),
            ("text", STR, True),
            ("run_id", STR, True),
        ),
        key=("user_key", "event_time", "event_id"),
        partition_by=("event_date",),
        # Delta's per-file min/max statistics only for the columns a reader filters on: by default it
        # collects them for the first 32 columns, and for the hex user_key and the free texts that cost
        # 14 s of a 40 s write at 10^7 events (bench/ingest.py) for no data skipping at all (a file's
        # user_keys span the whole hash range).
        properties={"delta.dataSkippingStatsColumns": "event_time,event_type,item_id,category,price"},
    ),
    "events_quarantine": TableSpec(
        _s(
            ("raw", STR, True),
            ("reason", STR, False),
            ("source", STR, False),
            ("run_id", STR, False),
            ("source_date", DATE, True),
            ("user_key", STR, True),
            ("quarantined_at", TS, False),
        )
    ),
    "items": TableSpec(
        _s(
            ("item_id", STR, False),
            ("title", STR, True),
            ("category", STR, True),
            ("brand", STR, True),
            ("price", DBL, True),
            ("description", STR, True),
            ("run_id", STR, True),
        ),
        key=("item_id",),
    ),
    "user_texts": TableSpec(
        _s(
            ("user_key", STR, False),
            ("as_of_date", DATE, False),
            ("text", STR, False),
            ("text_hash", STR, False),
            ("n_events", LONG, False),
            ("template_version", STR, False),
            ("state_text", STR, True),
            ("state_hash", STR, True),
        ),
        key=("user_key", "as_of_date"),
        partition_by=("as_of_date",),
    ),
    "user_embeddings": TableSpec(
        _s(
            ("user_key", STR, False),
            ("as_of_date", DATE, False),
            ("text_hash", STR, False),
            ("model_id", STR, False),
            ("embedding", VECTOR, False),
            ("state_hash", STR, True),
            ("state_embedding", VECTOR, True),
        ),
        key=("user_key",),
    ),
    "item_embeddings": TableSpec(
        _s(("item_id", STR, False), ("model_id", STR, False), ("text_hash", STR, True), ("embedding", VECTOR, False)),
        key=("item_id",),
    ),
    "user_scores": TableSpec(
        _s(
            ("user_key", STR, False),
            ("as_of_date", DATE, False),
            ("model_version", STR, False),
            ("text_hash", STR, False),
            ("purchase_propensity", DBL, True),
            ("churn_risk", DBL, True),
            ("next_category", STR, True),
            ("next_category_p", DBL, True),
            ("scored_at", TS, False),
            ("recommended_items", STRINGS, True),
            ("explanations", EXPLANATIONS, True),
        ),
        key=("user_key", "as_of_date"),
        partition_by=("as_of_date",),
    ),
    "segments": TableSpec(
        _s(
            ("segment_id", INT, False),
            ("as_of_date", DATE, False),
            ("users", LONG, False),
            ("published", BOOL, False),
            ("top_categories", STRINGS, True),
            ("model_version", STR, False),
        ),
        key=("segment_id",),
    ),
    "user_profiles": TableSpec(
        _s(
            ("user_key", STR, False),
            ("as_of_date", DATE, False),
            ("embedding", VECTOR, True),
            ("purchase_propensity", DBL, True),
            ("churn_risk", DBL, True),
            ("next_category", STR, True),
            ("top_categories", STRINGS, True),
            ("segment_id", INT, True),
            ("recommended_items", STRINGS, True),
            ("recency_days", INT, True),
            ("frequency_30d", LONG, True),
            ("monetary_30d", DBL, True),
            ("model_version", STR, True),
            ("updated_at", TS, False),
            ("embedding_model_id", STR, True),
            ("segment_model_version", STR, True),
        ),
        key=("user_key",),
        properties={"delta.enableChangeDataFeed": "true"},
    ),
    "forget_log": TableSpec(
        _s(
            ("user_key", STR, False),
            ("requested_at", TS, False),
            ("rows_found", LONG, False),
            ("tables", STR, False),
            ("files_purged", BOOL, False),
            ("run_id", STR, False),
        ),
        key=("user_key", "requested_at"),
    ),
    "run_locks": TableSpec(
        _s(
            ("name", STR, False),
            ("run_id", STR, False),
            ("holder", STR, False),
            ("acquired_at", TS, False),
            ("expires_at", TS, False),
        ),
        key=("name",),
    ),
    "pipeline_runs": TableSpec(
        _s(
            ("run_id", STR, False),
            ("stage", STR, False),
            ("as_of_date", DATE, True),
            ("status", STR, False),
            ("started_at", TS, False),
            ("finished_at", TS, True),
            ("rows_in", LONG, True),
            ("rows_out", LONG, True),
            ("details", STR, True),
        ),
        key=("run_id", "stage"),
    ),
}

# A Delta comment on every column (DESCRIBE TABLE, catalog explorers): what it holds, its unit, its horizon.
# docs/tables.md and docs/profiles.md say more; tests/test_nightly.py checks every table has them.
H = "train.horizon_days (7 by default)"
COLUMN_COMMENTS: dict[str, dict[str, str]] = {
    "events": {
        "user_key": "keyed pseudonym of the raw user id: hex HMAC-SHA256 under the warehouse's key (docs/profiles.md)",
        "event_id": "the source's event id, or the SHA-256 of the raw record when it has none",
        "event_time": "when the event happened (UTC)",
        "event_date": "the UTC date of the event (the raw layout's date folder where there is one); partition column",
        "event_type": "view, click, search, add_to_cart, purchase or review (ingest.event_types)",
        "item_id": "the item the event is about; null for searches",
        "category": "the item's category as the event carried it",
        "price": "unit price in the source's currency",
        "quantity": "units (purchases, cart adds)",
        "query": "search text, PII masked (<email>, <phone>, <card>, <iban>, <ip>)",
        "text": "review text, PII masked",
        "run_id": "the ingest run that wrote the row",
    },
    "events_quarantine": {
        "raw": "the refused record, every value that could identify a person replaced (the user id by its user_key)",
        "reason": "why it was refused (malformed_record, missing_user_id, bad_timestamp, ...)",
        "source": "events or items",
        "run_id": "the ingest run that refused it",
        "source_date": "the raw layout's date folder of the record, if any",
        "user_key": "pseudonym of the record's user id, when it had one",
        "quarantined_at": "when it was refused (UTC)",
    },
    "items": {
        "item_id": "the catalogue's item id",
        "title": "title, PII masked",
        "category": "category",
        "brand": "brand",
        "price": "list price in the source's currency",
        "description": "description, PII masked",
        "run_id": "the ingest run that wrote the catalogue",
    },
    "user_texts": {
        "user_key": "keyed pseudonym of the user",
        "as_of_date": "the texts cover events up to this date; partition column",
        "text": "the user's behaviour as text: a summary header, then one line per day, newest first",
        "text_hash": "SHA-256 of the template version and the text: a changed hash is what gets re-embedded",
        "n_events": "events the text was built from (the newest textualize.max_events at most)",
        "template_version": "textualize.template_version the text was rendered with",
        "state_text": "where the user stands as of the date: last active day, open cart, newest order, review "
        "and searches (textualize.state; null when it is off)",
        "state_hash": "SHA-256 of the template version and the state text",
    },
    "user_embeddings": {
        "user_key": "keyed pseudonym of the user",
        "as_of_date": "as-of date of the text embedded",
        "text_hash": "the embedded text's hash (user_texts.text_hash)",
        "model_id": "the encoder: <label>@<hash of its weights, tokenizer and settings>",
        "embedding": "the text's embedding (L2-normalized floats; 384 for MiniLM)",
        "state_hash": "the embedded state text's hash (user_texts.state_hash)",
        "state_embedding": "the state text's embedding (null when textualize.state is off)",
    },
    "item_embeddings": {
        "item_id": "the catalogue's item id",
        "model_id": "the encoder: <label>@<hash of its weights, tokenizer and settings>",
        "text_hash": "hash of the item text embedded (title, category, brand, description)",
        "embedding": "the item text's embedding",
    },
    "user_scores": {
        "user_key": "keyed pseudonym of the user",
        "as_of_date": "the scores use data up to this date",
        "model_version": "the model artifact that scored (storage.models/<version>)",
        "text_hash": "the user text the scores were computed from",
        "purchase_propensity": f"probability of at least one purchase in the {H} days after as_of_date",
        "churn_risk": f"probability of no event at all in the {H} days after as_of_date",
        "next_category": "the most likely category of the next purchase (else view)",
        "next_category_p": "that category's probability",
        "scored_at": "when the row was scored (UTC)",
        "recommended_items": "item ids, best first (the model's top-K, items bought before left out)",
        "explanations": "the days that moved the scores most (explain stage): day, the day's line of the user's "
        "text, task, weight = score with the day - score without it",
    },
    "segments": {
        "segment_id": "segment number within its segment model (k-means over the user embeddings)",
        "as_of_date": "as-of date of the segment model's fit",
        "users": "users assigned to the segment",
        "published": "true when users >= privacy.min_segment_size (smaller segments are withheld from profiles)",
        "top_categories": "the segment's most frequent categories",
        "model_version": "the segment model: segment ids keep their meaning only within one version",
    },
    "user_profiles": {
        "user_key": "keyed pseudonym of the user: join to a CRM id through `userlens pseudonymize` (docs/profiles.md)",
        "as_of_date": "the profile uses data up to this date",
        "embedding": "the user text's embedding (see embedding_model_id)",
        "purchase_propensity": f"probability of at least one purchase in the {H} days after as_of_date",
        "churn_risk": f"probability of no event at all in the {H} days after as_of_date",
        "next_category": "the most likely category of the next purchase (else view)",
        "top_categories": "the user's top categories, recency-weighted (profile.interest_half_life_days)",
        "segment_id": "segment within segment_model_version; null when the segment is below privacy.min_segment_size",
        "recommended_items": "item ids, best first",
        "recency_days": "days from the user's last event to as_of_date",
        "frequency_30d": "events of any type in the 30 days up to as_of_date",
        "monetary_30d": "purchase spend (price x quantity) in the 30 days up to as_of_date, source currency",
        "model_version": "the model artifact behind the scores and recommendations",
        "updated_at": "when the row last changed (UTC)",
        "embedding_model_id": "the encoder that made the embedding (user_embeddings.model_id)",
        "segment_model_version": "the segment model segment_id belongs to (segments.model_version)",
    },
    "forget_log": {
        "user_key": "pseudonym of the person forgotten (never the raw id)",
        "requested_at": "when `userlens forget` ran (UTC)",
        "rows_found": "rows deleted across the tables",
        "tables": "the tables rows were deleted from",
        "files_purged": "true once the old files holding the rows were vacuumed",
        "run_id": "the forget run",
    },
    "run_locks": {
        "name": "the lock (nightly)",
        "run_id": "the run holding it",
        "holder": "host and process of the holder",
        "acquired_at": "when it was taken (UTC)",
        "expires_at": "when another run may take it over (UTC)",
    },
    "pipeline_runs": {
        "run_id": "one run of a stage (or of the nightly's stages)",
        "stage": "ingest, textualize, embed, train, score, profile, ...",
        "as_of_date": "the as-of date the stage ran for",
        "status": "running, succeeded or failed",
        "started_at": "start (UTC)",
        "finished_at": "end (UTC); null while running",
        "rows_in": "rows the stage read (its own measure: raw rows, users, texts)",
        "rows_out": "rows the stage wrote",
        "details": "JSON: the stage's counts, figures and, for a failure, the one-line cause",
    },
}


def _commented(table: str, spec: TableSpec) -> TableSpec:
    comments = COLUMN_COMMENTS[table]
    fields = [
        T.StructField(f.name, f.dataType, f.nullable, {**f.metadata, "comment": comments[f.name]}) for f in spec.schema
    ]
    return replace(spec, schema=T.StructType(fields))


TABLES = {name: _commented(name, spec) for name, spec in TABLES.items()}

SESSION_CATALOG = "spark_catalog"  # Spark's built-in catalog (Delta's DeltaCatalog behind it)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class Tables:
    """Resolves logical names and performs the project's Delta writes."""

    def __init__(self, spark: "SparkSession", storage: StorageSettings) -> None:
        self.spark = spark
        self.storage = storage
        self.use_catalog = bool(storage.catalog and storage.schema_name)
        if not self.use_catalog and not storage.warehouse:
            raise UserlensError("storage.warehouse is empty; set it, or storage.catalog and storage.schema")
        self._existing: set[str] = set()
        self._upgraded: set[str] = set()
        self._properties_checked: set[str] = set()
        self.root = storage.warehouse if _SCHEME.match(storage.warehouse or "") else os.path.abspath(storage.warehouse)

    # -- names -------------------------------------------------------------
    def location(self, table: str) -> str:
        """The Delta path (path mode) or the three-part table name (catalog mode)."""
        _spec(table)
        if self.use_catalog:
            return f"`{self.storage.catalog}`.`{self.storage.schema_name}`.`{table}`"
        return f"{self.root.rstrip('/')}/{table}"

    def sql_name(self, table: str) -> str:
        """A name usable in SQL text: ``delta.`path``` or ``cat.schema.name``."""
        loc = self.location(table)
        return loc if self.use_catalog else f"delta.`{loc}`"

    # -- reading -----------------------------------------------------------
    def exists(self, table: str) -> bool:
        from delta.tables import DeltaTable

        if table in self._existing:
            return True
        if self.use_catalog:
            found = self.spark.catalog.tableExists(self.location(table))
        else:
            found = DeltaTable.isDeltaTable(self.spark, self.location(table))
        if found:
            self._existing.add(table)
        return found

    def read(self, table: str) -> "DataFrame":
        """The table as a DataFrame; an empty one with the declared schema if it does not exist yet."""
        if not self.exists(table):
            return self.spark.createDataFrame([], _spec(table).schema)
        self._add_new_columns(table, _spec(table))
        return self._load(table)

    def as_of_date(self, table: str, column: str, produced_by: str, given: Any = None) -> Any:
        """A stage's as-of date: ``given``, else the largest ``column`` of its input ``table``. Either way
        a UserlensError naming the command ``produced_by`` to run first when the table does not exist
        (or, without ``given``, is empty)."""
        if not self.exists(table):
            raise UserlensError(f"no {table} table: run `userlens {produced_by}` first")
        if given is not None:
            return given
        row = self.read(table).agg(F.max(column)).first()
        assert row is not None  # an aggregate without groupBy has one row
        latest = row[0]
        if latest is None:
            raise UserlensError(f"the {table} table is empty: run `userlens {produced_by}` first")
        return latest

    def read_version(self, table: str, version: int) -> "DataFrame":
        """The table as it was at Delta ``version`` (time travel; the table must exist)."""
        reader = self.spark.read.option("versionAsOf", version)
        if self.use_catalog:
            return reader.table(self.location(table))
        return reader.format("delta").load(self.location(table))

    def version(self, table: str) -> int:
        """The table's current Delta version (the table must exist)."""
        row = self.delta(table).history(1).select("version").first()
        assert row is not None  # an existing table has at least one version
        return int(row[0])

    def _load(self, table: str) -> "DataFrame":
        if self.use_catalog:
            return self.spark.read.table(self.location(table))
        return self.spark.read.format("delta").load(self.location(table))

    def delta(self, table: str) -> "DeltaTable":
        from delta.tables import DeltaTable

        self.ensure(table)
        if self.use_catalog:
            return DeltaTable.forName(self.spark, self.location(table))
        return DeltaTable.forPath(self.spark, self.location(table))

    # -- writing -----------------------------------------------------------
    def ensure(self, table: str) -> None:
        """Create the table with its declared schema if it does not exist; add the nullable columns a
        newer userlens declares to a table that does."""
        from delta.tables import DeltaTable

        spec = _spec(table)
        if self.exists(table):
            self._add_new_columns(table, spec)
            if spec.properties and table not in self._properties_checked:
                self._properties_checked.add(table)  # first: set_properties ensures the table again
                self.set_properties(table, dict(spec.properties))  # those a newer userlens declares
            return
        builder = DeltaTable.createIfNotExists(self.spark)
        if self.use_catalog:
            # open-source Delta 4.0's builder parses tableName() as [schema.]table, so a three-part name
            # is a syntax error there (other catalogs get it as before: this is the one path the tests
            # cannot run). Spark's own session catalog needs no catalog part: the tests' catalog mode.
            assert self.storage.catalog is not None  # use_catalog: catalog and schema are set
            if self.storage.catalog.lower() == SESSION_CATALOG:
                builder = builder.tableName(f"`{self.storage.schema_name}`.`{table}`")
            else:
                builder = builder.tableName(self.location(table))
        else:
            builder = builder.location(self.location(table))
        builder = builder.addColumns(spec.schema)  # as declared: SQL DDL cannot say a vector holds no null
        if spec.partition_by:
            builder = builder.partitionedBy(*spec.partition_by)
        for key, value in spec.properties.items():
            builder = builder.property(key, value)
        builder.execute()
        self._existing.add(table)
        self._properties_checked.add(table)
        log.info("created table %s", self.location(table))

    def _add_new_columns(self, table: str, spec: TableSpec) -> None:
        """Columns a newer userlens declares (always nullable) are added to an existing table, once; so are
        the column comments it declares (a table created by an older userlens has none)."""
        if table in self._upgraded:
            return
        stored = self._load(table).schema
        have = {f.name for f in stored.fields}
        for f in stored.fields:
            comment = spec.schema[f.name].metadata.get("comment") if f.name in spec.schema.fieldNames() else None
            if comment and f.metadata.get("comment") != comment:
                self.spark.sql(
                    f"ALTER TABLE {self.sql_name(table)} ALTER COLUMN `{f.name}` COMMENT {_sql_string(comment)}"
                )
        new = [f for f in spec.schema.fields if f.name not in have]
        if new:
            bad = [f.name for f in new if not f.nullable]
            if bad:
                raise UserlensError(
                    f"table {self.location(table)} lacks required column(s) {', '.join(bad)}: "
                    "it was written by another userlens; rebuild it"
                )
            columns = ", ".join(
                f"`{f.name}` {f.dataType.simpleString()}"
                + (f" COMMENT {_sql_string(f.metadata['comment'])}" if f.metadata.get("comment") else "")
                for f in new
            )
            self.spark.sql(f"ALTER TABLE {self.sql_name(table)} ADD COLUMNS ({columns})")
            log.info("table %s: added column(s) %s", self.location(table), ", ".join(f.name for f in new))
        self._upgraded.add(table)

    def replace_where(
        self, table: str, df: "DataFrame", condition: str, unless_same: tuple[str, ...] | None = None
    ) -> dict[str, int]:
        """Atomically replace the rows matching ``condition`` with ``df``; returns Delta's write metrics.

        ``numInsertedRows`` is the number of rows of ``df`` written: Delta's
        ``numOutputRows`` also counts rows it copied out of rewritten files.
        ``unless_same`` (columns to ignore, e.g. ``("run_id",)``): when the rows
        matching ``condition`` already equal ``df`` apart from those columns,
        nothing is written (no new version, no new files) and
        ``numInsertedRows`` is the size of ``df``.
        """
        if unless_same is not None and self.exists(table):
            stored = self.read(table).where(condition)
            if same_rows(stored, df, unless_same):
                return {"numInsertedRows": df.count(), "unchanged": 1}
        self.ensure(table)
        token = _commit_token()
        writer = self._writer(table, df, token).option("replaceWhere", condition)
        self._save(writer, table)
        return self._commit_metrics(table, token)

    def overwrite(self, table: str, df: "DataFrame") -> dict[str, int]:
        """Replace the whole table (a new Delta version; history keeps the old one); returns write metrics."""
        self.ensure(table)
        token = _commit_token()
        self._save(self._writer(table, df, token), table)
        return self._commit_metrics(table, token)

    def merge(
        self,
        table: str,
        df: "DataFrame",
        keys: tuple[str, ...] | None = None,
        update: bool = True,
        target_filter: str | None = None,
        ignore_changes: tuple[str, ...] = (),
    ) -> dict[str, int]:
        """Upsert ``df`` on ``keys`` (default: the table's key); only changed rows are rewritten.

        ``target_filter`` (SQL on target columns prefixed ``t.``, e.g. a partition
        predicate) narrows the target rows the merge reads. A row whose only
        differences are in ``ignore_changes`` (e.g. ``updated_at``) is left as it is.
        """
        spec = _spec(table)
        keys = keys or spec.key
        source = self._conformed(table, df)
        if update and self.exists(table):
            # rows equal to a target row (ignored columns aside) are no-ops: drop them first, so that a
            # MERGE with nothing to change touches no file (Delta rewrites every file with a matched row)
            compared = [c for c in spec.schema.fieldNames() if c not in ignore_changes]
            target = self.read(table).select(*compared).alias("_t")
            same = [F.col(f"_s.`{c}`").eqNullSafe(F.col(f"_t.`{c}`")) for c in compared]
            source = source.alias("_s").join(target, same, "left_anti")
        condition = " AND ".join(f"t.`{k}` <=> s.`{k}`" for k in keys)
        if target_filter:
            condition = f"({target_filter}) AND {condition}"
        merge = self.delta(table).alias("t").merge(source.alias("s"), condition)
        if update:
            others = [c for c in spec.schema.fieldNames() if c not in keys and c not in ignore_changes]
            changed = " OR ".join(f"NOT (t.`{c}` <=> s.`{c}`)" for c in others) or None
            merge = merge.whenMatchedUpdateAll(condition=changed)
        with self.tagged_commit() as token:
            merge.whenNotMatchedInsertAll().execute()
        return self._commit_metrics(table, token)

    def append(self, table: str, df: "DataFrame") -> None:
        """Add ``df``'s rows as they are: for rows whose keys the caller knows are new (one Delta append,
        no read of the table, where :meth:`merge` joins against it)."""
        self.ensure(table)
        self._save(self._conformed(table, df).write.format("delta").mode("append"), table)

    def delete(self, table: str, condition: "str | Column") -> int:
        """One Delta DELETE; the number of rows it deleted, read from its own commit (0: nothing matched)."""
        with self.tagged_commit() as token:
            self.delta(table).delete(condition)
        return self.commit_metric(table, token, "numDeletedRows")

    @contextmanager
    def tagged_commit(self) -> Iterator[str]:
        """Tag the commits made inside (DeltaTable operations, which take no ``userMetadata`` option) with a
        token in ``commitInfo.userMetadata``, so that their metrics can be found."""
        token = _commit_token()
        previous = self.spark.conf.get(_USER_METADATA, None)
        self.spark.conf.set(_USER_METADATA, token)
        try:
            yield token
        finally:
            if previous is None:
                self.spark.conf.unset(_USER_METADATA)
            else:
                self.spark.conf.set(_USER_METADATA, previous)

    def commit_metric(self, table: str, token: str, metric: str) -> int:
        """``metric`` of the commit tagged ``token``; 0 when it did not commit (Delta skips empty commits)."""
        # a few versions back: another job may have committed right after ours
        row = self.delta(table).history(20).where(F.col("userMetadata") == token).select("operationMetrics").first()
        value = (row[0] or {}).get(metric) if row is not None else None
        return int(value) if value is not None else 0

    # -- table properties --------------------------------------------------
    def properties(self, table: str) -> dict[str, str]:
        """The table's Delta properties (TBLPROPERTIES); {} when the table does not exist."""
        if not self.exists(table):
            return {}
        row = self.delta(table).detail().select("properties").first()
        return dict(row[0] or {}) if row is not None else {}

    def set_properties(self, table: str, values: dict[str, str | None]) -> dict[str, str | None]:
        """Set the properties in ``values`` that differ from the table's (``None``: unset); returns those.

        Equal values commit nothing: no new table version."""
        current = self.properties(table)
        changed = {k: v for k, v in values.items() if current.get(k) != v}
        to_set = {k: v for k, v in changed.items() if v is not None}
        to_unset = sorted(k for k, v in changed.items() if v is None)
        self.ensure(table)
        if to_set:
            pairs = ", ".join(f"{_sql_string(k)} = {_sql_string(v)}" for k, v in sorted(to_set.items()))
            self.spark.sql(f"ALTER TABLE {self.sql_name(table)} SET TBLPROPERTIES ({pairs})")
        if to_unset:
            keys = ", ".join(_sql_string(k) for k in to_unset)
            self.spark.sql(f"ALTER TABLE {self.sql_name(table)} UNSET TBLPROPERTIES IF EXISTS ({keys})")
        return changed

    def _writer(self, table: str, df: "DataFrame", token: str) -> Any:
        writer = self._conformed(table, df).write.format("delta").mode("overwrite").option("userMetadata", token)
        if _spec(table).partition_by:
            # Delta's optimized write bins rows by partition first: one file per
            # partition value and task group instead of one per (task, value)
            writer = writer.option("optimizeWrite", "true")
        return writer

    def _commit_metrics(self, table: str, token: str) -> dict[str, int]:
        """operationMetrics of the commit tagged ``token``; {} if the write committed nothing."""
        row = self.delta(table).history(1).select("userMetadata", "operationMetrics").first()
        if row is None or row[0] != token:
            return {}
        raw: dict[str, Any] = row[1] or {}
        metrics = {k: int(v) for k, v in raw.items() if str(v).lstrip("-").isdigit()}
        if "numOutputRows" in metrics:
            metrics["numInsertedRows"] = metrics["numOutputRows"] - metrics.get("numCopiedRows", 0)
        return metrics

    def _conformed(self, table: str, df: "DataFrame") -> "DataFrame":
        from pyspark.sql import functions as F

        schema = _spec(table).schema
        missing = [f.name for f in schema if f.name not in df.columns]
        if missing:
            raise MissingColumnsError(f"writing {table}", missing, df.columns)
        return df.select([F.col(f.name).cast(f.dataType).alias(f.name) for f in schema])

    def _save(self, writer: Any, table: str) -> None:
        if self.use_catalog:
            writer.saveAsTable(self.location(table))
        else:
            writer.save(self.location(table))


def same_rows(a: "DataFrame", b: "DataFrame", ignore: tuple[str, ...] = ()) -> bool:
    """True when ``a`` and ``b`` hold the same multiset of rows over ``a``'s columns minus ``ignore``."""
    columns = [c for c in a.columns if c not in ignore]
    left, right = a.select(*columns), b.select(*[F.col(c).cast(a.schema[c].dataType) for c in columns])
    return left.exceptAll(right).isEmpty() and right.exceptAll(left).isEmpty()


_USER_METADATA = "spark.databricks.delta.commitInfo.userMetadata"


def _commit_token() -> str:
    # tags one commit so its metrics can be told from an earlier commit's
    return "userlens:" + uuid.uuid4().hex


def _spec(table: str) -> TableSpec:
    try:
        return TABLES[table]
    except KeyError:
        raise UserlensError(f"unknown table {table!r}; known: {', '.join(sorted(TABLES))}") from None


def table_schema(table: str) -> T.StructType:
    """The declared schema of a logical table."""
    return _spec(table).schema


def _sql_string(text: str) -> str:
    """A Spark SQL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
