"""Offline evaluation: ``tailbridge eval retriever --data DIR --split test [--model PATH]``.

Every system ranks the *whole* catalog exactly (no ANN), so index approximation cannot blur
the comparison:

* ``bm25``            bm25s (Lucene BM25, English stopwords, Snowball stemming) on the item text
                      (``models.retrieval.lexical``; a query with no indexable term retrieves nothing)
* ``minilm``          off-the-shelf all-MiniLM-L6-v2, cosine
* ``hybrid-rrf``      reciprocal rank fusion (k = 60) of the two rankings' best 1,000
* ``tailbridge``      the trained unified retriever, no user
* ``tailbridge+user`` the same with each query's user context (when the data has a way to get one)

Metrics per query (``models.metrics``): nDCG@10 (linear gain), Recall@100 and MRR@10
(relevant = grade >= 1), and grade-ordering accuracy over judged pairs with different positive
grades. Reported overall and per stratum (head / torso / tail) when the data has strata. The
report is rewritten after each system, so a crash or a stop keeps what finished; catalog
vectors are cached per model version and catalog, so a re-run does not re-encode.

User context for a test query (never built from test judgements or from behaviour on held-out
queries; the history is the feedback log minus every search of a held-out query text):
* when the log has searches of the query text: the user who issued the first one, with their
  history up to that moment;
* for demo data, whose log only covers training queries: a persona chosen per query (seeded by
  its id) with probability proportional to the persona's interest in the query's department --
  the simulator's own model of who searches what -- with that persona's whole history.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tailbridge.models.data.loaders import STRATA, RetrievalData, load_dataset
from tailbridge.models.retrieval.lexical import bm25_scorer, top_k
from tailbridge.models.retrieval.model import item_input_key
from tailbridge.models.metrics import grade_order_accuracy, mrr_at, ndcg_at, recall_at

TOP_K = 100
RRF_K = 60
FUSION_DEPTH = 1000  # each system's ranking kept for the fusion
METRICS = ("ndcg@10", "recall@100", "mrr@10", "grade_acc")


class EvalError(ValueError):
    pass


@dataclass
class SystemRun:
    top: list[list[tuple[str, float]]]  # per query: (item id, score), best first (at most TOP_K)
    judged_scores: list[dict[str, float]]  # per query: score of every judged item
    ranking: list[np.ndarray]  # per query: catalog rows of the best FUSION_DEPTH, best first (for fusion)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def run_system(scorer: Callable[[int, int], np.ndarray], n_queries: int, item_ids: Sequence[str],
               judged: Sequence[Mapping[str, int]], advance: Callable[[int], None]) -> SystemRun:
    """Rank the catalog for every query in chunks; ``scorer(start, end)`` gives the
    [end - start, n_items] score matrix (``-inf``: not retrieved)."""
    rows_of = {d: j for j, d in enumerate(item_ids)}
    run = SystemRun([], [], [])
    chunk = 128
    for start in range(0, n_queries, chunk):
        end = min(n_queries, start + chunk)
        matrix = scorer(start, end)
        for i, cols in enumerate(top_k(matrix, FUSION_DEPTH)):
            cols = cols[cols >= 0]
            run.ranking.append(cols)
            run.top.append([(item_ids[j], float(matrix[i, j])) for j in cols[:TOP_K]])
            run.judged_scores.append({d: float(matrix[i, rows_of[d]]) for d in judged[start + i]})
        advance(end - start)
    return run


def fuse_rrf(runs: Sequence[SystemRun], item_ids: Sequence[str], judged: Sequence[Mapping[str, int]]) -> SystemRun:
    """Reciprocal rank fusion (k = RRF_K) of each system's best FUSION_DEPTH items; an item a
    system did not rank there adds nothing from it."""
    out = SystemRun([], [], [])
    rows_of = {d: j for j, d in enumerate(item_ids)}
    for q in range(len(judged)):
        fused: dict[int, float] = {}
        for run in runs:
            for rank, col in enumerate(run.ranking[q].tolist(), 1):
                fused[col] = fused.get(col, 0.0) + 1.0 / (RRF_K + rank)
        order = sorted(fused, key=lambda c: (-fused[c], c))
        out.ranking.append(np.asarray(order, dtype=np.int64))
        out.top.append([(item_ids[c], fused[c]) for c in order[:TOP_K]])
        out.judged_scores.append({d: fused.get(rows_of[d], 0.0) for d in judged[q]})
    return out


def dense_scorer(item_vectors: np.ndarray, query_vectors: np.ndarray) -> Callable[[int, int], np.ndarray]:
    return lambda start, end: query_vectors[start:end] @ item_vectors.T


def encode_catalog(encoder: Any, items: Sequence[Mapping[str, Any]], cache_dir: Path | None,
                   say: Callable[[str], None]) -> np.ndarray:
    """The encoder's vectors of the catalog, from ``cache_dir`` when this model version (and,
    for a trained one, these exact weights) already encoded this exact catalog."""
    if cache_dir is None:
        return encoder.encode_items(items)
    stamp = encoder.version
    model_dir = getattr(encoder, "model_dir", None)
    if model_dir is not None:  # a version name can be retrained in place (and refreshed): key on those too
        weights = Path(model_dir) / "model.safetensors"
        stamp += f"-{weights.stat().st_size}-{weights.stat().st_mtime_ns}-{getattr(encoder, 'overlay_stamp', None)}"
    catalog = "".join(item_input_key(it) for it in items)
    name = hashlib.blake2b(f"{stamp}|{catalog}".encode(), digest_size=8).hexdigest()
    path = Path(cache_dir) / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', encoder.version)}-{name}.npy"
    if path.is_file():
        vectors = np.load(path)
        if hasattr(encoder, "remember_items"):  # user contexts look recent items up by id
            encoder.remember_items([str(it["item_id"]) for it in items], vectors)
        say(f"{encoder.version}: catalog vectors from the cache ({path})")
        return vectors
    vectors = encoder.encode_items(items)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, vectors)
    tmp.replace(path)
    return vectors


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
             progress_factory: Callable | None = None, say: Callable[[str], None] = print,
             cache_dir: Path | None = None, others: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Evaluate the baselines and (with ``model``) the trained retriever; write JSON to
    ``out_dir`` as each system finishes (``"complete": false`` until the last; then the PNG),
    TREC runs to ``run_dir``; catalog vectors are cached per model version in ``cache_dir``.
    ``others``: more retriever versions to compare, by name (no user context). Returns the report."""
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
    strata = [data.strata.get(q) for q in qids]
    say(f"{data.name}/{split}: {len(qids)} queries, {len(items)} items")
    report: dict[str, Any] = {"data": data.name, "data_dir": str(data_dir), "split": split, "queries": len(qids),
                              "items": len(items), "model": None if model is None else str(model),
                              "user_context": None, "complete": False, "systems": {}}
    runs: dict[str, SystemRun] = {}

    def finished(name: str, run: SystemRun) -> None:
        """A system's results are on disk the moment it is done (a later crash loses only the rest)."""
        runs[name] = run
        report["systems"][name] = summarise(query_metrics(run, judged), strata)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"eval-{split}.json").write_text(json.dumps(report, indent=2))
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_trec(run, qids, name, run_dir / f"{name}.trec")

    def ranked(name: str, scorer: Callable[[int, int], np.ndarray]) -> None:
        with bar(f"{name}: exact search over the catalog", len(qids)) as advance:
            finished(name, run_system(scorer, len(qids), item_ids, judged, advance))

    with bar("bm25: indexing", 1) as advance:
        bm25 = bm25_scorer(items, texts)
        advance(1)
    ranked("bm25", bm25)
    minilm = MiniLMEncoder()
    with bar("minilm: encoding catalog", 1) as advance:
        minilm_items = encode_catalog(minilm, items, cache_dir, say)
        advance(1)
    ranked("minilm", dense_scorer(minilm_items, minilm.encode_queries(texts)))
    finished("hybrid-rrf", fuse_rrf([runs["bm25"], runs["minilm"]], item_ids, judged))
    for name, version in (others or {}).items():
        other = load_encoder(version)
        ranked(name, dense_scorer(encode_catalog(other, items, cache_dir, say), other.encode_queries(texts)))
    if model is not None:
        encoder = load_encoder(model)
        with bar(f"{encoder.version}: encoding catalog", 1) as advance:
            item_vectors = encode_catalog(encoder, items, cache_dir, say)
            advance(1)
        if feedback_dir is None and (data_dir / "feedback").is_dir():
            feedback_dir = data_dir / "feedback"
        contexts, report["user_context"] = eval_contexts(data_dir, data, qids, feedback_dir)
        say(f"user context: {report['user_context']}")
        ranked("tailbridge", dense_scorer(item_vectors, encoder.encode_queries(texts)))
        if contexts:
            with_user = encoder.encode_queries(texts, [contexts.get(q) for q in qids])
            ranked("tailbridge+user", dense_scorer(item_vectors, with_user))
    report["complete"] = True
    if out_dir is not None:
        (out_dir / f"eval-{split}.json").write_text(json.dumps(report, indent=2))
        write_chart(report, out_dir / f"eval-{split}.png")
    return report
