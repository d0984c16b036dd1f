"""Generate the demo data: a synthetic e-commerce catalog, search queries with a real
vocabulary gap, graded judgements and shopper personas, written in BEIR layout (and read back).

Design, in short:
- A hand-written taxonomy of 65 product types in 11 departments, kept as data in
  ``taxonomy.json`` beside this module (format: :func:`read_taxonomy`). Each type has the nouns
  its titles use, query-only synonyms (couch for sofa), colloquial "need" phrasings that
  never share words with its titles ("somewhere comfy to plop down in the living room"),
  attributes whose values have a title form, a torso query form and a colloquial tail form
  ("Navy" / "navy" / "in dark blue"), a price range, substitute and complement types. Each
  department has brands in budget / mid / premium tiers.
- Items are brand + attribute + noun titles; ~30% have no description (title-only catalogs).
- Queries come in three strata. head: the bare noun or a synonym; torso: noun + attribute /
  brand / price in title words; tail: a need phrasing or synonym plus colloquial constraints,
  abbreviations and typos. Every torso/tail query is built from a seed item, so it always has
  at least one exact match. Frequencies are Zipf over the stratum-ordered ranks.
- The mapping from colloquial words to types and attribute values is consistent and shared by
  train and test (the split is by query string), so a learned model can close the gap that a
  lexical matcher cannot.
- Graded qrels: 3 exact, 2 substitute, 1 complement, 0 irrelevant (a labelled random sample).
- Deterministic: one ``random.Random`` / numpy ``Generator`` per stage, derived from the seed;
  the written files are byte-identical for a seed.

Query metadata beyond ``stratum`` and ``frequency`` (type, constraints...) is ground truth:
fine for analysis, never an input to a model at evaluation time.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import orjson

from tailbridge.models.data.beir import BeirFormatError, load_beir, read_jsonl
from tailbridge.vocab import normalize_query

GENERATOR_VERSION = 1
GRADES = {"exact": 3, "substitute": 2, "complement": 1, "irrelevant": 0}
STRATA = ("head", "torso", "tail")
MAX_SUBSTITUTES, MAX_COMPLEMENTS, MAX_IRRELEVANT = 30, 15, 10
TEST_FRACTION = 0.2

# --------------------------------------------------------------------------------------------
# Taxonomy (the data lives in taxonomy.json beside this module)
# --------------------------------------------------------------------------------------------

TAXONOMY_FILE = "taxonomy.json"
PLACEMENTS = ("prefix", "suffix", "hidden")


class TaxonomyError(ValueError):
    """taxonomy.json cannot be read or is inconsistent; the message says where."""


@dataclass(frozen=True)
class AttrValue:
    title: str  # display value: in titles, in Item.attributes and in query constraints
    torso: tuple[str, ...]  # how a torso query names it (title words, mostly)
    tail: tuple[str, ...]  # colloquial clause a tail query uses (no title words)


@dataclass(frozen=True)
class Attribute:
    name: str
    placement: str  # "prefix" / "suffix" in titles, or "hidden" (attributes + description only)
    values: tuple[AttrValue, ...]


@dataclass(frozen=True)
class ProductType:
    key: str
    category_path: tuple[str, ...]
    nouns: tuple[str, ...]  # canonical title nouns
    synonyms: tuple[str, ...]  # query-only
    needs: tuple[str, ...]  # colloquial need / use-case phrasings, query-only
    attributes: tuple[Attribute, ...]
    price_range: tuple[float, float]
    substitutes: tuple[str, ...]
    complements: tuple[str, ...]
    blurb: str  # catalog-speak description sentence

    @property
    def department(self) -> str:
        return self.category_path[0]


@dataclass(frozen=True)
class Taxonomy:
    types: dict[str, ProductType]  # in file order
    brands: dict[str, tuple[tuple[str, str], ...]]  # department -> (name, tier); tier: budget / mid / premium
    boilerplate: tuple[str, ...]  # closing sentences of item descriptions


def read_taxonomy(raw: bytes) -> Taxonomy:
    """Parse taxonomy.json: ``value_sets`` (name -> attribute values several types share),
    ``types`` (an attribute's ``values`` is a list, or the name of a value set), ``brands``
    (department -> [{name, tier}]) and ``boilerplate``. An attribute value is {title, torso,
    tail}, as in :class:`AttrValue`. Order is part of the data: the generator draws by
    position, so reordering entries changes what a seed generates."""
    try:
        doc = orjson.loads(raw)
        sets = {name: _attr_values(specs) for name, specs in doc["value_sets"].items()}
        types: dict[str, ProductType] = {}
        for t in doc["types"]:
            attributes = []
            for a in t["attributes"]:
                values = a["values"]
                if isinstance(values, str) and values not in sets:
                    raise TaxonomyError(f"type {t['key']!r}, attribute {a['name']!r}: no value set {values!r}")
                if a["placement"] not in PLACEMENTS:
                    raise TaxonomyError(f"type {t['key']!r}, attribute {a['name']!r}: placement "
                                        f"{a['placement']!r} is not one of {', '.join(PLACEMENTS)}")
                attributes.append(Attribute(a["name"], a["placement"],
                                            sets[values] if isinstance(values, str) else _attr_values(values)))
            if t["key"] in types:
                raise TaxonomyError(f"type {t['key']!r} appears twice")
            lo, hi = t["price_range"]
            types[t["key"]] = ProductType(t["key"], tuple(t["category_path"]), tuple(t["nouns"]),
                                          tuple(t["synonyms"]), tuple(t["needs"]), tuple(attributes), (lo, hi),
                                          tuple(t["substitutes"]), tuple(t["complements"]), t["blurb"])
        brands = {dept: tuple((b["name"], b["tier"]) for b in listed) for dept, listed in doc["brands"].items()}
        boilerplate = tuple(doc["boilerplate"])
    except TaxonomyError:
        raise
    except (KeyError, TypeError, ValueError) as exc:  # ValueError: orjson's decode error, a bad price_range
        raise TaxonomyError(f"{TAXONOMY_FILE}: malformed ({type(exc).__name__}: {exc})") from None
    for t in types.values():
        unknown = [k for k in (*t.substitutes, *t.complements) if k not in types]
        if unknown:
            raise TaxonomyError(f"type {t.key!r}: substitutes/complements name unknown types {unknown}")
        if not brands.get(t.department):
            raise TaxonomyError(f"type {t.key!r}: department {t.department!r} has no brands")
    tiers = {tier for listed in brands.values() for _, tier in listed}
    if not tiers <= _TIER_BETA.keys():
        raise TaxonomyError(f"brand tiers {sorted(tiers - _TIER_BETA.keys())} are not {', '.join(_TIER_BETA)}")
    return Taxonomy(types, brands, boilerplate)


def _attr_values(specs: list[dict]) -> tuple[AttrValue, ...]:
    return tuple(AttrValue(v["title"], tuple(v["torso"]), tuple(v["tail"])) for v in specs)


# Where an item's price sits in its type's range, by brand tier (beta distribution parameters).
_TIER_BETA = {"budget": (1.6, 4.5), "mid": (3.0, 3.0), "premium": (4.5, 1.6)}
TAXONOMY = read_taxonomy((resources.files(__package__) / TAXONOMY_FILE).read_bytes())
PRODUCT_TYPES: dict[str, ProductType] = TAXONOMY.types
DEPARTMENTS: tuple[str, ...] = tuple(dict.fromkeys(t.department for t in PRODUCT_TYPES.values()))
BRANDS = TAXONOMY.brands
BOILERPLATE = TAXONOMY.boilerplate

# Tail-query surface noise: openers/suffixes carry no type information; abbreviations and typos
# are applied word by word, so the same concept appears in many surface forms across the split.
OPENERS = ("", "", "", "looking for", "need", "i need", "i want", "best", "good", "any recommendations for",
           "help me find", "where to buy", "ideas for", "shopping for")
SUFFIXES = ("", "", "", " pls", " that actually works", " ideas", " recommendations", "?", " asap")
ABBREVIATIONS = {"people": "ppl", "something": "smth", "without": "w/o", "with": "w/", "please": "pls",
                 "pounds": "lbs", "because": "bc", "you": "u", "really": "rly", "for": "4", "and": "&",
                 "year": "yr", "dont": "don't", "im": "i'm", "thats": "that's"}
PRICE_CLAUSES_TAIL = ("under ${x}", "under {x} bucks", "less than ${x}", "for under {x} dollars",
                      "no more than ${x}", "cheap max ${x}", "budget {x}", "below {x}")
PRICE_CLAUSES_TORSO = ("under ${x}", "under {x}", "below ${x}")
NICE_PRICES = (5, 10, 15, 20, 25, 30, 40, 50, 60, 75, 80, 100, 120, 150, 200, 250, 300, 400, 500, 600,
               750, 800, 1000, 1200, 1500, 2000, 2500, 3000, 4000, 5000)
_KEYBOARD_NEIGHBOURS = {c: n for c, n in zip("abcdefghijklmnopqrstuvwxyz",
                                             "sqvsrdfgujlkmnipwtdyibeczt")}

# --------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------


@dataclass
class Item:
    item_id: str
    title: str
    description: str
    category_path: list[str]
    brand: str
    price: float
    attributes: dict[str, str]
    type: str

    @property
    def department(self) -> str:
        return self.category_path[0]


@dataclass
class SynthQuery:
    query_id: str
    text: str
    stratum: str  # head / torso / tail
    frequency: int
    type: str  # the product type that is an exact match
    form: str  # how the text was built: noun, synonym, attribute, brand, price, need, ...
    constraints: dict[str, str] = field(default_factory=dict)  # attribute name -> display value
    price_max: float | None = None
    brand: str | None = None


@dataclass
class Persona:
    user_id: str
    department_weights: dict[str, float]  # sums to ~1
    type_weights: dict[str, float]  # a few favourite types, 0..1
    price_low: float  # preferred band, as a fraction of each type's (log) price range
    price_high: float
    price_sensitivity: float  # 0: ignores price, 1: strongly avoids items outside the band
    preferred_brands: list[str]


@dataclass
class SynthDataset:
    items: list[Item]
    queries: list[SynthQuery]
    qrels: dict[str, dict[str, int]]
    split: dict[str, str]  # query_id -> "train" | "test"
    users: list[Persona]
    seed: int = 0


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def generate(items: int = 5000, users: int = 200, seed: int = 0,
             progress: Callable[[str], None] | None = None) -> SynthDataset:
    """Build the catalog, the queries with graded qrels, the split and the personas."""
    if items < 1 or users < 0:
        raise ValueError("items must be >= 1 and users >= 0")
    say = progress or (lambda _msg: None)
    # One generator per stage so that changing one stage does not reshuffle the others.
    item_list = _make_items(items, random.Random(f"{seed}:items"))
    say(f"items: {len(item_list)}")
    queries = _make_queries(item_list, random.Random(f"{seed}:queries"))
    say(f"queries: {len(queries)}")
    qrels = _make_qrels(item_list, queries, np.random.default_rng([seed, 3]))
    say(f"qrels: {sum(len(v) for v in qrels.values())} judgements")
    split = _make_split(queries, random.Random(f"{seed}:split"))
    personas = _make_users(users, random.Random(f"{seed}:users"))
    say(f"users: {len(personas)}")
    return SynthDataset(item_list, queries, qrels, split, personas, seed)


def _price(rng: random.Random, ptype: ProductType, tier: str) -> float:
    lo, hi = ptype.price_range
    u = rng.betavariate(*_TIER_BETA[tier])
    raw = lo * (hi / lo) ** u  # log-uniform-ish: prices spread over orders of magnitude
    return round(max(0.99, round(raw) - 0.01), 2) if raw >= 5 else round(raw, 2)


def _make_items(n: int, rng: random.Random) -> list[Item]:
    keys = list(PRODUCT_TYPES)
    popularity = [rng.uniform(0.5, 1.6) for _ in keys]
    # Every type gets an item when the catalog is big enough; the rest follow popularity.
    types = rng.sample(keys, len(keys))[:n] + rng.choices(keys, popularity, k=max(0, n - len(keys)))
    rng.shuffle(types)
    out = []
    for i, key in enumerate(types):
        t = PRODUCT_TYPES[key]
        brand, tier = rng.choice(BRANDS[t.department])
        values = {a.name: rng.choice(a.values).title for a in t.attributes}
        prefix = [values[a.name] for a in t.attributes if a.placement == "prefix"]
        suffix = [values[a.name] for a in t.attributes if a.placement == "suffix"]
        if len(prefix) > 1 and rng.random() < 0.15:  # real titles omit attributes now and then
            prefix.pop(rng.randrange(len(prefix)))
        noun = rng.choice(t.nouns)
        if rng.random() < 0.75:
            title = " ".join([brand, *prefix, noun])
        else:
            title = ", ".join([f"{brand} {noun}", *prefix])
        if suffix:
            title += ", " + ", ".join(suffix)
        attributes = dict(values)
        if t.department in ("Hardware & Plumbing", "Electronics"):
            model = f"{brand[:2].upper()}-{rng.randrange(100, 9999)}"
            attributes["model"] = model
            title += f" ({model})"
        description = ""
        if rng.random() < 0.7:  # ~30% title-only, like many real catalogs
            facts = [f"{a.name.replace('_', ' ').capitalize()}: {values[a.name]}." for a in t.attributes
                     if rng.random() < 0.6]
            description = " ".join([t.blurb, *facts, rng.choice(BOILERPLATE)])
        out.append(Item(f"item_{i:06d}", title, description, list(t.category_path), brand,
                        _price(rng, t, tier), attributes, key))
    return out


def _misspell(word: str, rng: random.Random) -> str:
    if len(word) < 4 or not word.isalpha():
        return word
    i = rng.randrange(1, len(word) - 1)
    op = rng.randrange(4)
    if op == 0:
        return word[:i] + word[i + 1:]  # dropped letter
    if op == 1:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]  # swapped letters
    if op == 2:
        return word[:i] + word[i] + word[i:]  # doubled letter
    return word[:i] + _KEYBOARD_NEIGHBOURS.get(word[i], word[i]) + word[i + 1:]  # fat finger


def _noisy(text: str, rng: random.Random) -> str:
    if " year old" in text and rng.random() < 0.35:
        text = text.replace(" year old", rng.choice((" yo", " yr old", "yo")))
    words = text.split(" ")
    for i, w in enumerate(words):
        if w in ABBREVIATIONS and rng.random() < 0.35:
            words[i] = ABBREVIATIONS[w]
    if rng.random() < 0.35:
        candidates = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
        if candidates:
            i = rng.choice(candidates)
            words[i] = _misspell(words[i], rng)
    return " ".join(w for w in words if w)


def _price_cap(price: float, rng: random.Random) -> float:
    above = [p for p in NICE_PRICES if p >= price]
    if not above:
        return float(math.ceil(price / 1000) * 1000)
    return float(above[min(len(above) - 1, rng.choice((0, 0, 1, 2)))])


def _fmt_price(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:.2f}"


def _make_queries(items: list[Item], rng: random.Random) -> list[SynthQuery]:
    # ~0.6 queries per item up to 5k items, then sqrt growth: exact-match lists grow with the
    # catalog, so linear query growth would make the qrels grow quadratically.
    n = len(items)
    n_target = max(300, round(0.6 * n) if n <= 5000 else round(3000 * math.sqrt(n / 5000)))
    present = sorted({it.type for it in items}, key=list(PRODUCT_TYPES).index)
    seen: set[str] = set()
    drafts: dict[str, list[SynthQuery]] = {s: [] for s in STRATA}

    def add(stratum: str, text: str, type_: str, form: str, constraints=None, price_max=None, brand=None) -> bool:
        key = normalize_query(text)
        if not key or key in seen:
            return False
        seen.add(key)
        drafts[stratum].append(SynthQuery("", key, stratum, 0, type_, form, dict(constraints or {}), price_max, brand))
        return True

    # Head: bare nouns first (the most searched), then synonyms, then secondary nouns.
    head_cands = []
    for tier in range(3):
        batch = []
        for key in present:
            t = PRODUCT_TYPES[key]
            if tier == 0:
                batch.append((t.nouns[0].lower(), key, "noun"))
            elif tier == 1:
                batch += [(s, key, "synonym") for s in t.synonyms]
            else:
                batch += [(n.lower(), key, "noun") for n in t.nouns[1:]]
        rng.shuffle(batch)
        head_cands += batch
    head_n = min(len(head_cands), max(20, round(0.08 * n_target)))
    for text, key, form in head_cands:
        if len(drafts["head"]) >= head_n:
            break
        add("head", text, key, form)

    remaining = n_target - len(drafts["head"])
    targets = {"torso": round(0.4 * remaining), "tail": remaining - round(0.4 * remaining)}
    for stratum, builder in (("torso", _torso_query), ("tail", _tail_query)):
        attempts = 0
        while len(drafts[stratum]) < targets[stratum] and attempts < 50 * targets[stratum]:
            attempts += 1
            seed_item = items[rng.randrange(len(items))]
            built = builder(seed_item, rng)
            if built is not None:
                add(stratum, *built)

    # Zipf frequencies over the stratum-ordered rank: head > torso > tail, shuffled within.
    ordered: list[SynthQuery] = []
    for stratum in STRATA:
        group = drafts[stratum]
        if stratum != "head":
            rng.shuffle(group)  # head keeps its noun > synonym priority
        ordered += group
    for rank, q in enumerate(ordered, 1):
        q.frequency = max(1, round(50_000 * rank ** -1.3 * math.exp(rng.gauss(0, 0.1))))
    # Noise can invert neighbours; make frequency monotone so the strata stay separated.
    for prev, q in zip(ordered, ordered[1:]):
        q.frequency = min(q.frequency, prev.frequency)
    for rank, q in enumerate(ordered, 1):
        q.query_id = f"q_{rank:06d}"
    return ordered


def _noun_or_synonym(t: ProductType, rng: random.Random, p_synonym: float) -> tuple[str, str]:
    if t.synonyms and rng.random() < p_synonym:
        return rng.choice(t.synonyms), "synonym"
    return rng.choice(t.nouns).lower(), "noun"


def _torso_query(item: Item, rng: random.Random):
    t = PRODUCT_TYPES[item.type]
    noun, _ = _noun_or_synonym(t, rng, 0.25)
    constrainable = [a for a in t.attributes if _value(a, item.attributes[a.name]).torso]
    form = rng.choices(("attribute", "brand", "price", "attribute_price"), (0.45, 0.2, 0.2, 0.15))[0]
    if form.startswith("attribute") and not constrainable:
        form = "price"
    constraints: dict[str, str] = {}
    before, after = [], []
    price_max = brand = None
    if form.startswith("attribute"):
        for a in rng.sample(constrainable, min(len(constrainable), rng.choice((1, 1, 2)))):
            v = _value(a, item.attributes[a.name])
            constraints[a.name] = v.title
            words = rng.choice(v.torso)
            (after if words.startswith("for ") else before).append(words)
        rng.shuffle(before)
    if form == "brand":
        brand = item.brand
        before.insert(0, item.brand.lower())
    if form in ("price", "attribute_price"):
        price_max = _price_cap(item.price, rng)
        after.append(rng.choice(PRICE_CLAUSES_TORSO).format(x=_fmt_price(price_max)))
    text = " ".join([*before, noun, *after])
    return text, item.type, form, constraints, price_max, brand


def _tail_query(item: Item, rng: random.Random):
    t = PRODUCT_TYPES[item.type]
    form = rng.choices(("need", "synonym", "misspelled"), (0.65, 0.25, 0.10))[0]
    if form == "synonym" and not t.synonyms:
        form = "need"
    if form == "need":
        head = rng.choice(t.needs)
        k = rng.choices((0, 1, 2), (0.1, 0.5, 0.4))[0]
    elif form == "synonym":
        head = rng.choice(t.synonyms)
        k = rng.choice((1, 2, 2))
    else:
        # The longest noun word, so the typo always lands (short words are left alone).
        head = _misspell(max(re.findall(r"[a-z]+", rng.choice(t.nouns).lower()), key=len), rng)
        k = 2
    constrainable = [a for a in t.attributes if _value(a, item.attributes[a.name]).tail]
    n_attr = min(len(constrainable), k if rng.random() < 0.6 else k - 1)
    n_attr = max(0, n_attr)
    constraints, clauses = {}, []
    for a in rng.sample(constrainable, n_attr):
        v = _value(a, item.attributes[a.name])
        constraints[a.name] = v.title
        clauses.append(rng.choice(v.tail))
    price_max = None
    if len(clauses) < k:
        price_max = _price_cap(item.price, rng)
        clauses.append(rng.choice(PRICE_CLAUSES_TAIL).format(x=_fmt_price(price_max)))
    rng.shuffle(clauses)
    text = " ".join(filter(None, [rng.choice(OPENERS), head, *clauses])) + rng.choice(SUFFIXES)
    return _noisy(text, rng), item.type, form, constraints, price_max, None


def _value(attr: Attribute, title: str) -> AttrValue:
    for v in attr.values:
        if v.title == title:
            return v
    raise KeyError(f"{attr.name}={title!r}")


def _make_qrels(items: list[Item], queries: list[SynthQuery], nrng: np.random.Generator) -> dict[str, dict[str, int]]:
    # Vectorised matching: one int code per (attribute, value), -1 where the type lacks it.
    codes: dict[tuple[str, str], int] = {}
    attr_names = sorted({a.name for t in PRODUCT_TYPES.values() for a in t.attributes})
    acode = {name: np.full(len(items), -1, dtype=np.int32) for name in attr_names}
    brands = sorted({it.brand for it in items})
    bcode = {b: i for i, b in enumerate(brands)}
    brand_arr = np.array([bcode[it.brand] for it in items], dtype=np.int32)
    price = np.array([it.price for it in items], dtype=np.float64)
    type_keys = list(PRODUCT_TYPES)
    type_arr = np.array([type_keys.index(it.type) for it in items], dtype=np.int32)
    by_type: dict[str, np.ndarray] = {k: np.flatnonzero(type_arr == i) for i, k in enumerate(type_keys)}
    for i, it in enumerate(items):
        for name, val in it.attributes.items():
            if name in acode:
                acode[name][i] = codes.setdefault((name, val), len(codes))

    def matches(idx: np.ndarray, q: SynthQuery, same_type: bool) -> np.ndarray:
        mask = np.ones(len(idx), dtype=bool)
        for name, val in q.constraints.items():
            col = acode[name][idx]
            code = codes.get((name, val), -2)
            # A substitute type is only held to the constraints it can express.
            mask &= (col == code) if same_type else ((col == code) | (col == -1))
        if q.price_max is not None:
            mask &= price[idx] <= q.price_max
        if q.brand is not None and same_type:
            mask &= brand_arr[idx] == bcode.get(q.brand, -1)
        return mask

    def sample(idx: np.ndarray, k: int) -> np.ndarray:
        return np.sort(nrng.choice(idx, size=k, replace=False)) if len(idx) > k else np.sort(idx)

    empty = np.empty(0, dtype=np.int64)
    qrels: dict[str, dict[str, int]] = {}
    for q in queries:
        t = PRODUCT_TYPES[q.type]
        own = by_type[q.type]
        m = matches(own, q, True)
        exact = own[m]
        if len(exact) == 0:  # cannot happen for seeded queries; guard the invariant anyway
            raise AssertionError(f"query {q.text!r} has no exact item")
        subs = [own[~m]] + [by_type[s][matches(by_type[s], q, False)] for s in t.substitutes]
        subs_idx = sample(np.concatenate(subs) if subs else empty, MAX_SUBSTITUTES)
        comps = [by_type[c] for c in t.complements]
        comp_idx = sample(np.concatenate(comps) if comps else empty, MAX_COMPLEMENTS)
        related = {type_keys.index(k) for k in (q.type, *t.substitutes, *t.complements)}
        irrelevant: list[int] = []
        tries = 0
        while len(irrelevant) < MAX_IRRELEVANT and tries < 20:
            tries += 1
            for j in nrng.integers(0, len(items), size=2 * MAX_IRRELEVANT):
                j = int(j)
                if int(type_arr[j]) not in related and j not in irrelevant:
                    irrelevant.append(j)
                    if len(irrelevant) == MAX_IRRELEVANT:
                        break
        judged: dict[str, int] = {}
        for grade, idx in ((3, exact), (2, subs_idx), (1, comp_idx), (0, sorted(irrelevant))):
            for j in idx:
                judged.setdefault(items[int(j)].item_id, grade)
        qrels[q.query_id] = judged
    return qrels


def _make_split(queries: list[SynthQuery], rng: random.Random) -> dict[str, str]:
    # Stratified by stratum so that every stratum is measured on held-out queries.
    split: dict[str, str] = {}
    for stratum in STRATA:
        ids = sorted(q.query_id for q in queries if q.stratum == stratum)
        rng.shuffle(ids)
        n_test = math.ceil(TEST_FRACTION * len(ids)) if len(ids) > 1 else 0
        for i, qid in enumerate(ids):
            split[qid] = "test" if i < n_test else "train"
    return {q.query_id: split[q.query_id] for q in queries}


def _make_users(n: int, rng: random.Random) -> list[Persona]:
    bands = {"budget": (0.0, 0.45), "mid": (0.25, 0.75), "premium": (0.55, 1.0)}
    out = []
    for u in range(n):
        # A few departments dominate each shopper's interest (gamma draws = Dirichlet(0.4)).
        raw = [rng.gammavariate(0.4, 1.0) + 1e-6 for _ in DEPARTMENTS]
        total = sum(raw)
        dept_w = {d: round(w / total, 4) for d, w in zip(DEPARTMENTS, raw)}
        top = sorted(DEPARTMENTS, key=lambda d: -dept_w[d])[:2]
        fav_pool = [k for k, t in PRODUCT_TYPES.items() if t.department in top]
        favourites = sorted(rng.sample(fav_pool, min(len(fav_pool), rng.randint(2, 4))))
        type_w = {k: round(rng.uniform(0.3, 1.0), 3) for k in favourites}
        segment = rng.choices(("budget", "mid", "premium"), (0.4, 0.4, 0.2))[0]
        lo, hi = bands[segment]
        jitter = rng.uniform(-0.1, 0.1)
        sensitivity = rng.uniform(0.5, 1.0) if segment == "budget" else rng.uniform(0.1, 0.7)
        tier_brands = [b for d in top for b, tier in BRANDS[d] if tier == segment]
        tier_brands = tier_brands or [b for d in top for b, _ in BRANDS[d]]
        brands = sorted(rng.sample(tier_brands, min(len(tier_brands), rng.randint(1, 3))))
        out.append(Persona(f"user_{u:05d}", dept_w, type_w, round(max(0.0, lo + jitter), 3),
                           round(min(1.0, hi + jitter), 3), round(sensitivity, 3), brands))
    return out


def price_position(item: Item) -> float:
    """Where an item's price sits in its type's range on a log scale, clipped to 0..1."""
    lo, hi = PRODUCT_TYPES[item.type].price_range
    return min(1.0, max(0.0, math.log(max(item.price, 0.01) / lo) / math.log(hi / lo)))


# --------------------------------------------------------------------------------------------
# Files (BEIR layout) and reading them back
# --------------------------------------------------------------------------------------------

_JSON_OPTS = orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE


def write(dataset: SynthDataset, out_dir: Path) -> dict[str, Path]:
    """Write corpus.jsonl, queries.jsonl, qrels/{train,test}.tsv, users.jsonl, manifest.json."""
    out_dir = Path(out_dir)
    (out_dir / "qrels").mkdir(parents=True, exist_ok=True)
    paths = {
        "corpus": out_dir / "corpus.jsonl",
        "queries": out_dir / "queries.jsonl",
        "qrels_train": out_dir / "qrels" / "train.tsv",
        "qrels_test": out_dir / "qrels" / "test.tsv",
        "users": out_dir / "users.jsonl",
        "manifest": out_dir / "manifest.json",
    }
    with open(paths["corpus"], "wb") as f:
        for it in dataset.items:
            f.write(orjson.dumps({
                "_id": it.item_id, "title": it.title, "text": it.description,
                "metadata": {"category_path": it.category_path, "brand": it.brand, "price": it.price,
                             "attributes": it.attributes, "type": it.type},
            }, option=_JSON_OPTS))
    with open(paths["queries"], "wb") as f:
        for q in dataset.queries:
            f.write(orjson.dumps({
                "_id": q.query_id, "text": q.text,
                "metadata": {"stratum": q.stratum, "frequency": q.frequency, "type": q.type, "form": q.form,
                             "constraints": q.constraints, "price_max": q.price_max, "brand": q.brand},
            }, option=_JSON_OPTS))
    rows = {"train": 0, "test": 0}
    for split in ("train", "test"):
        lines = ["query-id\tcorpus-id\tscore\n"]
        for q in dataset.queries:
            if dataset.split.get(q.query_id) != split:
                continue
            judged = dataset.qrels.get(q.query_id, {})
            for doc_id in sorted(judged, key=lambda d: (-judged[d], d)):
                lines.append(f"{q.query_id}\t{doc_id}\t{judged[doc_id]}\n")
        rows[split] = len(lines) - 1
        paths[f"qrels_{split}"].write_text("".join(lines), encoding="utf-8")
    with open(paths["users"], "wb") as f:
        for p in dataset.users:
            f.write(orjson.dumps({
                "user_id": p.user_id, "department_weights": p.department_weights, "type_weights": p.type_weights,
                "price_low": p.price_low, "price_high": p.price_high, "price_sensitivity": p.price_sensitivity,
                "preferred_brands": p.preferred_brands,
            }, option=_JSON_OPTS))
    by_stratum = {s: sum(1 for q in dataset.queries if q.stratum == s) for s in STRATA}
    by_split = {sp: {s: sum(1 for q in dataset.queries if q.stratum == s and dataset.split.get(q.query_id) == sp)
                     for s in STRATA} for sp in ("train", "test")}
    manifest = {
        "generator": "tailbridge.synthetic.catalog", "version": GENERATOR_VERSION, "seed": dataset.seed,
        "format": "beir",
        "counts": {"items": len(dataset.items), "users": len(dataset.users), "queries": len(dataset.queries),
                   "types": len({it.type for it in dataset.items}),
                   "queries_by_stratum": by_stratum, "queries_by_split": by_split, "qrels_rows": rows},
        "grades": GRADES,
        "files": {k: str(v.relative_to(out_dir)) for k, v in paths.items()},
        "note": "query metadata other than stratum/frequency is ground truth; do not feed it to models",
    }
    paths["manifest"].write_bytes(orjson.dumps(manifest, option=_JSON_OPTS | orjson.OPT_INDENT_2))
    return paths


def load(out_dir: Path) -> SynthDataset:
    """Read back what :func:`write` wrote (for replay and for later training/evaluation runs)."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: no manifest; is this a synth data directory?")
    manifest = orjson.loads(manifest_path.read_bytes())
    beir = load_beir(out_dir, splits=["train", "test"])
    items = [Item(doc_id, d["title"], d["text"], list(d["metadata"]["category_path"]), d["metadata"]["brand"],
                  float(d["metadata"]["price"]), dict(d["metadata"]["attributes"]), d["metadata"]["type"])
             for doc_id, d in beir.corpus.items()]
    queries = []
    for qid, d in beir.queries.items():
        m = d["metadata"]
        queries.append(SynthQuery(qid, d["text"], m["stratum"], int(m["frequency"]), m["type"], m["form"],
                                  dict(m.get("constraints") or {}), m.get("price_max"), m.get("brand")))
    qrels: dict[str, dict[str, int]] = {}
    split: dict[str, str] = {}
    for split_name, judged in beir.qrels.items():
        for qid, docs in judged.items():
            qrels[qid] = dict(docs)
            split[qid] = split_name
    split = {q.query_id: split[q.query_id] for q in queries if q.query_id in split}
    users = []
    users_path = out_dir / "users.jsonl"
    for lineno, u in read_jsonl(users_path):
        try:
            users.append(Persona(u["user_id"], u["department_weights"], u["type_weights"], u["price_low"],
                                 u["price_high"], u["price_sensitivity"], list(u["preferred_brands"])))
        except (KeyError, TypeError) as exc:
            raise BeirFormatError(users_path, lineno, f"bad user record ({exc})") from None
    return SynthDataset(items, queries, qrels, split, users, int(manifest["seed"]))

