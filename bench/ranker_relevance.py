"""Does re-ranking keep retrieval's relevance? nDCG@10 on judged test queries when a trained
ranker re-orders all-MiniLM-L6-v2's top candidates: retrieval order, the ranker alone, and the
query handler's blend (``serving.search.blend``) at several retrieval weights.

    .venv/bin/python -m tailbridge.bench.ranker_relevance --data data/demo5k --ranker data/models/ranker/demo \\
        [--queries 150] [--candidates 50] [--json out.json] [--smoke]

The ranker learns behaviour from logged pages; this measures what it does to relevance on
candidates retrieval brings, which include other categories the logged pages rarely show.
Items carry no behaviour stats (the priors), and no user: the text and catalog part only.
``--smoke``: 20 queries, 20 candidates, to check the benchmark works (no measurement).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from tailbridge.bench.common import console, run_meta, write_json
from tailbridge.models.data.loaders import load_dataset
from tailbridge.models.metrics import ndcg_at
from tailbridge.models.ranking import model as rk
from tailbridge.models.retrieval.encoders import MiniLMEncoder
from tailbridge.serving.search import blend
from tailbridge.streams.item_stats import NO_STATS, STATS_FIELDS


def candidate(item_id: str, item: dict) -> dict:
    path = item.get("category_path") or []
    return {"item_id": item_id, "title": item["title"], "brand": item.get("brand", ""),
            "category": path[-1] if path else "", "category_path": " > ".join(path), "price": item.get("price", 0.0),
            **{field: NO_STATS[field] for field in STATS_FIELDS}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tailbridge.bench.ranker_relevance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="BEIR dir with a test split")
    parser.add_argument("--ranker", type=Path, required=True, help="trained ranker artifact dir")
    parser.add_argument("--queries", type=int, default=150)
    parser.add_argument("--candidates", type=int, default=50)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="20 queries, 20 candidates: checks the benchmark works")
    args = parser.parse_args(argv)
    if args.smoke:
        args.queries, args.candidates = min(args.queries, 20), min(args.candidates, 20)
    torch.set_num_threads(1)
    data = load_dataset(args.data)
    judged = data.split("test")
    qids = sorted(judged)
    random.Random(1).shuffle(qids)
    qids = qids[:args.queries]
    item_ids = sorted(data.items)
    encoder = MiniLMEncoder()
    with console.status(f"encoding {len(item_ids)} items and {len(qids)} queries with MiniLM..."):
        scores = encoder.encode_queries([data.queries[q] for q in qids]) @ encoder.encode_items(
            [data.items[i] for i in item_ids]).T
    top = np.argsort(-scores, axis=1)[:, :args.candidates]
    ranker = rk.load_ranker(args.ranker)

    ndcg: dict[str, list[float]] = {"retrieval order": [], "ranker alone": []}
    for row, qid in enumerate(qids):
        cands = [candidate(item_ids[j], data.items[item_ids[j]]) for j in top[row]]
        ndcg["retrieval order"].append(ndcg_at([c["item_id"] for c in cands], judged[qid]))
        heads = ranker.score(data.queries[qid], cands, None)
        by_ranker = sorted(range(len(cands)), key=lambda i: -heads[i]["score"])
        ndcg["ranker alone"].append(ndcg_at([cands[i]["item_id"] for i in by_ranker], judged[qid]))
        for weight in args.weights:
            blend(heads, weight)
            order = sorted(range(len(cands)), key=lambda i: (-heads[i]["final"], i))
            ndcg.setdefault(f"blend, retrieval weight {weight:g}", []).append(
                ndcg_at([cands[i]["item_id"] for i in order], judged[qid]))

    table = Table(title=f"nDCG@10 re-ranking MiniLM's top {args.candidates}: {len(qids)} test queries of "
                        f"{data.name}, ranker {ranker.version}" + (" (smoke)" if args.smoke else ""))
    table.add_column("order")
    table.add_column("nDCG@10", justify="right")
    report = {name: float(np.mean(values)) for name, values in ndcg.items()}
    for name, value in report.items():
        table.add_row(name, f"{value:.4f}")
    console.print(table)
    write_json(args.json, {"meta": run_meta(data=str(args.data), smoke=args.smoke), "queries": len(qids),
                           "candidates": args.candidates, "ranker": ranker.version, "ndcg@10": report})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
