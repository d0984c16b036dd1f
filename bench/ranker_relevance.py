"""Does re-ranking keep retrieval's relevance? nDCG@10 on judged test queries when a trained
ranker re-orders all-MiniLM-L6-v2's top candidates: retrieval order, the ranker alone, and the
query handler's blend (``serving.search.blend``) at several retrieval weights.

    .venv/bin/python -m tailbridge.bench.ranker_relevance --data data/demo5k --ranker data/models/ranker/demo \\
        [--queries 150] [--candidates 50] [--json out.json] [--smoke]

The ranker learns behaviour from logged pages; this measures what it does to relevance on
candidates retrieval brings, which include other categories the logged pages rarely show.
Items carry no behaviour stats (the priors), and no user: the text and catalog part only.
The measurement is ``models.ranking.evaluation.judged_relevance``, which ``tailbridge eval
ranker`` runs too.
``--smoke``: 20 queries, 20 candidates, to check the benchmark works (no measurement).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.table import Table

from tailbridge.bench.common import console, run_meta, write_json
from tailbridge.models.ranking import model as rk
from tailbridge.models.ranking.evaluation import judged_relevance
from tailbridge.serving.search import blend

# judged_relevance's names for one model called "ranker" -> this benchmark's
NAMES = {"no ranker (retrieval order)": "retrieval order", "ranker alone": "ranker alone"}


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
    ranker = rk.load_ranker(args.ranker)
    with console.status("encoding the catalog and the queries with MiniLM, re-ranking..."):
        result = judged_relevance(args.data, {"ranker": ranker}, blend, args.queries, args.candidates,
                                  say=lambda _: None, retrieval_weights=args.weights)
    report = {NAMES.get(name, name.replace("ranker blended (retrieval weight ", "blend, retrieval weight ")
                        .rstrip(")")): value for name, value in result["ndcg@10"].items()}
    table = Table(title=f"nDCG@10 re-ranking MiniLM's top {args.candidates}: {result['queries']} test queries of "
                        f"{args.data.name}, ranker {ranker.version}" + (" (smoke)" if args.smoke else ""))
    table.add_column("order")
    table.add_column("nDCG@10", justify="right")
    for name, value in report.items():
        table.add_row(name, f"{value:.4f}")
    console.print(table)
    write_json(args.json, {"meta": run_meta(data=str(args.data), smoke=args.smoke), "queries": result["queries"],
                           "candidates": args.candidates, "ranker": ranker.version, "ndcg@10": report})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
