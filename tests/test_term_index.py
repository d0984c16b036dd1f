"""The term index (the lexical route beside a vector engine without BM25): pure SQLite, no stack."""

import sqlite3
import threading

from tailbridge.streams.term_index import TermFilters, TermIndex, match_query

CATALOG = [
    ("a1", "Sony WH-1000XM4 wireless headphones", "Sony", "Headphones", 349.0),
    ("a2", "Sony WH-1000XM5 wireless headphones", "Sony", "Headphones", 399.0),
    ("a3", "Bose QuietComfort 45 headphones", "Bose", "Headphones", 329.0),
    ("b1", "Trail running shoe size 10.5 wide", "Brooks", "Running Shoes", 140.0),
    ("b2", "Trail running shoe size 10 wide", "Brooks", "Running Shoes", 135.0),
    ("b3", "Road running shoe size 5", "Hoka", "Running Shoes", 150.0),
    ("c1", "Café table, walnut", "Muuto", "Tables", 510.0),
]


def row(item_id, text, brand, category, price, version=1):
    return {"item_id": item_id, "text": text, "title": text, "brand": brand, "category": category,
            "category_path": f"Shop/{category}", "price": price, "updated_ms": version}


def index(tmp_path) -> TermIndex:
    terms = TermIndex(tmp_path / "terms.sqlite")
    terms.upsert([row(*item) for item in CATALOG])
    return terms


def ids(hits) -> list[str]:
    return [hit["id"] for hit in hits]


def test_model_numbers_sizes_and_brands_match_exactly_first(tmp_path):
    terms = index(tmp_path)
    xm4, size, brand, accent = terms.search(["wh-1000xm4", "shoe 10.5", "bose", "cafe"], 10)
    assert ids(xm4) == ["a1", "a2"]  # the XM5 shares the token "wh" only
    assert ids(size)[0] == "b1" and set(ids(size)) == {"b1", "b2", "b3"}
    assert ids(brand) == ["a3"]
    assert ids(accent) == ["c1"]
    assert xm4[0]["entity"] == {"item_id": "a1", "title": CATALOG[0][1], "brand": "Sony", "category": "Headphones",
                                "category_path": "Shop/Headphones", "price": 349.0}
    assert xm4[0]["distance"] > 0


def test_filters_are_the_search_filters(tmp_path):
    terms = index(tmp_path)
    [hits] = terms.search(["headphones"], 10, TermFilters(brand="Sony", price_max=350.0))
    assert ids(hits) == ["a1"]
    [hits] = terms.search(["wide"], 10, TermFilters(category="Running Shoes", price_min=136.0))
    assert ids(hits) == ["b1"]
    [hits] = terms.search(["headphones"], 10, TermFilters(category='Tables" OR 1=1 --'))
    assert hits == []


def test_versions_make_replays_idempotent_and_never_revert(tmp_path):
    terms = index(tmp_path)
    before = terms.search(["headphones"], 10)
    assert terms.upsert([row(*CATALOG[0])]) == 1  # a replay of the same write
    assert terms.search(["headphones"], 10) == before and terms.count() == len(CATALOG)

    terms.upsert([row("a1", "Sony WH-1000XM4 over-ear", "Sony", "Headphones", 299.0, version=5)])
    assert terms.upsert([row(*CATALOG[0], version=4)]) == 0  # older: a backfill must not revert it
    [hits] = terms.search(["wh-1000xm4"], 10)
    assert hits[0]["entity"]["price"] == 299.0

    terms.delete(["a1"], version=6)
    assert terms.upsert([row(*CATALOG[0], version=5)]) == 0  # nor resurrect a deleted item
    assert "a1" not in ids(terms.search(["wh-1000xm4 headphones"], 10)[0])
    assert terms.versions()["a1"] == (6, True) and terms.count() == len(CATALOG) - 1


def test_a_failed_write_leaves_nothing_half_done(tmp_path):
    terms = index(tmp_path)
    bad = [row("z1", "Zebra lamp", "Z", "Lamps", 1.0), {"item_id": "z2", "updated_ms": 1}]  # z2 has no text
    try:
        terms.upsert(bad)
        raise AssertionError("the write should fail")
    except KeyError:
        pass
    assert "z1" not in terms.versions() and terms.search(["zebra"], 5) == [[]]


def test_every_process_and_thread_shares_one_file(tmp_path):
    writer = index(tmp_path)
    reader = TermIndex(tmp_path / "terms.sqlite")  # another opener, as another process is
    results = []
    threads = [threading.Thread(target=lambda: results.append(ids(reader.search(["bose"], 3)[0]))) for _ in range(4)]
    for t in threads:
        t.start()
    writer.upsert([row("a4", "Bose 700 headphones", "Bose", "Headphones", 379.0)])
    for t in threads:
        t.join()
    assert all(r[0] in {"a3", "a4"} for r in results) and len(results) == 4
    assert sqlite3.connect(tmp_path / "terms.sqlite").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_match_query_quotes_whatever_the_user_typed():
    assert match_query('sofa "OR" NEAR(') == '"sofa" OR "or" OR "near"'
    assert match_query("10.5 wide") == '"10 5" OR "10" OR "5" OR "wide"'
    assert match_query("  -- ") is None


def test_long_queries_keep_their_rarest_terms(tmp_path):
    terms = TermIndex(tmp_path / "terms.sqlite")
    terms.upsert([row(f"f{i}", f"the {'oak' if i % 2 else 'pine'} shelf for the wall", "Nook", "Shelves", 50.0)
                  for i in range(40)] + [row("z1", "the zebra lamp", "Zed", "Lamps", 30.0)])
    # "the" is in every document, "shelf" and "wall" in 40 of 41: left out while rarer ones remain
    assert terms._common("the zebra shelf for the wall") == {"the", "shelf", "for", "wall"}
    [hits] = terms.search(["the zebra shelf for the wall"], 5)
    assert ids(hits) == ["z1"]
    assert terms._common("the shelf") == frozenset()  # all common: the query is left whole
    assert len(terms.search(["the shelf"], 50)[0]) == 41
