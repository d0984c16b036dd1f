"""The demo data generator (synthetic.catalog) and the BEIR loader (models.data.beir)."""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from importlib import resources
from pathlib import Path

import orjson
import pytest

from tailbridge.synthetic import catalog as synth
from tailbridge.models.data.beir import BeirFormatError, load_beir
from tailbridge.vocab import normalize_query

ITEMS, USERS, SEED = 800, 50, 11
FILES = ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv", "users.jsonl", "manifest.json")
# Words that carry no product meaning; the lexical-gap measurements ignore them.
STOP = set("a an the for to of in on and or with w my i me im it its is that thats be can from at by up off "
           "out do dont no not pls please need want looking best good any recommendations help find where buy "
           "ideas shopping some something smth one ones like so 4 under less than max below budget cheap bucks "
           "dollars more".split())


def _stem(token: str) -> str:
    return token[:-1] if len(token) > 3 and token.endswith("s") and not token.endswith("ss") else token


def toks(text: str) -> list[str]:
    return [_stem(t) for t in re.findall(r"[a-z0-9]+", text.lower())]


def content(text: str) -> set[str]:
    return {t for t in toks(text) if t not in STOP}


@pytest.fixture(scope="module")
def dataset() -> synth.SynthDataset:
    return synth.generate(ITEMS, USERS, SEED)


@pytest.fixture(scope="module")
def written(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth.write(dataset, out)
    return out


def exact_ids(ds: synth.SynthDataset, qid: str) -> list[str]:
    return [d for d, g in ds.qrels[qid].items() if g == synth.GRADES["exact"]]


# --- determinism and files -----------------------------------------------------------------

def test_same_seed_gives_byte_identical_files_and_other_seed_differs(written, tmp_path):
    again = tmp_path / "again"
    paths = synth.write(synth.generate(ITEMS, USERS, SEED), again)
    assert sorted(str(p.relative_to(again)) for p in paths.values()) == sorted(FILES)
    for name in FILES:
        assert (again / name).read_bytes() == (written / name).read_bytes(), name
    other = tmp_path / "other"
    synth.write(synth.generate(ITEMS, USERS, SEED + 1), other)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "users.jsonl"):
        assert (other / name).read_bytes() != (written / name).read_bytes(), name


def test_load_reads_back_what_write_wrote(dataset, written):
    assert synth.load(written) == dataset


def test_manifest_counts_and_grade_scheme(dataset, written):
    import orjson

    manifest = orjson.loads((written / "manifest.json").read_bytes())
    assert manifest["seed"] == SEED
    assert manifest["grades"] == {"exact": 3, "substitute": 2, "complement": 1, "irrelevant": 0}
    counts = manifest["counts"]
    assert counts["items"] == ITEMS and counts["users"] == USERS and counts["queries"] == len(dataset.queries)
    by_stratum = Counter(q.stratum for q in dataset.queries)
    assert counts["queries_by_stratum"] == {s: by_stratum[s] for s in synth.STRATA}
    assert sum(counts["queries_by_split"]["test"].values()) == sum(1 for v in dataset.split.values() if v == "test")


def test_beir_files_load_and_every_qrels_id_exists(written):
    beir = load_beir(written)
    assert set(beir.qrels) == {"train", "test"}
    assert len(beir.corpus) == ITEMS
    judged = 0
    for split, qrels in beir.qrels.items():
        for qid, docs in qrels.items():
            assert qid in beir.queries, (split, qid)
            for doc_id, score in docs.items():
                assert doc_id in beir.corpus, (split, qid, doc_id)
                assert score in (0, 1, 2, 3)
                judged += 1
    assert judged > len(beir.queries)
    # Title-only items are part of the design and must load with an empty text.
    assert any(doc["text"] == "" for doc in beir.corpus.values())
    assert all(doc["title"] for doc in beir.corpus.values())
    header = (written / "qrels" / "train.tsv").read_text().splitlines()[0]
    assert header == "query-id\tcorpus-id\tscore"


# --- catalog -------------------------------------------------------------------------------

def test_catalog_shape(dataset):
    items = dataset.items
    assert len(items) == ITEMS and len({it.item_id for it in items}) == ITEMS
    assert all(re.fullmatch(r"item_\d{6}", it.item_id) for it in items)
    types = {it.type for it in items}
    assert len(types) >= 40 and len({it.department for it in items}) >= 10
    for t in synth.PRODUCT_TYPES.values():
        assert set(t.substitutes) | set(t.complements) <= set(synth.PRODUCT_TYPES) and t.key not in t.substitutes
        assert t.nouns and t.needs and t.price_range[0] < t.price_range[1]
    for it in items:
        t = synth.PRODUCT_TYPES[it.type]
        assert list(t.category_path) == it.category_path
        assert it.brand in {b for b, _ in synth.BRANDS[t.department]} and it.title.startswith(it.brand)
        lo, hi = t.price_range
        assert lo * 0.9 <= it.price <= hi * 1.01
        assert any(noun in it.title for noun in t.nouns)
        # Query-only synonyms never appear in titles (that is the vocabulary gap for head queries).
        padded = f" {' '.join(toks(it.title))} "
        for synonym in t.synonyms:
            assert f" {' '.join(toks(synonym))} " not in padded, (it.title, synonym)
    assert 0.15 < sum(1 for it in items if not it.description) / len(items) < 0.45


def test_users_are_valid_personas(dataset):
    assert len(dataset.users) == USERS and len({u.user_id for u in dataset.users}) == USERS
    brands = {b for bs in synth.BRANDS.values() for b, _ in bs}
    for u in dataset.users:
        assert math.isclose(sum(u.department_weights.values()), 1.0, abs_tol=0.01)
        assert set(u.department_weights) == set(synth.DEPARTMENTS)
        assert 0.0 <= u.price_low < u.price_high <= 1.0 and 0.0 <= u.price_sensitivity <= 1.0
        assert u.preferred_brands and set(u.preferred_brands) <= brands
        assert set(u.type_weights) <= set(synth.PRODUCT_TYPES)
    # Personas differ: not everyone favours the same department.
    assert len({max(u.department_weights, key=u.department_weights.get) for u in dataset.users}) >= 5


# --- queries, labels and split -------------------------------------------------------------

def test_queries_unique_and_strata_present(dataset):
    keys = [normalize_query(q.text) for q in dataset.queries]
    assert len(keys) == len(set(keys)) and all(q.text == normalize_query(q.text) for q in dataset.queries)
    strata = Counter(q.stratum for q in dataset.queries)
    assert set(strata) == set(synth.STRATA)
    assert len(dataset.queries) >= 300 and strata["tail"] > strata["head"]


def test_every_query_has_an_exact_item_that_satisfies_its_constraints(dataset):
    items = {it.item_id: it for it in dataset.items}
    for q in dataset.queries:
        judged = dataset.qrels[q.query_id]
        exact = exact_ids(dataset, q.query_id)
        assert exact, q.text
        for item_id in exact:
            it = items[item_id]
            assert it.type == q.type
            assert all(it.attributes.get(a) == v for a, v in q.constraints.items())
            assert q.price_max is None or it.price <= q.price_max
            assert q.brand is None or it.brand == q.brand
        # Every exact item of the catalog is listed, not a sample.
        assert sum(1 for it in dataset.items if it.type == q.type and all(
            it.attributes.get(a) == v for a, v in q.constraints.items())
            and (q.price_max is None or it.price <= q.price_max)
            and (q.brand is None or it.brand == q.brand)) == len(exact)
        grades = Counter(judged.values())
        assert grades[2] <= synth.MAX_SUBSTITUTES and grades[1] <= synth.MAX_COMPLEMENTS
        assert 0 < grades[0] <= synth.MAX_IRRELEVANT
        t = synth.PRODUCT_TYPES[q.type]
        for item_id, grade in judged.items():
            other = items[item_id].type
            if grade == 2:
                assert other == q.type or other in t.substitutes
            elif grade == 1:
                assert other in t.complements
            elif grade == 0:
                assert other != q.type and other not in t.substitutes and other not in t.complements


def test_split_is_by_query_disjoint_and_stratified(dataset):
    assert set(dataset.split) == {q.query_id for q in dataset.queries}
    train = {normalize_query(q.text) for q in dataset.queries if dataset.split[q.query_id] == "train"}
    test = {normalize_query(q.text) for q in dataset.queries if dataset.split[q.query_id] == "test"}
    assert train and test and not train & test
    assert 0.15 <= len(test) / len(dataset.queries) <= 0.25
    for stratum in synth.STRATA:
        splits = {dataset.split[q.query_id] for q in dataset.queries if q.stratum == stratum}
        assert splits == {"train", "test"}, stratum
    # The concepts are shared: most tail test queries' product types also have train tail queries.
    train_tail_types = {q.type for q in dataset.queries if q.stratum == "tail" and dataset.split[q.query_id] == "train"}
    test_tail = [q for q in dataset.queries if q.stratum == "tail" and dataset.split[q.query_id] == "test"]
    assert sum(q.type in train_tail_types for q in test_tail) / len(test_tail) > 0.9


def test_head_queries_are_more_frequent_than_torso_and_tail(dataset):
    freq = {s: [q.frequency for q in dataset.queries if q.stratum == s] for s in synth.STRATA}
    assert min(freq["head"]) > max(freq["tail"])
    assert statistics.median(freq["head"]) > statistics.median(freq["torso"]) > statistics.median(freq["tail"])
    # Zipf-like: the top 10% of queries carry most of the traffic.
    ordered = sorted((q.frequency for q in dataset.queries), reverse=True)
    assert sum(ordered[: len(ordered) // 10]) > 0.5 * sum(ordered)


def test_head_and_torso_are_short_and_tail_is_long(dataset):
    words = {s: statistics.mean(len(q.text.split()) for q in dataset.queries if q.stratum == s) for s in synth.STRATA}
    assert words["head"] < words["torso"] < words["tail"] and words["tail"] >= 6


def _overlap(ds: synth.SynthDataset, stratum: str) -> float:
    items = {it.item_id: it for it in ds.items}
    per_query = []
    for q in ds.queries:
        qt = content(q.text)
        if q.stratum != stratum or not qt:
            continue
        shares = [len(qt & set(toks(items[i].title))) / len(qt) for i in exact_ids(ds, q.query_id)]
        per_query.append(statistics.mean(shares))
    return statistics.mean(per_query)


def test_tail_queries_share_few_words_with_their_exact_items_titles(dataset):
    head, torso, tail = (_overlap(dataset, s) for s in synth.STRATA)
    assert tail < 0.1, tail
    assert head > 3 * tail and torso > 3 * tail, (head, torso, tail)


def test_token_overlap_retrieval_fails_on_tail_but_not_on_head(dataset):
    """A plain lexical matcher (count of shared title tokens) finds exact items for head and
    torso queries but rarely for tail ones: the gap a learned model has to close."""
    titles = [(it.item_id, set(toks(it.title))) for it in dataset.items]

    def hit_at_10(q) -> bool:
        qt = content(q.text)
        scored = sorted(((len(qt & tt), doc) for doc, tt in titles if qt & tt), key=lambda s: (-s[0], s[1]))
        exact = set(exact_ids(dataset, q.query_id))
        return any(doc in exact for _, doc in scored[:10])

    rate = {s: statistics.mean(hit_at_10(q) for q in dataset.queries if q.stratum == s) for s in synth.STRATA}
    assert rate["tail"] < 0.2 and rate["head"] > 2 * rate["tail"] and rate["torso"] > 3 * rate["tail"], rate


def test_tail_vocabulary_maps_consistently_to_types(dataset):
    """The gap is learnable: each need phrasing belongs to exactly one product type."""
    owner: dict[str, str] = {}
    for t in synth.PRODUCT_TYPES.values():
        for phrase in t.needs:
            assert owner.setdefault(phrase, t.key) == t.key, phrase
    tail_forms = Counter(q.form for q in dataset.queries if q.stratum == "tail")
    assert tail_forms["need"] > tail_forms["synonym"] > 0


# --- the taxonomy file ---------------------------------------------------------------------

def test_taxonomy_file_shares_value_sets_by_name():
    sofa, chair = synth.PRODUCT_TYPES["sofa"], synth.PRODUCT_TYPES["accent_chair"]
    colors = {a.name: a.values for a in sofa.attributes}["color"]
    assert colors is {a.name: a.values for a in chair.attributes}["color"]
    assert colors[0] == synth.AttrValue("Navy", ("navy", "navy blue"), ("in dark blue", "in a deep blue"))
    assert len(synth.PRODUCT_TYPES) == 65 and len(synth.DEPARTMENTS) == 11


def _taxonomy_raw() -> dict:
    return orjson.loads((resources.files("tailbridge.synthetic") / synth.TAXONOMY_FILE).read_bytes())


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda d: d["types"][0]["attributes"][1].update(values="no_such_set"), "'sofa', attribute 'material'"),
        (lambda d: d["types"][0]["substitutes"].append("hovercraft"), "'sofa': substitutes/complements"),
        (lambda d: d["types"][0]["attributes"][0].update(placement="middle"), "placement 'middle'"),
        (lambda d: d["types"].append(dict(d["types"][0])), "'sofa' appears twice"),
        (lambda d: d["brands"].pop("Furniture"), "department 'Furniture' has no brands"),
        (lambda d: d["types"][0].pop("nouns"), "malformed (KeyError: 'nouns')"),
    ],
)
def test_taxonomy_errors_say_where(break_it, message):
    doc = _taxonomy_raw()
    assert synth.read_taxonomy(orjson.dumps(doc)).types == synth.PRODUCT_TYPES
    break_it(doc)
    with pytest.raises(synth.TaxonomyError, match=re.escape(message)):
        synth.read_taxonomy(orjson.dumps(doc))


# --- the BEIR loader on its own ------------------------------------------------------------

def _write_beir(root: Path, corpus: str, queries: str, qrels: str) -> Path:
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text(corpus)
    (root / "queries.jsonl").write_text(queries)
    (root / "qrels" / "test.tsv").write_text(qrels)
    return root


GOOD_CORPUS = (
    '{"_id": "d1", "title": "Harlow Sofa"}\n{"_id": "d2", "title": "Rug", "text": null}\n\n'
    '{"_id": 3, "title": "x", "text": "y"}\n'
)
GOOD_QUERIES = '{"_id": "q1", "text": "couch", "metadata": {"stratum": "head"}}\n'


def test_load_beir_accepts_title_only_corpora_and_headerless_qrels(tmp_path):
    root = _write_beir(tmp_path / "ok", GOOD_CORPUS, GOOD_QUERIES, "q1\td1\t3\nq1\t3\t1.0\n")
    beir = load_beir(root)
    assert beir.corpus["d1"] == {"title": "Harlow Sofa", "text": "", "metadata": {}}
    assert beir.corpus["d2"]["text"] == "" and beir.corpus["3"]["text"] == "y"
    assert beir.qrels == {"test": {"q1": {"d1": 3, "3": 1}}}
    assert beir.queries["q1"]["metadata"] == {"stratum": "head"}
    assert beir.split_queries("test") == {"q1": beir.queries["q1"]}


@pytest.mark.parametrize(
    ("corpus", "queries", "qrels", "file", "line"),
    [
        ('{"_id": "d1", "title": "a"}\n{"_id": "d2", "title": \n', GOOD_QUERIES, "q1\td1\t1\n", "corpus.jsonl", 2),
        ('{"_id": "d1"}\n{"title": "no id"}\n', GOOD_QUERIES, "q1\td1\t1\n", "corpus.jsonl", 2),
        ('{"_id": "d1"}\n{"_id": "d1"}\n', GOOD_QUERIES, "q1\td1\t1\n", "corpus.jsonl", 2),
        ('{"_id": "d1", "title": 5}\n', GOOD_QUERIES, "q1\td1\t1\n", "corpus.jsonl", 1),
        (GOOD_CORPUS, '{"_id": "q1"}\n', "q1\td1\t1\n", "queries.jsonl", 1),
        (GOOD_CORPUS, "[1, 2]\n", "q1\td1\t1\n", "queries.jsonl", 1),
        (GOOD_CORPUS, GOOD_QUERIES, "query-id\tcorpus-id\tscore\nq1\td1\n", "test.tsv", 2),
        (GOOD_CORPUS, GOOD_QUERIES, "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\thigh\n", "test.tsv", 3),
    ],
)
def test_load_beir_names_file_and_line_of_malformed_input(tmp_path, corpus, queries, qrels, file, line):
    root = _write_beir(tmp_path / "bad", corpus, queries, qrels)
    with pytest.raises(BeirFormatError) as err:
        load_beir(root)
    assert err.value.path.name == file and err.value.line == line
    assert f"{file}:{line}:" in str(err.value)


def test_load_beir_missing_files_are_named(tmp_path):
    with pytest.raises(BeirFormatError, match="nowhere"):
        load_beir(tmp_path / "nowhere")
    root = _write_beir(tmp_path / "d", GOOD_CORPUS, GOOD_QUERIES, "q1\td1\t1\n")
    with pytest.raises(BeirFormatError, match=r"dev\.tsv: file not found"):
        load_beir(root, splits=["dev"])
    (root / "queries.jsonl").unlink()
    with pytest.raises(BeirFormatError, match=r"queries\.jsonl: file not found"):
        load_beir(root)
