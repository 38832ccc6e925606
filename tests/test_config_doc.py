"""docs/configuration.md lists every config key: its table is what scripts/config_reference.py writes."""

from __future__ import annotations

import importlib.util
import typing
from pathlib import Path

from pydantic import BaseModel

from userlens.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"
SCRIPT = ROOT / "scripts" / "config_reference.py"


def _script():
    spec = importlib.util.spec_from_file_location("config_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _doc_block() -> str:
    text = DOC.read_text(encoding="utf-8")
    begin, end = "<!-- keys:begin -->\n", "<!-- keys:end -->"
    assert begin in text and end in text, "docs/configuration.md lost its key table markers"
    return text[text.index(begin) + len(begin) : text.index(end)]


def _doc_keys() -> list[str]:
    keys = []
    for line in _doc_block().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] not in ("key", "---"):
            keys.append(cells[0].strip("`"))
    return keys


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted keys as a config file spells them: nested models recurse, anything else (maps too) is a leaf."""
    keys = []
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        nested = [
            t
            for t in (field.annotation, *typing.get_args(field.annotation))
            if isinstance(t, type) and issubclass(t, BaseModel)
        ]
        if nested and typing.get_origin(field.annotation) is not dict:
            keys += _leaf_keys(nested[0], key + ".")
        else:
            keys.append(key)
    return keys


def test_doc_table_is_generated():
    script = _script()
    summary = script.stale_summary(_doc_block(), script.render_block(script.generated_rows()))
    assert summary is None, summary


def test_check_mode_passes_on_the_doc_and_fails_on_a_stale_table():
    script = _script()
    assert script.main(["--check"]) == 0
    wanted = script.render_block(script.generated_rows())
    stale = (
        "\n".join(line for line in wanted.splitlines() if not line.startswith("| ingest.on_unreadable_file ")) + "\n"
    )
    summary = script.stale_summary(stale, wanted)
    assert summary is not None and "1 missing: ingest.on_unreadable_file" in summary and "\n" not in summary


def test_every_settings_key_is_in_the_doc():
    expected = _leaf_keys(Settings)
    documented = _doc_keys()
    assert len(expected) > 100  # the walk found the nested sections
    for key in (
        "storage.schema",
        "source.mapping.event_time",
        "source.mapping.text",
        "train.recommend.als.rank",
        "spark.conf",
        "textualize.templates",
        "ingest.max_reason_fraction",
    ):
        assert key in expected
    missing = [key for key in expected if key not in documented]
    assert not missing, f"keys missing from docs/configuration.md: {', '.join(missing)}"
    extra = [key for key in documented if key not in expected]
    assert not extra, f"docs/configuration.md lists keys that are not settings: {', '.join(extra)}"
    assert len(documented) == len(set(documented))


def test_every_field_has_a_description():
    seen, todo, undocumented = set(), [Settings], []
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            if not (field.description or "").strip():
                undocumented.append(f"{model.__name__}.{name}")
            for t in (field.annotation, *typing.get_args(field.annotation)):
                if isinstance(t, type) and issubclass(t, BaseModel):
                    todo.append(t)
    assert not undocumented, f"fields without description=: {', '.join(undocumented)}"
