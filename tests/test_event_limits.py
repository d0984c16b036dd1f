"""The event contract's limits are the stores' (``streams.events``: one definition, which
``streams.item_index`` makes its collections from): every catalog upsert the contract accepts,
at its limits, is indexed in a real Milvus as it came (the description and the BM25 text
shortened on purpose), and one byte more is refused with the field named."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import HealthCheck, given, settings as hypothesis_settings
from hypothesis import strategies as st

from tailbridge.streams import item_index
from tailbridge.streams import events as contract
from tailbridge.streams.events import CatalogUpsert, EventValidationError, decode, encode
from tailbridge.streams.indexer import Indexer
from tests.conftest import stream_namespace

pytestmark = pytest.mark.integration

# Every Unicode scalar value UTF-8 can carry (1 to 4 bytes each), controls and NUL included;
# item ids without what a Milvus filter literal cannot hold.
CHARS = st.characters(codec="utf-8")
ID_CHARS = st.characters(codec="utf-8", exclude_categories=("Cc",), exclude_characters="'\"\\")


def fit(text: str, limit: int, exact: bool) -> str:
    """``text`` within ``limit`` bytes; with ``exact``, padded to exactly ``limit``."""
    text = item_index.shorten(text, limit)
    return text + "a" * (limit - len(text.encode())) if exact else text


def sized(limit: int, min_bytes: int = 0, alphabet=CHARS):
    """Strings of at most ``limit`` UTF-8 bytes, often exactly ``limit``; long ones are a drawn
    piece repeated (hypothesis draws at most a few KiB per example)."""
    return st.builds(lambda piece, times, exact: fit(piece * times, limit, exact),
                     st.text(alphabet, min_size=1, max_size=64), st.integers(1, max(1, limit)), st.booleans()
                     ).filter(lambda s: len(s.encode()) >= min_bytes)


def path_within(levels: list[str]) -> list[str]:
    while len(contract.CATEGORY_SEPARATOR.join(levels).encode()) > contract.MAX_CATEGORY_PATH_BYTES:
        levels = levels[:-1]
    return levels


def attributes_within(pairs: dict[str, str]) -> dict[str, str]:
    while len(orjson.dumps(pairs)) > contract.MAX_ATTRIBUTES_BYTES:
        pairs = dict(list(pairs.items())[:-1])
    return pairs


upserts = st.builds(
    CatalogUpsert,
    item_id=sized(contract.MAX_ITEM_ID_BYTES, 1, ID_CHARS),
    title=sized(contract.MAX_TITLE_BYTES, 1),
    description=sized(contract.MAX_DESCRIPTION_BYTES),
    category_path=st.lists(sized(contract.MAX_CATEGORY_BYTES, 1), min_size=1, max_size=6).map(path_within),
    brand=sized(contract.MAX_BRAND_BYTES),
    price=st.floats(0, contract.MAX_PRICE),
    attributes=st.dictionaries(sized(48, 1), sized(600), max_size=8).map(attributes_within),
)


@pytest.fixture(scope="module")
def indexer(stack_settings, tmp_path_factory):
    with stream_namespace(stack_settings, tmp_path_factory.mktemp("limits"), "tbl") as ns:
        yield Indexer(ns.settings, ns.milvus, ns.redis), ns


@hypothesis_settings(max_examples=30, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.function_scoped_fixture])
@given(event=upserts)
def test_every_upsert_the_contract_accepts_is_indexed_as_it_came(indexer, event):
    indexer, ns = indexer
    event = decode(encode(event))  # what a worker receives
    assert indexer.process([event]).upserted == 1
    [row] = ns.milvus.query(item_index.alias_name(ns.settings), ids=[event.item_id],
                            output_fields=["title", "description", "brand", "category", "category_path",
                                           "attributes", "text"])
    assert (row["title"], row["brand"], row["category"]) == (event.title, event.brand, event.category_path[-1])
    assert row["category_path"] == contract.CATEGORY_SEPARATOR.join(event.category_path)
    assert orjson.loads(row["attributes"]) == event.attributes
    assert row["description"] == item_index.shorten(event.description, contract.INDEXED_DESCRIPTION_BYTES)
    assert event.description.startswith(row["description"])
    assert 0 < len(row["text"].encode()) <= contract.INDEXED_TEXT_BYTES and row["text"].startswith(
        item_index.shorten(event.title, contract.INDEXED_TEXT_BYTES))


def raw_upsert(**fields) -> bytes:
    return orjson.dumps(orjson.loads(encode(CatalogUpsert(item_id="i", title="t", category_path=["c"], price=1.0)))
                        | fields)


@pytest.mark.parametrize("field, value, reason", [
    ("item_id", "é" * 64 + "x", "at most 128 bytes"),
    ("item_id", "sku-'1", "no quotes, backslashes or control characters"),
    ("item_id", "sku\n1", "no quotes, backslashes or control characters"),
    ("title", "€" * 341 + "ab", "at most 1024 bytes"),
    ("brand", "b" * 257, "at most 256 characters"),  # ASCII: pydantic's character count says it first
    ("category_path", ["ü" * 128 + "x"], "at most 256 bytes"),
    ("category_path", ["c" * 255] * 4 + ["cc"], "at most 1024 bytes in UTF-8 joined with ' > '"),
    ("attributes", {"k": "v" * (contract.MAX_ATTRIBUTES_BYTES - 8 + 1)}, "at most 2048 bytes as JSON"),
    ("description", "d" * (contract.MAX_DESCRIPTION_BYTES + 1), "at most 65536 characters"),
])
def test_one_byte_over_a_limit_is_refused_with_the_field_named(field, value, reason):
    with pytest.raises(EventValidationError) as refused:
        decode(raw_upsert(**{field: value}))
    assert f"catalog_upsert.{field}" in str(refused.value) and reason in str(refused.value)


def test_the_limits_hold_exactly_at_them():
    at_limits = raw_upsert(item_id="é" * 64, title="€" * 341 + "a", brand="b" * 256, category_path=["c" * 254] * 3 + ["c" * 253],
                           attributes={"k": "v" * (contract.MAX_ATTRIBUTES_BYTES - 8)},
                           description="d" * contract.MAX_DESCRIPTION_BYTES)
    assert decode(at_limits).title == "€" * 341 + "a"


def test_item_ids_of_every_event_fit_the_index():
    from tailbridge.streams.events import InteractionEvent, ServedItem

    for make in (lambda i: InteractionEvent(action="click", user_id="u", session_id="s", item_id=i),
                 lambda i: ServedItem(item_id=i, position=1)):
        make("é" * 64)  # 128 bytes
        with pytest.raises(ValueError, match="at most 128 bytes"):
            make("é" * 64 + "x")
