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

from pyspark.sql import Column
from pyspark.sql import functions as F

from userlens.config import PrivacySettings
from userlens.errors import SecretError

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
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_H = r"[0-9A-Fa-f]{1,4}"
PII_PATTERNS: list[tuple[str, str, str]] = [
    ("email", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}", "<email>"),
    ("iban", r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b", "<iban>"),
    # 13-19 digits in groups: masked whether or not they pass Luhn (fail safe).
    ("card", r"(?<![\w-])\d{4}(?:[ -]?\d{3,4}){2,3}(?:[ -]?\d{1,4})?(?![\w-])", "<card>"),
    ("ip", rf"(?<![\w:])(?:(?:{_H}:){{7}}{_H}|(?:{_H}:){{1,6}}:(?:{_H}(?::{_H}){{0,5}})?|::(?:{_H}:){{0,6}}{_H})(?![\w:])", "<ip>"),
    ("ip", rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)", "<ip>"),
    ("phone", r"(?<![\w+])\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,5}){1,4}(?!\w)", "<phone>"),
    ("phone", r"(?<!\w)\(\d{2,4}\)[ .-]?\d{3,4}[ .-]?\d{3,4}(?!\w)", "<phone>"),
    ("phone", r"(?<![\w.-])\d{3}([ .-])\d{3}\1\d{4}(?![\w.-])", "<phone>"),
    ("phone", r"(?<![\w.-])0\d{1,4}[ /-]\d{5,8}(?![\w.-])", "<phone>"),
]


# Every pattern needs an '@', a digit or a ':'; text without any skips the regexes.
_PII_TRIGGER = r"[@0-9:]"


def scrub_pii(text: Column) -> Column:
    """Replace emails, IBANs, card numbers, IPs and phone numbers with typed placeholders."""
    scrubbed = text
    for _, pattern, placeholder in PII_PATTERNS:
        scrubbed = F.regexp_replace(scrubbed, pattern, placeholder)
    return F.when(text.rlike(_PII_TRIGGER), scrubbed).otherwise(text)
