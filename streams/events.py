"""Event contracts: what the search frontend, the query handler and the stream processors
exchange over Kafka.

Every event carries ``schema_version`` (bumped on an incompatible change, so a consumer can
refuse what it does not understand), a ``type`` discriminator, a unique ``event_id`` (the
dedup key for at-least-once processing) and a timezone-aware ``event_time``. On the wire an
event is one JSON object (orjson). ``decode`` turns bytes back into the right model or
raises :class:`EventValidationError` naming each bad field and why.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, ClassVar, Literal, Union

import orjson
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, \
    field_validator

SCHEMA_VERSION = 1

Action = Literal["impression", "click", "add_to_cart", "purchase"]
RewriteOutcome = Literal["served", "clicked", "added_to_cart", "purchased"]
NonEmpty = Annotated[str, Field(min_length=1, max_length=512)]
# Bounds keep every number encodable (orjson refuses integers beyond 64 bits) and plausible.
MAX_POSITION, MAX_QUANTITY, MAX_PRICE = 10_000, 10_000, 1e9

# What the stores hold, in UTF-8 bytes: Milvus counts a VARCHAR's length in bytes (Milvus Lite
# in characters, never more). The one definition: ``streams.item_index`` makes its collections
# from these, so whatever an event may carry fits; only what is marked "indexed" is shortened,
# on purpose, by the indexer. Redis and Feast hold any string the events allow.
MAX_ITEM_ID_BYTES = 128  # item ids, everywhere: the collections' primary key
MAX_TITLE_BYTES = 1024
MAX_BRAND_BYTES = 256
MAX_CATEGORY_BYTES = 256  # one level of category_path (the leaf is searchable as `category`)
MAX_CATEGORY_PATH_BYTES = 1024  # the levels joined with CATEGORY_SEPARATOR
CATEGORY_SEPARATOR = " > "
MAX_ATTRIBUTES_BYTES = 2048  # the attributes as JSON (orjson, as the index stores them)
MAX_DESCRIPTION_BYTES = 65_536  # accepted; the index keeps the first INDEXED_DESCRIPTION_BYTES
INDEXED_DESCRIPTION_BYTES = 4000
INDEXED_TEXT_BYTES = 4000  # the BM25 text (title, brand, categories, description): its first bytes


def utf8_size(value: str) -> int:
    return len(value.encode())


def _at_most(limit: int):
    def check(value: str) -> str:
        if (size := utf8_size(value)) > limit:
            raise ValueError(f"at most {limit} bytes in UTF-8, got {size}")
        return value

    return AfterValidator(check)


def Bytes(limit: int, min_length: int = 0):  # noqa: N802  a type, as NonEmpty is
    """A string of at most ``limit`` UTF-8 bytes."""
    return Annotated[str, Field(min_length=min_length, max_length=limit), _at_most(limit)]


# Milvus looks rows up by id through a filter whose string literals pymilvus does not escape.
_UNFILTERABLE = re.compile(r"['\"\\\x00-\x1f\x7f]")


def _filterable(value: str) -> str:
    if _UNFILTERABLE.search(value):
        raise ValueError("no quotes, backslashes or control characters (the index filters on item ids)")
    return value


ItemId = Annotated[Bytes(MAX_ITEM_ID_BYTES, min_length=1), AfterValidator(_filterable)]


def new_event_id() -> str:
    return uuid.uuid4().hex


def utc_now() -> datetime:
    return datetime.now(UTC)


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # The field whose value is the Kafka message key: it decides the partition, and so the
    # order in which one user's (or one item's) events are seen.
    key_field: ClassVar[str]

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: NonEmpty = Field(default_factory=new_event_id)
    event_time: AwareDatetime = Field(default_factory=utc_now)

    @property
    def key(self) -> str:
        return getattr(self, self.key_field)


Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class ServedItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    item_id: ItemId
    position: int = Field(ge=1, le=MAX_POSITION, description="1-based rank on the result page.")
    score: float | None = None
    source: str | None = Field(None, description="Which retrieval route produced it (dense, bm25, rewrite...).")
    # The ranker's head probabilities when it scored the item (position-free: were the item
    # examined), so the drift monitor can compare predicted with observed per model version.
    p_click: Probability | None = None
    p_cart: Probability | None = None
    p_purchase: Probability | None = None


class QueryEvent(_Event):
    """A search that was served: what was asked and what was shown, in order."""

    key_field: ClassVar[str] = "user_id"
    type: Literal["query"] = "query"
    user_id: NonEmpty
    session_id: NonEmpty
    query_id: NonEmpty
    query: NonEmpty
    served: list[ServedItem] = Field(default_factory=list)
    rewrites_used: list[str] = Field(default_factory=list)
    model_versions: dict[str, str] = Field(default_factory=dict)
    degraded: list[NonEmpty] = Field(default_factory=list, max_length=16,
                                     description="Dependencies the handler answered without (as in its answer).")


class InteractionEvent(_Event):
    """One shopper action on one item, tied to the search (query_id) that showed it."""

    key_field: ClassVar[str] = "user_id"
    type: Literal["interaction"] = "interaction"
    action: Action
    user_id: NonEmpty
    session_id: NonEmpty
    query_id: NonEmpty | None = Field(None, description="The search that led here; None outside search.")
    item_id: ItemId
    position: int | None = Field(None, ge=1, le=MAX_POSITION, description="1-based rank where the item was shown.")
    price: float | None = Field(None, ge=0, le=MAX_PRICE, allow_inf_nan=False,
                                description="Unit price at the time (carts and purchases).")
    quantity: int = Field(1, ge=1, le=MAX_QUANTITY)


class CatalogUpsert(_Event):
    """A product created or changed. Carries the whole product, so applying it is idempotent."""

    key_field: ClassVar[str] = "item_id"
    type: Literal["catalog_upsert"] = "catalog_upsert"
    item_id: ItemId
    title: Bytes(MAX_TITLE_BYTES, min_length=1)
    description: Bytes(MAX_DESCRIPTION_BYTES) = Field(
        "", description=f"The search index keeps its first {INDEXED_DESCRIPTION_BYTES} bytes.")
    category_path: list[Bytes(MAX_CATEGORY_BYTES, min_length=1)] = Field(min_length=1)
    brand: Bytes(MAX_BRAND_BYTES) = ""
    price: float = Field(ge=0, le=MAX_PRICE, allow_inf_nan=False)
    attributes: dict[str, str] = Field(default_factory=dict)

    @field_validator("category_path")
    @classmethod
    def _path_fits(cls, path: list[str]) -> list[str]:
        if (size := utf8_size(CATEGORY_SEPARATOR.join(path))) > MAX_CATEGORY_PATH_BYTES:
            raise ValueError(f"at most {MAX_CATEGORY_PATH_BYTES} bytes in UTF-8 joined with "
                             f"{CATEGORY_SEPARATOR!r}, got {size}")
        return path

    @field_validator("attributes")
    @classmethod
    def _attributes_fit(cls, attributes: dict[str, str]) -> dict[str, str]:
        try:
            size = len(orjson.dumps(attributes))
        except orjson.JSONEncodeError as exc:  # a lone surrogate, which plain str values let through
            raise ValueError(str(exc)) from None
        if size > MAX_ATTRIBUTES_BYTES:
            raise ValueError(f"at most {MAX_ATTRIBUTES_BYTES} bytes as JSON, got {size}")
        return attributes


class CatalogDelete(_Event):
    key_field: ClassVar[str] = "item_id"
    type: Literal["catalog_delete"] = "catalog_delete"
    item_id: ItemId


class RewriteFeedback(_Event):
    """What happened after a query rewrite was used: the training signal for the rewriter."""

    key_field: ClassVar[str] = "query_key"
    type: Literal["rewrite_feedback"] = "rewrite_feedback"
    query_id: NonEmpty
    user_id: NonEmpty
    session_id: NonEmpty
    query: NonEmpty
    query_key: NonEmpty = Field(description="normalize_query(query)")
    rewrite: NonEmpty
    rewriter_version: NonEmpty
    outcome: RewriteOutcome
    item_id: ItemId | None = Field(None, description="The item behind the outcome, if any.")
    # The page split by route (items counted once, at their best outcome), so the rewrite's
    # routes can be compared with the original query's on the same page (streams.rewrite_feedback).
    shown: int = Field(0, ge=0, le=MAX_POSITION, description="Served items that came from this rewrite's routes.")
    engaged: int = Field(0, ge=0, le=MAX_POSITION, description="Of those, clicked, carted or purchased.")
    carts: int = Field(0, ge=0, le=MAX_POSITION, description="Of those, carted or purchased.")
    purchases: int = Field(0, ge=0, le=MAX_POSITION)
    original_shown: int = Field(0, ge=0, le=MAX_POSITION, description="Served items from the original query's routes.")
    original_engaged: int = Field(0, ge=0, le=MAX_POSITION)
    original_carts: int = Field(0, ge=0, le=MAX_POSITION)
    original_purchases: int = Field(0, ge=0, le=MAX_POSITION)


class DriftAlert(_Event):
    """The drift monitor (``streams.monitor``) found a window whose test score passed its
    calibrated threshold: ``metric`` on the window [window_start, window_end) of stream time."""

    key_field: ClassVar[str] = "metric"
    type: Literal["drift_alert"] = "drift_alert"
    metric: NonEmpty
    window: NonEmpty = Field(description="Window length, e.g. '60s'.")
    window_start: AwareDatetime
    window_end: AwareDatetime
    score: float = Field(allow_inf_nan=False)
    threshold: float = Field(allow_inf_nan=False)
    severity: Literal["warning", "critical"]
    monitor: NonEmpty = Field(description="Which monitor instance (each reads its share of the partitions).")


Event = Annotated[
    Union[QueryEvent, InteractionEvent, CatalogUpsert, CatalogDelete, RewriteFeedback, DriftAlert],
    Field(discriminator="type"),
]
EVENT_TYPES: tuple[type[_Event], ...] = (QueryEvent, InteractionEvent, CatalogUpsert, CatalogDelete, RewriteFeedback,
                                         DriftAlert)
_EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


class EventValidationError(ValueError):
    """A payload that is not a valid event. ``errors`` lists (field path, reason)."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{field}: {reason}" for field, reason in errors))


def _field_path(error: dict) -> str:
    if error["type"].startswith("union_tag"):  # the discriminator itself is missing or unknown
        return "type"
    return ".".join(str(part) for part in error["loc"]) or "<payload>"


def encode(event: _Event) -> bytes:
    return orjson.dumps(event.model_dump(mode="python"))


def decode(raw: bytes | str, allowed: tuple[type[_Event], ...] = EVENT_TYPES) -> _Event:
    """Parse and validate one event; ``allowed`` restricts the types a topic may carry."""
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EventValidationError([("<payload>", f"not valid JSON ({exc})")]) from None
    try:
        event = _EVENT_ADAPTER.validate_python(payload)
    except ValidationError as exc:
        raise EventValidationError([(_field_path(err), err["msg"]) for err in exc.errors()]) from None
    if not isinstance(event, allowed):
        names = ", ".join(t.model_fields["type"].default for t in allowed)
        raise EventValidationError([("type", f"'{event.type}' is not allowed here (expected {names})")])
    return event
