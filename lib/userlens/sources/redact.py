"""What a quarantined raw record keeps: no value that could identify a person, whatever the mapping.

A quarantined row is kept for diagnosis (why was it refused, what did it look like); the source
itself stays where it is, so a row can be ingested again once the mapping or the data is fixed.
Its ``raw`` text is rebuilt field by field from the record's ``"name": value`` pairs (every format
reaches ingest as JSON text; a truncated line keeps the pairs before the cut) as a flat JSON
object, and each value is rewritten by one rule that holds when the mapping is wrong:

* the field the mapping names as the user id: its keyed pseudonym (the ``user_key``);
* the field the mapping names as the event time: kept as it is (an epoch-ms time is not a card);
* the other mapped fields: kept, PII-scrubbed (``scrub_pii``; for query and text too);
* any other field, which may be the user id a wrong mapping missed:
  - ``true``, ``false``, ``null``: kept;
  - unless the field's name looks like an identifier or contact (``id``, ``user``, ``cust``,
    ``account``, ``mail``, ``phone``, ``name``, ``ip`` ... anywhere in the name, ignoring case):
    numbers of at most 4 digits (ratings, counts), epoch times (10 digits from 10^9 to 2^31 - 1,
    13 digits from 10^12 to 1000 (2^31 - 1)) and ISO-8601 dates and times are kept;
  - everything else becomes the 64-hex HMAC-SHA256 of the trimmed value under the pipeline's key:
    the ``user_key`` the value would have had as a user id, so rows stay joinable to ``events``
    once the mapping is fixed, and a raw id never lands in the table.

Everything outside a pair (the array elements of a list, the cut-off tail of a malformed line) is
dropped. All of it is native Spark (regular expressions and higher-order functions).
"""

from __future__ import annotations

from collections.abc import Mapping

from pyspark.sql import Column
from pyspark.sql import functions as F

from userlens.privacy import PseudonymKey, hmac_sha256_hex, scrub_pii

# "name": value, where value is a JSON string, a number, a literal, or the opening of a nested value
_STRING = r'"(?:[^"\\]|\\.)*"'
PAIR = rf'"((?:[^"\\]|\\.)*)"\s*:\s*({_STRING}|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|true|false|null|[\[{{])'
ID_LIKE = (
    r"(?i)(id|key|user|uid|cust|client|account|member|person|owner|buyer|login|session|device|cookie|"
    r"mail|phone|tel|mobile|contact|name|addr|ip|card|iban|ssn|passport)"
)
_ISO_TIME = r"^\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?(?:Z|[+-]\d{2}:?\d{2})?$"
_EPOCH_S = (1_000_000_000, 2**31 - 1)
_EPOCH_MS = (1_000_000_000_000, (2**31 - 1) * 1000)
KEPT_AS_IS = frozenset({"event_time"})
PSEUDONYMIZED = frozenset({"user_id"})


def _quote(text: Column) -> Column:
    return F.concat(F.lit('"'), text, F.lit('"'))


def _rewrite(name: Column, value: Column, roles: Column, key: PseudonymKey) -> Column:
    """The new JSON value of one pair (see the module docstring)."""
    is_string = value.startswith('"')
    inner = F.when(is_string, value.substr(F.lit(2), F.length(value) - 2)).otherwise(value)
    role = F.try_element_at(roles, name)
    pseudonym = _quote(hmac_sha256_hex(F.trim(inner), key))
    scrubbed = scrub_pii(inner)
    kept_scrubbed = F.when(is_string, _quote(scrubbed)).when(scrubbed == inner, value).otherwise(_quote(scrubbed))

    integer = inner.rlike(r"^-?\d+(?:\.\d+)?$")
    whole = F.regexp_extract(inner, r"^-?(\d+)", 1)
    as_long = whole.try_cast("long")
    epoch = ((F.length(whole) == 10) & as_long.between(*_EPOCH_S)) | (
        (F.length(whole) == 13) & as_long.between(*_EPOCH_MS)
    )
    harmless = ((integer & ((F.length(whole) <= 4) | epoch)) | inner.rlike(_ISO_TIME)) & ~name.rlike(ID_LIKE)
    unknown = F.when(value.isin("true", "false", "null"), value).when(harmless, value).otherwise(pseudonym)
    return (
        F.when(role.isin(*PSEUDONYMIZED), pseudonym)
        .when(role.isin(*KEPT_AS_IS), value)
        .when(role.isNotNull(), kept_scrubbed)
        .otherwise(unknown)
    )


def redact_raw_record(raw: Column, field_roles: Mapping[str, str], key: PseudonymKey) -> Column:
    """``raw`` JSON text rebuilt as a flat object whose values identify no one (module docstring).

    ``field_roles``: source field name -> the canonical field the mapping gives it
    (:func:`userlens.sources.preflight.field_roles`)."""
    roles = (
        F.create_map(*[F.lit(x) for pair in field_roles.items() for x in pair])
        if field_roles
        else F.create_map().cast("map<string,string>")
    )
    names = F.regexp_extract_all(raw, F.lit(PAIR), F.lit(1))
    values = F.regexp_extract_all(raw, F.lit(PAIR), F.lit(2))
    nested = F.lit('"<nested>"')
    pairs = F.zip_with(
        names,
        values,
        lambda name, value: F.concat(
            F.lit('"'),
            name,
            F.lit('":'),
            F.when(value.isin("[", "{"), nested).otherwise(_rewrite(name, value, roles, key)),
        ),
    )
    return F.concat(F.lit("{"), F.array_join(F.coalesce(pairs, F.array().cast("array<string>")), ","), F.lit("}"))


# a whole JSON value (quoted or not) that is an epoch time in the ranges kept above
_EPOCH_VALUE = r'(:\s*"?)(?:1\d{9}|20\d{8}|21[0-4]\d{7})(?:\d{3})?(?:\.\d+)?("?\s*[,}])'


def without_epoch_values(raw: Column) -> Column:
    """``raw`` with every JSON value that is a whole epoch time (10 or 13 digits) replaced by ``<time>``:
    what privacy-check scans of a redacted record, so the times the rule keeps are not counted as cards
    (a card number inside a text value is still scanned)."""
    return F.regexp_replace(raw, F.lit(_EPOCH_VALUE), F.lit("$1<time>$2"))
