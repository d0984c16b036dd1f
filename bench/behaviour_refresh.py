"""A behaviour refresh measured: recall@100 of the next window's engagements, before and after.

    .venv/bin/python -m tailbridge.bench.behaviour_refresh [--items 1500] [--users 60] [--sessions 6000]
                                                          [--minutes 3] [--out DIR] [--json out.json]
                                                          [--fusion-weights 0.6,0.3,0.1] [--smoke]

1. Demo data (``tailbridge data synth``) and a simulated feedback log of ``--sessions`` shopper
   sessions (``synthetic.feedback``), cut in time by searches: the first 60% train the retriever
   (``--minutes`` of budget; the artifact under ``--out`` is reused by the next run), the next
   20% are what the refresh reads, the last 20% are the next window. ``--new-items`` of the
   catalog (10%, seeded) are new since training: the retriever trains on a copy of the data
   without them (their judgements and log rows with them), so they have no graph row.
2. One refresh (``models.retrieval.behaviour.refresh``) of the trained version from the middle
   window: fold-in against the trained factors, the overlay beside the artifact.
3. Recall@100 (and @20) of the next window's engaged (query, item) pairs, exact search over the
   catalog without user context, with the vectors of before and after the refresh
   (``behaviour.next_window_recall``), for warm items (a graph row at training), newly engaged
   ones (a row only after the refresh), items engaged but never folded in, and for the pairs of
   queries the graph did not have at training, folded in by the refresh or not (the simulator
   searches training queries only, so those are the trainer's dev queries, kept out of its graph).

The same recall with the graph rows alone (spectral query row . item row) says what the refresh
adds to the behaviour block's input. Block weights fit on dev give the behaviour block almost nothing (dev queries have no graph rows
by construction): ``--fusion-weights`` scores both sides with other weights, to see what a
refresh does where the block carries weight. No Milvus, no Kafka: the refresh's Milvus side is
``tests/test_behaviour_refresh.py``'s.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from tailbridge.bench.common import console, run_meta, simulation_parser, write_json


def without_items(data: Path, out: Path, item_ids: set[str]) -> Path:
    """A copy of BEIR-layout demo data without ``item_ids`` in its corpus and judgements."""
    import shutil

    (out / "qrels").mkdir(parents=True, exist_ok=True)
    for name in ("queries.jsonl", "users.jsonl", "manifest.json"):
        shutil.copy(data / name, out / name)
    with open(data / "corpus.jsonl") as src, open(out / "corpus.jsonl", "w") as dst:
        dst.writelines(line for line in src if json.loads(line)["_id"] not in item_ids)
    for qrels in (data / "qrels").glob("*.tsv"):
        lines = qrels.read_text().splitlines(keepends=True)
        (out / "qrels" / qrels.name).write_text(lines[0] + "".join(
            line for line in lines[1:] if line.split("\t")[1] not in item_ids))
    return out


def graph_recall(factors, overlay, items, window, groups, k: int) -> dict[str, float]:
    """The same recall with the graph rows alone (query row . item row in the spectral space,
    ``overlay`` None: the trained rows): what the refresh adds to the behaviour block's input,
    whatever the model's projection and block weight make of it. A query without a row finds
    nothing; an item without a row is never found."""
    import numpy as np

    from tailbridge.vocab import ENGAGEMENT, normalize_query

    q_rows = dict(zip(factors.queries, factors.query_rows())) | (overlay.query_rows if overlay else {})
    i_rows = dict(zip(factors.items, factors.item_rows())) | (overlay.item_rows if overlay else {})
    ids = [str(it["item_id"]) for it in items if str(it["item_id"]) in i_rows]
    table = np.asarray([i_rows[i] for i in ids])
    engaged = window[window["label"].map(lambda label: ENGAGEMENT.get(label, 0) > 0)]
    pairs = set(zip(engaged["query"].astype(str).map(normalize_query), engaged["item_id"].astype(str)))
    found = {}
    for q in {q for q, _ in pairs if q in q_rows}:
        scores = table @ q_rows[q]
        found[q] = {ids[j] for j in np.argsort(-scores)[:k]}
    out = {}
    for group, member in groups.items():
        hits = [i in found.get(q, ()) for q, i in pairs if member(q, i)]
        out[group] = float(np.mean(hits)) if hits else float("nan")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = simulation_parser(__doc__, items=1500, users=60, sessions=6000, out="data/bench-behaviour")
    parser.add_argument("--minutes", type=float, default=3.0, help="training budget of the retriever")
    parser.add_argument("--new-items", type=float, default=0.1, help="share of the catalog added after training")
    parser.add_argument("--k", type=int, nargs="+", default=[100, 20], help="recall cut-offs")
    parser.add_argument("--fusion-weights", type=str, default=None,
                        help="score with these semantic,lexical,behaviour block weights instead of the artifact's")
    args = parser.parse_args(argv)
    if args.smoke:
        args.items, args.users, args.sessions, args.minutes = 150, 6, 150, 0.2

    import numpy as np
    import pandas as pd
    import torch

    from tailbridge.models.data.feedback import write_feedback
    from tailbridge.models.data.loaders import load_dataset
    from tailbridge.models.retrieval import behaviour
    from tailbridge.models.retrieval.encoders import UnifiedEncoder
    from tailbridge.models.retrieval.graph import GraphFactors
    from tailbridge.models.retrieval.train import TrainConfig, train
    from tailbridge.synthetic import catalog as synth
    from tailbridge.synthetic.feedback import simulate_feedback

    torch.set_num_threads(args.threads)
    data, model_dir = args.out / "demo", args.out / "models" / "tb-behaviour"
    if not (data / "corpus.jsonl").is_file():
        synth.write(synth.generate(items=args.items, users=args.users, seed=args.seed), data)
    simulated = args.out / f"log-{args.sessions}-{args.seed}.parquet"  # the simulation is the slow part: kept
    if not simulated.is_file():
        simulate_feedback(data, sessions=args.sessions, seed=args.seed).to_parquet(simulated, index=False)
    frame = pd.read_parquet(simulated).sort_values(["event_time", "query_id", "position"], ignore_index=True)
    searches = frame.drop_duplicates("query_id")["event_time"].tolist()
    train_end, refresh_end = searches[int(len(searches) * 0.6) - 1], searches[int(len(searches) * 0.8) - 1]
    items = list(load_dataset(data).items.values())
    rng = np.random.default_rng(args.seed)
    new_items = {str(it["item_id"]) for it in items if rng.random() < args.new_items}
    if not behaviour.factors_path(model_dir).is_file():
        started = time.monotonic()
        write_feedback(frame[frame["event_time"] <= train_end], args.out / "train-log")
        train(without_items(data, args.out / "train-data", new_items), model_dir.parent, model_dir.name,
              cfg=TrainConfig(max_minutes=args.minutes, export_onnx=False),
              feedback_dir=args.out / "train-log", say=lambda line: console.print(f"  {line}"))
        console.print(f"trained {model_dir.name} in {(time.monotonic() - started) / 60:.1f} min")
    (model_dir / behaviour.OVERLAY_FILE).unlink(missing_ok=True)  # measure from the trained rows

    factors = GraphFactors.load(behaviour.factors_path(model_dir))
    started = time.monotonic()
    result = behaviour.refresh(factors, None, frame, until=refresh_end)
    fold_s = time.monotonic() - started
    before = UnifiedEncoder(model_dir)
    behaviour.write_overlay(model_dir, result.overlay, factors.rank)
    after = UnifiedEncoder(model_dir)
    if args.fusion_weights:  # e.g. the trainer's initial 0.6,0.3,0.1 where dev fitting zeroed the behaviour block
        for encoder in (before, after):
            encoder._model.set_fusion_weights([float(w) for w in args.fusion_weights.split(",")])
    weights = [round(float(w), 4) for w in after._model.fusion_weights().detach()]

    trained_items, trained_queries = set(factors.items), set(factors.queries)
    folded = result.overlay.item_rows
    groups = {
        "warm_items": lambda q, i: i in trained_items,
        "newly_engaged_items": lambda q, i: i not in trained_items and i in folded,
        "never_folded_items": lambda q, i: i not in trained_items and i not in folded,
        "new_queries_folded": lambda q, i: q not in trained_queries and q in result.overlay.query_rows,
        "new_queries_not_folded": lambda q, i: q not in trained_queries and q not in result.overlay.query_rows,
        "all": lambda q, i: True,
    }
    window = frame[frame["event_time"] > refresh_end]
    recall = {f"recall@{k}": behaviour.next_window_recall(items, window, {"before": before, "after": after}, groups, k=k)
              for k in args.k}
    report = {
        "meta": run_meta(), "args": {k: str(v) for k, v in vars(args).items()},
        "log": {"searches": len(searches), "train_until": str(train_end), "refresh_until": str(refresh_end)},
        "refresh": {**{k: v for k, v in dataclasses.asdict(result).items() if k != "overlay"},
                    "changed_items": len(result.changed_items), "changed_queries": len(result.changed_queries),
                    "item_rows": len(folded), "query_rows": len(result.overlay.query_rows),
                    "fold_in_seconds": round(fold_s, 2)},
        "graph_at_training": {"items": len(trained_items), "queries": len(trained_queries),
                              "catalog": len(items), "new_items": len(new_items)},
        "block_weights": weights, **recall,
        "graph_only": {f"recall@{k}": {"before": graph_recall(factors, None, items, window, groups, k),
                                        "after": graph_recall(factors, result.overlay, items, window, groups, k)}
                       for k in args.k},
    }
    console.print(f"block weights (semantic, lexical, behaviour): {weights}")
    for name, scores in recall.items():
        for group in groups:
            b, a, n = scores["before"][group], scores["after"][group], int(scores["before"][f"{group}_pairs"])
            delta = "" if np.isnan(b) else f" ({a - b:+.4f})"
            console.print(f"{name} {group:>20}: before {b:.4f}  after {a:.4f}{delta}  [{n} pairs]")
    for name, scores in report["graph_only"].items():
        for group in groups:
            console.print(f"graph rows alone {name} {group:>20}: before {scores['before'][group]:.4f}  "
                          f"after {scores['after'][group]:.4f}")
    r = report["refresh"]
    console.print(f"refresh: {r['searches']} searches, {r['engagements']} engagements; rows for {r['item_rows']} "
                  f"items ({r['new_items']} new), {r['query_rows']} queries ({r['new_queries']} new); "
                  f"fold-in {r['fold_in_seconds']} s")
    if args.json:
        write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
