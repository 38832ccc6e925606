"""A labelled PII corpus and a scorer for the Spark PII scrubber.

``generate_corpus(n, seed)`` builds deterministic free texts shaped like search
queries and product reviews. Each record knows, with offsets, the PII it carries
(email, phone in several national formats, Luhn-valid card numbers, IBANs with
valid check digits, IPv4, IPv6), the hard negatives that must survive unchanged
(order numbers, prices, dates, times, product codes, model numbers, versions,
quantities, ...), and the Luhn-invalid card-like numbers, which count as neither:
the scrubber masks every card-shaped digit run because a Spark regex cannot
check Luhn (docs/privacy.md).

Those makers are written by the same hands as the patterns, so their corpus cannot
find a format the patterns do not know. ``generate_oracle_corpus(n, seed)`` (or
``generate_corpus(n, seed, source="oracle")``) takes its PII from libraries that
know the world's formats instead: phone numbers of 55 regions from libphonenumber
(``phonenumbers``), emails, IBANs, card numbers and IP addresses from Faker's
locales; its hard negatives add dates, times, prices, postcodes and figures in many
more formats. Both libraries are test and benchmark dependencies (the ``dev`` extra).

``score_scrubber(spark, records)`` runs a scrubber (default: the real
``scrub_pii``) over the corpus in one Spark job and scores it. The scrubber only
replaces substrings by placeholders, so the input ranges it replaced are recovered
exactly from (input, output): the output's literal pieces, in order, must match
the input with one non-empty gap per placeholder. A planted span counts as
recalled when every character of it lies inside replaced ranges (a partly masked
phone number is a miss). A placeholder is a true positive when the range it
replaced lies inside one planted span whose type uses that placeholder; any other
placeholder replaced non-PII text (or PII of another type) and is a false
positive. Placeholders that replaced only a Luhn-invalid card-like number count
for neither. A hard negative is kept when no replaced range touches it.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from pyspark.sql import Column
from pyspark.sql import functions as F

from userlens.privacy import scrub_pii

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

PII_TYPES = ("email", "phone", "card", "iban", "ipv4", "ipv6")
PLACEHOLDERS = {
    "email": "<email>",
    "phone": "<phone>",
    "card": "<card>",
    "iban": "<iban>",
    "ipv4": "<ip>",
    "ipv6": "<ip>",
}
NEGATIVE_KINDS = ("order", "price", "date", "time", "sku", "model", "version", "quantity", "misc")
LUHN_INVALID = "card_luhn_invalid"  # the kind of the spans that are neither PII nor hard negative

RECALL_GOAL = 0.99
RETENTION_GOAL = 0.95

_PLACEHOLDER_RE = re.compile("(" + "|".join(sorted({re.escape(p) for p in PLACEHOLDERS.values()})) + ")")


class Span(NamedTuple):
    """A labelled substring: ``text[start:start + len(value)] == value``."""

    kind: str
    value: str
    start: int

    @property
    def end(self) -> int:
        return self.start + len(self.value)


@dataclass(frozen=True)
class PiiRecord:
    """One free text with its planted PII, its hard negatives and its card-likes that are neither."""

    text: str
    pii: tuple[Span, ...]
    negatives: tuple[Span, ...]
    ignored: tuple[Span, ...] = ()

    @property
    def expected(self) -> str:
        """The text a perfect scrubber returns: exactly the PII spans replaced by their placeholders."""
        out, pos = [], 0
        for span in sorted(self.pii, key=lambda s: s.start):
            out += [self.text[pos : span.start], PLACEHOLDERS[span.kind]]
            pos = span.end
        return "".join(out) + self.text[pos:]


# --------------------------------------------------------------------------- values


def luhn_check_digit(body: str) -> int:
    """The digit that makes ``body + digit`` pass the Luhn check."""
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:  # doubled: these sit at odd positions once the check digit is appended
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return (10 - total % 10) % 10


def luhn_valid(number: str) -> bool:
    """True when the digits of ``number`` pass the Luhn check."""
    digits = [c for c in number if c.isdigit()]
    return len(digits) >= 2 and luhn_check_digit("".join(digits[:-1])) == int(digits[-1])


def _digits(r: random.Random, n: int) -> str:
    return "".join(str(r.randrange(10)) for _ in range(n))


def _ean13(r: random.Random, prefix: str) -> str:
    body = prefix + _digits(r, 12 - len(prefix))
    total = sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(body))
    return body + str((10 - total % 10) % 10)


_FIRST = ("jane", "omar", "li", "maria", "tom", "aisha", "lukas", "chloe", "raj", "yuki", "sven", "ana")
_LAST = ("doe", "patel", "chen", "garcia", "smith", "mueller", "martin", "kumar", "tanaka", "berg", "silva")
_DOMAINS = (
    "example.com",
    "example.org",
    "mail.example.net",
    "example.co.uk",
    "post.example.de",
    "example.io",
    "uni-example.edu",
    "EXAMPLE.COM",
)


def _email(r: random.Random) -> str:
    first, last = r.choice(_FIRST), r.choice(_LAST)
    local = r.choice(
        (
            f"{first}.{last}{r.randrange(1, 100)}",
            f"{first}{last[0]}{r.randrange(1970, 2006)}",
            f"{first}_{last}",
            f"{first}.{last}+shop",
            f"{first[0]}.{last}",
            f"{first.title()}.{last.title()}",
            f"{last}-{first}",
            f"{first}{r.randrange(100, 1000)}",
        )
    )
    return f"{local}@{r.choice(_DOMAINS)}"


def _phone(r: random.Random) -> str:
    d = lambda n: _digits(r, n)  # noqa: E731
    area, exch, line = str(r.randrange(201, 990)), str(r.randrange(200, 1000)), d(4)
    uk_mobile, de_city = "7" + d(3), r.choice(("30", "40", "69", "89", "221"))
    de_mobile = r.choice(("151", "160", "170", "176"))
    fr1, fr = str(r.randrange(1, 10)), " ".join(d(2) for _ in range(4))
    jp_city = r.choice(("3", "6"))
    formats = (
        # US / NANP
        f"+1 {area}-{exch}-{line}",
        f"({area}) {exch}-{line}",
        f"{area}.{exch}.{line}",
        f"{area}-{exch}-{line}",
        f"+1 ({area}) {exch}-{line}",
        f"+1{area}{exch}{line}",
        f"{area}{exch}{line}",
        f"+1 {area} {exch} {line}",
        f"{area} {exch} {line}",
        # UK
        f"+44 20 {d(4)} {d(4)}",
        f"020 {d(4)} {d(4)}",
        f"+44 {uk_mobile} {d(6)}",
        f"0{uk_mobile} {d(6)}",
        f"0161 {d(3)} {d(4)}",
        f"+44 (0)20 {d(4)} {d(4)}",
        # DE
        f"+49 {de_city} {d(7)}",
        f"0{de_city} {d(7)}",
        f"+49 {de_mobile} {d(8)}",
        f"0{de_mobile} {d(8)}",
        f"0{de_city}/{d(7)}",
        f"+49 (0){de_city} {d(7)}",
        f"+49-{de_city}-{d(7)}",
        # FR
        f"+33 {fr1} {fr}",
        f"0{fr1} {fr}",
        f"0{fr1}.{fr.replace(' ', '.')}",
        f"+33 (0){fr1} {fr}",
        # IN
        f"+91 9{d(4)} {d(5)}",
        f"+91-9{d(4)}-{d(5)}",
        f"+919{d(9)}",
        f"+91 9{d(4)}-{d(5)}",
        # JP
        f"0{jp_city}-{d(4)}-{d(4)}",
        f"090-{d(4)}-{d(4)}",
        f"+81 {jp_city}-{d(4)}-{d(4)}",
        f"045-{d(3)}-{d(4)}",
        f"+81 90-{d(4)}-{d(4)}",
    )
    return r.choice(formats)


def _card_number(r: random.Random) -> str:
    brand = r.choice(("visa16", "visa16", "mc", "mc", "amex", "visa13", "visa19"))
    if brand == "amex":
        prefix, length = r.choice(("34", "37")), 15
    elif brand == "mc":
        prefix, length = r.choice(("51", "52", "53", "54", "55", str(r.randrange(2221, 2721)))), 16
    else:
        prefix, length = "4", {"visa16": 16, "visa13": 13, "visa19": 19}[brand]
    body = prefix + _digits(r, length - 1 - len(prefix))
    return body + str(luhn_check_digit(body))


def _group_card(r: random.Random, number: str) -> str:
    style = r.choice(("plain", " ", " ", "-"))
    if style == "plain" or len(number) == 13:
        return number
    sizes = (4, 6, 5) if len(number) == 15 else (4, 4, 4, 4, 3)
    groups, pos = [], 0
    for size in sizes:
        if pos < len(number):
            groups.append(number[pos : pos + size])
            pos += size
    return style.join(groups)


def _card(r: random.Random) -> str:
    return _group_card(r, _card_number(r))


def _luhn_invalid_card(r: random.Random) -> str:
    body = r.choice(("4", "5")) + _digits(r, 14)
    number = body + str((luhn_check_digit(body) + r.randrange(1, 10)) % 10)  # any digit but the right one
    return _group_card(r, number)


# country: (BBAN generator of (kind, length) parts). n: digits, a: upper letters, c: alphanumeric
_IBAN_BBAN = {
    "DE": (("n", 18),),
    "GB": (("a", 4), ("n", 14)),
    "FR": (("n", 10), ("c", 11), ("n", 2)),
    "NL": (("a", 4), ("n", 10)),
    "ES": (("n", 20),),
    "IT": (("a", 1), ("n", 10), ("c", 12)),
    "CH": (("n", 5), ("c", 12)),
    "BE": (("n", 12),),
    "AT": (("n", 16),),
    "PL": (("n", 24),),
}


def _iban(r: random.Random) -> str:
    country = r.choice(sorted(_IBAN_BBAN))
    # Account parts that may hold letters are nearly all digits in practice (1 in 50 here).
    alphabet = {
        "n": "0123456789",
        "a": "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "c": "0123456789" * 127 + "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    }
    bban = "".join("".join(r.choice(alphabet[k]) for _ in range(n)) for k, n in _IBAN_BBAN[country])
    numeric = "".join(str(int(ch, 36)) for ch in bban + country + "00")
    iban = f"{country}{98 - int(numeric) % 97:02d}{bban}"
    if r.random() < 0.4:
        return iban
    return " ".join(iban[i : i + 4] for i in range(0, len(iban), 4))


def _ipv4(r: random.Random) -> str:
    style = r.randrange(4)
    if style == 0:
        return f"192.168.{r.randrange(256)}.{r.randrange(1, 255)}"
    if style == 1:
        return f"10.{r.randrange(256)}.{r.randrange(256)}.{r.randrange(1, 255)}"
    return f"{r.randrange(1, 224)}.{r.randrange(256)}.{r.randrange(256)}.{r.randrange(1, 255)}"


def _ipv6(r: random.Random) -> str:
    style = r.randrange(10)
    if style == 0:
        return "::1"
    if style == 1:
        return f"::ffff:{_ipv4(r)}"
    if style == 2:
        return f"fe80::{r.randrange(1, 0x10000):x}:{r.randrange(0x10000):x}:{r.randrange(0x10000):x}"
    groups = [0 if r.random() < 0.35 else r.randrange(1, 0x10000) for _ in range(8)]
    groups[0] = r.choice((0x2001, 0x2A00, 0x2600, 0xFD00))
    address = ipaddress.IPv6Address(sum(g << (16 * (7 - i)) for i, g in enumerate(groups)))
    text = address.exploded if style in (3, 4) else address.compressed
    return text.upper() if r.random() < 0.15 else text


_PII_MAKERS: dict[str, Callable[[random.Random], str]] = {
    "email": _email,
    "phone": _phone,
    "card": _card,
    "iban": _iban,
    "ipv4": _ipv4,
    "ipv6": _ipv6,
}


def _negative(r: random.Random, kind: str) -> str:
    d = lambda n: _digits(r, n)  # noqa: E731
    if kind == "order":
        return r.choice(
            (
                f"#A-{d(8)}",
                f"ORD-{r.randrange(2019, 2027)}-{d(6)}",
                f"{d(3)}-{d(7)}-{d(7)}",
                f"#{r.randrange(10000, 99999)}",
                f"1Z{d(3)}AA{d(10)}",
            )
        )
    if kind == "price":
        whole, cents = r.randrange(1, 3000), r.randrange(100)
        return r.choice(
            (
                f"${whole:,}.{cents:02d}",
                f"{whole},{cents:02d} €",
                f"€{whole:,}".replace(",", ".") + f",{cents:02d}",
                f"£{whole}.{cents:02d}",
                f"USD {whole:,}.{cents:02d}",
                f"{whole}.{cents:02d} EUR",
            )
        )
    if kind == "date":
        y, m, day = r.randrange(2019, 2028), r.randrange(1, 13), r.randrange(1, 29)
        month = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")[m - 1]
        return r.choice(
            (
                f"{y}-{m:02d}-{day:02d}",
                f"{day:02d}/{m:02d}/{y}",
                f"{day}.{m}.{y}",
                f"{month} {day}, {y}",
                f"{day:02d}.{m:02d}.{y}",
            )
        )
    if kind == "time":
        h, mi = r.randrange(24), r.randrange(60)
        return r.choice(
            (
                f"{h:02d}:{mi:02d}",
                f"{h % 12 + 1}:{mi:02d} {r.choice(('am', 'pm'))}",
                f"{h:02d}:{mi:02d}:{r.randrange(60):02d}",
                f"{h:02d}:{mi:02d}-{(h + 1) % 24:02d}:{mi:02d}",
            )
        )
    if kind == "sku":
        # Product codes keep their keyword: a bare 13-digit run is card-shaped and is masked.
        return r.choice(
            (
                f"SKU {_ean13(r, '400')}",
                f"EAN {_ean13(r, r.choice(('590', '301', '871')))}",
                f"EAN: {_ean13(r, '40')}",
                f"GTIN 0{_ean13(r, '400')}",
                f"UPC {_ean13(r, '0')[1:]}",
                f"ISBN {_ean13(r, '978')}",
                f"ISBN 978-{r.randrange(1, 10)}-{d(2)}-{d(6)}-{d(1)}",
                f"SKU BX-{d(4)}-K",
            )
        )
    if kind == "model":
        return r.choice(
            (
                f"RTX {r.choice(('3060', '4070', '4090', '5080'))}",
                f"iPhone {r.randrange(11, 17)} Pro",
                f"Galaxy S{r.randrange(20, 26)} Ultra",
                "WH-1000XM5",
                f"ThinkPad X1 Carbon Gen {r.randrange(6, 13)}",
                f"XR-{r.randrange(100, 999)}",
                f"i7-{r.randrange(10, 15)}700K",
                f"Pixel {r.randrange(6, 10)}a",
            )
        )
    if kind == "version":
        a, b, c, e = r.randrange(0, 10), r.randrange(0, 20), r.randrange(0, 20), r.randrange(0, 30)
        return r.choice(
            (
                f"v{a}.{b}.{c}",
                f"{a}.{b}.{c}.{e}-beta",
                f"{a}.{b}.{c}.{e}-rc{r.randrange(1, 5)}",
                f"v{a}.{b}.{c}.{e}",
                f"{a}.{b}.{c}",
                f"firmware {a}.{b}.{c}",
            )
        )
    if kind == "quantity":
        return r.choice(
            (
                f"pack of {r.choice((6, 12, 24, 48))}",
                f"{r.randrange(2, 6)} x {r.choice((250, 500, 750))} ml",
                f"{r.choice((6, 12, 24))}-pack",
                f"{r.randrange(1, 25)}kg",
                f"{r.randrange(1, 3)},5 l",
            )
        )
    return r.choice(
        (
            "24/7",
            f"{r.choice((1920, 2560, 3840))}x{r.choice((1080, 1440, 2160))}",
            "16:9",
            f"{r.randrange(1, 6)}/5 stars",
            f"{r.randrange(10, 101)}%",
            f"{r.randrange(1, 11)}/10",
        )
    )


_NEGATIVE_CONTEXTS: dict[str, tuple[str, ...]] = {
    "order": ("where is my order {}", "order {} not arrived", "refund for order {}", "{} still processing"),
    "price": ("paid {}", "only {} on sale", "{} is too expensive", "worth {}"),
    "date": ("delivered on {}", "expected {}", "bought it {}", "since {} no reply"),
    "time": ("courier came at {}", "open until {}", "call window {}", "delivery slot {}"),
    "sku": ("{} out of stock", "looking for {}", "replacement part {}", "same as {}"),
    "model": ("{} case", "cheaper than the {}", "fits {}", "{} overheats"),
    "version": ("after update {}", "app {} crashes", "{} fixed it", "running {}"),
    "quantity": ("{}", "bought a {}", "{} arrived open", "need {}"),
    "misc": ("support {}", "screen {}", "rated {}", "{} would recommend"),
}
_PII_CONTEXTS = {
    "email": (
        "contact {}",
        "email me at {}",
        "my email is {}",
        "send the invoice to {}",
        "reply to {}",
        "account {} locked",
    ),
    "phone": (
        "call me on {}",
        "my number is {}",
        "ring {} after work",
        "whatsapp {}",
        "tel. {}",
        "courier should call {}",
    ),
    "card": ("paid with {}", "card {} charged twice", "refund to card {}", "my visa {}", "used card number {}"),
    "iban": ("refund to IBAN {}", "bank account {}", "please transfer to {}", "IBAN: {}", "IBAN {} BIC GKCCBEBB"),
    "ipv4": (
        "login blocked from {}",
        "my router ip is {}",
        "site down from {}",
        "vpn exit {}",
        "access from {} denied",
        "server {}:8080 refused",
    ),
    "ipv6": (
        "login blocked from {}",
        "my ipv6 is {}",
        "site down from {}",
        "ping {} fails",
        "access from [{}]:443 denied",
    ),
}
_LUHN_INVALID_CONTEXTS = ("card {} declined", "tried card {}", "number {} rejected")
_QUERY_FILLERS = (
    "trail running shoes",
    "wireless earbuds",
    "usb c charger",
    "coffee grinder",
    "kids rain jacket",
    "standing desk",
    "phone case",
    "return label",
    "gift card balance",
    "invoice copy",
)
_REVIEW_FILLERS = (
    "Great quality, would buy again.",
    "Arrived late and the box was damaged.",
    "Battery life is fine but the screen scratches easily.",
    "Does exactly what it says.",
    "Customer service never answered.",
    "Smaller than expected!",
    "Five stars from me.",
    "The colour is off compared to the photos.",
)


class _Builder:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.pos = 0
        self.spans: dict[str, list[Span]] = {"pii": [], "neg": [], "ignored": []}

    def literal(self, text: str) -> None:
        self.parts.append(text)
        self.pos += len(text)

    def value(self, group: str, kind: str, value: str) -> None:
        self.spans[group].append(Span(kind, value, self.pos))
        self.literal(value)

    def record(self) -> PiiRecord:
        return PiiRecord(
            "".join(self.parts), tuple(self.spans["pii"]), tuple(self.spans["neg"]), tuple(self.spans["ignored"])
        )


def _phrase(
    r: random.Random,
    group: str,
    kind: str,
    value: str,
    pii_contexts: dict[str, tuple[str, ...]] = _PII_CONTEXTS,
    negative_contexts: dict[str, tuple[str, ...]] = _NEGATIVE_CONTEXTS,
) -> list[tuple[str, str, str] | str]:
    contexts = {"pii": pii_contexts, "neg": negative_contexts}.get(group, {}).get(kind, _LUHN_INVALID_CONTEXTS)
    before, after = r.choice(contexts).split("{}")
    return [p for p in (before, (group, kind, value), after) if p]


def _emit(b: _Builder, phrases: list[list], review: bool) -> None:
    for i, phrase in enumerate(phrases):
        if i:
            prev, nxt = phrases[i - 1][-1], phrase[0]
            # A value never runs into the next one: where both sides are values, a comma
            # separates them (a phone number directly followed by a date is ambiguous).
            words = (isinstance(prev, str) and prev[-1:].isalpha()) or (isinstance(nxt, str) and nxt[:1].isalpha())
            b.literal(" " if review or words else ", ")
        for j, piece in enumerate(phrase):
            if isinstance(piece, str):
                b.literal(piece[:1].upper() + piece[1:] if review and j == 0 else piece)
            else:
                b.value(*piece)
        if review:
            b.literal("!" if len(phrase) % 3 == 0 and isinstance(phrase[-1], str) else ".")


@dataclass(frozen=True)
class _Source:
    """Where a corpus takes its values and contexts from (the internal makers or the oracle's)."""

    makers: dict[str, Callable[[random.Random], str]]
    negative: Callable[[random.Random, str], str]
    negative_kinds: tuple[str, ...]
    pii_contexts: dict[str, tuple[str, ...]]
    negative_contexts: dict[str, tuple[str, ...]]


_INTERNAL = _Source(_PII_MAKERS, _negative, NEGATIVE_KINDS, _PII_CONTEXTS, _NEGATIVE_CONTEXTS)


def _record(r: random.Random, source: _Source = _INTERNAL, planted: tuple[str, str] | None = None) -> PiiRecord:
    """One record; ``planted`` (type, value) replaces the random PII of the record by that one value."""
    roll = r.random()
    n_pii = 0 if roll < 0.1 else 1 if roll < 0.75 else 2
    roll = r.random()
    n_neg = 0 if roll < 0.15 else 1 if roll < 0.65 else 2
    phrases = []
    phrase = lambda group, kind, value: _phrase(  # noqa: E731
        r, group, kind, value, source.pii_contexts, source.negative_contexts
    )
    if planted is not None:
        phrases.append(phrase("pii", *planted))
    else:
        for _ in range(n_pii):
            kind = r.choice(PII_TYPES)
            phrases.append(phrase("pii", kind, source.makers[kind](r)))
    for _ in range(n_neg):
        kind = r.choice(source.negative_kinds)
        phrases.append(phrase("neg", kind, source.negative(r, kind)))
    if r.random() < 0.08:
        phrases.append(phrase("ignored", LUHN_INVALID, _luhn_invalid_card(r)))
    r.shuffle(phrases)
    b = _Builder()
    if r.random() < 0.5:  # a search query
        if r.random() < 0.5 or not phrases:
            phrases.insert(0, [r.choice(_QUERY_FILLERS)])
        _emit(b, phrases, review=False)
    else:  # a review
        if r.random() < 0.7 or not phrases:
            b.literal(r.choice(_REVIEW_FILLERS) + (" " if phrases else ""))
        _emit(b, phrases, review=True)
        if r.random() < 0.3:
            b.literal(" " + r.choice(_REVIEW_FILLERS))
    return b.record()


def generate_corpus(n: int, seed: int, source: str = "internal") -> list[PiiRecord]:
    """``n`` labelled query and review texts; the same (n, seed, source) always gives the same records.

    ``source="internal"``: PII from this module's own makers (the formats the patterns
    were written for). ``source="oracle"``: PII from phonenumbers and Faker, see
    ``generate_oracle_corpus``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if source == "oracle":
        return generate_oracle_corpus(n, seed)
    if source != "internal":
        raise ValueError(f"source must be 'internal' or 'oracle', got {source!r}")
    r = random.Random(seed)
    return [_record(r) for _ in range(n)]


# --------------------------------------------------------------------------- oracle corpus
#
# The makers above are written by the same hands as PII_PATTERNS, so a corpus of theirs
# cannot find a format the patterns do not know. The oracle corpus takes its PII from
# libraries that know the world's formats: phone numbers from libphonenumber (the Python
# port ``phonenumbers``), emails, IBANs, card numbers and IP addresses from Faker's locales.
# Both are test and benchmark dependencies (setup.py's ``dev`` extra), imported here only.

# The 32 largest countries by population and the 30 largest economies (2024 estimates,
# overlapping), and more of Europe.
ORACLE_REGIONS: tuple[str, ...] = (
    # population
    "IN",
    "CN",
    "US",
    "ID",
    "PK",
    "NG",
    "BR",
    "BD",
    "RU",
    "ET",
    "MX",
    "JP",
    "EG",
    "PH",
    "CD",
    "VN",
    "IR",
    "TR",
    "DE",
    "TH",
    "TZ",
    "GB",
    "FR",
    "ZA",
    "IT",
    "KE",
    "MM",
    "CO",
    "KR",
    "SD",
    "UG",
    "ES",
    # economy (GDP), where not above
    "CA",
    "AU",
    "NL",
    "SA",
    "CH",
    "PL",
    "TW",
    "BE",
    "AR",
    "SE",
    "IE",
    "IL",
    "AE",
    "SG",
    "AT",
    "NO",
    # more of Europe
    "PT",
    "GR",
    "CZ",
    "RO",
    "HU",
    "DK",
    "FI",
)
ORACLE_PHONE_TYPES: tuple[str, ...] = ("FIXED_LINE", "MOBILE", "TOLL_FREE")
# "00": the international form with 00 for the + (0049 30 123456), as dialled from most of
# the world; "00 ": libphonenumber's own out-of-country form from Europe (00 49 30 123456).
ORACLE_PHONE_FORMATS: tuple[str, ...] = ("NATIONAL", "INTERNATIONAL", "E164", "00", "00 ")
# Faker locales for emails (names and free-mail domains differ by locale).
ORACLE_EMAIL_LOCALES: tuple[str, ...] = (
    "en_US",
    "en_GB",
    "en_IN",
    "en_AU",
    "en_CA",
    "en_IE",
    "en_NG",
    "en_PH",
    "en_PK",
    "en_KE",
    "de_DE",
    "de_AT",
    "de_CH",
    "fr_FR",
    "fr_CA",
    "fr_BE",
    "it_IT",
    "es_ES",
    "es_MX",
    "es_AR",
    "es_CO",
    "pt_BR",
    "pt_PT",
    "nl_NL",
    "nl_BE",
    "pl_PL",
    "cs_CZ",
    "sk_SK",
    "hu_HU",
    "ro_RO",
    "bg_BG",
    "el_GR",
    "tr_TR",
    "ru_RU",
    "uk_UA",
    "sv_SE",
    "da_DK",
    "no_NO",
    "fi_FI",
    "ja_JP",
    "ko_KR",
    "zh_CN",
    "zh_TW",
    "th_TH",
    "vi_VN",
    "id_ID",
    "hi_IN",
    "bn_BD",
    "fa_IR",
    "ar_EG",
    "ar_SA",
    "he_IL",
    "am_ET",
    "sw",
    "zu_ZA",
)
# Faker locales whose bank provider has its own IBAN country (the others fall back to GB).
# AR, BD, CO, PH and TH do not use IBANs; Faker makes IBAN-shaped account numbers for them.
ORACLE_IBAN_LOCALES: tuple[str, ...] = (
    "en_GB",
    "en_IE",
    "de_DE",
    "de_AT",
    "de_CH",
    "fr_FR",
    "it_IT",
    "es_ES",
    "pt_PT",
    "pt_BR",
    "nl_NL",
    "nl_BE",
    "pl_PL",
    "cs_CZ",
    "sk_SK",
    "da_DK",
    "fi_FI",
    "no_NO",
    "el_GR",
    "ro_RO",
    "tr_TR",
    "ru_RU",
    "uk_UA",
    "az_AZ",
    "fa_IR",
    "mk_MK",
    "es_AR",
    "bn_BD",
    "es_CO",
    "en_PH",
    "th_TH",
)
# Faker's credit card providers (card_type names of faker.providers.credit_card).
ORACLE_CARD_TYPES: tuple[str, ...] = (
    "maestro",
    "mastercard",
    "visa13",
    "visa16",
    "visa19",
    "amex",
    "discover",
    "diners",
    "jcb15",
    "jcb16",
)
ORACLE_NEGATIVE_KINDS = NEGATIVE_KINDS + ("postcode", "figure")


def oracle_phone_examples() -> list[tuple[str, str, str, str]]:
    """libphonenumber's own example number of every region, type and format, as (region, type, format, text).

    Regions without a number of a type (no toll-free example for ET, CD and IR) are left out.
    """
    import phonenumbers

    out = []
    for region in ORACLE_REGIONS:
        for type_name in ORACLE_PHONE_TYPES:
            number = phonenumbers.example_number_for_type(region, getattr(phonenumbers.PhoneNumberType, type_name))
            if number is None:
                continue
            for fmt in ORACLE_PHONE_FORMATS:
                out.append((region, type_name, fmt, _format_phone(number, fmt)))
    return out


def _format_phone(number, fmt: str) -> str:  # noqa: ANN001 (a phonenumbers.PhoneNumber)
    import phonenumbers

    if fmt in ("00", "00 "):
        return fmt + phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL)[1:]
    return phonenumbers.format_number(number, getattr(phonenumbers.PhoneNumberFormat, fmt))


_FAKERS: dict = {}  # locale -> Faker, reused across corpora (reseeded by each _Oracle)


class _Oracle:
    """Seeded makers of oracle PII values; the same seed gives the same values in the same order."""

    def __init__(self, seed: int) -> None:
        import phonenumbers
        from faker import Faker

        # Faker's en_PH iban() logs "purely hypothetical" on every call.
        logging.getLogger("faker.providers.bank.en_PH").setLevel(logging.ERROR)
        self.pn = phonenumbers
        self.r = random.Random(f"oracle-{seed}")
        self.fakers: dict[str, Faker] = {}
        for i, locale in enumerate(dict.fromkeys(ORACLE_EMAIL_LOCALES + ORACLE_IBAN_LOCALES)):
            if locale not in _FAKERS:  # building one takes ~30 ms; seeding it resets all its state
                _FAKERS[locale] = Faker(locale)
            self.fakers[locale] = _FAKERS[locale]
            self.fakers[locale].seed_instance(seed * 1000 + i)
        self.examples = []  # (region, type, example number)
        for region in ORACLE_REGIONS:
            for type_name in ORACLE_PHONE_TYPES:
                ptype = getattr(phonenumbers.PhoneNumberType, type_name)
                number = phonenumbers.example_number_for_type(region, ptype)
                if number is not None:
                    self.examples.append((region, ptype, number))
        self.deck: list[tuple[int, str]] = []
        self.passes = 0

    def phone(self, r: random.Random) -> str:
        """The next (region, type, format) of a shuffled deck of all of them: libphonenumber's
        example number on the first pass through the deck, then a random valid number of
        that region and type (the example with its last digits redrawn, kept only when
        libphonenumber calls it valid and of the same type)."""
        if not self.deck:
            self.deck = [(i, fmt) for i in range(len(self.examples)) for fmt in ORACLE_PHONE_FORMATS]
            self.r.shuffle(self.deck)
            self.passes += 1
        i, fmt = self.deck.pop()
        _, ptype, number = self.examples[i]
        if self.passes > 1:
            number = self._variant(number, ptype)
        return _format_phone(number, fmt)

    def _variant(self, example, ptype):  # noqa: ANN001
        pn = self.pn
        nsn = pn.national_significant_number(example)
        accepted = {ptype, pn.PhoneNumberType.FIXED_LINE_OR_MOBILE}
        for _ in range(30):
            k = self.r.randint(2, max(2, min(6, len(nsn) - 3)))
            candidate = nsn[:-k] + "".join(str(self.r.randrange(10)) for _ in range(k))
            number = pn.parse(f"+{example.country_code}{candidate}")
            if pn.is_valid_number(number) and pn.number_type(number) in accepted:
                return number
        return example

    def email(self, r: random.Random) -> str:
        fake = self.fakers[self.r.choice(ORACLE_EMAIL_LOCALES)]
        return self.r.choice((fake.email, fake.free_email, fake.company_email, fake.safe_email))()

    def iban(self, r: random.Random) -> str:
        """Faker's IBAN of a random locale, compact or in the printed blocks of four."""
        iban = self.fakers[self.r.choice(ORACLE_IBAN_LOCALES)].iban()
        if self.r.random() < 0.5:
            return iban
        return " ".join(iban[i : i + 4] for i in range(0, len(iban), 4))

    def card(self, r: random.Random) -> str:
        """Faker's number of a random card provider, plain or grouped as printed on the card
        (4-6-5 for 15 digits, 4-6-4 for 14, fours otherwise) by spaces or dashes."""
        number = self.fakers["en_US"].credit_card_number(self.r.choice(ORACLE_CARD_TYPES))
        sep = self.r.choice(("", "", " ", " ", "-"))
        if not sep:
            return number
        sizes = {15: (4, 6, 5), 14: (4, 6, 4)}.get(len(number), (4,) * 5)
        groups, pos = [], 0
        for size in sizes:
            if pos < len(number):
                groups.append(number[pos : pos + size])
                pos += size
        return sep.join(groups)

    def ipv4(self, r: random.Random) -> str:
        fake = self.fakers["en_US"]
        return self.r.choice((fake.ipv4, fake.ipv4_private, fake.ipv4_public))()

    def ipv6(self, r: random.Random) -> str:
        """Faker's IPv6 (compressed, lower case), sometimes written out in full or in upper case."""
        text = self.fakers["en_US"].ipv6()
        roll = self.r.random()
        if roll < 0.15:
            return ipaddress.IPv6Address(text).exploded
        return text.upper() if roll < 0.3 else text

    def makers(self) -> dict[str, Callable[[random.Random], str]]:
        return {
            "email": self.email,
            "phone": self.phone,
            "card": self.card,
            "iban": self.iban,
            "ipv4": self.ipv4,
            "ipv6": self.ipv6,
        }


_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)


def _oracle_negative(r: random.Random, kind: str) -> str:
    """The hard negatives of the oracle corpus: those of ``_negative`` and more numbers a wide
    phone pattern could take (dates and times in many formats, prices with thousands
    separators, sizes, ranks, year ranges, postcodes)."""
    d = lambda n: _digits(r, n)  # noqa: E731
    if kind == "date" and r.random() < 0.7:
        y, m, day = r.randrange(2019, 2028), r.randrange(1, 13), r.randrange(1, 29)
        month, h, mi = _MONTHS[m - 1], r.randrange(24), r.randrange(60)
        return r.choice(
            (
                f"{y}-{m:02d}-{day:02d}",
                f"{day:02d}/{m:02d}/{y}",
                f"{m:02d}/{day:02d}/{y}",
                f"{m}/{day}/{y}",
                f"{day}.{m}.{y}",
                f"{day:02d}.{m:02d}.{y}",
                f"{day:02d}-{m:02d}-{y}",
                f"{y}/{m:02d}/{day:02d}",
                f"{y}.{m:02d}.{day:02d}",
                f"{day:02d}.{m:02d}.{y % 100:02d}",
                f"{m}/{day}/{y % 100:02d}",
                f"{day}/{m}/{y % 100:02d}",
                f"{y}{m:02d}{day:02d}",
                f"{day} {month[:3]} {y}",
                f"{month} {day}, {y}",
                f"{day}. {month} {y}",
                f"{y}-{m:02d}-{day:02d}T{h:02d}:{mi:02d}:00Z",
                f"{y}-{m:02d}-{day:02d} {h:02d}:{mi:02d}",
                f"{day:02d}.{m:02d}.{y} {h:02d}:{mi:02d}",
                f"{y}年{m}月{day}日",
                f"{month[:3]} {y}",
                f"{m:02d}/{y}",
                f"{day:02d} {m:02d} {y}",
            )
        )
    if kind == "time" and r.random() < 0.7:
        h, mi = r.randrange(24), r.randrange(60)
        return r.choice(
            (
                f"{h:02d}:{mi:02d}",
                f"{h % 12 + 1}:{mi:02d} PM",
                f"{h:02d}h{mi:02d}",
                f"{h:02d}.{mi:02d} Uhr",
                f"{h % 12 + 1}am",
                f"{h:02d}:{mi:02d}–{(h + 2) % 24:02d}:{mi:02d}",
                f"{h:02d}:{mi:02d} - {(h + 1) % 24:02d}:{mi:02d}",
                f"{h:02d}:{mi:02d}:{r.randrange(60):02d}.{d(3)}",
            )
        )
    if kind == "price" and r.random() < 0.6:
        whole, cents = r.randrange(1000, 100000), r.randrange(100)
        return r.choice(
            (
                f"{whole:,} €".replace(",", " "),
                f"{whole:,}".replace(",", " ") + f",{cents:02d} €",
                f"R$ {whole:,}".replace(",", ".") + f",{cents:02d}",
                f"₹{whole:,}",
                f"¥{whole:,}",
                f"{whole:,} ₽".replace(",", " "),
                f"CHF {whole:,}.{cents:02d}".replace(",", "'"),
                f"{r.randrange(1, 100)}.{d(3)}.000 ₫",
                f"{r.randrange(1, 10)} {d(3)} {d(3)} Ft",
                f"{whole:,}.{cents:02d} USD",
            )
        )
    if kind == "figure":
        y = r.randrange(2000, 2025)
        return r.choice(
            (
                f"size {r.choice((38, 40, 42))} {r.choice((44, 46))} {r.choice((48, 50))}",
                f"ranked {r.randrange(1, 10)} of {r.randrange(100, 1000)}",
                f"{y}-{y + r.randrange(1, 10)}",
                f"{y}/{(y + 1) % 100:02d}",
                f"{r.choice((1000, 1500, 2000))}-{r.choice((3000, 4000, 6000))} rpm",
                f"pages {r.randrange(10, 200)}-{r.randrange(200, 400)}",
                f"sizes {r.randrange(30, 40)}-{r.randrange(40, 48)}",
                f"{r.randrange(2, 10)} for {r.randrange(10, 100)}",
                f"{r.randrange(100, 999)} reviews",
                f"top {r.choice((5, 10, 50))} of {y}",
                f"{r.randrange(1, 5)} {r.randrange(5, 9)} {r.randrange(9, 13)} months",
            )
        )
    if kind == "postcode":
        return r.choice(
            (
                "10115 Berlin",
                "SW1A 1AA",
                "EC1A 1BB",
                f"{r.randrange(75001, 75021)} Paris",
                f"{r.randrange(10000, 99999)}-{d(4)}",
                f"0{r.randrange(1000, 9999)}-{d(3)}",
                f"{r.randrange(100, 999)}-{d(4)}",
                f"{r.randrange(10, 99)}-{d(3)} Warszawa",
                f"{r.randrange(1010, 1240, 10)} Wien",
                f"{r.randrange(110001, 855999)}",
                "M5V 3L9",
                f"{r.randrange(100, 999)} {d(2)} Stockholm",
                f"{r.randrange(1000, 9999)} AB Amsterdam",
                "D02 X285",
                f"{r.randrange(28001, 28080)} Madrid",
            )
        )
    return _negative(r, kind)


_ORACLE_PII_CONTEXTS = {
    k: v
    + {
        "email": ("schreib mir an {}", "mon adresse: {}", "mi correo es {}"),
        "phone": ("ruf mich an unter {}", "appelez-moi au {}", "llámame al {}", "Tel.: {}", "bel {} na 18 uur"),
        "card": ("Karte {} belastet", "carte {} débitée", "charged to {} twice"),
        "iban": ("Überweisung an {}", "virement sur {}", "IBAN {} please"),
        "ipv4": ("blocked IP {}", "gateway {} unreachable"),
        "ipv6": ("blocked IP {}", "gateway {} unreachable"),
    }[k]
    for k, v in _PII_CONTEXTS.items()
}
_ORACLE_NEGATIVE_CONTEXTS: dict[str, tuple[str, ...]] = {
    **_NEGATIVE_CONTEXTS,
    "postcode": ("ship to {}", "store in {}", "deliver to {} please", "postcode {}"),
    "figure": ("{}", "my kids wear {}", "{} was fine", "{} on the list"),
}


def _oracle_source(seed: int) -> _Source:
    return _Source(
        _Oracle(seed).makers(), _oracle_negative, ORACLE_NEGATIVE_KINDS, _ORACLE_PII_CONTEXTS, _ORACLE_NEGATIVE_CONTEXTS
    )


def generate_oracle_corpus(n: int, seed: int) -> list[PiiRecord]:
    """``n`` labelled texts like ``generate_corpus``'s, with PII from independent libraries.

    Phones: libphonenumber's numbers of FIXED_LINE, MOBILE and TOLL_FREE type of every
    region in ``ORACLE_REGIONS``, formatted NATIONAL, INTERNATIONAL, E164 and with 00 for
    the + (``_Oracle.phone``: each region, type and format once before any repeats, the
    examples first). Emails, IBANs, cards, IPv4 and IPv6: Faker, of the locales and card
    providers listed above. Hard negatives: ``_oracle_negative``. Needs phonenumbers and
    Faker (the ``dev`` extra); Faker is seeded, so the same (n, seed) gives the same records.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    source = _oracle_source(seed)
    r = random.Random(seed)
    return [_record(r, source) for _ in range(n)]


def oracle_records(values: Sequence[tuple[str, str]], seed: int = 0) -> list[PiiRecord]:
    """One labelled text per (PII type, value), with the oracle corpus's contexts and hard negatives."""
    source = _oracle_source(seed)
    r = random.Random(seed)
    return [_record(r, source, planted=value) for value in values]


# --------------------------------------------------------------------------- scoring


@dataclass
class TypeScore:
    """Recall counts of one PII type."""

    planted: int = 0
    masked: int = 0  # every character of the span replaced
    masked_as_type: int = 0  # ... and only by this type's placeholder

    @property
    def recall(self) -> float | None:
        return self.masked / self.planted if self.planted else None


@dataclass
class PlaceholderScore:
    """Precision counts of one placeholder."""

    emitted: int = 0
    true_positive: int = 0
    neither: int = 0  # replaced only a Luhn-invalid card-like number

    @property
    def false_positive(self) -> int:
        return self.emitted - self.true_positive - self.neither

    @property
    def precision(self) -> float | None:
        counted = self.emitted - self.neither
        return self.true_positive / counted if counted else None


@dataclass
class ScrubberScore:
    """Per-type recall, per-placeholder precision and hard-negative retention of one scrubber run."""

    records: int = 0
    unaligned: int = 0  # outputs that are not the input with ranges replaced by placeholders
    types: dict[str, TypeScore] = field(default_factory=lambda: {t: TypeScore() for t in PII_TYPES})
    placeholders: dict[str, PlaceholderScore] = field(
        default_factory=lambda: {p: PlaceholderScore() for p in dict.fromkeys(PLACEHOLDERS.values())}
    )
    # kind -> [total, kept]
    negatives: dict[str, list[int]] = field(default_factory=lambda: {k: [0, 0] for k in ORACLE_NEGATIVE_KINDS})
    luhn_invalid: list[int] = field(default_factory=lambda: [0, 0])  # [total, masked]
    misses: list[tuple[str, str, str]] = field(default_factory=list)  # (type, value, output) examples
    damaged: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, value, output) examples
    false_positives: list[tuple[str, str, str]] = field(default_factory=list)  # (placeholder, replaced, text)

    @property
    def negative_retention(self) -> float | None:
        """Share of hard negatives no placeholder touched."""
        total = sum(t for t, _ in self.negatives.values())
        return sum(k for _, k in self.negatives.values()) / total if total else None

    def recall(self, pii_type: str) -> float | None:
        """Share of planted values of ``pii_type`` masked completely (None when none planted)."""
        return self.types[pii_type].recall

    def precision(self, pii_type: str) -> float | None:
        """Precision of the placeholder ``pii_type`` is replaced by (ipv4 and ipv6 share ``<ip>``)."""
        return self.placeholders[PLACEHOLDERS[pii_type]].precision

    def meets_goals(self, recall_goal: float = RECALL_GOAL, retention_goal: float = RETENTION_GOAL) -> bool:
        """Recall >= ``recall_goal`` for every planted type and retention >= ``retention_goal``."""
        recalls = [s.recall for s in self.types.values() if s.planted and s.recall is not None]
        retention = self.negative_retention
        return bool(recalls) and min(recalls) >= recall_goal and retention is not None and retention >= retention_goal

    def markdown(self) -> str:
        """The result as a markdown table plus summary lines."""
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        lines = [
            "| type | placeholder | planted | recall | masked as own type | precision (placeholder) |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for t, s in self.types.items():
            own = s.masked_as_type / s.planted if s.planted else None
            lines.append(
                f"| {t} | `{PLACEHOLDERS[t]}` | {s.planted:,d} | {fmt(s.recall)} | {fmt(own)} | "
                f"{fmt(self.precision(t))} |"
            )
        total = sum(t for t, _ in self.negatives.values())
        kept = sum(k for _, k in self.negatives.values())
        lines += [
            "",
            f"hard negatives kept verbatim: {kept:,d} / {total:,d} = {fmt(self.negative_retention)} "
            f"(goal >= {RETENTION_GOAL})",
            "by kind: "
            + ", ".join(
                f"{k} {fmt(kk / t if t else None)} ({t:,d})"
                for k, (t, kk) in self.negatives.items()
                if t or k in NEGATIVE_KINDS
            ),
            "placeholders emitted: "
            + ", ".join(
                f"`{p}` {s.emitted:,d} ({s.false_positive:,d} false positive)" for p, s in self.placeholders.items()
            ),
            f"Luhn-invalid card-like numbers masked (counted as neither): {self.luhn_invalid[1]:,d} / "
            f"{self.luhn_invalid[0]:,d}",
            f"records: {self.records:,d}, unaligned outputs: {self.unaligned:,d}; "
            f"goals (recall >= {RECALL_GOAL} per type, retention >= {RETENTION_GOAL}): "
            f"{'met' if self.meets_goals() else 'NOT met'}",
        ]
        return "\n".join(lines)


def replaced_ranges(text: str, scrubbed: str) -> list[tuple[int, int, str]] | None:
    """The (start, end, placeholder) ranges of ``text`` that ``scrubbed`` replaced by placeholders.

    None when ``scrubbed`` is not ``text`` with non-empty ranges replaced by placeholders.
    Where a literal piece of the output also occurs inside a replaced range the split is
    ambiguous; the leftmost shortest one is taken (the corpus keeps values apart by words).
    """
    pieces = _PLACEHOLDER_RE.split(scrubbed)
    literals, placeholders = pieces[0::2], pieces[1::2]
    pattern = re.escape(literals[0]) + "".join(f"(.+?){re.escape(lit)}" for lit in literals[1:])
    match = re.fullmatch(pattern, text, flags=re.DOTALL)
    if match is None:
        return None
    return [(match.start(i + 1), match.end(i + 1), p) for i, p in enumerate(placeholders)]


def _covered(start: int, end: int, ranges: Sequence[tuple[int, int, str]], placeholder: str | None = None) -> bool:
    pos = start
    for r_start, r_end, p in sorted(ranges):
        if r_start <= pos < r_end and (placeholder is None or p == placeholder):
            pos = r_end
    return pos >= end


def _score_record(score: ScrubberScore, record: PiiRecord, scrubbed: str | None) -> None:
    score.records += 1
    scrubbed = "" if scrubbed is None else scrubbed
    ranges = replaced_ranges(record.text, scrubbed)
    if ranges is None:
        # Fallback for a scrubber that rewrote more than PII: the brief test of the value
        # being gone and some placeholder present; every placeholder counts as a false positive.
        score.unaligned += 1
        has_placeholder = bool(_PLACEHOLDER_RE.search(scrubbed))
        for span in record.pii:
            s = score.types[span.kind]
            s.planted += 1
            s.masked += span.value not in scrubbed and has_placeholder
        for p in _PLACEHOLDER_RE.findall(scrubbed):
            score.placeholders[p].emitted += 1
        for span in record.negatives:
            score.negatives[span.kind][0] += 1
            score.negatives[span.kind][1] += span.value in scrubbed
        for span in record.ignored:
            score.luhn_invalid[0] += 1
            score.luhn_invalid[1] += span.value not in scrubbed
        return
    for span in record.pii:
        s = score.types[span.kind]
        s.planted += 1
        if _covered(span.start, span.end, ranges):
            s.masked += 1
            s.masked_as_type += _covered(span.start, span.end, ranges, PLACEHOLDERS[span.kind])
        elif len(score.misses) < 20:
            score.misses.append((span.kind, span.value, scrubbed))
    for r_start, r_end, placeholder in ranges:
        p = score.placeholders[placeholder]
        p.emitted += 1
        if any(
            span.start <= r_start and r_end <= span.end and PLACEHOLDERS[span.kind] == placeholder
            for span in record.pii
        ):
            p.true_positive += 1
        elif any(span.start <= r_start and r_end <= span.end for span in record.ignored):
            p.neither += 1
        elif len(score.false_positives) < 20:
            score.false_positives.append((placeholder, record.text[r_start:r_end], record.text))
    for span in record.negatives:
        kept = not any(r_start < span.end and span.start < r_end for r_start, r_end, _ in ranges)
        score.negatives[span.kind][0] += 1
        score.negatives[span.kind][1] += kept
        if not kept and len(score.damaged) < 20:
            score.damaged.append((span.kind, span.value, scrubbed))
    for span in record.ignored:
        score.luhn_invalid[0] += 1
        score.luhn_invalid[1] += _covered(span.start, span.end, ranges)


def score_scrubber(
    spark: "SparkSession", records: Sequence[PiiRecord], scrubber: Callable[[Column], Column] = scrub_pii
) -> ScrubberScore:
    """Run ``scrubber`` (default ``scrub_pii``) over the corpus texts in one Spark job and score it.

    The corpus is synthetic and small, so its scrubbed texts come back to the driver
    for scoring; this is an evaluation tool, not a pipeline transform.
    """
    df = spark.createDataFrame([(i, rec.text) for i, rec in enumerate(records)], "id int, text string")
    rows = df.select("id", scrubber(F.col("text")).alias("scrubbed")).collect()
    scrubbed = {row.id: row.scrubbed for row in rows}
    score = ScrubberScore()
    for i, record in enumerate(records):
        _score_record(score, record, scrubbed.get(i))
    return score
