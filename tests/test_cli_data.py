"""`tailbridge data synth` and `data replay` as a user runs them, against the session's broker."""

import json
import socket
import uuid
import subprocess
import sys
from pathlib import Path

import pytest

from tailbridge.models.data.beir import load_beir
from tailbridge.streams.events import decode
from tailbridge.streams.topics import TOPICS, count_messages, create_topics, make_consumer
from tests.conftest import settings_env

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).parent / "tailbridge")


def run(settings, *args):
    out = subprocess.run([CLI, *args], env=settings_env(settings), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_synth_then_replay_lands_every_event_in_its_topic(stack_settings, tmp_path):
    # Own topics: other tests publish to the session's.
    stack_settings = stack_settings.model_copy(update={"topic_prefix": f"tbcli-{uuid.uuid4().hex[:8]}"})
    data = tmp_path / "demo"
    run(stack_settings, "data", "synth", "--items", "400", "--users", "20", "--seed", "3", "--out", str(data))
    beir = load_beir(data)
    assert len(beir.corpus) == 400 and beir.qrels["train"] and beir.qrels["test"]
    assert json.loads((data / "manifest.json").read_text())["seed"] == 3

    create_topics(stack_settings)
    topics = [TOPICS[name].topic(stack_settings) for name in ("catalog", "queries", "interactions")]
    out = run(stack_settings, "data", "replay", "--data", str(data), "--events", "600", "--rate", "0")
    assert "published" in out.stdout
    added = count_messages(stack_settings, topics, idle_seconds=1.0)
    assert added[topics[0]] == 400                     # every catalog item once
    assert added[topics[1]] + added[topics[2]] == 600  # the behaviour events asked for
    assert added[topics[1]] > 0 and added[topics[2]] > added[topics[1]]  # a search shows several items

    # What landed is valid and consistent: interactions refer to catalog items.
    consumer = make_consumer(stack_settings, topics[2], group_id="cli-check", consumer_timeout_ms=5000)
    try:
        actions = {decode(r.value, allowed=TOPICS["interactions"].events).item_id for r in consumer}
    finally:
        consumer.close()
    assert actions and actions <= set(beir.corpus)


def test_replay_without_data_is_a_clear_error(stack_settings, tmp_path):
    out = subprocess.run([CLI, "data", "replay", "--data", str(tmp_path / "missing")],
                         env=settings_env(stack_settings), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "run `tailbridge data synth` first" in out.stdout


def test_replay_with_no_broker_is_a_clear_error(stack_settings, tmp_path):
    """A broker that does not answer: an error that names it and the way out, not a traceback."""
    data = tmp_path / "demo"
    run(stack_settings, "data", "synth", "--items", "40", "--users", "4", "--seed", "3", "--out", str(data))
    with socket.socket() as closed:  # a free loopback port with nothing listening on it
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    nowhere = stack_settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{port}"})
    out = subprocess.run([CLI, "data", "replay", "--data", str(data), "--events", "10"], env=settings_env(nowhere),
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"Kafka at 127.0.0.1:{port}" in out.stdout and "tailbridge stack up" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr
