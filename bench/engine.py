"""The vector engine alone: dense search and the lexical route over N items, no query handler.

Starts the embedded Milvus of ``--engine`` (``milvus``: the 2.3.5 server confined to its own
network namespace, lexical route = the SQLite term index; ``lite``: Milvus Lite 3.2.2 with
server-side BM25) in a fresh state dir, indexes N items (random unit vectors of 384
dimensions, as MiniLM's, and the demo generator's product titles, brands and attributes; past
100,000 items its catalog repeats under new ids), searches with the generator's queries, then
measures: dense top-100 latency one search at a time (p50/p99), dense QPS with several client
threads, lexical top-100 latency, and the engine's memory (RSS of its process group). Several
rounds; the table shows medians of the rounds' p50/p99.

    python -m tailbridge.bench.engine --items 50000 --json bench/results/engine-50k.json
    python -m tailbridge.bench.engine --smoke --milvus-from-env   # on the running stack (tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from tailbridge.bench.common import (free_port, latency_summary, memory_of, run_meta, stack_down, stack_pids,
                                     stack_up, write_json)
from tailbridge.settings import Settings
from tailbridge.streams import item_index
from tailbridge.streams.term_index import TermFilters
from tailbridge.synthetic import catalog as synth
from tailbridge.vocab import item_text

DIM = 384
DISTINCT_ITEMS = 100_000


def catalog(n: int, rng: np.random.Generator) -> tuple[list[dict], np.ndarray, list[str]]:
    """Items (as catalog upserts carry them), their vectors, and search texts."""
    data = synth.generate(items=min(n, DISTINCT_ITEMS), users=0, seed=11)
    base = [dataclasses.asdict(item) for item in data.items]
    items = [{**base[i % len(base)], "item_id": f"item_{i:07d}"} for i in range(n)]
    vectors = rng.standard_normal((n, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return items, vectors, [q.text for q in data.queries]


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def qps(fn, threads: int, seconds: float) -> float:
    done, stop = [0] * threads, time.monotonic() + seconds

    def loop(k: int) -> None:
        while time.monotonic() < stop:
            fn()
            done[k] += 1

    workers = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(done) / seconds


def run(args: argparse.Namespace) -> dict:
    root = Path(tempfile.mkdtemp(prefix="tb-engine-"))
    if args.milvus_from_env:  # the running stack's Milvus (TAILBRIDGE_* variables), a collection of its own
        settings = Settings().model_copy(update={"topic_prefix": f"bench_engine_{root.name[10:]}"})
        pid, start_s = None, 0.0
    else:
        uri = f"unix:{root}/milvus.sock" if args.engine == "milvus" else f"http://127.0.0.1:{free_port()}"
        settings = Settings(state_dir=root / "state", data_dir=root / "data", milvus_engine=args.engine, milvus_uri=uri,
                            kafka_bootstrap=f"127.0.0.1:{free_port()}", redis_url=f"redis://127.0.0.1:{free_port()}/0",
                            topic_prefix="bench_engine")
        started = time.monotonic()
        pid = stack_pids(stack_up(settings))["milvus"]  # a stack of its own; only its Milvus is measured
        start_s = time.monotonic() - started
    client = name = terms = None
    try:
        client = item_index.connect(settings)
        rng = np.random.default_rng(7)
        items, vectors, search_texts = catalog(args.items, rng)
        name = item_index.create_collection(client, settings, "bench", DIM)
        item_index.point_alias(client, settings, "bench")
        bm25 = item_index.has_bm25(client, name)
        terms = None if bm25 else item_index.terms(settings)
        t = time.monotonic()
        for lo in range(0, args.items, 2000):
            client.insert(name, item_index.rows(items[lo:lo + 2000], vectors[lo:lo + 2000], "bench", item_text))
            if terms is not None:
                terms.upsert(item_index.content_rows(items[lo:lo + 2000], item_text, 1))
        client.flush(name)
        client.load_collection(name)
        queries = rng.standard_normal((64, DIM), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        texts = [search_texts[i] for i in rng.choice(len(search_texts), 64, replace=False)]
        k = [0]

        def dense():
            k[0] += 1
            item_index.dense_search(client, name, [queries[k[0] % 64].tolist()], 100, "", ["item_id"], 10)

        def lexical():
            k[0] += 1
            item_index.lexical_search(client, name, [texts[k[0] % 64]], 100, "", ["item_id"], 10, terms, TermFilters())

        # Index building finishes in the background: wait until a search is fast and stable.
        for _ in range(3 if args.smoke else 120):
            if statistics.median(timed(dense, 5)) < 50:
                break
            time.sleep(1)
        load_s = time.monotonic() - t
        rounds = []
        for _ in range(args.rounds):
            rounds.append({"dense": latency_summary(timed(dense, args.queries)),
                           "lexical": latency_summary(timed(lexical, args.queries)),
                           "dense_qps": qps(dense, args.threads, args.qps_seconds)})
        engine = memory_of(pid) or {}
        memory = {"engine_rss_mib": engine.get("rss_mib"), "engine_peak_mib": engine.get("peak_mib"),
                  "term_index_mib": round(terms.path.stat().st_size / 2**20, 1) if terms else None}
    finally:
        if args.milvus_from_env:
            if name:
                client.drop_collection(name)
            if terms:
                terms.path.unlink(missing_ok=True)
        else:
            stack_down(settings)
        shutil.rmtree(root, ignore_errors=True)

    def median(path: str, key: str) -> float:
        return round(statistics.median(r[path][key] for r in rounds), 2)

    return {"meta": run_meta(smoke=args.smoke), "engine": "from env" if args.milvus_from_env else args.engine, "items": args.items, "dim": DIM, "top_k": 100,
            "lexical_route": "milvus-bm25" if bm25 else "sqlite-fts5 term index",
            "start_s": round(start_s, 1), "load_and_index_s": round(load_s, 1), "memory": memory, "rounds": rounds,
            "summary": {"dense_p50_ms": median("dense", "p50_ms"), "dense_p99_ms": median("dense", "p99_ms"),
                        "lexical_p50_ms": median("lexical", "p50_ms"), "lexical_p99_ms": median("lexical", "p99_ms"),
                        "dense_qps": round(statistics.median(r["dense_qps"] for r in rounds), 1),
                        "threads": args.threads}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["milvus", "lite"], default="milvus")
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=300, help="searches per route per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--qps-seconds", type=float, default=5.0)
    parser.add_argument("--milvus-from-env", action="store_true",
                        help="measure the Milvus the TAILBRIDGE_* settings point at instead of starting one")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="1,000 items, a few searches: checks it runs")
    args = parser.parse_args()
    if args.smoke:
        args.items, args.queries, args.rounds, args.qps_seconds = 1000, 10, 1, 0.5
    result = run(args)
    s, m = result["summary"], result["memory"]
    print(f"engine {result['engine']} ({result['lexical_route']}), {result['items']:,} items x {DIM}, top-100, "
          f"{args.rounds} rounds")
    print(f"  dense   p50 {s['dense_p50_ms']} ms  p99 {s['dense_p99_ms']} ms  {s['dense_qps']} QPS ({s['threads']} threads)")
    print(f"  lexical p50 {s['lexical_p50_ms']} ms  p99 {s['lexical_p99_ms']} ms")
    print(f"  memory: engine RSS {m['engine_rss_mib']} MiB, term index {m['term_index_mib']} MiB; "
          f"start {result['start_s']} s, load+index {result['load_and_index_s']} s")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
