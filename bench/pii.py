"""PII scrubber quality on labelled synthetic corpora: an independent oracle and our own.

    .venv/bin/python bench/pii.py [--n 5000] [--seed 1] [--corpus oracle|internal|both]

Generates --n query and review texts with planted PII and hard negatives and runs
the real scrub_pii expression over them in one Spark job (local[2]), per corpus:

* oracle (userlens.eval.pii_corpus.generate_oracle_corpus): PII from libraries that know
  the world's formats rather than from the code that wrote the patterns: phone
  numbers from libphonenumber (phonenumbers: fixed-line, mobile and toll-free
  numbers of 55 regions, NATIONAL, INTERNATIONAL, E164 and 00-prefixed), emails,
  IBANs, card numbers and IPv4/IPv6 from Faker's locales and card providers; hard
  negatives also in many more date, time, price, postcode and figure formats.
  Needs the dev extra (phonenumbers, Faker).
* internal (generate_corpus): the module's own makers (email, phone in US, UK, DE,
  FR, IN and JP formats, Luhn-valid cards, IBANs, IPv4, IPv6) and hard negatives
  (order numbers, prices, dates, times, product codes, model numbers, versions,
  quantities, ...).

Prints, per corpus and PII type, the recall (every character of the planted value
replaced) and the precision of its placeholder (placeholders that replaced only PII
of their type), then the share of hard negatives kept verbatim. Goals: recall >=
0.99 per type, >= 0.95 of hard negatives kept. Luhn-invalid card-like numbers are
masked on purpose and count for neither (docs/privacy.md). Exits 1 when a goal is
not met on any corpus.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

from userlens.config import load_settings  # noqa: E402
from userlens.eval.pii_corpus import generate_corpus, score_scrubber  # noqa: E402
from userlens.spark import get_spark  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000, help="records in each corpus")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--corpus", choices=("oracle", "internal", "both"), default="both")
    args = parser.parse_args()
    sources = ("oracle", "internal") if args.corpus == "both" else (args.corpus,)

    work = tempfile.mkdtemp(prefix="userlens-bench-pii-")
    spark = get_spark(
        load_settings(
            None,
            [
                "spark.master=local[2]",
                "spark.ui=false",
                "spark.log_level=ERROR",
                "spark.conf.spark.ui.showConsoleProgress=false",
                f"storage.warehouse={work}/wh",
            ],
        )
    )
    met = True
    for source in sources:
        start = time.perf_counter()
        records = generate_corpus(args.n, args.seed, source=source)
        print(
            f"## {source} corpus: {len(records):,d} records (seed {args.seed}) in {time.perf_counter() - start:.1f}s",
            flush=True,
        )
        start = time.perf_counter()
        score = score_scrubber(spark, records)
        print(f"scrubbed and scored in {time.perf_counter() - start:.1f}s\n", flush=True)

        print(score.markdown())
        for label, examples in (
            ("missed", score.misses),
            ("false positive", score.false_positives),
            ("hard negative hit", score.damaged),
        ):
            for example in examples[:10]:
                print(f"{label}: {example}")
        print(flush=True)
        met = met and score.meets_goals()
    sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
