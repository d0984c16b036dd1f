"""Evaluation on real-world queries: no crash on queries without an indexable term, fusion of
partial rankings, catalog vectors cached per model version, results on disk as each system ends."""

import json

import numpy as np
import pytest
import torch
from tailbridge.models.retrieval.evaluate import (
    SystemRun,
    encode_catalog,
    fuse_rrf,
    run_system,
)
from tailbridge.models.retrieval.lexical import bm25_scorer, top_k

torch.set_num_threads(1)

ITEMS = [{"item_id": "a", "title": "DeWalt 20V cordless drill DCD771C2"},
         {"item_id": "b", "title": "Red claw hammer 16 oz"},
         {"item_id": "c", "title": "Drill bit set, titanium"}]


def test_queries_without_an_indexable_term_retrieve_nothing_instead_of_crashing():
    # a stopword, a single letter, numbers with units unknown to the catalog, punctuation only
    queries = ["the", "a", "3 mm", "!!", "", "cordless drill"]
    scores = bm25_scorer(ITEMS, queries)(0, len(queries))
    assert scores.shape == (6, 3)
    assert np.isneginf(scores[:5]).all()
    assert scores[5, 0] > scores[5, 2] > -np.inf and np.isneginf(scores[5, 1])  # b shares no term
    run = run_system(bm25_scorer(ITEMS, queries), len(queries), ["a", "b", "c"], [{"a": 3}] * 6, lambda n: None)
    assert run.top[:5] == [[]] * 5 and [d for d, _ in run.top[5]] == ["a", "c"]


def test_top_k_orders_finite_scores_and_pads():
    scores = np.array([[0.1, 0.9, -np.inf, 0.9], [-np.inf] * 4], dtype=np.float32)
    assert top_k(scores, 3).tolist() == [[1, 3, 0], [-1, -1, -1]]


def test_rrf_fuses_rankings_of_different_lengths():
    ids = ["a", "b", "c"]
    lexical = SystemRun([], [], [np.array([2])])  # BM25 found only c
    dense = SystemRun([], [], [np.array([0, 2, 1])])
    fused = fuse_rrf([lexical, dense], ids, [{"a": 1, "b": 0}])
    # c: 1/61 + 1/62 beats a: 1/61 beats b: 1/63
    assert [d for d, _ in fused.top[0]] == ["c", "a", "b"]
    assert fused.judged_scores[0] == pytest.approx({"a": 1 / 61, "b": 1 / 63})


class CountingEncoder:
    version = "toy/v1"

    def __init__(self):
        self.calls = 0

    def encode_items(self, items):
        self.calls += 1
        return np.eye(len(items), 4, dtype=np.float32)


def test_catalog_vectors_are_cached_per_version_and_catalog(tmp_path):
    encoder, said = CountingEncoder(), []
    first = encode_catalog(encoder, ITEMS, tmp_path, said.append)
    again = encode_catalog(encoder, ITEMS, tmp_path, said.append)
    assert encoder.calls == 1 and np.array_equal(first, again) and "cache" in said[-1]
    encode_catalog(encoder, [*ITEMS[:2], {**ITEMS[2], "title": "Drill bits"}], tmp_path, said.append)
    assert encoder.calls == 2  # another catalog
    encoder.version = "toy/v2"
    encode_catalog(encoder, ITEMS, tmp_path, said.append)
    assert encoder.calls == 3 and len(list(tmp_path.glob("*.npy"))) == 3


def test_results_are_written_as_each_system_finishes(tmp_path):
    from tailbridge.models.retrieval.evaluate import evaluate

    from tailbridge.synthetic import catalog as synth

    data = tmp_path / "data"
    synth.write(synth.generate(items=60, users=2, seed=3), data)
    with pytest.raises(ValueError, match="unknown encoder version"):  # fails after the baselines ran
        evaluate(data, "test", "no-such-model", out_dir=tmp_path / "eval", say=lambda _: None,
                 cache_dir=tmp_path / "cache")
    partial = json.loads((tmp_path / "eval" / "eval-test.json").read_text())
    assert partial["complete"] is False and list(partial["systems"]) == ["bm25", "minilm", "hybrid-rrf"]
    assert [p.name.split("-")[0] for p in (tmp_path / "cache").glob("*.npy")] == ["minilm"]  # the next run reuses it
