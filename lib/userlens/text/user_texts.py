"""One budgeted, stable text per user, built from events and the item catalog (pure Spark transforms).

A text is a header (counts by event type, top categories, spend, active days
over the user's window) followed by one line per day, newest first, each a
list of rendered events with consecutive repeats collapsed::

    12 events on 3 active days, 2026-10-01 to 2026-10-03. views 8, ... Spend: 89.50.
    2026-10-03: bought 1 'Trail Runner X' (outdoor, 89.50); viewed 'Trail Runner X' (outdoor, 89.50) ×3
    2026-10-01: searched "trail shoes"

Stability: the text depends only on the user's own events (absolute dates, no
"N days ago"), the catalog and the template version, so a user without new
events keeps a byte-identical text and text_hash.

A second, short *state text* says where the user stands on the as-of date
(:func:`state_text`; ``textualize.state``), from the same event array::

    Last active 2026-10-03. Open cart: 2026-10-03: added to cart 'Trail Runner X' (outdoor, 89.50). ...

Budget and skew: each user's newest ``max_events`` events are kept with a
``row_number`` window before any aggregation (Spark turns ``row_number <= k``
into a per-partition group limit ahead of the shuffle, so a power user with
millions of events costs one sort of k rows). Lines are then kept newest
first while the whole text fits ``max_tokens * chars_per_token`` characters;
the header always comes first, so an encoder's truncation cannot cut it.

Everything is native Spark SQL, and the events are read, shuffled and sorted
once: the cap's window (one shuffle by user_key, one sort newest first) leaves
them in the order every later step needs. A ``lag`` over that same order marks
the events that start a new day and a new piece (consecutive repeats of a line
on a day collapse into one piece with a repeat count); a sort-based aggregation
then collects each user's piece starts (and, for the state text, every event)
into one bounded array beside plain codegen'd counts. Header, repeat counts,
budget and day lines are a few higher-order array functions over the pieces.
The textualize stage writes these texts; the train stage and ``userlens
evaluate`` build them as of a cutoff.
"""

from __future__ import annotations

import datetime as dt

from pyspark.sql import Column, DataFrame, Window, WindowSpec
from pyspark.sql import functions as F

from userlens.config import TemplateSet, TextualizeSettings
from userlens.errors import require_columns
from userlens.text.templates import render

EVENT_COLUMNS = (
    "user_key",
    "event_id",
    "event_time",
    "event_type",
    "item_id",
    "category",
    "price",
    "quantity",
    "query",
    "text",
)


ITEM_COLUMNS = ("item_id", "title", "category", "brand", "price")


def _money(amount: Column) -> Column:
    # "89.50": a decimal cast renders two places and is much cheaper than format_string
    return F.round(amount, 2).cast("decimal(38,2)").cast("string")


def _newest_first_by_user() -> WindowSpec:
    """Each user's events, newest first: the cap's window, and the order every later step reads them in."""
    return Window.partitionBy("user_key").orderBy(F.col("event_time").desc(), F.col("event_id").desc())


def cap_events(events: DataFrame, max_events: int) -> DataFrame:
    """Each user's newest ``max_events`` events, numbered ``rn`` = 1 (newest) .. max_events."""
    return events.withColumn("rn", F.row_number().over(_newest_first_by_user())).where(F.col("rn") <= max_events)


def render_events(capped: DataFrame, items: DataFrame, templates: TemplateSet, max_field_chars: int) -> DataFrame:
    """One rendered ``line`` per event, with its ``day`` and the header inputs (category, spend)."""
    catalog = items.select(
        "item_id",
        F.col("title").alias("i_title"),
        F.col("category").alias("i_category"),
        F.col("brand").alias("i_brand"),
        F.col("price").alias("i_price"),
    )
    df = capped.join(catalog, "item_id", "left")
    price = F.coalesce(F.col("price"), F.col("i_price"))
    fields = {
        "title": F.coalesce(F.col("i_title"), F.col("item_id")),
        "category": F.coalesce(F.col("category"), F.col("i_category")),
        "brand": F.col("i_brand"),
        "price": _money(price),
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
        line = (
            F.when(F.col("event_type") == event_type, rendered)
            if line is None
            else line.when(F.col("event_type") == event_type, rendered)
        )
    default = render(templates.default_event, fields)
    line = default if line is None else line.otherwise(default)
    spend = F.when(F.col("event_type") == "purchase", price * F.coalesce(F.col("quantity"), F.lit(1)))
    return df.select(
        "user_key",
        "event_time",
        "event_id",
        "rn",
        "event_type",
        "item_id",
        F.to_date("event_time").cast("string").alias("day"),  # UTC session: the UTC date
        line.alias("line"),
        fields["category"].alias("category"),
        spend.alias("spend"),
        (F.col("item_id").isNotNull() & F.col("i_title").isNull()).alias("missing_item"),
    )


def mark_runs(rendered: DataFrame) -> DataFrame:
    """``first_of_day`` (the user's newest event of its day) and ``starts_piece`` (not the same day and line
    as the event just newer: consecutive repeats collapse into the piece their newest event starts).

    A ``lag`` over the cap's own window order: the events are still sorted that way (the cap's shuffle and
    sort), so Spark adds no exchange and no sort, and a user's days are consecutive in it."""
    newest_first = _newest_first_by_user()
    # the two lags in one select first: Spark computes a window expression once per use otherwise
    before = rendered.select(
        "*", F.lag("day").over(newest_first).alias("day_before"), F.lag("line").over(newest_first).alias("line_before")
    )
    new_day = F.col("day_before").isNull() | (F.col("day") != F.col("day_before"))
    return before.select(
        *rendered.columns,
        new_day.alias("first_of_day"),
        (new_day | (F.col("line") != F.col("line_before"))).alias("starts_piece"),
    )


def collect_user_events(marked: DataFrame, event_types: list[str], with_events: bool) -> DataFrame:
    """(user_key, starts, cats, [ev,] n_events, active_days, spend, first_date, last_date, n_missing_items,
    n_<type>...) per user.

    ``starts`` are the events that start a piece (rn, day, line, first_of_day), newest first; ``cats`` the
    events' categories; ``ev`` (``with_events``: the state text reads it) every rendered event, newest
    first. The input is still partitioned and sorted by user (the cap), so this sort-based aggregation adds
    no shuffle. The counts are codegen'd aggregates.
    """
    start = F.struct("rn", "day", "line", "first_of_day")
    events = F.struct("rn", "day", "line", "event_type", "item_id")
    return marked.groupBy("user_key").agg(
        F.array_sort(F.collect_list(F.when(F.col("starts_piece"), start))).alias("starts"),
        F.collect_list("category").alias("cats"),
        *([F.array_sort(F.collect_list(events)).alias("ev")] if with_events else []),
        F.count(F.lit(1)).alias("n_events"),
        F.sum(F.col("first_of_day").cast("int")).alias("active_days"),
        # summed newest first whatever order the aggregation meets the rows in: a deterministic sum, so the
        # rendered spend never flickers (few events have a spend: a small array)
        F.aggregate(
            F.array_sort(F.collect_list(F.when(F.col("spend").isNotNull(), F.struct("rn", "spend")))),
            F.lit(0.0),
            lambda acc, x: acc + x["spend"],
        ).alias("spend"),
        F.min("day").alias("first_date"),
        F.max("day").alias("last_date"),
        F.sum(F.col("missing_item").cast("int")).alias("n_missing_items"),
        *[F.sum(F.when(F.col("event_type") == t, 1).otherwise(0)).alias(f"n_{t}") for t in event_types],
    )


def texts_from_event_arrays(
    users: DataFrame, settings: TextualizeSettings, event_types: list[str], as_of: dt.date
) -> DataFrame:
    """Header, pieces, budget and day lines per user with higher-order array functions over its pieces."""
    templates = settings.templates[settings.language]
    budget_chars = int(settings.max_tokens * templates.chars_per_token)
    # top categories: by count desc, then name (a filter per distinct category: 2.4 s of the stage at 10^7
    # events; sorting the categories and counting runs measured 16 s, every use of a derived array being
    # evaluated again)
    ranked = F.array_sort(
        F.transform(
            F.array_distinct("cats"),
            lambda c: F.struct((-F.size(F.filter("cats", lambda y: y == c))).alias("neg_n"), c.alias("category")),
        )
    )
    count_items = [
        F.when(
            F.col(f"n_{t}") > 0,
            render(templates.count_item, {"label": F.lit(templates.labels.get(t, t)), "count": F.col(f"n_{t}")}),
        )
        for t in event_types
    ]
    header = render(
        templates.header,
        {
            "n_events": F.col("n_events"),
            "active_days": F.col("active_days"),
            "first_date": F.col("first_date"),
            "last_date": F.col("last_date"),
            "counts": F.concat_ws(templates.count_separator, *count_items),
            "top_categories": F.array_join(
                F.transform(F.slice(ranked, 1, settings.top_categories), lambda r: r["category"]),
                templates.category_separator,
            ),
            "spend": _money(F.col("spend")),
        },
    )

    def prefix(day: Column) -> Column:
        return render(templates.day_prefix, {"date": day})

    # a piece's repeats: the next piece's rn minus its own (the events are numbered 1..n_events, newest first).
    # No array column is read inside a lambda over another element: Spark's optimizer inlines the expression
    # of a column computed in an earlier select into every use, so a lambda reading it would rebuild the whole
    # array once per element. Each array is read whole, by zip_with against another, so every step is O(n).
    next_rn = F.concat(
        F.slice(F.transform("starts", lambda p: p["rn"]), 2, F.greatest(F.size("starts"), F.lit(1))),
        F.array(F.col("n_events") + 1),
    )
    state = [state_text(F.col("ev"), F.col("last_date"), settings).alias("state")] if settings.state.enabled else []
    with_header = users.select(
        "user_key",
        "n_events",
        "n_missing_items",
        header.alias("header"),
        F.zip_with("starts", next_rn, lambda p, nxt: F.struct(p.alias("p"), (nxt - p["rn"]).alias("repeats"))).alias(
            "runs"
        ),
        *state,
    )
    pieces = F.transform(
        F.filter("runs", lambda r: r["p"].isNotNull()),  # (zip_with pads the shorter array with nulls)
        lambda r: F.struct(
            r["p"]["day"].alias("day"),
            r["p"]["first_of_day"].alias("first_of_day"),
            F.concat(
                r["p"]["line"],
                F.when(r["repeats"] > 1, render(templates.repeat, {"count": r["repeats"]})).otherwise(F.lit("")),
            ).alias("piece"),
        ),
    )
    state_col = ["state"] if settings.state.enabled else []
    with_pieces = with_header.select(
        "user_key", "n_events", "n_missing_items", "header", pieces.alias("pieces"), *state_col
    )
    # exact character cost of each piece in the final text: "\n" + day prefix before a day's first piece
    # (the first piece's "\n" joins the header), the separator before any other
    costs = F.transform(
        "pieces",
        lambda p: (
            F.length(p["piece"])
            + F.when(p["first_of_day"], F.length(prefix(p["day"])) + 1).otherwise(F.lit(len(templates.event_separator)))
        ),
    )
    available = F.lit(budget_chars) - F.length(F.substring("header", 1, budget_chars))
    start_acc = F.struct(F.lit(0).alias("total"), F.lit(0).alias("k"), F.lit(True).alias("open"))
    kept_count = F.aggregate(
        costs,
        start_acc,
        lambda acc, c: F.when(
            acc["open"] & (acc["total"] + c <= available),
            F.struct((acc["total"] + c).alias("total"), (acc["k"] + 1).alias("k"), F.lit(True).alias("open")),
        ).otherwise(F.struct(acc["total"].alias("total"), acc["k"].alias("k"), F.lit(False).alias("open"))),
        lambda acc: acc["k"],
    )
    kept = F.slice("pieces", 1, kept_count)
    with_kept = with_pieces.select("user_key", "n_events", "n_missing_items", "header", kept.alias("kept"), *state_col)
    # a day's pieces are consecutive (events newest first): its first piece opens a line with the day prefix,
    # the others follow the separator
    rendered = F.transform(
        "kept",
        lambda p, i: (
            F.when(i == 0, F.concat(prefix(p["day"]), p["piece"]))
            .when(p["first_of_day"], F.concat(F.lit("\n"), prefix(p["day"]), p["piece"]))
            .otherwise(F.concat(F.lit(templates.event_separator), p["piece"]))
        ),
    )
    body = F.when(F.size("kept") > 0, F.array_join(rendered, ""))
    # a header alone over budget is cut; the body goes first
    text = F.concat_ws("\n", F.substring("header", 1, budget_chars), body)
    version = F.lit(settings.template_version)
    if settings.state.enabled:
        state_columns = [
            F.col("state").alias("state_text"),
            F.sha2(F.concat_ws("\u0001", F.lit("state"), version, F.col("state")), 256).alias("state_hash"),
        ]
    else:
        state_columns = [F.lit(None).cast("string").alias("state_text"), F.lit(None).cast("string").alias("state_hash")]
    return with_kept.select(
        "user_key",
        F.lit(as_of).alias("as_of_date"),
        text.alias("text"),
        F.sha2(F.concat_ws("\u0001", version, text), 256).alias("text_hash"),
        F.col("n_events").cast("long").alias("n_events"),
        version.alias("template_version"),
        "n_missing_items",
        *state_columns,
    )


def state_text(ev: Column, last_date: Column, settings: TextualizeSettings) -> Column:
    """Where the user stands as of the text's date, from the same capped event array: the last active day,
    the open cart (items added and not bought since, newest first, each once) and the newest events of each
    type in ``state.newest``, every event as its dated line; cut to ``state.max_tokens``."""
    cfg = settings.state
    templates = settings.templates[settings.language]

    def dated(events: Column) -> Column:
        return F.array_join(
            F.transform(events, lambda x: F.concat(render(templates.day_prefix, {"date": x["day"]}), x["line"])),
            templates.event_separator,
        )

    def sentence(template: str, events: Column) -> Column:
        return F.when(F.size(events) > 0, render(template, {"events": dated(events)}))

    parts = [render(templates.state_active, {"date": last_date})]
    if cfg.open_cart:
        carts = F.filter(ev, lambda x: (x["event_type"] == cfg.cart_event) & x["item_id"].isNotNull())
        orders = F.filter(ev, lambda x: x["event_type"] == cfg.order_event)
        # ev is newest first: a cart add is open when no order of its item is newer, shown once (its newest add)
        open_cart = F.filter(
            carts,
            lambda x, i: (
                ~F.exists(orders, lambda o: (o["item_id"] == x["item_id"]) & (o["rn"] < x["rn"]))
                & ~F.exists(F.slice(carts, 1, i), lambda y: y["item_id"] == x["item_id"])
            ),
        )
        parts.append(sentence(templates.state_cart, F.slice(open_cart, 1, cfg.open_cart)))

    def of_type(event_type: str) -> Column:  # (one parameter: Spark reads a second one as the index)
        return F.filter(ev, lambda x: x["event_type"] == event_type)

    for event_type, n in cfg.newest.items():
        if n > 0:
            parts.append(sentence(templates.state_parts[event_type], F.slice(of_type(event_type), 1, n)))
    budget = int(cfg.max_tokens * templates.chars_per_token)
    return F.substring(F.concat_ws(templates.state_separator, *parts), 1, budget)


def build_user_texts(
    events: DataFrame, items: DataFrame, settings: TextualizeSettings, event_types: list[str], as_of: dt.date
) -> DataFrame:
    """One row per user with events: user_key, as_of_date, text, text_hash, n_events, template_version,
    n_missing_items, state_text, state_hash (null with ``state.enabled`` off). ``events`` must already be
    limited to the as-of date."""
    require_columns(events, EVENT_COLUMNS, "textualize events")
    require_columns(items, ITEM_COLUMNS, "textualize items")
    templates = settings.templates[settings.language]
    rendered = render_events(cap_events(events, settings.max_events), items, templates, settings.max_field_chars)
    users = collect_user_events(mark_runs(rendered), event_types, with_events=settings.state.enabled)
    return texts_from_event_arrays(users, settings, event_types, as_of)
