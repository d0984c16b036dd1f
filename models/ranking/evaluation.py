"""Offline evaluation of a trained ranker against its baselines: ``tailbridge eval ranker``.

``evaluate`` takes the test split of ``models.ranking.dataset`` (every logged search after the
version's training data) and scores each test search's served page through ``Ranker.score``
(the serving path) for three systems: the multi-task model, the single-task click baseline
trained beside it, and the logged order. Metrics: AUC per head over all test rows, purchase
nDCG@10 per page (gain 1 for a purchase, over pages with one) and graded nDCG@10 (gains
clicked 1, carted 2, purchased 3, over pages with a click); and the latency of ``score`` over
100 cached candidates on one thread.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tailbridge.models.metrics import ndcg_at
from tailbridge.models.ranking import model as rk
from tailbridge.models.ranking.dataset import RankerData, RankerTrainingError, candidate, prepare

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


def page_ndcg(rd: RankerData, scores: np.ndarray, searches: Sequence[int]) -> dict[str, Any]:
    """Mean nDCG@10 of re-ranking each served page by ``scores`` (per row, higher first; ties by
    logged position): purchase (gain 1 per purchase, pages with one) and graded (gains clicked 1,
    carted 2, purchased 3, pages with a click)."""
    purchase, graded = [], []
    for s in searches:
        rows = range(rd.search_start[s], rd.search_start[s + 1])
        ranked = [str(r) for r in sorted(rows, key=lambda r: (-scores[r], rd.position[r]))]
        gains = {str(r): max(0, int(rd.level[r]) - 1) for r in rows}
        if any(g == 3 for g in gains.values()):
            purchase.append(ndcg_at(ranked, {r: int(g == 3) for r, g in gains.items()}, 10))
        if any(g > 0 for g in gains.values()):
            graded.append(ndcg_at(ranked, gains, 10))
    return {"ndcg@10_purchase": float(np.mean(purchase)) if purchase else None, "pages_with_purchase": len(purchase),
            "ndcg@10_graded": float(np.mean(graded)) if graded else None, "pages_with_click": len(graded)}


def head_aucs(probs: Mapping[str, np.ndarray], labels: np.ndarray) -> dict[str, float | None]:
    """AUC of each head's probability against its own labels; a model without a head (the click
    baseline) is scored with its click probability, its only signal."""
    return {t: auc(probs.get(t, probs["click"]), labels[:, j]) for j, t in enumerate(rk.TASKS)}


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

SYSTEMS = ("multi-task", "click-only", "logged order")


def evaluate(data_dir: Path, model_dir: Path, feedback_dir: Path, say: Callable[[str], None] = print,
             progress_factory: Callable | None = None, latency_calls: int = 200) -> dict[str, Any]:
    """Score the test split with the model (and its click baseline when present) through
    ``Ranker.score``; write ``eval-ranker.json`` into ``model_dir``. See the module docstring."""
    bar = progress_factory or (lambda label, total: nullcontext(lambda n=1: None))
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
    models = {"multi-task": rk.load(model_dir)}
    if (model_dir / rk.BASELINE_DIR / rk.CONFIG_FILE).is_file():
        models["click-only"] = rk.load(model_dir / rk.BASELINE_DIR)
    else:
        say(f"no click baseline in {model_dir / rk.BASELINE_DIR} (trained with --no-baseline): not compared")

    report: dict[str, Any] = {
        "model": model_dir.name, "data": rd.name, "feedback_dir": str(feedback_dir),
        "test": {"searches": len(test), "rows": int(len(rows)), "from": rd.search_times[test[0]].isoformat(),
                 "to": rd.search_times[test[-1]].isoformat(),
                 **{f"rows_{t}": int(labels[:, j].sum()) for j, t in enumerate(rk.TASKS)}},
        "weights": models["multi-task"].weights(), "systems": {},
    }
    for name, ranker in models.items():
        probs = {t: np.zeros(rd.rows, np.float32) for t in (*ranker.tasks, "score")}
        with bar(f"{name}: scoring {len(test)} test pages", len(test)) as advance:
            for s in test:
                start, end = rd.search_start[s], rd.search_start[s + 1]
                for r, out in zip(range(start, end), ranker.score(rd.query_texts[rd.query[start]], rd.candidates(s),
                                                                  rd.contexts[s])):
                    for k, v in out.items():
                        probs[k][r] = v
                advance(1)
        report["systems"][name] = {
            "auc": head_aucs({t: v[rows] for t, v in probs.items()}, labels),
            "auc_of_score": {t: auc(probs["score"][rows], labels[:, j]) for j, t in enumerate(rk.TASKS)},
            **page_ndcg(rd, probs["score"], test),
        }
    logged = -rd.position.astype(np.float32)
    report["systems"]["logged order"] = {
        "auc": {t: auc(logged[rows], labels[:, j]) for j, t in enumerate(rk.TASKS)},
        **page_ndcg(rd, logged, test),
    }
    report["latency_ms"] = score_latency(models["multi-task"], rd, test, latency_calls)
    (model_dir / "eval-ranker.json").write_text(json.dumps(report, indent=2))
    return report


def score_latency(ranker: rk.Ranker, rd: RankerData, test: Sequence[int], calls: int = 200,
                  candidates: int = 100) -> dict[str, Any]:
    """``Ranker.score`` over ``candidates`` cached catalog products (random stats, a real user
    context) on one thread: p50/p99 over ``calls`` calls, each with a query not seen before (the
    query encode included) and again with the query cached; and the query encode alone."""
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

        def timed(fn) -> list[float]:
            out = []
            for k in range(calls):
                began = time.perf_counter()
                fn(k)
                out.append((time.perf_counter() - began) * 1000)
            return out

        cold = timed(lambda k: ranker.score(queries[k], pages[k], contexts[k]))
        warm = timed(lambda k: ranker.score(queries[k], pages[k], contexts[k]))
        ranker.queries = rk.LRU(ranker.queries.size)
        encode = timed(lambda k: ranker.query_vector(queries[k]))  # each a cache miss

        def pct(xs: list[float]) -> dict[str, float]:
            return {"p50": round(float(np.percentile(xs, 50)), 3), "p99": round(float(np.percentile(xs, 99)), 3)}

        return {"candidates": candidates, "calls": calls, "threads": 1, "new_query": pct(cold),
                "cached_query": pct(warm), "query_encode": pct(encode),
                "query_encoder": "onnxruntime" if ranker.onnx is not None else "torch"}
    finally:
        torch.set_num_threads(threads)
