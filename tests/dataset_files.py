"""Tiny files in each public dataset's distribution format, written by the tests into tmp_path.

The rows are made up; only the formats are the datasets' own (column order, separators,
encodings, headers, JSON field names)."""

from __future__ import annotations

import datetime as dt
import gzip
import json
from pathlib import Path

DAY = 86_400
T0 = 881_250_949  # 1997-12-04, a MovieLens 100K time

# MovieLens 100K: user -> items in time order (see test_evaluate for the hand-worked ranks)
ML100K_HISTORIES = {1: [1, 2, 3, 6], 2: [1, 2, 4, 3], 3: [1, 3, 2, 5], 4: [2, 1, 4, 6], 5: [1, 5, 4]}
ML100K_TITLES = {
    1: "Toy Story (1995)",
    2: "GoldenEye (1995)",
    3: "Four Rooms (1995)",
    4: "Get Shorty (1995)",
    5: "Copycat (1995)",
    6: "Shanghai Triad (Yao a yao yao dao waipo qiao) (1995)",
}
# genre flags in u.genre order: unknown, Action, Adventure, Animation, Children's, Comedy, ...
ML100K_GENRES = {1: (3, 4, 5), 2: (1, 2, 16), 3: (16,), 4: (1, 5, 8), 5: (6, 8, 16), 6: (8,)}


def write_ml100k(root: Path, latin1_title: bool = True) -> Path:
    """u.data (tab-separated), u.item (|-separated, ISO-8859-1, one title with 'é'), u.user."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for user, items in ML100K_HISTORIES.items():
        for n, item in enumerate(items):
            lines.append(f"{user}\t{item}\t{(user + item) % 5 + 1}\t{T0 + user * 1000 + n * DAY}")
    # the file is not sorted by user or time, as u.data is not
    (root / "u.data").write_text("\n".join(reversed(lines)) + "\n")
    titles = dict(ML100K_TITLES)
    if latin1_title:
        titles[5] = "Misérables, Les (1995)"
    rows = []
    for item, title in titles.items():
        flags = ["1" if g in ML100K_GENRES[item] else "0" for g in range(19)]
        rows.append("|".join([str(item), title, "01-Jan-1995", "", f"http://us.imdb.com/M/title-exact?{item}", *flags]))
    (root / "u.item").write_bytes(("\n".join(rows) + "\n").encode("latin-1"))
    (root / "u.user").write_text("1|24|M|technician|85711\n")
    return root


def write_movielens_csv(root: Path) -> Path:
    """ml-latest style: ratings.csv (half stars), movies.csv (quoted titles), tags.csv."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,3.5,964981247\n2,3,5.0,964982224\n2,6,0.5,964983815\n"
    )
    (root / "movies.csv").write_text(
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
        '3,"American President, The (1995)",Comedy|Drama|Romance\n'
        '6,"""Great Performances"" Cats (1998)",(no genres listed)\n'
    )
    (root / "tags.csv").write_text(
        'userId,movieId,tag,timestamp\n1,1,pixar,1139045764\n2,3,"funny, smart",1139045765\n'
    )
    return root


def write_movielens_dat(root: Path) -> Path:
    """ml-1m style: ratings.dat and movies.dat ('::'-separated, movies in ISO-8859-1)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    (root / "movies.dat").write_bytes(
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
        "2039::Cheetah (1989)::Adventure|Children's\n"
        "3730::Conversation, The (1974)::Drama|Mystery\n"
        "5::Père Noël est une ordure, Le (1982)::Comedy\n".encode("latin-1")
    )
    return root


def write_amazon_2014(root: Path) -> Path:
    """reviews_Beauty_5.json (JSON lines, one malformed) and meta_Beauty.json (Python-literal lines)."""
    root.mkdir(parents=True, exist_ok=True)
    reviews = [
        {
            "reviewerID": "A1",
            "asin": "B001",
            "reviewerName": "J. M.",
            "helpful": [2, 3],
            "reviewText": "Smells great and lasts.",
            "overall": 5.0,
            "summary": "Lovely",
            "unixReviewTime": 1252800000,
            "reviewTime": "09 13, 2009",
        },
        {
            "reviewerID": "A1",
            "asin": "B002",
            "reviewText": "",
            "overall": 2.0,
            "summary": "Meh",
            "unixReviewTime": 1252886400,
            "reviewTime": "09 14, 2009",
        },
        {
            "reviewerID": "A2",
            "asin": "B001",
            "reviewText": "Too strong.",
            "overall": 3.0,
            "summary": "",
            "unixReviewTime": 1252972800,
            "reviewTime": "09 15, 2009",
        },
    ]
    lines = [json.dumps(r) for r in reviews] + ['{"reviewerID": "A3", "asin": "B003", "overall": 4.0,']
    (root / "reviews_Beauty_5.json").write_text("\n".join(lines) + "\n")
    meta = [
        "{'asin': 'B001', 'title': 'Rose Water Toner', 'price': 12.5, 'brand': 'Petal', "
        "'categories': [['Beauty', 'Skin Care', 'Face', 'Toners']], 'salesRank': {'Beauty': 211}}",
        "{'asin': 'B002', 'title': \"Men's Shave Gel\", 'categories': [['Beauty', 'Shave']], 'description': 'A gel.'}",
    ]
    (root / "meta_Beauty.json").write_text("\n".join(meta) + "\n")
    return root


def write_amazon_2018(root: Path) -> Path:
    """Beauty_5.json.gz (gzipped JSON lines) and meta_Beauty.json.gz (strict JSON, '$' prices)."""
    root.mkdir(parents=True, exist_ok=True)
    reviews = [
        {
            "overall": 4.0,
            "verified": True,
            "reviewTime": "09 1, 2016",
            "reviewerID": "R1",
            "asin": "C1",
            "style": {"Size:": " 3.4 oz"},
            "reviewerName": "K",
            "reviewText": "Nice.",
            "summary": "Four Stars",
            "unixReviewTime": 1472688000,
        },
        {
            "overall": 1.0,
            "verified": False,
            "reviewerID": "R2",
            "asin": "C2",
            "reviewText": "Broke.",
            "summary": "No",
            "unixReviewTime": 1472774400,
        },
    ]
    with gzip.open(root / "Beauty_5.json.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in reviews) + "\n")
    meta = [
        {
            "category": ["Beauty & Personal Care", "Hair Care", "Shampoos"],
            "description": ["Mild.", "For all."],
            "title": "Oat Shampoo",
            "brand": "Oaty",
            "price": "$1,012.99",
            "asin": "C1",
            "also_buy": ["C2"],
        },
        {"category": [], "description": [], "title": "Comb", "brand": "", "price": "$3.00 - $5.00", "asin": "C2"},
    ]
    with gzip.open(root / "meta_Beauty.json.gz", "wt") as f:
        f.write("\n".join(json.dumps(m) for m in meta) + "\n")
    return root


def write_sequences(root: Path) -> Path:
    """Beauty.txt ('user item item ...', one user split over two lines as SASRec's pairs are) and
    Beauty.text (item<TAB>text with a RecBole header)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "Beauty.txt").write_text("1 10 11 12 10\n2 11 12\n1 13\n3 12 10 11 13\n\n")
    (root / "Beauty.text").write_text(
        "item_id:token\ttext:token_seq\n10\tRose water toner\n11\tOat shampoo\n12\tShave gel\n"
    )
    return root


def write_retailrocket(root: Path, visitors: int = 60) -> Path:
    """events.csv over 21 days and item_properties_part1.csv / part2.csv.

    Even visitors were active on days 12-13 and come back after the cutoff (day 13 when the as-of
    date is day 20, H = 7); odd visitors were last seen on days 1-5 and never return, so days since
    the last event separate the two perfectly. Every fourth visitor carts before and buys after."""
    root.mkdir(parents=True, exist_ok=True)
    start = dt.datetime(2015, 6, 1, 12, tzinfo=dt.timezone.utc)

    def ms(day: int, minute: int = 0) -> int:
        return int((start + dt.timedelta(days=day, minutes=minute)).timestamp() * 1000)

    rows = ["timestamp,visitorid,event,itemid,transactionid"]
    for v in range(visitors):
        item = 100 + v % 7
        if v % 2 == 0:
            rows += [f"{ms(12, v)},{v},view,{item},", f"{ms(13, v)},{v},view,{item + 1},"]
            if v % 4 == 0:
                rows += [
                    f"{ms(13, v + 1)},{v},addtocart,{item},",
                    f"{ms(16, v)},{v},view,{item},",
                    f"{ms(16, v + 1)},{v},transaction,{item},{9000 + v}",
                ]
            else:
                rows.append(f"{ms(15, v)},{v},view,{item + 2},")
        else:
            rows += [f"{ms(1 + v % 5, v)},{v},view,{item},", f"{ms(2 + v % 4, v)},{v},view,{item + 1},"]
    rows.append(f"{ms(20)},9999,view,100,")  # the as-of date: day 20
    (root / "events.csv").write_text("\n".join(rows) + "\n")
    (root / "item_properties_part1.csv").write_text(
        f"timestamp,itemid,property,value\n{ms(0)},100,categoryid,1016\n{ms(0)},100,888,1116 n5.0\n"
        f"{ms(0)},101,categoryid,809\n"
    )
    (root / "item_properties_part2.csv").write_text(
        f"timestamp,itemid,property,value\n{ms(9)},100,categoryid,1017\n{ms(0)},102,available,1\n"
    )
    return root
