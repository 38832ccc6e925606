"""Typed, strict, layered settings.

Layers, later wins: ``conf/base.yaml`` -> each ``--conf FILE`` in order (default
``conf/local.yaml``) -> each ``--set dotted.key=value``. String values may use
``${VAR}`` or ``${VAR:-default}``; they are expanded per layer, so an error
names the layer that used the variable. Every section forbids unknown keys and
a validation error is one line naming the file and the dotted key.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from userlens.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent / "conf"
BASE_CONF = CONF_DIR / "base.yaml"
DEFAULT_CONF = CONF_DIR / "local.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, coerce_numbers_to_str=True)


class SparkSettings(_Strict):
    master: str | None = Field(None, description="null: take the session of spark-submit / Databricks")
    app_name: str = Field("userlens", description="Spark application name")
    driver_memory: str = Field("4g", description="driver memory (local sessions only)")
    shuffle_partitions: int = Field(8, ge=1, description="spark.sql.shuffle.partitions")
    log_level: Literal["ERROR", "WARN", "INFO", "DEBUG"] = Field(
        "WARN", description="Spark log level: ERROR, WARN, INFO or DEBUG"
    )
    ui: bool = Field(True, description="Spark UI for local sessions")
    delta_jars: Literal["pip", "provided"] = Field(
        "pip",
        description="pip: fetch the io.delta jar matching the installed delta-spark from Maven (local runs); "
        "provided: the cluster or platform already has Delta",
    )
    jars: list[str] = Field([], description="local jar files (offline Delta jars)")
    conf: dict[str, str] = Field({}, description="any Spark conf, overlaid on the session")

    @field_validator("conf", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): _spark_value(v) for k, v in value.items()}
        return value


def _spark_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class StorageSettings(_Strict):
    warehouse: str = Field("./warehouse", description="Delta root (local, cluster)")
    catalog: str | None = Field(
        None,
        description="Unity Catalog catalog (Databricks); with storage.schema set, tables are "
        "`catalog.schema.name`; `spark_catalog` is Spark's own catalog",
    )
    schema_name: str | None = Field(
        None, alias="schema", description="Unity Catalog schema (Databricks; the schema must exist)"
    )
    models: str = Field("./models", description="model artifacts")


class EventMapping(_Strict):
    """Canonical event field -> source column name (null: the source has none)."""

    event_id: str | None = Field("event_id", description="source column of the event id (null: absent)")
    user_id: str = Field("user_id", description="source column of the user id")
    event_time: str = Field("ts", description="source column of the event time")
    event_type: str = Field("event_type", description="source column of the event type")
    item_id: str | None = Field("item_id", description="source column of the item id (null: absent)")
    category: str | None = Field("category", description="source column of the category (null: absent)")
    price: str | None = Field("price", description="source column of the price (null: absent)")
    quantity: str | None = Field("quantity", description="source column of the quantity (null: absent)")
    query: str | None = Field("query", description="source column of the search query (null: absent)")
    text: str | None = Field("review_text", description="source column of the review text (null: absent)")


class ItemMapping(_Strict):
    """Canonical item field -> source column name."""

    item_id: str = Field("item_id", description="source column of the item id")
    title: str | None = Field("title", description="source column of the title (null: absent)")
    category: str | None = Field("category", description="source column of the category (null: absent)")
    brand: str | None = Field("brand", description="source column of the brand (null: absent)")
    price: str | None = Field("price", description="source column of the price (null: absent)")
    description: str | None = Field("description", description="source column of the description (null: absent)")


SourceFormat = Literal["json", "parquet", "csv", "delta"]


class SourceSettings(_Strict):
    path: str = Field("./data/sample", description="raw root with `events/` and `items/`")
    format: SourceFormat = Field("json", description="json, parquet, csv or delta")
    events_path: str | None = Field(None, description="overrides `<path>/events`")
    items_path: str | None = Field(None, description="overrides `<path>/items`")
    items_format: SourceFormat | None = Field(None, description="format of the items (null: source.format)")
    mapping: EventMapping = Field(EventMapping(), description="canonical event field -> source column")
    items_mapping: ItemMapping = Field(ItemMapping(), description="canonical item field -> source column")
    timestamp_format: str | None = Field(
        None, description="null: ISO-8601 text; epoch_s / epoch_ms: numbers; anything else: a Spark datetime pattern"
    )
    event_type_map: dict[str, str] = Field({}, description="source event type -> canonical type")
    # when absent from the data the date comes from the event time
    date_partition: str = Field(
        "event_date", description="date-valued partition column of the raw layout (event_date=YYYY-MM-DD/)"
    )
    csv_header: bool = Field(True, description="csv files have a header row")

    def events_location(self) -> str:
        return self.events_path or _join(self.path, "events")

    def items_location(self) -> str:
        return self.items_path or _join(self.path, "items")


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


class PrivacySettings(_Strict):
    key_env: str = Field("USERLENS_HMAC_KEY", description="env var holding the HMAC key (>= 16 bytes)")
    # Only for the embedded local default. Cluster and Databricks configs leave it null.
    dev_key: str | None = Field(None, description="used, with a loud warning, when the env var is unset")
    min_segment_size: int = Field(20, ge=1, description="smallest published group")
    pii_placeholders: bool = Field(
        True, description="not read: ingest always replaces PII in free texts by typed placeholders"
    )
    forget_retention_hours: int = Field(
        168,
        ge=0,
        description="`userlens forget`: VACUUM keeps files removed within this many hours (Delta's own floor: 168)",
    )
    quarantine_retention_days: int = Field(
        30,
        ge=1,
        description="nightly: events_quarantine rows older than this (by source_date, else quarantined_at) are deleted",
    )
    # too many chance matches below this
    check_min_id_chars: int = Field(
        4, ge=1, description="`userlens privacy-check`: raw ids shorter than this are not searched"
    )
    check_full_every_days: int = Field(
        7,
        ge=0,
        description="`userlens privacy-check`: full scans every this many days (0: always); in between "
        "only the rows of the files each table gained since the last passing check",
    )


# why ingest refuses a row (events_quarantine.reason; docs/own-data.md says what each means)
QUARANTINE_REASONS = (
    "malformed_record",
    "missing_user_id",
    "bad_timestamp",
    "missing_event_type",
    "unknown_event_type",
    "missing_item_id",
    "bad_price",
    "negative_price",
    "bad_quantity",
)


class IngestSettings(_Strict):
    event_types: list[str] = Field(
        ["view", "click", "search", "add_to_cart", "purchase", "review"], description="accepted event types"
    )
    item_event_types: list[str] = Field(
        ["view", "click", "add_to_cart", "purchase", "review"], description="event types that need an item_id"
    )
    max_quantity: int = Field(10_000, ge=1, description="largest accepted quantity")
    # a wrong mapping or a broken export should stop the run rather than fill the quarantine
    max_quarantine_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="a run that quarantines more than this share of its rows writes no events "
        "and fails; the quarantine rows are kept",
    )
    max_reason_fraction: dict[str, float] = Field(
        {},
        description="the same limit for one reason (e.g. {bad_timestamp: 0.05}); a reason not listed "
        "has only the total limit",
    )
    on_unreadable_file: Literal["fail", "skip"] = Field(
        "fail",
        description="a raw file Spark cannot read (corrupt block, bad compression): fail the run, or skip "
        "the file and record it in pipeline_runs.details.skipped_files",
    )

    @field_validator("max_reason_fraction")
    @classmethod
    def _known_reasons(cls, value: dict[str, float]) -> dict[str, float]:
        for reason, fraction in value.items():
            if reason not in QUARANTINE_REASONS:
                raise ValueError(f"unknown quarantine reason {reason!r}; reasons: {', '.join(QUARANTINE_REASONS)}")
            if not 0 <= fraction <= 1:
                raise ValueError(f"{reason}: a fraction between 0 and 1, got {fraction}")
        return value


class SampleSettings(_Strict):
    out: str = Field("./data/sample", description="`userlens sample` / `demo`: output root")
    users: int = Field(1000, ge=1, description="`userlens sample`: users generated")
    days: int = Field(30, ge=1, description="`userlens sample`: days of events")
    seed: int = Field(7, ge=0, description="`userlens sample`: random seed")
    start_date: dt.date = Field(dt.date(2026, 10, 1), description="`userlens sample`: first day of events")
    items: int = Field(400, ge=12, description="`userlens sample`: catalog size")
    malformed_fraction: float = Field(
        0.01, ge=0.0, le=0.5, description="`userlens sample`: share of raw lines made malformed"
    )
    pii_fraction: float = Field(
        0.05, ge=0.0, le=1.0, description="`userlens sample`: share of free texts (queries, reviews) with PII"
    )


# Fields an event template may use; the header template has its own set.
EVENT_PLACEHOLDERS = frozenset(
    {"title", "category", "brand", "price", "quantity", "query", "text", "item_id", "event_type", "time"}
)
HEADER_PLACEHOLDERS = frozenset(
    {"n_events", "active_days", "first_date", "last_date", "counts", "top_categories", "spend"}
)


def template_fields(template: str) -> list[str]:
    """Placeholder names in a ``{name}`` template (``{{`` and ``}}`` are literal braces)."""
    import string

    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ValueError(f"bad template {template!r}: {exc}") from exc


class TemplateSet(_Strict):
    """Text templates for one language. Placeholders are ``{name}``."""

    header: str = Field(description="first sentence of a user's text (n_events, active_days, counts, ...)")
    count_item: str = Field("{label}: {count}", description="one event type's count in the header")
    count_separator: str = Field(", ", description="between count items")
    category_separator: str = Field(", ", description="between top categories")
    labels: dict[str, str] = Field({}, description="event type -> label in the counts")
    events: dict[str, str] = Field(description="event type -> event template")
    default_event: str = Field("{event_type} {title}", description="template of an event type without one")
    repeat: str = Field(" x{count}", description="suffix of a repeated event")
    day_prefix: str = Field("{date}: ", description="before each day's events")
    event_separator: str = Field("; ", description="between events")
    chars_per_token: float = Field(
        3.0, gt=0, description="characters per encoder token, for the approximate token budget"
    )
    state_active: str = Field("Last active {date}.", description="the state text's first sentence")
    state_cart: str = Field(
        "Open cart: {events}.", description="the state text's open cart (items added, not bought since)"
    )
    state_parts: dict[str, str] = Field(
        {"purchase": "Last order: {events}.", "review": "Last review: {events}.", "search": "Last searches: {events}."},
        description="event type -> the state text's sentence of the user's newest events of that type",
    )
    state_separator: str = Field(" ", description="between the state text's sentences")

    @model_validator(mode="after")
    def _known_placeholders(self) -> "TemplateSet":
        checks = [
            ("header", self.header, HEADER_PLACEHOLDERS),
            ("state_active", self.state_active, {"date"}),
            ("state_cart", self.state_cart, {"events"}),
            ("count_item", self.count_item, {"label", "count"}),
            ("repeat", self.repeat, {"count"}),
            ("day_prefix", self.day_prefix, {"date"}),
            ("default_event", self.default_event, EVENT_PLACEHOLDERS),
        ]
        checks += [(f"events.{name}", text, EVENT_PLACEHOLDERS) for name, text in self.events.items()]
        checks += [(f"state_parts.{name}", text, {"events"}) for name, text in self.state_parts.items()]
        for name, text, allowed in checks:
            for field_name in template_fields(text):
                if field_name not in allowed:
                    raise ValueError(
                        f"template {name} uses unknown placeholder {{{field_name}}}; "
                        f"allowed: {', '.join(sorted(allowed))}"
                    )
        return self


class StateTextSettings(_Strict):
    """The second, short text per user: where the user stands now (docs/training.md, "The state text")."""

    enabled: bool = Field(
        False,
        description="build the state text (user_texts.state_text) and embed it (user_embeddings.state_embedding); "
        "off by default until its ablation shows a gain (docs/benchmarks.md)",
    )
    max_tokens: int = Field(96, ge=8, description="approximate token budget of the state text")
    cart_event: str = Field("add_to_cart", description="event type of a cart add (the open cart)")
    order_event: str = Field("purchase", description="event type that closes a cart add of the same item")
    open_cart: int = Field(3, ge=0, description="newest open-cart items named (added, not bought since)")
    newest: dict[str, int] = Field(
        {"purchase": 1, "review": 1, "search": 3},
        description="event type -> newest events of that type named, each a sentence (templates' state_parts); "
        "a type the data does not have adds nothing",
    )


class TextualizeSettings(_Strict):
    language: str = Field("en", description="language of the templates used (a key of textualize.templates)")
    template_version: str = Field(
        "1", description="part of the text id: bump to re-text (and so re-embed) every user after changing a template"
    )
    max_events: int = Field(200, ge=1, le=1000, description="newest events kept per user")
    max_tokens: int = Field(256, ge=16, description="approximate token budget per text")
    top_categories: int = Field(3, ge=1, description="categories named in the header")
    max_field_chars: int = Field(160, ge=8, description="queries and review texts are cut to this length")
    templates: dict[str, TemplateSet] = Field(
        {},
        description="language -> templates (header, count_item, labels, events, default_event, repeat, "
        "day_prefix, separators, chars_per_token, state_active, state_cart, state_parts, state_separator)",
    )
    state: StateTextSettings = Field(StateTextSettings(), description="the state text")

    @model_validator(mode="after")
    def _language_exists(self) -> "TextualizeSettings":
        if self.language not in self.templates:
            raise ValueError(
                f"no templates for language {self.language!r}; defined: {', '.join(sorted(self.templates)) or 'none'}"
            )
        if self.state.enabled:
            missing = [t for t in self.state.newest if t not in self.templates[self.language].state_parts]
            if missing:
                raise ValueError(
                    f"state.newest names {', '.join(missing)} but templates.{self.language}.state_parts has no "
                    "sentence for it"
                )
        return self


class EmbedSettings(_Strict):
    model: str = Field(
        "builtin:minilm", description="`builtin:minilm` or a local Hugging Face / sentence-transformers model directory"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="auto: the task's GPU if Spark gave it one (or CUDA_VISIBLE_DEVICES), else CPU; "
        "cuda: a GPU is required (Spark GPU keys checked before any job)",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float32 on CPU, bfloat16 (float16 where unsupported) on GPU; CPU always runs float32"
    )
    normalize: bool = Field(True, description="L2-normalize embeddings")
    max_batch_tokens: int = Field(
        16384, ge=512, description="padded tokens per forward pass (rows x longest row of a length-sorted micro-batch)"
    )
    arrow_batch_size: int = Field(
        1024,
        ge=1,
        description="rows per Arrow batch handed to a Python worker (spark.sql.execution.arrow.maxRecordsPerBatch)",
    )
    gpu_partitions: int | None = Field(
        None, ge=1, description="GPU only: tasks of the embedding stage (null: spark.default.parallelism)"
    )
    gpu_task_cpus: int = Field(
        1, ge=1, description="GPU only: CPU cores each embedding task holds besides its GPU: its tokenizer threads"
    )
    prefetch_batches: int = Field(
        4, ge=1, description="Arrow batches a task tokenizes and pads ahead of the model (a background thread)"
    )
    items: bool = Field(True, description="embed the item catalog too")
    item_text_fields: list[Literal["title", "category", "brand", "description"]] = Field(
        ["title", "category", "brand", "description"], description="item fields in an item's text"
    )
    # a model id of its own, so switching it re-embeds everyone
    cpu_int8: bool = Field(
        False,
        description="CPU only: int8 Linear layers (torch dynamic quantization), ~1.45x faster, "
        "mean 1 - cos ~0.003 from float32 (refused on load above 0.01)",
    )

    @model_validator(mode="after")
    def _int8_on_cpu(self) -> "EmbedSettings":
        if self.cpu_int8 and self.device != "cpu":
            raise ValueError(f"cpu_int8 runs on CPU only: set device: cpu (it is {self.device})")
        return self


class SplitSettings(_Strict):
    """Users go to train / valid / test by a salted hash of user_key (test gets the rest)."""

    train: float = Field(0.7, gt=0, lt=1, description="share of users in the train split")
    valid: float = Field(0.15, gt=0, lt=1, description="share of users in the validation split (test: the rest)")
    salt: str = Field("userlens-split-v1", description="salt of the user_key hash that splits users")

    @model_validator(mode="after")
    def _leaves_a_test_split(self) -> "SplitSettings":
        if self.train + self.valid >= 1:
            raise ValueError(f"train + valid must be < 1 to leave a test split, got {self.train + self.valid:g}")
        return self


class DPSettings(_Strict):
    """DP-SGD with Opacus (extra ``privacy``); one training sample per user, so epsilon is user-level."""

    enabled: bool = Field(False, description="DP-SGD with Opacus (extra `privacy`); epsilon is user-level")
    target_epsilon: float = Field(8.0, gt=0, description="DP-SGD privacy budget epsilon")
    target_delta: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="DP-SGD delta (null: 1 / (number of training users), rounded down to a power of ten)",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="DP-SGD per-sample gradient clipping norm")


class AlsSettings(_Strict):
    """Spark MLlib ALS (implicit feedback), the collaborative-filtering baseline of the recommender."""

    rank: int = Field(32, ge=1, description="ALS baseline of the recommender: rank")
    max_iter: int = Field(10, ge=1, description="ALS baseline of the recommender: iterations")
    reg_param: float = Field(0.05, ge=0, description="ALS baseline of the recommender: regularization")
    alpha: float = Field(10.0, gt=0, description="ALS baseline of the recommender: implicit-feedback confidence")
    tune: bool = Field(
        True,
        description="train: choose regParam and alpha from evaluate.als_reg_params x evaluate.als_alphas by "
        "recall@k on the valid split's users (false: reg_param and alpha as given)",
    )
    checkpoint_dir: str | None = Field(
        None,
        description="where ALS checkpoints its lineage when max_iter is above 10 (storage every executor "
        "can reach; null: a temporary directory in local mode, an error on a cluster)",
    )


class RecommendSettings(_Strict):
    """The sequential recommendation head (``userlens.models.sequential``) trained in the train stage's
    TorchDistributor run; ``userlens evaluate`` fits the same class."""

    enabled: bool = Field(True, description="the sequential recommendation head (off with DP-SGD)")
    k: int = Field(10, ge=1, le=1000, description="items published per user and evaluated (recall@k, nDCG@k)")
    dim: int = Field(64, ge=4, description="sequential encoder: item and user vector width")
    history: int = Field(50, ge=1, description="sequential encoder: newest items of a user's history it reads")
    weight: float = Field(1.0, gt=0, description="the recommendation loss's weight beside the task losses")
    eval_users: int = Field(
        20_000,
        ge=1,
        description="test users evaluated (a hash sample above this); also the most valid users the ALS "
        "baseline and the fusion weight are chosen on",
    )
    score_block_mib: int = Field(
        256,
        ge=1,
        description="score: the users x items float32 score block each Python worker holds at once (peak "
        "memory is about the model + 3 blocks; docs/training.md)",
    )
    als: AlsSettings = Field(AlsSettings(), description="the Spark MLlib ALS baseline")
    # the sequential user encoder (userlens.models.sequential)
    layers: int = Field(2, ge=1, description="sequential encoder: transformer blocks")
    heads: int = Field(1, ge=1, description="sequential encoder: attention heads (dim must divide by it)")
    dropout: float = Field(0.5, ge=0, lt=1, description="sequential encoder: dropout")
    id_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="sequential encoder: share of items whose id vector is dropped in each training step, so "
        "their text alone must carry them (as for a new item); 0: off",
    )
    batch_size: int = Field(128, ge=1, description="sequential encoder: histories per step")
    learning_rate: float = Field(1e-3, gt=0, description="sequential encoder: AdamW learning rate")
    max_epochs: int = Field(200, ge=1, description="sequential encoder: most epochs (early stopping on validation)")
    patience: int = Field(5, ge=1, description="sequential encoder: validations without improvement before stopping")
    ease_max_items: int = Field(
        20_000,
        ge=2,
        description="EASE needs a dense items x items matrix (8 bytes each while fitting): "
        "refused, with one line, above this many items",
    )


class MlflowSettings(_Strict):
    enabled: bool = Field(False, description="MLflow logging (extra `mlflow`)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (null: MLflow's default)")
    experiment: str = Field("userlens", description="MLflow experiment name")


class TrainSettings(_Strict):
    horizon_days: int = Field(7, ge=1, description="cutoff C = as-of - horizon; features <= C, labels in (C, as-of]")
    tasks: list[Literal["purchase", "churn", "next_category"]] = Field(
        ["purchase", "churn", "next_category"], description="heads of the model"
    )
    max_categories: int = Field(
        50, ge=2, description='next_category classes: the most frequent label categories; the rest fall into "other"'
    )
    views: list[Literal["history", "state"]] = Field(
        ["history"],
        description="the user embeddings the model reads beside the numeric features (which it always reads): "
        "history (user_embeddings.embedding), state (user_embeddings.state_embedding)",
    )
    hidden: list[int] = Field([128], description="MLP trunk widths; the numeric features also feed the heads directly")
    dropout: float = Field(0.3, ge=0, lt=1, description="dropout of the MLP trunk")
    batch_size: int = Field(256, ge=1, description="rows per step per process")
    epochs: int = Field(40, ge=1, description="most epochs")
    patience: int = Field(5, ge=1, description="epochs without a better validation loss before stopping")
    log_every_epochs: int = Field(
        10, ge=1, description="the losses of epoch 0, of every this many epochs and of the last are logged (-v: 1)"
    )
    learning_rate: float = Field(1e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(1e-3, ge=0, description="AdamW weight decay")
    baseline_fallback: bool = Field(
        True,
        description="a purchase or churn head whose validation loss is not below that of the baseline's "
        "logistic regression ends as that regression (off under DP-SGD)",
    )
    text_baseline: bool = Field(
        True,
        description="fit the bag-of-words logistic regression (TF-IDF of the history and state texts beside the "
        "numeric features) as a second baseline of purchase and churn: metrics.json baseline['<task> (bag of "
        "words)']",
    )
    state_probe: bool = Field(
        True,
        description="with the state view: the baseline's regression plus a penalised correction read from the "
        "state embedding, as a third candidate of the purchase and churn heads (beside the trained head and the "
        "baseline's regression; the one with the lowest validation loss ships)",
    )
    linear_reg_params: list[float] = Field(
        [0.01, 0.1, 1.0],
        min_length=1,
        description="regParam grid of the bag-of-words baseline and the state probe (each chosen on valid)",
    )
    seed: int = Field(13, description="training seed")
    split: SplitSettings = Field(SplitSettings(), description="hash split of user_key")
    min_users: int = Field(50, ge=2, description="refuse to train below this many users (per task, train split)")
    min_class_users: int = Field(
        5, ge=1, description="refuse to train below this many users per class (per task, train split)"
    )
    num_processes: int = Field(2, ge=1, description="TorchDistributor(num_processes)")
    local_mode: bool = Field(True, description="TorchDistributor(local_mode)")
    use_gpu: bool = Field(False, description="TorchDistributor(use_gpu)")
    snapshot_rows_per_file: int = Field(
        200_000, ge=1000, description="snapshot files = max(num_processes, users / this)"
    )
    retrain_days: int = Field(
        7, ge=1, description="a new model is trained when none exists or the newest is at least this many days old"
    )
    dp: DPSettings = Field(DPSettings(), description="DP-SGD")
    recommend: RecommendSettings = Field(RecommendSettings(), description="the sequential recommendation head")
    mlflow: MlflowSettings = Field(MlflowSettings(), description="MLflow logging")


class ProfileSettings(_Strict):
    segments: int = Field(8, ge=2, description="k of the k-means on user embeddings")
    segment_refit_days: int = Field(
        7, ge=1, description="refit the segments when the newest segment model is this old (or the encoder changed)"
    )
    interests: int = Field(3, ge=1, description="top categories per user")
    interest_half_life_days: float = Field(14.0, gt=0, description="recency half-life of the interests")


class NightlySettings(_Strict):
    report: bool = Field(True, description="write the HTML report as the last stage")
    report_dir: str = Field("./reports", description="where the HTML reports go")
    lock_hours: float = Field(
        12.0,
        gt=0,
        description="one nightly at a time per warehouse (run_locks); a run that died holds the lock this long",
    )
    privacy_check: bool = Field(False, description="`userlens privacy-check` as the last stage; a fail fails the night")


class ExplainSettings(_Strict):
    """Per-user explanations of the scores (docs/operations.md, "Explanations")."""

    users: Literal["none", "sample", "all"] = Field(
        "sample", description="whose scores the nightly explains after profile: none, a sample, or all"
    )
    sample_size: int = Field(
        20, ge=1, description="users explained per night with users: sample (among the night's scored users)"
    )
    days: int = Field(14, ge=1, description="a user's most recent active days left out one at a time")
    top: int = Field(3, ge=1, le=20, description="days kept per task, largest weight first")


class GateSettings(_Strict):
    """The quality gate between score and profile (docs/operations.md, "The quality gate")."""

    enabled: bool = Field(
        True, description="check each night's output before profile publishes it; a new model waits as a candidate"
    )
    max_auc_drop: float = Field(
        0.05,
        ge=0,
        le=1,
        description="a new model's test AUC (purchase, churn) may be this much below the published model's",
    )
    max_recall_drop: float = Field(
        0.2,
        ge=0,
        le=1,
        description="a new model's test recall@k may be this share below the published model's (0.2: a fifth)",
    )
    min_standard_errors: float = Field(
        2.0,
        ge=0,
        description="a metric's drop fails only when it is also this many standard errors of the difference "
        "(a small test split cannot fail a night by chance)",
    )
    max_psi: float = Field(
        0.25,
        gt=0,
        description="population stability index of each score over every user, after the night against before "
        "(0.1-0.25: a shift worth a look; above 0.25: one that needs an explanation)",
    )
    max_segments_changed: float = Field(
        0.5, gt=0, le=1, description="share of profiled users whose segment the night changes"
    )
    max_recommendations_changed: float = Field(
        0.5,
        gt=0,
        le=1,
        description="share of users whose top 3 recommendations the night changes, with the same model "
        "(a new model is judged by its recall@k instead)",
    )
    min_rows_ratio: float = Field(
        0.2,
        gt=0,
        le=1,
        description="the night's events per raw date may not fall below this times the median of the last 7 ingests",
    )
    max_rows_ratio: float = Field(
        5.0, ge=1, description="nor rise above this times that median (a replayed or duplicated feed)"
    )
    max_unpriced_increase: float = Field(
        0.2,
        gt=0,
        le=1,
        description="the night's share of purchases without a positive price may exceed the median share of the "
        "7 days before by this much (a feed that lost its prices)",
    )


DatasetAdapter = Literal["movielens-100k", "movielens", "amazon", "sequences", "retailrocket"]


class DatasetSettings(_Strict):
    """A public dataset read as distributed (presets: conf/datasets/<name>.yaml; docs/datasets.md).

    With an adapter set, ingest and ``userlens evaluate`` read ``source.path`` through
    :mod:`userlens.sources.datasets` instead of ``source.format`` / ``source.mapping``."""

    adapter: DatasetAdapter | None = Field(
        None,
        description="a public dataset's reader (movielens-100k, movielens, amazon, sequences, retailrocket; "
        "presets in conf/datasets/): ingest and `evaluate` read source.path through it",
    )
    events_file: str | None = Field(
        None, description="relative to source.path (or absolute); null: the adapter's own file name"
    )
    items_file: str | None = Field(
        None, description="relative to source.path (or absolute); null: the adapter's own file name"
    )
    encoding: str | None = Field(
        None,
        description="text encoding of the item file; null: ISO-8859-1 for MovieLens u.item and .dat files, else UTF-8",
    )


class EvaluateSettings(_Strict):
    """``userlens evaluate``: what counts as an interaction, the seed, and the baselines' parameters."""

    interactions: list[str] = Field(
        [], description="event types that are interactions in the ranking protocols (empty: ingest.item_event_types)"
    )
    seed: int = Field(13, description="stratified-75 split, next-window user split, ALS")
    horizon_days: int | None = Field(
        None,
        ge=1,
        description='next-window: the H of "active / purchase in the next H days" (null: train.horizon_days)',
    )
    k_core: int = Field(
        0,
        ge=0,
        description="keep only users and items with at least this many interactions, iterated until "
        "stable, before the split (a paper's k-core preprocessing; 0: none)",
    )
    # the grids each baseline is tuned over on the validation fold (ALS: rank and iterations from
    # train.recommend.als)
    als_reg_params: list[float] = Field([0.01, 0.1, 1.0, 10.0], min_length=1, description="ALS regParam values tried")
    als_alphas: list[float] = Field([0.1, 1.0, 10.0], min_length=1, description="ALS alpha values tried")
    ease_lambdas: list[float] = Field(
        [10, 25, 50, 100, 200, 400, 800, 1600], min_length=1, description="EASE lambda values tried"
    )
    strengths: list[Literal["count", "score"]] = Field(
        ["count", "score"],
        min_length=1,
        description="ALS and EASE: the interaction strengths tried (count: events per user and item, EASE "
        "binary; score: the rating's score, where the data has ratings)",
    )
    knn_half_lives: list[float | None] = Field(
        [None, 7.0, 30.0, 90.0],
        min_length=1,
        description="item-kNN (SAR-style, Jaccard co-occurrence): user affinity half-lives in days tried (null: "
        "no decay)",
    )
    knn_neighbors: int = Field(100, ge=1, description="item-kNN: most similar items kept per item")
    knn_history: int = Field(200, ge=1, description="item-kNN: newest distinct items per user counted in co-occurrence")
    cold_id_dropouts: list[float] = Field(
        [0.0, 0.5],
        min_length=1,
        description="cold-items: the sequential encoder's id_dropout values tried on validation",
    )
    userlens: bool = Field(True, description="the userlens rows of `userlens evaluate` (false: baselines only)")


class Settings(_Strict):
    env: Literal["local", "cluster", "databricks"] = Field("local", description="local, cluster or databricks")
    spark: SparkSettings = Field(SparkSettings(), description="the Spark session")
    storage: StorageSettings = Field(StorageSettings(), description="where tables and models live")
    source: SourceSettings = Field(SourceSettings(), description="the raw events and items")
    privacy: PrivacySettings = Field(PrivacySettings(), description="pseudonyms, PII, retention")
    ingest: IngestSettings = Field(IngestSettings(), description="the ingest stage")
    sample: SampleSettings = Field(SampleSettings(), description="`userlens sample` / `demo`")
    textualize: TextualizeSettings = Field(description="user texts")
    embed: EmbedSettings = Field(EmbedSettings(), description="the text encoder")
    train: TrainSettings = Field(TrainSettings(), description="the model")
    profile: ProfileSettings = Field(ProfileSettings(), description="segments and interests")
    nightly: NightlySettings = Field(NightlySettings(), description="the nightly run")
    gate: GateSettings = Field(GateSettings(), description="the quality gate before profiles are published")
    explain: ExplainSettings = Field(ExplainSettings(), description="per-user explanations of the scores")
    dataset: DatasetSettings = Field(DatasetSettings(), description="a public dataset as the source")
    evaluate: EvaluateSettings = Field(EvaluateSettings(), description="`userlens evaluate`")

    @model_validator(mode="after")
    def _state_view_has_a_text(self) -> "Settings":
        if "state" in self.train.views and not self.textualize.state.enabled:
            raise ValueError("train.views has state but textualize.state.enabled is false: no state text to read")
        return self


# Fields whose value is a free-form map: a dotted --set key below them is one map key.
_MAP_FIELDS = {("spark", "conf"), ("source", "event_type_map"), ("ingest", "max_reason_fraction")}
# (templates are nested models, so dotted --set keys below them work as usual)

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def load_settings(
    conf_files: list[str | os.PathLike[str]] | None = None,
    overrides: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Settings:
    """Load base.yaml, then ``conf_files`` (default local.yaml), then ``--set`` overrides.

    Raises ConfigError with one line naming the file (or ``--set``) and key.
    """
    environ = dict(os.environ if env is None else env)
    files = [Path(f) for f in (conf_files if conf_files else [DEFAULT_CONF])]
    merged: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    for path in [BASE_CONF, *files]:
        layer = _read_yaml(path)
        label = _label(path)
        layer = _expand(layer, environ, label, ())
        _merge(merged, layer, origin, label, ())
    for item in overrides or []:
        key, value = _parse_set(item)
        layer = _expand(_nest(key, value), environ, "--set", ())
        _merge(merged, layer, origin, "--set", ())
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from exc


def _label(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{_label(path)}:{where}: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{_label(path)}: top level must be a mapping of sections")
    return data


def _expand(value: Any, environ: dict[str, str], label: str, key: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, environ, label, (*key, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, environ, label, key) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{label}: {'.'.join(key)}: environment variable ${{{name}}} is not set")

    return _ENV_REF.sub(substitute, value)


def _merge(
    into: dict[str, Any],
    layer: dict[str, Any],
    origin: dict[tuple[str, ...], str],
    label: str,
    prefix: tuple[str, ...],
) -> None:
    for key, value in layer.items():
        path = (*prefix, str(key))
        origin[path] = label
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, origin, label, path)
        else:
            into[key] = value
            if isinstance(value, dict):
                _record(value, origin, label, path)


def _record(value: dict[str, Any], origin: dict[tuple[str, ...], str], label: str, prefix: tuple[str, ...]) -> None:
    for key, sub in value.items():
        path = (*prefix, str(key))
        origin[path] = label
        if isinstance(sub, dict):
            _record(sub, origin, label, path)


def _parse_set(item: str) -> tuple[tuple[str, ...], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set: expected dotted.key=value, got {item!r}")
    parts = tuple(key.strip().split("."))
    for depth in range(1, len(parts)):
        if parts[:depth] in _MAP_FIELDS:
            parts = (*parts[:depth], ".".join(parts[depth:]))
            break
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _nest(key: tuple[str, ...], value: Any) -> dict[str, Any]:
    for part in reversed(key):
        value = {part: value}
    return value


def _describe(exc: ValidationError, origin: dict[tuple[str, ...], str]) -> str:
    errors = exc.errors()
    first = errors[0]
    loc = tuple(str(p) for p in first["loc"])
    # pydantic reports the alias for aliased fields; tagged unions add type names
    source = "conf/base.yaml"
    for depth in range(len(loc), 0, -1):
        if loc[:depth] in origin:
            source = origin[loc[:depth]]
            break
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    else:
        message = first["msg"]
        if "input" in first and not isinstance(first["input"], (dict, list)):
            message += f" (got {first['input']!r})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{source}: {'.'.join(loc)}: {message}{more}"


@dataclass(frozen=True)
class KeyDoc:
    """One key of docs/configuration.md: its dotted name, its default as shown there, and its meaning."""

    key: str
    default: str
    description: str


# a default longer than this (the templates) is shown as a pointer to the file
_SHOWN_DEFAULT_CHARS = 80


def settings_reference() -> list[KeyDoc]:
    """Every key of :class:`Settings`, in model order, as ``KeyDoc`` rows (scripts/config_reference.py).

    Nested models become dotted keys (``train.recommend.als.rank``); a map field (``spark.conf``,
    ``textualize.templates``) is one key; aliased fields go by their alias (``storage.schema``). The
    default is that of conf/base.yaml over the model defaults, with conf/local.yaml's value added
    where it differs.
    """
    base = Settings.model_validate(_expand(_read_yaml(BASE_CONF), {}, "conf/base.yaml", ()))
    local = load_settings([DEFAULT_CONF], env={})
    return list(_reference_rows(Settings, base, local, ""))


def _reference_rows(model: type[BaseModel], base: BaseModel, local: BaseModel, prefix: str):
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        base_value, local_value = getattr(base, name), getattr(local, name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _reference_rows(annotation, base_value, local_value, key + ".")
            continue
        shown = _shown_default(base_value, "conf/base.yaml")
        if local_value != base_value:
            shown += f" (local.yaml: {_shown_default(local_value, 'conf/local.yaml')})"
        yield KeyDoc(key, shown, field.description or "")


def _shown_default(value: Any, source: str) -> str:
    text = _yaml_style(value)
    return text if len(text) <= _SHOWN_DEFAULT_CHARS else f"see {source}"


def _yaml_style(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, BaseModel):
        value = value.model_dump(by_alias=True)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_yaml_style(k)}: {_yaml_style(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_style(v) for v in value) + "]"
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, str):
        try:
            plain = yaml.safe_load(value) == value and value == value.strip() and "," not in value
        except yaml.YAMLError:
            plain = False
        return value if plain else '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)
