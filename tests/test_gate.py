"""The promotion gate (models/gate.py) on hand-computed pages and decisions."""

from __future__ import annotations

import pytest

from tailbridge.models.gate import Page, decide, replay_ndcg


def test_replay_ndcg_hand_computed():
    pages = [
        # Re-ranked by score: item 1 (purchased), item 2 (clicked), item 0: every metric ideal.
        Page(scores=[0.1, 0.9, 0.5], positions=[1, 2, 3], gains=[0, 3, 1]),
        # Ties keep the logged order, so the carted item stays third: DCG 1/log2(4) = 0.5 of an
        # ideal 1 (cart, click); graded 2/log2(4) = 1 of an ideal 2. No purchase: not counted.
        Page(scores=[0.0, 0.0, 0.0], positions=[1, 2, 3], gains=[0, 0, 2]),
        Page(scores=[1.0, 2.0], positions=[1, 2], gains=[0, 0]),  # nothing happened: counts nowhere
    ]
    out = replay_ndcg(pages)
    assert out["purchase_ndcg@10"] == pytest.approx(1.0) and out["pages_purchase"] == 1
    assert out["cart_ndcg@10"] == pytest.approx(0.75) and out["pages_cart"] == 2
    assert out["click_ndcg@10"] == pytest.approx(0.75) and out["pages_click"] == 2
    assert out["graded_ndcg@10"] == pytest.approx(0.75) and out["pages_graded"] == 2


def test_replay_cuts_at_k():
    # The purchase sits 11th after re-ranking: outside the top 10, nDCG@10 = 0.
    page = Page(scores=[float(-i) for i in range(11)], positions=list(range(1, 12)), gains=[0] * 10 + [3])
    assert replay_ndcg([page])["purchase_ndcg@10"] == 0.0
    assert replay_ndcg([page], k=11)["purchase_ndcg@11"] == pytest.approx(1 / 3.584962500721156)  # 1/log2(12)


METRICS = ("purchase_ndcg@10", "judged_ndcg@10")


def test_decide():
    cand, serv = {"purchase_ndcg@10": 0.50, "judged_ndcg@10": 0.70}, {"purchase_ndcg@10": 0.51, "judged_ndcg@10": 0.69}
    first = decide(cand, None, 0.01, METRICS)
    assert first.promote and first.reason == "nothing serving"

    within = decide(cand, serv, 0.02, METRICS, min_pages=10, pages=40)
    assert within.promote and within.deltas == {"purchase_ndcg@10": pytest.approx(-0.01),
                                                "judged_ndcg@10": pytest.approx(0.01)}
    strict = decide(cand, serv, 0.005, METRICS)
    assert not strict.promote and strict.reason == "worse: purchase_ndcg@10 -0.0100"

    thin = decide(cand, serv, 0.02, METRICS, min_pages=100, pages=40)
    assert not thin.promote and "not enough evidence" in thin.reason

    # A metric one side lacks (no judged split) is not compared; the other decides.
    partial = decide({"purchase_ndcg@10": 0.6, "judged_ndcg@10": None}, serv, 0.0, METRICS)
    assert partial.promote and set(partial.deltas) == {"purchase_ndcg@10"}
    nothing = decide({"purchase_ndcg@10": None, "judged_ndcg@10": None}, serv, 0.0, METRICS)
    assert not nothing.promote and nothing.reason == "no metric to compare"
    assert nothing.to_json()["serving"] == serv
