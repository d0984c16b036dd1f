"""Event contracts: pure validation logic, no broker."""

from datetime import UTC, datetime

import orjson
import pytest
from pydantic import ValidationError

from tailbridge.streams.events import (
    CatalogDelete,
    CatalogUpsert,
    DriftAlert,
    EventValidationError,
    InteractionEvent,
    QueryEvent,
    RewriteFeedback,
    ServedItem,
    decode,
    encode,
)
from tailbridge.streams.topics import TOPICS, spec_for
from tailbridge.vocab import normalize_query

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def sample_events():
    return [
        QueryEvent(user_id="u1", session_id="s1", query_id="q1", query="Sofa under $500", event_time=NOW,
                   served=[ServedItem(item_id="item_1", position=1, score=0.9, source="dense")],
                   rewrites_used=["couch"], model_versions={"retriever": "v1"}),
        InteractionEvent(action="click", user_id="u1", session_id="s1", query_id="q1", item_id="item_1",
                         position=1, event_time=NOW),
        InteractionEvent(action="purchase", user_id="u1", session_id="s1", query_id="q1", item_id="item_1",
                         position=1, price=499.0, quantity=2, event_time=NOW),
        CatalogUpsert(item_id="item_1", title="Harlow 3-Seat Velvet Sofa", category_path=["Furniture", "Sofas"],
                      brand="Harlow", price=499.0, attributes={"color": "navy"}, event_time=NOW),
        CatalogDelete(item_id="item_2", event_time=NOW),
        RewriteFeedback(query_id="q1", user_id="u1", session_id="s1", query="couch for 3",
                        query_key=normalize_query("couch for 3"), rewrite="3 seat sofa", rewriter_version="r1",
                        outcome="clicked", item_id="item_1", event_time=NOW),
        DriftAlert(metric="q.key_mix", window="60s", window_start=NOW, window_end=NOW, score=0.2, threshold=0.05,
                   severity="critical", monitor="m1", event_time=NOW),
    ]


@pytest.mark.parametrize("event", sample_events(), ids=lambda e: f"{e.type}")
def test_every_event_type_round_trips_through_json(event):
    assert decode(encode(event)) == event


def test_keys_follow_the_registry():
    for event in sample_events():
        spec = spec_for(event)
        assert event.key == getattr(event, spec.key)
    assert {spec_for(e).name for e in sample_events()} == set(TOPICS)


def field_errors(raw) -> dict[str, str]:
    with pytest.raises(EventValidationError) as info:
        decode(raw if isinstance(raw, bytes) else orjson.dumps(raw))
    return dict(info.value.errors)


def test_missing_field_is_named():
    payload = orjson.loads(encode(sample_events()[1]))
    del payload["item_id"]
    errors = field_errors(payload)
    assert list(errors) == ["interaction.item_id"]
    assert "required" in errors["interaction.item_id"].lower()


def test_bad_values_are_named_with_the_reason():
    payload = orjson.loads(encode(sample_events()[1]))
    payload |= {"action": "like", "position": 0}
    errors = field_errors(payload)
    assert set(errors) == {"interaction.action", "interaction.position"}
    assert "click" in errors["interaction.action"]  # names what is allowed
    assert "greater than or equal to 1" in errors["interaction.position"]


def test_naive_timestamps_unknown_types_versions_and_extra_fields_are_rejected():
    payload = orjson.loads(encode(sample_events()[0]))
    assert "query.event_time" in field_errors(payload | {"event_time": "2026-11-21T12:00:00"})
    assert "query.schema_version" in field_errors(payload | {"schema_version": 2})
    assert "query.surprise" in field_errors(payload | {"surprise": 1})
    assert "type" in field_errors(payload | {"type": "telemetry"})


def test_not_json_is_rejected():
    errors = field_errors(b"\x00not json")
    assert "not valid JSON" in errors["<payload>"]


def test_topic_restricts_event_types():
    with pytest.raises(EventValidationError, match="'query' is not allowed here"):
        decode(encode(sample_events()[0]), allowed=TOPICS["catalog"].events)


def test_error_message_is_readable():
    with pytest.raises(EventValidationError, match=r"interaction\.user_id: .*"):
        decode(orjson.dumps({"type": "interaction", "action": "click", "session_id": "s", "item_id": "i"}))


def test_normalize_query():
    assert normalize_query("  Ｓofa\tUNDER  $500 ") == "sofa under $500"


@pytest.mark.parametrize("field, value", [("quantity", 2**70), ("position", 2**70), ("price", float("inf")),
                                          ("price", 1e12)])
def test_numbers_out_of_range_are_refused(field, value):
    """Found by fuzzing /events: an integer beyond 64 bits validated, then orjson could not encode it."""
    payload = {"action": "click", "user_id": "u", "session_id": "s", "item_id": "i", field: value}
    with pytest.raises(ValidationError) as error:
        InteractionEvent.model_validate(payload)
    assert [e["loc"] for e in error.value.errors()] == [(field,)]
