"""Training the unified retriever: ``tailbridge train retriever --data DIR``.

1. Data: the training judgements of DIR (any layout ``models.data.loaders`` reads). Model
   selection data is ``qrels/dev.tsv`` when the set has one, else a stable 10% of the training
   queries; the test split is never read here.
2. Behaviour (optional): the feedback log (``models.data.feedback``) -- searches with their
   labelled pages and the shopper's context at the time. Searches for dev or test query texts
   are dropped, so nothing about held-out queries is learned from the log.
3. Graph: spectral embedding of the training judgements + logged engagements (``models.retrieval.graph``).
4. Stage 1, contrastive: each query against its positive, the batch's other positives and hard
   negatives mined from the current model's top results (re-mined every epoch), with the
   false-negative margin mask. Stage 2, graded: ROAR over each query's judged group plus the
   multi-grained loss (behaviour levels against random catalog items), with a lighter stage-1
   term so retrieval does not drift.
5. Artifact: ``<out>/`` holds weights, configs, tokenizer, graph index, the catalog's vectors,
   ``metrics.json``, ``MODEL_CARD.md`` and the query tower as ONNX (``models.retrieval.export``). A checkpoint under ``<out>/checkpoint/`` is written
   every few minutes and after every epoch; running the same command again resumes from it.

CPU budget (what is traded): only the top MiniLM layers train, and the frozen lower layers'
outputs are computed once per text and cached; texts are cut at 64 tokens; hard negatives are
re-mined every ``mine_every`` epochs, not per step (each mining is a full catalog encode);
``max_minutes`` (default 28) gives each remaining epoch an equal share of the time left and
ends an epoch early when its share is spent, so a large set finishes in time with fewer steps.
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

from tailbridge.models.retrieval import model as unified
from tailbridge.models.data.feedback import read_feedback, searches_with_context
from tailbridge.models.data.loaders import RetrievalData, load_dataset
from tailbridge.models.retrieval.graph import interaction_edges, spectral_embedding
from tailbridge.models.retrieval.losses import masked_contrastive_loss, multi_grained_loss, roar_loss
from tailbridge.models.metrics import ndcg_at, recall_at
from tailbridge.models.retrieval.model import Batch, RetrieverConfig, TextInput, UnifiedRetriever
from tailbridge.vocab import LABEL_LEVEL, normalize_query

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    stage1_epochs: int = 4
    stage2_epochs: int = 2
    batch_size: int = 32
    hard_negatives: int = 2  # per query (stage 1), drawn from the top `mine_depth` unjudged items
    mine_depth: int = 30
    mine_every: int = 2  # epochs between re-mining (each costs a full catalog encode)
    group_size: int = 8  # judged or logged items per query (stage 2)
    random_items: int = 16  # random catalog items per batch: the multi-grained "global" comparison
    temperature: float = 0.05
    fn_margin: float = 0.0  # false-negative mask: drop candidates scoring above positive - margin
    min_odds_ratio: float = 4.0  # ROAR
    roar_weight: float = 1.0
    multi_grained_weight: float = 1.0
    stage2_contrastive_weight: float = 0.5
    lr_text: float = 5e-5
    lr_terms: float = 5e-3
    lr_heads: float = 1e-3
    warmup_steps: int = 50
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
    if feedback_dir is not None:
        frame = read_feedback(feedback_dir)
        frame = frame[frame["item_id"].isin(data.items.keys())]
        frame = frame[~frame["query"].map(normalize_query).isin(held_out)]
        categories = {i: it["category_path"][-1] for i, it in data.items.items() if it["category_path"]}
        searches = searches_with_context(frame, categories)
        say(f"feedback: {len(searches)} logged searches ({len(frame)} rows) from {feedback_dir}")

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
    return TrainingSet(data, examples, dev, searches, train)


def _has_positive(ex: Example, searches: dict[str, dict[str, Any]]) -> bool:
    return any(g >= 1 for g in ex.judged.values()) or any(
        LABEL_LEVEL[label] >= LABEL_LEVEL["clicked"] for s in ex.searches for label in searches[s]["items"].values())


# --------------------------------------------------------------------------------------------
# Texts: token ids and the cached frozen prefix
# --------------------------------------------------------------------------------------------


class TextSource:
    """Token ids of a fixed list of texts and, when the model has a frozen prefix, its output per
    text (fp16, computed once), so a training step runs only the trainable layers."""

    def __init__(self, model: UnifiedRetriever, fz: unified.Featurizer, texts: Sequence[str], device: torch.device,
                 batch: int, progress: Callable | None = None):
        enc = fz.tokenizer(list(texts), truncation=True, max_length=fz.cfg.max_length)
        self.ids = [list(x) for x in enc["input_ids"]]
        self.prefix: list[torch.Tensor] | None = None
        if model.text.split == 0:
            return  # everything trains: nothing to cache
        self.prefix = [None] * len(self.ids)  # type: ignore[list-item]
        order = sorted(range(len(self.ids)), key=lambda i: len(self.ids[i]))  # similar lengths pad less
        with torch.no_grad():
            for start in range(0, len(order), batch):
                idx = order[start:start + batch]
                text = self._tokens(idx).to(device)
                hidden = model.text.prefix(text.input_ids, text.attention_mask).to("cpu", torch.float16)
                for row, i in enumerate(idx):
                    self.prefix[i] = hidden[row, :len(self.ids[i])].clone()
                if progress:
                    progress(len(idx))

    def _tokens(self, idx: Sequence[int]) -> TextInput:
        ids = unified.pad([self.ids[i] for i in idx])
        return TextInput(ids, (ids != 0).long() if ids.shape[1] else ids)

    def get(self, idx: Sequence[int]) -> TextInput:
        text = self._tokens(idx)
        if self.prefix is not None:
            width = text.input_ids.shape[1]
            hidden = torch.zeros(len(idx), width, self.prefix[idx[0]].shape[-1], dtype=torch.float16)
            for row, i in enumerate(idx):
                hidden[row, :len(self.ids[i])] = self.prefix[i]
            text.prefix = hidden
        return text


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
        gq_keys, gq_vecs, gi_ids, gi_vecs = spectral_embedding(edges, model_cfg.graph_rank, cfg.seed)
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
        schedule = lambda s: min((s + 1) / warm, max(0.05, 1 - s / max(1, self.total_steps)))  # noqa: E731
        self.scheds = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in (self.opt, self.term_opt)]
        self.position = Position()
        self.history: list[dict[str, Any]] = []
        self.losses: dict[str, list[float]] = {}
        self.elapsed_before = 0.0
        self.reserve = 60.0
        self.negatives = np.zeros((n, 0), dtype=np.int64)
        self.catalog = np.zeros((len(self.items), model_cfg.dim), dtype=np.float32)

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

    # ---------------------------------------------------------------- encoding, mining, dev metrics

    @torch.no_grad()
    def encode_catalog(self, label: str) -> None:
        began = time.monotonic()
        self.model.eval()
        out = np.empty_like(self.catalog)
        with self._bar(label, len(self.items)) as advance:
            for start in range(0, len(self.items), self.cfg.encode_batch):
                rows = list(range(start, min(len(self.items), start + self.cfg.encode_batch)))
                out[start:start + len(rows)] = self.model.encode_items(self._item_batch(rows, 0.0, None)).cpu().numpy()
                advance(len(rows))
        self.catalog = out
        self.reserve = 60 + 1.5 * (time.monotonic() - began)  # what writing the artifact will need

    @torch.no_grad()
    def _query_vectors(self, texts: Sequence[str]) -> np.ndarray:
        self.model.eval()
        out = []
        for start in range(0, len(texts), self.cfg.encode_batch):
            batch = self.fz.queries(texts[start:start + self.cfg.encode_batch])
            out.append(self.model.encode_queries(batch.to(self.device)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.catalog.shape[1]), np.float32)

    @torch.no_grad()
    def mine(self) -> None:
        """Top unjudged, unengaged items of each training query under the current model."""
        self.model.eval()
        n, depth = len(self.ts.examples), self.cfg.mine_depth
        negatives = np.full((n, depth), -1, dtype=np.int64)
        catalog = torch.from_numpy(self.catalog)
        for start in range(0, n, self.cfg.encode_batch):
            rows = list(range(start, min(n, start + self.cfg.encode_batch)))
            q = self.model.encode_queries(self._query_batch(rows, None, 0.0, None)).cpu()
            top = torch.topk(q @ catalog.T, k=min(len(self.items), depth + 64), dim=1).indices.numpy()
            for r, cand in zip(rows, top):
                known = self.known[r]
                picked = [c for c in cand if self.item_ids[c] not in known][:depth]
                negatives[r, :len(picked)] = picked
        self.negatives = negatives

    def _known_positive(self, ex: Example) -> set[str]:
        known = {i for i, g in ex.judged.items() if g >= 1}
        for sid in ex.searches:
            known |= {i for i, label in self.ts.searches[sid]["items"].items() if label != "shown_unclicked"}
        return known

    def dev_metrics(self) -> dict[str, float]:
        if not self.ts.dev:
            return {}
        qids = sorted(self.ts.dev)
        q = self._query_vectors([self.ts.data.queries[x] for x in qids])
        top = torch.topk(torch.from_numpy(q) @ torch.from_numpy(self.catalog).T,
                         k=min(100, len(self.items)), dim=1).indices.numpy()
        ranked = [[self.item_ids[c] for c in row] for row in top]
        return {"dev_ndcg@10": float(np.mean([ndcg_at(r, self.ts.dev[x]) for r, x in zip(ranked, qids)])),
                "dev_recall@100": float(np.mean([recall_at(r, self.ts.dev[x]) for r, x in zip(ranked, qids)]))}

    # ---------------------------------------------------------------- steps

    def _view(self, ex: Example, rng: np.random.Generator) -> dict[str, Any] | None:
        """A logged search of the query (its labels and the shopper's context), some of the time."""
        if ex.searches and (not ex.judged or rng.random() < self.cfg.behaviour_prob):
            return self.ts.searches[ex.searches[rng.integers(len(ex.searches))]]
        return None

    def _positive(self, ex: Example, view: dict[str, Any] | None, rng: np.random.Generator) -> int:
        """The best engaged item of the logged search, else one of the best-graded items."""
        levels = {} if view is None else {i: LABEL_LEVEL[lab] for i, lab in view["items"].items()
                                          if i in self.item_row and LABEL_LEVEL[lab] >= LABEL_LEVEL["clicked"]}
        labels = levels or {i: g for i, g in ex.judged.items() if i in self.item_row}
        best = max(labels.values())
        pool = sorted(i for i, v in labels.items() if v == best)
        return self.item_row[pool[rng.integers(len(pool))]]

    def _hard_negatives(self, rows: Sequence[int], rng: np.random.Generator, per_query: int) -> list[int]:
        negs: list[int] = []
        for r in rows:
            cand = self.negatives[r][self.negatives[r] >= 0]
            if len(cand):
                negs += [int(c) for c in rng.choice(cand, size=min(per_query, len(cand)), replace=False)]
        return negs

    def _contrastive(self, rows: Sequence[int], q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                     candidates: Sequence[int]) -> torch.Tensor:
        knowns = [self.known[r] for r in rows]
        cand_ids = [self.item_ids[c] for c in candidates]
        known = torch.tensor([[cid in k for cid in cand_ids] for k in knowns], device=self.device)
        return masked_contrastive_loss(q, pos, neg, temperature=self.cfg.temperature, margin=self.cfg.fn_margin,
                                       known_positive=known)

    def _stage1_loss(self, rows: Sequence[int], rng: np.random.Generator, gen: torch.Generator) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        views = [self._view(self.ts.examples[r], rng) for r in rows]
        positives = [self._positive(self.ts.examples[r], v, rng) for r, v in zip(rows, views)]
        negs = self._hard_negatives(rows, rng, cfg.hard_negatives)
        contexts = [None if v is None else v["context"] for v in views]
        q = self.model.encode_queries(self._query_batch(rows, contexts, cfg.query_graph_dropout, gen))
        items = self.model.encode_items(self._item_batch(positives + negs, cfg.item_graph_dropout, gen))
        loss = self._contrastive(rows, q, items[:len(rows)], items[len(rows):], positives + negs)
        return {"loss": loss, "contrastive": loss}

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
                                            positives + negs)
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
        texts = self.ts.examples
        with self._bar("caching frozen text prefix (items)", len(self.items)) as advance:
            self.item_text = TextSource(self.model, self.fz, [unified.item_text(it) for it in self.items],
                                        self.device, cfg.encode_batch, advance)
        with self._bar("caching frozen text prefix (queries)", len(texts)) as advance:
            self.query_text = TextSource(self.model, self.fz, [ex.text for ex in texts], self.device,
                                         cfg.encode_batch, advance)
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
                    if epoch % max(1, cfg.mine_every) == 0:  # fresh hard negatives from the current model
                        self.encode_catalog(f"stage {stage} epoch {epoch + 1}: encoding catalog")
                        metrics = self.dev_metrics()
                        self.history.append({"stage": stage, "epoch": epoch, "when": "start", **metrics})
                        if metrics:
                            self.say(f"stage {stage} epoch {epoch + 1}: "
                                     + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                        self.mine()
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
                with self._bar(f"stage {stage} epoch {epoch + 1}/{epochs}", len(batches)) as advance:
                    advance(self.position.step)
                    for step, rows in enumerate(batches):
                        if step < self.position.step:
                            continue
                        step_rng = np.random.default_rng([cfg.seed, stage, epoch, step])
                        step_seed = cfg.seed * 1_000_003 + stage * 10_007 + epoch * 101 + step
                        gen = torch.Generator().manual_seed(step_seed)
                        torch.manual_seed(step_seed)  # dropout: a resumed run repeats the same steps
                        parts = (self._stage1_loss if stage == 1 else self._stage2_loss)(list(rows), step_rng, gen)
                        self.opt.zero_grad(set_to_none=True)
                        self.term_opt.zero_grad(set_to_none=True)
                        parts["loss"].backward()
                        torch.nn.utils.clip_grad_norm_(self.dense_params, 5.0)
                        for opt, sched in zip((self.opt, self.term_opt), self.scheds):
                            opt.step()
                            sched.step()
                        for k, v in parts.items():
                            self.losses.setdefault(f"stage{stage}_{k}", []).append(float(v.detach()))
                        self.position = Position(stage, epoch, step + 1)
                        advance(1)
                        if time.monotonic() - last_checkpoint > cfg.checkpoint_minutes * 60:
                            self.save_checkpoint(started)
                            last_checkpoint = time.monotonic()
                        if epoch_deadline is not None and time.monotonic() > epoch_deadline:
                            self.say(f"time budget: stage {stage} epoch {epoch + 1} ends after {step + 1} steps")
                            break
                self.position = Position(stage, epoch + 1, 0) if epoch + 1 < epochs else Position(stage + 1, 0, 0)
                self.save_checkpoint(started)
                last_checkpoint = time.monotonic()
        self.encode_catalog("final: encoding catalog")
        final = self.dev_metrics()
        self.history.append({"stage": 3, "epoch": 0, "when": "final", **final})

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
    (out_dir / unified.ITEM_IDS_FILE).write_text(json.dumps(trainer.item_ids))
    ts = trainer.ts
    steps = {k: len(v) for k, v in trainer.losses.items() if k.endswith("_loss")}
    metrics = {
        "data": {"name": ts.data.name, "dir": str(data_dir), "items": len(ts.data.items),
                 "train_queries": len(ts.examples), "train_judgements": sum(len(e.judged) for e in ts.examples),
                 "dev_queries": len(ts.dev), "feedback_dir": str(feedback_dir) if feedback_dir else None,
                 "logged_searches": len(ts.searches)},
        "steps": steps, "minutes": round(elapsed / 60, 2), "device": str(trainer.device),
        "history": trainer.history,
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
    m, d, cfg = trainer.model.cfg, metrics["data"], trainer.cfg
    history = "\n".join(
        f"| {h['when']} | {h['stage']} | {h['epoch'] + 1} | {h.get('dev_ndcg@10', float('nan')):.4f} | "
        f"{h.get('dev_recall@100', float('nan')):.4f} |" for h in metrics["history"])
    steps = ", ".join(f"{k.removesuffix('_loss')}: {v}" for k, v in metrics["steps"].items())
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
- Stage 1 (masked contrastive, {cfg.hard_negatives} hard negatives per query re-mined every epoch, margin
  {cfg.fn_margin}): {cfg.stage1_epochs} epochs. Stage 2 (ROAR min odds ratio {cfg.min_odds_ratio} + multi-grained
  + {cfg.stage2_contrastive_weight} x contrastive): {cfg.stage2_epochs} epochs. Batch {cfg.batch_size}.
- Steps: {steps}. Time: {metrics['minutes']} min on {metrics['device']}.
- Trade-offs for CPU: frozen lower MiniLM layers with cached outputs, texts cut at {m.max_length} tokens,
  mining once per epoch.

## Dev metrics (exact search over the whole catalog)
| when | stage | epoch | nDCG@10 | Recall@100 |
|---|---|---|---|---|
{history}

Test-split numbers come from `tailbridge eval retriever`, never from training.
"""
