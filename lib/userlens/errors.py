"""Error types whose message is the one line a user sees."""

import re
from collections.abc import Sequence
from typing import Any, Protocol


class _HasColumns(Protocol):
    @property
    def columns(self) -> Sequence[str]: ...


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


_FAILED_READ = re.compile(r"FAILED_READ_FILE\S*\]?\s*Encountered error while reading file (\S+?)\.?(?:\s|$)")


def unreadable_file(exc: BaseException) -> tuple[str, str] | None:
    """(file, root cause) when ``exc`` is Spark failing to read one file (``FAILED_READ_FILE``: a corrupt
    block, a checksum or compression error), else None. Works on the Py4J error of a failed action."""
    found = _FAILED_READ.search(str(exc))
    if found is None:
        return None
    cause = "unknown cause"
    java = getattr(exc, "java_exception", None)
    try:
        deepest = java
        while deepest is not None and deepest.getCause() is not None:
            deepest = deepest.getCause()
        if deepest is not None and deepest is not java:
            name = str(deepest.getClass().getName()).rsplit(".", 1)[-1]
            cause = f"{name}: {deepest.getMessage()}" if deepest.getMessage() else name
    except Exception:  # noqa: BLE001 - the JVM may be gone; the file name alone still helps
        pass
    if cause == "unknown cause":
        caused = re.findall(r"Caused by: ([\w.$]+(?:: [^\n]*)?)", str(exc))
        if caused:
            cause = (
                caused[-1].split(".")[-1]
                if ": " not in caused[-1]
                else caused[-1].split(": ", 1)[0].rsplit(".", 1)[-1] + ": " + caused[-1].split(": ", 1)[1]
            )
    return found.group(1), cause.strip()


def require_columns(df: _HasColumns, columns: Sequence[str], what: str) -> None:
    """Raise MissingColumnsError naming what ``df`` lacks of ``columns`` and what it has."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise MissingColumnsError(what, missing, list(df.columns))


class UserlensError(Exception):
    """A failure with a clear one-line cause; the CLI prints it and exits non-zero. ``rows_in`` and
    ``details``, when the raiser knows them, go on the failed run's pipeline_runs row."""

    exit_code = 1

    def __init__(self, *args: object, rows_in: int | None = None, details: dict[str, Any] | None = None) -> None:
        super().__init__(*args)
        self.rows_in = rows_in
        self.details = dict(details or {})


class ConfigError(UserlensError, ValueError):
    """Bad configuration: names the file and the dotted key. Exit code 2."""

    exit_code = 2


class MissingColumnsError(UserlensError, ValueError):
    """A DataFrame lacks columns a step needs; lists what is missing and what is there."""

    def __init__(self, what: str, missing: list[str], present: list[str]) -> None:
        super().__init__(
            f"{what}: missing column(s) {', '.join(sorted(missing))}; present: {', '.join(sorted(present)) or '(none)'}"
        )
        self.missing = missing
        self.present = present


class SourceError(UserlensError):
    """The raw source cannot be read (missing path, unreadable format)."""


class NoDateError(UserlensError):
    """No as-of date was given and none can be found; ``why`` says what was looked at."""

    def __init__(self, stage: str, why: str) -> None:
        super().__init__(f"{stage}: no as-of date given, and {why}; give --date YYYY-MM-DD")
        self.stage, self.why = stage, why


class QuarantineLimitError(UserlensError):
    """An ingest run quarantined more of its input than ``ingest.max_quarantine_fraction`` allows."""


class SecretError(UserlensError):
    """A secret (the pseudonymization key) is missing or unusable."""

    exit_code = 2


class ConcurrentRunError(UserlensError):
    """Another run holds the warehouse's run lock, or wrote the same Delta table at the same time."""

    exit_code = 3
