"""Model selection cannot regress: training that only hurts (here a destructive learning rate on
a small, noisy, realistic data set) ships the untrained state and says so."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from tailbridge.models.retrieval.train import train

from tailbridge.synthetic import catalog as synth
from tailbridge.synthetic import realistic
from tests.test_retriever_train import MODEL, TRAIN

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    root = tmp_path_factory.mktemp("realistic")
    synth.write(realistic.generate(items=160, seed=3), root)
    return root


def test_training_never_ships_below_the_untrained_model(noisy, tmp_path):
    destructive = dataclasses.replace(TRAIN, stage1_epochs=1, stage2_epochs=0, lr_text=0.3, lr_heads=0.3,
                                      lr_terms=3.0, warmup_steps=1)
    said = []
    out = train(noisy, tmp_path, "v", MODEL, destructive, say=said.append)
    metrics = json.loads((out / "metrics.json").read_text())
    start, trained, shipped = metrics["history"][0], metrics["history"][1], metrics["history"][-1]
    assert trained["dev_ndcg@10"] < start["dev_ndcg@10"]  # the training did hurt...
    sel = metrics["selection"]
    assert sel["shipped"] == "start (untrained)" and sel["no_gain_over_untrained"]  # ...so it did not ship
    assert shipped["dev_ndcg@10"] >= sel["dev_start_exact"]["dev_ndcg@10"] - 1e-9
    assert any("WARNING: no trained state beat the untrained model" in s for s in said)
    assert "WARNING: no trained state beat the untrained model" in (out / "MODEL_CARD.md").read_text()
    # The written weights are the untrained ones: the term table is its random init, untouched.
    from safetensors.torch import load_file

    torch.manual_seed(destructive.seed)
    from tailbridge.models.retrieval import model as unified

    fresh, _ = unified.build(MODEL)
    np.testing.assert_array_equal(load_file(str(out / "model.safetensors"))["terms.table.weight"].numpy(),
                                  fresh.terms.table.weight.detach().numpy())
