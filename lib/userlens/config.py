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
    master: str | None = None
    app_name: str = "userlens"
    driver_memory: str = "4g"
    shuffle_partitions: int = Field(8, ge=1)
    log_level: Literal["ERROR", "WARN", "INFO", "DEBUG"] = "WARN"
    ui: bool = True
    # pip: fetch the io.delta jar matching the installed delta-spark from Maven
    # (local runs); provided: the cluster or platform already has Delta.
    delta_jars: Literal["pip", "provided"] = "pip"
    jars: list[str] = []
    conf: dict[str, str] = {}

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
    warehouse: str = "./warehouse"
    catalog: str | None = None
    schema_name: str | None = Field(None, alias="schema")
    models: str = "./models"


class EventMapping(_Strict):
    """Canonical event field -> source column name (null: the source has none)."""

    event_id: str | None = "event_id"
    user_id: str = "user_id"
    event_time: str = "ts"
    event_type: str = "event_type"
    item_id: str | None = "item_id"
    category: str | None = "category"
    price: str | None = "price"
    quantity: str | None = "quantity"
    query: str | None = "query"
    text: str | None = "review_text"


class ItemMapping(_Strict):
    """Canonical item field -> source column name."""

    item_id: str = "item_id"
    title: str | None = "title"
    category: str | None = "category"
    brand: str | None = "brand"
    price: str | None = "price"
    description: str | None = "description"


SourceFormat = Literal["json", "parquet", "csv", "delta"]


class SourceSettings(_Strict):
    path: str = "./data/sample"
    format: SourceFormat = "json"
    events_path: str | None = None
    items_path: str | None = None
    items_format: SourceFormat | None = None
    mapping: EventMapping = EventMapping()
    items_mapping: ItemMapping = ItemMapping()
    # null: ISO-8601 text; epoch_s / epoch_ms: numbers; anything else: a Spark datetime pattern
    timestamp_format: str | None = None
    event_type_map: dict[str, str] = {}
    # a date-valued partition column of the raw layout (event_date=YYYY-MM-DD/);
    # when absent from the data the date comes from the event time
    date_partition: str = "event_date"
    csv_header: bool = True

    def events_location(self) -> str:
        return self.events_path or _join(self.path, "events")

    def items_location(self) -> str:
        return self.items_path or _join(self.path, "items")


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


class PrivacySettings(_Strict):
    key_env: str = "USERLENS_HMAC_KEY"
    # Only for the embedded local default: used, with a loud warning, when the
    # env var is unset. Cluster and Databricks configs leave it null.
    dev_key: str | None = None
    min_segment_size: int = Field(20, ge=1)
    pii_placeholders: bool = True
    # `userlens forget`: VACUUM keeps files removed within this many hours (Delta's own floor: 168)
    forget_retention_hours: int = Field(168, ge=0)
    # nightly: events_quarantine rows older than this (by source_date, else quarantined_at) are deleted
    quarantine_retention_days: int = Field(30, ge=1)
    # `userlens privacy-check`: raw ids shorter than this are not searched (too many chance matches)
    check_min_id_chars: int = Field(4, ge=1)
    # `userlens privacy-check`: between full scans (every this many days; 0 = always), only the rows of
    # the files each table gained since the last passing check are scanned
    check_full_every_days: int = Field(7, ge=0)


class IngestSettings(_Strict):
    event_types: list[str] = ["view", "click", "search", "add_to_cart", "purchase", "review"]
    item_event_types: list[str] = ["view", "click", "add_to_cart", "purchase", "review"]
    max_quantity: int = Field(10_000, ge=1)


class SampleSettings(_Strict):
    out: str = "./data/sample"
    users: int = Field(1000, ge=1)
    days: int = Field(30, ge=1)
    seed: int = Field(7, ge=0)
    start_date: dt.date = dt.date(2026, 10, 1)
    items: int = Field(400, ge=12)
    malformed_fraction: float = Field(0.01, ge=0.0, le=0.5)
    pii_fraction: float = Field(0.05, ge=0.0, le=1.0)


# Fields an event template may use; the header template has its own set.
EVENT_PLACEHOLDERS = frozenset({"title", "category", "brand", "price", "quantity", "query", "text", "item_id",
                                "event_type", "time"})
HEADER_PLACEHOLDERS = frozenset({"n_events", "active_days", "first_date", "last_date", "counts",
                                 "top_categories", "spend"})


def template_fields(template: str) -> list[str]:
    """Placeholder names in a ``{name}`` template (``{{`` and ``}}`` are literal braces)."""
    import string

    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ValueError(f"bad template {template!r}: {exc}") from None


class TemplateSet(_Strict):
    """Text templates for one language. Placeholders are ``{name}``."""

    header: str
    count_item: str = "{label}: {count}"
    count_separator: str = ", "
    category_separator: str = ", "
    labels: dict[str, str] = {}
    events: dict[str, str]
    default_event: str = "{event_type} {title}"
    repeat: str = " x{count}"
    day_prefix: str = "{date}: "
    event_separator: str = "; "
    # characters per encoder token, for the approximate token budget
    chars_per_token: float = Field(3.0, gt=0)

    @model_validator(mode="after")
    def _known_placeholders(self) -> "TemplateSet":
        checks = [("header", self.header, HEADER_PLACEHOLDERS), ("count_item", self.count_item, {"label", "count"}),
                  ("repeat", self.repeat, {"count"}), ("day_prefix", self.day_prefix, {"date"}),
                  ("default_event", self.default_event, EVENT_PLACEHOLDERS)]
        checks += [(f"events.{name}", text, EVENT_PLACEHOLDERS) for name, text in self.events.items()]
        for name, text, allowed in checks:
            for field_name in template_fields(text):
                if field_name not in allowed:
                    raise ValueError(f"template {name} uses unknown placeholder {{{field_name}}}; "
                                     f"allowed: {', '.join(sorted(allowed))}")
        return self


class TextualizeSettings(_Strict):
    language: str = "en"
    template_version: str = "1"
    max_events: int = Field(200, ge=1, le=1000)
    max_tokens: int = Field(256, ge=16)
    top_categories: int = Field(3, ge=1)
    max_field_chars: int = Field(160, ge=8)
    templates: dict[str, TemplateSet] = {}

    @model_validator(mode="after")
    def _language_exists(self) -> "TextualizeSettings":
        if self.language not in self.templates:
            raise ValueError(f"no templates for language {self.language!r}; "
                             f"defined: {', '.join(sorted(self.templates)) or 'none'}")
        return self


class EmbedSettings(_Strict):
    model: str = "builtin:minilm"
    # auto: the task's GPU if Spark gave it one (or CUDA_VISIBLE_DEVICES), else CPU;
    # cuda: a GPU is required (validated against the Spark GPU keys before any job)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: float32 on CPU, bfloat16 (float16 where unsupported) on GPU; CPU always runs float32
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    normalize: bool = True
    # padded tokens per forward pass (rows x longest row of a length-sorted micro-batch)
    max_batch_tokens: int = Field(16384, ge=512)
    # rows per Arrow batch handed to a Python worker (spark.sql.execution.arrow.maxRecordsPerBatch)
    arrow_batch_size: int = Field(1024, ge=1)
    # GPU only: tasks of the forward-pass stage (default: spark.default.parallelism)
    gpu_partitions: int | None = Field(None, ge=1)
    # GPU only: CPU cores each forward-pass task holds besides its GPU
    gpu_task_cpus: int = Field(1, ge=1)
    items: bool = True
    item_text_fields: list[Literal["title", "category", "brand", "description"]] = [
        "title", "category", "brand", "description"]
    # CPU only: int8 Linear layers (torch dynamic quantization), ~1.45x faster, mean 1 - cos ~0.003 from
    # float32 (refused on load above 0.01); a model id of its own, so switching it re-embeds everyone
    cpu_int8: bool = False

    @model_validator(mode="after")
    def _int8_on_cpu(self) -> "EmbedSettings":
        if self.cpu_int8 and self.device != "cpu":
            raise ValueError(f"cpu_int8 runs on CPU only: set device: cpu (it is {self.device})")
        return self


class SplitSettings(_Strict):
    """Users go to train / valid / test by a salted hash of user_key (test gets the rest)."""

    train: float = Field(0.7, gt=0, lt=1)
    valid: float = Field(0.15, gt=0, lt=1)
    salt: str = "userlens-split-v1"

    @model_validator(mode="after")
    def _leaves_a_test_split(self) -> "SplitSettings":
        if self.train + self.valid >= 1:
            raise ValueError(f"train + valid must be < 1 to leave a test split, got {self.train + self.valid:g}")
        return self


class DPSettings(_Strict):
    """DP-SGD with Opacus (extra ``privacy``); one training sample per user, so epsilon is user-level."""

    enabled: bool = False
    target_epsilon: float = Field(8.0, gt=0)
    # None: 1 / (number of training users), rounded down to a power of ten
    target_delta: float | None = Field(None, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)


class AlsSettings(_Strict):
    """Spark MLlib ALS (implicit feedback), the collaborative-filtering baseline of the recommender."""

    rank: int = Field(32, ge=1)
    max_iter: int = Field(10, ge=1)
    reg_param: float = Field(0.05, ge=0)
    alpha: float = Field(10.0, gt=0)


class RecommendSettings(_Strict):
    """The two-tower recommendation head trained in the train stage's TorchDistributor run."""

    enabled: bool = True
    k: int = Field(10, ge=1, le=1000)            # items published per user and evaluated (recall@k, nDCG@k)
    dim: int = Field(64, ge=4)                   # the towers' output dimension
    hidden: int = Field(256, ge=4)               # the user tower's hidden width
    history: int = Field(50, ge=1)               # newest distinct items of a user's history that are pooled
    history_half_life_days: float = Field(14.0, gt=0)
    weight: float = Field(1.0, gt=0)             # the recommendation loss's weight beside the task losses
    eval_users: int = Field(20_000, ge=1)        # test users evaluated (a hash sample above this)
    als: AlsSettings = AlsSettings()


class MlflowSettings(_Strict):
    enabled: bool = False
    tracking_uri: str | None = None
    experiment: str = "userlens"


class TrainSettings(_Strict):
    horizon_days: int = Field(7, ge=1)
    tasks: list[Literal["purchase", "churn", "next_category"]] = ["purchase", "churn", "next_category"]
    # next_category classes: the most frequent label categories; the rest fall into "other"
    max_categories: int = Field(50, ge=2)
    hidden: list[int] = [128]
    dropout: float = Field(0.3, ge=0, lt=1)
    batch_size: int = Field(256, ge=1)
    epochs: int = Field(40, ge=1)
    patience: int = Field(5, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-3, ge=0)
    # a purchase or churn head whose validation loss is not below that of the baseline's logistic
    # regression ends as that regression (off under DP-SGD)
    baseline_fallback: bool = True
    seed: int = 13
    split: SplitSettings = SplitSettings()
    # refuse to train below these counts (per task, in the train split)
    min_users: int = Field(50, ge=2)
    min_class_users: int = Field(5, ge=1)
    # TorchDistributor(num_processes, local_mode, use_gpu)
    num_processes: int = Field(2, ge=1)
    local_mode: bool = True
    use_gpu: bool = False
    snapshot_rows_per_file: int = Field(200_000, ge=1000)
    # a new model is trained when none exists or the newest is at least this many days old
    retrain_days: int = Field(7, ge=1)
    dp: DPSettings = DPSettings()
    recommend: RecommendSettings = RecommendSettings()
    mlflow: MlflowSettings = MlflowSettings()


class ProfileSettings(_Strict):
    # k-means on user embeddings; refit when the newest segment model is this old or the encoder changed
    segments: int = Field(8, ge=2)
    segment_refit_days: int = Field(7, ge=1)
    interests: int = Field(3, ge=1)              # top categories per user
    interest_half_life_days: float = Field(14.0, gt=0)


class NightlySettings(_Strict):
    report: bool = True                           # write the HTML report as the last stage
    report_dir: str = "./reports"
    # one nightly at a time per warehouse (run_locks); a run that died holds the lock this long
    lock_hours: float = Field(12.0, gt=0)
    privacy_check: bool = False                   # `userlens privacy-check` as the last stage; a fail fails the night


DatasetAdapter = Literal["movielens-100k", "movielens", "amazon", "sequences", "retailrocket"]


class DatasetSettings(_Strict):
    """A public dataset read as distributed (presets: conf/datasets/<name>.yaml; docs/datasets.md).

    With an adapter set, ingest and ``userlens evaluate`` read ``source.path`` through
    :mod:`userlens.datasets` instead of ``source.format`` / ``source.mapping``."""

    adapter: DatasetAdapter | None = None
    # relative to source.path (or absolute); null: the adapter's own file names
    events_file: str | None = None
    items_file: str | None = None
    # text encoding of the item file; null: ISO-8859-1 for MovieLens u.item and .dat files, else UTF-8
    encoding: str | None = None


class EvaluateSettings(_Strict):
    """``userlens evaluate``: what counts as an interaction, the seed, and the baselines' parameters."""

    # event types that are interactions in the ranking protocols (empty: ingest.item_event_types)
    interactions: list[str] = []
    seed: int = 13
    # next-window: the H of "active / purchase in the next H days" (null: train.horizon_days)
    horizon_days: int | None = Field(None, ge=1)
    # Spark MLlib ALS, implicit feedback (the count of a user's events with an item is the rating)
    als_rank: int = Field(64, ge=1)
    als_max_iter: int = Field(15, ge=1)
    als_reg_param: float = Field(0.05, ge=0)
    als_alpha: float = Field(10.0, gt=0)
    # item-kNN (SAR-style): Jaccard item co-occurrence, user affinity decayed with this half-life (null: none)
    knn_half_life_days: float | None = Field(30.0, gt=0)
    knn_neighbors: int = Field(100, ge=1)        # most similar items kept per item
    knn_history: int = Field(200, ge=1)          # newest distinct items per user counted in co-occurrence
    userlens: bool = True                        # the userlens rows (false: baselines only)


class Settings(_Strict):
    env: Literal["local", "cluster", "databricks"] = "local"
    spark: SparkSettings = SparkSettings()
    storage: StorageSettings = StorageSettings()
    source: SourceSettings = SourceSettings()
    privacy: PrivacySettings = PrivacySettings()
    ingest: IngestSettings = IngestSettings()
    sample: SampleSettings = SampleSettings()
    textualize: TextualizeSettings
    embed: EmbedSettings = EmbedSettings()
    train: TrainSettings = TrainSettings()
    profile: ProfileSettings = ProfileSettings()
    nightly: NightlySettings = NightlySettings()
    dataset: DatasetSettings = DatasetSettings()
    evaluate: EvaluateSettings = EvaluateSettings()


# Fields whose value is a free-form map: a dotted --set key below them is one map key.
_MAP_FIELDS = {("spark", "conf"), ("source", "event_type_map")}
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
        raise ConfigError(_describe(exc, origin)) from None


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
        raise ConfigError(f"{_label(path)}:{where}: {problem}") from None
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
        raise ConfigError(
            f"{label}: {'.'.join(key)}: environment variable ${{{name}}} is not set"
        )

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
        origin[(*prefix, str(key))] = label
        if isinstance(sub, dict):
            _record(sub, origin, label, (*prefix, str(key)))


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
