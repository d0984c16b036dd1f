"""Query-encoding latency of a trained retriever: torch vs ONNX Runtime fp32 vs int8.

    .venv/bin/python -m tailbridge.bench.retriever --model DIR --data DIR [--queries 200] [--threads 1]
                                                   [--json out.json] [--smoke]

Encodes the data set's test queries one at a time (batch 1, as the query handler does) with
each runtime, after a warm-up, and reports p50 / p90 / p99 in milliseconds, with the cosine
between the ONNX and the torch vectors; the off-the-shelf all-MiniLM-L6-v2 in torch is the
baseline. The int8 export is written into the model dir when it is missing. ``--smoke``: 20
queries after a 3-query warm-up, to check the benchmark works (its numbers are no measurement).
Machines are shared and noisy: compare medians.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from rich.table import Table

from tailbridge.bench.common import console, fmt, pct, run_meta, write_json


def timed(encode, queries: list[str], warmup: int) -> tuple[np.ndarray, list[float]]:
    for q in queries[:warmup]:  # first calls allocate
        encode([q])
    vectors, ms = [], []
    for q in queries:
        start = time.perf_counter()
        vectors.append(encode([q])[0])
        ms.append((time.perf_counter() - start) * 1000)
    return np.stack(vectors), ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tailbridge.bench.retriever", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="trained retriever artifact dir")
    parser.add_argument("--data", type=Path, required=True, help="data set dir with a test split")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="20 queries, 3 warm-up: checks the benchmark works")
    args = parser.parse_args(argv)
    if args.smoke:
        args.queries = min(args.queries, 20)
    warmup = 3 if args.smoke else 10

    import torch

    from tailbridge.models.data.loaders import load_dataset
    from tailbridge.models.retrieval.encoders import MiniLMEncoder, load_encoder
    from tailbridge.models.retrieval.export import INT8_FILE, OnnxQueryEncoder, export_query_tower

    torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    split = data.split("test")
    queries = [data.queries[q] for q in sorted(split)][:args.queries]
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
        r.update({f"p{p}_ms": round(pct(ms, p), 2) for p in (50, 90, 99)})
        r["count"] = len(ms)
        cosine = "" if "min_cosine_to_torch" not in r else \
            f"{r['cosine_to_torch']:.4f} / {r['min_cosine_to_torch']:.4f}"
        table.add_row(name, fmt(r["p50_ms"], 2), fmt(r["p90_ms"], 2), fmt(r["p99_ms"], 2), cosine)
    console.print(table)
    write_json(args.json, {"meta": run_meta(model=str(args.model), data=str(args.data), smoke=args.smoke),
                           "queries": len(queries), "threads": args.threads, "runtimes": runtimes})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
