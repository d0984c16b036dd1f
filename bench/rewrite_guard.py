"""What the rewrite guards do to tail retrieval, whatever the rewriter: the minimum-relevance
rule (``rewrite_min_intent``, ``models/rewriting/intent.py``) and the rewrite routes' weight in
fusion (``rewrite_route_weight``), on rewrites known to be right and rewrites known to be wrong.

    .venv/bin/python -m tailbridge.bench.rewrite_guard [--data DIR] [--split test] [--json out.json] [--smoke]

A split's tail queries get two kinds of rewrite, each query one of each, built from the
judgements (so this isolates the guards from the model's quality; never a model's result):

* right: the frequent query whose judged intent overlaps the tail query's most (stage 1's
  mining, ``mining.mine_pairs`` without its recall filter): what a good rewriter would write;
* wrong: the right rewrite of another tail query (the list rotated by 7): a rewrite that
  drifts to another product, like the "10 ft high speed hdmi cable" a short SFT wrote for a
  headphones query.

For each kind, nDCG@10 and Recall@100 of the fused search (``search.ExactSearch``: MiniLM int8
+ BM25 as the handler fuses; ``--smoke``: BM25 alone on a small synthesised catalog) against no
rewriting, at route weights 1 and 0.5 and thresholds none / 0.7 / 0.8 / 0.9, and the share of
each kind the rule keeps. The guards' job: wrong rewrites never lower the metrics, right ones
still raise them.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from tailbridge.bench.common import console, run_meta, write_json

WEIGHTS = (1.0, 0.5)
THRESHOLDS = (None, 0.7, 0.8, 0.9)
ROTATE = 7


def rewrites(data: Any, split: str, search: Any) -> tuple[list[str], list[str], list[list[str]], list[list[str]]]:
    """(tail query ids, their texts, right rewrites, wrong rewrites); a query without a mined
    rewrite is left out."""
    from tailbridge.models.rewriting.mining import MiningConfig, mine_pairs
    from tailbridge.models.rewriting.signals import query_signals

    judged = data.split(split)
    signals = query_signals(data.queries, {**data.split("train"), **judged}, data.strata, {})
    tail = {q for q in judged if data.strata.get(q) == "tail"}
    signals = {q: s for q, s in signals.items() if s.stratum != "tail" or q in tail}  # sources: this split's tail
    best: dict[str, str] = {}
    for pair in mine_pairs(signals, search, MiningConfig(min_recall=0.0, per_query=1, per_target=10**9)):
        best.setdefault(pair.source, pair.rewrite)
    qids = sorted(q for q in tail if data.queries[q] in best)
    texts = [data.queries[q] for q in qids]
    right = [[best[t]] for t in texts]
    return qids, texts, right, right[ROTATE:] + right[:ROTATE]


def measure(data: Any, split: str, search: Any) -> dict[str, Any]:
    from tailbridge.models.metrics import ndcg_at, recall_at
    from tailbridge.models.rewriting.intent import keep_on_intent

    judged = data.split(split)
    qids, texts, right, wrong = rewrites(data, split, search)

    def metrics(groups: list[list[str]]) -> dict[str, float]:
        top = search.ranked(groups)
        return {"ndcg@10": round(float(np.mean([ndcg_at(t, judged[q], 10) for q, t in zip(qids, top)])), 4),
                "recall@100": round(float(np.mean([recall_at(t, judged[q], 100) for q, t in zip(qids, top)])), 4)}

    out: dict[str, Any] = {"queries": len(qids), "none": metrics([[t] for t in texts]), "kinds": {}}
    for kind, proposed in (("right", right), ("wrong", wrong)):
        rows = []
        for weight in WEIGHTS:
            search.rewrite_weight = weight
            for threshold in THRESHOLDS:
                kept, dropped = keep_on_intent(search, texts, proposed, threshold) if threshold is not None \
                    else (proposed, 0)
                rows.append({"route_weight": weight, "min_intent": threshold, "kept": round(1 - dropped / len(texts), 4),
                             **metrics([[t, *k] for t, k in zip(texts, kept)])})
        out["kinds"][kind] = rows
    return out


def report(result: dict[str, Any]) -> None:
    none = result["none"]
    table = Table(title=f"{result['data']} / {result['split']}: {result['queries']} tail queries, one rewrite each "
                        f"(no rewriting: nDCG@10 {none['ndcg@10']:.4f}, Recall@100 {none['recall@100']:.4f})")
    for column in ("rewrites", "route weight", "min intent", "kept", "nDCG@10", "x none", "Recall@100", "x none"):
        table.add_column(column, justify="left" if column == "rewrites" else "right")
    for kind, rows in result["kinds"].items():
        for r in rows:
            table.add_row(kind, f"{r['route_weight']:g}", "-" if r["min_intent"] is None else f"{r['min_intent']:g}",
                          f"{r['kept']:.3f}", f"{r['ndcg@10']:.4f}", f"{r['ndcg@10'] / max(none['ndcg@10'], 1e-9):.3f}",
                          f"{r['recall@100']:.4f}", f"{r['recall@100'] / max(none['recall@100'], 1e-9):.3f}")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tailbridge.bench.rewrite_guard", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="BEIR-format data with strata (default: the demo data synthesised)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="BM25 alone on 300 synthesised items: checks it works")
    args = parser.parse_args(argv)

    from tailbridge.models.data.loaders import load_dataset
    from tailbridge.models.rewriting.search import ExactSearch
    from tailbridge.settings import get_settings
    from tailbridge.synthetic import catalog as synth

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data
        if data_dir is None:
            data_dir = Path(tmp) / "demo"
            synth.write(synth.generate(items=300 if args.smoke else 5000, users=5 if args.smoke else 200, seed=7), data_dir)
        data = load_dataset(data_dir)
        encoder = None
        if not args.smoke:
            from tailbridge.models.retrieval.encoders import MINILM_VERSION
            from tailbridge.models.retrieval.export import load_item_encoder

            encoder = load_item_encoder(MINILM_VERSION, get_settings().data_dir)
        with console.status(f"indexing {len(data.items)} items for exact search"):
            search = ExactSearch(data.items, encoder)
        result = {"meta": run_meta(smoke=args.smoke), "data": data.name, "split": args.split,
                  "encoder": "BM25 only" if encoder is None else "MiniLM int8 + BM25"} | measure(data, args.split, search)
    report(result)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
