"""Textualize: ``events`` (+ ``items``) -> one budgeted, stable text per user in ``user_texts``.

A text is a header (counts by event type, top categories, spend, active days
over the user's window) followed by one line per day, newest first, each a
list of rendered events with consecutive repeats collapsed::

    12 events on 3 active days, 2026-10-01 to 2026-10-03. views 8, ... Spend: 89.50.
    2026-10-03: bought 1 'Trail Runner X' (outdoor, 89.50); viewed 'Trail Runner X' (outdoor, 89.50) ×3
    2026-10-01: searched "trail shoes"

Stability: the text depends only on the user's own events (absolute dates, no
"N days ago"), the catalog and the template version, so a user without new
events keeps a byte-identical text and text_hash.

Budget and skew: each user's newest ``max_events`` events are kept with a
``row_number`` window before any aggregation (Spark turns ``row_number <= k``
into a per-partition group limit ahead of the shuffle, so a power user with
millions of events costs one sort of k rows). Lines are then kept newest
first while the whole text fits ``max_tokens * chars_per_token`` characters;
the header always comes first, so an encoder's truncation cannot cut it.

Everything is native Spark SQL; after the first shuffle by user_key every
later window, aggregation and join reuses that partitioning.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from userlens.config import Settings, TemplateSet, TextualizeSettings
from userlens.errors import MissingColumnsError, UserlensError
from userlens.runs import StageRun
from userlens.tables import Tables
from userlens.text.templates import render

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

EVENT_COLUMNS = ("user_key", "event_id", "event_time", "event_type", "item_id", "category", "price", "quantity",
                 "query", "text")
ITEM_COLUMNS = ("item_id", "title", "category", "brand", "price")


def _require(df: DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise MissingColumnsError(what, missing, df.columns)


def cap_events(events: DataFrame, max_events: int) -> DataFrame:
    """Each user's newest ``max_events`` events, numbered ``rn`` = 1 (newest) .. max_events."""
    newest_first = Window.partitionBy("user_key").orderBy(F.col("event_time").desc(), F.col("event_id").desc())
    return events.withColumn("rn", F.row_number().over(newest_first)).where(F.col("rn") <= max_events)


def render_events(capped: DataFrame, items: DataFrame, templates: TemplateSet, max_field_chars: int) -> DataFrame:
    """One rendered ``line`` per event, with its ``day`` and the header inputs (category, spend)."""
    catalog = items.select(
        "item_id", F.col("title").alias("i_title"), F.col("category").alias("i_category"),
        F.col("brand").alias("i_brand"), F.col("price").alias("i_price"))
    df = capped.join(catalog, "item_id", "left")
    price = F.coalesce(F.col("price"), F.col("i_price"))
    fields = {
        "title": F.coalesce(F.col("i_title"), F.col("item_id")),
        "category": F.coalesce(F.col("category"), F.col("i_category")),
        "brand": F.col("i_brand"),
        "price": F.format_string("%.2f", price),
        "quantity": F.coalesce(F.col("quantity"), F.lit(1)),
        "query": F.substring(F.col("query"), 1, max_field_chars),
        "text": F.substring(F.col("text"), 1, max_field_chars),
        "item_id": F.col("item_id"),
        "event_type": F.col("event_type"),
        "time": F.date_format("event_time", "HH:mm"),
    }
    line: Column | None = None
    for event_type, template in templates.events.items():
        rendered = render(template, fields)
        line = F.when(F.col("event_type") == event_type, rendered) if line is None else \
            line.when(F.col("event_type") == event_type, rendered)
    default = render(templates.default_event, fields)
    line = default if line is None else line.otherwise(default)
    spend = F.when(F.col("event_type") == "purchase", price * F.coalesce(F.col("quantity"), F.lit(1)))
    return df.select(
        "user_key", "rn", "event_type",
        F.date_format("event_time", "yyyy-MM-dd").alias("day"),
        line.alias("line"),
        fields["category"].alias("category"),
        spend.alias("spend"),
        (F.col("item_id").isNotNull() & F.col("i_title").isNull()).alias("missing_item"),
    )


def user_headers(rendered: DataFrame, settings: TextualizeSettings, event_types: list[str]) -> DataFrame:
    """(user_key, header, n_events, n_missing_items): the header text over the user's window."""
    templates = settings.templates[settings.language]
    counts = [F.sum(F.when(F.col("event_type") == t, 1).otherwise(0)).alias(f"n_{t}") for t in event_types]
    stats = rendered.groupBy("user_key").agg(
        F.count(F.lit(1)).alias("n_events"),
        F.countDistinct("day").alias("active_days"),
        F.min("day").alias("first_date"),
        F.max("day").alias("last_date"),
        F.sum("spend").alias("spend"),
        F.sum(F.col("missing_item").cast("long")).alias("n_missing_items"),
        *counts,
    )
    by_category = rendered.where(F.col("category").isNotNull()).groupBy("user_key", "category").agg(
        F.count(F.lit(1)).alias("n"))
    ranked = by_category.withColumn("rank", F.row_number().over(
        Window.partitionBy("user_key").orderBy(F.col("n").desc(), F.col("category"))))
    top = ranked.where(F.col("rank") <= settings.top_categories).groupBy("user_key").agg(
        F.sort_array(F.collect_list(F.struct("rank", "category"))).alias("top"))
    count_items = [
        F.when(F.col(f"n_{t}") > 0, render(templates.count_item, {
            "label": F.lit(templates.labels.get(t, t)), "count": F.col(f"n_{t}")}))
        for t in event_types
    ]
    fields = {
        "n_events": F.col("n_events"),
        "active_days": F.col("active_days"),
        "first_date": F.col("first_date"),
        "last_date": F.col("last_date"),
        "counts": F.concat_ws(templates.count_separator, *count_items),
        "top_categories": F.array_join(F.transform(F.col("top"), lambda x: x["category"]),
                                       templates.category_separator),
        "spend": F.format_string("%.2f", F.coalesce(F.col("spend"), F.lit(0.0))),
    }
    return stats.join(top, "user_key", "left").select(
        "user_key", render(templates.header, fields).alias("header"), "n_events", "n_missing_items")


def user_bodies(rendered: DataFrame, headers: DataFrame, templates: TemplateSet, budget_chars: int) -> DataFrame:
    """(user_key, body): day lines, newest first, cut so that header + body fits ``budget_chars``."""
    # gaps and islands: consecutive equal lines (same day) share rn - row_number
    same_line = Window.partitionBy("user_key", "day", "line").orderBy("rn")
    pieces = (rendered.withColumn("island", F.col("rn") - F.row_number().over(same_line))
              .groupBy("user_key", "day", "line", "island")
              .agg(F.min("rn").alias("ord"), F.count(F.lit(1)).alias("repeats")))
    piece = F.concat(F.col("line"), F.when(F.col("repeats") > 1, render(templates.repeat,
                                                                         {"count": F.col("repeats")})).otherwise(""))
    prefix = render(templates.day_prefix, {"date": F.col("day")})
    first_of_day = F.col("ord") == F.min("ord").over(Window.partitionBy("user_key", "day"))
    # exact character cost of each piece in the final text: "\n" + prefix before a
    # day's first piece, the separator before any other
    cost = F.length("piece") + F.when(first_of_day, F.length(prefix) + 1).otherwise(len(templates.event_separator))
    running = F.sum("cost").over(Window.partitionBy("user_key").orderBy("ord")
                                 .rowsBetween(Window.unboundedPreceding, Window.currentRow))
    kept = (pieces.withColumn("piece", piece).withColumn("cost", cost)
            .join(headers.select("user_key", F.length("header").alias("header_chars")), "user_key")
            .withColumn("running", running)
            .where(F.col("running") + F.col("header_chars") <= budget_chars))
    days = kept.groupBy("user_key", "day").agg(
        F.min("ord").alias("day_ord"),
        F.sort_array(F.collect_list(F.struct("ord", "piece"))).alias("pieces"))
    day_line = F.concat(prefix, F.array_join(F.transform("pieces", lambda p: p["piece"]), templates.event_separator))
    return days.groupBy("user_key").agg(
        F.array_join(F.transform(F.sort_array(F.collect_list(F.struct("day_ord", day_line.alias("l")))),
                                 lambda d: d["l"]), "\n").alias("body"))


def build_user_texts(events: DataFrame, items: DataFrame, settings: TextualizeSettings, event_types: list[str],
                     as_of: dt.date) -> DataFrame:
    """One row per user with events: user_key, as_of_date, text, text_hash, n_events, template_version,
    n_missing_items. ``events`` must already be limited to the as-of date."""
    _require(events, EVENT_COLUMNS, "textualize events")
    _require(items, ITEM_COLUMNS, "textualize items")
    templates = settings.templates[settings.language]
    budget_chars = int(settings.max_tokens * templates.chars_per_token)
    rendered = render_events(cap_events(events, settings.max_events), items, templates, settings.max_field_chars)
    headers = user_headers(rendered, settings, event_types)
    bodies = user_bodies(rendered, headers, templates, budget_chars)
    header = F.substring(F.col("header"), 1, budget_chars)  # a header alone over budget is cut, never the body first
    text = F.concat_ws("\n", header, F.col("body"))
    version = F.lit(settings.template_version)
    return headers.join(bodies, "user_key", "left").select(
        "user_key", F.lit(as_of).alias("as_of_date"), text.alias("text"),
        F.sha2(F.concat_ws("\u0001", version, text), 256).alias("text_hash"),
        F.col("n_events").cast("long").alias("n_events"), version.alias("template_version"), "n_missing_items")


@dataclass(frozen=True)
class TextualizeResult:
    as_of_date: dt.date
    users: int
    texts_inserted: int
    texts_updated: int
    events_missing_item: int
    users_only_quarantined: int


def run_textualize(spark: "SparkSession", settings: Settings, run: StageRun,
                   as_of: dt.date | None = None) -> TextualizeResult:
    """Write ``user_texts`` for ``as_of`` (default: the latest event date); a rerun changes nothing."""
    from pyspark import StorageLevel

    tables = Tables(spark, settings.storage)
    if not tables.exists("events"):
        raise UserlensError("no events table: run `userlens ingest` first")
    events = tables.read("events")
    if as_of is None:
        as_of = events.agg(F.max("event_date")).first()[0]
        if as_of is None:
            raise UserlensError("the events table is empty: run `userlens ingest` first")
    run.as_of_date = as_of
    texts = build_user_texts(events.where(F.col("event_date") <= F.lit(as_of)), tables.read("items"),
                             settings.textualize, settings.ingest.event_types, as_of)
    texts = texts.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        totals = texts.agg(F.count(F.lit(1)).alias("users"),
                           F.coalesce(F.sum("n_missing_items"), F.lit(0)).alias("missing")).first()
        metrics = tables.merge("user_texts", texts, target_filter=f"t.as_of_date = DATE'{as_of.isoformat()}'")
    finally:
        texts.unpersist()
    only_quarantined = _users_only_quarantined(tables, as_of)
    result = TextualizeResult(as_of, totals["users"], metrics.get("numTargetRowsInserted", 0),
                              metrics.get("numTargetRowsUpdated", 0), totals["missing"], only_quarantined)
    run.rows_in, run.rows_out = result.users, result.texts_inserted + result.texts_updated
    run.details.update({"users": result.users, "inserted": result.texts_inserted, "updated": result.texts_updated,
                        "events_missing_item": result.events_missing_item,
                        "users_only_quarantined": only_quarantined,
                        "template_version": settings.textualize.template_version,
                        "language": settings.textualize.language})
    log.info("textualize: %d users as of %s (%d new, %d changed texts); %d events with an item missing from "
             "the catalog; %d users with only quarantined rows get no text", result.users, as_of,
             result.texts_inserted, result.texts_updated, result.events_missing_item, only_quarantined)
    return result


def _users_only_quarantined(tables: Tables, as_of: dt.date) -> int:
    """Users seen only in quarantined rows up to ``as_of``: they get no text, and are counted."""
    if not tables.exists("events_quarantine"):
        return 0
    quarantined = (tables.read("events_quarantine")
                   .where(f"source = 'events' AND user_key IS NOT NULL AND "
                          f"(source_date IS NULL OR source_date <= DATE'{as_of.isoformat()}')")
                   .select("user_key").distinct())
    with_text = tables.read("user_texts").where(F.col("as_of_date") == F.lit(as_of)).select("user_key")
    return quarantined.join(with_text, "user_key", "left_anti").count()
