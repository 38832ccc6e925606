"""What the Databricks notebooks in ``notebooks/`` share: their widgets, the checks on them, settings and
the HMAC key.

A notebook is a wrapper (``notebooks/<stage>.py``): it calls :func:`read_widgets`, then
:func:`load_notebook_settings` and, where the stage pseudonymizes, :func:`load_notebook_key`, and then the
same library functions as ``userlens <stage>``. ``dbutils`` is passed in (it exists only inside a Databricks
notebook); only ``dbutils.widgets`` (text, dropdown, get) and ``dbutils.secrets.get`` are used.

Widgets are strings. A job passes them as task or job parameters of the same name (``databricks.yml``).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from userlens.config import CONF_DIR, Settings, load_settings
from userlens.errors import ConfigError, SecretError, first_line
from userlens.privacy import PseudonymKey, load_key
from userlens.stages import BY_NAME, STAGES, Stage, StageCall, check_nightly_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Widget:
    """One notebook widget: a text box, or a dropdown when ``choices`` is set."""

    name: str
    default: str
    label: str
    choices: tuple[str, ...] = ()


CONF = Widget("conf", "databricks.yaml", "Config files, comma-separated (a bare name: shipped with userlens)")
SET = Widget("set", "", "Overrides: dotted.key=value, separated by ';'")
SECRET_SCOPE = Widget("secret_scope", "userlens", "Secret scope of the HMAC key (empty: $USERLENS_HMAC_KEY)")
SECRET_KEY = Widget("secret_key", "hmac-key", "Secret name of the HMAC key in that scope")
TRUE_FALSE = ("false", "true")


def stage_widgets(stage: Stage) -> tuple[Widget, ...]:
    """A stage's widgets, from the registry: its date, its options, its nightly switch, conf and set, and
    the secret widgets where it pseudonymizes."""
    widgets = []
    if stage.date_help:
        widgets.append(Widget("date", "", "As-of date, YYYY-MM-DD: " + stage.date_help))
    for option in stage.options:
        label = option.help[:1].upper() + option.help[1:]
        if option.kind == "flag":
            widgets.append(Widget(option.name, "false", label, TRUE_FALSE))
        else:
            widgets.append(Widget(option.name, "", label + (" (required)" if option.required else "")))
    if stage.skip_widget:
        widgets.append(Widget(stage.skip_widget[0], "false", stage.skip_widget[1], TRUE_FALSE))
    widgets += [CONF, SET]
    if stage.needs_key:
        widgets += [SECRET_SCOPE, SECRET_KEY]
    return tuple(widgets)


WIDGETS: dict[str, tuple[Widget, ...]] = {
    **{stage.name: stage_widgets(stage) for stage in STAGES},
    "nightly": (
        Widget("date", "", "As-of date, YYYY-MM-DD (empty: the newest raw date)"),
        Widget("report_out", "", "Report file (empty: nightly.report_dir)"),
        CONF,
        SET,
        SECRET_SCOPE,
        SECRET_KEY,
    ),
}
STAGE_NOTEBOOKS = tuple(WIDGETS)


class WidgetError(ConfigError):
    """Bad widget values; one line naming every bad widget and what it got."""


@dataclass(frozen=True)
class NotebookParams:
    """The checked widget values of one notebook run."""

    stage: str
    conf: tuple[Path, ...]
    overrides: tuple[str, ...] = ()
    date: dt.date | None = None
    full: bool = False
    force: bool = False
    when_due: bool = False
    when_enabled: bool = False
    secret_scope: str | None = None
    secret_key: str | None = None
    user_id: str | None = None
    out: str | None = None


def define_widgets(dbutils: Any, stage: str) -> None:
    """Create the stage's widgets with their defaults (a value a job passed wins over the default)."""
    for widget in _widgets(stage):
        if widget.choices:
            dbutils.widgets.dropdown(widget.name, widget.default, list(widget.choices), widget.label)
        else:
            dbutils.widgets.text(widget.name, widget.default, widget.label)


def read_widgets(dbutils: Any, stage: str) -> NotebookParams:
    """Define the stage's widgets, read and check them; raises :class:`WidgetError` naming every bad one."""
    define_widgets(dbutils, stage)
    raw = {w.name: str(dbutils.widgets.get(w.name)).strip() for w in _widgets(stage)}
    return parse_widgets(stage, raw)


def parse_widgets(stage: str, raw: dict[str, str]) -> NotebookParams:
    """Check widget values (strings, as ``dbutils.widgets.get`` returns them) for ``stage``."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    for widget in _widgets(stage):
        text = raw.get(widget.name, widget.default).strip()
        try:
            values[widget.name] = _PARSERS.get(widget.name, _optional)(text, widget)
        except ValueError as exc:
            problems.append(f"widget {widget.name}: {exc}")
    if problems:
        raise WidgetError(f"{stage} notebook: " + "; ".join(problems))
    if values.get("secret_scope") and not values.get("secret_key"):
        raise WidgetError(
            f"{stage} notebook: widget secret_key: empty, but secret_scope "
            f"{values['secret_scope']!r} is set; name the secret that holds the HMAC key"
        )
    return NotebookParams(
        stage=stage,
        conf=values["conf"],
        overrides=values["set"],
        date=values.get("date"),
        full=values.get("full", False),
        force=values.get("force", False),
        when_due=values.get("when_due", False),
        when_enabled=values.get("when_enabled", False),
        secret_scope=values.get("secret_scope"),
        secret_key=values.get("secret_key"),
        user_id=values.get("user_id"),
        out=values.get("out") or values.get("report_out"),
    )


def load_notebook_settings(params: NotebookParams) -> Settings:
    """Settings from the ``conf`` files over conf/base.yaml, then the ``set`` overrides."""
    try:
        return load_settings(list(params.conf), list(params.overrides))
    except ConfigError as exc:
        message = str(exc)
        if message.startswith("--set"):  # the notebook's overrides come from the `set` widget
            message = "widget set" + message[len("--set") :]
        raise ConfigError(message) from exc


def load_notebook_key(dbutils: Any, settings: Settings, params: NotebookParams) -> PseudonymKey:
    """The HMAC key: the secret ``secret_key`` in scope ``secret_scope`` (``dbutils.secrets``), or, with an
    empty scope, the environment variable ``privacy.key_env`` (e.g. set from ``{{secrets/...}}``)."""
    if not params.secret_scope:
        return load_key(settings.privacy)
    where = f"secret {params.secret_key!r} in scope {params.secret_scope!r}"
    try:
        value = dbutils.secrets.get(params.secret_scope, params.secret_key)
    except Exception as exc:  # noqa: BLE001 - dbutils raises platform (py4j) types; the cause goes in the line
        raise SecretError(
            f"{where} could not be read ({type(exc).__name__}: {first_line(exc)}); create it with "
            f"`databricks secrets create-scope {params.secret_scope}` and `databricks secrets put-secret "
            f"{params.secret_scope} {params.secret_key}`, or set the widget secret_scope"
        ) from exc
    if not value:
        raise SecretError(f"{where} is empty; it must hold the HMAC key for user pseudonyms")
    try:
        return load_key(settings.privacy, {settings.privacy.key_env: value})
    except SecretError as exc:
        raise SecretError(f"{where}: {exc}") from exc


def run_stage(dbutils: Any, params: NotebookParams) -> tuple[Any, str | None]:
    """Run the notebook's stage as ``userlens <stage>`` does (the registry entry: key, checks, date,
    runner, summary) and print its summary; (result, None), or (None, why) when the stage's skip widget
    (``when_due``, ``when_enabled``) is true and the nightly would skip it too."""
    from userlens.errors import NoDateError, UserlensError
    from userlens.runs import run_stage as record_run
    from userlens.spark import get_spark

    stage = BY_NAME[params.stage]
    settings = load_notebook_settings(params)
    key = load_notebook_key(dbutils, settings, params) if stage.needs_key else None
    for check in (*stage.checks, *stage.requires):
        check(settings)  # extras, GPU settings, a model: before any Spark job
    spark = get_spark(settings)
    call = StageCall(spark, settings, key, params.date, {o.name: getattr(params, o.name) for o in stage.options})
    if stage.skip_widget and getattr(params, stage.skip_widget[0]) and stage.nightly_skip is not None:
        why = stage.nightly_skip(call)
        if why:
            why += f"; set the widget {stage.skip_widget[0]}=false to run it anyway"
            print(f"{stage.name}: nothing to do: {why}")
            return None, why
    try:
        call = stage.prepare(call)
    except NoDateError as exc:
        raise WidgetError(
            f"{stage.name} notebook: widget date: empty, and {exc.why}; give the date, YYYY-MM-DD"
        ) from exc
    try:
        result = record_run(stage.name, settings, spark, lambda run: stage.run(call, run))
    except UserlensError as exc:
        if getattr(exc, "result", None) is not None:  # a failure with a result (privacy_check): its table first
            print(stage.summary(exc.result))  # type: ignore[attr-defined]
        raise
    print(stage.summary(result))
    return result, None


def log_progress(level: int = logging.INFO) -> None:
    """Show userlens' log lines in the notebook's output (once, however often a cell runs)."""
    logger = logging.getLogger("userlens")
    logger.setLevel(level)
    if not any(getattr(h, "_userlens_notebook", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s userlens %(levelname)s %(message)s", "%H:%M:%S"))
        handler._userlens_notebook = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


def _widgets(stage: str) -> tuple[Widget, ...]:
    try:
        return WIDGETS[stage]
    except KeyError:
        raise ValueError(f"no notebook for stage {stage!r}; known: {', '.join(STAGE_NOTEBOOKS)}") from None


# -- one parser per widget name: text -> value, ValueError with what was expected ---------------------
def _date(text: str, widget: Widget) -> dt.date | None:
    if not text:
        return None
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        try:
            return dt.date.fromisoformat(text)
        except ValueError:  # 2026-02-30
            pass
    raise ValueError(f"expected a date YYYY-MM-DD (or empty for the latest), got {text!r}")


def _choice(text: str, widget: Widget) -> bool:
    value = text.lower()
    if value not in widget.choices:
        raise ValueError(f"expected one of {', '.join(widget.choices)}, got {text!r}")
    return value == "true"


def _conf(text: str, widget: Widget) -> tuple[Path, ...]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"no config file; the default is {widget.default!r}")
    paths = []
    for name in names:
        # a bare name is one of the files shipped in the wheel (userlens/conf); anything else is a path
        path = CONF_DIR / name if "/" not in name else Path(name)
        if not path.is_file():
            shipped = ", ".join(sorted(p.name for p in CONF_DIR.glob("*.yaml")))
            raise ValueError(
                f"config file {name!r} not found (bare names are looked up among the shipped "
                f"files: {shipped}; give a path, e.g. /Workspace/..., for your own)"
            )
        paths.append(path)
    return tuple(paths)


def _overrides(text: str, widget: Widget) -> tuple[str, ...]:
    items = [item.strip() for item in re.split(r"[;\n]", text) if item.strip()]
    bad = [item for item in items if "=" not in item or not item.partition("=")[0].strip()]
    if bad:
        raise ValueError(f"expected dotted.key=value entries separated by ';', got {bad[0]!r}")
    return tuple(items)


def _required(text: str, widget: Widget) -> str:
    if not text:
        raise ValueError("empty; it is required")
    return text


def _optional(text: str, widget: Widget) -> str | None:
    return text or None


_PARSERS = {
    "date": _date,
    "full": _choice,
    "force": _choice,
    "when_due": _choice,
    "when_enabled": _choice,
    "conf": _conf,
    "set": _overrides,
    "user_id": _required,
}


def run_nightly(dbutils: Any, params: NotebookParams) -> Any:
    """``userlens nightly`` for the widgets' date (the nightly notebook); prints each stage's summary."""
    from userlens.spark import get_spark
    from userlens.stages.nightly import run_nightly as nightly

    settings = load_notebook_settings(params)
    key = load_notebook_key(dbutils, settings, params)
    check_nightly_settings(settings)  # extras and GPU settings, before any Spark job
    result = nightly(get_spark(settings), settings, key, params.date, params.out)
    for name, stage_result in result.stages.items():
        print(BY_NAME[name].summary(stage_result))
    return result
