"""Render ``{name}`` templates as native Spark column expressions (no Python UDF)."""

from __future__ import annotations

from collections.abc import Mapping
from string import Formatter

from pyspark.sql import Column
from pyspark.sql import functions as F


def render(template: str, fields: Mapping[str, Column]) -> Column:
    """``concat`` of the template's literal parts and its fields; a null field renders as ''.

    Placeholders were validated against the allowed names when config loaded;
    a name missing from ``fields`` here is a programming error (KeyError).
    """
    parts: list[Column] = []
    for literal, name, _, _ in Formatter().parse(template):
        if literal:
            parts.append(F.lit(literal))
        if name is not None:
            parts.append(F.coalesce(fields[name].cast("string"), F.lit("")))
    return F.concat(*parts) if parts else F.lit("")
