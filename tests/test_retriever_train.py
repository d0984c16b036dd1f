"""Training the retriever end to end on a tiny demo set (seconds), resuming after an
interruption, and evaluating it with the CLI's evaluation: files, numbers, errors."""

import dataclasses
import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from tailbridge.models.data.feedback import read_feedback
from tailbridge.models.retrieval.encoders import load_encoder
from tailbridge.models.retrieval.evaluate import evaluate
from tailbridge.models.metrics import ndcg_at
from tailbridge.models.retrieval.train import TrainConfig, TrainingError, train
from tailbridge.models.retrieval.graph import GraphFactors
from tailbridge.models.retrieval.model import RetrieverConfig
from tailbridge.models.retrieval.model import load as load_retriever
from tests.conftest import tiny_demo

torch.set_num_threads(1)

MODEL = RetrieverConfig(semantic_dim=32, lexical_dim=16, behaviour_dim=8, term_buckets=4096, graph_rank=4,
                        user_items=4, category_buckets=64, max_length=24, train_layers=1)
TRAIN = TrainConfig(stage1_epochs=2, stage2_epochs=1, batch_size=16, group_size=4, random_items=8, mine_depth=10,
                    encode_batch=64, warmup_steps=2, export_onnx=False)  # export: tests/test_models_onnx.py
EVERY_STEP = dataclasses.replace(TRAIN, checkpoint_minutes=0.0)  # a checkpoint after each step
ARTIFACT_FILES = {"config.json", "model.safetensors", "graph_index.json", "graph_factors.npz", "item_vectors.npy",
                  "item_vectors_ids.json", "item_vectors_keys.json", "metrics.json", "MODEL_CARD.md", "text", "tokenizer"}


class Interrupted(Exception):
    pass


def interrupt_at(bar_prefix: str, step: int):
    """A progress factory that stops training at a given step, like a Ctrl-C or a killed job."""
    @contextmanager
    def factory(label, total):
        done = [0]

        def advance(n=1):
            if label.startswith(bar_prefix) and n == 1:
                done[0] += 1
                if done[0] == step:
                    raise Interrupted(label)
        yield advance
    return factory


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return tiny_demo(tmp_path_factory.mktemp("demo"), sessions=60)


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    return train(demo, out, "tiny", MODEL, TRAIN, say=lambda _: None)


def test_artifact_has_everything_and_loads(trained, demo):
    assert {p.name for p in trained.iterdir()} == ARTIFACT_FILES  # the checkpoint is gone once complete
    metrics = json.loads((trained / "metrics.json").read_text())
    n_train = metrics["data"]["train_queries"]
    steps_per_epoch = -(-n_train // TRAIN.batch_size)
    assert metrics["steps"] == {"stage1_loss": 2 * steps_per_epoch, "stage2_loss": steps_per_epoch}
    assert metrics["data"]["logged_searches"] > 0 and metrics["data"]["dev_queries"] > 0
    # Dev before the first step, after every epoch, and the shipped state by exact search.
    assert [h["when"] for h in metrics["history"]] == ["start (untrained)", "stage 1 epoch 1", "stage 1 epoch 2",
                                                       "stage 2 epoch 1", "shipped (exact search)"]
    assert all(0 <= h["dev_ndcg@10"] <= 1 for h in metrics["history"])
    best = max(metrics["history"][:-1], key=lambda h: h["dev_ndcg@10"])
    assert metrics["selection"]["shipped"] == best["when"]
    assert metrics["selection"]["dev_shipped_exact"]["dev_ndcg@10"] >= metrics["selection"]["dev_start_exact"]["dev_ndcg@10"]
    assert 0 <= metrics["fn_mask_share"] < 1 and 0 < metrics["pool_items"] <= 150
    assert {"frozen-prefix cache", "pool", "stage 1 steps", "stage 2 steps"} <= set(metrics["phases_seconds"])
    card = (trained / "MODEL_CARD.md").read_text()
    assert f"{n_train} training queries" in card and "Stage 1" in card and "| start (untrained) |" in card
    config = json.loads((trained / "config.json").read_text())
    assert config["retriever"]["lexical_dim"] == 16 and config["training"]["stage1_epochs"] == 2

    encoder = load_encoder(str(trained))
    items = [{"item_id": "new-1", "title": "Harlow Velvet Sofa", "description": "", "category_path": ["Furniture"],
              "brand": "Harlow", "price": 10.0, "attributes": {}}]
    v = encoder.encode_items(items)
    assert v.shape == (1, MODEL.dim) and np.isclose(np.linalg.norm(v), 1.0, atol=1e-5)
    shipped = np.load(trained / "item_vectors.npy")
    assert shipped.shape == (150, MODEL.dim)
    # The graph's factors ship too (a behaviour refresh folds in against them): they give the
    # model's rows, and say which logged search the graph saw last.
    factors = GraphFactors.load(trained / "graph_factors.npz")
    table = load_retriever(trained)[0].item_tower.graph.table[:len(factors.items)].numpy()
    np.testing.assert_allclose(table, factors.item_rows(), atol=1e-6)
    assert factors.log_until is not None


def test_shipped_item_vectors_are_reused_only_for_unchanged_items(demo, trained):
    from tailbridge.models.data.loaders import load_dataset

    items = list(load_dataset(demo).items.values())[::-1]  # any order: matched by id
    encoder = load_encoder(str(trained))
    reused = encoder.encode_items(items)
    model, fz = load_retriever(trained)
    with torch.no_grad():
        fresh = model.encode_items(fz.items(items)).numpy()
    # Training's vectors: the frozen prefix was cached in fp16, so within 1e-3, not bit-equal.
    shipped = dict(zip(json.loads((trained / "item_vectors_ids.json").read_text()), np.load(trained / "item_vectors.npy")))
    np.testing.assert_array_equal(reused, np.stack([shipped[str(it["item_id"])] for it in items]))
    assert not np.array_equal(reused, fresh) and np.abs(reused - fresh).max() < 1e-3
    # One item's title changed: that item is encoded (and stays so), the others still come from the artifact.
    changed = [{**items[0], "title": items[0]["title"] + " XL"}, *items[1:]]
    once = encoder.encode_items(changed)
    np.testing.assert_array_equal(once[1:], reused[1:])
    assert np.abs(once[0] - reused[0]).max() > 1e-2
    np.testing.assert_allclose(encoder.encode_items(items[:1])[0], fresh[0], atol=1e-5)  # back to the old title: encoded
    # A field the item tower does not read changed: still the shipped vector.
    np.testing.assert_array_equal(encoder.encode_items([{**items[1], "price": 1.0}])[0], reused[1])
    # Items whose graph row an overlay changed are encoded again, the rest come from the artifact.
    encoder._overlay_items.add(str(items[1]["item_id"]))
    encoder._model.item_tower.graph.table[:] = 0  # what a refresh that moved every row would do
    after = encoder.encode_items(items)
    with torch.no_grad():
        np.testing.assert_allclose(after[1], encoder._model.encode_items(fz.items(items[1:2])).numpy()[0], atol=1e-6)
    np.testing.assert_array_equal(after[2:], reused[2:])


def test_interrupted_training_resumes_to_the_same_model(demo, trained, tmp_path):
    with pytest.raises(Interrupted):
        train(demo, tmp_path, "tiny", MODEL, EVERY_STEP, say=lambda _: None,
              progress_factory=interrupt_at("stage 1 epoch 2/", 3))
    assert (tmp_path / "tiny" / "checkpoint" / "state.pt").exists()
    said = []
    out = train(demo, tmp_path, "tiny", MODEL, TRAIN, say=said.append)
    assert any(s.startswith("resuming tiny at stage 1 epoch 2 step 2") for s in said)
    resumed, straight = json.loads((out / "metrics.json").read_text()), json.loads((trained / "metrics.json").read_text())
    assert resumed["steps"] == straight["steps"]
    np.testing.assert_allclose(np.load(out / "item_vectors.npy"), np.load(trained / "item_vectors.npy"), atol=1e-5)


def test_checkpoint_from_other_settings_is_refused(demo, tmp_path):
    with pytest.raises(Interrupted):
        train(demo, tmp_path, "v", MODEL, TRAIN, say=lambda _: None, progress_factory=interrupt_at("stage 1 epoch 2/", 1))
    other = dataclasses.replace(TRAIN, fn_margin=0.2)
    with pytest.raises(TrainingError, match="pass --restart"):
        train(demo, tmp_path, "v", MODEL, other, say=lambda _: None)


def test_evaluation_report_chart_and_trec_runs(demo, trained, tmp_path):
    report = evaluate(demo, "test", str(trained), run_dir=tmp_path / "runs", out_dir=tmp_path / "eval",
                      say=lambda _: None)
    assert list(report["systems"]) == ["bm25", "minilm", "hybrid-rrf", "tailbridge", "tailbridge+user"]
    assert "persona" in report["user_context"]
    for system in report["systems"].values():
        assert set(system) >= {"overall", "head", "torso", "tail"}
        assert sum(system[s]["queries"] for s in ("head", "torso", "tail")) == system["overall"]["queries"]
        assert all(0 <= system["overall"][m] <= 1 for m in ("ndcg@10", "recall@100", "mrr@10", "grade_acc"))
    assert report["complete"] and json.loads((tmp_path / "eval" / "eval-test.json").read_text()) == report
    assert (tmp_path / "eval" / "eval-test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Anyone can recompute the metrics from the TREC runs and the qrels.
    qrels = {}
    for line in (demo / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        q, d, g = line.split("\t")
        qrels.setdefault(q, {})[d] = int(g)
    for system in report["systems"]:
        ranked = {}
        for line in (tmp_path / "runs" / f"{system}.trec").read_text().splitlines():
            qid, q0, item, rank, score, name = line.split()
            assert q0 == "Q0" and name == system
            ranked.setdefault(qid, []).append((int(rank), item, float(score)))
        if system != "bm25":  # BM25 retrieves only items that share a term with the query
            assert set(ranked) == set(qrels) and all(len(r) == 100 for r in ranked.values())
        for rows in ranked.values():
            assert [r for r, _, _ in rows] == list(range(1, len(rows) + 1)) and len(rows) <= 100
            assert all(a[2] >= b[2] for a, b in zip(rows, rows[1:]))
        recomputed = np.mean([ndcg_at([i for _, i, _ in sorted(ranked.get(q, []))], qrels[q]) for q in sorted(qrels)])
        assert recomputed == pytest.approx(report["systems"][system]["overall"]["ndcg@10"], abs=1e-4)


def test_evaluation_errors_are_clear(demo):
    from tailbridge.models.data.loaders import DatasetError

    with pytest.raises(DatasetError, match="no split 'valid'"):
        evaluate(demo, "valid", say=lambda _: None)


def test_feedback_log_round_trip_and_no_test_queries(demo):
    log = read_feedback(demo / "feedback")
    test_texts = {json.loads(line)["text"] for line in (demo / "queries.jsonl").read_text().splitlines()
                  if json.loads(line)["_id"] in (demo / "qrels" / "test.tsv").read_text()}
    assert not set(log["query"]) & test_texts  # the simulated log covers training queries only
    assert set(log["label"]) <= {"shown_unclicked", "clicked", "added_to_cart", "purchased"}
    assert (log.groupby("query_id")["position"].apply(lambda p: sorted(p) == list(range(1, len(p) + 1)))).all()


def test_cli_reports_bad_input_clearly(demo, tmp_path):
    from typer.testing import CliRunner

    from tailbridge.cli import app

    runner = CliRunner()
    cases = [
        (["eval", "retriever", "--data", str(tmp_path / "missing")], "data directory not found"),
        (["eval", "retriever", "--data", str(demo), "--split", "nope", "--out", str(tmp_path)], "no split 'nope'"),
        (["eval", "retriever", "--data", str(demo), "--model", str(tmp_path / "no-model")], "no trained retriever"),
        (["train", "retriever", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)], "data directory not found"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
    beir = tmp_path / "plain"
    beir.mkdir()
    for name in ("corpus.jsonl", "queries.jsonl"):
        (beir / name).write_text((demo / name).read_text())
    result = runner.invoke(app, ["train", "retriever", "--data", str(beir), "--simulate-feedback", "5"])
    assert result.exit_code == 1 and "needs demo data (users.jsonl)" in " ".join(result.output.split())
