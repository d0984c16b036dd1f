"""Query-encoding latency of a trained retriever: torch vs ONNX Runtime fp32 vs int8.

    .venv/bin/python -P bench/retriever.py --model DIR --data DIR [--queries 200] [--threads 1] [--json out.json]

(``-P``: bench/streams.py would otherwise shadow the ``streams`` package.)

Encodes the data set's test queries one at a time (batch 1, as the query handler does) with
each runtime, after a warm-up, and reports p50 / p90 / p99 in milliseconds, with the cosine
between the ONNX and the torch vectors. Machines are shared and noisy: compare medians.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def timed(encode, queries: list[str]) -> tuple[np.ndarray, list[float]]:
    for q in queries[:10]:  # warm-up: first calls allocate
        encode([q])
    vectors, ms = [], []
    for q in queries:
        start = time.perf_counter()
        vectors.append(encode([q])[0])
        ms.append((time.perf_counter() - start) * 1000)
    return np.stack(vectors), ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from tailbridge.models.data.loaders import load_dataset
    from tailbridge.models.retrieval.encoders import MiniLMEncoder, load_encoder
    from tailbridge.models.retrieval.export import INT8_FILE, OnnxQueryEncoder, export_query_tower

    torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    split = data.split("test")
    queries = [data.queries[q] for q in sorted(split)][:args.queries]
    if not (args.model / INT8_FILE).exists():
        export_query_tower(args.model, int8=True)
    reference, torch_ms = timed(load_encoder(str(args.model)).encode_queries, queries)
    results = {"queries": len(queries), "threads": args.threads, "runtimes": {}}
    results["runtimes"]["tailbridge torch fp32"] = {"ms": torch_ms, "cosine_to_torch": 1.0}
    for int8 in (False, True):
        vectors, ms = timed(OnnxQueryEncoder(args.model, int8=int8, threads=args.threads).encode_queries, queries)
        cosine = (vectors * reference).sum(1) / np.linalg.norm(vectors, axis=1)
        results["runtimes"][f"tailbridge onnx {'int8' if int8 else 'fp32'}"] = {
            "ms": ms, "cosine_to_torch": float(cosine.mean()), "min_cosine_to_torch": float(cosine.min())}
    _, minilm_ms = timed(MiniLMEncoder().encode_queries, queries)
    results["runtimes"]["minilm torch fp32 (baseline)"] = {"ms": minilm_ms}

    for name, r in results["runtimes"].items():
        ms = np.array(r.pop("ms"))
        r.update({f"p{p}_ms": round(float(np.percentile(ms, p)), 2) for p in (50, 90, 99)})
        extra = "" if "min_cosine_to_torch" not in r else \
            f"  cosine mean {r['cosine_to_torch']:.4f} min {r['min_cosine_to_torch']:.4f}"
        print(f"{name:32s} p50 {r['p50_ms']:7.2f} ms  p90 {r['p90_ms']:7.2f}  p99 {r['p99_ms']:7.2f}{extra}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
