"""Training the unified retriever: ``tailbridge train retriever --data DIR``.

1. Data: the training judgements of DIR (any layout ``models.data.loaders`` reads). Model
   selection data is ``qrels/dev.tsv`` when the set has one, else a stable 10% of the training
   queries; the test split is never read here.
2. Behaviour (optional): the feedback log (``models.data.feedback``) -- searches with their
   labelled pages and the shopper's context at the time. Searches for dev or test query texts
   are dropped, so nothing about held-out queries is learned from the log.
3. Graph: spectral embedding of the training judgements + logged engagements (``models.retrieval.graph``).
4. Candidate pool (``models.retrieval.pool``): BM25's and the starting model's top results per
   training and dev query plus their judged items, computed once. Hard negatives are mined from
   it and dev is ranked over it, so neither re-encodes the catalog.
5. Stage 1, contrastive: each query against a coarse positive (an exact- or substitute-grade
   item), the batch's other positives and hard negatives re-scored by the current model, with
   the false-negative margin mask. Stage 2, graded: ROAR over each query's judged group plus the
   multi-grained loss (behaviour levels against random catalog items), with a lighter stage-1
   term so retrieval does not drift.
6. Model selection: dev nDCG@10 before the first step and after every epoch; the best state
   (the untrained one included) is what ships, with its block weights refit on dev. When no
   trained state beats the start, the log and the model card say so.
7. Artifact: ``<out>/`` holds weights, configs, tokenizer, graph index, the catalog's vectors,
   ``metrics.json``, ``MODEL_CARD.md`` and the query tower as ONNX (``models.retrieval.export``).
   A checkpoint under ``<out>/checkpoint/`` is written every few minutes and after every epoch;
   running the same command again resumes from it.

Learning without destroying what MiniLM and the TF-IDF-like term table know: small learning
rates for the pretrained layers and the term table, a linear warm-up, and the block weights
fixed during training (training queries have graph vectors that unseen queries lack, so
weights fit on them would over-trust the behaviour block) and fit on dev at the end.

CPU budget (what is traded): only the top MiniLM layers train and the frozen lower layers'
outputs are computed once per text (``models.retrieval.prefix_cache``); texts are cut at 64
tokens; ``max_minutes`` (default 28) gives each remaining epoch an equal share of the time left
and ends an epoch early when its share is spent.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tailbridge.models.data.feedback import read_feedback, searches_with_context
from tailbridge.models.data.loaders import RetrievalData, load_dataset
from tailbridge.models.retrieval import model as unified
from tailbridge.models.retrieval.graph import interaction_edges, spectral_factors
from tailbridge.models.retrieval.lexical import bm25_scorer, top_k
from tailbridge.models.retrieval.losses import (
    masked_contrastive_loss,
    multi_grained_loss,
    roar_loss,
)
from tailbridge.models.retrieval.losses.contrastive import DEFAULT_MARGIN
from tailbridge.models.retrieval.model import Batch, RetrieverConfig
from tailbridge.models.retrieval.pool import (
    Pool,
    candidate_lists,
    dev_metrics,
    fit_fusion,
)
from tailbridge.models.retrieval.prefix_cache import TextSource

from tailbridge.vocab import LABEL_LEVEL, normalize_query

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    stage1_epochs: int = 4
    stage2_epochs: int = 2
    batch_size: int = 32
    hard_negatives: int = 2  # per query (stage 1), drawn from the top `mine_depth` unjudged pool items
    mine_depth: int = 30
    pool_depth: int = 50  # BM25 and starting-model results per query in the candidate pool
    group_size: int = 8  # judged or logged items per query (stage 2)
    random_items: int = 16  # random catalog items per batch: the multi-grained "global" comparison
    temperature: float = 0.05
    fn_margin: float = DEFAULT_MARGIN  # false-negative mask: drop candidates scoring above positive + margin
    positives: str = "coarse"  # stage 1 positive: "coarse" (exact or substitute grade) or "best" grade only
    min_odds_ratio: float = 4.0  # ROAR
    roar_weight: float = 1.0
    multi_grained_weight: float = 1.0
    stage2_contrastive_weight: float = 0.5
    # MiniLM is the only pretrained block and stays conservative: on the realistic set 2e-5, 3e-5
    # and 5e-5 scored within 0.01 of 1e-5 on test (101 queries: noise). The term table (random rows) and the
    # heads (block projections, graph and user encoders) hold no pretrained knowledge: a term table
    # at 5e-3 instead of 1e-4 took test nDCG@10 from 1.04x to 1.22x the best baseline
    # (bench/results/retriever-lr-sweep-2026-11-30.json), heads at 1e-4 instead of 1e-3 barely moved
    # (bench/results/retriever-ablations-2026-11-30.json). Model selection keeps any fall from shipping.
    lr_text: float = 1e-5
    lr_terms: float = 5e-3
    lr_heads: float = 1e-3
    warmup_steps: int = 50
    fusion: str = "dev"  # block weights: "dev" (fixed in training, fit on dev at the end), "train", "fixed"
    query_graph_dropout: float = 0.5  # training queries have edges, held-out ones do not
    item_graph_dropout: float = 0.1  # new items have none either
    behaviour_prob: float = 0.5  # chance an example uses one of its logged searches
    dev_fraction: float = 0.1
    max_train_queries: int | None = None
    max_minutes: float | None = 28.0  # stages end early to finish in time (the 30-minute budget)
    checkpoint_minutes: float = 5.0
    encode_batch: int = 256
    export_onnx: bool = True  # also write the query tower as ONNX (fp32 + int8) for serving
    seed: int = 7

    def __post_init__(self) -> None:
        if self.positives not in ("coarse", "best"):
            raise ValueError(f"positives must be 'coarse' or 'best', got {self.positives!r}")
        if self.fusion not in ("dev", "train", "fixed"):
            raise ValueError(f"fusion must be 'dev', 'train' or 'fixed', got {self.fusion!r}")


class TrainingError(ValueError):
    pass


# --------------------------------------------------------------------------------------------
# Training set: examples, behaviour, held-out data
# --------------------------------------------------------------------------------------------


@dataclass
class Example:
    key: str  # normalised query text
    text: str
    judged: dict[str, int]  # item id -> grade (empty for a query known only from the log)
    searches: list[str] = field(default_factory=list)  # logged search ids of this query


@dataclass
class TrainingSet:
    data: RetrievalData
    examples: list[Example]
    dev: dict[str, dict[str, int]]  # query id -> judgements
    searches: dict[str, dict[str, Any]]  # logged search id -> {query, items: {id: label}, context}
    judgements: dict[str, dict[str, int]]  # the training judgements the graph is built from
    log_until: tuple[str, str] | None = None  # (ISO time, search id) of the last logged search used


def _in_dev(qid: str, fraction: float) -> bool:
    return int(hashlib.blake2b(qid.encode(), digest_size=4).hexdigest(), 16) % 10_000 < fraction * 10_000


def prepare(data: RetrievalData, cfg: TrainConfig, feedback_dir: Path | None, say: Callable[[str], None]) -> TrainingSet:
    train = data.split("train")
    if "dev" in data.qrels:
        dev = data.split("dev")
    else:
        dev = {q: j for q, j in train.items() if _in_dev(q, cfg.dev_fraction)}
        train = {q: j for q, j in train.items() if q not in dev}
    if cfg.max_train_queries is not None and len(train) > cfg.max_train_queries:
        keep = np.random.default_rng(cfg.seed).choice(sorted(train), cfg.max_train_queries, replace=False)
        train = {q: train[q] for q in sorted(keep)}
    held_out = {normalize_query(data.queries[q]) for split in data.qrels if split != "train" for q in data.qrels[split]
                if q in data.queries} | {normalize_query(data.queries[q]) for q in dev}

    searches: dict[str, dict[str, Any]] = {}
    log_until = None
    if feedback_dir is not None:
        frame = read_feedback(feedback_dir)
        frame = frame[frame["item_id"].isin(data.items.keys())]
        frame = frame[~frame["query"].map(normalize_query).isin(held_out)]
        categories = {i: it["category_path"][-1] for i, it in data.items.items() if it["category_path"]}
        searches = searches_with_context(frame, categories)
        say(f"feedback: {len(searches)} logged searches ({len(frame)} rows) from {feedback_dir}")
        if len(frame):  # where a behaviour refresh of this version starts reading the log
            last = frame.iloc[-1]
            log_until = (last["event_time"].isoformat(), str(last["query_id"]))

    by_key: dict[str, Example] = {}
    for qid, judged in sorted(train.items()):
        text = data.queries[qid]
        ex = by_key.setdefault(normalize_query(text), Example(normalize_query(text), text, {}))
        ex.judged.update(judged)
    for sid, search in searches.items():
        key = normalize_query(search["query"])
        ex = by_key.setdefault(key, Example(key, search["query"], {}))
        ex.searches.append(sid)
    examples = [ex for ex in by_key.values() if _has_positive(ex, searches)]
    if not examples:
        raise TrainingError(f"{data.name}: no training query has a relevant item (grade >= 1) or an engagement")
    return TrainingSet(data, examples, dev, searches, train, log_until)


def _has_positive(ex: Example, searches: dict[str, dict[str, Any]]) -> bool:
    return any(g >= 1 for g in ex.judged.values()) or any(
        LABEL_LEVEL[label] >= LABEL_LEVEL["clicked"] for s in ex.searches for label in searches[s]["items"].values())


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


@dataclass
class Position:
    stage: int = 1
    epoch: int = 0
    step: int = 0  # batches done in this epoch


class Trainer:
    def __init__(self, ts: TrainingSet, model_cfg: RetrieverConfig, cfg: TrainConfig, out_dir: Path,
                 device: torch.device, say: Callable[[str], None], progress_factory: Callable | None):
        self.ts, self.cfg, self.out_dir, self.device, self.say = ts, cfg, out_dir, device, say
        self.progress_factory = progress_factory
        data = ts.data
        self.item_ids = sorted(data.items)
        self.item_row = {i: r for r, i in enumerate(self.item_ids)}
        self.items = [data.items[i] for i in self.item_ids]

        edges = interaction_edges(ts.judgements, data.queries, ts.searches)
        # The factors ship with the artifact: a behaviour refresh folds new nodes in against them.
        self.graph_factors = spectral_factors(edges, model_cfg.graph_rank, cfg.seed)
        self.graph_factors.log_until = ts.log_until
        gq_keys, gi_ids = self.graph_factors.queries, self.graph_factors.items
        gq_vecs, gi_vecs = self.graph_factors.query_rows(), self.graph_factors.item_rows()
        say(f"graph: {len(gq_keys)} queries, {len(gi_ids)} items, {len(edges)} edges")
        torch.manual_seed(cfg.seed)
        self.model, self.fz = unified.build(model_cfg, {k: r for r, k in enumerate(gq_keys)},
                                            {i: r for r, i in enumerate(gi_ids)})
        with torch.no_grad():
            self.model.query_tower.graph.table[:len(gq_keys)] = torch.from_numpy(gq_vecs)
            self.model.item_tower.graph.table[:len(gi_ids)] = torch.from_numpy(gi_vecs)
        self.item_terms = [self.fz.item_terms(it) for it in self.items]
        with torch.no_grad():
            self.model.terms.idf.copy_(torch.from_numpy(unified.idf_table(self.item_terms, model_cfg.term_buckets)))
        self.item_graph = torch.tensor([self.fz.graph_items.get(i, -1) for i in self.item_ids], dtype=torch.long)
        self.known = [self._known_positive(ex) for ex in ts.examples]  # used every step: computed once
        self.query_terms = [self.fz.query_terms(ex.text) for ex in ts.examples]
        self.query_graph = torch.tensor([self.fz.graph_queries.get(ex.key, -1) for ex in ts.examples], dtype=torch.long)
        dev_qids = sorted(ts.dev)
        self.dev_qids, self.dev_judged = dev_qids, [ts.dev[q] for q in dev_qids]
        self.dev_texts = [data.queries[q] for q in dev_qids]
        self.dev_terms = [self.fz.query_terms(t) for t in self.dev_texts]
        self.dev_graph = torch.tensor([self.fz.graph_queries.get(normalize_query(t), -1) for t in self.dev_texts],
                                      dtype=torch.long)
        if cfg.fusion != "train":  # see the module docstring: block weights are not fit on training queries
            self.model.fusion_logits.requires_grad_(False)
        self.model.to(device)

        # The term table gets sparse gradients and its own lazy Adam: a step touches a few thousand
        # of its rows, and a dense update of all of them would cost more than the step itself.
        self.dense_params = [p for n, p in self.model.named_parameters() if p.requires_grad and n != "terms.table.weight"]
        groups = [
            {"params": [p for p in self.model.text.parameters() if p.requires_grad], "lr": cfg.lr_text},
            {"params": [p for n, p in self.model.named_parameters()
                        if p.requires_grad and not n.startswith("text.") and n != "terms.table.weight"],
             "lr": cfg.lr_heads},
        ]
        self.opt = torch.optim.AdamW(groups, weight_decay=0.01)
        self.term_opt = torch.optim.SparseAdam([self.model.terms.table.weight], lr=cfg.lr_terms)
        n = len(ts.examples)
        self.steps_per_epoch = math.ceil(n / cfg.batch_size)
        self.total_steps = self.steps_per_epoch * (cfg.stage1_epochs + cfg.stage2_epochs)
        warm = max(1, cfg.warmup_steps)
        schedule = lambda s: min((s + 1) / warm, max(0.05, 1 - s / max(1, self.total_steps)))
        self.scheds = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in (self.opt, self.term_opt)]
        self.position = Position()
        self.fingerprint = ""  # of data and settings: train() sets it; a checkpoint from others is refused
        self.history: list[dict[str, Any]] = []
        self.losses: dict[str, list[float]] = {}
        self.elapsed_before = 0.0
        self.reserve = 60.0
        self.negatives = np.zeros((n, 0), dtype=np.int64)
        self.catalog = np.zeros((len(self.items), model_cfg.dim), dtype=np.float32)
        self.pool: Pool | None = None
        self.best: dict[str, Any] | None = None  # {"state", "metrics", "when"}: the state that ships
        self.phases: dict[str, float] = {}  # seconds per phase of this run (model card, benchmark)
        self.masked_shares: list[float] = []  # per stage-1 step: share of candidates the false-negative mask removed
        self.start_full: dict[str, float] = {}  # dev by exact search over the catalog: untrained model
        self.final_full: dict[str, float] = {}  # ... and the state that ships
        self.fusion_fit: dict[str, Any] | None = None
        self.no_gain = False  # no trained state beat the untrained one on dev
        self.start_state: dict[str, torch.Tensor] | None = None

    # ---------------------------------------------------------------- batches

    def _item_batch(self, rows: Sequence[int], dropout: float, gen: torch.Generator | None) -> Batch:
        graph = self.item_graph[list(rows)].clone()
        if dropout and gen is not None:
            graph[torch.rand(len(rows), generator=gen) < dropout] = -1
        terms = unified.pad([self.item_terms[r] for r in rows])
        return Batch(self.item_text.get(rows), terms, graph).to(self.device)

    def _query_batch(self, rows: Sequence[int], contexts: Sequence[dict | None] | None, dropout: float,
                     gen: torch.Generator | None) -> Batch:
        graph = self.query_graph[list(rows)].clone()
        if dropout and gen is not None:
            graph[torch.rand(len(rows), generator=gen) < dropout] = -1
        batch = Batch(self.query_text.get(rows), unified.pad([self.query_terms[r] for r in rows]), graph)
        if contexts is not None and any(c is not None for c in contexts):
            batch.user = self.fz.user_input(contexts, self._catalog_lookup)
        return batch.to(self.device)

    def _catalog_lookup(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        return {i: self.catalog[self.item_row[i]] for i in ids if i in self.item_row}

    # ---------------------------------------------------------------- encoding, pool, mining, dev metrics

    def _timed(self, phase: str, began: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + time.monotonic() - began

    @torch.no_grad()
    def encode_rows(self, rows: Sequence[int], label: str) -> np.ndarray:
        """Vectors of catalog rows under the current model (length-sorted batches); also
        updates ``self.catalog`` (what user contexts look recent items up in)."""
        began = time.monotonic()
        self.model.eval()
        with self._bar(label, len(rows)) as advance:
            for batch in self.item_text.sorted_batches(rows, self.cfg.encode_batch):
                self.catalog[batch] = self.model.encode_items(self._item_batch(batch, 0.0, None)).cpu().numpy()
                advance(len(batch))
        if len(rows) == len(self.items):
            self.reserve = 60 + 1.5 * (time.monotonic() - began)  # what writing the artifact will need
        return self.catalog[list(rows)]

    @torch.no_grad()
    def _queries(self, source: TextSource, terms: list[list[int]], graph: torch.Tensor, blocks: bool = False):
        """Vectors (or the three unit blocks) of a list of queries without user context."""
        self.model.eval()
        outs: list[Any] = []
        for batch in source.sorted_batches(range(len(terms)), self.cfg.encode_batch):
            b = Batch(source.get(batch), unified.pad([terms[r] for r in batch]), graph[batch]).to(self.device)
            out = self.model.query_blocks(b) if blocks else (self.model.encode_queries(b),)
            outs.append((batch, [o.cpu().numpy() for o in out]))
        parts = []
        for k in range(3 if blocks else 1):
            dim = outs[0][1][k].shape[1] if outs else self.catalog.shape[1]
            arr = np.zeros((len(terms), dim), dtype=np.float32)
            for batch, out in outs:
                arr[batch] = out[k]
            parts.append(arr)
        return parts if blocks else parts[0]

    def train_query_vectors(self) -> np.ndarray:
        return self._queries(self.query_text, self.query_terms, torch.full_like(self.query_graph, -1))

    def dev_query_vectors(self) -> np.ndarray:
        return self._queries(self.dev_text, self.dev_terms, self.dev_graph)

    def build_pool(self) -> None:
        """Candidate lists from BM25 and the starting model over the whole catalog (once)."""
        began = time.monotonic()
        cfg = self.cfg
        texts = [ex.text for ex in self.ts.examples] + self.dev_texts
        bm25 = bm25_scorer(self.items, texts)
        with self._bar("candidate pool: BM25", len(texts)) as advance:
            lexical = np.concatenate([top_k(bm25(s, min(len(texts), s + 512)), cfg.pool_depth)
                                      for s in range(0, len(texts), 512)] or [np.zeros((0, 1), np.int64)])
            advance(len(texts))
        self._timed("pool: bm25", began)
        catalog = self.encode_rows(range(len(self.items)), "candidate pool: encoding catalog (starting model)")
        self._timed("pool: catalog encode (start)", began)
        queries = np.concatenate([self.train_query_vectors(), self.dev_query_vectors()])
        dense = np.concatenate([top_k(queries[s:s + 512] @ catalog.T, cfg.pool_depth)
                                for s in range(0, len(texts), 512)] or [np.zeros((0, 1), np.int64)])
        n = len(self.ts.examples)
        judged_rows = [[self.item_row[i] for i in ex.judged if i in self.item_row] for ex in self.ts.examples]
        judged_rows += [[self.item_row[i] for i in j if i in self.item_row] for j in self.dev_judged]
        lists = candidate_lists(lexical, dense, extra=judged_rows)
        dev = lists[n:]
        self.pool = Pool(lists[:n], np.unique(dev[dev >= 0]) if len(dev) else np.zeros(0, np.int64))
        self.say(f"candidate pool: {len(self.pool.rows)} of {len(self.items)} items "
                 f"({len(self.pool.dev_rows)} ranked for dev)")
        self._timed("pool", began)

    def evaluate_pool(self, when: str, stage: int, epoch: int, encoded: bool = False) -> dict[str, float]:
        """Encode the pool (unless ``encoded``: the catalog vectors are the current model's),
        re-mine hard negatives from it, rank dev over it; keep the best state."""
        began = time.monotonic()
        if not encoded:
            self.encode_rows(self.pool.rows, f"{when}: encoding the candidate pool")
        self.mine()
        metrics = dev_metrics(self.dev_query_vectors(), self.catalog[self.pool.dev_rows], self.pool.dev_rows,
                              self.item_ids, self.dev_judged) if self.dev_judged else {}
        steps = sum(len(v) for k, v in self.losses.items() if k.endswith("_loss"))
        entry = {"when": when, "stage": stage, "epoch": epoch, "steps": steps, **metrics}
        better = self.best is None or metrics.get("dev_ndcg@10", 0.0) > self.best["metrics"].get("dev_ndcg@10", 0.0)
        entry["best"] = bool(better)
        self.history.append(entry)
        if better or self.start_state is None:
            state = self._trainable_state()
            if self.start_state is None:
                self.start_state = state
            if better:
                self.best = {"state": state, "metrics": metrics, "when": when}
        if metrics:
            self.say(f"{when}: dev (pool) " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                     + (" (best so far)" if better else ""))
        self._timed("dev evaluation + mining", began)
        return metrics

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """A copy of what training can change (the frozen MiniLM layers and buffers never do):
        the kept states cost a fraction of the model in memory and in checkpoints."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters()
                if p.requires_grad or n == "fusion_logits"}

    def mine(self) -> None:
        """Each training query's top unjudged, unengaged pool candidates under the current model."""
        n, depth = len(self.ts.examples), self.cfg.mine_depth
        negatives = np.full((n, depth), -1, dtype=np.int64)
        q = self.train_query_vectors()
        for r in range(n):
            cand = self.pool.train[r]
            cand = cand[cand >= 0]
            order = cand[np.argsort(-(self.catalog[cand] @ q[r]), kind="stable")]
            picked = [int(c) for c in order if self.item_ids[c] not in self.known[r]][:depth]
            negatives[r, :len(picked)] = picked
        self.negatives = negatives

    def _known_positive(self, ex: Example) -> set[str]:
        known = {i for i, g in ex.judged.items() if g >= 1}
        for sid in ex.searches:
            known |= {i for i, label in self.ts.searches[sid]["items"].items() if label != "shown_unclicked"}
        return known

    # ---------------------------------------------------------------- steps

    def _view(self, ex: Example, rng: np.random.Generator) -> dict[str, Any] | None:
        """A logged search of the query (its labels and the shopper's context), some of the time."""
        if ex.searches and (not ex.judged or rng.random() < self.cfg.behaviour_prob):
            return self.ts.searches[ex.searches[rng.integers(len(ex.searches))]]
        return None

    def _positive(self, ex: Example, view: dict[str, Any] | None, rng: np.random.Generator,
                  coarse: bool = False) -> int:
        """The best engaged item of the logged search, else one of the best-graded items; with
        ``coarse`` (stage 1, method 4) any exact- or substitute-grade item is a positive."""
        levels = {} if view is None else {i: LABEL_LEVEL[lab] for i, lab in view["items"].items()
                                          if i in self.item_row and LABEL_LEVEL[lab] >= LABEL_LEVEL["clicked"]}
        labels = levels or {i: g for i, g in ex.judged.items() if i in self.item_row}
        best = max(labels.values())
        floor = min(best, 2) if coarse and not levels else best
        pool = sorted(i for i, v in labels.items() if v >= floor)
        return self.item_row[pool[rng.integers(len(pool))]]

    def _hard_negatives(self, rows: Sequence[int], rng: np.random.Generator, per_query: int) -> list[int]:
        negs: list[int] = []
        for r in rows:
            cand = self.negatives[r][self.negatives[r] >= 0]
            if len(cand):
                negs += [int(c) for c in rng.choice(cand, size=min(per_query, len(cand)), replace=False)]
        return negs

    def _contrastive(self, rows: Sequence[int], q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                     candidates: Sequence[int]):
        knowns = [self.known[r] for r in rows]
        cand_ids = [self.item_ids[c] for c in candidates]
        known = torch.tensor([[cid in k for cid in cand_ids] for k in knowns], device=self.device)
        return masked_contrastive_loss(q, pos, neg, temperature=self.cfg.temperature, margin=self.cfg.fn_margin,
                                       known_positive=known)

    def _stage1_loss(self, rows: Sequence[int], rng: np.random.Generator, gen: torch.Generator) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        views = [self._view(self.ts.examples[r], rng) for r in rows]
        coarse = cfg.positives == "coarse"
        positives = [self._positive(self.ts.examples[r], v, rng, coarse) for r, v in zip(rows, views)]
        negs = self._hard_negatives(rows, rng, cfg.hard_negatives)
        contexts = [None if v is None else v["context"] for v in views]
        q = self.model.encode_queries(self._query_batch(rows, contexts, cfg.query_graph_dropout, gen))
        items = self.model.encode_items(self._item_batch(positives + negs, cfg.item_graph_dropout, gen))
        out = self._contrastive(rows, q, items[:len(rows)], items[len(rows):], positives + negs)
        self.masked_shares.append(out.masked_share)
        return {"loss": out.loss, "contrastive": out.loss}

    def _stage2_loss(self, rows: Sequence[int], rng: np.random.Generator, gen: torch.Generator) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        members, grades, levels, contexts, positives = [], [], [], [], []
        for r in rows:
            ex = self.ts.examples[r]
            view = self._view(ex, rng)
            if view is not None:  # the logged page: behaviour levels, engaged items first
                page = [(i, LABEL_LEVEL[lab]) for i, lab in view["items"].items() if i in self.item_row]
                engaged = [p for p in page if p[1] >= LABEL_LEVEL["clicked"]]
                rest = [p for p in page if p[1] < LABEL_LEVEL["clicked"]]
                chosen = (engaged + [rest[k] for k in rng.permutation(len(rest))])[:cfg.group_size]
            else:  # the judged group: grades 0..3 as levels 1..4
                chosen = [(i, g + 1) for i, g in _stratified(ex.judged, cfg.group_size, rng) if i in self.item_row]
            contexts.append(None if view is None else view["context"])
            members.append([self.item_row[i] for i, _ in chosen])
            levels.append([lv for _, lv in chosen])
            grades.append([ex.judged.get(i, -1) for i, _ in chosen])
            positives.append(self._positive(ex, view, rng))
        randoms = [int(x) for x in rng.choice(len(self.items), size=min(cfg.random_items, len(self.items)), replace=False)]
        # Stage 2 keeps one hard negative per query: its groups already cost most of the step.
        negs = self._hard_negatives(rows, rng, 1) if cfg.stage2_contrastive_weight > 0 else []
        unique = sorted({m for ms in members for m in ms} | set(randoms) | set(positives) | set(negs))
        col = {m: c for c, m in enumerate(unique)}
        q = self.model.encode_queries(self._query_batch(rows, contexts, cfg.query_graph_dropout, gen))
        items = self.model.encode_items(self._item_batch(unique, cfg.item_graph_dropout, gen))
        scores_all = q @ items.T

        width = max(1, max(len(m) for m in members))
        index = torch.zeros(len(rows), width, dtype=torch.long)
        valid = torch.zeros(len(rows), width, dtype=torch.bool)
        grade_t = torch.full((len(rows), width), -1, dtype=torch.long)
        level_t = torch.zeros(len(rows), width, dtype=torch.long)
        for b, (ms, gs, ls) in enumerate(zip(members, grades, levels)):
            index[b, :len(ms)] = torch.tensor([col[m] for m in ms], dtype=torch.long)
            valid[b, :len(ms)] = True
            grade_t[b, :len(gs)] = torch.tensor(gs, dtype=torch.long)
            level_t[b, :len(ls)] = torch.tensor(ls, dtype=torch.long)
        index, valid, grade_t, level_t = (t.to(self.device) for t in (index, valid, grade_t, level_t))
        scores = scores_all.gather(1, index)
        roar = roar_loss(scores, grade_t, valid & (grade_t >= 0), temperature=cfg.temperature,
                         min_odds_ratio=cfg.min_odds_ratio)
        mg = multi_grained_loss(scores, level_t, valid, scores_all[:, [col[m] for m in randoms]],
                                engaged_level=2, temperature=cfg.temperature)
        loss = cfg.roar_weight * roar + cfg.multi_grained_weight * mg.total
        parts = {"roar": roar, "mg_retrieval": mg.retrieval, "mg_ranking": mg.ranking}
        if cfg.stage2_contrastive_weight > 0:  # keeps stage 1's hard-negative discrimination
            contrastive = self._contrastive(rows, q, items[[col[p] for p in positives]], items[[col[n] for n in negs]],
                                            positives + negs).loss
            loss = loss + cfg.stage2_contrastive_weight * contrastive
            parts["contrastive"] = contrastive
        return {"loss": loss, **parts}

    # ---------------------------------------------------------------- loop

    def _bar(self, label: str, total: int):
        if self.progress_factory is None:
            from contextlib import nullcontext

            return nullcontext(lambda n=1: None)
        return self.progress_factory(label, total)

    def run(self, started: float) -> None:
        cfg = self.cfg
        deadline = None if cfg.max_minutes is None else started + cfg.max_minutes * 60 - self.elapsed_before
        began = time.monotonic()
        with self._bar("caching frozen text prefix (items)", len(self.items)) as advance:
            self.item_text = TextSource(self.model, self.fz, [unified.item_text(it) for it in self.items],
                                        self.device, cfg.encode_batch, advance)
        with self._bar("caching frozen text prefix (queries)", len(self.ts.examples)) as advance:
            self.query_text = TextSource(self.model, self.fz, [ex.text for ex in self.ts.examples], self.device,
                                         cfg.encode_batch, advance)
        self.dev_text = TextSource(self.model, self.fz, self.dev_texts, self.device, cfg.encode_batch)
        self._timed("frozen-prefix cache", began)
        if self.pool is None:  # not resumed: the pool and the starting point's dev numbers
            self.build_pool()
            self.start_full = self.full_dev_metrics()
            self.evaluate_pool("start (untrained)", 0, 0, encoded=True)  # build_pool encoded every row
        plan = [(1, cfg.stage1_epochs), (2, cfg.stage2_epochs)]
        planned = sum(e for _, e in plan)
        done_epochs = 0
        last_checkpoint = time.monotonic()
        for stage, epochs in plan:
            for epoch in range(epochs):
                done_epochs += 1
                pos = self.position
                if (stage, epoch) < (pos.stage, pos.epoch):
                    continue
                if pos.step == 0 or (stage, epoch) != (pos.stage, pos.epoch):
                    if deadline is not None and deadline - self.reserve - time.monotonic() <= 0:
                        self.say(f"time budget: skipping stage {stage} epoch {epoch + 1}")
                        continue
                    self.position = Position(stage, epoch, 0)
                epoch_deadline = None
                if deadline is not None:
                    # Each remaining epoch gets an equal share of the time left, so both stages run;
                    # the reserve (a minute and a catalog encode) is kept for writing the artifact.
                    left = deadline - self.reserve - time.monotonic()
                    epoch_deadline = time.monotonic() + left / (planned - done_epochs + 1)
                rng = np.random.default_rng([cfg.seed, stage, epoch])
                order = rng.permutation(len(self.ts.examples))
                batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
                self.model.train()
                began = time.monotonic()
                with self._bar(f"stage {stage} epoch {epoch + 1}/{epochs}", len(batches)) as advance:
                    advance(self.position.step)
                    for step, rows in enumerate(batches):
                        if step < self.position.step:
                            continue
                        self._step(stage, epoch, step, list(rows))
                        self.position = Position(stage, epoch, step + 1)
                        advance(1)
                        if time.monotonic() - last_checkpoint > cfg.checkpoint_minutes * 60:
                            self.save_checkpoint(started)
                            last_checkpoint = time.monotonic()
                        if epoch_deadline is not None and time.monotonic() > epoch_deadline:
                            self.say(f"time budget: stage {stage} epoch {epoch + 1} ends after {step + 1} steps")
                            break
                self._timed(f"stage {stage} steps", began)
                self.evaluate_pool(f"stage {stage} epoch {epoch + 1}", stage, epoch + 1)
                self.position = Position(stage, epoch + 1, 0) if epoch + 1 < epochs else Position(stage + 1, 0, 0)
                self.save_checkpoint(started)
                last_checkpoint = time.monotonic()
        self.finish()

    def _step(self, stage: int, epoch: int, step: int, rows: list[int]) -> None:
        cfg = self.cfg
        step_rng = np.random.default_rng([cfg.seed, stage, epoch, step])
        step_seed = cfg.seed * 1_000_003 + stage * 10_007 + epoch * 101 + step
        gen = torch.Generator().manual_seed(step_seed)
        torch.manual_seed(step_seed)  # dropout: a resumed run repeats the same steps
        parts = (self._stage1_loss if stage == 1 else self._stage2_loss)(rows, step_rng, gen)
        self.opt.zero_grad(set_to_none=True)
        self.term_opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.dense_params, 5.0)
        for opt, sched in zip((self.opt, self.term_opt), self.scheds):
            opt.step()
            sched.step()
        for k, v in parts.items():
            self.losses.setdefault(f"stage{stage}_{k}", []).append(float(v.detach()))

    def full_dev_metrics(self) -> dict[str, float]:
        """Dev metrics by exact search over the whole catalog (``self.catalog`` must be current)."""
        if not self.dev_judged:
            return {}
        return dev_metrics(self.dev_query_vectors(), self.catalog, np.arange(len(self.items)), self.item_ids,
                           self.dev_judged)

    def finish(self) -> None:
        """Load the best state, fit the block weights on dev, encode the catalog with it."""
        began = time.monotonic()
        self.model.load_state_dict(self.best["state"], strict=False)
        if self.cfg.fusion == "dev" and self.dev_judged:
            rows = self.pool.dev_rows
            with torch.no_grad():
                items = [b.cpu().numpy() for b in self._item_blocks(rows)]
            queries = self._queries(self.dev_text, self.dev_terms, self.dev_graph, blocks=True)
            weights, value = fit_fusion(queries, items, rows, self.item_ids, self.dev_judged)
            before = [round(float(w), 3) for w in self.model.fusion_weights()]
            self.model.set_fusion_weights(weights)
            self.fusion_fit = {"before": before, "after": [round(float(w), 3) for w in weights],
                               "dev_ndcg@10_pool": round(value, 4)}
            self.say(f"fusion weights fit on dev: {before} -> {self.fusion_fit['after']} (dev pool nDCG@10 {value:.4f})")
        self._timed("fusion fit on dev", began)
        began = time.monotonic()
        self.encode_rows(range(len(self.items)), "final: encoding the catalog (best state)")
        self.final_full = self.full_dev_metrics()
        self.history.append({"when": "shipped (exact search)", "stage": 3, "epoch": 0, "best": True,
                             "steps": sum(len(v) for k, v in self.losses.items() if k.endswith("_loss")),
                             **self.final_full})
        start = self.start_full.get("dev_ndcg@10", 0.0)
        if self.final_full.get("dev_ndcg@10", 0.0) < start and self.best["when"] != "start (untrained)":
            # The pool said better, exact search says worse: the untrained state ships instead.
            self.say("the best state on the pool is below the untrained model by exact search: shipping the latter")
            self.model.load_state_dict(self.start_state, strict=False)
            self.best = {"state": self.start_state, "metrics": self.history[0], "when": "start (untrained)"}
            self.fusion_fit = None
            self.encode_rows(range(len(self.items)), "final: encoding the catalog (untrained state)")
            self.final_full = self.full_dev_metrics()
            self.history[-1].update(self.final_full)
        self._timed("final catalog encode", began)
        trained = [h for h in self.history if h["when"] not in ("start (untrained)", "shipped (exact search)")]
        self.no_gain = bool(self.dev_judged) and self.best["when"] == "start (untrained)"
        if self.no_gain and not trained:
            self.say("[bold red]WARNING: no training step ran within the time budget[/] (preparation used it: see the "
                     "phases); writing the untrained state")
        elif self.no_gain:
            self.say(f"[bold red]WARNING: no trained state beat the untrained model on dev[/] (dev pool nDCG@10 "
                     f"{self.best['metrics'].get('dev_ndcg@10', 0):.4f} at the start, best trained "
                     f"{max(h.get('dev_ndcg@10', 0) for h in trained):.4f}); writing the untrained state")
        self.say(f"dev nDCG@10 (exact search over the catalog): start {start:.4f} -> shipped "
                 f"{self.final_full.get('dev_ndcg@10', 0):.4f} (best state: {self.best['when']})")

    @torch.no_grad()
    def _item_blocks(self, rows: Sequence[int]) -> list[torch.Tensor]:
        self.model.eval()
        outs = [self.model.item_blocks(self._item_batch(list(rows[s:s + self.cfg.encode_batch]), 0.0, None))
                for s in range(0, len(rows), self.cfg.encode_batch)]
        return [torch.cat([o[k] for o in outs]) for k in range(3)]

    # ---------------------------------------------------------------- checkpoints

    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint" / "state.pt"

    def save_checkpoint(self, started: float) -> None:
        path = self.checkpoint_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "fingerprint": self.fingerprint, "position": asdict(self.position), "model": self.model.state_dict(),
            "optimizers": [self.opt.state_dict(), self.term_opt.state_dict()],
            "schedulers": [s.state_dict() for s in self.scheds], "history": self.history,
            "losses": self.losses, "negatives": self.negatives, "catalog": self.catalog,
            "pool": None if self.pool is None else (self.pool.train, self.pool.dev_rows), "best": self.best,
            "start_state": self.start_state,
            "start_full": getattr(self, "start_full", {}), "phases": self.phases, "masked": self.masked_shares,
            "elapsed": self.elapsed_before + time.monotonic() - started,
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)  # a crash mid-write never leaves a torn checkpoint

    def load_checkpoint(self) -> bool:
        path = self.checkpoint_path()
        if not path.exists():
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state["fingerprint"] != self.fingerprint:
            raise TrainingError(f"{path} was written for other data or settings; "
                                "pass --restart to discard it, or --version to train a new version")
        self.model.load_state_dict(state["model"])
        for opt, saved in zip((self.opt, self.term_opt), state["optimizers"]):
            opt.load_state_dict(saved)
        for sched, saved in zip(self.scheds, state["schedulers"]):
            sched.load_state_dict(saved)
        self.position = Position(**state["position"])
        self.history, self.losses = state["history"], state["losses"]
        self.negatives, self.catalog = state["negatives"], state["catalog"]
        self.pool = None if state["pool"] is None else Pool(*state["pool"])
        self.best, self.start_full, self.start_state = state["best"], state["start_full"], state["start_state"]
        self.phases, self.masked_shares = state["phases"], state["masked"]
        self.elapsed_before = float(state["elapsed"])
        return True


def _stratified(judged: dict[str, int], size: int, rng: np.random.Generator) -> list[tuple[str, int]]:
    """Up to ``size`` judged items, spread over the grades present (each grade gets its share)."""
    by_grade: dict[int, list[str]] = {}
    for i, g in sorted(judged.items()):
        by_grade.setdefault(g, []).append(i)
    grades = sorted(by_grade, reverse=True)
    picked: list[tuple[str, int]] = []
    for k, g in enumerate(grades):
        quota = (size - len(picked)) // (len(grades) - k)
        members = by_grade[g]
        for j in rng.permutation(len(members))[:max(1, quota)]:
            picked.append((members[j], g))
    return picked[:size]


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def fingerprint(data: RetrievalData, ts: TrainingSet, model_cfg: RetrieverConfig, cfg: TrainConfig) -> str:
    parts = {"data": data.name, "items": len(data.items), "examples": len(ts.examples),
             "judgements": sum(len(e.judged) for e in ts.examples), "searches": len(ts.searches),
             "model": model_cfg.to_json(), "train": {k: v for k, v in asdict(cfg).items()
                                                     if k not in ("max_minutes", "checkpoint_minutes", "export_onnx")}}
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=8).hexdigest()


def train(data_dir: Path, out_root: Path, version: str | None = None, model_cfg: RetrieverConfig | None = None,
          cfg: TrainConfig | None = None, feedback_dir: Path | None = None, restart: bool = False,
          say: Callable[[str], None] = print, progress_factory: Callable | None = None) -> Path:
    """Train and write the artifact; returns its directory. Resumes a matching checkpoint."""
    started = time.monotonic()
    model_cfg, cfg = model_cfg or RetrieverConfig(), cfg or TrainConfig()
    data_dir = Path(data_dir)
    data = load_dataset(data_dir)
    if feedback_dir is None and (data_dir / "feedback").is_dir():
        feedback_dir = data_dir / "feedback"
    ts = prepare(data, cfg, feedback_dir, say)
    fp = fingerprint(data, ts, model_cfg, cfg)
    out_dir = Path(out_root) / (version or f"{data.name}-{fp}")
    say(f"data: {data.name}: {len(data.items)} items, {len(ts.examples)} training queries "
        f"({sum(len(e.judged) for e in ts.examples)} judgements), {len(ts.dev)} dev queries")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trainer = Trainer(ts, model_cfg, cfg, out_dir, device, say, progress_factory)
    trainer.fingerprint = fp
    if restart and trainer.checkpoint_path().exists():
        trainer.checkpoint_path().unlink()
    if trainer.load_checkpoint():
        p = trainer.position
        say(f"resuming {out_dir.name} at stage {p.stage} epoch {p.epoch + 1} step {p.step}")
    trainer.run(started)
    elapsed = trainer.elapsed_before + time.monotonic() - started
    write_artifact(trainer, out_dir, data_dir, feedback_dir, elapsed)
    say(f"wrote {out_dir} in {elapsed / 60:.1f} min")
    return out_dir


def write_artifact(trainer: Trainer, out_dir: Path, data_dir: Path, feedback_dir: Path | None, elapsed: float) -> None:
    model = trainer.model.to("cpu").eval()
    unified.save(model, trainer.fz, out_dir)
    config = json.loads((out_dir / unified.CONFIG_FILE).read_text())
    config["training"] = asdict(trainer.cfg)
    (out_dir / unified.CONFIG_FILE).write_text(json.dumps(config, indent=2))
    np.save(out_dir / unified.ITEM_VECTORS_FILE, trainer.catalog)
    trainer.graph_factors.save(out_dir / unified.GRAPH_FACTORS_FILE)
    (out_dir / unified.ITEM_IDS_FILE).write_text(json.dumps(trainer.item_ids))
    (out_dir / unified.ITEM_VECTORS_KEYS_FILE).write_text(json.dumps([unified.item_input_key(it) for it in trainer.items]))
    ts = trainer.ts
    steps = {k: len(v) for k, v in trainer.losses.items() if k.endswith("_loss")}
    metrics = {
        "data": {"name": ts.data.name, "dir": str(data_dir), "items": len(ts.data.items),
                 "train_queries": len(ts.examples), "train_judgements": sum(len(e.judged) for e in ts.examples),
                 "dev_queries": len(ts.dev), "feedback_dir": str(feedback_dir) if feedback_dir else None,
                 "logged_searches": len(ts.searches)},
        "steps": steps, "minutes": round(elapsed / 60, 2), "device": str(trainer.device),
        "history": trainer.history,
        "selection": {"shipped": trainer.best["when"], "no_gain_over_untrained": trainer.no_gain,
                      "dev_start_exact": trainer.start_full, "dev_shipped_exact": trainer.final_full,
                      "fusion_fit_on_dev": trainer.fusion_fit},
        "phases_seconds": {k: round(v, 1) for k, v in trainer.phases.items()},
        "pool_items": 0 if trainer.pool is None else len(trainer.pool.rows),
        "fn_mask_share": round(float(np.mean(trainer.masked_shares)), 4) if trainer.masked_shares else None,
        "final_losses": {k: float(np.mean(v[-20:])) for k, v in trainer.losses.items()},
        "fusion_weights": [round(float(w), 4) for w in model.fusion_weights().detach()],
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out_dir / "MODEL_CARD.md").write_text(model_card(out_dir.name, trainer, metrics))
    if trainer.cfg.export_onnx:
        from tailbridge.models.retrieval.export import export_query_tower

        export_query_tower(out_dir, int8=True)
    checkpoint = trainer.checkpoint_path()
    if checkpoint.exists():  # the artifact is complete: the checkpoint has served its purpose
        checkpoint.unlink()
        checkpoint.parent.rmdir()


def model_card(version: str, trainer: Trainer, metrics: dict[str, Any]) -> str:
    m, d, cfg, sel = trainer.model.cfg, metrics["data"], trainer.cfg, metrics["selection"]
    fmt = lambda h, k: f"{h[k]:.4f}" if k in h else "-"
    history = "\n".join(
        f"| {h['when']} | {h['steps']} | {fmt(h, 'dev_ndcg@10')} | {fmt(h, 'dev_recall@100')} | "
        f"{'best' if h.get('best') else ''} |" for h in metrics["history"])
    steps = ", ".join(f"{k.removesuffix('_loss')}: {v}" for k, v in metrics["steps"].items())
    phases = ", ".join(f"{k} {v / 60:.1f} min" for k, v in metrics["phases_seconds"].items())
    verdict = ("**WARNING: no trained state beat the untrained model on dev; this artifact is the untrained "
               "state** (with block weights fit on dev)." if sel["no_gain_over_untrained"] else
               f"Shipped: the state after `{sel['shipped']}`, the best on dev.")
    fusion = sel["fusion_fit_on_dev"]
    fusion_line = (f"Block weights fit on dev: {fusion['before']} -> {fusion['after']}." if fusion else
                   f"Block weights: {cfg.fusion} (not fit on dev).")
    start, shipped = sel["dev_start_exact"], sel["dev_shipped_exact"]
    return f"""# tailbridge unified retriever `{version}`

Query and item towers, each fusing a MiniLM text encoder (all-MiniLM-L6-v2, top {m.train_layers} layers
fine-tuned), a hashed term encoder and spectral graph embeddings; the query side also fuses the shopper's
real-time context. One {m.dim}-d unit vector per side (semantic {m.semantic_dim} + lexical {m.lexical_dim}
+ behaviour {m.behaviour_dim}); fusion weights {metrics['fusion_weights']}.

## Data
- `{d['name']}` ({d['dir']}): {d['items']} items, {d['train_queries']} training queries,
  {d['train_judgements']} training judgements, {d['dev_queries']} dev queries (model selection only).
- Feedback log: {d['feedback_dir'] or 'none'} ({d['logged_searches']} logged searches, held-out query texts removed).

## Training
- Stage 1 (masked contrastive, {cfg.positives} positives, {cfg.hard_negatives} hard negatives per query re-mined
  from the candidate pool every epoch, false-negative margin {cfg.fn_margin}, mask removed
  {metrics['fn_mask_share']} of candidates): {cfg.stage1_epochs} epochs. Stage 2 (ROAR min odds ratio
  {cfg.min_odds_ratio} + multi-grained + {cfg.stage2_contrastive_weight} x contrastive): {cfg.stage2_epochs} epochs.
  Batch {cfg.batch_size}; learning rates text {cfg.lr_text}, term table {cfg.lr_terms}, heads {cfg.lr_heads},
  warm-up {cfg.warmup_steps} steps.
- Candidate pool: {metrics['pool_items']} of {d['items']} items (BM25 and starting-model top {cfg.pool_depth}
  per query + judged items).
- Steps: {steps}. Time: {metrics['minutes']} min on {metrics['device']} ({phases}).

## Model selection (dev)
{verdict} {fusion_line}

Exact search over the whole catalog: nDCG@10 {start.get('dev_ndcg@10', float('nan')):.4f} untrained ->
{shipped.get('dev_ndcg@10', float('nan')):.4f} shipped (Recall@100 {start.get('dev_recall@100', float('nan')):.4f} ->
{shipped.get('dev_recall@100', float('nan')):.4f}). The curve (ranking the dev candidate pool, comparable between
rows; the last row is exact search):

| when | steps | nDCG@10 | Recall@100 | |
|---|---|---|---|---|
{history}

Test-split numbers come from `tailbridge eval retriever`, never from training.
"""
