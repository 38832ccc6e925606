"""``userlens status``: what the warehouse holds, read from the Delta logs without Spark.

Every table's Delta version, row count (the sum of the row counts Delta records for each live file),
files and last change; the last run of each stage from ``pipeline_runs``; the published model and its
headline metrics; the holder of the run lock, if any. It reads the Delta transaction logs with the
``deltalake`` package (delta-rs), so it starts in about a second and runs no Spark job. A warehouse in a
catalog (``storage.catalog``) is read through the catalog's SQL instead: ``DESCRIBE DETAIL`` and
``DESCRIBE HISTORY`` there.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from userlens.artifacts import ModelStore
from userlens.config import Settings
from userlens.errors import ConfigError, UserlensError, first_line
from userlens.tables import TABLES

# the metric shown for a task of the model, the first the metrics hold
HEADLINE = ("auc", "accuracy", "recall@10", "ndcg@10")


@dataclass(frozen=True)
class TableStatus:
    name: str
    location: str
    version: int | None = None  # None: the table does not exist yet
    rows: int | None = None
    files: int | None = None
    modified: str | None = None  # the last commit's time (UTC)


@dataclass(frozen=True)
class RunStatus:
    stage: str
    status: str
    as_of_date: str | None
    started_at: str
    seconds: float | None
    rows_in: int | None
    rows_out: int | None


@dataclass(frozen=True)
class WarehouseStatus:
    warehouse: str
    tables: list[TableStatus]
    runs: list[RunStatus] = field(default_factory=list)
    model: dict[str, Any] | None = None
    lock: dict[str, str] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    def describe(self) -> str:
        lines = [
            f"warehouse: {self.warehouse}",
            "",
            "table                     version        rows   files  last change (UTC)",
        ]
        for t in self.tables:
            if t.version is None:
                lines.append(f"  {t.name:<22} {'-':>7}  (not created yet)")
            else:
                lines.append(f"  {t.name:<22} {t.version:>7} {t.rows or 0:>11,d} {t.files or 0:>7}  {t.modified or ''}")
        lines += [
            "",
            "stage                  last run  as of        started (UTC)        seconds     rows in    rows out",
        ]
        if not self.runs:
            lines.append("  (no runs recorded)")
        for r in self.runs:
            seconds = f"{r.seconds:.1f}" if r.seconds is not None else "-"
            lines.append(
                f"  {r.stage:<20} {r.status:<9} {r.as_of_date or '-':<12} {r.started_at:<20} {seconds:>7} "
                f"{_count(r.rows_in):>11} {_count(r.rows_out):>11}"
            )
        lines.append("")
        if self.model is None:
            lines.append("model: none published yet")
        else:
            headline = ", ".join(f"{task} {name} {value:.3f}" for task, (name, value) in self.model["headline"].items())
            suffix = f": {headline}" if headline else ""
            lines.append(f"model: {self.model['version']} (as of {self.model['as_of_date']}){suffix}")
        if self.lock:
            lines.append(
                f"lock: {self.lock['name']} held by {self.lock['holder']} (run {self.lock['run_id']}) "
                f"until {self.lock['expires_at']}"
            )
        else:
            lines.append("lock: free")
        return "\n".join(lines)


def _count(value: int | None) -> str:
    return f"{value:,d}" if value is not None else "-"


def warehouse_status(settings: Settings) -> WarehouseStatus:
    """The status of the configured warehouse (path mode: the Delta logs; nothing is written)."""
    if settings.storage.catalog and settings.storage.schema_name:
        raise ConfigError(
            "userlens status reads Delta logs by path (storage.warehouse); for tables in the catalog "
            f"{settings.storage.catalog}.{settings.storage.schema_name} use DESCRIBE DETAIL / DESCRIBE HISTORY"
        )
    try:
        from deltalake import DeltaTable
    except ImportError as exc:
        raise ConfigError("userlens status needs the deltalake package: pip install deltalake") from exc

    root = settings.storage.warehouse
    local = "://" not in root
    root = os.path.abspath(root) if local else root.rstrip("/")
    if local and not os.path.isdir(root):
        raise UserlensError(f"storage.warehouse: {root} does not exist (no stage has written there yet)")
    tables, frames = [], {}
    for name in TABLES:
        location = f"{root}/{name}"
        if local and not os.path.isdir(os.path.join(location, "_delta_log")):
            tables.append(TableStatus(name, location))
            continue
        try:
            table = DeltaTable(location)
        except Exception as exc:  # noqa: BLE001 - a table that is not (yet) Delta is shown as absent
            if "no files in log segment" in str(exc).lower() or "not a delta table" in str(exc).lower():
                tables.append(TableStatus(name, location))
                continue
            raise UserlensError(f"cannot read the Delta log of {location}: {first_line(exc)}") from exc
        actions = table.get_add_actions(flatten=True)
        records = [int(r or 0) for r in actions.column("num_records").to_pylist()] if actions.num_rows else []
        history = table.history(1)
        stamp = history[0].get("timestamp") if history else None
        modified = (
            dt.datetime.fromtimestamp(stamp / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if stamp else None
        )
        tables.append(
            TableStatus(name, location, table.version(), sum(r or 0 for r in records), actions.num_rows, modified)
        )
        if name in ("pipeline_runs", "run_locks"):
            frames[name] = table.to_pyarrow_table().to_pylist()
    return WarehouseStatus(
        root, tables, _last_runs(frames.get("pipeline_runs", [])), _model(settings), _lock(frames.get("run_locks", []))
    )


def _utc(value: dt.datetime) -> dt.datetime:
    """A Delta timestamp as an aware UTC datetime (delta-rs gives aware ones; older writers' may be naive)."""
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


def _last_runs(rows: list[dict[str, Any]]) -> list[RunStatus]:
    """The newest run of each stage, in the order the stages last ran."""
    newest: dict[str, dict[str, Any]] = {}
    for row in rows:
        row = {**row, "started_at": _utc(row["started_at"])}
        if row.get("finished_at") is not None:
            row["finished_at"] = _utc(row["finished_at"])
        if row["stage"] not in newest or row["started_at"] > newest[row["stage"]]["started_at"]:
            newest[row["stage"]] = row
    out = []
    for row in sorted(newest.values(), key=lambda r: r["started_at"]):
        finished = row.get("finished_at")
        seconds = (finished - row["started_at"]).total_seconds() if finished else None
        as_of = row.get("as_of_date")
        out.append(
            RunStatus(
                row["stage"],
                row["status"],
                as_of.isoformat() if as_of else None,
                row["started_at"].strftime("%Y-%m-%d %H:%M:%S"),
                seconds,
                row.get("rows_in"),
                row.get("rows_out"),
            )
        )
    return out


def _model(settings: Settings) -> dict[str, Any] | None:
    store = ModelStore.of(settings)
    version = store.latest()
    if version is None:
        return None
    try:
        metrics = store.metrics(version)
    except ValueError as exc:
        return {"version": version, "as_of_date": None, "headline": {}, "error": first_line(exc)}
    headline: dict[str, tuple[str, float]] = {}
    if metrics is not None:
        for task, values in metrics.model.items():
            for name in HEADLINE:
                if isinstance(values, dict) and isinstance(values.get(name), (int, float)):
                    headline[task] = (name, float(values[name]))
                    break
    return {
        "version": version,
        "as_of_date": metrics.data.as_of_date if metrics is not None else None,
        "path": store.path(version),
        "headline": headline,
    }


def _lock(rows: list[dict[str, Any]]) -> dict[str, str] | None:
    now = dt.datetime.now(dt.timezone.utc)
    held = [r for r in rows if _utc(r["expires_at"]) > now]
    if not held:
        return None
    row = held[0]
    return {k: str(row[k]) for k in ("name", "holder", "run_id", "acquired_at", "expires_at")}
