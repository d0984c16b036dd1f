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

``--smoke``: 20 queries after a 3-query warm-up, to check the benchmark works (its numbers are
no measurement). Machines are shared and noisy: compare medians.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tailbridge.bench.retriever", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="trained retriever artifact dir")
    parser.add_argument("--data", type=Path, required=True, help="data set dir with a test split")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quality", action="store_true", help="also compare retrieval quality (see above)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="20 queries, 3 warm-up: checks the benchmark works")
    args = parser.parse_args(argv)
    if args.smoke:
        args.queries = min(args.queries, 20)

    import torch
    from tailbridge.models.data.loaders import load_dataset

    torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    result = {"meta": run_meta(model=str(args.model), data=str(args.data), smoke=args.smoke),
              "threads": args.threads, **latency(args, data)}
    if args.quality:
        result["quality"] = quality(args)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
