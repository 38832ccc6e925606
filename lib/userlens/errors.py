"""Error types whose message is the one line a user sees."""


from collections.abc import Sequence
from typing import Protocol


class _HasColumns(Protocol):
    columns: list[str]


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def require_columns(df: _HasColumns, columns: Sequence[str], what: str) -> None:
    """Raise MissingColumnsError naming what ``df`` lacks of ``columns`` and what it has."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise MissingColumnsError(what, missing, list(df.columns))


class UserlensError(Exception):
    """A failure with a clear one-line cause; the CLI prints it and exits non-zero."""

    exit_code = 1


class ConfigError(UserlensError, ValueError):
    """Bad configuration: names the file and the dotted key. Exit code 2."""

    exit_code = 2


class MissingColumnsError(UserlensError, ValueError):
    """A DataFrame lacks columns a step needs; lists what is missing and what is there."""

    def __init__(self, what: str, missing: list[str], present: list[str]) -> None:
        super().__init__(
            f"{what}: missing column(s) {', '.join(sorted(missing))}; "
            f"present: {', '.join(sorted(present)) or '(none)'}"
        )
        self.missing = missing
        self.present = present


class SourceError(UserlensError):
    """The raw source cannot be read (missing path, unreadable format)."""


class SecretError(UserlensError):
    """A secret (the pseudonymization key) is missing or unusable."""

    exit_code = 2


class ConcurrentRunError(UserlensError):
    """Another run holds the warehouse's run lock, or wrote the same Delta table at the same time."""

    exit_code = 3
