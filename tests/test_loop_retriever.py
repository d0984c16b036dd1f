"""The alignment loop's retriever kind on a real Milvus: kill -9 while the candidate's collection
is being built leaves serving on the parent, and the next iteration fine-tunes, promotes (the
alias moves), keeps the parent's collection for rollback and drops the one the kill left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from tailbridge.bench.common import settings_env
from tests.conftest import tiny_demo

torch.set_num_threads(1)


def index_catalog(settings, version: str, model_dir: Path, data: Path) -> None:
    """What the demo's replay and reindex leave: the catalog in ``version``'s collection, served."""
    from tailbridge.models.data.loaders import load_dataset
    from tailbridge.models.retrieval.encoders import load_encoder
    from tailbridge.streams import item_index
    from tailbridge.vocab import item_text

    client = item_index.connect(settings)
    encoder = load_encoder(str(model_dir))
    items = list(load_dataset(data).items.values())
    name = item_index.create_collection(client, settings, version, encoder.dim)
    client.upsert(name, item_index.rows(items, encoder.encode_items(items), version, item_text,
                                        item_index.legacy_padding(client, name)))
    client.flush(name)
    client.load_collection(name)
    item_index.point_alias(client, settings, version)


@pytest.mark.integration
def test_kill_9_mid_reindex_then_an_iteration_promotes_and_drops_the_orphan(stack_settings, tmp_path):
    from tailbridge.cli.loop import run_once
    from tailbridge.cli.models import sync
    from tailbridge.models.registry import Registry
    from tailbridge.models.retrieval.train import train
    from tailbridge.streams import item_index
    from tests.test_retriever_train import MODEL, TRAIN

    data = tiny_demo(tmp_path / "demo", sessions=80)
    parent = train(data, tmp_path / "models" / "retriever", "tb-parent", MODEL, TRAIN, say=lambda _: None)
    run_id = uuid.uuid4().hex[:8]
    settings = stack_settings.model_copy(update={
        "data_dir": tmp_path, "topic_prefix": f"tblr-{run_id}", "feast_project": f"tblr_{run_id}",
        "loop_gate_min_pages": 0, "loop_gate_tolerance": 1.0, "loop_retriever_minutes": 1.0})
    index_catalog(settings, "tb-parent", parent, data)
    sync(settings)
    client = item_index.connect(settings)
    registry = Registry(tmp_path / "models")
    assert registry.read().serving("retriever").version == "tb-parent"

    loop = subprocess.Popen([str(Path(sys.executable).parent / "tailbridge"), "loop", "--once", "--force", "--kinds",
                             "retriever", "--data", str(data), "--feedback", str(data / "feedback")],
                            env=settings_env(settings), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while loop.poll() is None and time.monotonic() < deadline:
        building = set(item_index.live_collections(client, settings).values()) - {"tb-parent"}
        if building:
            break
        time.sleep(0.2)
    assert loop.poll() is None and building, "the loop ended (or timed out) before its reindex began"
    os.kill(loop.pid, signal.SIGKILL)  # the candidate's collection exists; the alias has not moved
    loop.wait()
    [orphan] = building

    assert item_index.serving_version(client, settings) == "tb-parent"
    assert sync(settings) == [] and registry.read().serving("retriever").version == "tb-parent"
    assert (tmp_path / "models" / "retriever" / orphan / "model.safetensors").is_file()  # moved in whole

    result = run_once(settings, data, data / "feedback", ("retriever",), say=lambda _: None, force=True)
    [report] = result["reports"]
    assert report.promoted and report.parent == "tb-parent", report
    assert item_index.serving_version(client, settings) == report.candidate
    assert registry.read().serving("retriever").version == report.candidate
    live = item_index.live_collections(client, settings)
    # The parent's collection stays for `models rollback`; the one the kill left is gone.
    assert sorted(live.values()) == sorted([report.candidate, "tb-parent"]), live
    serving = item_index.serving_collection(client, settings)
    assert item_index.count(client, serving) == item_index.count(client, item_index.collection_name(settings, "tb-parent"))
    for name in live:
        client.drop_collection(name)
