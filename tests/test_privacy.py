"""Pseudonyms equal Python's HMAC; PII is replaced, look-alikes that are not PII survive."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from pyspark.sql import functions as F

from userlens.config import PrivacySettings
from userlens.errors import SecretError
from userlens.privacy import load_key, pseudonymize, scrub_pii


@pytest.mark.parametrize("secret", ["k" * 16, "a-much-longer-secret-key-" * 5])  # short and > block size
def test_pseudonym_equals_python_hmac(spark, secret):
    key = load_key(PrivacySettings(key_env="K"), {"K": secret})
    ids = ["u0000123", "  alice  ", "ünïcødé-用户", "", None]
    got = [
        r[0]
        for r in spark.createDataFrame([(i,) for i in ids], "id string")
        .select(pseudonymize(F.col("id"), key))
        .collect()
    ]
    expected = [hmac.new(secret.encode(), i.strip().encode(), hashlib.sha256).hexdigest() for i in ids[:3]]
    assert got == expected + [None, None]


def test_key_errors_and_dev_key(caplog):
    with pytest.raises(SecretError, match="MY_KEY is not set"):
        load_key(PrivacySettings(key_env="MY_KEY"), {})
    with pytest.raises(SecretError, match="at least 16"):
        load_key(PrivacySettings(key_env="MY_KEY"), {"MY_KEY": "short"})
    key = load_key(PrivacySettings(key_env="MY_KEY", dev_key="dev-key-0123456789"), {})
    assert key.is_dev_key and "PUBLIC development key" in caplog.text
    assert [r.levelname for r in caplog.records if "development key" in r.getMessage()] == ["WARNING"]
    assert "dev-key-0123456789" not in repr(key) and "dev-key-0123456789" not in caplog.text


def test_a_caller_that_expects_the_dev_key_gets_it_logged_at_info(caplog, monkeypatch):
    import userlens.privacy

    monkeypatch.setattr(userlens.privacy, "_dev_key_expected", False)
    userlens.privacy.expect_dev_key()  # `userlens demo`, which says so on its output
    caplog.set_level("INFO", logger="userlens.privacy")
    key = load_key(PrivacySettings(key_env="MY_KEY", dev_key="dev-key-0123456789"), {})
    assert key.is_dev_key
    assert [r.levelname for r in caplog.records if "development key" in r.getMessage()] == ["INFO"]


CASES = [
    ("mail me at jane.doe42@example.com today", "mail me at <email> today"),
    ("call +1 415-555-0134 now", "call <phone> now"),
    ("call (415) 555-0134", "call <phone>"),
    ("ring +44 20 7946 0958", "ring <phone>"),
    ("Festnetz 030 1234567", "Festnetz <phone>"),
    ("card 4111 1111 1111 1111 ok", "card <card> ok"),
    ("card 5500-0000-0000-0004", "card <card>"),
    ("from 192.168.10.23.", "from <ip>."),
    ("v6 2001:db8:85a3::8a2e:370:7334 x", "v6 <ip> x"),
    ("iban DE89 3704 0044 0532 0130 00", "iban <iban>"),
    # formats the patterns learnt from the oracle corpus (libphonenumber, Faker)
    ("ruf 0049 30 123456 an", "ruf <phone> an"),
    ("ruf 00 49 30 123456 an", "ruf <phone> an"),
    ("chiama 02 1234 5678", "chiama <phone>"),
    ("bel 06 12345678", "bel <phone>"),
    ("tel. 512 345 678", "tel. <phone>"),
    ("zvonite 8 (912) 345-67-89", "zvonite <phone>"),
    ("ligue (11) 96123-4567", "ligue <phone>"),
    ("hívjon (06 1) 234 5678", "hívjon <phone>"),
    ("call 1-800-123-456", "call <phone>"),
    ("mail jürgen@abramenko.укр", "mail <email>"),
    ("IBAN RU98 0400 8556 5930 50MU LJCK VIRF OXJA C", "IBAN <iban>"),
    ("IBAN DE89 3704 0044 0532 0130 00 BIC GKCCBEBB", "IBAN <iban> BIC GKCCBEBB"),
    ("maestro 503888215517 ok", "maestro <card> ok"),
    # hard negatives: must survive unchanged
    ("order 2026-10-03 at 14:02:11 cost 19.99", "order 2026-10-03 at 14:02:11 cost 19.99"),
    ("version 1.2.3 model XR-200 qty 12", "version 1.2.3 model XR-200 qty 12"),
    ("order #12345678", "order #12345678"),
    ("order 114-2345678-9012345, 007-9210020-2574923", "order 114-2345678-9012345, 007-9210020-2574923"),
    ("from 2019-2023, 2019/2020, 1500-6000 rpm", "from 2019-2023, 2019/2020, 1500-6000 rpm"),
    ("on 03.10.2026 14:30, 10/03/26, 2026-13-01", "on 03.10.2026 14:30, 10/03/26, 2026-13-01"),
    ("zip 94105-1234, CEP 01310-100, 10115 Berlin", "zip 94105-1234, CEP 01310-100, 10115 Berlin"),
    ("12.499.000 ₫, 12 499 000 ₫, pi 3.14159265", "12.499.000 ₫, 12 499 000 ₫, pi 3.14159265"),
    ("size 38 40 42 44 46, draw 1 10 11 12 10", "size 38 40 42 44 46, draw 1 10 11 12 10"),
    ("app 0.12.11.21-beta", "app 0.12.11.21-beta"),
]


def test_scrub_pii(spark):
    df = spark.createDataFrame(CASES, "text string, expected string")
    got = df.select(scrub_pii(F.col("text")).alias("got"), "expected").collect()
    assert [r.got for r in got] == [r.expected for r in got]
