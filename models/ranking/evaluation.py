"""Offline evaluation of a trained ranker against its baselines: ``tailbridge eval ranker``.

Two questions, each against the same comparison models (``models.ranking.training.VARIANTS``:
shared-bottom, single-task click, no position model, trained beside the version):

1. Behaviour on served pages (``evaluate``): the test split of ``models.ranking.dataset`` (every
   logged search after the version's training data), scored in batches by the serving model
   and features (checked against ``Ranker.score``, the serving path, on every 20th page). AUC per head over all test rows; nDCG@10 of each page re-ranked: purchase
   (gain 1 per purchase, pages with one), graded (clicked 1, carted 2, purchased 3, pages with a
   click) and purchase with inverse-propensity gains (a purchase at logged position k counts
   1 / exam(k), the examination factor the version learned from the log), which takes out the
   advantage position gave the logged order: its pages' labels were CAUSED by their order.
   On simulated data (the caller passes the simulator's ``Truth``) also the counterfactual
   question no log can answer: with each served item's true position-free purchase probability
   (what the shopper would do if they examined it) as its gain, the expected purchase nDCG@10
   of each re-ranked page, the expected purchases per page were it served in that order
   (the simulator's own examination per position), and the IPS nDCG with the simulator's
   examination instead of the learned one; against the logged order (the page as served, no
   re-ranking), random order and the oracle (sorted by the true probability). Models with a
   purchase head are also ranked by p(purchase) alone (``<name> by p(purchase)``) beside their
   weighted score.
2. Relevance on judged queries (``judged_relevance``): the test queries' judgements, the top
   candidates of all-MiniLM-L6-v2 re-ranked by each model alone and blended with retrieval's order
   the way the query handler blends (the caller passes serving's blend), nDCG@10 (gains 3 exact,
   2 substitute, 1 complement). No user, no behaviour stats: text and catalog only.

And the latency of ``score`` for 50 and 100 cached candidates on one thread.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from tailbridge.models.metrics import ndcg_at
from tailbridge.models.ranking import model as rk
from tailbridge.models.ranking.dataset import RankerData, RankerTrainingError, candidate, prepare
from tailbridge.vocab import NO_ITEM_STATS

# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def auc(scores: Sequence[float], labels: Sequence[float]) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties count half); None with one class only."""
    from scipy.stats import rankdata

    labels = np.asarray(labels) > 0.5
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def page_ndcg(rd: RankerData, scores: np.ndarray, searches: Sequence[int],
              examination: Sequence[float] | None = None) -> dict[str, Any]:
    """Mean nDCG@10 of re-ranking each served page by ``scores`` (per row, higher first; ties by
    logged position): purchase (gain 1 per purchase, pages with one), graded (gains clicked 1,
    carted 2, purchased 3, pages with a click) and, given ``examination`` (exam factor per
    position, index 0 unused, the last repeated beyond), purchase with gain 1 / exam(position)."""
    purchase, graded, ips = [], [], []
    for s in searches:
        rows = range(rd.search_start[s], rd.search_start[s + 1])
        ranked = [str(r) for r in sorted(rows, key=lambda r: (-scores[r], rd.position[r]))]
        gains = {str(r): max(0, int(rd.level[r]) - 1) for r in rows}
        if any(g == 3 for g in gains.values()):
            purchase.append(ndcg_at(ranked, {r: int(g == 3) for r, g in gains.items()}, 10))
            if examination is not None:
                last = len(examination) - 1
                ips.append(ndcg_at(ranked, {str(r): 1 / examination[min(int(rd.position[r]), last)]
                                            for r in rows if rd.level[r] == 4}, 10))
        if any(g > 0 for g in gains.values()):
            graded.append(ndcg_at(ranked, gains, 10))
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    return {"ndcg@10_purchase": mean(purchase), "pages_with_purchase": len(purchase),
            "ndcg@10_purchase_ips": mean(ips), "ndcg@10_graded": mean(graded), "pages_with_click": len(graded)}


def expected_ndcg(scores: Sequence[float], positions: Sequence[int], gains: Sequence[float], k: int = 10) -> float:
    """nDCG@k of one page ordered by ``scores`` (higher first, ties by logged position) with real
    valued ``gains`` (here: each item's true purchase probability) against the page's best order;
    0 when no item has a gain."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], positions[i]))
    return ndcg_at([str(i) for i in order], {str(i): float(g) for i, g in enumerate(gains)}, k)


def expected_purchases(scores: Sequence[float], positions: Sequence[int], gains: Sequence[float],
                       examination: Callable[[int], float]) -> float:
    """Purchases a page would get, in expectation, served in the order of ``scores`` (ties by
    logged position): each item's position-free purchase probability times the examination of
    the position it would be shown at."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], positions[i]))
    return float(sum(examination(k) * gains[i] for k, i in enumerate(order, 1)))


class Truth(Protocol):
    """The simulator's ground truth (``tailbridge.synthetic.shoppers.GroundTruth``), passed in by
    the caller: models import no simulator."""

    def probabilities(self, user_id: str | None, query: str, item_id: str) -> Mapping[str, float] | None: ...

    def examination(self, position: int) -> float: ...


def true_gains(rd: RankerData, searches: Sequence[int], truth: Truth) -> np.ndarray:
    """Per row of ``searches``: the true position-free purchase probability; NaN elsewhere and on
    a page with any row the truth does not know (that page is left out of the truth metrics)."""
    gains = np.full(rd.rows, np.nan)
    for s in searches:
        rows = range(rd.search_start[s], rd.search_start[s + 1])
        query = rd.query_texts[rd.query[rd.search_start[s]]]
        known = [truth.probabilities(rd.user_ids[s], query, rd.item_ids[rd.item[r]]) for r in rows]
        if all(p is not None for p in known):
            gains[list(rows)] = [p["p_purchase"] for p in known]
    return gains


def true_examination(rd: RankerData, truth: Truth) -> list[float]:
    """The simulator's examination per logged position (index 0 unused), as ``page_ndcg`` takes it."""
    return [1.0, *(truth.examination(k) for k in range(1, int(rd.position.max()) + 1))]


def truth_metrics(rd: RankerData, scores: np.ndarray, searches: Sequence[int], gains: np.ndarray,
                  truth: Truth) -> dict[str, Any]:
    """Mean over the pages the truth knows: expected purchase nDCG@10 and expected purchases
    per page served in the order of ``scores``; and the IPS purchase nDCG on logged labels with
    the simulator's examination (``page_ndcg``'s, with the true propensities)."""
    ndcg, bought, pages = [], [], []
    for s in searches:
        rows = np.arange(rd.search_start[s], rd.search_start[s + 1])
        if np.isnan(gains[rows]).any():
            continue
        pages.append(s)
        args = (scores[rows].tolist(), rd.position[rows].tolist(), gains[rows].tolist())
        ndcg.append(expected_ndcg(*args))
        bought.append(expected_purchases(*args, truth.examination))
    return {"ndcg@10_purchase_expected": float(np.mean(ndcg)) if ndcg else None,
            "expected_purchases_per_page": float(np.mean(bought)) if bought else None,
            "ndcg@10_purchase_ips_true_exam": page_ndcg(rd, scores, pages, true_examination(rd, truth))[
                "ndcg@10_purchase_ips"],
            "pages": len(pages)}


def head_aucs(probs: Mapping[str, np.ndarray], labels: np.ndarray) -> dict[str, float | None]:
    """AUC of each head's probability against its own labels; a model without a head (the click
    baseline) is scored with its last funnel step's probability, its best signal for it."""
    heads = [t for t in rk.TASKS if t in probs]
    return {t: auc(probs.get(t, probs[heads[-1]]), labels[:, j]) for j, t in enumerate(rk.TASKS)}


def examination_curve(ranker: rk.Ranker) -> list[float] | None:
    """The exam factor the version learned per logged position (unknown route), relative to
    position 1; index 0 unused. None for a model without one."""
    model = ranker.model
    if not model.cfg.position_bias:
        return None
    with torch.no_grad():
        positions = torch.arange(model.cfg.positions + 1)
        log_exam = model.log_examination(positions, torch.zeros_like(positions))
    exam = torch.exp(log_exam - log_exam[1]).tolist()
    return [1.0, *exam[1:]]


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def score_rows(ranker: rk.Ranker, rd: RankerData, rows: np.ndarray, batch: int = 4096) -> dict[str, np.ndarray]:
    """Head probabilities and the score for rows, batched: the same model and features as
    ``Ranker.score`` (query encodings from torch instead of onnxruntime: equal to 1e-5), a hundred
    times faster than a call per page; ``evaluate`` checks the two agree on sample pages."""
    used_q = np.unique(rd.query[rows])
    q_vec = torch.zeros(len(rd.query_texts), ranker.cfg.dim)
    q_vec[torch.from_numpy(used_q)] = ranker.encode_texts([rd.query_texts[k] for k in used_q])
    p_vec = ranker.item_vectors([rd.items[i] for i in rd.item_ids])
    w = ranker.weights()
    out = {t: np.zeros(len(rows), np.float32) for t in (*ranker.tasks, "score")}
    for start in range(0, len(rows), batch):
        r = rows[start:start + batch]
        probs = torch.exp(rk.log_probs(ranker.model(q_vec[rd.query[r]], p_vec[rd.item[r]],
                                                    torch.from_numpy(rd.features[r])))).numpy()
        for j, t in enumerate(ranker.tasks):
            out[t][start:start + len(r)] = probs[:, j]
            out["score"][start:start + len(r)] += w[t] * probs[:, j]
    return out


SYSTEMS = ("multi-task", "shared-bottom", "click-only", "no-position-model", "logged order")
ORACLE = "oracle (true p(purchase))"


def load_systems(model_dir: Path, say: Callable[[str], None]) -> dict[str, rk.Ranker]:
    """The version ("multi-task") and the comparison models trained beside it."""
    models = {"multi-task": rk.load(model_dir)}
    baselines = model_dir / rk.BASELINES_DIR
    for path in sorted(baselines.iterdir()) if baselines.is_dir() else ():
        if (path / rk.CONFIG_FILE).is_file():
            models[path.name] = rk.load(path)
    if len(models) == 1:
        say(f"no comparison models in {baselines} (trained with --no-baseline): not compared")
    return models


def evaluate(data_dir: Path, model_dir: Path, feedback_dir: Path, say: Callable[[str], None] = print,
             latency_calls: int = 200, blend: Callable | None = None,
             judged_queries: int = 150, judged_candidates: int = 50, truth: Truth | None = None) -> dict[str, Any]:
    """Both questions of the module docstring and the latency; writes ``eval-ranker.json`` into
    ``model_dir``. ``blend(heads, retrieval_weight)`` is the query handler's blend (adds
    ``final`` to each candidate's scores, candidates in retrieval order); without it, or with
    ``judged_queries=0``, the judged-query part is skipped. ``truth`` (simulated data only) adds
    the counterfactual metrics (each system's ``truth``), an oracle and the report's ``truth``."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / rk.CONFIG_FILE).read_text())
    train_cfg = config.get("training", {})
    rd = prepare(Path(data_dir), Path(feedback_dir), window_hours=train_cfg.get("stats_window_hours", 24.0),
                 test_after=tuple(config["split"]["train_until"]), say=say)
    test = list(range(rd.train_searches, len(rd.search_ids)))
    if not test:
        raise RankerTrainingError(f"{feedback_dir}: no logged search after the model's training data "
                                  f"(trained until {config['split']['train_until'][0]})")
    rows = rd.split_rows("test")
    labels = rk.labels_from_level(rd.level[rows])
    models = load_systems(model_dir, say)
    examination = examination_curve(models["multi-task"])

    report: dict[str, Any] = {
        "model": model_dir.name, "data": rd.name, "feedback_dir": str(feedback_dir),
        "test": {"searches": len(test), "rows": int(len(rows)), "from": rd.search_times[test[0]].isoformat(),
                 "to": rd.search_times[test[-1]].isoformat(),
                 **{f"rows_{t}": int(labels[:, j].sum()) for j, t in enumerate(rk.TASKS)}},
        "weights": models["multi-task"].weights(), "examination": examination, "systems": {},
    }
    gains = None
    if truth is not None:
        gains = true_gains(rd, test, truth)
        known = sum(1 for s in test if not np.isnan(gains[rd.search_start[s]]))
        report["truth"] = {
            "source": "the simulator's ground truth (simulated data only; no log has it)",
            "gain": "each served item's true position-free p(purchase): bought if examined",
            "pages": known, "pages_unknown": len(test) - known,
            "examination": true_examination(rd, truth)}
        say(f"ground truth: {known} of {len(test)} test pages known to the simulator")

    def ordered_by(scores: np.ndarray) -> dict[str, Any]:
        """AUC of one ordering against each label and its page metrics (truth too when given)."""
        out = {"auc": {t: auc(scores[rows], labels[:, j]) for j, t in enumerate(rk.TASKS)},
               **page_ndcg(rd, scores, test, examination)}
        if gains is not None:
            out["truth"] = truth_metrics(rd, scores, test, gains, truth)
        return out

    for name, ranker in models.items():
        say(f"{name}: scoring {len(test)} test pages")
        scored = score_rows(ranker, rd, rows)
        probs = {t: np.zeros(rd.rows, np.float32) for t in scored}
        for t, v in scored.items():
            probs[t][rows] = v
        by_score = ordered_by(probs["score"])
        report["systems"][name] = {
            "auc": head_aucs({t: v[rows] for t, v in probs.items()}, labels), "auc_of_score": by_score.pop("auc"),
            **by_score,
            "serving_path_max_diff": serving_path_difference(ranker, rd, test[::max(1, len(test) // 20)], probs),
        }
        if "purchase" in ranker.tasks:  # the weighted score leans on p(click); the purchase head alone
            report["systems"][f"{name} by p(purchase)"] = ordered_by(probs["purchase"])
    report["systems"]["logged order"] = ordered_by(-rd.position.astype(np.float32))
    report["systems"]["random order"] = ordered_by(np.random.default_rng(0).random(rd.rows))
    if gains is not None:  # many items share a probability: ties broken at random, not in logged order,
        # which would hand the oracle the logged order's position advantage on logged labels
        jitter = 1e-9 * np.random.default_rng(1).random(rd.rows)  # below the 1e-4 the truth is rounded to
        report["systems"][ORACLE] = ordered_by(np.nan_to_num(gains, nan=0.0) + jitter)
    if blend is not None and judged_queries > 0:
        report["judged"] = judged_relevance(Path(data_dir), models, blend, judged_queries, judged_candidates, say)
    report["latency_ms"] = {str(n): score_latency(models["multi-task"], rd, test, latency_calls, n) for n in (50, 100)}
    (model_dir / "eval-ranker.json").write_text(json.dumps(report, indent=2))
    return report


def serving_path_difference(ranker: rk.Ranker, rd: RankerData, searches: Sequence[int],
                            probs: Mapping[str, np.ndarray]) -> float:
    """Largest difference between the batched scores and ``Ranker.score`` (what serving calls) on
    ``searches``' pages: evidence that the evaluation measures the serving path."""
    worst = 0.0
    for s in searches:
        start = rd.search_start[s]
        out = ranker.score(rd.query_texts[rd.query[start]], rd.candidates(s), rd.contexts[s])
        for r, row in zip(range(start, rd.search_start[s + 1]), out):
            worst = max(worst, *(abs(row[t] - float(probs[t][r])) for t in row))
    return worst


def judged_relevance(data_dir: Path, models: Mapping[str, rk.Ranker], blend: Callable, queries: int = 150,
                     candidates: int = 50, say: Callable[[str], None] = print,
                     retrieval_weights: Sequence[float] = (0.5, 1.0, 2.0)) -> dict[str, Any]:
    """nDCG@10 on ``queries`` judged test queries (a fixed shuffle) of MiniLM's top ``candidates``
    re-ranked: retrieval order ("no ranker"), each model alone, and the first model blended with
    the retrieval order at each weight by ``blend`` (the query handler's). Items carry the behaviour
    priors and there is no user: what is measured is text and catalog knowledge."""
    import random

    from tailbridge.models.data.loaders import load_dataset
    from tailbridge.models.retrieval.encoders import MiniLMEncoder

    data = load_dataset(data_dir)
    judged = data.split("test")
    qids = sorted(judged)
    random.Random(1).shuffle(qids)
    qids = qids[:queries]
    item_ids = sorted(data.items)
    say(f"judged queries: encoding {len(item_ids)} items and {len(qids)} queries with all-MiniLM-L6-v2")
    encoder = MiniLMEncoder()
    scores = encoder.encode_queries([data.queries[q] for q in qids]) @ encoder.encode_items(
        [data.items[i] for i in item_ids]).T
    top = np.argsort(-scores, axis=1)[:, :candidates]
    ndcg: dict[str, list[float]] = {"no ranker (retrieval order)": []}
    first = next(iter(models))
    for row, qid in enumerate(qids):
        cands = [candidate({**data.items[item_ids[j]], "item_id": item_ids[j]}, NO_ITEM_STATS.values())
                 for j in top[row]]
        ids = [c["item_id"] for c in cands]
        ndcg["no ranker (retrieval order)"].append(ndcg_at(ids, judged[qid]))
        for name, ranker in models.items():
            heads = ranker.score(data.queries[qid], cands, None)
            order = sorted(range(len(cands)), key=lambda i: (-heads[i]["score"], i))
            ndcg.setdefault(f"{name} alone", []).append(ndcg_at([ids[i] for i in order], judged[qid]))
            if name != first:
                continue
            for weight in retrieval_weights:
                blend(heads, weight)
                order = sorted(range(len(cands)), key=lambda i: (-heads[i]["final"], i))
                ndcg.setdefault(f"{name} blended (retrieval weight {weight:g})", []).append(
                    ndcg_at([ids[i] for i in order], judged[qid]))
    return {"queries": len(qids), "candidates": candidates, "retriever": "all-MiniLM-L6-v2 (exact search)",
            "ndcg@10": {name: float(np.mean(v)) for name, v in ndcg.items()}}


def score_latency(ranker: rk.Ranker, rd: RankerData, test: Sequence[int], calls: int = 200,
                  candidates: int = 100) -> dict[str, Any]:
    """``Ranker.score`` over ``candidates`` cached catalog products (random stats, a real user
    context) on one thread: p50/p99 over ``calls`` calls, each with a query not seen before (the
    query encode included) and again with the query cached; and the query encode alone. Wall
    clock, and the thread's CPU time under ``cpu``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(7)
        texts = [rd.query_texts[k] for k in rng.permutation(len(rd.query_texts))]
        queries = [texts[k % len(texts)] + ("" if k < len(texts) else f" {k}") for k in range(calls)]
        contexts = [rd.contexts[test[k % len(test)]] for k in range(calls)]
        pages = [[candidate(rd.items[rd.item_ids[i]], rd.stats[rng.integers(rd.rows)])
                  for i in rng.choice(len(rd.item_ids), candidates, replace=False)] for _ in range(calls)]
        ranker.score(queries[0], pages[0], contexts[0])  # warm-up
        ranker.queries = rk.LRU(ranker.queries.size)

        def timed(fn) -> tuple[list[float], list[float]]:
            """Wall clock and the calling thread's CPU time per call, ms (torch and onnxruntime
            run on it with one thread): on a shared machine the wall clock includes waiting
            for a core, the CPU time is what the call costs a core of its own."""
            wall, cpu = [], []
            for k in range(calls):
                began, began_cpu = time.perf_counter(), time.thread_time()
                fn(k)
                wall.append((time.perf_counter() - began) * 1000)
                cpu.append((time.thread_time() - began_cpu) * 1000)
            return wall, cpu

        cold = timed(lambda k: ranker.score(queries[k], pages[k], contexts[k]))
        warm = timed(lambda k: ranker.score(queries[k], pages[k], contexts[k]))
        ranker.queries = rk.LRU(ranker.queries.size)
        encode = timed(lambda k: ranker.query_vector(queries[k]))  # each a cache miss

        def pct(xs: list[float]) -> dict[str, float]:
            return {"p50": round(float(np.percentile(xs, 50)), 3), "p99": round(float(np.percentile(xs, 99)), 3)}

        return {"candidates": candidates, "calls": calls, "threads": 1, "new_query": pct(cold[0]),
                "cached_query": pct(warm[0]), "query_encode": pct(encode[0]),
                "cpu": {"new_query": pct(cold[1]), "cached_query": pct(warm[1]), "query_encode": pct(encode[1])},
                "query_encoder": "onnxruntime" if ranker.onnx is not None else "torch"}
    finally:
        torch.set_num_threads(threads)
