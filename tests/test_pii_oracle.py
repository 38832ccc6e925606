"""scrub_pii against an independent oracle: PII from libphonenumber (phonenumbers) and Faker.

The internal corpus (tests/test_pii_corpus.py) is written by the same hands as the patterns;
this one is not. Every region, number type and format of ``ORACLE_REGIONS`` is planted at
least once (libphonenumber's own example numbers), next to a small random oracle corpus.
phonenumbers and Faker come with the dev extra (setup.py); without them these tests fail.
"""

from __future__ import annotations

import pytest
from pyspark.sql import Column
from pyspark.sql import functions as F

from userlens.eval.pii_corpus import (
    ORACLE_NEGATIVE_KINDS,
    ORACLE_PHONE_FORMATS,
    ORACLE_PHONE_TYPES,
    ORACLE_REGIONS,
    PII_TYPES,
    PLACEHOLDERS,
    generate_corpus,
    generate_oracle_corpus,
    luhn_valid,
    oracle_phone_examples,
    oracle_records,
    score_scrubber,
)
from userlens.privacy import PII_PATTERNS

N = 300


def _iban_valid(iban: str) -> bool:
    compact = iban.replace(" ", "")
    return int("".join(str(int(ch, 36)) for ch in compact[4:] + compact[:4])) % 97 == 1


def _corpus():
    examples = [("phone", text) for *_, text in oracle_phone_examples()]
    return generate_oracle_corpus(N, seed=1) + oracle_records(examples, seed=1)


def test_oracle_corpus_is_deterministic_and_labels_are_true():
    corpus = generate_oracle_corpus(N, seed=3)
    generate_oracle_corpus(50, seed=4)  # the shared Faker instances are reseeded, not continued
    assert corpus == generate_oracle_corpus(N, seed=3) == generate_corpus(N, 3, source="oracle")
    assert corpus != generate_oracle_corpus(N, seed=4)
    for record in corpus:
        for span in record.pii + record.negatives + record.ignored:
            assert record.text[span.start : span.end] == span.value, (record.text, span)
        assert not any(p in record.text for p in PLACEHOLDERS.values())
    assert all(luhn_valid(s.value) for r in corpus for s in r.pii if s.kind == "card")
    assert all(_iban_valid(s.value) for r in corpus for s in r.pii if s.kind == "iban")
    assert {s.kind for r in corpus for s in r.pii} == set(PII_TYPES)
    assert {s.kind for r in corpus for s in r.negatives} == set(ORACLE_NEGATIVE_KINDS)
    with pytest.raises(ValueError, match="source"):
        generate_corpus(1, 1, source="mine")


def test_every_region_type_and_format_has_an_example():
    examples = oracle_phone_examples()
    assert len(ORACLE_REGIONS) >= 30 and len(set(ORACLE_REGIONS)) == len(ORACLE_REGIONS)
    for region in ORACLE_REGIONS:
        for fmt in ORACLE_PHONE_FORMATS:
            types = {t for r, t, f, _ in examples if r == region and f == fmt}
            assert {"FIXED_LINE", "MOBILE"} <= types <= set(ORACLE_PHONE_TYPES), (region, fmt, types)
    by_key = {(r, t, f): text for r, t, f, text in examples}
    assert by_key["DE", "FIXED_LINE", "NATIONAL"] == "030 123456"
    assert by_key["DE", "FIXED_LINE", "00"] == "0049 30 123456"
    assert by_key["DE", "FIXED_LINE", "00 "] == "00 49 30 123456"
    assert by_key["DE", "FIXED_LINE", "E164"] == "+4930123456"


def test_scrub_pii_masks_every_oracle_value_and_keeps_hard_negatives(spark):
    score = score_scrubber(spark, _corpus())
    assert score.unaligned == 0
    assert score.types["phone"].planted >= len(oracle_phone_examples())
    recalls = {t: score.recall(t) for t in PII_TYPES}
    assert all(r == 1.0 for r in recalls.values()), (recalls, score.misses)
    assert score.negative_retention >= 0.99, score.damaged
    assert all(score.negatives[k][0] > 0 for k in ORACLE_NEGATIVE_KINDS)


def _without(index: int):
    def scrubber(text: Column) -> Column:
        scrubbed = text
        for i, (_, pattern, placeholder) in enumerate(PII_PATTERNS):
            if i != index:
                scrubbed = F.regexp_replace(scrubbed, pattern, placeholder)
        return scrubbed

    return scrubber


@pytest.mark.parametrize("index", range(len(PII_PATTERNS)), ids=lambda i: f"{i}-{PII_PATTERNS[i][0]}")
def test_every_pattern_is_needed(spark, index):
    """Dropping any one pattern loses oracle PII (or, for the bare-digits phone rule, internal PII)."""
    records = _corpus() + generate_corpus(N, seed=1)
    score = score_scrubber(spark, records, scrubber=_without(index))
    recalls = {t: score.recall(t) for t in PII_TYPES}
    assert min(recalls.values()) < 1.0, (PII_PATTERNS[index][0], recalls)
