"""Synthetic e-commerce catalog and search queries with a real vocabulary gap (the demo data).

Design, in short:
- A hand-written taxonomy of 65 product types in 11 departments. Each type has the nouns
  its titles use, query-only synonyms (couch for sofa), colloquial "need" phrasings that
  never share words with its titles ("somewhere comfy to plop down in the living room"),
  attributes whose values have a title form, a torso query form and a colloquial tail form
  ("Navy" / "navy" / "in dark blue"), a price range, substitute and complement types.
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
from pathlib import Path

import numpy as np
import orjson

from tailbridge.models.data.beir import BeirFormatError, load_beir
from tailbridge.vocab import normalize_query

GENERATOR_VERSION = 1
GRADES = {"exact": 3, "substitute": 2, "complement": 1, "irrelevant": 0}
STRATA = ("head", "torso", "tail")
MAX_SUBSTITUTES, MAX_COMPLEMENTS, MAX_IRRELEVANT = 30, 15, 10
TEST_FRACTION = 0.2

# --------------------------------------------------------------------------------------------
# Taxonomy
# --------------------------------------------------------------------------------------------


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


def _vals(*specs: str) -> tuple[AttrValue, ...]:
    # "Title|torso form;torso form|tail clause;tail clause"
    out = []
    for spec in specs:
        title, torso, tail = spec.split("|")
        out.append(AttrValue(title, tuple(filter(None, torso.split(";"))), tuple(filter(None, tail.split(";")))))
    return tuple(out)


def _a(name: str, placement: str, values: tuple[AttrValue, ...]) -> Attribute:
    return Attribute(name, placement, values)


FURN_COLORS = _vals(
    "Navy|navy;navy blue|in dark blue;in a deep blue",
    "Charcoal|charcoal|in dark gray;in a smoky gray",
    "Ivory|ivory|in off white;in a creamy white",
    "Sage|sage;sage green|in muted green;in a soft green",
    "Rust|rust|in burnt orange;in terracotta",
    "Blush|blush|in pale pink;in light pink",
)
UPHOLSTERY = _vals(
    "Velvet|velvet|in soft plush material;thats fuzzy and soft",
    "Top-Grain Leather|leather;top grain leather|in real hide;that wipes down easily",
    "Performance Fabric|performance fabric|that survives spills and kids;that wont stain",
    "Linen Blend|linen|in a breathable natural weave;with a natural woven look",
)
WOOD = _vals(
    "Walnut|walnut|in dark wood;with a dark wood look",
    "Natural Oak|oak;natural oak|in light wood;with a pale wood look",
    "Espresso|espresso|in very dark brown;almost black wood",
    "Alabaster|alabaster|in painted white;in bright white",
)
TECH_COLORS = _vals(
    "Midnight|midnight|in black;all black one",
    "Starlight|starlight|in white;in pearly white",
    "Graphite|graphite|in dark gray;in space gray",
    "Coral|coral|in pinkish orange;in salmon color",
    "Glacier|glacier|in light blue;in icy blue",
)
APPAREL_COLORS = _vals(
    "Heather Grey|heather grey|in light gray;in marled gray",
    "Burgundy|burgundy|in wine red;in dark red",
    "Olive|olive|in army green;in khaki green",
    "Cobalt|cobalt|in bright blue;in electric blue",
    "Onyx|onyx|in black;in pitch black",
    "Mustard|mustard|in yellow;in golden yellow",
)
HOME_COLORS = _vals(
    "Slate|slate|in blue gray;in stormy gray",
    "Oatmeal|oatmeal|in beige;in sandy beige",
    "Forest|forest;forest green|in dark green;in pine green",
    "Dusty Rose|dusty rose|in muted pink;in faded pink",
    "Indigo|indigo|in dark navy;in very dark blue",
)
GENDER = _vals(
    "Men's|mens;men's|for my husband;for my boyfriend;for a guy",
    "Women's|womens;women's|for my wife;for my girlfriend;for a lady",
)
APPAREL_SIZES = _vals(
    "Size S|small|in a small;that fits petite",
    "Size M|medium|in a medium;average build",
    "Size L|large|in a large;for a big build",
    "Size XL|xl;extra large|in an extra large;for a tall heavy guy",
)
SHOE_SIZES = _vals(
    "Size 7|size 7|that fits a seven;in a seven",
    "Size 8|size 8|that fits an eight;in an eight",
    "Size 9|size 9|that fits a nine;in a nine",
    "Size 10|size 10|that fits a ten;in a ten",
    "Size 11|size 11|that fits an eleven;in an eleven",
)
DOG_SIZES = _vals(
    "Small|small|for a chihuahua;for a pup under 20 pounds;for my yorkie",
    "Medium|medium|for a beagle;for a 40 pound pup;for my corgi",
    "Large|large|for a golden retriever;for a 70 lb lab;for a big pup",
    "XL|xl;extra large|for a great dane;for a 120 pound mastiff;for a giant breed",
)
BABY_AGES = _vals(
    "6M+|6 month;6m|for my 6 month old;for a baby just starting solids",
    "12M+|12 month;12m|for my one year old;for a 1 yr old",
    "18M+|18 month;18m|for my 18 month old;for an older toddler",
)
KID_AGES = _vals(
    "Ages 1-3|ages 1-3|for my toddler;for a 2 year old",
    "Ages 3-5|ages 3-5;preschool|for a 4 year old;for a preschooler",
    "Ages 6-12|ages 6-12|for an 8 year old;for a grade schooler",
    "Ages 12+|ages 12+;teen|for a teenager;for a 14 year old",
)
PIPE_SIZES = _vals(
    '1/2 in.|1/2 inch;1/2"|half inch;one half inch',
    '3/4 in.|3/4 inch;3/4"|three quarter inch;three quarters of an inch',
    "1 in.|1 inch|one inch wide;a full inch",
    "1-1/4 in.|1-1/4 inch;1 1/4 inch|inch and a quarter;one and a quarter inch",
)
NOISE_CANCELLING = "Noise Cancelling|noise cancelling;anc|that block out the subway;that shut out the world"
PACKS = _vals("2-Pack|2 pack|two of them;a pair", "4-Pack|4 pack|four of them;a bunch of them")


def _t(key, path, nouns, synonyms, needs, attrs, price, subs=(), comps=(), blurb=""):
    return ProductType(key, tuple(path), tuple(nouns), tuple(synonyms), tuple(needs), tuple(attrs), price,
                       tuple(subs), tuple(comps), blurb)


_TYPES = [
    # --- Furniture ---------------------------------------------------------------------
    _t("sofa", ["Furniture", "Living Room", "Sofas"], ["Sofa"], ["couch", "settee", "davenport"],
       ["somewhere comfy to plop down in the living room", "place to crash and binge shows",
        "where the whole family can veg out and watch tv", "something to lounge on in my den",
        "comfy spot for guests to hang out"],
       [_a("seats", "prefix", _vals("2-Seater|2 seater|for two people;that fits two",
                                    "3-Seater|3 seater|for three people;that fits 3 ppl",
                                    "4-Seater|4 seater|for a family of four;that fits four adults")),
        _a("material", "prefix", UPHOLSTERY), _a("color", "suffix", FURN_COLORS)],
       (349, 2499), ["sectional", "accent_chair"], ["coffee_table", "area_rug", "side_table"],
       "Kiln-dried hardwood frame with pocketed coil cushions and removable covers."),
    _t("sectional", ["Furniture", "Living Room", "Sectionals"], ["Sectional", "Modular Sectional"],
       ["l shaped couch", "corner couch", "u shaped couch"],
       ["huge seating that wraps around the corner of the room", "something the whole family can pile onto for movie night",
        "big enough to nap on with the dog", "configurable lounging for a big basement"],
       [_a("orientation", "prefix", _vals("Left-Facing|left facing|with the long part on the left",
                                          "Right-Facing|right facing|with the long part on the right")),
        _a("material", "prefix", UPHOLSTERY), _a("color", "suffix", FURN_COLORS)],
       (899, 3999), ["sofa"], ["coffee_table", "area_rug"],
       "Reversible chaise module, high-resilience foam and a hardwood frame."),
    _t("accent_chair", ["Furniture", "Living Room", "Accent Chairs"], ["Accent Chair", "Armchair"],
       ["wingback", "occasional chair", "tub chair"],
       ["cozy spot to read in the corner", "somewhere for one person to curl up with a book",
        "extra seating for a nook by the window", "comfy single seat for the bedroom"],
       [_a("material", "prefix", UPHOLSTERY), _a("color", "suffix", FURN_COLORS)],
       (149, 899), ["sofa"], ["side_table", "bookcase"],
       "Tapered solid legs, sinuous spring base and a curved back."),
    _t("coffee_table", ["Furniture", "Living Room", "Coffee Tables"], ["Coffee Table", "Cocktail Table"],
       ["centre table", "lounge table"],
       ["something to put drinks on in front of the couch", "spot to rest my feet and mugs in the living room",
        "low surface for remotes and magazines", "place for board games in front of the sofa"],
       [_a("shape", "prefix", _vals("Round|round|thats circular;with no corners",
                                    "Rectangular|rectangular|thats long and narrow;with straight edges",
                                    "Oval|oval|thats egg shaped;with rounded ends")),
        _a("finish", "suffix", WOOD)],
       (79, 899), ["side_table"], ["sofa", "area_rug"],
       "Solid wood top with a lower shelf for storage; assembly in under 20 minutes."),
    _t("side_table", ["Furniture", "Living Room", "End Tables"], ["End Table", "Side Table"],
       ["nightstand", "lamp stand"],
       ["little spot next to the armchair for my tea", "somewhere to put a lamp beside the couch",
        "small surface next to the bed for my phone", "tiny stand to hold a drink by the recliner"],
       [_a("finish", "suffix", WOOD)],
       (39, 399), ["coffee_table"], ["accent_chair", "sofa"],
       "Compact footprint with a drawer and an open shelf."),
    _t("bookcase", ["Furniture", "Office", "Bookcases"], ["Bookcase", "Bookshelf"],
       ["book shelves", "shelving unit", "etagere"],
       ["somewhere to put all my paperbacks", "place to display novels and plants against a wall",
        "tall storage for my records and trinkets", "organize my personal library"],
       [_a("tiers", "prefix", _vals("3-Tier|3 tier|with three levels;thats waist high",
                                    "5-Tier|5 tier|with five levels;thats tall",
                                    "6-Tier|6 tier|with six levels;that goes almost to the ceiling")),
        _a("finish", "suffix", WOOD)],
       (59, 599), ["tv_stand"], ["accent_chair"],
       "Adjustable shelves, anti-tip hardware included."),
    _t("tv_stand", ["Furniture", "Living Room", "TV Stands"], ["TV Stand", "Media Console"],
       ["entertainment center", "television cabinet", "credenza"],
       ["something to put the television on", "hide the cable box and game consoles under the screen",
        "long low cabinet under a 65 inch screen", "keep the remotes and controllers organized"],
       [_a("width", "prefix", _vals('48"|48 inch|about four feet wide;for a small screen',
                                    '60"|60 inch|about five feet wide;for a mid size screen',
                                    '70"|70 inch|about six feet wide;for a huge screen')),
        _a("finish", "suffix", WOOD)],
       (99, 999), ["bookcase"], ["hdmi_cable", "area_rug"],
       "Cable management cutouts and adjustable interior shelving."),
    _t("bed_frame", ["Furniture", "Bedroom", "Beds"], ["Platform Bed Frame", "Upholstered Bed"],
       ["bedstead", "bed base", "headboard"],
       ["something to hold my mattress off the floor", "base to put the mattress on with no box spring",
        "bedroom upgrade so im not sleeping on the floor"],
       [_a("bed_size", "prefix", _vals("Twin|twin|single size;for one kid",
                                       "Full|full|double size;for a double mattress",
                                       "Queen|queen|60 by 80 inch;standard size for couples",
                                       "King|king|76 by 80 inch;extra wide for two grownups")),
        _a("color", "suffix", FURN_COLORS)],
       (149, 1799), [], ["mattress"],
       "Wood slat support system; no box spring required."),
    _t("mattress", ["Furniture", "Bedroom", "Mattresses"], ["Hybrid Mattress", "Memory Foam Mattress"],
       ["bed in a box", "sleep pad"],
       ["stop waking up with a sore back", "something better to sleep on than my old lumpy one",
        "sleep cooler at night", "good nights rest for a side sleeper"],
       [_a("bed_size", "prefix", _vals("Twin|twin|single size;for one kid",
                                       "Full|full|double size;for a double bed",
                                       "Queen|queen|60 by 80 inch;standard size for couples",
                                       "King|king|76 by 80 inch;extra wide for two grownups")),
        _a("firmness", "prefix", _vals("Medium-Firm|medium firm|not too hard not too soft;with some give",
                                       "Firm|firm|really supportive;that doesnt sag",
                                       "Plush|plush|thats soft like a cloud;that you sink into"))],
       (199, 1999), [], ["bed_frame"],
       "Gel-infused foam layers over individually wrapped coils; 100-night trial."),
    # --- Kitchen -----------------------------------------------------------------------
    _t("chef_knife", ["Kitchen", "Cutlery", "Chef Knives"], ["Chef's Knife", "Chef Knife"],
       ["cooks knife", "gyuto", "kitchen blade"],
       ["something sharp for chopping onions", "dice veggies quickly", "cutter for slicing meat and herbs",
        "slice tomatoes without squishing them"],
       [_a("blade", "prefix", _vals('6"|6 inch|six inch;small one',
                                    '8"|8 inch|eight inch;standard length',
                                    '10"|10 inch|ten inch;long one')),
        _a("steel", "prefix", _vals("German Steel|german steel|that stays sharp forever;thats heavy and durable",
                                    "Damascus|damascus|with that wavy pattern;with a rippled pattern"))],
       (19, 249), [], ["cutting_board"],
       "Full-tang forged blade, ergonomic handle, hand-sharpened to 15 degrees."),
    _t("cutting_board", ["Kitchen", "Prep", "Cutting Boards"], ["Cutting Board"],
       ["chopping block", "chopping board", "butcher block"],
       ["surface to chop veggies on that wont dull my blade", "something to slice bread on",
        "thing to carve the roast on", "protect my counters while dicing"],
       [_a("material", "prefix", _vals("Bamboo|bamboo|from grass wood;eco friendly",
                                       "Acacia|acacia|in a rich hardwood;wooden and pretty",
                                       "BPA-Free Polypropylene|plastic|that goes in the dishwasher;non wood")),
        _a("size", "suffix", _vals("Small|small|for a little apartment;that fits in a drawer",
                                   "Large|large|for prepping big meals;huge one"))],
       (12, 119), [], ["chef_knife"],
       "Juice groove and non-slip feet; reversible."),
    _t("skillet", ["Kitchen", "Cookware", "Skillets"], ["Cast Iron Skillet"],
       ["frying pan", "fry pan", "griddle pan"],
       ["heavy pan to sear steak", "something to make cornbread in the oven and on the stove",
        "cookware that lasts forever and can go camping", "get a good crust on burgers"],
       [_a("diameter", "prefix", _vals('8"|8 inch|eight inch;small',
                                       '10"|10 inch|ten inch;medium sized',
                                       '12"|12 inch|twelve inch;family sized'))],
       (15, 149), ["nonstick_pan"], ["chef_knife"],
       "Pre-seasoned with vegetable oil; oven safe to 500F."),
    _t("nonstick_pan", ["Kitchen", "Cookware", "Nonstick Pans"], ["Ceramic Nonstick Pan", "Nonstick Frypan"],
       ["teflon pan", "egg pan", "omelette pan"],
       ["make eggs without them sticking", "easy to clean cookware for flipping pancakes",
        "cook crepes that slide right off"],
       [_a("diameter", "prefix", _vals('8"|8 inch|eight inch;small',
                                       '10"|10 inch|ten inch;medium sized',
                                       '12"|12 inch|twelve inch;family sized')),
        _a("color", "suffix", HOME_COLORS)],
       (19, 129), ["skillet"], ["cutting_board"],
       "PFAS-free coating, induction-ready base, stay-cool handle."),
    _t("french_press", ["Kitchen", "Coffee", "French Presses"], ["French Press"],
       ["coffee plunger", "cafetiere", "press pot"],
       ["make coffee without a machine or filters", "brew coffee for two without electricity",
        "old school way to steep coffee grounds", "strong rich coffee while camping"],
       [_a("capacity", "prefix", _vals("12 oz|12 oz|single cup;for one",
                                       "34 oz|34 oz|for four cups;for the family")),
        _a("material", "prefix", _vals("Borosilicate Glass|glass|see through;that you can see into",
                                       "Stainless Steel|stainless steel;steel|unbreakable;that wont shatter"))],
       (15, 79), ["coffee_maker"], ["food_storage"],
       "Four-level filtration screen for a clean, full-bodied cup."),
    _t("coffee_maker", ["Kitchen", "Coffee", "Coffee Makers"], ["Drip Coffee Maker", "Programmable Coffeemaker"],
       ["coffee machine", "coffee brewer", "mr coffee"],
       ["something that has java ready when my alarm goes off", "brew a big carafe for the office",
        "hot joe in the morning without effort", "make a full pot for the whole household"],
       [_a("cups", "prefix", _vals("5-Cup|5 cup|for one or two people;small",
                                   "12-Cup|12 cup|for a crowd;large")),
        _a("color", "suffix", TECH_COLORS)],
       (29, 249), ["french_press"], ["food_storage"],
       "24-hour programmable timer, auto shut-off and a thermal carafe."),
    _t("blender", ["Kitchen", "Small Appliances", "Blenders"], ["Blender", "Countertop Blender"],
       ["smoothie maker", "liquidizer", "nutribullet"],
       ["make smoothies and protein shakes", "crush ice for frozen margaritas", "puree soup and baby food",
        "whip up green juice in the morning"],
       [_a("power", "prefix", _vals("700W|700w;700 watt|not too loud;basic everyday",
                                    "1000W|1000w;1000 watt|strong enough for frozen fruit;pretty strong",
                                    "1500W|1500w;1500 watt|really powerful;pro grade")),
        _a("color", "suffix", TECH_COLORS)],
       (29, 449), [], ["food_storage"],
       "Stainless steel blades and a BPA-free pitcher with pulse control."),
    _t("food_storage", ["Kitchen", "Storage", "Food Storage"], ["Food Storage Containers", "Storage Container Set"],
       ["tupperware", "leftover boxes", "meal prep boxes"],
       ["keep leftovers fresh in the fridge", "pack lunches for the week", "stuff to freeze soup in",
        "something airtight for cereal and flour"],
       [_a("pieces", "prefix", _vals("10-Piece|10 piece|ten of them;just a few",
                                     "24-Piece|24 piece|two dozen;a whole bunch")),
        _a("material", "prefix", _vals("Glass|glass|see through and oven safe;that can go in the oven",
                                       "BPA-Free Plastic|plastic|lightweight and unbreakable;that wont shatter"))],
       (15, 69), [], ["blender", "coffee_maker"],
       "Snap-lock lids, stackable, microwave and dishwasher safe."),
    # --- Pets --------------------------------------------------------------------------
    _t("dog_bed", ["Pets", "Dogs", "Dog Beds"], ["Orthopedic Dog Bed", "Bolster Dog Bed"],
       ["dog mattress", "pet cushion", "doggy bed"],
       ["somewhere for my pup to sleep", "comfy spot for an old lab with bad hips",
        "place for the puppy to nap in his crate", "cozy thing for my pooch to snooze on"],
       [_a("size", "prefix", DOG_SIZES), _a("color", "suffix", HOME_COLORS)],
       (25, 199), [], ["dog_harness"],
       "Egg-crate foam base, removable machine-washable cover."),
    _t("dog_harness", ["Pets", "Dogs", "Harnesses"], ["No-Pull Dog Harness", "Dog Harness"],
       ["walking vest", "dog vest", "puppy harness"],
       ["stop my pup from pulling on walks", "something to clip the leash to that wont choke my pooch",
        "keep my escape artist from slipping out on strolls"],
       [_a("size", "prefix", DOG_SIZES), _a("color", "suffix", APPAREL_COLORS)],
       (15, 69), [], ["dog_bed"],
       "Front and back clip points, reflective stitching, padded chest plate."),
    _t("cat_tree", ["Pets", "Cats", "Cat Trees"], ["Cat Tree", "Cat Tower"],
       ["cat condo", "kitty gym", "scratching post"],
       ["something for my kitty to climb on", "keep my kitten from shredding the couch",
        "vertical playground for indoor felines", "perch by the window for my feline"],
       [_a("height", "prefix", _vals('36"|36 inch|about three feet;small one',
                                     '60"|60 inch|about five feet;medium one',
                                     '72"|72 inch|floor to almost ceiling;really tall one')),
        _a("color", "suffix", HOME_COLORS)],
       (39, 299), [], ["litter_box", "pet_fountain"],
       "Sisal-wrapped posts, plush condo and hammock."),
    _t("pet_deterrent_mat", ["Pets", "Training", "Deterrents"], ["Pet Deterrent Mat", "Scat Mat"],
       ["spike mat", "animal repellent mat"],
       ["something to keep the cat off the counter", "stop the dog getting on the couch when im out",
        "train my animals to stay off the furniture", "keep kitty out of the garden beds",
        "stop my puppy jumping on the bed"],
       [_a("length", "prefix", _vals("4 ft|4 ft;4 foot|four feet long;short one",
                                     "6 ft|6 ft;6 foot|six feet long;long one"))],
       (15, 59), [], ["cat_tree"],
       "Flexible plastic spikes discourage access; cut to size."),
    _t("litter_box", ["Pets", "Cats", "Litter Boxes"], ["Litter Box", "Hooded Litter Pan"],
       ["kitty toilet", "cat potty", "litter tray"],
       ["where my cat does its business", "somewhere for the kitten to pee indoors",
        "bathroom for an indoor kitty that hides the smell"],
       [_a("style", "prefix", _vals("Covered|covered|with a lid;that hides the mess",
                                    "Open-Top|open top|without a lid;simple low",
                                    "Self-Cleaning|self cleaning|that scoops itself;so i never have to scoop"))],
       (15, 599), [], ["cat_tree", "pet_fountain"],
       "Odor-control carbon filter and high sides to limit scatter."),
    _t("pet_fountain", ["Pets", "Cats", "Fountains"], ["Pet Fountain", "Circulating Pet Fountain"],
       ["cat water bowl", "drinking fountain"],
       ["keep my cats water fresh and moving", "get my cat to drink more", "running water dispenser for the dog"],
       [_a("capacity", "prefix", _vals("2L|2l;2 liter|small one;for one kitty",
                                       "3L|3l;3 liter|big one;for several animals")),
        _a("color", "suffix", TECH_COLORS)],
       (19, 89), [], ["litter_box"],
       "Ultra-quiet pump and a triple filtration system."),
    _t("pet_feeder", ["Pets", "Feeding", "Automatic Feeders"], ["Automatic Pet Feeder"],
       ["timed feeder", "kibble dispenser", "food dispenser"],
       ["feed the cat while im at work", "dispense kibble on a schedule when i travel",
        "make sure the dog eats on time when im away"],
       [_a("connectivity", "prefix", _vals("Wi-Fi|wifi;wi-fi|that i can control from my phone;app controlled",
                                           "Programmable|programmable|with no app needed;that works without internet"))],
       (29, 199), [], ["pet_fountain"],
       "Portion control up to six meals a day with a voice recorder."),
    # --- Baby & Toddler ----------------------------------------------------------------
    _t("sippy_cup", ["Baby & Toddler", "Feeding", "Sippy Cups"], ["Sippy Cup", "Transition Cup"],
       ["spill proof cup", "trainer cup", "straw cup"],
       ["something for my little one to drink from without spilling", "something that wont leak when the baby throws it",
        "help my kiddo move off the bottle", "mess free drinking for a toddler"],
       [_a("age", "suffix", BABY_AGES), _a("pack", "prefix", PACKS),
        _a("material", "prefix", _vals("Silicone|silicone|soft and squishy;that bends",
                                       "Stainless|stainless|metal;that keeps milk cold"))],
       (6, 29), [], ["high_chair"],
       "Leak-proof valve, easy-grip handles, top-rack dishwasher safe."),
    _t("baby_gate", ["Baby & Toddler", "Safety", "Baby Gates"], ["Baby Gate", "Safety Gate"],
       ["stair guard", "doorway barrier", "child gate"],
       ["keep the crawler from falling down the stairs", "block off the kitchen from my toddler",
        "stop the little one getting into the hallway"],
       [_a("mount", "prefix", _vals("Pressure-Mounted|pressure mounted|that doesnt need screws;no drilling",
                                    "Hardware-Mounted|hardware mounted|that screws into the wall;for the top of the stairs")),
        _a("width", "suffix", _vals("29-38 in.|29-38 inch|for a normal doorway;regular width",
                                    "38-48 in.|38-48 inch|for a wide opening;extra wide"))],
       (25, 149), [], ["high_chair"],
       "One-hand walk-through door with auto-close."),
    _t("high_chair", ["Baby & Toddler", "Feeding", "High Chairs"], ["High Chair", "Convertible High Chair"],
       ["feeding chair", "booster seat"],
       ["somewhere for the baby to sit at dinner", "seat for my 8 month old to eat solids",
        "let the little one join us at the table for meals"],
       [_a("color", "suffix", HOME_COLORS)],
       (39, 299), [], ["sippy_cup"],
       "Five-point harness, removable tray and wipe-clean seat pad."),
    _t("stroller", ["Baby & Toddler", "Travel", "Strollers"], ["Stroller"],
       ["pram", "pushchair", "buggy"],
       ["push the baby around the neighborhood", "wheels for taking the newborn on walks",
        "something to push my toddler at the mall"],
       [_a("style", "prefix", _vals("Lightweight|lightweight|that folds small for flights;easy to carry",
                                    "Jogging|jogging|for running with the baby;for trails",
                                    "Full-Size|full size|with lots of storage underneath;sturdy")),
        _a("color", "suffix", HOME_COLORS)],
       (79, 899), [], ["baby_monitor"],
       "One-hand fold, all-wheel suspension and a UPF 50+ canopy."),
    _t("baby_monitor", ["Baby & Toddler", "Nursery", "Baby Monitors"], ["Video Baby Monitor", "Baby Monitor"],
       ["nursery camera", "baby cam", "crib camera"],
       ["watch the little one sleep from another room", "see and hear the nursery at night",
        "keep an eye on the newborn while i cook"],
       [_a("connectivity", "prefix", _vals("Wi-Fi|wifi;wi-fi|that i can check from my phone;app controlled",
                                           "Non-Wi-Fi|non wifi|with no internet;that cant be hacked"))],
       (29, 299), [], ["stroller"],
       "Night vision, two-way talk and room temperature alerts."),
    # --- Hardware & Plumbing -----------------------------------------------------------
    _t("pvc_elbow", ["Hardware & Plumbing", "Pipe Fittings", "Elbows"], ["PVC 90-Degree Elbow", "PVC Elbow Fitting"],
       ["pipe elbow", "pipe bend", "sprinkler fitting"],
       ["piece to make a pipe turn a corner", "connector to bend plastic pipe ninety degrees",
        "join two white pipes at a right angle", "make the sprinkler line go around a corner"],
       [_a("size", "prefix", PIPE_SIZES),
        _a("connection", "suffix", _vals("Slip x Slip|slip|that you glue on both ends;push in and glue",
                                         "Slip x FPT|threaded;fpt|with threads on one side;that screws on one end"))],
       (1, 19), [], ["ptfe_tape"],
       "Schedule 40, NSF certified for potable water."),
    _t("ptfe_tape", ["Hardware & Plumbing", "Plumbing", "Sealants"], ["PTFE Thread Seal Tape"],
       ["teflon tape", "plumbers tape", "white tape for pipes"],
       ["stop a leak where the shower head screws on", "wrap the threads so pipe joints dont drip",
        "fix a dripping faucet connection"],
       [_a("width", "prefix", _vals('1/2" x 520"|1/2 inch|narrow roll;standard roll',
                                    '3/4" x 260"|3/4 inch|wide roll;fat roll'))],
       (1, 12), [], ["pvc_elbow"],
       "Gas-line rated, high density, stays put on fittings."),
    _t("drain_auger", ["Hardware & Plumbing", "Plumbing", "Augers"], ["Drain Auger", "Plumbing Auger"],
       ["drain snake", "plumbers snake", "clog remover"],
       ["get hair out of a clogged shower", "fix a slow bathtub without chemicals",
        "pull gunk out of the sink pipe", "clear a backed up tub"],
       [_a("length", "prefix", _vals("25 ft|25 ft;25 foot|twenty five feet;short one",
                                     "50 ft|50 ft;50 foot|fifty feet;long one"))],
       (8, 119), ["plunger"], [],
       "Steel cable with a spring tip and a locking drum."),
    _t("plunger", ["Hardware & Plumbing", "Plumbing", "Plungers"], ["Toilet Plunger", "Flange Plunger"],
       ["plumbers helper", "unclogger"],
       ["the loo is backed up", "fix a clogged commode fast", "loo wont flush and water is rising"],
       [_a("handle", "suffix", _vals("Wood Handle|wood handle|classic;old fashioned",
                                     "With Caddy|with caddy|that hides in a holder;with a stand"))],
       (7, 39), ["drain_auger"], [],
       "Heavy-duty rubber cup that seals on any bowl."),
    _t("cordless_drill", ["Hardware & Plumbing", "Power Tools", "Drills"], ["Cordless Drill/Driver", "Cordless Drill"],
       ["power drill", "battery drill", "screw gun"],
       ["make holes in the wall to hang shelves", "put together flat pack furniture faster",
        "drive screws into a deck", "mount curtain rods myself"],
       [_a("voltage", "prefix", _vals("12V|12v;12 volt|compact and light;small one",
                                      "20V|20v;20 volt|heavy duty;strong one")),
        _a("kit", "suffix", _vals("Tool Only|tool only|bare unit;without the charger",
                                  "Battery Kit|kit;with battery|that comes ready to go;charger included"))],
       (49, 299), [], ["wall_anchors"],
       "Brushless motor, two-speed gearbox and LED work light."),
    _t("wall_anchors", ["Hardware & Plumbing", "Fasteners", "Anchors"], ["Drywall Anchors", "Hollow Wall Anchor Kit"],
       ["wall plugs", "molly bolts", "toggle bolts"],
       ["hang a heavy mirror on sheetrock", "make screws hold in plasterboard",
        "mount a shelf without finding a stud"],
       [_a("rating", "prefix", _vals("25 lb|25 lb|for light frames;light stuff",
                                     "50 lb|50 lb|for a big mirror;medium heavy",
                                     "100 lb|100 lb|for really heavy things;a tv mount"))],
       (4, 29), [], ["cordless_drill"],
       "Self-drilling zinc anchors, screws included."),
    # --- Electronics -------------------------------------------------------------------
    _t("earbuds", ["Electronics", "Audio", "Earbuds"], ["Wireless Earbuds", "True Wireless Earbuds"],
       ["bluetooth headphones", "earphones", "airpods"],
       ["listen to podcasts on the run without cords", "take calls hands free",
        "tiny things to play music that fit in my pocket", "music at the gym without tangled wires"],
       [_a("noise_control", "prefix", _vals(NOISE_CANCELLING, "Open-Ear|open ear|that let me hear traffic;so i stay aware")),
        _a("color", "suffix", TECH_COLORS)],
       (19, 299), ["headphones"], ["usb_c_charger", "power_bank"],
       "Bluetooth 5.3, 30-hour total battery with the case, IPX5."),
    _t("headphones", ["Electronics", "Audio", "Headphones"], ["Over-Ear Headphones"],
       ["cans", "headset", "studio monitors"],
       ["block out the engine drone on a long flight", "big comfy things to listen to music at my desk",
        "quiet the office chatter while i work"],
       [_a("noise_control", "prefix", _vals(NOISE_CANCELLING, "Studio|studio|for mixing beats;flat sound for producers")),
        _a("color", "suffix", TECH_COLORS)],
       (39, 449), ["earbuds"], ["usb_c_charger"],
       "40 mm drivers, memory-foam cushions, 40-hour battery."),
    _t("usb_c_charger", ["Electronics", "Power", "Chargers"], ["USB-C Wall Charger", "GaN Fast Charger"],
       ["phone charger", "power adapter", "charging brick"],
       ["juice up my phone quickly overnight", "top up my laptop and phone from one plug",
        "replace the thing that plugs into the outlet for my iphone"],
       [_a("watts", "prefix", _vals("20W|20w;20 watt|just for a phone;basic",
                                    "65W|65w;65 watt|strong enough for a laptop;for a macbook",
                                    "100W|100w;100 watt|that can power everything at once;maximum speed"))],
       (9, 79), ["power_bank"], ["earbuds", "hdmi_cable"],
       "Gallium nitride design, foldable prongs, universal compatibility."),
    _t("power_bank", ["Electronics", "Power", "Power Banks"], ["Portable Power Bank", "Power Bank"],
       ["portable charger", "battery pack", "external battery"],
       ["keep my phone alive at a festival", "recharge devices on a camping trip with no outlets",
        "dont run out of juice on a long travel day"],
       [_a("capacity", "prefix", _vals("10000mAh|10000mah|slim one;fits in a pocket",
                                       "20000mAh|20000mah|that lasts all weekend;that charges a phone four times")),
        _a("color", "suffix", TECH_COLORS)],
       (15, 119), ["usb_c_charger"], ["earbuds"],
       "Pass-through charging and an LED level indicator."),
    _t("hdmi_cable", ["Electronics", "Cables", "HDMI Cables"], ["High Speed HDMI Cable", "HDMI 2.1 Cable"],
       ["tv cord", "video cable", "display cord"],
       ["connect my laptop to the tv", "hook the ps5 up to a monitor", "get 4k from the console to the screen"],
       [_a("length", "prefix", _vals("3 ft|3 ft;3 foot|three feet;short",
                                     "6 ft|6 ft;6 foot|six feet;medium length",
                                     "10 ft|10 ft;10 foot|ten feet;long"))],
       (5, 39), [], ["tv_stand", "usb_c_charger"],
       "48Gbps bandwidth, gold-plated connectors, braided jacket."),
    _t("smart_plug", ["Electronics", "Smart Home", "Smart Plugs"], ["Smart Plug", "Wi-Fi Smart Outlet"],
       ["wifi switch", "alexa outlet", "timer socket"],
       ["turn lamps on and off from my phone", "put the coffee pot on a schedule",
        "control a fan by voice", "make my christmas lights come on automatically"],
       [_a("pack", "prefix", PACKS)],
       (9, 49), [], ["usb_c_charger"],
       "Works with major voice assistants; energy monitoring; no hub required."),
    # --- Outdoor & Garden --------------------------------------------------------------
    _t("garden_hose", ["Outdoor & Garden", "Watering", "Hoses"], ["Expandable Garden Hose", "Garden Hose"],
       ["water hose", "hosepipe"],
       ["water the flower beds from the spigot", "wash the car in the driveway",
        "reach the back of the yard to water plants"],
       [_a("length", "prefix", _vals("25 ft|25 ft;25 foot|twenty five feet;short one",
                                     "50 ft|50 ft;50 foot|fifty feet;medium length",
                                     "100 ft|100 ft;100 foot|a hundred feet;really long"))],
       (19, 119), [], ["hose_nozzle"],
       "Kink-free latex core, solid brass fittings."),
    _t("hose_nozzle", ["Outdoor & Garden", "Watering", "Nozzles"], ["Hose Nozzle", "Spray Nozzle"],
       ["sprayer head", "water wand", "spray gun"],
       ["gentle shower setting for seedlings", "jet setting to blast mud off the patio",
        "thing on the end to control the water pressure"],
       [_a("patterns", "prefix", _vals("7-Pattern|7 pattern|with a few settings;simple",
                                       "10-Pattern|10 pattern|with lots of settings;versatile"))],
       (6, 39), [], ["garden_hose"],
       "Zinc body, thumb-control flow and a rubberized grip."),
    _t("raised_bed", ["Outdoor & Garden", "Planters", "Raised Beds"], ["Raised Garden Bed", "Elevated Planter Box"],
       ["veggie planter", "garden box", "grow bed"],
       ["grow tomatoes without digging up the lawn", "planting spot so i dont have to bend down",
        "grow herbs and lettuce on the patio"],
       [_a("material", "prefix", _vals("Cedar|cedar|wooden that wont rot;natural wood",
                                       "Galvanized Steel|galvanized;metal|metal that wont rust;metal one"))],
       (39, 399), [], ["pruning_shears", "garden_hose"],
       "Open-bottom design for drainage; tool-free assembly."),
    _t("bird_feeder", ["Outdoor & Garden", "Wildlife", "Bird Feeders"], ["Bird Feeder", "Hanging Bird Feeder"],
       ["seed feeder", "finch feeder", "suet cage"],
       ["attract cardinals and finches to my yard", "watch songbirds from the kitchen",
        "feed wild sparrows without critters stealing it"],
       [_a("style", "prefix", _vals("Tube|tube|long narrow one;cylinder",
                                    "Window|window|that sticks on glass;suction cup",
                                    "Squirrel-Proof|squirrel proof|that squirrels cant raid;weight activated"))],
       (12, 119), [], [],
       "Metal perches and a weatherproof seed port."),
    _t("patio_umbrella", ["Outdoor & Garden", "Patio", "Umbrellas"], ["Patio Umbrella", "Market Umbrella"],
       ["parasol", "sun shade", "deck shade"],
       ["shade over the outdoor dining table", "keep the sun off us on the deck", "stay cool by the pool"],
       [_a("size", "prefix", _vals("7.5 ft|7.5 ft|small one;for a bistro set",
                                   "9 ft|9 ft|medium one;standard size",
                                   "11 ft|11 ft|huge one;for a big table")),
        _a("color", "suffix", HOME_COLORS)],
       (39, 499), [], ["solar_lights"],
       "Fade-resistant canopy with push-button tilt and crank lift."),
    _t("solar_lights", ["Outdoor & Garden", "Lighting", "Path Lights"], ["Solar Path Lights", "Solar Pathway Lights"],
       ["garden lamps", "walkway lamps", "stake lights"],
       ["light up the walkway at night without wiring", "make the backyard glow after dark with no outlet",
        "mark the driveway edges in the dark"],
       [_a("pack", "prefix", _vals("6-Pack|6 pack|six of them;half a dozen",
                                   "12-Pack|12 pack|twelve of them;a dozen")),
        _a("tone", "suffix", _vals("Warm White|warm white|with a cozy yellow glow;soft yellow",
                                   "Cool White|cool white|bright bluish;crisp and bright"))],
       (15, 89), [], ["patio_umbrella"],
       "Auto on at dusk, IP65 weatherproof, 8 hours per charge."),
    _t("pruning_shears", ["Outdoor & Garden", "Tools", "Pruners"], ["Bypass Pruning Shears", "Bypass Pruner"],
       ["secateurs", "garden clippers", "hand snips"],
       ["trim the rose bushes", "cut back dead branches on shrubs", "snip herbs and deadhead flowers"],
       [_a("grip", "suffix", _vals("Standard Grip|standard grip|normal handles;regular",
                                   "Ergonomic Grip|ergonomic grip|easy on arthritic hands;for weak hands"))],
       (9, 69), [], ["raised_bed"],
       "SK5 steel blade, safety lock and sap groove."),
    # --- Apparel -----------------------------------------------------------------------
    _t("rain_jacket", ["Apparel", "Outerwear", "Rain Jackets"], ["Waterproof Rain Jacket", "Rain Shell"],
       ["raincoat", "windbreaker", "anorak"],
       ["stay dry walking the dog in a downpour", "something to wear in seattle weather",
        "packable layer for wet hikes"],
       [_a("gender", "prefix", GENDER), _a("color", "suffix", APPAREL_COLORS), _a("size", "suffix", APPAREL_SIZES)],
       (39, 349), [], ["hiking_boots", "beanie"],
       "Seam-sealed 2.5-layer fabric, pit zips, adjustable hood."),
    _t("hiking_boots", ["Apparel", "Footwear", "Hiking Boots"], ["Waterproof Hiking Boots", "Hiking Boot"],
       ["trail boots", "trekking shoes", "mountain shoes"],
       ["footwear for rocky mountain trails", "something sturdy to wear on a backpacking trip",
        "ankle support on steep climbs"],
       [_a("gender", "prefix", GENDER), _a("size", "suffix", SHOE_SIZES)],
       (59, 249), ["running_shoes"], ["wool_socks", "rain_jacket"],
       "Vibram outsole, waterproof membrane and a cushioned midsole."),
    _t("running_shoes", ["Apparel", "Footwear", "Running Shoes"], ["Running Shoes", "Road Running Shoe"],
       ["sneakers", "trainers", "joggers"],
       ["start training for a 5k", "comfy kicks for marathon practice", "cushioned footwear for pounding the pavement"],
       [_a("gender", "prefix", GENDER), _a("color", "suffix", APPAREL_COLORS), _a("size", "suffix", SHOE_SIZES)],
       (49, 219), ["hiking_boots"], ["wool_socks"],
       "Responsive foam midsole and a breathable engineered mesh upper."),
    _t("wool_socks", ["Apparel", "Socks", "Wool Socks"], ["Merino Wool Socks", "Merino Crew Socks"],
       ["thermal socks", "boot socks", "warm socks"],
       ["keep my feet warm in winter", "stop blisters on long walks", "toasty feet for ski trips"],
       [_a("gender", "prefix", GENDER), _a("pack", "prefix", _vals("3-Pack|3 pack|three pairs;a few pairs",
                                                                   "6-Pack|6 pack|six pairs;a bunch of pairs"))],
       (12, 59), [], ["hiking_boots", "running_shoes"],
       "Cushioned sole, reinforced heel and toe, odor resistant."),
    _t("beanie", ["Apparel", "Accessories", "Hats"], ["Knit Beanie", "Cuffed Beanie"],
       ["toque", "winter hat", "knit cap"],
       ["keep my ears warm when it snows", "something cozy for my head on cold mornings",
        "stop losing heat on frosty runs"],
       [_a("color", "suffix", APPAREL_COLORS)],
       (9, 45), [], ["rain_jacket"],
       "Soft rib knit with a fold-over cuff; one size."),
    # --- Beauty ------------------------------------------------------------------------
    _t("hair_dryer", ["Beauty", "Hair Tools", "Hair Dryers"], ["Ionic Hair Dryer", "Hair Dryer"],
       ["blow dryer", "blowdryer", "hairdryer"],
       ["dry my thick mane fast", "salon blowout at home", "tame frizz after showering"],
       [_a("power", "prefix", _vals("1875W|1875w|really strong;fast",
                                    "1200W|1200w;travel|compact for trips;small for travel")),
        _a("color", "suffix", TECH_COLORS)],
       (19, 399), [], [],
       "Ceramic heating, three heat settings, cool shot and a concentrator."),
    _t("moisturizer", ["Beauty", "Skincare", "Moisturizers"], ["Daily Face Moisturizer", "Hydrating Face Cream"],
       ["face lotion", "moisturiser", "day cream"],
       ["fix dry flaky cheeks", "something for tightness after cleansing",
        "hydration for a combination complexion in winter"],
       [_a("skin_type", "prefix", _vals("Oil-Free|oil free|that wont make me break out;for acne prone",
                                        "Sensitive Skin|sensitive|for a reactive complexion;that wont irritate",
                                        "Rich|rich|extra thick for very parched cheeks;heavy duty"))],
       (8, 79), ["sunscreen"], [],
       "Hyaluronic acid and ceramides; non-comedogenic."),
    _t("sunscreen", ["Beauty", "Skincare", "Sunscreen"], ["Mineral Sunscreen", "Sunscreen Lotion"],
       ["sunblock", "suncream", "sun cream"],
       ["keep from burning at the beach", "protect the family at the pool", "sun protection on a hike"],
       [_a("spf", "prefix", _vals("SPF 30|spf 30|everyday protection;medium protection",
                                  "SPF 50|spf 50|maximum protection;high protection")),
        _a("audience", "prefix", _vals("Kids|kids|for little ones;for my children",
                                       "Sport|sport|that stays on when i sweat;water resistant"))],
       (6, 39), ["moisturizer"], [],
       "Zinc oxide broad spectrum, reef friendly, 80 minutes water resistant."),
    _t("electric_toothbrush", ["Beauty", "Oral Care", "Electric Toothbrushes"], ["Electric Toothbrush", "Sonic Toothbrush"],
       ["power toothbrush", "sonicare", "rechargeable brush"],
       ["clean my teeth better than a manual one", "dentist said i need to brush better",
        "get rid of plaque and coffee stains"],
       [_a("audience", "prefix", _vals("Kids|kids|for little ones;for my children",
                                       "Adult|adult|for grownups;for me"))],
       (19, 249), [], [],
       "Two-minute timer with 30-second pacer and pressure sensor."),
    # --- Toys --------------------------------------------------------------------------
    _t("building_blocks", ["Toys", "Construction", "Building Sets"], ["Building Blocks Set", "Construction Bricks Set"],
       ["lego", "legos", "stacking bricks"],
       ["something my kid can build castles with", "creative toy for a rainy day indoors",
        "screen free activity that makes them think"],
       [_a("age", "prefix", KID_AGES), _a("pieces", "suffix", _vals("100 Pieces|100 piece|small starter kit;starter",
                                                                    "500 Pieces|500 piece|huge bucket;big bucket"))],
       (14, 149), [], ["jigsaw_puzzle"],
       "Compatible with major brands; storage bin included."),
    _t("jigsaw_puzzle", ["Toys", "Games", "Puzzles"], ["Jigsaw Puzzle"],
       ["picture puzzle", "puzzles for adults"],
       ["something to do with grandma on a rainy afternoon", "a challenge to put together over the holidays",
        "quiet activity to assemble on the dining table"],
       [_a("pieces", "prefix", _vals("500-Piece|500 piece|easy;a quick one",
                                     "1000-Piece|1000 piece|challenging;that takes a weekend",
                                     "2000-Piece|2000 piece|really hard one;that takes weeks"))],
       (9, 39), [], ["building_blocks"],
       "Premium blue-board stock, anti-glare finish and a poster."),
    _t("balance_bike", ["Toys", "Ride-Ons", "Balance Bikes"], ["Balance Bike", "Kids Balance Bike"],
       ["push bike", "no pedal bike", "strider"],
       ["teach my 2 year old to ride without training wheels", "first ride on toy for a little one",
        "help my kiddo learn to pedal later"],
       [_a("color", "suffix", APPAREL_COLORS)],
       (39, 199), [], [],
       "Adjustable seat, puncture-proof tires, lightweight frame."),
    _t("plush_toy", ["Toys", "Stuffed Animals", "Plush"], ["Plush Stuffed Animal", "Stuffed Animal"],
       ["teddy", "cuddly toy", "stuffie"],
       ["something soft for the baby to snuggle at night", "gift for a kid who loves critters to hug",
        "huggable friend for bedtime"],
       [_a("animal", "prefix", _vals("Bear|bear|brown grizzly;like a grizzly",
                                     "Bunny|bunny|rabbit;with floppy ears",
                                     "Dinosaur|dinosaur|t rex;with a long tail and scales"))],
       (8, 49), [], [],
       "Surface washable, embroidered eyes, safe for all ages."),
    # --- Home --------------------------------------------------------------------------
    _t("blackout_curtains", ["Home", "Window", "Curtains"], ["Blackout Curtains", "Room Darkening Curtain Panels"],
       ["drapes", "window coverings", "blinds"],
       ["keep the bedroom dark for day sleeping", "stop the streetlight shining in at night",
        "help the baby nap in the afternoon"],
       [_a("length", "prefix", _vals('63"|63 inch|short ones;for a small window',
                                     '84"|84 inch|standard length;normal length',
                                     '95"|95 inch|long ones;floor length')),
        _a("color", "suffix", HOME_COLORS)],
       (19, 119), [], ["area_rug"],
       "Triple-weave fabric blocks 99% of light; thermal insulated."),
    _t("area_rug", ["Home", "Rugs", "Area Rugs"], ["Area Rug"],
       ["carpet", "floor covering", "runner"],
       ["something soft underfoot in the living room", "cover up ugly hardwood floors",
        "make the room feel warmer on bare feet"],
       [_a("size", "prefix", _vals("5x7|5x7|five by seven;medium",
                                   "8x10|8x10|eight by ten;big")),
        _a("color", "suffix", HOME_COLORS)],
       (39, 899), [], ["sofa", "coffee_table"],
       "Low-pile, stain-resistant polypropylene with a non-shed weave."),
    _t("shower_caddy", ["Home", "Bath", "Shower Storage"], ["Shower Caddy"],
       ["bath organizer", "shampoo shelf", "tub rack"],
       ["keep shampoo and soap off the tub ledge", "hang bottles from the showerhead",
        "organize toiletries in a tiny bathroom"],
       [_a("mount", "prefix", _vals("Hanging|hanging|over the head;that hangs",
                                    "Corner|corner|that wedges between two walls;tucked in the angle"))],
       (9, 59), [], ["weighted_blanket"],
       "Rust-proof aluminum with drainage holes."),
    _t("weighted_blanket", ["Home", "Bedding", "Blankets"], ["Weighted Blanket"],
       ["heavy blanket", "gravity blanket", "anxiety blanket"],
       ["help me sleep when anxious", "calm feeling at night for restless sleepers",
        "deep pressure for my kid with sensory issues"],
       [_a("weight", "prefix", _vals("12 lb|12 lb|for a kid;light one",
                                     "15 lb|15 lb|for a small adult;medium one",
                                     "20 lb|20 lb|for a bigger person;heavy one")),
        _a("color", "suffix", HOME_COLORS)],
       (34, 199), [], [],
       "Glass bead fill in quilted pockets; removable cover."),
]
PRODUCT_TYPES: dict[str, ProductType] = {t.key: t for t in _TYPES}
DEPARTMENTS: tuple[str, ...] = tuple(dict.fromkeys(t.department for t in _TYPES))

# (name, tier): tier sets where an item sits inside its type's price range.
BRANDS: dict[str, tuple[tuple[str, str], ...]] = {
    "Furniture": (("Harlow", "mid"), ("Oakridge", "premium"), ("Nestwell", "budget"), ("Ardent Home", "premium"),
                  ("Cove & Co", "mid"), ("Brixby", "budget"), ("Linden Lane", "mid"), ("Mavera", "premium")),
    "Kitchen": (("Ironhearth", "mid"), ("Culina", "premium"), ("Kitchbright", "budget"), ("Sable & Salt", "premium"),
                ("Everpan", "mid"), ("Mazzo", "budget"), ("Copperleaf", "premium"), ("Dashwood", "mid")),
    "Pets": (("Pawsome", "budget"), ("Barkley", "mid"), ("Whisker & Co", "mid"), ("Furbridge", "premium"),
             ("Tailwise", "mid"), ("Kibblekind", "budget"), ("Hound & Hearth", "premium")),
    "Baby & Toddler": (("Littlenest", "mid"), ("Bumblebee", "budget"), ("Cradlewise", "premium"),
                       ("Tot Trail", "mid"), ("Peapod", "budget"), ("Wonderbud", "premium")),
    "Hardware & Plumbing": (("ProFlow", "mid"), ("Trutorque", "premium"), ("Hexbolt", "budget"),
                            ("Pipemaster", "mid"), ("Brassline", "premium"), ("Ridgeway", "mid"), ("Fixwell", "budget")),
    "Electronics": (("Voltra", "mid"), ("Sonique", "premium"), ("Ampere", "budget"), ("Lumio", "mid"),
                    ("Nexacore", "premium"), ("Byteline", "budget"), ("Wavecrest", "mid")),
    "Outdoor & Garden": (("Greenthumb", "budget"), ("Terraform", "mid"), ("Sunhaven", "premium"), ("Yardly", "mid"),
                         ("Fernwood", "mid"), ("Solstice", "premium"), ("Tuffline", "budget")),
    "Apparel": (("Northpeak", "premium"), ("Trailmark", "mid"), ("Urban Thread", "budget"), ("Alpine Fox", "premium"),
                ("Driftwood", "mid"), ("Stride Lab", "mid"), ("Cotton & Co", "budget")),
    "Beauty": (("Lumiere", "premium"), ("Glowbar", "mid"), ("Purely", "budget"), ("Silkwave", "mid"),
               ("Dermaleaf", "premium"), ("Bloom Bay", "budget")),
    "Toys": (("Brickly", "mid"), ("Tinytown", "budget"), ("Wonderworks", "premium"), ("Playfort", "mid"),
             ("Pinecone Play", "mid"), ("Cuddle Cub", "budget")),
    "Home": (("Hearthside", "mid"), ("Dreamweave", "premium"), ("Nightfall", "mid"), ("Cozyloom", "budget"),
             ("Tidybath", "budget"), ("Stonewash", "premium")),
}
_TIER_BETA = {"budget": (1.6, 4.5), "mid": (3.0, 3.0), "premium": (4.5, 1.6)}
BOILERPLATE = (
    "Backed by a 1-year limited warranty.", "Ships in one box.", "Free returns within 30 days.",
    "Designed in-house and tested for durability.", "Customer favorite.", "Imported.",
)

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
    attr_names = sorted({a.name for t in _TYPES for a in t.attributes})
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
    with open(users_path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                u = orjson.loads(line)
                users.append(Persona(u["user_id"], u["department_weights"], u["type_weights"], u["price_low"],
                                     u["price_high"], u["price_sensitivity"], list(u["preferred_brands"])))
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                raise BeirFormatError(users_path, lineno, f"bad user record ({exc})") from None
    return SynthDataset(items, queries, qrels, split, users, int(manifest["seed"]))

