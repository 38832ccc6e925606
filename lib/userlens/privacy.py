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
        log.warning(
            "*** %s is not set: using the PUBLIC development key from privacy.dev_key. "
            "Pseudonyms made with it protect nothing; set %s for real data. ***",
            privacy.key_env, privacy.key_env,
        )
        value, is_dev = privacy.dev_key, True
    secret = value.encode("utf-8")
    if len(secret) < MIN_KEY_BYTES:
        raise SecretError(
            f"privacy.key_env: the key in {privacy.key_env if not is_dev else 'privacy.dev_key'} "
            f"is {len(secret)} bytes; use at least {MIN_KEY_BYTES}"
        )
    return PseudonymKey(secret=secret, key_id=hashlib.sha256(b"userlens-key-id:" + secret).hexdigest()[:12],
                        is_dev_key=is_dev)


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
# Measured on a labelled corpus by bench/pii.py (docs/privacy.md).
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_H = r"[0-9A-Fa-f]{1,4}"
# Digits introduced by a product-code keyword ("SKU 4006381333931", "EAN: ...") are not PII.
_NOT_PRODUCT_CODE = r"(?<!(?i:sku|ean|gtin|upc|isbn)[ :#]{1,3})"
_PHONE_END = r"(?!\w|[.-]\d)"
PII_PATTERNS: list[tuple[str, str, str]] = [
    ("email", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}", "<email>"),
    # After the first block, a block that follows a space holds a digit, so a following
    # word ("... 1057 BIC GKCCBEBB") is not taken for one.
    ("iban", r"\b[A-Z]{2}\d{2} ?[A-Z0-9]{4}(?:[A-Z0-9]{4}| (?=[A-Z]{0,3}\d)[A-Z0-9]{4}){1,6}"
             r"(?:[A-Z0-9]{1,3}| (?=[A-Z]{0,2}\d)[A-Z0-9]{1,3})?\b", "<iban>"),
    # 13-19 digits, plain or grouped 4-4-4-4(-3) / 4-6-5 (12 when grouped by fours): masked
    # whether or not they pass Luhn (fail safe; a regex cannot check Luhn). Not after a
    # "+44 " country code, where the digits are a phone number, nor after "0." / "3,", where
    # they are the fraction of a decimal number (0.8947368421052632).
    ("card", r"(?<![\w+-])(?<!\+\d{1,3}[ .-])(?<!\d[.,])" + _NOT_PRODUCT_CODE
     + r"(?:\d{13,19}|\d{4}[ -]\d{4}[ -]\d{4}(?:[ -]\d{1,4}(?:[ -]\d{1,3})?)?|\d{4}[ -]\d{6}[ -]\d{4,5})"
     + r"(?![\w-]|[.,]\d)", "<card>"),
    # IPv6: IPv4-mapped (::ffff:192.0.2.1), full, compressed.
    ("ip", rf"(?<![\w:])(?:::(?:[Ff]{{4}}:(?:0{{1,4}}:)?)?{_IPV4}|(?:{_H}:){{7}}{_H}"
           rf"|(?:{_H}:){{1,6}}:(?:{_H}(?::{_H}){{0,5}})?|::(?:{_H}:){{0,6}}{_H})(?![\w:]|\.\d)", "<ip>"),
    # IPv4, but not a version string such as 1.2.3.4-beta.
    ("ip", rf"(?<![\w.]){_IPV4}(?!\w|\.\d|[-+][A-Za-z])", "<ip>"),
    # International: +1 415-555-0134, +44 20 7946 0958, +49 (0)30 1234567, +919876543210.
    ("phone", r"(?<![\w+])\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,5}){1,4}(?!\w)", "<phone>"),
    ("phone", r"(?<!\w)\(\d{2,4}\)[ .-]?\d{3,4}[ .-]?\d{3,4}(?!\w)", "<phone>"),
    # National formats: US 415.555.0134, DE 030 1234567, UK 020 7946 0958,
    # FR 01 23 45 67 89, JP 03-1234-5678 / 090-1234-5678.
    ("phone", r"(?<![\w.-])\d{3}([ .-])\d{3}\1\d{4}" + _PHONE_END, "<phone>"),
    ("phone", r"(?<![\w.-])0\d{1,4}[ /-]\d{5,8}" + _PHONE_END, "<phone>"),
    ("phone", r"(?<![\w.-])0\d{2,3} \d{3,4} \d{4}" + _PHONE_END, "<phone>"),
    ("phone", r"(?<![\w.-])0[1-9]([ .-])\d{2}(?:\1\d{2}){3}" + _PHONE_END, "<phone>"),
    ("phone", r"(?<![\w.-])0(?:\d-\d{4}|\d{2}-\d{3,4}|\d{3}-\d{2})-\d{4}" + _PHONE_END, "<phone>"),
    # A bare run of 10-12 digits is a phone number without separators (fail safe).
    ("phone", r"(?<![\w+.,-])" + _NOT_PRODUCT_CODE + r"\d{10,12}(?![\w-]|[.,]\d)", "<phone>"),
]


# Every pattern needs an '@', a digit or a ':'; text without any skips the regexes.
_PII_TRIGGER = r"[@0-9:]"


def scrub_pii(text: Column) -> Column:
    """Replace emails, IBANs, card numbers, IPs and phone numbers with typed placeholders."""
    scrubbed = text
    for _, pattern, placeholder in PII_PATTERNS:
        scrubbed = F.regexp_replace(scrubbed, pattern, placeholder)
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
    row = (tables.read("pipeline_runs").where("stage = 'ingest' AND status = 'succeeded'")
           .select(F.get_json_object("details", "$.key_id").alias("key_id"), "started_at")
           .where("key_id IS NOT NULL").orderBy(F.desc("started_at")).first())
    return row["key_id"] if row is not None else None


def require_same_key(tables: "Tables", key: PseudonymKey, key_env: str) -> None:
    """Refuse (one line) a key other than the one the warehouse's events were made with."""
    stored = warehouse_key_id(tables)
    if stored is not None and stored != key.key_id:
        where = "privacy.dev_key" if key.is_dev_key else key_env
        raise SecretError(
            f"the events in {tables.location('events')} were pseudonymized with key id {stored}, but the key in "
            f"{where} has key id {key.key_id}: mixing keys would split every user in two. Set the key the "
            f"warehouse was built with, or rotate the key as {ROTATION_DOC} describes")


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
    out: dict[str, str | None] = {MODEL_VERSION_PROPERTY: ",".join(versions), DP_EPSILON_PROPERTY: None,
                                  DP_DELTA_PROPERTY: None}
    if any(dp is None for dp in dps):
        out[DP_PROPERTY] = "unknown"
    elif not all(dps):
        out[DP_PROPERTY] = "none"
    else:
        out[DP_PROPERTY] = "dp-sgd"
        out[DP_EPSILON_PROPERTY] = f"{max(float(dp['epsilon']) for dp in dps):.4f}"
        out[DP_DELTA_PROPERTY] = f"{max(float(dp['delta']) for dp in dps):g}"
    return out
