"""The multi-task ranker: features, loss masking, point-in-time stats, a tiny end-to-end
training (seconds), the artifact, serving scores, evaluation and the CLI's errors."""

import json
import math
import time
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
import torch

from tailbridge.models.ranking import features as ft
from tailbridge.models.ranking import model as rk
from tailbridge.models.ranking.dataset import point_in_time_stats, prepare
from tailbridge.models.ranking.evaluation import auc, evaluate, expected_ndcg, expected_purchases
from tailbridge.models.ranking.training import RankerTrainConfig, cache_texts, fit, train, write_artifact
from tailbridge.vocab import ITEM_STATS_FIELDS, NO_ITEM_STATS
from tests.conftest import tiny_demo

torch.set_num_threads(1)

TINY = rk.RankerConfig(layers=1, train_layers=1, max_length=16, dim=16, hidden=16, experts=2)
TRAIN = RankerTrainConfig(epochs=2, batch_size=128, finetune_steps=3, finetune_searches=4, encode_batch=64,
                          max_minutes=None, comparisons=("click-only",))
ARTIFACT_FILES = {"config.json", "model.safetensors", "text", "tokenizer", "item_encodings.npy",
                  "item_encodings.json", "catalog.json", "metrics.json", "MODEL_CARD.md", "query_encoder.onnx"}


@pytest.fixture(scope="module")
def bert():
    """One randomly initialised 1-layer MiniLM for the unit tests that never train text (building
    one costs seconds)."""
    return rk.truncated_bert(1, config_only=True)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return tiny_demo(tmp_path_factory.mktemp("demo"), sessions=80)


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    return train(demo, demo / "feedback", out, "tiny", TINY, TRAIN, say=lambda _: None)


def no_bar(label, total):
    return nullcontext(lambda n=1: None)


def catalog_candidates(demo, n=12):
    items = [json.loads(line) for line in (demo / "corpus.jsonl").read_text().splitlines()[:n]]
    return [{"item_id": it["_id"], "title": it["title"], "brand": it["metadata"].get("brand", ""),
             "category_path": " > ".join(it["metadata"].get("category_path", [])),
             "price": it["metadata"].get("price", 0.0), "ctr_24h": 0.05 + 0.01 * k, "cvr_24h": 0.05,
             "purchases_24h": k % 3} for k, it in enumerate(items)]


# ------------------------------------------------------------------ pure logic


def test_user_item_features():
    item = {"item_id": "a", "title": "Harlow Sofa", "brand": "Harlow", "category_path": "Home > Sofas", "price": 200.0}
    assert ft.leaf_category(item) == "Sofas" and rk.product_text(item) == "Harlow Sofa. Harlow. Sofas"
    sofas = [{"item_id": f"s{k}", "brand": "Other", "category_path": ["Home", "Sofas"], "price": 100.0 * 2 ** (k / 4)}
             for k in range(9)]  # 100 .. 400: a sofa at 200 sits in the middle of the range
    catalog = ft.Catalog.from_items([*sofas, {"item_id": "x", "brand": "Harlow", "category": "Lamps", "price": 100.0},
                                     {"item_id": "y", "brand": "Harlow", "category": "Lamps", "price": 100.0}, item])
    assert catalog.price_level("Sofas", 200.0) == pytest.approx(0.5, abs=0.1) and catalog.price_level("Lamps", 5) is None
    none = [0.0] * len(ft.USER_FEATURES)
    assert ft.user_item_features(item, None, catalog) == none
    assert ft.user_item_features(item, ft.user_view(None, catalog), catalog) == none
    fan = {"affinity_categories": ["Sofas", "Lamps"], "affinity_weights": [0.9, 0.1],
           "recent_item_ids": ["a", "x", "y", "s0"], "recent_actions": ["purchase", "click", "click", "click"]}
    other = {"affinity_categories": ["Lamps"], "affinity_weights": [1.0], "recent_item_ids": ["s8", "unknown"],
             "recent_actions": ["add_to_cart", "click"]}
    f_fan = dict(zip(ft.USER_FEATURES, ft.user_item_features(item, ft.user_view(fan, catalog), catalog)))
    f_other = dict(zip(ft.USER_FEATURES, ft.user_item_features(item, ft.user_view(other, catalog), catalog)))
    assert f_fan["has_user"] == f_other["has_user"] == 1.0
    assert f_fan["category_affinity"] == pytest.approx(0.9) and f_other["category_affinity"] == 0.0
    assert (f_fan["recently_clicked"], f_fan["recently_carted"], f_fan["recently_purchased"]) == (1.0, 1.0, 1.0)
    assert (f_other["recently_clicked"], f_other["recently_purchased"]) == (0.0, 0.0)
    assert f_fan["log_price_vs_recent_median"] == pytest.approx(math.log(200 / 100))  # median of 200, 100, 100, 100
    assert f_other["log_price_vs_recent_median"] == pytest.approx(math.log(200 / 400))  # "unknown" has no price
    # the other shopper bought the dearest sofa: this one is half a category's price range below what they buy
    assert f_other["price_level_vs_recent"] == pytest.approx(-0.5, abs=0.1)
    assert f_other["abs_price_level_vs_recent"] == -f_other["price_level_vs_recent"]
    assert f_fan["brand_share"] == pytest.approx(3 / 4) and f_other["brand_share"] == 0.0
    # the feedback log's mapping form of affinities works too
    mapping = {"category_affinity": {"Sofas": 0.5}, "recent_item_ids": [], "recent_actions": []}
    assert ft.user_item_features(item, ft.user_view(mapping, catalog), catalog)[1] == 0.5
    assert ft.item_features({"purchases_24h": 3, "ctr_24h": None, "cart_rate_7d": 0.4}) == [
        0.0, 0.0, pytest.approx(math.log(4)), 0.4, 0.0]


def test_price_levels_are_the_same_for_training_and_serving():
    """A common price many items share is a run of equal quantiles: its level is the middle of
    the run, the same from the catalog the artifact ships (JSON) and for a price read back as
    float32 (Milvus); both once moved it a whole run (24.99: 0.7 in training, 0.3 served)."""
    prices = [24.99] * 8 + [5.0, 7.5, 9.5, 12.0, 14.49, 25.0, 33.3, 49.5, 80.0, 120.0]
    catalog = ft.Catalog.from_items([{"item_id": f"m{k}", "category": "Mugs", "price": p} for k, p in enumerate(prices)])
    served = ft.Catalog.from_json(json.loads(json.dumps(catalog.to_json())))
    tied = catalog.price_level("Mugs", 24.99)
    assert 0.3 < tied < 0.7  # the middle of the quantiles the eight mugs at 24.99 fill
    for p in sorted(set(prices)):
        assert served.price_level("Mugs", p) == catalog.price_level("Mugs", p)
        assert catalog.price_level("Mugs", float(np.float32(p))) == pytest.approx(catalog.price_level("Mugs", p), abs=1e-5)
    assert catalog.price_level("Mugs", 24.0) < tied < catalog.price_level("Mugs", 24.995)  # still ordered by price


def test_query_item_features():
    items = [{"item_id": "a", "title": "Harlow Beige Sofa", "brand": "Harlow", "category": "Sofas", "price": 280.0,
              "attributes": {"color": "Beige"}},
             {"item_id": "b", "title": "Dune Sofa", "brand": "Dune", "category": "Sofas", "price": 320.0,
              "attributes": {"color": "Grey"}}]
    catalog = ft.Catalog.from_items(items)
    assert catalog.value_terms == {"beige", "grey"}
    q = ft.query_view("need a beige sofas under $300 pls", catalog)
    assert q.cap == 300 and q.asked == {"beige"} and q.terms == {"beige", "sofa"}
    a = dict(zip(ft.QUERY_FEATURES, ft.query_item_features(q, items[0], catalog)))
    b = dict(zip(ft.QUERY_FEATURES, ft.query_item_features(q, {**items[1], "attributes": None}, catalog)))
    assert a["query_terms_in_item"] == 1.0 and b["query_terms_in_item"] == 0.5
    assert a["leaf_named"] == b["leaf_named"] == 1.0 and a["brand_named"] == 0.0
    assert (a["asked_values_matched"], a["asked_value_missing"]) == (1.0, 0.0)
    assert (b["asked_values_matched"], b["asked_value_missing"]) == (0.0, 1.0)  # values from the catalog copy
    assert (a["has_price_cap"], a["over_price_cap"], b["over_price_cap"]) == (1.0, 0.0, 1.0)
    assert a["log_price_vs_cap"] == pytest.approx(math.log(280 / 300))
    plain = ft.query_item_features(ft.query_view("Harlow", catalog), items[1], catalog)
    assert plain == [0.0] * len(ft.QUERY_FEATURES)  # says nothing the item has or lacks
    assert ft.Catalog.from_json(json.loads(json.dumps(catalog.to_json()))).values == catalog.values


def test_weights_are_validated():
    assert rk.resolve_weights(rk.DEFAULT_WEIGHTS, {"purchase": 10}) == {"click": 1.0, "add_to_cart": 2.0, "purchase": 10.0}
    with pytest.raises(ValueError, match="unknown ranker head 'buy'"):
        rk.resolve_weights(rk.DEFAULT_WEIGHTS, {"buy": 1})
    with pytest.raises(ValueError, match=">= 0"):
        rk.resolve_weights(rk.DEFAULT_WEIGHTS, {"click": -1})
    with pytest.raises(ValueError, match="prefix of the funnel"):
        rk.RankerConfig(tasks=("purchase",))
    with pytest.raises(ValueError, match="structure"):
        rk.RankerConfig(structure="towers")


def test_point_in_time_stats_never_see_their_own_search():
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    rows = [  # (search, item, label, time)
        ("s1", "a", "purchased", t0),
        ("s1", "b", "shown_unclicked", t0),
        ("s2", "a", "clicked", t0 + timedelta(hours=1)),
        ("s3", "a", "purchased", t0 + timedelta(hours=24.5)),  # s1 is out of the 24 h window by now
        ("s4", "a", "shown_unclicked", t0 + timedelta(hours=24.5)),  # same instant as s3: cannot see it
        ("s5", "a", "shown_unclicked", t0 + timedelta(hours=49)),  # everything before is out of the window
    ]
    frame = pd.DataFrame([{"query_id": s, "item_id": i, "label": lab, "event_time": t, "position": 1}
                          for s, i, lab, t in rows])
    frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True)
    stats = point_in_time_stats(frame, 24)
    assert stats.shape == (len(rows), len(ITEM_STATS_FIELDS))
    prior_ctr, prior_cvr, prior_cart = 0.05, 0.05, 0.15  # no history: the smoothing priors
    assert stats[0].tolist() == pytest.approx([prior_ctr, prior_cvr, 0, prior_cart, prior_cvr])  # not its own purchase
    assert stats[1].tolist() == pytest.approx([prior_ctr, prior_cvr, 0, prior_cart, prior_cvr])
    # s2 sees s1 only: 1 impression, 1 click, 1 cart, 1 purchase (the purchase implies the rest)
    assert stats[2].tolist() == pytest.approx([(1 + 1) / (1 + 20), (1 + 0.5) / (1 + 10), 1,
                                               (1 + 1.5) / (1 + 10), (1 + 0.5) / (1 + 10)])
    # s3 and s4 see s2 only in 24 h (s1 left that window; s3 is not before s4): 1 impression, 1 click;
    # the 7-day conversion window still holds s1: 2 clicks, 1 cart, 1 purchase
    for r in (3, 4):
        assert stats[r].tolist() == pytest.approx([(1 + 1) / (1 + 20), 0.5 / (1 + 10), 0,
                                                   (1 + 1.5) / (2 + 10), (1 + 0.5) / (2 + 10)])
    # s5: nothing in 24 h; in 7 days s1-s4: 3 clicks, 2 carts, 2 purchases
    assert stats[5].tolist() == pytest.approx([prior_ctr, prior_cvr, 0, (2 + 1.5) / (3 + 10), (2 + 0.5) / (3 + 10)])
    assert list(NO_ITEM_STATS.values()) == pytest.approx(stats[0].tolist())


def test_funnel_probabilities_and_single_task_gradients(bert):
    torch.manual_seed(0)
    q, p = torch.randn(8, TINY.dim), torch.randn(8, TINY.dim)
    feats = torch.randn(8, len(ft.FEATURES))
    labels = torch.from_numpy(rk.labels_from_level(np.array([1, 2, 3, 4, 0, 2, 3, 4])))
    assert labels.tolist()[:5] == [[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0]]
    for structure in rk.STRUCTURES:
        model = rk.RankerModel(rk.RankerConfig(**{**TINY.to_json(), "structure": structure}), bert)
        probs = torch.exp(rk.log_probs(model(q, p, feats)))
        assert ((probs[:, 2] <= probs[:, 1]) & (probs[:, 1] <= probs[:, 0])).all()  # purchase <= cart <= click
        no_exam = torch.zeros(8)
        loss, per_head = rk.multitask_loss(model(q, p, feats), labels, no_exam, rk.TASKS)
        assert loss.item() == pytest.approx(sum(v.item() for v in per_head.values()))
        loss.backward()
        assert all(model.towers[t][0].weight.grad.abs().sum() > 0 for t in rk.TASKS)
    click = rk.RankerModel(rk.RankerConfig(**{**TINY.to_json(), "tasks": ("click",)}), bert)
    assert set(click.towers) == {"click"} and click(q, p, feats).shape == (8, 1)
    loss, per_head = rk.multitask_loss(click(q, p, feats), labels, torch.zeros(8), ("click",))
    loss.backward()
    assert set(per_head) == {"click"} and click.experts[0][0].weight.grad.abs().sum() > 0


def test_examination_factor_learns_the_position_bias_and_is_training_only(bert):
    """Clicks = exam(position) x attraction, positions independent of the item: the model with the
    examination factor recovers exam(k) ~ 1/k and an attraction contrast near the true one; the
    same model without it underestimates the contrast's scale (it averages the positions in)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n = 3000
    good = rng.integers(0, 2, n)  # feature 0: the item is attractive
    position = rng.integers(1, 6, n)
    clicked = rng.random(n) < (1 / position) * np.where(good == 1, 0.8, 0.2)
    feats = torch.zeros(n, len(ft.FEATURES))
    feats[:, 0] = torch.from_numpy(good).float()
    labels = torch.from_numpy(rk.labels_from_level(np.where(clicked, 2, 1)))
    q = p = torch.zeros(n, TINY.dim)
    fitted = {}
    for bias in (True, False):
        cfg = rk.RankerConfig(**{**TINY.to_json(), "tasks": ("click",), "position_bias": bias, "positions": 5,
                                 "dropout": 0.0})
        model = rk.RankerModel(cfg, bert)
        opt = torch.optim.Adam([p for n_, p in model.named_parameters() if not n_.startswith("text.")], lr=0.05)
        pos, route = torch.from_numpy(position), torch.zeros(n, dtype=torch.long)
        for _ in range(100):
            loss, _ = rk.multitask_loss(model(q, p, feats), labels, model.log_examination(pos, route), ("click",))
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            probe = torch.zeros(2, len(ft.FEATURES))
            probe[1, 0] = 1.0
            fitted[bias] = torch.exp(rk.log_probs(model(q[:2], p[:2], probe)))[:, 0].tolist()
            if bias:
                exam = torch.exp(model.log_examination(torch.arange(6), torch.zeros(6, dtype=torch.long)))
                assert exam[0] == 1.0  # position 0: never shown, counts as examined
                ratio = (exam[1:] / exam[1]).tolist()
                assert ratio == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4, 1 / 5], abs=0.12)
    unbiased, biased = fitted[True], fitted[False]
    assert unbiased[1] - unbiased[0] > 1.5 * (biased[1] - biased[0])  # 0.8 - 0.2 at the top vs ~0.27 averaged
    assert unbiased[1] / unbiased[0] == pytest.approx(4, rel=0.35)


def test_lru_forgets_the_least_recently_used():
    cache = rk.LRU(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the oldest
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c"), len(cache)) == (1, None, 3, 2)


def test_auc():
    assert auc([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == 1.0
    assert auc([0.4, 0.3, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auc([0.5, 0.5], [0, 1]) == 0.5
    assert auc([0.1, 0.2], [1, 1]) is None


def test_expected_page_metrics_by_hand():
    # One page, logged positions 1-3, true purchase probabilities 0.1, 0, 0.4.
    positions, gains = [1, 2, 3], [0.1, 0.0, 0.4]
    # Re-ranked 3, 1, 2: the best order, nDCG 1.
    assert expected_ndcg([0.2, 0.1, 0.9], positions, gains) == pytest.approx(1.0)
    # Logged order: DCG 0.1 + 0.4 / log2(4) = 0.3, ideal 0.4 + 0.1 / log2(3) = 0.46309.
    logged = [-1, -2, -3]
    assert expected_ndcg(logged, positions, gains) == pytest.approx(0.3 / (0.4 + 0.1 / math.log2(3)))
    # Ties keep the logged order; no gain at all is 0.
    assert expected_ndcg([0, 0, 0], positions, gains) == expected_ndcg(logged, positions, gains)
    assert expected_ndcg([1, 2, 3], positions, [0.0, 0.0, 0.0]) == 0.0
    # Expected purchases with examination 1/k: 0.4 + 0.1 / 2 re-ranked, 0.1 + 0.4 / 3 as logged.
    exam = lambda k: 1 / k  # noqa: E731
    assert expected_purchases([0.2, 0.1, 0.9], positions, gains, exam) == pytest.approx(0.45)
    assert expected_purchases(logged, positions, gains, exam) == pytest.approx(0.1 + 0.4 / 3)


def test_ground_truth_is_what_the_simulator_published(demo):
    from tailbridge.streams.events import QueryEvent
    from tailbridge.synthetic import catalog
    from tailbridge.synthetic.shoppers import EXAMINATION_DECAY, GroundTruth, simulate

    dataset = catalog.load(demo)
    truth = GroundTruth(dataset)
    checked = 0
    for event in simulate(dataset, seed=3, sessions=5):
        if isinstance(event, QueryEvent):
            for s in event.served:
                p = truth.probabilities(event.user_id, event.query, s.item_id)
                assert (p["p_click"], p["p_cart"], p["p_purchase"]) == (s.p_click, s.p_cart, s.p_purchase)
                assert 0 <= p["p_purchase"] <= p["p_cart"] <= p["p_click"] <= 1
                checked += 1
            assert truth.probabilities("nobody", event.query, event.served[0].item_id) is None
            assert truth.probabilities(event.user_id, "a query nobody judged", event.served[0].item_id) is None
    assert checked > 0
    assert truth.examination(1) == 1.0 and truth.examination(4) == pytest.approx(4 ** -EXAMINATION_DECAY)


def test_changing_weights_changes_the_order(demo):
    torch.manual_seed(0)
    model, tokenizer = rk.build(rk.RankerConfig(**{**TINY.to_json(), "structure": "shared-bottom", "dropout": 0.0}))
    ctr = 3 * TINY.dim + ft.FEATURES.index("ctr_24h")
    with torch.no_grad():  # click rises with CTR, purchase given a cart falls with it: the weights decide
        for module in (*model.experts[0], *(m for t in rk.TASKS for m in model.towers[t])):
            if isinstance(module, torch.nn.Linear):
                module.weight.zero_()
                module.bias.zero_()
        model.experts[0][0].weight[0, ctr] = 1.0  # shared unit 0 = standardised ctr_24h (GELU twice)
        model.experts[0][3].weight[0, 0] = 1.0
        for head, sign in (("click", 0.2), ("purchase", -6.0)):
            model.towers[head][0].weight[0, 0] = 1.0
            model.towers[head][2].weight[0, 0] = sign
    ranker = rk.Ranker(model, tokenizer, "hand-made")
    candidates = catalog_candidates(demo)
    by_click = ranker.score("sofa", candidates, weights={"click": 1, "add_to_cart": 0, "purchase": 0})
    by_purchase = ranker.score("sofa", candidates, weights={"click": 0, "add_to_cart": 0, "purchase": 1})
    order = lambda out: sorted(range(len(out)), key=lambda i: -out[i]["score"])  # noqa: E731
    assert order(by_click) != order(by_purchase)
    assert order(by_click) == order(by_purchase)[::-1]


# ------------------------------------------------------------------ tiny training end to end


def test_split_is_by_time_and_features_point_in_time(demo):
    rd = prepare(demo, demo / "feedback", 0.2, say=lambda _: None)
    n = len(rd.search_ids)
    assert rd.train_searches == round(n * 0.8)
    train, test = rd.split_rows("train"), rd.split_rows("test")
    assert len(train) + len(test) == rd.rows and set(train).isdisjoint(test)
    assert max(rd.search_times[:rd.train_searches]) <= min(rd.search_times[rd.train_searches:])
    assert rd.features.shape == (rd.rows, len(ft.FEATURES))
    assert rd.contexts[0] is None  # the very first search has no history
    assert (rd.stats[: rd.search_start[1]] == np.float32(list(NO_ITEM_STATS.values()))).all()  # nor any item stats: the priors
    users = [rd.contexts[s] for s in range(n)]
    assert any(c is not None for c in users[rd.train_searches:])  # test searches carry earlier history


def test_training_artifact_and_reload_give_identical_scores(demo, tmp_path):
    rd = prepare(demo, demo / "feedback", 0.2, say=lambda _: None)
    texts = cache_texts(rd, TINY, TRAIN, no_bar)
    model, tokenizer, history = fit(rd, texts, TINY, TRAIN, None, lambda _: None, no_bar)
    steps_per_epoch = -(-len(rd.split_rows("train")) // TRAIN.batch_size)
    assert history["stage1_steps"] == TRAIN.epochs * steps_per_epoch
    assert history["stage2_steps"] == TRAIN.finetune_steps
    said = []
    _, _, late = fit(rd, texts, TINY, TRAIN, time.monotonic() - 1, said.append, no_bar)  # out of time already
    assert late["stage1_steps"] == steps_per_epoch and late["stage2_steps"] == 0  # one epoch, always
    assert any("time budget" in s for s in said)
    metrics = write_artifact(rd, model, tokenizer, tmp_path / "v1", TRAIN, history, 0.1, demo, demo / "feedback",
                             no_bar)
    assert ARTIFACT_FILES <= {p.name for p in (tmp_path / "v1").iterdir()}
    assert all(0 <= v <= 1 for v in metrics["test_auc"].values())

    fresh = rk.Ranker(model, tokenizer, "in-memory")
    fresh.catalog = ft.Catalog.from_items([rd.items[i] for i in rd.item_ids])
    loaded = rk.load_ranker(tmp_path / "v1")
    assert loaded.version == "v1" and len(loaded.items) == len(rd.item_ids)
    s = rd.train_searches
    query, candidates, context = rd.query_texts[rd.query[rd.search_start[s]]], rd.candidates(s), rd.contexts[s]
    a, b = fresh.score(query, candidates, context), loaded.score(query, candidates, context)
    assert [x.keys() for x in a] == [x.keys() for x in b]
    for x, y in zip(a, b):  # torch (in memory) and onnxruntime (loaded) query encodings agree
        for k in x:
            assert x[k] == pytest.approx(y[k], abs=1e-5)


def test_trained_artifact_scores(trained, demo):
    assert ARTIFACT_FILES <= {p.name for p in trained.iterdir()}
    assert ARTIFACT_FILES <= {p.name for p in (trained / rk.BASELINES_DIR / "click-only").iterdir()}
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["tasks"] == list(rk.TASKS) and set(metrics["test_auc"]) == set(rk.TASKS)
    assert metrics["data"]["train_searches"] + metrics["data"]["test_searches"] == metrics["data"]["searches"]
    card = (trained / "MODEL_CARD.md").read_text()
    assert "multi-task" in card and f"{metrics['data']['train_searches']} searches train" in card
    config = json.loads((trained / "config.json").read_text())
    assert config["ranker"]["layers"] == 1 and config["training"]["epochs"] == 2

    ranker = rk.load_ranker(trained)
    assert ranker.onnx is not None  # the query side runs on onnxruntime, with torch's numbers
    queries = ["a sofa for the living room", "dog bed", "something to keep the cat off the counter"]
    np.testing.assert_allclose(torch.stack([ranker.query_vector(q) for q in queries]).numpy(),
                               ranker.encode_texts(queries).numpy(), atol=1e-4)
    candidates = catalog_candidates(demo)
    out = ranker.score("a sofa for the living room", candidates)
    assert len(out) == len(candidates)
    for row in out:
        assert set(row) == {*rk.TASKS, "score"}
        assert all(0.0 <= row[t] <= 1.0 for t in rk.TASKS)
        assert row["score"] == pytest.approx(row["click"] + 2 * row["add_to_cart"] + 4 * row["purchase"])
    heavy = ranker.score("a sofa for the living room", candidates, weights={"purchase": 10})
    for row, h in zip(out, heavy):
        assert h["score"] == pytest.approx(row["click"] + 2 * row["add_to_cart"] + 10 * row["purchase"])
    assert ranker.score("anything", []) == []

    # a user, and a candidate whose text changed (re-encoded: a new cache entry)
    ctx = {"affinity_categories": [ft.leaf_category(candidates[0])], "affinity_weights": [1.0],
           "recent_item_ids": [candidates[1]["item_id"]], "recent_actions": ["purchase"]}
    with_user = ranker.score("a sofa for the living room", candidates, ctx)
    assert all(0 <= r["score"] <= 7 for r in with_user) and with_user != out
    cached = len(ranker.items)
    renamed = [{**candidates[0], "title": candidates[0]["title"] + " deluxe"}, {"item_id": "new", "title": "Lamp"}]
    assert len(ranker.score("lamp", renamed)) == 2 and len(ranker.items) == cached + 2

    baseline = rk.load_ranker(trained / rk.BASELINES_DIR / "click-only")
    for row in baseline.score("a sofa", candidates):
        assert set(row) == {"click", "score"} and row["score"] == pytest.approx(row["click"])


def test_an_older_artifact_is_refused_with_a_retrain_message(tmp_path):
    old = tmp_path / "old"
    for name in ("text", "tokenizer"):
        (old / name).mkdir(parents=True)
    (old / "model.safetensors").write_bytes(b"")
    (old / "config.json").write_text(json.dumps({"ranker": {}, "features": list(ft.FEATURES[len(ft.QUERY_FEATURES):])}))
    assert not rk.is_current(old) and not rk.is_current(tmp_path / "missing")
    with pytest.raises(ValueError, match="older ranker version.*retrain"):
        rk.load_ranker(old)


def test_load_ranker_unknown_version_lists_known():
    with pytest.raises(ValueError, match="unknown ranker version 'no-such-version'.*known:"):
        rk.load_ranker("no-such-version")


def test_evaluation_report(trained, demo):
    from tailbridge.serving.search import blend

    from tailbridge.synthetic import catalog
    from tailbridge.synthetic.shoppers import GroundTruth

    report = evaluate(demo, trained, demo / "feedback", say=lambda _: None, latency_calls=5, blend=blend,
                      judged_queries=4, judged_candidates=10, truth=GroundTruth(catalog.load(demo)))
    oracle = "oracle (true p(purchase))"
    assert list(report["systems"]) == ["multi-task", "multi-task by p(purchase)", "click-only", "logged order",
                                       "random order", oracle]
    for name, system in report["systems"].items():
        assert set(system["auc"]) == set(rk.TASKS)
        for head, value in system["auc"].items():
            assert value is None or 0.0 <= value <= 1.0, (name, head)
        assert system["auc"]["click"] is not None
        for key in ("ndcg@10_purchase", "ndcg@10_purchase_ips", "ndcg@10_graded"):
            assert system[key] is None or 0.0 <= system[key] <= 1.0
    # The simulated log's test pages are all known to the simulator; the oracle is the best order
    # for both truth metrics (sorted by the gains; examination falls with position).
    assert report["truth"]["pages"] == report["test"]["searches"] and report["truth"]["pages_unknown"] == 0
    truth = {name: system["truth"] for name, system in report["systems"].items()}
    assert truth[oracle]["ndcg@10_purchase_expected"] == pytest.approx(1.0)
    for name, t in truth.items():
        assert t["pages"] == report["truth"]["pages"]
        assert 0.0 < t["ndcg@10_purchase_expected"] <= 1.0 + 1e-9, name
        assert 0.0 < t["expected_purchases_per_page"] <= truth[oracle]["expected_purchases_per_page"] + 1e-12, name
    assert truth["random order"]["expected_purchases_per_page"] < truth[oracle]["expected_purchases_per_page"]
    exam = report["examination"]
    assert len(exam) == TINY.positions + 1 and exam[1] == 1.0 and all(0 < e for e in exam)
    assert report["test"]["searches"] == json.loads((trained / "metrics.json").read_text())["data"]["test_searches"]
    assert set(report["latency_ms"]) == {"50", "100"}
    assert all(lat["new_query"]["p50"] > 0 and lat["candidates"] == int(n) for n, lat in report["latency_ms"].items())
    assert all(0 < lat["cpu"]["new_query"]["p50"] for lat in report["latency_ms"].values())
    judged = report["judged"]
    assert judged["queries"] == 4 and judged["candidates"] == 10
    assert {"no ranker (retrieval order)", "multi-task alone", "click-only alone",
            "multi-task blended (retrieval weight 1)"} <= set(judged["ndcg@10"])
    assert judged["ndcg@10"]["no ranker (retrieval order)"] > 0  # MiniLM finds judged items
    assert json.loads((trained / "eval-ranker.json").read_text()) == report


def test_cli_reports_bad_input_clearly(demo, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tailbridge.cli import app
    from tailbridge.settings import get_settings

    monkeypatch.setenv("TAILBRIDGE_DATA_DIR", str(tmp_path / "datadir"))  # no worker feedback log, no versions
    get_settings.cache_clear()

    runner = CliRunner()
    cases = [
        (["train", "ranker", "--data", str(tmp_path / "missing")], "data directory not found"),
        (["eval", "ranker", "--data", str(tmp_path / "missing")], "data directory not found"),
        (["eval", "ranker", "--data", str(demo), "--model", "no-such-model"], "no trained ranker at"),
        (["train", "ranker", "--data", str(demo), "--feedback", str(tmp_path / "nolog")], "no feedback log at"),
    ]
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "corpus.jsonl").write_text((demo / "corpus.jsonl").read_text())
    cases.append((["train", "ranker", "--data", str(bare), "--out", str(tmp_path / "out")], "--simulate-feedback N"))
    cases.append((["train", "ranker", "--data", str(bare), "--simulate-feedback", "5"], "needs demo data (users.jsonl)"))
    try:
        for args, message in cases:
            result = runner.invoke(app, args)
            assert result.exit_code == 1, (args, result.output)
            assert message in " ".join(result.output.split()), (args, result.output)
    finally:
        get_settings.cache_clear()  # the next test reads the real settings again
