"""The one settings object: every address, directory and name the system uses.

Read from environment variables prefixed ``TAILBRIDGE_`` (and a ``.env`` file in the
working directory). The defaults point at the embedded stack that
``tailbridge stack up`` starts on loopback; pointing these at a Kafka cluster, a Redis
and a Milvus server is all it takes to run the same code against them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TAILBRIDGE_", env_file=".env", extra="ignore")

    kafka_bootstrap: str = Field(
        "127.0.0.1:19092", description="Kafka bootstrap servers, comma separated host:port."
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis for the Feast online store. If it does not answer, `stack up` "
        "starts redis-server on a free port, or falls back to SQLite.",
    )
    milvus_uri: str = Field("http://127.0.0.1:19530", description="Milvus (or Milvus Lite server) URI; "
                            "`unix:/path.sock` reaches the embedded server without a TCP port.")
    milvus_engine: Literal["milvus", "lite"] = Field(
        "milvus", description="What `stack up` starts when nothing answers at milvus_uri: milvus (the Milvus "
        "2.3.5 server, confined to loopback, HNSW; BM25 by the term index beside it) or lite (Milvus Lite 3.2.2, "
        "pure Python, server-side BM25, slow past a few thousand items).")
    online_store: Literal["auto", "redis", "sqlite"] = Field(
        "auto", description="auto: Redis when one answers, else SQLite."
    )
    data_dir: Path = Field(Path("data"), description="Generated data sets, offline store, models.")
    state_dir: Path = Field(
        Path(".tailbridge"), description="Pid files, logs and data of the embedded stack; Feast registry."
    )
    feast_project: str = Field("tailbridge", description="Feast project name; isolates keys in Redis.")
    topic_prefix: str = Field("tailbridge", description="Prefix of every Kafka topic name.")
    topic_partitions: int = Field(4, ge=1, description="Partitions of each topic created.")
    redis_key_ttl_seconds: int = Field(
        7 * 24 * 3600, ge=0, description="Online feature key TTL (Feast does not enforce view TTLs online)."
    )

    encoder_version: str = Field(
        "minilm-l6-v2", description="Item encoder the indexer uses when no collection is serving yet."
    )
    feedback_window_seconds: float = Field(
        1800, gt=0, description="How long after a search (in event time) its clicks, carts and purchases still count."
    )
    max_event_skew_seconds: float = Field(
        300, ge=0, description="How far ahead of its arrival an event's time may be: POST /events refuses more (422), "
        "the stream worker clamps it to the arrival time."
    )
    worker_idle_seconds: float = Field(
        30, gt=0, description="A partition that brings no event for this long is idle: the worker's event-time clock "
        "then moves on with the wall clock, so the feedback windows of a quiet stream close."
    )
    worker_batch_size: int = Field(500, ge=1, description="Most events a stream processor handles at once.")
    worker_batch_seconds: float = Field(
        0.05, gt=0, description="Longest wait to fill a batch (a full batch goes at once): part of feature freshness."
    )
    worker_fetch_wait_ms: int = Field(
        100, ge=1, le=10_000, description="Longest time the broker may hold the worker's fetch before it answers "
        "(faust's own is 1,500 ms): on the embedded broker records reach the worker up to this late."
    )
    worker_commit_seconds: float = Field(
        1.0, gt=0, description="Period of the consumer's offset commits (events applied since are redelivered after "
        "a crash, and skipped as duplicates)."
    )
    worker_flush_seconds: float = Field(1.0, gt=0, description="Period of item-stats and feedback-log flushes.")
    worker_index_seal_seconds: float = Field(
        5.0, gt=0, description="Longest time index writes stay unflushed in Milvus (unflushed rows slow every search)."
    )
    worker_poison_attempts: int = Field(
        3, ge=1, description="Tries of an event that fails on its own (not a dependency down) before it is dead-lettered."
    )
    worker_stuck_seconds: float = Field(
        60.0, gt=0, description="A worker that made no progress this long while events wait is reported stuck."
    )
    worker_max_event_age_seconds: float = Field(
        300.0, gt=0, description="A worker whose oldest unapplied event is older than this is reported lagging."
    )

    serve_host: str = Field("127.0.0.1", description="Address `tailbridge serve` listens on.")
    serve_port: int = Field(8000, ge=1, le=65535, description="Port `tailbridge serve` listens on.")
    serve_context_timeout_ms: float = Field(
        50, gt=0, description="Deadline for reading a user's context (and rewrites, and the candidates' item stats); "
        "past it search goes on without."
    )
    serve_dependency_cooldown_s: float = Field(
        2.0, ge=0, description="After a dependency fails, how long search skips it before trying again."
    )
    serve_milvus_timeout_s: float = Field(2.0, gt=0, description="Deadline of each Milvus call made by search.")
    serve_candidates: int = Field(50, ge=1, le=1000, description="Candidates per retrieval route that reach the ranker.")
    serve_query_cache_size: int = Field(
        10_000, ge=0, description="Query vectors the handler keeps per encoder version, keyed by the texts and the user "
        "contexts (a hit is exactly what the query tower would return); 0 turns the cache off."
    )
    serve_max_body_bytes: int = Field(
        1_048_576, ge=1, description="Largest request body accepted; a larger one is answered 413 before it is read whole."
    )
    serve_event_buffer: int = Field(
        10_000, ge=1, description="Events waiting for the broker; beyond it new events are dropped (and counted)."
    )
    ranker_version: str = Field(
        "auto", description="Ranker under DATA_DIR/models/ranker: a version, a path, 'auto' (newest) or 'none'."
    )
    serve_retrieval_weight: float = Field(
        1.0, ge=0, description="Weight of retrieval's fused order beside the ranker in the final score (0: ranker only)."
    )
    ranker_weights: dict[str, float] | None = Field(
        None, description='Head weights of the final score, JSON, e.g. {"click": 1, "add_to_cart": 2, "purchase": 4}.'
    )
    rewrite_count: int = Field(2, ge=1, le=3, description="Rewrites stored per query (search uses up to 3).")
    rewrite_beams: int = Field(4, ge=1, le=16, description="Beam width of the rewriter when it fills the rewrite store.")
    rewrite_worker_beams: int = Field(
        1, ge=1, le=16, description="Beam width of the stream's rewrite worker (1: greedy, one rewrite per query; "
        "its latency target is 150 ms per query on one core)."
    )
    rewrite_int8: bool = Field(
        True, description="Generate rewrites on a CPU with int8 Linear layers (torch dynamic quantization); "
        "training always uses the full-precision model."
    )
    rewrite_rare_max_seen: int = Field(
        3, ge=1, description="A query searched at most this many times (in the log, or on the stream within "
        "rewrite_seen_ttl_s) is long-tail: the rewriter writes rewrites for it."
    )
    rewrite_seen_ttl_s: int = Field(604_800, ge=60, description="How long the rewrite worker remembers a query's searches.")
    rewrite_deadline_s: float = Field(
        2.0, gt=0, description="Longest the rewrite worker generates per poll; queries it did not reach wait for their next search."
    )
    rewrite_route_weight: float = Field(
        0.5, gt=0, le=1, description="Weight of each rewrite's routes in search's reciprocal-rank fusion, the query's own "
        "routes weighing 1: a rewrite can add items and reorder, but not outvote what the query asked for."
    )
    rewrite_min_intent: float = Field(
        0.8, ge=0, description="A rewrite is stored only when its top 10 are, on average, at least this share as "
        "similar to the original query (its dense score) as the query's own top 10 (models/rewriting/intent.py)."
    )
    rewrite_worker_chunk: int = Field(
        1, ge=1, le=256, description="Queries the rewrite worker generates at once (1: a padded batch decodes until its "
        "longest answer ends; chunks of 4 cost 133 ms CPU per query against 96 ms one at a time, bench/rewriter.py)."
    )

    # The alignment loop (`tailbridge loop`, tailbridge/cli/loop.py) and the rewrite evidence rule.
    loop_min_new_searches: int = Field(
        2000, ge=1, description="An alignment iteration runs once this many new searches are in the feedback log..."
    )
    loop_max_interval_seconds: float = Field(
        86_400.0, gt=0, description="...or once this long has passed since the last one, with any new search logged."
    )
    loop_poll_seconds: float = Field(60.0, gt=0, description="How often the long-running loop checks the thresholds.")
    loop_ranker_minutes: float = Field(3.0, gt=0, description="Time budget of the ranker's retraining per iteration.")
    loop_retriever_minutes: float = Field(
        5.0, gt=0, description="Time budget of the retriever's fine-tuning per iteration, its preparation included (at "
        "5,000 items about 2 minutes of it: the frozen-prefix cache, the candidate pool, writing the artifact)."
    )
    loop_nice: int = Field(
        10, ge=0, le=19, description="How much the loop lowers its own CPU priority (os.nice): its training shares the "
        "machine with the query handler and the stream worker, which must keep answering."
    )
    loop_rewriter_minutes: float = Field(
        3.0, gt=0, description="Time budget of the rewriter's re-alignment (stage 3 on the online partial order) per iteration."
    )
    loop_holdout_fraction: float = Field(
        0.2, gt=0, lt=1, description="The latest share of logged searches held out: the gate replays them."
    )
    loop_gate_tolerance: float = Field(
        0.005, ge=0, description="The gate promotes a candidate unless a metric is worse than serving's by more (nDCG)."
    )
    loop_gate_min_pages: int = Field(
        50, ge=0, description="Held-out pages with a purchase the gate needs before it replaces a serving version."
    )
    loop_gate_max_pages: int = Field(3000, ge=1, description="At most this many of the latest held-out pages are replayed.")
    loop_gate_max_queries: int = Field(300, ge=1, description="Judged test queries the gate scores a retriever on.")
    loop_iteration_minutes: float = Field(
        10.0, gt=0, description="An iteration starts a kind only while its expected time (its last step, at first 1.5x "
        "its training budget) fits in what is left of this; one that does not fit goes first in the next iteration, "
        "which is due at once. The first kind that trains always runs."
    )
    loop_retriever_collections: int = Field(
        2, ge=1, description="Milvus collections of the latest serving retriever versions the loop keeps (`models "
        "rollback retriever` steps back through them); it drops older ones, rejected ones and those of candidates a "
        "killed iteration left: the stream worker encodes every catalog event for every live collection."
    )
    behaviour_refresh_seconds: float = Field(
        600.0, gt=0, description="The loop refreshes the serving retriever's behaviour vectors from the log at most "
        "this often (`tailbridge models refresh-behaviour`)..."
    )
    behaviour_refresh_min_engagements: int = Field(
        20, ge=0, description="...once this many engagements (clicks or better) were logged since the last refresh."
    )
    rewrite_min_shown: int = Field(
        30, ge=1, description="Items a rewrite's routes must have shown before its online statistics can demote it."
    )
    rewrite_demote_probability: float = Field(
        0.9, gt=0, le=1, description="Demote a rewrite (serve it after the others) when it is worse than the original "
        "query's routes with this posterior probability..."
    )
    rewrite_drop_probability: float = Field(0.99, gt=0, le=1, description="...and drop it at this probability.")

    monitor_alpha_window: float = Field(
        1e-4, gt=0, lt=1, description="Drift monitor: chance that any test alerts on one window without drift (split "
        "over the tests by Bonferroni; thresholds are calibrated on the monitor's no-drift reference)."
    )
    monitor_bucket_seconds: float = Field(
        10.0, gt=0, description="Drift monitor: span of stream time per bucket; windows are 1 and 6 buckets."
    )
    monitor_warmup_seconds: float = Field(
        60.0, gt=0, description="Drift monitor: stream time that fixes bins and query strata before the reference."
    )
    monitor_reference_seconds: float = Field(
        300.0, gt=0, description="Drift monitor: stream time of the no-drift reference the thresholds are calibrated on."
    )
    monitor_query_vectors: Literal["minilm", "hashed", "none"] = Field(
        "minilm", description="Drift monitor: query vectors of the MMD test (all-MiniLM-L6-v2, hashed trigrams, or no test)."
    )
    monitor_metrics_port: int = Field(
        9108, ge=0, le=65535, description="Where `tailbridge monitor run` serves its Prometheus metrics (0: not served)."
    )
    monitor_feature_sample: int = Field(
        64, ge=0, le=10_000, description="Drift monitor: users and items per bucket whose Feast rows (user_context, "
        "item_stats) it reads to watch their features (0: no feature tests)."
    )

    def as_env(self) -> dict[str, str]:
        """These settings as TAILBRIDGE_* variables, for a child process that must see the same stack."""
        return {f"TAILBRIDGE_{name.upper()}": json.dumps(value) if isinstance(value, dict) else str(value)
                for name, value in self.model_dump().items() if value is not None}

    @field_validator("data_dir", "state_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Workers, tests and the CLI may run from different directories; pin paths once.
        return value.expanduser().resolve()


@lru_cache
def get_settings() -> Settings:
    return Settings()
