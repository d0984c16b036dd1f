"""Offline evaluation: ``tailbridge eval retriever --data DIR --split test [--model PATH]``.

Every system ranks the *whole* catalog exactly (no ANN), so index approximation cannot blur
the comparison:

* ``bm25``            bm25s (Lucene BM25, English stopwords, Snowball stemming) on the item text
* ``minilm``          off-the-shelf all-MiniLM-L6-v2, cosine
* ``hybrid-rrf``      reciprocal rank fusion (k = 60) of the two full rankings
* ``tailbridge``      the trained unified retriever, no user
* ``tailbridge+user`` the same with each query's user context (when the data has a way to get one)

Metrics per query (``models.metrics``): nDCG@10 (linear gain), Recall@100 and MRR@10
(relevant = grade >= 1), and grade-ordering accuracy over judged pairs with different positive
grades. Reported overall and per stratum (head / torso / tail) when the data has strata.

User context for a test query (never built from test judgements or from behaviour on held-out
queries; the history is the feedback log minus every search of a held-out query text):
* when the log has searches of the query text: the user who issued the first one, with their
  history up to that moment;
* for demo data, whose log only covers training queries: a persona chosen per query (seeded by
  its id) with probability proportional to the persona's interest in the query's department --
  the simulator's own model of who searches what -- with that persona's whole history.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tailbridge.models.data.loaders import STRATA, RetrievalData, load_dataset
from tailbridge.models.metrics import grade_order_accuracy, mrr_at, ndcg_at, recall_at

TOP_K = 100
RRF_K = 60
METRICS = ("ndcg@10", "recall@100", "mrr@10", "grade_acc")


class EvalError(ValueError):
    pass


@dataclass
class SystemRun:
    top: list[list[tuple[str, float]]]  # per query: (item id, score), best first
    judged_scores: list[dict[str, float]]  # per query: score of every judged item


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _ranks(row: np.ndarray) -> np.ndarray:
    """1-based rank of every item in a score row (ties broken by position, like the top list)."""
    order = np.argsort(-row, kind="stable")
    ranks = np.empty(len(row), dtype=np.int64)
    ranks[order] = np.arange(1, len(row) + 1)
    return ranks


def _collect(row: np.ndarray, item_ids: Sequence[str], rows_of: Mapping[str, int], judged: Mapping[str, int],
             run: SystemRun) -> None:
    k = min(TOP_K, len(row))
    top = np.argpartition(-row, k - 1)[:k]
    top = top[np.lexsort((top, -row[top]))]
    run.top.append([(item_ids[j], float(row[j])) for j in top])
    run.judged_scores.append({d: float(row[rows_of[d]]) for d in judged})


def score_all(score_rows: Mapping[str, Callable[[int, int], np.ndarray]], n_queries: int, item_ids: Sequence[str],
              judged: Sequence[Mapping[str, int]], fuse: Sequence[str], advance: Callable[[int], None]
              ) -> dict[str, SystemRun]:
    """Run every system over all queries in chunks; ``score_rows[name](start, end)`` gives the
    [end - start, n_items] score matrix. RRF of the ``fuse`` systems is added as hybrid-rrf."""
    rows_of = {d: j for j, d in enumerate(item_ids)}
    runs = {name: SystemRun([], []) for name in score_rows}
    if fuse:
        runs["hybrid-rrf"] = SystemRun([], [])
    chunk = 128
    for start in range(0, n_queries, chunk):
        end = min(n_queries, start + chunk)
        matrices = {name: fn(start, end) for name, fn in score_rows.items()}
        for i in range(end - start):
            for name, matrix in matrices.items():
                _collect(matrix[i], item_ids, rows_of, judged[start + i], runs[name])
            if fuse:
                rrf = sum(1.0 / (RRF_K + _ranks(matrices[name][i])) for name in fuse)
                _collect(rrf, item_ids, rows_of, judged[start + i], runs["hybrid-rrf"])
        advance(end - start)
    return runs


def bm25_scorer(items: Sequence[Mapping[str, Any]], queries: Sequence[str]) -> Callable[[int, int], np.ndarray]:
    import bm25s
    import Stemmer

    from tailbridge.vocab import item_text

    stemmer = Stemmer.Stemmer("english")
    index = bm25s.BM25()
    index.index(bm25s.tokenize([item_text(it) for it in items], stopwords="en", stemmer=stemmer, show_progress=False),
                show_progress=False)
    tokens = bm25s.tokenize(list(queries), stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)
    return lambda start, end: np.stack([index.get_scores(t) for t in tokens[start:end]]).astype(np.float32)


def dense_scorer(item_vectors: np.ndarray, query_vectors: np.ndarray) -> Callable[[int, int], np.ndarray]:
    return lambda start, end: query_vectors[start:end] @ item_vectors.T


# --------------------------------------------------------------------------------------------
# User contexts for evaluation
# --------------------------------------------------------------------------------------------


def eval_contexts(data_dir: Path, data: RetrievalData, qids: Sequence[str], feedback_dir: Path | None
                  ) -> tuple[dict[str, dict[str, Any]], str]:
    """User context per query id (only for queries that get one) and how they were made."""
    from tailbridge.models.data.feedback import context_at, read_feedback
    from tailbridge.vocab import normalize_query

    if feedback_dir is None or not (feedback_dir / "examples").is_dir():
        return {}, "no feedback log: no user contexts"
    log = read_feedback(feedback_dir)
    log = log[log["item_id"].isin(data.items.keys())]
    held_out = {normalize_query(data.queries[q]) for split, judged in data.qrels.items() if split != "train"
                for q in judged if q in data.queries}
    keys = log["query"].map(normalize_query)
    history, issued = log[~keys.isin(held_out)], log[keys.isin(held_out)]
    categories = {i: it["category_path"][-1] for i, it in data.items.items() if it["category_path"]}
    contexts: dict[str, dict[str, Any]] = {}
    first_search = issued.groupby(issued["query"].map(normalize_query))[["user_id", "event_time"]].first()
    for qid in qids:
        key = normalize_query(data.queries[qid])
        if key in first_search.index:
            user, when = first_search.loc[key]
            ctx = context_at(history, str(user), categories, when)
            if ctx:
                contexts[qid] = ctx
    how = f"{len(contexts)} queries issued in the log: the issuer's history before the search"
    demo = _demo_issuers(data_dir, [q for q in qids if q not in contexts])
    for qid, user in demo.items():
        ctx = context_at(history, user, categories)
        if ctx:
            contexts[qid] = ctx
    if demo:
        how += (f"; {sum(q in contexts for q in demo)} demo queries: a persona drawn by interest in the query's "
                "department, with their history on training queries")
    return contexts, how


def _demo_issuers(data_dir: Path, qids: Sequence[str]) -> dict[str, str]:
    """Demo data only: who asks each query, drawn like the simulator picks queries for personas.
    Everything comes from the data set's own files: the personas (users.jsonl), each query's
    product type (the generator's query metadata) and each type's department (the first
    category of its items, from the catalog's metadata)."""
    import orjson

    if not qids or not (data_dir / "users.jsonl").exists() or not (data_dir / "manifest.json").exists():
        return {}

    def records(name: str) -> list[dict]:
        return [orjson.loads(line) for line in (data_dir / name).read_bytes().splitlines() if line.strip()]

    users = records("users.jsonl")
    types = {str(q["_id"]): (q.get("metadata") or {}).get("type") for q in records("queries.jsonl")}
    departments: dict[str, str] = {}
    for item in records("corpus.jsonl"):
        meta = item.get("metadata") or {}
        if meta.get("type") and meta.get("category_path"):
            departments.setdefault(meta["type"], meta["category_path"][0])
    out = {}
    for qid in qids:
        ptype = types.get(qid)
        department = departments.get(ptype) if ptype else None
        if department is None or not users:
            continue
        weights = np.array([u["department_weights"].get(department, 0.0) + u["type_weights"].get(ptype, 0.0)
                            for u in users])
        if weights.sum() <= 0:
            continue
        rng = np.random.default_rng(zlib.crc32(qid.encode()))
        out[qid] = users[rng.choice(len(users), p=weights / weights.sum())]["user_id"]
    return out


# --------------------------------------------------------------------------------------------
# Metrics, files, chart
# --------------------------------------------------------------------------------------------


def query_metrics(run: SystemRun, judged: Sequence[Mapping[str, int]]) -> list[dict[str, float | None]]:
    out = []
    for top, scores, j in zip(run.top, run.judged_scores, judged):
        ranked = [d for d, _ in top]
        out.append({"ndcg@10": ndcg_at(ranked, j, 10), "recall@100": recall_at(ranked, j, TOP_K),
                    "mrr@10": mrr_at(ranked, j, 10), "grade_acc": grade_order_accuracy(scores, j)})
    return out


def summarise(per_query: Sequence[Mapping[str, float | None]], strata: Sequence[str | None]) -> dict[str, dict]:
    groups = {"overall": list(range(len(per_query)))}
    for s in STRATA:
        members = [i for i, st in enumerate(strata) if st == s]
        if members:
            groups[s] = members
    out = {}
    for name, members in groups.items():
        row: dict[str, float | int | None] = {"queries": len(members)}
        for m in METRICS:
            values = [per_query[i][m] for i in members if per_query[i][m] is not None]
            row[m] = round(float(np.mean(values)), 4) if values else None
        out[name] = row
    return out


def write_trec(run: SystemRun, qids: Sequence[str], system: str, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for qid, top in zip(qids, run.top):
            for rank, (item_id, score) in enumerate(top, 1):
                f.write(f"{qid} Q0 {item_id} {rank} {score:.6f} {system}\n")


def write_chart(report: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    systems = list(report["systems"])
    groups = [g for g in ("overall", *STRATA) if any(g in report["systems"][s] for s in systems)]
    fig, ax = plt.subplots(figsize=(3.5 + 1.6 * len(groups), 4))
    width = 0.8 / len(systems)
    for k, system in enumerate(systems):
        values = [report["systems"][system].get(g, {}).get("ndcg@10") or 0.0 for g in groups]
        bars = ax.bar(np.arange(len(groups)) + k * width, values, width, label=system)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(np.arange(len(groups)) + width * (len(systems) - 1) / 2, groups)
    ax.set_ylabel("nDCG@10")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{report['data']} / {report['split']}: nDCG@10 by query stratum (exact search)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never over a bar
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def evaluate(data_dir: Path, split: str = "test", model: str | None = None, run_dir: Path | None = None,
             out_dir: Path | None = None, feedback_dir: Path | None = None,
             progress_factory: Callable | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate the baselines and (with ``model``) the trained retriever; write JSON + PNG to
    ``out_dir`` (and TREC runs to ``run_dir``); return the report."""
    from contextlib import nullcontext

    from tailbridge.models.retrieval.encoders import MiniLMEncoder, load_encoder

    bar = progress_factory or (lambda label, total: nullcontext(lambda n=1: None))
    data_dir = Path(data_dir)
    data = load_dataset(data_dir)
    judgements = data.split(split)
    if not judgements:
        raise EvalError(f"{data_dir}: split {split!r} has no query with judged catalog items")
    qids = sorted(judgements)
    judged = [judgements[q] for q in qids]
    texts = [data.queries[q] for q in qids]
    item_ids = sorted(data.items)
    items = [data.items[i] for i in item_ids]
    say(f"{data.name}/{split}: {len(qids)} queries, {len(items)} items")

    scorers: dict[str, Callable[[int, int], np.ndarray]] = {}
    with bar("bm25: indexing", 1) as advance:
        scorers["bm25"] = bm25_scorer(items, texts)
        advance(1)
    minilm = MiniLMEncoder()
    with bar("minilm: encoding catalog", 1) as advance:
        scorers["minilm"] = dense_scorer(minilm.encode_items(items), minilm.encode_queries(texts))
        advance(1)
    user_note = None
    if model is not None:
        encoder = load_encoder(model)
        with bar(f"{encoder.version}: encoding catalog", 1) as advance:
            item_vectors = encoder.encode_items(items)
            advance(1)
        scorers["tailbridge"] = dense_scorer(item_vectors, encoder.encode_queries(texts))
        if feedback_dir is None and (data_dir / "feedback").is_dir():
            feedback_dir = data_dir / "feedback"
        contexts, user_note = eval_contexts(data_dir, data, qids, feedback_dir)
        if contexts:
            with_user = encoder.encode_queries(texts, [contexts.get(q) for q in qids])
            scorers["tailbridge+user"] = dense_scorer(item_vectors, with_user)
        say(f"user context: {user_note}")
    with bar("scoring (exact search over the catalog)", len(qids)) as advance:
        runs = score_all(scorers, len(qids), item_ids, judged, ("bm25", "minilm"), advance)
    order = ["bm25", "minilm", "hybrid-rrf", "tailbridge", "tailbridge+user"]
    runs = {name: runs[name] for name in order if name in runs}

    strata = [data.strata.get(q) for q in qids]
    report: dict[str, Any] = {"data": data.name, "data_dir": str(data_dir), "split": split, "queries": len(qids),
                              "items": len(items), "model": None if model is None else str(model),
                              "user_context": user_note, "systems": {}}
    for name, run in runs.items():
        report["systems"][name] = summarise(query_metrics(run, judged), strata)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"eval-{split}.json").write_text(json.dumps(report, indent=2))
        write_chart(report, out_dir / f"eval-{split}.png")
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        for name, run in runs.items():
            write_trec(run, qids, name, run_dir / f"{name}.trec")
    return report
