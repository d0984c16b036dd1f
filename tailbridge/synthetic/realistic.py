"""``tailbridge data synth --style realistic``: a title-only home-improvement catalog that looks
like a real one, to exercise what the demo data does not (written in the same BEIR layout).

What makes it hard, on purpose, each the way real product-search data is:
- Titles only (no description, category or attributes): brand, series, sizes with units,
  colours / finishes, materials and a model number, in several title templates.
- Product families: a brand's series comes in variants (sizes x finishes) that share most of
  the title and differ in one value and a model-number suffix -- near-duplicates that are often
  unjudged for a query yet relevant (false negatives for hard-negative mining).
- Queries in unit variants ("1/2 in." / "1/2 inch" / "1/2in" / "half inch"), abbreviations
  ("blk", "ss", "orb"), misspellings, partial model numbers ("r7120", "dcd771"), brand + noun,
  bare nouns; some carry no indexable term at all ("1/2 in", "a").
- Many judged items per query (the judged pool of several systems: same-type items, lexical
  look-alikes sharing a finish or size, substitutes, complements, a few random items, drawn by
  item popularity, so judgements concentrate and many items are never judged), most of them
  partly relevant, graded by a noisy rater: the true grade (3 all constraints, 2 same type
  or a substitute that fits, 1 complement / same type that misses most constraints, 0 other)
  moves by one step with probability ``RATER_NOISE``.
Query metadata beyond stratum and frequency is ground truth; no model reads it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from tailbridge.synthetic.catalog import (
    STRATA,
    Item,
    SynthDataset,
    SynthQuery,
    _make_split,
    _misspell,
)

RATER_NOISE = 0.35
POPULARITY_EXPONENT = 1.3
QUERIES_PER_ITEM = 0.25

# Finishes: title form -> query forms (the first is the plain one).
FINISHES = {
    "Matte Black": ("black", "matte black", "blk", "matte blk"),
    "Brushed Nickel": ("brushed nickel", "nickel", "bn", "brushed nikel"),
    "Oil-Rubbed Bronze": ("oil rubbed bronze", "bronze", "orb"),
    "Chrome": ("chrome", "polished chrome", "chrm"),
    "Stainless Steel": ("stainless steel", "stainless", "ss"),
    "White": ("white", "wht"),
    "Gray": ("gray", "grey", "gry"),
    "Red": ("red",),
    "Yellow": ("yellow", "yel"),
}
# Sizes: (title form, query forms), grouped by the unit they use.
SIZES = {
    "inch": [("1/2 in.", ("1/2 inch", "1/2in", "half inch", '1/2"')), ("3/4 in.", ("3/4 inch", "3/4in", '3/4"')),
             ("1 in.", ("1 inch", "1in", '1"')), ("2 in.", ("2 inch", "2in", '2"')),
             ("4 in.", ("4 inch", "4in", '4"')), ("6 in.", ("6 inch", "6in", '6"'))],
    "ft": [("10 ft.", ("10 ft", "10ft", "10 foot", "10'")), ("25 ft.", ("25 ft", "25ft", "25 foot")),
           ("50 ft.", ("50 ft", "50ft", "50 foot")), ("100 ft.", ("100 ft", "100ft", "100 foot"))],
    "volt": [("12-Volt", ("12v", "12 volt", "12 v")), ("18-Volt", ("18v", "18 volt")),
             ("20-Volt MAX", ("20v", "20 volt", "20v max")), ("40-Volt", ("40v", "40 volt"))],
    "watt": [("40-Watt", ("40w", "40 watt")), ("60-Watt", ("60w", "60 watt")), ("100-Watt", ("100w", "100 watt"))],
    "gal": [("1 gal.", ("1 gallon", "1 gal", "gallon")), ("5 gal.", ("5 gallon", "5 gal", "5gal"))],
    "pack": [("(2-Pack)", ("2 pack", "2pk")), ("(4-Pack)", ("4 pack", "4pk")), ("(10-Pack)", ("10 pack", "10pk"))],
}
MATERIALS = ("Brass", "Copper", "PVC", "Steel", "Aluminum", "Vinyl", "Fiberglass", "Cast Iron")


@dataclass(frozen=True)
class Kind:
    key: str
    nouns: tuple[str, ...]  # title nouns
    query_nouns: tuple[str, ...]  # how shoppers name it (abbreviations, synonyms)
    units: tuple[str, ...]  # size families it comes in
    finishes: bool
    materials: bool
    brands: tuple[str, ...]
    substitutes: tuple[str, ...] = ()
    complements: tuple[str, ...] = ()


KINDS = {k.key: k for k in (
    Kind("faucet", ("Kitchen Faucet", "Pull-Down Kitchen Faucet"), ("kitchen faucet", "faucet", "kitchen tap",
         "pulldown faucet"), (), True, False, ("Moen", "Delta", "Pfister", "Glacier Bay", "Kohler"),
         ("bath_faucet",), ("supply_line", "sink")),
    Kind("bath_faucet", ("Bathroom Faucet", "Widespread Bathroom Faucet"), ("bathroom faucet", "bath faucet",
         "lavatory faucet", "vanity faucet"), (), True, False, ("Moen", "Delta", "Pfister", "Glacier Bay", "Kohler"),
         ("faucet",), ("supply_line", "sink")),
    Kind("sink", ("Undermount Kitchen Sink", "Drop-In Sink"), ("kitchen sink", "sink", "undermount sink"), ("inch",),
         True, False, ("Kohler", "Glacier Bay", "Elkay"), (), ("faucet",)),
    Kind("supply_line", ("Faucet Supply Line", "Braided Supply Line"), ("supply line", "faucet connector",
         "braided hose"), ("inch",), False, True, ("Everbilt", "BrassCraft", "Fluidmaster"), ("pipe",), ("faucet",)),
    Kind("pipe", ("Pipe", "Schedule 40 Pipe"), ("pipe", "sch 40 pipe", "tubing"), ("inch", "ft"), False, True,
         ("Charlotte", "JM Eagle", "Everbilt", "Mueller"), ("fitting",), ("fitting", "pipe_cutter")),
    Kind("fitting", ("Elbow Fitting", "Coupling", "Tee Fitting"), ("elbow", "pipe fitting", "coupling", "tee"),
         ("inch",), False, True, ("Charlotte", "SharkBite", "Everbilt", "Mueller"), ("pipe",), ("pipe",)),
    Kind("pipe_cutter", ("Tubing Cutter", "Pipe Cutter"), ("pipe cutter", "tube cutter"), ("inch",), False, False,
         ("Ridgid", "Milwaukee", "Husky"), (), ("pipe",)),
    Kind("drill", ("Cordless Drill/Driver", "Brushless Drill/Driver Kit"), ("cordless drill", "drill",
         "drill driver", "power drill"), ("volt",), False, False, ("DEWALT", "Milwaukee", "Ryobi", "Makita"),
         ("impact_driver",), ("battery", "drill_bits")),
    Kind("impact_driver", ("Impact Driver", "Brushless Impact Driver"), ("impact driver", "impact drill",
         "impact"), ("volt",), False, False, ("DEWALT", "Milwaukee", "Ryobi", "Makita"), ("drill",),
         ("battery", "drill_bits")),
    Kind("battery", ("Lithium-Ion Battery Pack", "Battery 2-Pack"), ("battery", "batteries", "li ion battery"),
         ("volt",), False, False, ("DEWALT", "Milwaukee", "Ryobi", "Makita"), (), ("drill", "impact_driver")),
    Kind("drill_bits", ("Drill Bit Set", "Titanium Drill Bit Set"), ("drill bits", "bit set", "drill bit"),
         ("pack",), False, False, ("DEWALT", "Milwaukee", "Bosch", "Diablo"), (), ("drill",)),
    Kind("hose", ("Garden Hose", "Heavy-Duty Garden Hose"), ("garden hose", "hose", "water hose"), ("ft",), True,
         True, ("Flexzilla", "Gilmour", "Swan"), (), ("nozzle",)),
    Kind("nozzle", ("Hose Nozzle", "Spray Nozzle"), ("hose nozzle", "spray nozzle", "sprayer"), (), True, True,
         ("Gilmour", "Melnor", "Orbit"), (), ("hose",)),
    Kind("bulb", ("LED Light Bulb", "A19 LED Bulb"), ("led bulb", "light bulb", "bulb", "a19"), ("watt", "pack"),
         False, False, ("Philips", "Feit Electric", "EcoSmart", "GE"), (), ("fixture",)),
    Kind("fixture", ("Flush Mount Ceiling Light", "Ceiling Light Fixture"), ("ceiling light", "flush mount light",
         "light fixture"), ("inch",), True, False, ("Hampton Bay", "Home Decorators", "Progress Lighting"),
         ("pendant",), ("bulb",)),
    Kind("pendant", ("Pendant Light", "Mini Pendant"), ("pendant light", "pendant", "hanging light"), ("inch",), True,
         False, ("Hampton Bay", "Home Decorators", "Progress Lighting"), ("fixture",), ("bulb",)),
    Kind("paint", ("Interior Paint", "Exterior Paint & Primer"), ("paint", "interior paint", "exterior paint",
         "paint and primer"), ("gal",), True, False, ("BEHR", "Glidden", "Rust-Oleum", "Valspar"), ("stain",),
         ("roller", "tape")),
    Kind("stain", ("Wood Stain", "Semi-Transparent Stain"), ("wood stain", "stain", "deck stain"), ("gal",), True,
         False, ("BEHR", "Minwax", "Rust-Oleum"), ("paint",), ("roller",)),
    Kind("roller", ("Paint Roller Cover", "Roller Frame"), ("paint roller", "roller", "roller cover"),
         ("inch", "pack"), False, False, ("Wooster", "Purdy", "Everbilt"), (), ("paint", "tape")),
    Kind("tape", ("Painter's Tape", "Masking Tape"), ("painters tape", "masking tape", "tape"), ("inch", "pack"),
         False, False, ("ScotchBlue", "FrogTape", "Duck"), (), ("paint", "roller")),
    Kind("door_lever", ("Door Lever", "Passage Door Lever"), ("door handle", "door lever", "lever handle"), (),
         True, False, ("Kwikset", "Schlage", "Defiant"), ("knob",), ("deadbolt",)),
    Kind("knob", ("Door Knob", "Privacy Door Knob"), ("door knob", "knob", "doorknob"), (), True, False,
         ("Kwikset", "Schlage", "Defiant"), ("door_lever",), ("deadbolt",)),
    Kind("deadbolt", ("Single Cylinder Deadbolt", "Smart Deadbolt"), ("deadbolt", "dead bolt", "smart lock"), (),
         True, False, ("Kwikset", "Schlage", "Defiant"), (), ("door_lever", "knob")),
    Kind("shelf_bracket", ("Shelf Bracket", "Heavy-Duty Shelf Bracket"), ("shelf bracket", "bracket",
         "shelf support"), ("inch", "pack"), True, True, ("Everbilt", "Rubbermaid", "John Sterling"), (), ()),
)}


@dataclass
class _Spec:
    """An item's ground truth: its kind, brand, family (series) model, size and finish."""
    kind: str
    brand: str
    model: str  # full model number; the family is everything before the last '-'
    size: str | None
    finish: str | None
    material: str | None

    @property
    def family(self) -> str:
        return self.model.rsplit("-", 1)[0]


_SYLLABLES = ("ka", "vor", "lin", "tek", "mar", "zen", "dro", "quil", "bas", "ner", "cor", "fy", "lux", "pra",
              "sol", "tri", "ven", "gal", "rho", "mek", "tor", "vio", "xan", "bel")


def _pseudo_word(rng: random.Random) -> str:
    """A made-up brand or series name: a token no pretrained model and few queries have seen."""
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 2, 3)))).capitalize()


def _model_number(rng: random.Random, brand: str) -> str:
    prefix = "".join(c for c in brand.upper() if c.isalpha())[:rng.choice((1, 2, 3))]
    return f"{prefix}{rng.randrange(100, 99999)}{rng.choice(('', '', 'C2', 'B', 'X'))}"


def _title(rng: random.Random, spec: _Spec, series: str) -> str:
    kind = KINDS[spec.kind]
    noun = rng.choice(kind.nouns)
    parts = [p for p in (spec.size, spec.finish, spec.material) if p]
    template = rng.randrange(4)
    if template == 0:
        return " ".join([spec.brand, series, *parts, noun, spec.model])
    if template == 1:
        return f"{spec.brand} {series} {noun} in {', '.join(parts) or 'Standard'} ({spec.model})" if parts else \
            f"{spec.brand} {series} {noun} {spec.model}"
    if template == 2:
        return " ".join([*parts, series, noun, "by", spec.brand, spec.model])
    return f"{spec.model} {spec.brand} {' '.join(parts)} {noun}".replace("  ", " ")


def _make_items(n: int, rng: random.Random) -> tuple[list[Item], list[_Spec]]:
    items, specs = [], []
    kinds = list(KINDS.values())
    # The long tail of a real catalog: beside the known brands, many small ones (made-up words),
    # so most brand and series tokens of a test query are rare or unseen in training.
    extra_brands = {k.key: [_pseudo_word(rng) for _ in range(max(4, n // 150))] for k in kinds}
    while len(items) < n:
        kind = rng.choice(kinds)
        brand = rng.choice(kind.brands) if rng.random() < 0.4 else rng.choice(extra_brands[kind.key])
        series = _pseudo_word(rng)
        family = _model_number(rng, brand)
        sizes = [s for u in kind.units for s, _ in SIZES[u]] or [None]
        finishes = list(FINISHES) if kind.finishes else [None]
        material = rng.choice(MATERIALS) if kind.materials else None
        # A family comes in 1-6 variants (sizes x finishes): near-duplicate titles.
        combos = [(s, f) for s in rng.sample(sizes, min(len(sizes), rng.choice((1, 1, 2, 3))))
                  for f in rng.sample(finishes, min(len(finishes), rng.choice((1, 1, 2))))]
        for size, finish in combos:
            if len(items) == n:
                break
            suffix = "".join(w[0] for w in f"{finish or ''} {size or ''}".replace("/", "").replace("(", "").split())
            spec = _Spec(kind.key, brand, f"{family}-{suffix.upper() or 'A'}", size, finish, material)
            title = _title(rng, spec, series)
            price = round(math.exp(rng.uniform(math.log(3), math.log(400))), 2)
            items.append(Item(f"p{len(items):06d}", title, "", [], "", price, {}, kind.key))
            specs.append(spec)
    return items, specs


def _query_form(value: str | None, table: dict[str, tuple[str, ...]], rng: random.Random) -> str | None:
    return None if value is None else rng.choice(table[value])


def _noisy_words(text: str, rng: random.Random, p: float) -> str:
    words = text.split()
    for i, w in enumerate(words):
        if rng.random() < p:
            words[i] = _misspell(w, rng)
    return " ".join(words)


def _make_query(spec: _Spec, rng: random.Random) -> tuple[str, str, str, dict[str, str]]:
    """(stratum, text, form, constraints) for a query seeded by one item."""
    kind = KINDS[spec.kind]
    noun = rng.choice(kind.query_nouns)
    size_forms = {s: forms for u in SIZES.values() for s, forms in u}
    stratum = rng.choices(STRATA, (0.15, 0.45, 0.40))[0]
    if stratum == "head":
        return stratum, noun, "noun", {}
    if stratum == "torso":
        form = rng.choice(("brand", "size", "finish", "brand_size"))
        parts, constraints = [], {}
        if "brand" in form:
            parts.append(spec.brand.lower())
            constraints["brand"] = spec.brand
        if "size" in form and spec.size:
            parts.append(_query_form(spec.size, size_forms, rng))
            constraints["size"] = spec.size
        if form == "finish" and spec.finish:
            parts.append(_query_form(spec.finish, FINISHES, rng))
            constraints["finish"] = spec.finish
        return stratum, " ".join([*parts, noun]), form if constraints else "noun", constraints
    form = rng.choice(("model", "model", "model_noun", "spec", "spec", "no_term"))
    family = spec.family.lower()
    if form.startswith("model"):
        cut = family[:max(3, len(family) - rng.choice((0, 1, 2)))]  # partial model numbers
        text = cut if form == "model" else f"{spec.brand.lower()} {cut} {noun}"
        return stratum, text, form, {"family": spec.family}
    if form == "no_term" and spec.size:
        return stratum, rng.choice(size_forms[spec.size]), form, {"size": spec.size}
    parts, constraints = [], {}
    for key, value, table in (("size", spec.size, size_forms), ("finish", spec.finish, FINISHES)):
        if value:
            parts.append(_query_form(value, table, rng))
            constraints[key] = value
    if spec.material and rng.random() < 0.5:
        parts.append(spec.material.lower())
        constraints["material"] = spec.material
    rng.shuffle(parts)
    return stratum, _noisy_words(" ".join([*parts, noun]), rng, 0.2), "spec", constraints


def _true_grade(spec: _Spec, q_kind: str, constraints: dict[str, str]) -> int:
    kind = KINDS[q_kind]
    values = {"brand": spec.brand, "size": spec.size, "finish": spec.finish, "material": spec.material,
              "family": spec.family}
    met = sum(values[k] == v for k, v in constraints.items())
    if spec.kind == q_kind:
        if met == len(constraints):
            return 3
        return 2 if met * 2 >= len(constraints) and "family" not in constraints else 1
    if spec.kind in kind.substitutes:
        return 2 if met == len(constraints) and "family" not in constraints else 1
    if spec.kind in kind.complements:
        return 1
    return 0


@dataclass
class _Index:
    """Catalog rows by kind, finish and size: what a judged pool is drawn from, and each row's
    popularity (Zipf): judged pools come from what search systems retrieve, which favours
    popular items, so many catalog items are never judged for any training query."""
    kind: dict[str, np.ndarray]
    finish: dict[str, np.ndarray]
    size: dict[str, np.ndarray]
    popularity: np.ndarray

    @classmethod
    def of(cls, specs: list[_Spec], nrng: np.random.Generator) -> _Index:
        def by(attr: str) -> dict[str, np.ndarray]:
            groups: dict[str, list[int]] = {}
            for r, s in enumerate(specs):
                if getattr(s, attr) is not None:
                    groups.setdefault(getattr(s, attr), []).append(r)
            return {k: np.asarray(v) for k, v in groups.items()}
        popularity = 1.0 / (1 + nrng.permutation(len(specs))) ** POPULARITY_EXPONENT
        return cls(by("kind"), by("finish"), by("size"), popularity)


def _judge(specs: list[_Spec], index: _Index, q_kind: str, constraints: dict[str, str], seed_row: int,
           nrng: np.random.Generator) -> dict[int, int]:
    """The judged pool of one query and its noisy grades."""
    kind = KINDS[q_kind]
    empty = np.zeros(0, dtype=np.int64)
    same = index.kind.get(q_kind, empty)
    related = np.concatenate([empty, *(index.kind.get(k, empty) for k in kind.substitutes + kind.complements)])
    lookalike = np.concatenate([empty, index.finish.get(constraints.get("finish"), empty),
                                index.size.get(constraints.get("size"), empty)])
    pool = [seed_row]
    for rows, k in ((same, 18), (related, 8), (lookalike, 6), (np.arange(len(specs)), 4)):
        if len(rows):
            p = index.popularity[rows] / index.popularity[rows].sum()
            pool += [int(r) for r in nrng.choice(rows, size=min(k, len(rows)), replace=False, p=p)]
    judged = {}
    for r in dict.fromkeys(pool):
        grade = _true_grade(specs[r], q_kind, constraints)
        if nrng.random() < RATER_NOISE:
            grade = int(np.clip(grade + nrng.choice((-1, 1)), 0, 3))
        judged[r] = grade
    return judged


def generate(items: int = 5000, seed: int = 0) -> SynthDataset:
    """Catalog, queries (about QUERIES_PER_ITEM per item), noisy graded judgements and the train/test split."""
    if items < 20:
        raise ValueError("the realistic style needs at least 20 items")
    rng = random.Random(f"{seed}:realistic")
    item_list, specs = _make_items(items, rng)
    qrng, nrng = random.Random(f"{seed}:realistic-queries"), np.random.default_rng([seed, 16])
    queries, qrels, seen = [], {}, set()
    index = _Index.of(specs, nrng)
    for _ in range(round(QUERIES_PER_ITEM * items) * 3):
        if len(queries) >= round(QUERIES_PER_ITEM * items):
            break
        row = qrng.randrange(len(item_list))
        stratum, text, form, constraints = _make_query(specs[row], qrng)
        if text in seen:
            continue
        seen.add(text)
        qid = f"rq_{len(queries):06d}"
        queries.append(SynthQuery(qid, text, stratum, 0, specs[row].kind, form, constraints))
        qrels[qid] = {item_list[r].item_id: g for r, g in _judge(specs, index, specs[row].kind, constraints, row,
                                                                  nrng).items()}
    # Zipf frequency by stratum rank (head most frequent), as the loaders derive strata from.
    ordered = sorted(queries, key=lambda q: (STRATA.index(q.stratum), q.query_id))
    for rank, q in enumerate(ordered, 1):
        q.frequency = max(1, round(20_000 * rank ** -1.1))
    return SynthDataset(item_list, queries, qrels, _make_split(queries, random.Random(f"{seed}:split")), [], seed)
