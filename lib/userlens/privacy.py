"""Keyed pseudonyms and PII scrubbing as native Spark expressions (no Python UDF).

HMAC-SHA256 is built from Spark's ``sha2`` with the standard construction
H((K ^ opad) || H((K ^ ipad) || m)) (RFC 2104): the padded key halves are
binary literals, so pseudonymizing runs at Spark SQL speed on executors and
equals Python's ``hmac.new(key, msg, sha256).hexdigest()``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyspark.sql import Column
from pyspark.sql import functions as F

from userlens.config import PrivacySettings
from userlens.errors import SecretError

if TYPE_CHECKING:
    from userlens.tables import Tables

log = logging.getLogger(__name__)

_BLOCK = 64  # SHA-256 block size in bytes
MIN_KEY_BYTES = 16


@dataclass(frozen=True)
class PseudonymKey:
    """The secret HMAC key; ``key_id`` (a short digest) is safe to store and log."""

    secret: bytes
    key_id: str
    is_dev_key: bool = False

    def __repr__(self) -> str:  # never print the secret
        return f"PseudonymKey(key_id={self.key_id!r}, is_dev_key={self.is_dev_key})"


_dev_key_expected = False


def expect_dev_key() -> None:
    """The caller knows it runs on the public development key (``userlens demo`` on its own sample, which says
    so on its output): the fallback is then logged at INFO, not as a warning."""
    global _dev_key_expected
    _dev_key_expected = True


def load_key(privacy: PrivacySettings, environ: dict[str, str] | None = None) -> PseudonymKey:
    """Read the HMAC key from the env var named by ``privacy.key_env``.

    Falls back to ``privacy.dev_key`` (local demo only) with a loud warning.
    """
    env = os.environ if environ is None else environ
    value = env.get(privacy.key_env)
    is_dev = False
    if not value:
        if not privacy.dev_key:
            raise SecretError(
                f"privacy.key_env: environment variable {privacy.key_env} is not set; "
                "it must hold the secret HMAC key for user pseudonyms"
            )
        log.log(
            logging.INFO if _dev_key_expected else logging.WARNING,
            "*** %s is not set: using the PUBLIC development key from privacy.dev_key. "
            "Pseudonyms made with it protect nothing; set %s for real data. ***",
            privacy.key_env,
            privacy.key_env,
        )
        value, is_dev = privacy.dev_key, True
    secret = value.encode("utf-8")
    if len(secret) < MIN_KEY_BYTES:
        raise SecretError(
            f"privacy.key_env: the key in {privacy.key_env if not is_dev else 'privacy.dev_key'} "
            f"is {len(secret)} bytes; use at least {MIN_KEY_BYTES}"
        )
    return PseudonymKey(
        secret=secret, key_id=hashlib.sha256(b"userlens-key-id:" + secret).hexdigest()[:12], is_dev_key=is_dev
    )


def hmac_sha256_hex(message: Column, key: PseudonymKey) -> Column:
    """HMAC-SHA256(key, utf8(message)) as 64 lowercase hex chars; null stays null."""
    secret = key.secret if len(key.secret) <= _BLOCK else hashlib.sha256(key.secret).digest()
    secret = secret.ljust(_BLOCK, b"\0")
    inner_pad = bytearray(b ^ 0x36 for b in secret)
    outer_pad = bytearray(b ^ 0x5C for b in secret)
    inner = F.unhex(F.sha2(F.concat(F.lit(inner_pad), F.encode(message, "UTF-8")), 256))
    return F.sha2(F.concat(F.lit(outer_pad), inner), 256)


def pseudonymize(user_id: Column, key: PseudonymKey) -> Column:
    """The ``user_key`` of a raw user id (trimmed); null or blank ids give null."""
    trimmed = F.trim(user_id)
    return F.when(F.length(trimmed) > 0, hmac_sha256_hex(trimmed, key))


# (type, Java regex, placeholder). Order matters: the more specific patterns run
# first so that, e.g., a card number is not half-eaten by the phone pattern.
# Number patterns end with (?!\w|[.-]\d)-style lookaheads so that a sentence's
# full stop does not stop a match, while a longer number is never cut in two.
# Measured by bench/pii.py on two labelled corpora (docs/privacy.md): one whose PII
# comes from libphonenumber and Faker (the world's formats) and our own.
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_H = r"[0-9A-Fa-f]{1,4}"
# Digits introduced by a product-code keyword ("SKU 4006381333931", "EAN: ...") are not PII.
_NOT_PRODUCT_CODE = r"(?<!(?i:sku|ean|gtin|upc|isbn)[ :#]{1,3})"
# IBAN length by country (SWIFT IBAN registry). An IBAN of a listed country is matched
# at exactly its length, compact or in blocks of four, so that its blocks may be all
# letters (RU, UA) while a following word ("... 00 BIC GKCCBEBB") is never taken.
_IBAN_LENGTHS = {
    15: "NO",
    16: "BE",
    18: "DK FI FO GL NL",
    19: "MK SI",
    20: "AT BA EE KZ LT LU XK",
    21: "CH HR LI LV",
    22: "BG BH CR DE GB GE IE ME RS VA",
    23: "AE GI IL IQ TL",
    24: "AD CZ ES MD PK RO SA SE SK TN VG",
    25: "LY PT ST",
    26: "IS TR",
    27: "FR GR IT MC MR SM",
    28: "AL AZ BY CY DO GT HU LB PL SV",
    29: "BR EG PS QA UA",
    30: "JO KW MU",
    31: "MT SC",
    32: "LC",
    33: "RU",
}
_IBAN_EXACT = "|".join(
    rf"(?:{'|'.join(countries.split())})\d{{2}}(?: ?[A-Z0-9]{{4}}){{{(n - 4) // 4}}}"
    + (rf" ?[A-Z0-9]{{{(n - 4) % 4}}}" if (n - 4) % 4 else "")
    for n, countries in _IBAN_LENGTHS.items()
)
# Phone numbers are runs of digit groups. Between two groups: one space, dot, slash or
# dash, or a parenthesis with at most one of them ("+49 (0)30", "(0212) 345", "8 (301) 123").
_SEP = r"(?:[ ./-]?\(|\)[ ./-]?|[ ./-])"
_RUN = rf"\(?\d(?:{_SEP}?\d)*"
# A run is taken whole or not at all: it never starts after a group (the national and 00
# patterns), never ends before a next group or a decimal part, nor before a version suffix
# (0.12.11.21-beta).
_RUN_END = rf"(?!\w|{_SEP}?\d|,\d|[-+][A-Za-z])"
# The country codes of E.164 (ITU): 1 and 7, the assigned two-digit ones, three digits otherwise.
_COUNTRY_CODE = (
    r"(?:[17]|2[07]|3[0-469]|4[013-9]|5[1-8]|6[0-6]|8[1246]|9[0-58]"
    r"|(?:2[1-689]|3[578]|42|5[09]|6[7-9]|8[0578]|9[679])\d)"
)


def _digit_count(low: int, high: int, trunk_low: int | None = None) -> str:
    """Lookahead: the run starting here has ``low``-``high`` digits (``trunk_low``-``high`` from a 0)."""
    count = rf"(?:{_SEP}?\d){{{low},{high}}}"
    if trunk_low is not None:
        count = rf"\(?(?:0(?:{_SEP}?\d){{{trunk_low - 1},{high - 1}}}|[1-9](?:{_SEP}?\d){{{low - 1},{high - 1}}})"
    return rf"(?={count}(?!{_SEP}?\d))"


# An order number like Amazon's has 17 digits (114-2345678-9012345), too many for a phone
# number, unless its 00 is taken for the + (007-9210020-2574923 would pass for 00 7 ...).
_NOT_ORDER = r"(?!\d{3}-\d{7}-\d{7}(?!\d))"
# Runs that a national phone number is not: dates, valid or not (3.10.2026, 10/03/26,
# 2026-10-03, 2026-13-01, 03 10 2026; one more group after the year makes it a phone number
# again: 06.12.34.56.78), ranges, ZIP+4 and CEP postcodes (2019-2023, 1500-6000, 94105-1234,
# 01310-100; not 089-12345), two short numbers and a slash (2019/2020, 1920/1080; not
# 030/1234567), decimal numbers (3.14159265, 0.12.11.21), thousands (12.499.000), and runs
# of one- and two-digit numbers (1 10 11 12 10, lottery numbers) unless they start with a
# trunk 0 (FR 01 23 45 67 89) or are four pairs (DK, NO 32 12 34 56).
_NOT_DATE_OR_FIGURE = (
    r"(?!0\.)"
    r"(?!\d{1,2}(?<a>[./-])\d{1,2}\k<a>(?:19|20)?\d\d(?!\d|\k<a>\d))"
    r"(?!(?:19|20)\d\d(?<c>[./-])\d{1,2}\k<c>\d{1,2}(?!\d|\k<c>\d))"
    r"(?!(?:0?[1-9]|[12]\d|3[01]) (?:0?[1-9]|1[0-2]) (?:19|20)\d\d(?! ?\d))"
    rf"(?!(?:[1-9]\d{{0,4}}-\d{{1,5}}|\d{{1,5}}-\d{{1,4}}|\d{{1,4}}/\d{{1,4}}|\d+\.\d+|\d{{1,3}}(?:\.\d{{3}})+)"
    rf"{_RUN_END})"
    rf"(?!(?!\d\d(?<d>[ .-])\d\d\k<d>\d\d\k<d>\d\d{_RUN_END})[1-9]\d?(?:[ ./-]\d{{1,2}})+{_RUN_END})"
)
# Nor is a number after or before a currency sign (a price: 12 499 000 ₫, € 1 299 000).
_NOT_PRICE = r"(?<![$€£¥₹₽₫] ?)"
_NOT_BEFORE_PRICE = r"(?! ?(?:[$€£¥₹₽₫]|EUR|USD|GBP|CHF|Ft|zł|Kč))"
PII_PATTERNS: list[tuple[str, str, str]] = [
    # Unicode letters too: IDN domains (...@abramenko.укр), and a local part such as
    # jürgen@ is masked whole, not from its last ASCII letter on.
    ("email", r"[\p{L}\p{N}._%+-]+@[\p{L}\p{N}-]+(?:\.[\p{L}\p{N}-]+)*\.\p{L}{2,}", "<email>"),
    ("iban", rf"\b(?:{_IBAN_EXACT})(?![A-Za-z0-9])", "<iban>"),
    # Other IBANs (other countries, wrong lengths): after the first block, a block that
    # follows a space holds a digit, so a following word ("... 1057 BIC GKCCBEBB") is not
    # taken for one.
    (
        "iban",
        r"\b[A-Z]{2}\d{2} ?[A-Z0-9]{4}(?:[A-Z0-9]{4}| (?=[A-Z]{0,3}\d)[A-Z0-9]{4}){1,6}"
        r"(?:[A-Z0-9]{1,3}| (?=[A-Z]{0,2}\d)[A-Z0-9]{1,3})?\b",
        "<iban>",
    ),
    # 13-19 digits, plain or grouped 4-4-4-4(-3) / 4-6-5 / 4-6-4 (12 when grouped by fours),
    # and 12 plain digits of a Maestro range (50, 56-69, 0604): masked whether or not they
    # pass Luhn (fail safe; a regex cannot check Luhn). Not after a "+44 " country code,
    # where the digits are a phone number, nor after "0." / "3,", where they are the fraction
    # of a decimal number (0.8947368421052632). No card number starts with 00 (0044 7400
    # 123456 is a phone number), and 12 digits grouped by fours from a 0 other than Maestro's
    # 0604 are one (0800 1759 1759).
    (
        "card",
        r"(?<![\w+-])(?<!\+\d{1,3}[ .-])(?<!\d[.,])"
        + _NOT_PRODUCT_CODE
        + r"(?!00|0(?!604)\d{3}[ -]\d{4}[ -]\d{4}(?![ -]?\d))"
        + r"(?:\d{13,19}|(?:50|5[6-9]|6\d)\d{10}|0604\d{8}|\d{4}[ -]\d{4}[ -]\d{4}(?:[ -]\d{1,4}(?:[ -]\d{1,3})?)?"
        + r"|\d{4}[ -]\d{6}[ -]\d{4,5})"
        + r"(?![\w-]|[.,]\d)",
        "<card>",
    ),
    # IPv6: IPv4-mapped (::ffff:192.0.2.1), full, compressed.
    (
        "ip",
        rf"(?<![\w:])(?:::(?:[Ff]{{4}}:(?:0{{1,4}}:)?)?{_IPV4}|(?:{_H}:){{7}}{_H}"
        rf"|(?:{_H}:){{1,6}}:(?:{_H}(?::{_H}){{0,5}})?|::(?:{_H}:){{0,6}}{_H})(?![\w:]|\.\d)",
        "<ip>",
    ),
    # IPv4, but not a version string such as 1.2.3.4-beta.
    ("ip", rf"(?<![\w.]){_IPV4}(?!\w|\.\d|[-+][A-Za-z])", "<ip>"),
    # International, + and 6-16 digits: +1 415-555-0134, +44 20 7946 0958, +49 (0)30 1234567,
    # +7 301 123-45-67, +919876543210, +98 9601.
    ("phone", r"(?<![\w+])\+(?=[1-9])" + _digit_count(6, 16) + _RUN + _RUN_END, "<phone>"),
    # International with 00 for the + and a country code, 8-15 digits: 0049 30 123456,
    # 00 1 201-555-0123, 004915123456789.
    (
        "phone",
        r"(?<![\w+.,/#-])(?<!\d )"
        + _NOT_PRODUCT_CODE
        + _NOT_ORDER
        + rf"00 ?(?={_COUNTRY_CODE})"
        + _digit_count(8, 15)
        + _RUN
        + _RUN_END,
        "<phone>",
    ),
    # National: a run of 8-15 digits in at least two groups (7-15 from a trunk 0), whatever
    # the grouping: US (415) 555-0134, UK 0121 234 5678, DE 030 123456, FR 01 23 45 67 89,
    # ES 612 34 56 78, PL 512 345 678, RU 8 (912) 345-67-89, JP 03-1234-5678, CN 131 2345 6789,
    # BR (11) 96123-4567, IN 081234 56789, HU (06 1) 234 5678, toll-free 1-800-123-456.
    (
        "phone",
        r"(?<![\w+.,/#$€£¥₹₽₫-])(?<!\d )"
        + _NOT_PRICE
        + _NOT_PRODUCT_CODE
        + rf"(?=\(?\d+{_SEP}\d)"
        + _NOT_DATE_OR_FIGURE
        + _digit_count(8, 15, trunk_low=7)
        + _RUN
        + _RUN_END
        + _NOT_BEFORE_PRICE,
        "<phone>",
    ),
    # A bare run of 10-12 digits is a phone number without separators (fail safe).
    ("phone", r"(?<![\w+.,-])" + _NOT_PRODUCT_CODE + r"\d{10,12}(?![\w-]|[.,]\d)", "<phone>"),
]


# Every pattern needs an '@', a digit or a ':'; text without any skips the regexes.
_PII_TRIGGER = r"[@0-9:]"


def scrub_pii(text: Column) -> Column:
    """Replace emails, IBANs, card numbers, IPs and phone numbers with typed placeholders."""

    def chain(value: Column) -> Column:
        for _, pattern, placeholder in PII_PATTERNS:
            value = F.regexp_replace(value, pattern, placeholder)
        return value

    # The chain runs inside a one-element ``transform``, which Spark evaluates without code generation:
    # inlined, ten regex replacements per column make the generated method of the whole projection
    # larger than the 8,000 bytes the JVM's JIT compiles, and the stage then runs interpreted bytecode
    # (twice as slow at 10^6 events; the regexes themselves cost the same either way).
    scrubbed = F.element_at(F.transform(F.array(text), chain), 1)
    return F.when(text.rlike(_PII_TRIGGER), scrubbed).otherwise(text)


# --------------------------------------------------------------------------
# which key a warehouse was built with
# --------------------------------------------------------------------------
KEY_ID_PROPERTY = "userlens.key_id"  # a table property of ``events``
ROTATION_DOC = 'docs/privacy.md, "Rotating the key"'


def warehouse_key_id(tables: "Tables") -> str | None:
    """The key id the warehouse's events were pseudonymized with; None for a new warehouse.

    The ``events`` table property ``userlens.key_id``, or, for a warehouse written
    before that property, the key id of its latest successful ingest run.
    """
    if not tables.exists("events"):
        return None
    stored = tables.properties("events").get(KEY_ID_PROPERTY)
    if stored or not tables.exists("pipeline_runs"):
        return stored
    row = (
        tables.read("pipeline_runs")
        .where("stage = 'ingest' AND status = 'succeeded'")
        .select(F.get_json_object("details", "$.key_id").alias("key_id"), "started_at")
        .where("key_id IS NOT NULL")
        .orderBy(F.desc("started_at"))
        .first()
    )
    return row["key_id"] if row is not None else None


def require_same_key(tables: "Tables", key: PseudonymKey, key_env: str) -> None:
    """Refuse (one line) a key other than the one the warehouse's events were made with."""
    stored = warehouse_key_id(tables)
    if stored is not None and stored != key.key_id:
        where = "privacy.dev_key" if key.is_dev_key else key_env
        raise SecretError(
            f"the events in {tables.location('events')} were pseudonymized with key id {stored}, but the key in "
            f"{where} has key id {key.key_id}: mixing keys would split every user in two. Set the key the "
            f"warehouse was built with, or rotate the key as {ROTATION_DOC} describes"
        )


def record_key_id(tables: "Tables", key: PseudonymKey) -> None:
    """Store the key id as the ``events`` table property ``userlens.key_id`` (no commit when unchanged)."""
    if tables.exists("events"):
        tables.set_properties("events", {KEY_ID_PROPERTY: key.key_id})


# --------------------------------------------------------------------------
# differential privacy of the models behind a table (table properties)
# --------------------------------------------------------------------------
MODEL_VERSION_PROPERTY = "userlens.model_version"
DP_PROPERTY = "userlens.dp"
DP_EPSILON_PROPERTY = "userlens.dp.epsilon"
DP_DELTA_PROPERTY = "userlens.dp.delta"


def model_properties(dp_by_version: dict[str, dict[str, Any] | None]) -> dict[str, str | None]:
    """``user_profiles`` properties for the models behind its rows (None: unset).

    ``dp_by_version``: model version -> its metrics.json ``training.dp`` (``{}``: trained
    without DP; None: no metrics.json). Several versions: DP-SGD only if every one used
    it, with the largest epsilon and delta (the weakest guarantee).
    """
    if not dp_by_version:
        return dict.fromkeys((MODEL_VERSION_PROPERTY, DP_PROPERTY, DP_EPSILON_PROPERTY, DP_DELTA_PROPERTY))
    versions = sorted(dp_by_version)
    dps = [dp_by_version[v] for v in versions]
    out: dict[str, str | None] = {
        MODEL_VERSION_PROPERTY: ",".join(versions),
        DP_EPSILON_PROPERTY: None,
        DP_DELTA_PROPERTY: None,
    }
    if any(dp is None for dp in dps):
        out[DP_PROPERTY] = "unknown"
    elif not all(dps):
        out[DP_PROPERTY] = "none"
    else:
        out[DP_PROPERTY] = "dp-sgd"
        out[DP_EPSILON_PROPERTY] = f"{max(float(dp['epsilon']) for dp in dps if dp is not None):.4f}"
        out[DP_DELTA_PROPERTY] = f"{max(float(dp['delta']) for dp in dps if dp is not None):g}"
    return out
