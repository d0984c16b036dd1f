"""The trained retriever: query-encoding latency (torch vs ONNX Runtime fp32 vs int8) and, with
``--quality``, retrieval quality against the untrained model and the baselines.

    .venv/bin/python -m tailbridge.bench.retriever --model DIR --data DIR [--queries 200] [--threads 1]
                                                   [--quality] [--json out.json] [--smoke]

Latency: encodes the data set's test queries one at a time (batch 1, as the query handler
does) with each runtime, after a warm-up, and reports p50 / p90 / p99 in milliseconds, with the
cosine between the ONNX and the torch vectors; the off-the-shelf all-MiniLM-L6-v2 in torch is
the baseline. The int8 export is written into the model dir when it is missing.

Quality (``--quality``): the test split, exact search over the whole catalog
(``models.retrieval.evaluate``), overall and per stratum: BM25, MiniLM, their RRF, the untrained
unified model (the same configuration with no training step, built here beside the model as
``<model>-untrained``) and the trained one; the trained model's nDCG@10 relative to the best
baseline and to the untrained model, and its training time by phase (from its metrics.json).

Ablations (``--ablate``, no ``--model``): trains each variant of ``ABLATIONS`` (a change to the
training defaults: a loss, a parameter block, the term table's learning rate, the choice of
positives, the false-negative mask, graph vectors for unseen queries, the defaults before
model selection) for ``--epochs S1,S2`` short epochs on ``--data`` and reports dev nDCG@10 and
Recall@100 by exact search over the catalog before the first step, dev nDCG@10 on the candidate
pool after every epoch (the model-selection curve) and what ships. The shipped state can be no
worse than the start; the last epoch's number says what training itself did.

``--smoke``: 20 queries after a 3-query warm-up, to check the benchmark works (its numbers are
no measurement); with ``--ablate``, two variants of one short epoch each. Machines are shared
and noisy: compare medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from rich.table import Table
from tailbridge.bench.common import console, fmt, pct, run_meta, write_json

BASELINES = ("bm25", "minilm", "hybrid-rrf")

# The training defaults the issue's real-catalog run used (before 8cfd14c); stage 2's hinge ROAR
# and whole-catalog mining of that trainer are gone, so they are not part of it here.
BEFORE_SELECTION = {"lr_text": 5e-5, "lr_terms": 5e-3, "lr_heads": 1e-3, "fusion": "train", "fn_margin": 0.0,
                    "positives": "best"}
ABLATIONS: dict[str, dict] = {
    "defaults": {},
    "defaults before 8cfd14c": BEFORE_SELECTION,
    "old learning rates (5e-5 / 5e-3 / 1e-3)": {"lr_text": 5e-5, "lr_terms": 5e-3, "lr_heads": 1e-3},
    # The learning rates, MiniLM / term table / heads (the defaults are 1e-5 / 5e-3 / 1e-3):
    "lr 1e-5 / 1e-4 / 1e-3 (the defaults before 2026-11-30's sweep)": {"lr_terms": 1e-4},
    "lr 1e-5 / 1e-4 / 1e-4 (8cfd14c's)": {"lr_terms": 1e-4, "lr_heads": 1e-4},
    "lr 3e-5 / 1e-3 / 1e-3": {"lr_text": 3e-5, "lr_terms": 1e-3},
    "lr 2e-5 / 5e-3 / 1e-3": {"lr_text": 2e-5},
    "lr 3e-5 / 5e-3 / 1e-3": {"lr_text": 3e-5},
    "positives: best grade only": {"positives": "best"},
    "mask margin 0 (anything above the positive)": {"fn_margin": 0.0},
    "no false-negative mask (known positives only)": {"fn_margin": 1e9},
    "unseen queries: graph vector always dropped": {"query_graph_dropout": 1.0},
    "unseen queries: graph vector never dropped": {"query_graph_dropout": 0.0},
    "loss: stage 1 only (contrastive)": {"stage2_epochs": 0},
    "loss: stage 2 ROAR only": {"stage1_epochs": 0, "multi_grained_weight": 0.0, "stage2_contrastive_weight": 0.0},
    "loss: stage 2 multi-grained only": {"stage1_epochs": 0, "roar_weight": 0.0, "stage2_contrastive_weight": 0.0},
}


def timed(encode, queries: list[str], warmup: int) -> tuple[np.ndarray, list[float]]:
    for q in queries[:warmup]:  # first calls allocate
        encode([q])
    vectors, ms = [], []
    for q in queries:
        start = time.perf_counter()
        vectors.append(encode([q])[0])
        ms.append((time.perf_counter() - start) * 1000)
    return np.stack(vectors), ms


def latency(args: argparse.Namespace, data) -> dict:
    from tailbridge.models.retrieval.encoders import MiniLMEncoder, load_encoder
    from tailbridge.models.retrieval.export import (
        INT8_FILE,
        OnnxQueryEncoder,
        export_query_tower,
    )

    warmup = 3 if args.smoke else 10
    queries = [data.queries[q] for q in sorted(data.split("test"))][:args.queries]
    if not (args.model / INT8_FILE).exists():
        with console.status("exporting the query tower to ONNX (fp32 and int8)"):
            export_query_tower(args.model, int8=True)
    runtimes: dict[str, dict] = {}
    with console.status(f"encoding {len(queries)} queries, one at a time, with each runtime"):
        reference, torch_ms = timed(load_encoder(str(args.model)).encode_queries, queries, warmup)
        runtimes["tailbridge torch fp32"] = {"ms": torch_ms, "cosine_to_torch": 1.0}
        for int8 in (False, True):
            encoder = OnnxQueryEncoder(args.model, int8=int8, threads=args.threads)
            vectors, ms = timed(encoder.encode_queries, queries, warmup)
            cosine = (vectors * reference).sum(1) / np.linalg.norm(vectors, axis=1)
            runtimes[f"tailbridge onnx {'int8' if int8 else 'fp32'}"] = {
                "ms": ms, "cosine_to_torch": float(cosine.mean()), "min_cosine_to_torch": float(cosine.min())}
        _, minilm_ms = timed(MiniLMEncoder().encode_queries, queries, warmup)
        runtimes["minilm torch fp32 (baseline)"] = {"ms": minilm_ms}

    table = Table(title=f"query encoding, batch 1, {args.threads} thread(s): {len(queries)} test queries of "
                        f"{data.name}, model {args.model.name}" + (" (smoke)" if args.smoke else ""))
    for column in ("runtime", "p50 ms", "p90 ms", "p99 ms", "cosine to torch (mean / min)"):
        table.add_column(column, justify="left" if column == "runtime" else "right")
    for name, r in runtimes.items():
        ms = r.pop("ms")
        r.update({f"p{p}_ms": round(pct(ms, p), 2) for p in (50, 90, 95, 99)})
        r["count"] = len(ms)
        cosine = "" if "min_cosine_to_torch" not in r else \
            f"{r['cosine_to_torch']:.4f} / {r['min_cosine_to_torch']:.4f}"
        table.add_row(name, fmt(r["p50_ms"], 2), fmt(r["p90_ms"], 2), fmt(r["p99_ms"], 2), cosine)
    console.print(table)
    return {"queries": len(queries), "runtimes": runtimes}


def untrained_artifact(model_dir: Path, data_dir: Path) -> Path:
    """The model's configuration with no training step (the state training starts from), built
    once beside the model; block weights as initialised, not fit on dev."""
    from tailbridge.models.retrieval.model import RetrieverConfig
    from tailbridge.models.retrieval.train import TrainConfig, train

    out = model_dir.parent / f"{model_dir.name}-untrained"
    if (out / "metrics.json").is_file():
        return out
    config = json.loads((model_dir / "config.json").read_text())
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    training = {k: v for k, v in config.get("training", {}).items() if k in known}
    cfg = TrainConfig(**{**training, "stage1_epochs": 0, "stage2_epochs": 0, "fusion": "fixed",
                         "export_onnx": False, "max_minutes": None})
    with console.status(f"building the untrained model at {out}"):
        train(data_dir, out.parent, out.name, RetrieverConfig.from_json(config["retriever"]), cfg,
              say=lambda _: None)
    return out


def quality(args: argparse.Namespace) -> dict:
    from tailbridge.models.retrieval.evaluate import evaluate

    untrained = untrained_artifact(args.model, args.data)
    with console.status("evaluating on the test split (exact search over the catalog)"):
        report = evaluate(args.data, "test", str(args.model), say=lambda _: None,
                          others={"untrained": str(untrained)})
    systems = report["systems"]
    strata = [s for s in ("overall", "head", "torso", "tail") if s in systems["bm25"]]
    table = Table(title=f"nDCG@10 on {report['data']} test: {report['queries']} queries, {report['items']} items, "
                        "exact search" + (" (smoke)" if args.smoke else ""))
    table.add_column("system")
    for s in strata:
        table.add_column(s, justify="right")
    table.add_column("Recall@100", justify="right")
    for name in (*BASELINES, "untrained", "tailbridge", "tailbridge+user"):
        if name in systems:
            table.add_row(name, *(fmt(systems[name][s]["ndcg@10"], 4) for s in strata),
                          fmt(systems[name]["overall"]["recall@100"], 4))
    console.print(table)
    out: dict = {"systems": systems, "ratios": {}}
    for s in strata:
        best_name = max(BASELINES, key=lambda b: systems[b][s]["ndcg@10"] or 0.0)
        best = systems[best_name][s]["ndcg@10"] or 0.0
        trained, start = systems["tailbridge"][s]["ndcg@10"], systems["untrained"][s]["ndcg@10"]
        out["ratios"][s] = {"best_baseline": best_name, "trained_over_best_baseline": trained / best if best else None,
                            "trained_minus_untrained": trained - start}
    phases = json.loads((args.model / "metrics.json").read_text()).get("phases_seconds", {})
    out["training_phases_seconds"] = phases
    overall = out["ratios"]["overall"]
    console.print(f"trained / best baseline ({overall['best_baseline']}) nDCG@10: "
                  f"{fmt(overall['trained_over_best_baseline'], 3)}x; trained - untrained: "
                  f"{overall['trained_minus_untrained']:+.4f}; training phases: "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()))
    return out


def _trained_with(out: Path, cfg) -> bool:
    """Whether ``out`` is a finished artifact trained with exactly ``cfg``."""
    if not (out / "metrics.json").is_file():
        return False
    return json.loads((out / "config.json").read_text()).get("training") == json.loads(
        json.dumps(dataclasses.asdict(cfg)))


def ablate(args: argparse.Namespace) -> dict:
    """Each variant of ABLATIONS trained briefly on the same data; dev curves side by side. The
    JSON (``--json``) is rewritten as each variant finishes."""
    from tailbridge.models.retrieval.model import RetrieverConfig
    from tailbridge.models.retrieval.train import TrainConfig, train

    stage1, stage2 = (int(x) for x in args.epochs.split(","))
    names = [n for n in ABLATIONS if not args.only or any(o in n for o in args.only)]
    if args.smoke:
        names, stage1, stage2 = names[:2], 1, 0
    base = {"stage1_epochs": stage1, "stage2_epochs": stage2, "warmup_steps": args.warmup, "export_onnx": False,
            "max_minutes": None}
    rows: dict[str, dict] = {}
    meta = run_meta(data=str(args.data), smoke=args.smoke)
    for name in names:
        began = time.monotonic()
        cfg = TrainConfig(**{**base, **ABLATIONS[name]})
        out = args.out / ("ablation-" + "".join(c if c.isalnum() else "-" for c in name)[:60])
        if not _trained_with(out, cfg):  # a re-run reuses the variants it finished
            with console.status(f"ablation {name!r}: training {cfg.stage1_epochs} + {cfg.stage2_epochs} epochs"):
                train(args.data, out.parent, out.name, RetrieverConfig(), cfg, restart=True, say=lambda _: None)
        metrics = json.loads((out / "metrics.json").read_text())
        curve = [{"when": h["when"], "steps": h["steps"], "dev_ndcg@10": h.get("dev_ndcg@10"),
                  "dev_recall@100": h.get("dev_recall@100")} for h in metrics["history"]]
        trained = curve[1:-1]  # between the untrained row and the shipped (exact search) one
        sel = metrics["selection"]
        rows[name] = {
            "changes": ABLATIONS[name], "curve": curve, "steps": metrics["steps"],
            "untrained_exact": sel["dev_start_exact"], "shipped_exact": sel["dev_shipped_exact"],
            "untrained_pool_ndcg@10": curve[0]["dev_ndcg@10"],
            "last_epoch_pool_ndcg@10": trained[-1]["dev_ndcg@10"] if trained else None,
            "best_epoch_pool_ndcg@10": max((c["dev_ndcg@10"] for c in trained), default=None),
            "shipped": sel["shipped"], "fn_mask_share": metrics["fn_mask_share"],
            "fusion_weights": metrics["fusion_weights"], "seconds": round(time.monotonic() - began, 1)}
        r = rows[name]
        write_json(args.json, {"meta": meta, "threads": args.threads, "ablations": {
            "epochs": [stage1, stage2], "warmup_steps": args.warmup, "variants": rows}})
        console.print(f"{name}: dev nDCG@10 untrained {fmt(r['untrained_pool_ndcg@10'], 4)} -> last epoch "
                      f"{fmt(r['last_epoch_pool_ndcg@10'], 4)} (best {fmt(r['best_epoch_pool_ndcg@10'], 4)}); "
                      f"shipped {sel['shipped']!r} {fmt(r['shipped_exact'].get('dev_ndcg@10'), 4)} exact "
                      f"({r['seconds']:.0f} s)")
    table = Table(title=f"ablations on {args.data.name}: dev nDCG@10, {stage1} stage-1 + {stage2} stage-2 epochs, "
                        f"warm-up {args.warmup} steps" + (" (smoke)" if args.smoke else ""))
    for column in ("variant", "untrained", "after each epoch (pool)", "last - untrained", "shipped (exact)"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, r in rows.items():
        last = r["last_epoch_pool_ndcg@10"]
        table.add_row(name, fmt(r["untrained_pool_ndcg@10"], 4),
                      " ".join(fmt(c["dev_ndcg@10"], 4) for c in r["curve"][1:-1]),
                      "-" if last is None else f"{last - r['untrained_pool_ndcg@10']:+.4f}",
                      fmt(r["shipped_exact"].get("dev_ndcg@10"), 4))
    console.print(table)
    return {"epochs": [stage1, stage2], "warmup_steps": args.warmup, "variants": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tailbridge.bench.retriever", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="trained retriever artifact dir (not with --ablate)")
    parser.add_argument("--data", type=Path, required=True, help="data set dir with a test split")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quality", action="store_true", help="also compare retrieval quality (see above)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="20 queries, 3 warm-up: checks the benchmark works")
    parser.add_argument("--ablate", action="store_true", help="train the ABLATIONS variants and compare dev curves")
    parser.add_argument("--only", nargs="*", help="with --ablate: variants whose name contains one of these")
    parser.add_argument("--epochs", default="2,1", help="with --ablate: stage-1,stage-2 epochs per variant")
    parser.add_argument("--warmup", type=int, default=10, help="with --ablate: warm-up steps (short runs)")
    parser.add_argument("--out", type=Path, help="with --ablate: where the variants' artifacts go")
    args = parser.parse_args(argv)
    if args.ablate == (args.model is not None):
        parser.error("pass --model DIR (latency, --quality) or --ablate, not both")
    if args.smoke:
        args.queries = min(args.queries, 20)

    import torch
    from tailbridge.models.data.loaders import load_dataset

    torch.set_num_threads(args.threads)
    if args.ablate:
        if args.out is None:
            parser.error("--ablate needs --out DIR for the variants' artifacts")
        ablate(args)  # writes --json as each variant finishes
        return 0
    data = load_dataset(args.data)
    result = {"meta": run_meta(model=str(args.model), data=str(args.data), smoke=args.smoke),
              "threads": args.threads, **latency(args, data)}
    if args.quality:
        result["quality"] = quality(args)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
