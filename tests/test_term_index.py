"""The term index (the lexical route beside a vector engine without BM25): pure SQLite, no stack."""

import sqlite3
import threading

from tailbridge.streams import term_index
from tailbridge.streams.term_index import FIELDS, TermFilters, TermIndex, match_query

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


def full_sort(terms: TermIndex, text: str, limit: int, filters: TermFilters = TermFilters()) -> list[dict]:
    """Every match joined to its fields and sorted: what search returned before it cut the
    matches at the limit-th score first, the reference its answers must equal."""
    where, params = filters.sql()
    query = match_query(text, terms._common(text))
    rows = terms._conn().execute(
        f"SELECT {', '.join('i.' + f for f in FIELDS)}, -bm25(terms) AS score FROM terms JOIN items i "
        f"ON i.rid = terms.rowid WHERE terms MATCH ?{where} ORDER BY score DESC, i.item_id LIMIT ?",
        [query, *params, limit]).fetchall()
    return [{"id": row[0], "distance": row[-1], "entity": dict(zip(FIELDS, row[:-1]))} for row in rows]


def test_cutting_at_the_limit_keeps_the_rows_and_order_of_a_full_sort(tmp_path):
    terms = TermIndex(tmp_path / "terms.sqlite")
    # Ties at every cut: 30 identical texts (item ids decide), among texts that score apart.
    catalog = [row(f"t{i:02d}", "walnut side table", "Nook", "Tables", 40.0 + i) for i in range(30)]
    catalog += [row(f"v{i:02d}", f"walnut {'round ' * (i % 4)}side table {i}", "Oak & Co", "Tables" if i % 2 else "Desks",
                    20.0 + 3 * i) for i in range(30)]
    terms.upsert([*catalog, *(row(*item) for item in CATALOG)])
    terms.delete(["t03", "v07"], version=2)
    queries = ["walnut table", "side table 5", "round walnut", "wireless headphones", "walnut", "nothing here"]
    filters = [TermFilters(), TermFilters(category="Tables"), TermFilters(brand="Nook", price_max=55.0),
               TermFilters(price_min=30.0)]
    checked = 0
    for text in queries:
        for f in filters:
            for limit in (1, 5, 10, 29, 100):
                [hits] = terms.search([text], limit, f)
                assert hits == full_sort(terms, text, limit, f), (text, f, limit)
                checked += bool(hits)
    assert checked > 50
    [hits] = terms.search(["walnut side table"], 10)
    assert not {"t03", "v07"} & set(ids(hits))


def test_term_counts_are_kept_for_the_document_count_ttl(tmp_path, monkeypatch):
    terms = TermIndex(tmp_path / "terms.sqlite")
    terms.upsert([row(f"f{i}", f"pine shelf {i}", "Nook", "Shelves", 50.0) for i in range(40)]
                 + [row("z1", "zebra lamp", "Zed", "Lamps", 30.0)])
    now = [1000.0]
    monkeypatch.setattr(term_index.time, "monotonic", lambda: now[0])
    assert terms._common("zebra shelf") == {"shelf"}
    # 800 more documents: "shelf" (40) falls under COMMON_SHARE of them, so it is no longer left out...
    terms.upsert([row(f"r{i}", f"oak rug {i}", "Zed", "Rugs", 30.0) for i in range(800)])
    assert terms._common("zebra shelf") == {"shelf"}  # ...once counted again: the counts are 0 s old, kept
    now[0] += term_index.DOC_COUNT_TTL_S + 0.1
    assert terms._common("zebra shelf") == frozenset()
