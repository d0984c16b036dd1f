"""The demo's live replay ends with every catalog item indexed and every engaged (search, item)
pair of the stream labelled in the feedback log, and prints the counts side by side."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from rich.console import Console

from tailbridge.cli import demo
from tailbridge.streams.events import InteractionEvent, QueryEvent, ServedItem
from tailbridge.synthetic import catalog as synth
from tests.conftest import stream_namespace

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def search(query_id: str, items: list[str]) -> QueryEvent:
    return QueryEvent(user_id="u", session_id="s", query_id=query_id, query="rug", event_time=T0,
                      served=[ServedItem(item_id=item, position=k + 1) for k, item in enumerate(items)])


def action(query_id: str | None, item: str, name: str, after_s: float) -> InteractionEvent:
    return InteractionEvent(user_id="u", session_id="s", query_id=query_id, item_id=item, action=name,
                            event_time=T0 + timedelta(seconds=after_s))


def test_engaged_pairs_are_actions_on_the_page_inside_the_window():
    pairs = demo.EngagedPairs(window_s=10)
    for event in (search("q1", ["a", "b", "c"]), search("q2", ["a"]),
                  action("q1", "a", "click", 1), action("q1", "a", "purchase", 2),  # one pair, two actions
                  action("q1", "b", "impression", 1),  # not engaged
                  action("q1", "c", "add_to_cart", 10),  # at the window's end: counts
                  action("q2", "a", "click", 10.001),  # after it: the log labels it shown_unclicked
                  action("q1", "z", "click", 1),  # not on the page
                  action(None, "a", "click", 1), action("q3", "a", "click", 1)):  # no search, unknown search
        pairs.add(event)
    assert pairs.count() == 2
    assert pairs.count_all() == 3  # q2's late click too


def test_the_demo_window_holds_the_replays_sessions():
    dataset = synth.generate(items=60, users=6, seed=3)
    # 1,200 events at 400/s: the widest search-to-engagement gap is some hundred events, under a second.
    assert demo.demo_window_s(dataset, rate=400, events=1200, seed=3) == demo.DEMO_FEEDBACK_WINDOW_S
    slow = demo.demo_window_s(dataset, rate=5, events=1200, seed=3)  # the same sessions, 80 x slower
    assert slow > demo.DEMO_FEEDBACK_WINDOW_S
    assert demo.demo_window_s(dataset, rate=0, events=1200, seed=3) == demo.DEMO_FEEDBACK_WINDOW_S  # unbounded rate


@pytest.mark.integration
def test_the_replay_ends_indexed_and_labelled(stack_settings, tmp_path):
    dataset = synth.generate(items=60, users=6, seed=3)
    console = Console(record=True, width=200)
    with stream_namespace(stack_settings, tmp_path, "tbdemo") as ns:
        demo.live_replay(ns.settings, dataset, rate=400, events=1200, seed=3, console=console)
    text = console.export_text()
    indexed = re.search(r"catalog items -> indexed in Milvus\s*│\s*(\d+)\s*│\s*(\d+)", text)
    engaged = re.search(r"engaged \(search, item\) pairs in the stream\s*│\s*(\d+)\s*│", text)
    labelled = re.search(r"labelled engaged rows in the feedback log\s*│\s*(\d+)\s*│\s*(\d+)", text)
    assert indexed and indexed.groups() == ("60", "60"), text[-3000:]
    assert labelled and labelled.group(1) == labelled.group(2) and int(labelled.group(1)) > 0, text[-3000:]
    # The window holds the replay's sessions: every engagement of the stream is labelled.
    assert engaged and engaged.group(1) == labelled.group(1), text[-3000:]
    assert re.search(r"feedback window: \d+ s of event time", text), text[-3000:]
    assert "still had their feedback window open" not in text
