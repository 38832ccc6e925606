"""Deterministic synthetic e-commerce logs, generated in parallel on Spark.

``generate_sample`` writes two datasets under ``out_dir``:

* ``events/event_date=YYYY-MM-DD/part-*.txt``: raw JSON event lines, one event
  per line, with a small fraction of malformed lines and PII in free text;
* ``items/part-*.txt``: the item catalog as JSON lines.

Every user's whole history is generated from its own random stream
``numpy.random.default_rng([seed, user_index])``, so the same seed gives the
same set of lines however the users are partitioned. The generative story and
the signal that later stages are meant to learn are described in
``docs/sample-data.md``.

Rule of thumb for sizing: about ``100 * users * days / 30`` raw lines.
"""

from __future__ import annotations

import bisect
import datetime
import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from pyspark.sql import SparkSession

__all__ = [
    "CATEGORIES",
    "CONSIDERED_CATEGORIES",
    "IMPULSE_CATEGORIES",
    "EVENT_TYPES",
    "MALFORMED_KINDS",
    "SampleSpec",
    "SampleSummary",
    "generate_sample",
    "generate_user_lines",
    "generate_user_truth",
    "build_catalog",
    "luhn_valid",
]


# --------------------------------------------------------------------------
# Public specification and result
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleSpec:
    """What to generate: population size, window, seed and noise levels."""

    users: int = 1000
    days: int = 30
    seed: int = 7
    start_date: datetime.date = datetime.date(2026, 10, 1)
    items: int = 400
    malformed_fraction: float = 0.01  # fraction of raw lines made malformed
    pii_fraction: float = 0.05  # fraction of free texts (queries, reviews) carrying PII

    def validate(self) -> None:
        """Raise ``ValueError`` if the spec cannot be generated."""
        if self.users < 1:
            raise ValueError(f"users must be >= 1, got {self.users}")
        if self.days < 1:
            raise ValueError(f"days must be >= 1, got {self.days}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.items < len(CATEGORIES):
            raise ValueError(f"items must be >= {len(CATEGORIES)} (one per category), got {self.items}")
        for name in ("malformed_fraction", "pii_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")

    @property
    def end_date(self) -> datetime.date:
        """Last day of the window (inclusive)."""
        return self.start_date + datetime.timedelta(days=self.days - 1)


@dataclass(frozen=True)
class SampleSummary:
    """Where the sample was written and how much of it there is."""

    events_dir: str
    items_dir: str
    lines_written: int  # raw event lines, malformed and duplicates included
    items_written: int
    first_date: datetime.date
    last_date: datetime.date


# --------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------

EVENT_TYPES: tuple[str, ...] = ("view", "click", "search", "add_to_cart", "purchase", "review")

MALFORMED_KINDS: tuple[str, ...] = (
    "broken_json",
    "missing_user_id",
    "bad_timestamp",
    "negative_price",
    "unknown_event_type",
    "duplicate",
)


@dataclass(frozen=True)
class _Category:
    nouns: tuple[str, ...]
    adjectives: tuple[str, ...]
    brands: tuple[str, ...]
    uses: tuple[str, ...]
    median_price: float
    price_sigma: float
    cart_p: float  # P(add_to_cart | session with views)
    buy_p: float  # P(purchase in the same session | cart), at the median price
    return_p: float  # P(an abandoned cart comes back as a purchase 1-6 days later)
    max_quantity: int


_CATS: dict[str, _Category] = {
    "electronics": _Category(
        nouns=(
            "Headphones",
            "Earbuds",
            "Speaker",
            "Smartwatch",
            "Tablet",
            "Charger",
            "Webcam",
            "Keyboard",
            "Monitor",
            "Router",
        ),
        adjectives=("Wireless", "Noise-Cancelling", "Portable", "Ultra", "Smart", "Compact", "Pro"),
        brands=("Voltix", "Sonara", "Pixelon", "Arcwave", "Nexa"),
        uses=("working from home", "gaming", "travel", "streaming", "the office"),
        median_price=89.0,
        price_sigma=0.8,
        cart_p=0.20,
        buy_p=0.18,
        return_p=0.85,
        max_quantity=1,
    ),
    "books": _Category(
        nouns=("Novel", "Cookbook", "Biography", "Thriller", "Atlas", "Guide", "Anthology", "Memoir", "Workbook"),
        adjectives=("Illustrated", "Collected", "Complete", "Pocket", "Annotated", "Bestselling"),
        brands=("Quill House", "Northbound Press", "Lantern Books", "Papyrus & Co"),
        uses=("a long weekend", "the commute", "book clubs", "students", "beginners"),
        median_price=14.0,
        price_sigma=0.4,
        cart_p=0.25,
        buy_p=0.45,
        return_p=0.0,
        max_quantity=2,
    ),
    "outdoor": _Category(
        nouns=(
            "Tent",
            "Backpack",
            "Sleeping Bag",
            "Headlamp",
            "Trail Runner",
            "Rain Jacket",
            "Water Filter",
            "Trekking Poles",
            "Camp Stove",
        ),
        adjectives=("Ultralight", "Waterproof", "Alpine", "Trail", "Rugged", "All-Season"),
        brands=("Ridgeline", "Summitco", "Wildpath", "Northfell", "Cairn"),
        uses=("weekend hikes", "backpacking", "camping", "trail running", "rainy days"),
        median_price=70.0,
        price_sigma=0.7,
        cart_p=0.20,
        buy_p=0.20,
        return_p=0.80,
        max_quantity=1,
    ),
    "beauty": _Category(
        nouns=("Serum", "Moisturizer", "Lipstick", "Shampoo", "Face Mask", "Sunscreen", "Cleanser", "Perfume"),
        adjectives=("Hydrating", "Organic", "Matte", "Gentle", "Radiant", "Vitamin C"),
        brands=("Lumea", "Petalis", "Glowra", "Verdance"),
        uses=("dry skin", "daily use", "sensitive skin", "evenings", "summer"),
        median_price=18.0,
        price_sigma=0.5,
        cart_p=0.28,
        buy_p=0.48,
        return_p=0.0,
        max_quantity=3,
    ),
    "home": _Category(
        nouns=(
            "Sofa Throw",
            "Table Lamp",
            "Cookware Set",
            "Vacuum",
            "Blender",
            "Rug",
            "Bookshelf",
            "Duvet",
            "Coffee Maker",
        ),
        adjectives=("Modern", "Cozy", "Minimalist", "Stainless", "Handwoven", "Cordless"),
        brands=("Hearthly", "Casaloom", "Nordhus", "Kettlewick"),
        uses=("small apartments", "the living room", "family dinners", "cold nights"),
        median_price=55.0,
        price_sigma=0.8,
        cart_p=0.18,
        buy_p=0.20,
        return_p=0.75,
        max_quantity=1,
    ),
    "toys": _Category(
        nouns=("Building Set", "Puzzle", "Plush Bear", "Board Game", "Race Car", "Doll House", "Robot Kit", "Kite"),
        adjectives=("Colorful", "Educational", "Giant", "Mini", "Remote-Control", "Wooden"),
        brands=("Playwise", "Tinkerly", "Bricktown", "Funfolk"),
        uses=("ages 6 and up", "family game night", "toddlers", "rainy afternoons"),
        median_price=25.0,
        price_sigma=0.6,
        cart_p=0.24,
        buy_p=0.42,
        return_p=0.0,
        max_quantity=2,
    ),
    "grocery": _Category(
        nouns=("Coffee Beans", "Olive Oil", "Granola", "Green Tea", "Pasta", "Dark Chocolate", "Honey", "Trail Mix"),
        adjectives=("Organic", "Fair-Trade", "Whole Grain", "Roasted", "Gluten-Free", "Family Size"),
        brands=("Harvest Lane", "Greenfield", "Mill & Stone", "Sunny Acres"),
        uses=("breakfast", "snacking", "the pantry", "busy weeknights"),
        median_price=8.0,
        price_sigma=0.45,
        cart_p=0.30,
        buy_p=0.55,
        return_p=0.0,
        max_quantity=4,
    ),
    "fashion": _Category(
        nouns=("Sneakers", "Denim Jacket", "Sweater", "Dress", "Scarf", "Boots", "Handbag", "Sunglasses"),
        adjectives=("Classic", "Slim-Fit", "Vintage", "Oversized", "Linen", "Leather"),
        brands=("Marlowe", "Threadline", "Vela", "Oaken"),
        uses=("everyday wear", "the office", "weekends", "autumn"),
        median_price=45.0,
        price_sigma=0.6,
        cart_p=0.22,
        buy_p=0.24,
        return_p=0.60,
        max_quantity=1,
    ),
    "sports": _Category(
        nouns=(
            "Yoga Mat",
            "Dumbbells",
            "Running Shoes",
            "Bike Helmet",
            "Tennis Racket",
            "Resistance Bands",
            "Football",
            "Fitness Tracker",
        ),
        adjectives=("Pro", "Adjustable", "Lightweight", "Non-Slip", "Performance", "Carbon"),
        brands=("Stridewell", "Apexa", "Kinetiq", "Fieldmark"),
        uses=("home workouts", "marathon training", "the gym", "beginners"),
        median_price=40.0,
        price_sigma=0.7,
        cart_p=0.20,
        buy_p=0.22,
        return_p=0.80,
        max_quantity=1,
    ),
    "music": _Category(
        nouns=("Vinyl Record", "Guitar Strings", "Ukulele", "Microphone", "Drum Sticks", "Songbook", "Metronome"),
        adjectives=("Deluxe", "Acoustic", "Remastered", "Studio", "Beginner", "Limited"),
        brands=("Tonehouse", "Reverbia", "Cadenza", "Groovewell"),
        uses=("practice", "home recording", "collectors", "beginners"),
        median_price=22.0,
        price_sigma=0.6,
        cart_p=0.24,
        buy_p=0.42,
        return_p=0.0,
        max_quantity=2,
    ),
    "garden": _Category(
        nouns=(
            "Hose",
            "Planter",
            "Pruning Shears",
            "Seed Kit",
            "Lawn Mower",
            "Bird Feeder",
            "Compost Bin",
            "Garden Gloves",
        ),
        adjectives=("Heavy-Duty", "Expandable", "Raised", "Solar", "Ergonomic", "Weatherproof"),
        brands=("Greenthumb", "Rootwell", "Bloomfield", "Yardly"),
        uses=("small balconies", "vegetable beds", "spring planting", "large lawns"),
        median_price=35.0,
        price_sigma=0.8,
        cart_p=0.20,
        buy_p=0.24,
        return_p=0.70,
        max_quantity=2,
    ),
    "pets": _Category(
        nouns=(
            "Dog Food",
            "Cat Litter",
            "Chew Toy",
            "Pet Bed",
            "Leash",
            "Scratching Post",
            "Aquarium Filter",
            "Treats",
        ),
        adjectives=("Grain-Free", "Orthopedic", "Durable", "Natural", "Clumping", "Reflective"),
        brands=("Pawsome", "Whiskerly", "Tailwag", "Furbridge"),
        uses=("puppies", "senior cats", "large dogs", "daily walks"),
        median_price=20.0,
        price_sigma=0.6,
        cart_p=0.28,
        buy_p=0.48,
        return_p=0.0,
        max_quantity=3,
    ),
}

CATEGORIES: tuple[str, ...] = tuple(_CATS)
CONSIDERED_CATEGORIES: tuple[str, ...] = tuple(c for c in CATEGORIES if _CATS[c].return_p > 0)
IMPULSE_CATEGORIES: tuple[str, ...] = tuple(c for c in CATEGORIES if _CATS[c].return_p == 0)

# Zipf-like popularity of categories as a user's primary interest (rank = order above).
_CAT_WEIGHTS = np.array([1.0 / (r + 1) ** 0.9 for r in range(len(CATEGORIES))])
_CAT_WEIGHTS /= _CAT_WEIGHTS.sum()

_FIRST_NAMES = (
    "jane",
    "john",
    "maria",
    "li",
    "ahmed",
    "sofia",
    "lukas",
    "emma",
    "noah",
    "olivia",
    "mateo",
    "aiko",
    "priya",
    "omar",
    "chloe",
    "ivan",
)
_LAST_NAMES = (
    "doe",
    "smith",
    "garcia",
    "chen",
    "khan",
    "rossi",
    "muller",
    "brown",
    "tanaka",
    "patel",
    "silva",
    "novak",
    "kim",
    "dubois",
)
_EMAIL_DOMAINS = ("example.com", "example.org", "mail.example.net", "example.co.uk")

_REVIEWS: dict[int, tuple[str, ...]] = {
    5: (
        "Absolutely love this {noun}, exceeded my expectations.",
        "Five stars, the {noun} is perfect and arrived early.",
        "Great quality {noun}, would buy again.",
        "Exactly as described, really happy with it.",
    ),
    4: (
        "Good value for the price, the {noun} works well.",
        "Solid {noun}, minor issues with the packaging.",
        "Pretty good overall, would recommend.",
        "Nice {noun}, a bit smaller than expected.",
    ),
    3: (
        "It's okay, the {noun} does the job.",
        "Average quality, nothing special.",
        "Mixed feelings about this {noun}.",
        "Fine for the price but I expected more.",
    ),
    # a low rating without a problem with the order: taste, fit, the buyer's own mistake (no churn follows)
    2: (
        "Not really my style, the {noun} is fine otherwise.",
        "Smaller than I thought, my fault for not checking the size.",
        "The {noun} works, but I prefer my old one.",
        "Meh. The colour of the {noun} is not what I hoped for.",
    ),
    1: (
        "Not for me, the {noun} is too basic for what I need.",
        "Ordered the wrong {noun} by mistake, it does not fit my setup.",
        "My kids did not like the {noun} at all.",
        "Too complicated for me, the {noun} is not for beginners.",
    ),
}

# Dissatisfaction with the order, in words (docs/sample-data.md, "Dissatisfaction in words"): a purchase with a
# problem gets a complaint whose rating does not always show it (a 3-star angry review), and the user's
# activity then fades over one to three weeks. Several families and paraphrases, so no single word gives it away.
_COMPLAINTS: tuple[str, ...] = (
    "The {noun} broke after two days.",
    "Fell apart the first time I used the {noun}.",
    "The zip on the {noun} snapped within a week.",
    "{noun} stopped working after a few uses, cheap plastic.",
    "Arrived two weeks late and nobody told me why.",
    "Delivery was a nightmare, the parcel sat in a depot for ten days.",
    "The courier lost my {noun} and I had to chase them for days.",
    "Box was crushed and the {noun} inside was scratched.",
    "Support never answered my emails about the {noun}.",
    "Asked for a refund three times, still no reply.",
    "They sent the wrong {noun} and want me to pay for the return.",
    "The {noun} itself is ok but the service was awful, waited weeks.",
    "Not what the photos show, feels like a knock-off.",
    "Charged twice for one {noun}, still sorting it out with my bank.",
)
_COMPLAINT_ENDINGS: tuple[str, ...] = (
    "",
    "",
    "",
    " Never again.",
    " Won't be ordering here anymore.",
    " Done with this shop.",
    " Very disappointed.",
    " I expected better from this store.",
)
_COMPLAINT_RATINGS = (0.3, 0.3, 0.25, 0.15)  # P(1, 2, 3, 4 stars | complaint)

# Intent in words (docs/sample-data.md, "Intent in words"): a need the user states in a search before buying for
# it in the category named here; the phrases never name the category's products, and vary (several paraphrases
# per intent, typos, some in Chinese).
_INTENTS: dict[str, tuple[str, ...]] = {
    "outdoor": (
        "gift for my dad",
        "present for my father, he loves hiking",
        "what to get dad for his birthday",
        "fathers day gift ideas",
        "dad is retiring and wants to go camping",
        "gift for a dad who walks a lot",
        "给爸爸的生日礼物",
    ),
    "pets": (
        "for our new puppy",
        "puppy essentials",
        "we just adopted a dog",
        "first week with a rescue dog",
        "things a new puppy needs",
        "kitten starter kit",
        "刚养了一只小狗",
    ),
    "home": (
        "moving into a flat",
        "first apartment essentials",
        "just moved house, need everything",
        "furnishing my new place",
        "setting up a studio apartment",
        "new flat on a budget",
        "搬新家需要买什么",
    ),
    "toys": (
        "baby shower gift",
        "present for my nephew turning 3",
        "birthday gift for a toddler",
        "something fun for the kids this weekend",
        "gift for a 1 year old",
        "my niece's birthday next week",
        "送给小朋友的礼物",
    ),
    "sports": (
        "training for my first marathon",
        "couch to 5k plan",
        "getting back in shape",
        "half marathon prep",
        "joined a gym last week",
        "new year fitness goals",
        "开始健身需要什么",
    ),
    "garden": (
        "starting a vegetable patch",
        "backyard makeover",
        "growing tomatoes this spring",
        "balcony plants for beginners",
        "our lawn is a mess",
        "herbs on the windowsill",
        "想在阳台种菜",
    ),
    "books": (
        "reading list for exam prep",
        "learning spanish this year",
        "book club pick for next month",
        "studying for my finals",
        "want to read more this year",
        "gift for a bookworm",
        "考试复习资料",
    ),
    "beauty": (
        "skincare routine for dry skin",
        "wedding next month, need to look good",
        "my skin is so dry lately",
        "self care sunday",
        "gift for my wife who loves skincare",
        "getting ready for a big date",
        "冬天皮肤很干怎么办",
    ),
}
_INTENT_EPISODES = 1.5  # mean intent episodes per user per 30 days (Poisson)
_INTENT_BUY_P = 0.75  # P(the need is bought for in the intent's category, 1-8 days later)
_INTENT_BUY_DAYS = (1, 8)
_TYPO_P = 0.15  # P(a typo in an intent phrase or complaint)

_PII_TEMPLATES_QUERY = ("{q} {pii}", "{pii} {q}", "{q} contact {pii}", "order status {pii}")
_PII_TEMPLATES_REVIEW = (
    "{text} Contact me at {pii}.",
    "{text} My details: {pii}",
    "{pii} - {text}",
    "{text} (paid with {pii})",
)

_BAD_TIMESTAMPS = ("not-a-time", "2026-13-45T99:00:00Z", "yesterday", "", "31/02/2026 25:61")
_UNKNOWN_EVENT_TYPES = ("hover", "scroll", "wishlist_add", "impression")

# Hour-of-day profile of session starts: quiet nights, lunch and evening peaks.
_HOUR_WEIGHTS = np.array(
    [
        1,
        0.6,
        0.4,
        0.3,
        0.3,
        0.5,
        1.2,
        2.2,
        3.0,
        3.2,
        3.4,
        3.8,
        4.5,
        4.2,
        3.6,
        3.5,
        3.7,
        4.2,
        5.2,
        6.2,
        6.8,
        6.0,
        4.0,
        2.2,
    ]
)
_HOUR_CDF = (np.cumsum(_HOUR_WEIGHTS) / _HOUR_WEIGHTS.sum()).tolist()

# Base session rate: mean sessions per active user-day, tuned so that a sample has
# about 100 raw lines per user per 30 days (see docs/sample-data.md).
_MEAN_SESSION_RATE = 1.12
_RETURN_DAYS = (1, 6)  # an abandoned considered cart comes back 1..6 days later
_REVIEW_P = 0.2
_COMPLAINT_REVIEW_P = 0.7  # P(a complaint | the purchase had a problem), written 1-4 days later
_FADE_P = 0.8  # P(activity fades after a complaint)
_UNHAPPY_CHURN_P = 0.7  # P(a churning user leaves unhappy: complains, then fades instead of stopping)
_UNHAPPY_LEAD_DAYS = (2, 8)  # the complaint comes this many days before the churn day
_FADE_TAU_DAYS = (2.0, 5.0)  # activity x exp(-days since the complaint / tau): mostly gone in 1-2 weeks


_dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode  # byte-stable JSON


# --------------------------------------------------------------------------
# Items catalog
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Catalog:
    """Item catalog plus the per-category arrays the event generator needs."""

    records: tuple[dict[str, Any], ...]
    item_ids: tuple[str, ...]
    categories: tuple[str, ...]
    prices: tuple[float, ...]
    nouns: tuple[str, ...]
    quality: tuple[float, ...]  # latent, not written: shifts review ratings
    by_category: dict[str, np.ndarray]  # category -> item indices
    log_prices: np.ndarray
    popularity: np.ndarray
    log_medians: np.ndarray  # per item: log of its category's median price
    price_sigmas: np.ndarray  # per item: its category's log-price sigma


def build_catalog(spec: SampleSpec) -> _Catalog:
    """Generate the item catalog on the driver (deterministic in ``spec.seed``)."""
    spec.validate()
    # Three non-zero words: can never coincide with a user's [seed, i] stream.
    rng = np.random.default_rng([spec.seed, 0x5EED, 0xCA7A1096])
    n = spec.items
    # Every category gets items; the rest are spread in a seeded random order.
    cat_idx = np.concatenate([np.arange(len(CATEGORIES)), rng.integers(0, len(CATEGORIES), n - len(CATEGORIES))])
    rng.shuffle(cat_idx)
    records: list[dict[str, Any]] = []
    prices: list[float] = []
    nouns: list[str] = []
    for k in range(n):
        cat = CATEGORIES[int(cat_idx[k])]
        info = _CATS[cat]
        price = float(np.exp(rng.normal(math.log(info.median_price), info.price_sigma)))
        price = max(0.99, round(price, 2))
        noun = info.nouns[int(rng.integers(len(info.nouns)))]
        adj = info.adjectives[int(rng.integers(len(info.adjectives)))]
        brand = info.brands[int(rng.integers(len(info.brands)))]
        use = info.uses[int(rng.integers(len(info.uses)))]
        series = "XSLMZ"[int(rng.integers(5))]
        style = int(rng.integers(3))
        if style == 0:
            title = f"{adj} {noun} {series} {int(rng.integers(2, 100))}"
        elif style == 1:
            title = f"{brand} {noun} {series}{int(rng.integers(1, 10))}"
        else:
            title = f"{brand} {adj} {noun}"
        article = "An" if adj[0].lower() in "aeiou" else "A"
        description = f"{article} {adj.lower()} {noun.lower()} from {brand}, made for {use}."
        records.append(
            {
                "item_id": f"i{k:05d}",
                "title": title,
                "category": cat,
                "brand": brand,
                "price": price,
                "description": description,
            }
        )
        prices.append(price)
        nouns.append(noun.lower())
    quality = rng.normal(0.0, 1.0, n)
    popularity = rng.lognormal(0.0, 1.0, n)
    categories = tuple(r["category"] for r in records)
    by_category = {c: np.array([k for k in range(n) if categories[k] == c], dtype=np.int64) for c in CATEGORIES}
    return _Catalog(
        records=tuple(records),
        item_ids=tuple(r["item_id"] for r in records),
        categories=categories,
        prices=tuple(prices),
        nouns=tuple(nouns),
        quality=tuple(float(q) for q in quality),
        by_category=by_category,
        log_prices=np.log(np.array(prices)),
        popularity=popularity,
        log_medians=np.array([math.log(_CATS[c].median_price) for c in categories]),
        price_sigmas=np.array([_CATS[c].price_sigma for c in categories]),
    )


# --------------------------------------------------------------------------
# Per-user generation (runs inside Spark Python workers)
# --------------------------------------------------------------------------


class _Uniforms:
    """Buffered uniform draws from a numpy Generator (fast scalar access)."""

    __slots__ = ("_rng", "_buf", "_pos")

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self._buf: list[float] = []
        self._pos = 0

    def u(self) -> float:
        if self._pos >= len(self._buf):
            self._buf = self._rng.random(512).tolist()
            self._pos = 0
        x = self._buf[self._pos]
        self._pos += 1
        return x

    def randint(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi] (inclusive)."""
        return lo + min(int(self.u() * (hi - lo + 1)), hi - lo)

    def pick(self, seq: tuple[Any, ...] | list[Any]) -> Any:
        return seq[min(int(self.u() * len(seq)), len(seq) - 1)]

    def exp(self, mean: float) -> float:
        return -mean * math.log(1.0 - self.u())


def _luhn_check_digit(digits: str) -> int:
    total = 0
    for pos, ch in enumerate(reversed(digits)):
        d = int(ch)
        if pos % 2 == 0:  # these get doubled once the check digit is appended
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return (10 - total % 10) % 10


def luhn_valid(number: str) -> bool:
    """True if the digits of ``number`` (spaces/dashes ignored) pass the Luhn check."""
    digits = [c for c in number if c.isdigit()]
    if len(digits) < 2:
        return False
    return _luhn_check_digit("".join(digits[:-1])) == int(digits[-1])


def _make_pii(r: _Uniforms) -> str:
    kind = r.randint(0, 3)
    if kind == 0:  # email
        first, last = r.pick(_FIRST_NAMES), r.pick(_LAST_NAMES)
        style = r.randint(0, 2)
        if style == 0:
            local = f"{first}.{last}{r.randint(1, 99)}"
        elif style == 1:
            local = f"{first}{last[0]}{r.randint(1970, 2005)}"
        else:
            local = f"{first}_{last}"
        return f"{local}@{r.pick(_EMAIL_DOMAINS)}"
    if kind == 1:  # phone
        style = r.randint(0, 3)
        if style == 0:
            return f"+1 {r.randint(201, 989)}-555-{r.randint(100, 199):04d}"
        if style == 1:
            return f"({r.randint(201, 989)}) 555-{r.randint(100, 199):04d}"
        if style == 2:
            return f"+44 20 7946 {r.randint(0, 999):04d}"
        return f"0{r.randint(30, 89)} {r.randint(1000000, 9999999)}"
    if kind == 2:  # Luhn-valid card number
        prefix = "4" if r.u() < 0.5 else str(r.randint(51, 55))
        body = prefix + "".join(str(r.randint(0, 9)) for _ in range(15 - len(prefix)))
        number = body + str(_luhn_check_digit(body))
        sep = " " if r.u() < 0.5 else "-"
        return sep.join(number[j : j + 4] for j in range(0, 16, 4))
    # IPv4
    if r.u() < 0.5:
        return f"192.168.{r.randint(0, 255)}.{r.randint(1, 254)}"
    return f"{r.randint(11, 223)}.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}"


class _UserGen:
    """Generates one user's whole history as (event_date, raw_line) pairs."""

    def __init__(self, spec: SampleSpec, cat: _Catalog, dates: list[str], i: int) -> None:
        self.spec = spec
        self.cat = cat
        self.dates = dates
        self.i = i
        self.user_id = f"u{i:07d}"
        rng = np.random.default_rng([spec.seed, i])
        self.rng = rng
        self.r = _Uniforms(rng)
        self.k = 0  # per-user event counter (feeds event_id)
        self._id_prefix = f"{spec.seed}:{i}:"
        self.out: list[tuple[str, str]] = []

        days = spec.days
        # Latent interests.
        ncat = len(CATEGORIES)
        self.primary = int(rng.choice(ncat, p=_CAT_WEIGHTS))
        w2 = _CAT_WEIGHTS.copy()
        w2[self.primary] = 0.0
        self.secondary = int(rng.choice(ncat, p=w2 / w2.sum()))
        self.price_level = float(rng.normal(0.0, 0.6))  # in units of the category's sigma
        # Item preference per category: popularity x closeness to the user's price level.
        sig = cat.price_sigmas
        target = cat.log_medians + self.price_level * sig
        w = cat.popularity * np.exp(-0.5 * ((cat.log_prices - target) / (0.5 * sig)) ** 2) + 1e-9
        self.item_cdf: dict[str, tuple[list[int], list[float]]] = {}
        for c, idx in cat.by_category.items():
            cw = np.cumsum(w[idx])
            self.item_cdf[c] = (idx.tolist(), (cw / cw[-1]).tolist())

        # Lifecycle: rate(t) for every day of the window.
        base = float(rng.gamma(2.0, _MEAN_SESSION_RATE / 2.0))
        t = np.arange(days, dtype=float)
        lc = float(rng.random())
        self.stop_day = days  # first day with no activity at all
        if lc < 0.50:
            self.lifecycle = "active"
            rates = np.full(days, base)
        elif lc < 0.70:
            self.lifecycle = "new"
            start = int(days * rng.uniform(0.1, 0.9))
            rates = np.where(t >= start, base, 0.0)
        elif lc < 0.85:
            self.lifecycle = "fading"
            tau = days * rng.uniform(0.15, 0.6)
            rates = base * np.exp(-t / tau)
        else:
            self.lifecycle = "churned"
            self.stop_day = int(days * rng.uniform(0.1, 0.9))
            rates = np.where(t < self.stop_day, base, 0.0)
        unhappy = None
        if self.lifecycle == "churned" and rng.random() < _UNHAPPY_CHURN_P:
            # leaves unhappy, and says so: a complaint some days before the churn day, then the activity fades
            # (no hard stop)
            unhappy = max(0, self.stop_day - int(rng.integers(_UNHAPPY_LEAD_DAYS[0], _UNHAPPY_LEAD_DAYS[1] + 1)))
            rates = np.full(days, base)
            self.stop_day = days
        self.sessions_per_day = rng.poisson(rates).tolist()
        # day -> list of scheduled actions ("return" | "review" | "complaint" | "intent_buy", item or category)
        self.scheduled: dict[int, list[tuple[str, int]]] = {}
        # what the logs do not say, for oracle features (generate_user_truth): intents (day, category) stated,
        # complaints (day) written, and the fade of activity after one (day, tau)
        self.truth: dict[str, Any] = {"intents": [], "complaints": [], "fade": None}
        self.fade: tuple[int, float] | None = None
        if unhappy is not None:
            self._schedule(unhappy, ("complaint", -1))
        intents = list(_INTENTS)
        for _ in range(int(rng.poisson(_INTENT_EPISODES * days / 30))):
            day, which = int(rng.integers(days)), int(rng.integers(len(intents)))
            if rates[day] > 0:  # an active user's need (not before a new user starts, not after churn)
                self._schedule(day, ("intent", which))

    # -- emission --------------------------------------------------------

    def _emit(self, day: int, sec: int, ev: dict[str, Any]) -> None:
        if sec > 86399:
            sec = 86399
        h, rem = divmod(sec, 3600)
        m, s = divmod(rem, 60)
        date = self.dates[day]
        ev["ts"] = f"{date}T{h:02d}:{m:02d}:{s:02d}Z"
        ev["user_id"] = self.user_id
        ev["event_id"] = hashlib.blake2b(f"{self._id_prefix}{self.k}".encode(), digest_size=10).hexdigest()
        self.k += 1
        r = self.r
        if self.spec.malformed_fraction > 0 and r.u() < self.spec.malformed_fraction:
            self._emit_malformed(date, ev)
        else:
            self.out.append((date, _dumps(ev)))

    def _emit_malformed(self, date: str, ev: dict[str, Any]) -> None:
        r = self.r
        kinds = MALFORMED_KINDS if "price" in ev else tuple(k for k in MALFORMED_KINDS if k != "negative_price")
        kind = r.pick(kinds)
        dumps = _dumps
        if kind == "broken_json":
            line = dumps(ev)
            # Sorted keys put user_id last: cut only after its closing quote.
            tail = r.pick(("", ",", ',"', ',"session', ',"ref":"ema'))
            line = line[:-1] + tail
        elif kind == "missing_user_id":
            del ev["user_id"]
            line = dumps(ev)
        elif kind == "bad_timestamp":
            ev["ts"] = r.pick(_BAD_TIMESTAMPS)
            line = dumps(ev)
        elif kind == "negative_price":
            ev["price"] = -ev["price"]
            line = dumps(ev)
        elif kind == "unknown_event_type":
            ev["event_type"] = r.pick(_UNKNOWN_EVENT_TYPES)
            line = dumps(ev)
        else:  # duplicate: the identical line twice
            line = dumps(ev)
            self.out.append((date, line))
        self.out.append((date, line))

    # -- building blocks ---------------------------------------------------

    def _item_event(self, etype: str, item: int, **extra: Any) -> dict[str, Any]:
        ev: dict[str, Any] = {
            "event_type": etype,
            "item_id": self.cat.item_ids[item],
            "category": self.cat.categories[item],
            "price": self.cat.prices[item],
        }
        ev.update(extra)
        return ev

    def _pick_item(self, category: str) -> int:
        ids, cdf = self.item_cdf[category]
        return ids[min(bisect.bisect_left(cdf, self.r.u()), len(ids) - 1)]

    def _maybe_pii(self, text: str, templates: tuple[str, ...], key: str) -> str:
        if self.spec.pii_fraction > 0 and self.r.u() < self.spec.pii_fraction:
            return self.r.pick(templates).format(**{key: text, "pii": _make_pii(self.r)})
        return text

    def _query(self, category: str) -> str:
        r = self.r
        info = _CATS[category]
        noun = r.pick(info.nouns).lower()
        style = r.randint(0, 4)
        if style == 0:
            q = f"{r.pick(info.adjectives).lower()} {noun}"
        elif style == 1:
            q = f"{r.pick(info.brands).lower()} {noun}"
        elif style == 2:
            q = f"{noun} under {int(info.median_price * (1 + r.randint(0, 3)) / 2) + 1}"
        elif style == 3:
            q = f"best {noun} for {r.pick(info.uses)}"
        else:
            q = noun
        return self._maybe_pii(q, _PII_TEMPLATES_QUERY, "q")

    def _quantity(self, item: int) -> int:
        mq = _CATS[self.cat.categories[item]].max_quantity
        if mq == 1 or self.r.u() < 0.7:
            return 1
        return self.r.randint(2, mq)

    def _rating(self, item: int) -> int:
        q = self.cat.quality[item]
        # logits over ratings 1..5, shifted by the item's latent quality
        base = (-2.6, -2.3, -1.4, -0.2, 0.1)
        slope = (-0.9, -0.5, 0.0, 0.3, 0.6)
        ws = [math.exp(b + s * q) for b, s in zip(base, slope)]
        x = self.r.u() * sum(ws)
        acc = 0.0
        for rating, wgt in enumerate(ws, start=1):
            acc += wgt
            if x < acc:
                return rating
        return 5

    def _schedule(self, day: int, action: tuple[str, int]) -> None:
        if day < self.stop_day:
            self.scheduled.setdefault(day, []).append(action)

    def _after_purchase(self, day: int, item: int) -> None:
        r = self.r
        # a problem with the order (more likely for low-quality items): a complaint 1-4 days later, mostly
        p_problem = 0.04 + 0.12 / (1.0 + math.exp(2.0 * self.cat.quality[item]))
        if r.u() < p_problem:
            if r.u() < _COMPLAINT_REVIEW_P:
                self._schedule(day + r.randint(1, 4), ("complaint", item))
        elif r.u() < _REVIEW_P:
            self._schedule(day + r.randint(1, 5), ("review", item))

    def _typo(self, text: str) -> str:
        """With probability _TYPO_P, two neighbouring letters of one longer word swapped, or one dropped."""
        r = self.r
        if r.u() >= _TYPO_P:
            return text
        words = text.split(" ")
        long = [k for k, w in enumerate(words) if len(w) >= 4 and w.isascii() and w.isalpha()]
        if not long:
            return text
        k = r.pick(long)
        w = words[k]
        j = r.randint(1, len(w) - 2)
        words[k] = w[:j] + w[j + 1] + w[j] + w[j + 2 :] if r.u() < 0.5 else w[:j] + w[j + 1 :]
        return " ".join(words)

    # -- sessions ------------------------------------------------------------

    def _browse_session(self, day: int, sec: int) -> int:
        """A regular session: optional search -> views/clicks -> cart -> purchase."""
        r = self.r
        x = r.u()
        if x < 0.60:
            category = CATEGORIES[self.primary]
        elif x < 0.85:
            category = CATEGORIES[self.secondary]
        else:
            category = r.pick(CATEGORIES)
        info = _CATS[category]
        if r.u() < 0.35:
            self._emit(day, sec, {"event_type": "search", "query": self._query(category)})
            sec += 5 + int(r.exp(20.0))
        n_views = 1 + sum(1 for _ in range(4) if r.u() < 0.4)
        viewed: list[int] = []
        for _ in range(n_views):
            item = self._pick_item(category)
            viewed.append(item)
            self._emit(day, sec, self._item_event("view", item))
            sec += 5 + int(r.exp(45.0))
            if r.u() < 0.3:
                self._emit(day, sec, self._item_event("click", item))
                sec += 3 + int(r.exp(30.0))
        if r.u() < info.cart_p:
            item = viewed[-1] if r.u() < 0.6 else r.pick(viewed)
            qty = self._quantity(item)
            self._emit(day, sec, self._item_event("add_to_cart", item, quantity=qty))
            sec += 10 + int(r.exp(60.0))
            rel = self.cat.log_prices[item] - math.log(info.median_price)
            p_buy = info.buy_p / (1.0 + 0.6 * max(0.0, float(rel)))
            if r.u() < p_buy:
                self._emit(day, sec, self._item_event("purchase", item, quantity=qty))
                sec += 5 + int(r.exp(30.0))
                self._after_purchase(day, item)
            elif r.u() < info.return_p:
                # Considered purchase: the user comes back for it a few days later.
                self._schedule(day + r.randint(*_RETURN_DAYS), ("return", item))
        return sec

    def _return_session(self, day: int, sec: int, item: int) -> int:
        """Come back to a carted item: view -> add_to_cart -> purchase."""
        r = self.r
        self._emit(day, sec, self._item_event("view", item))
        sec += 5 + int(r.exp(30.0))
        qty = self._quantity(item)
        self._emit(day, sec, self._item_event("add_to_cart", item, quantity=qty))
        sec += 5 + int(r.exp(30.0))
        self._emit(day, sec, self._item_event("purchase", item, quantity=qty))
        sec += 5 + int(r.exp(20.0))
        self._after_purchase(day, item)
        return sec

    def _review_session(self, day: int, sec: int, item: int) -> int:
        r = self.r
        rating = self._rating(item)
        text = r.pick(_REVIEWS[rating]).format(noun=self.cat.nouns[item])
        text = self._maybe_pii(text, _PII_TEMPLATES_REVIEW, "text")
        self._emit(day, sec, self._item_event("review", item, rating=rating, review_text=text))
        return sec + 30 + int(r.exp(60.0))

    def _complaint_session(self, day: int, sec: int, item: int) -> int:
        """A review that complains about the order, rated 1-4 stars; the user's activity then fades (always
        for ``item`` -1: a user leaving unhappy, about an item of the primary interest)."""
        r = self.r
        leaving = item < 0
        if leaving:
            item = self._pick_item(CATEGORIES[self.primary])
        x, rating, acc = r.u(), 4, 0.0
        for stars, p in enumerate(_COMPLAINT_RATINGS, start=1):
            acc += p
            if x < acc:
                rating = stars
                break
        text = self._typo(r.pick(_COMPLAINTS).format(noun=self.cat.nouns[item]) + r.pick(_COMPLAINT_ENDINGS))
        text = self._maybe_pii(text, _PII_TEMPLATES_REVIEW, "text")
        self._emit(day, sec, self._item_event("review", item, rating=rating, review_text=text))
        self.truth["complaints"].append(day)
        if self.fade is None and (leaving or r.u() < _FADE_P):
            self.fade = (day, _FADE_TAU_DAYS[0] + r.u() * (_FADE_TAU_DAYS[1] - _FADE_TAU_DAYS[0]))
            self.truth["fade"] = self.fade
        return sec + 30 + int(r.exp(60.0))

    def _intent_session(self, day: int, sec: int, which: int) -> int:
        """The user states a need in a search, looks around the category that serves it, and mostly comes
        back within days to buy there."""
        r = self.r
        category = list(_INTENTS)[which]
        phrase = self._typo(r.pick(_INTENTS[category]))
        self._emit(day, sec, {"event_type": "search", "query": self._maybe_pii(phrase, _PII_TEMPLATES_QUERY, "q")})
        sec += 5 + int(r.exp(20.0))
        for _ in range(r.randint(1, 3)):
            self._emit(day, sec, self._item_event("view", self._pick_item(category)))
            sec += 5 + int(r.exp(45.0))
        self.truth["intents"].append((day, category))
        if r.u() < _INTENT_BUY_P:
            self._schedule(day + r.randint(*_INTENT_BUY_DAYS), ("intent_buy", which))
        return sec

    def _intent_buy_session(self, day: int, sec: int, which: int) -> int:
        """Come back to buy for the stated need: an item of its category, as a return session buys."""
        return self._return_session(day, sec, self._pick_item(list(_INTENTS)[which]))

    def _session_start(self) -> int:
        r = self.r
        hour = min(bisect.bisect_left(_HOUR_CDF, r.u()), 23)
        return hour * 3600 + int(r.u() * 3600)

    def run(self) -> list[tuple[str, str]]:
        for day in range(self.spec.days):
            if day >= self.stop_day:
                break
            starts: list[tuple[int, int, str, int]] = []
            for j in range(self.sessions_per_day[day]):
                starts.append((self._session_start(), j, "browse", -1))
            for j, (kind, item) in enumerate(self.scheduled.pop(day, ())):
                starts.append((self._session_start(), 1000 + j, kind, item))
            if not starts:
                continue
            starts.sort()
            clock = 0
            sessions = {
                "browse": lambda d, t, _: self._browse_session(d, t),
                "return": self._return_session,
                "review": self._review_session,
                "complaint": self._complaint_session,
                "intent": self._intent_session,
                "intent_buy": self._intent_buy_session,
            }
            for start, _, kind, item in starts:
                if day >= self.stop_day:
                    break
                # after a complaint, every session happens with probability exp(-days since / tau)
                if self.fade is not None and day > self.fade[0]:
                    if self.r.u() >= math.exp(-(day - self.fade[0]) / self.fade[1]):
                        continue
                clock = sessions[kind](day, max(start, clock), item) + 60
        return self.out


def generate_user_truth(spec: SampleSpec, user_index: int, catalog: _Catalog | None = None) -> dict[str, Any]:
    """What one user's logs do not say outright: the intents stated ``[(day index, category)]``, the
    complaints written ``[day index]`` and the fade after one (``(day index, tau)`` or None), for oracle
    features in benchmarks (docs/sample-data.md). Deterministic like :func:`generate_user_lines`."""
    cat = catalog if catalog is not None else build_catalog(spec)
    gen = _UserGen(spec, cat, _window_dates(spec), user_index)
    gen.run()
    return gen.truth


def _window_dates(spec: SampleSpec) -> list[str]:
    return [(spec.start_date + datetime.timedelta(days=d)).isoformat() for d in range(spec.days)]


def generate_user_lines(spec: SampleSpec, user_index: int, catalog: _Catalog | None = None) -> list[tuple[str, str]]:
    """One user's raw lines as ``(event_date, line)`` pairs, without Spark.

    Deterministic in ``(spec, user_index)``; useful for tests and debugging.
    """
    cat = catalog if catalog is not None else build_catalog(spec)
    return _UserGen(spec, cat, _window_dates(spec), user_index).run()


def _partition_fn(
    spec: SampleSpec, catalog: _Catalog
) -> Callable[[Iterable["pd.DataFrame"]], Iterator["pd.DataFrame"]]:
    dates = _window_dates(spec)

    def gen(batches: Iterable["pd.DataFrame"]) -> Iterator["pd.DataFrame"]:
        import pandas as pd

        chunk_dates: list[str] = []
        chunk_lines: list[str] = []
        for pdf in batches:
            for i in pdf["id"].tolist():
                for d, line in _UserGen(spec, catalog, dates, int(i)).run():
                    chunk_dates.append(d)
                    chunk_lines.append(line)
                if len(chunk_lines) >= 50_000:
                    yield pd.DataFrame({"event_date": chunk_dates, "value": chunk_lines})
                    chunk_dates, chunk_lines = [], []
        if chunk_lines:
            yield pd.DataFrame({"event_date": chunk_dates, "value": chunk_lines})

    return gen


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def replay_day(raw_dir: str, source_day: datetime.date, day: datetime.date, n_users: int) -> set[str]:
    """Add a raw day ``day`` to a local sample: the events of the first ``n_users`` users active on
    ``source_day``, moved to ``day`` with new event ids. Returns their raw user ids. For incremental
    runs (the nightly tests and benchmark: "new events for 1% of users")."""
    from pathlib import Path

    lines: list[str] = []
    for path in sorted((Path(raw_dir) / "events" / f"event_date={source_day}").glob("part-*")):
        lines += [line for line in path.read_text().splitlines() if line.strip()]
    chosen: list[str] = []
    out = []
    for line in lines:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # the sample's malformed lines stay where they are
        user = event.get("user_id")
        if not user or not isinstance(event.get("ts"), str) or not event["ts"].startswith(source_day.isoformat()):
            continue
        if user not in chosen:
            if len(chosen) == n_users:
                continue
            chosen.append(user)
        event["ts"] = day.isoformat() + event["ts"][10:]
        event["event_id"] = f"replay-{day}-{event['event_id']}"
        out.append(json.dumps(event, sort_keys=True, separators=(",", ":")))
    folder = Path(raw_dir) / "events" / f"event_date={day}"
    folder.mkdir(parents=True, exist_ok=False)
    (folder / "part-00000.txt").write_text("\n".join(out) + "\n")
    return set(chosen)


def generate_sample(spark: "SparkSession", out_dir: str, spec: SampleSpec) -> SampleSummary:
    """Write the events and items datasets under ``out_dir`` and summarise them.

    Overwrites ``out_dir/events`` and ``out_dir/items``. The session is used,
    never created or stopped.
    """
    spec.validate()
    base = out_dir.rstrip("/")
    events_dir = f"{base}/events"
    items_dir = f"{base}/items"

    catalog = build_catalog(spec)
    item_lines = [(_dumps(rec),) for rec in catalog.records]
    (spark.createDataFrame(item_lines, "value string").coalesce(1).write.mode("overwrite").text(items_dir))

    parts = max(2, spec.users // 5000)
    events = spark.range(spec.users, numPartitions=parts).mapInPandas(
        _partition_fn(spec, catalog), schema="event_date string, value string"
    )
    events.write.mode("overwrite").partitionBy("event_date").text(events_dir)
    lines = spark.read.text(events_dir).count()

    return SampleSummary(
        events_dir=events_dir,
        items_dir=items_dir,
        lines_written=int(lines),
        items_written=len(item_lines),
        first_date=spec.start_date,
        last_date=spec.end_date,
    )
