"""Product-search datasets with graded labels, read into one shape for training and evaluation.

Layouts recognised by ``load_dataset(dir)``:

* BEIR -- ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv`` (the demo generator writes
  this; so does anyone exporting a public set). Item fields come from the record (``title``,
  ``text`` as the description) and, when present, ``metadata.category_path / brand / price /
  attributes``. Query strata come from ``metadata.stratum`` or are derived from
  ``metadata.frequency``.
* Amazon ESCI -- ``*examples*.parquet`` (query_id, query, product_id, product_locale,
  esci_label, split) and ``*products*.parquet`` (product_id, product_title,
  product_description, product_bullet_point, product_brand, product_color, product_locale). One locale (``us`` by
  default); splits as the file gives them.
* Wayfair WANDS -- tab-separated ``product.csv``, ``query.csv``, ``label.csv``. WANDS has no
  split, so queries are split 80/20 into train/test by a hash of the query id (stable).

Grades are on one scale everywhere: 3 exact, 2 substitute (ESCI S, WANDS Partial),
1 complement (ESCI C), 0 irrelevant. Items are dicts shaped like ``streams.events.CatalogUpsert``
(item_id, title, description, category_path, brand, price, attributes); only those fields are
kept, so ground-truth metadata some sets carry (the demo's ``type``) never reaches a model.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tailbridge.models.data.beir import BeirFormatError, load_beir

STRATA = ("head", "torso", "tail")
ESCI_GRADES = {"E": 3, "S": 2, "C": 1, "I": 0}
WANDS_GRADES = {"Exact": 3, "Partial": 2, "Irrelevant": 0}
WANDS_TEST_PERCENT = 20


class DatasetError(ValueError):
    """A data directory that cannot be read as a retrieval dataset, with the reason."""


@dataclass
class RetrievalData:
    name: str
    items: dict[str, dict[str, Any]]  # item id -> CatalogUpsert-shaped dict
    queries: dict[str, str]  # query id -> text
    qrels: dict[str, dict[str, dict[str, int]]]  # split -> query id -> item id -> grade
    strata: dict[str, str] = field(default_factory=dict)  # query id -> head / torso / tail (if known)

    def split(self, name: str) -> dict[str, dict[str, int]]:
        """The judgements of one split, restricted to queries and items that exist."""
        if name not in self.qrels:
            have = ", ".join(sorted(self.qrels)) or "none"
            raise DatasetError(f"{self.name}: no split {name!r} (splits: {have})")
        out = {}
        for qid, judged in self.qrels[name].items():
            kept = {i: g for i, g in judged.items() if i in self.items}
            if qid in self.queries and kept:
                out[qid] = kept
        return out


def make_item(item_id: str, title: str, description: str | None = None, category_path: Iterable[str] | None = None,
              brand: str | None = None, price: float | None = None, attributes: Mapping[str, Any] | None = None) -> dict:
    return {
        "item_id": str(item_id),
        "title": (title or "").strip(),
        "description": (description or "").strip(),
        "category_path": [str(c) for c in (category_path or []) if str(c).strip()],
        "brand": (brand or "").strip(),
        "price": float(price) if price is not None else 0.0,
        "attributes": {str(k): str(v) for k, v in (attributes or {}).items() if v is not None and str(v) != ""},
    }


def strata_from_frequency(frequency: Mapping[str, float]) -> dict[str, str]:
    """Head = the most frequent queries that make up the first third of the traffic, torso the
    next third, tail the rest (the usual traffic-share definition; ties broken by id)."""
    total = sum(frequency.values())
    if total <= 0:
        return {}
    out, running = {}, 0.0
    for qid in sorted(frequency, key=lambda q: (-frequency[q], q)):
        out[qid] = "head" if running < total / 3 else "torso" if running < 2 * total / 3 else "tail"
        running += frequency[qid]
    return out


# --------------------------------------------------------------------------------------------
# BEIR (and the demo generator)
# --------------------------------------------------------------------------------------------


def load_beir_dataset(data_dir: Path) -> RetrievalData:
    try:
        beir = load_beir(data_dir)
    except BeirFormatError as exc:
        raise DatasetError(str(exc)) from None
    items = {}
    for doc_id, doc in beir.corpus.items():
        m = doc["metadata"]
        path = m.get("category_path")
        items[doc_id] = make_item(doc_id, doc["title"], doc["text"], path if isinstance(path, list) else None,
                                  m.get("brand") if isinstance(m.get("brand"), str) else None,
                                  m.get("price") if isinstance(m.get("price"), (int, float)) else None,
                                  m.get("attributes") if isinstance(m.get("attributes"), dict) else None)
    queries = {qid: q["text"] for qid, q in beir.queries.items()}
    strata = {qid: q["metadata"]["stratum"] for qid, q in beir.queries.items()
              if q["metadata"].get("stratum") in STRATA}
    if not strata:
        freq = {qid: float(q["metadata"]["frequency"]) for qid, q in beir.queries.items()
                if isinstance(q["metadata"].get("frequency"), (int, float))}
        strata = strata_from_frequency(freq)
    if not beir.qrels:
        raise DatasetError(f"{data_dir}: no qrels/*.tsv judgement files")
    return RetrievalData(Path(data_dir).name, items, queries, beir.qrels, strata)


# --------------------------------------------------------------------------------------------
# Amazon ESCI
# --------------------------------------------------------------------------------------------


def _one(data_dir: Path, pattern: str, what: str) -> Path:
    found = sorted(data_dir.glob(pattern))
    if len(found) != 1:
        raise DatasetError(f"{data_dir}: expected one {what} file matching {pattern!r}, found {len(found)}")
    return found[0]


def _require(frame, columns: Iterable[str], path: Path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DatasetError(f"{path}: missing columns {', '.join(missing)}")


def load_esci(data_dir: Path, locale: str = "us") -> RetrievalData:
    import pandas as pd

    examples_path = _one(data_dir, "*examples*.parquet", "ESCI examples")
    products_path = _one(data_dir, "*products*.parquet", "ESCI products")
    ex = pd.read_parquet(examples_path)
    _require(ex, ["query_id", "query", "product_id", "product_locale", "esci_label", "split"], examples_path)
    pr = pd.read_parquet(products_path)
    _require(pr, ["product_id", "product_title", "product_locale"], products_path)
    ex = ex[ex["product_locale"] == locale]
    pr = pr[pr["product_locale"] == locale]
    bad = sorted(set(ex["esci_label"]) - set(ESCI_GRADES))
    if bad:
        raise DatasetError(f"{examples_path}: unknown esci_label values {bad} (expected E, S, C, I)")

    def text(row, col):
        value = row.get(col)
        return value if isinstance(value, str) else ""

    items = {}
    for row in pr.to_dict("records"):
        attrs = {"color": text(row, "product_color")} if text(row, "product_color") else {}
        items[str(row["product_id"])] = make_item(row["product_id"], text(row, "product_title"),
                                                  text(row, "product_description") or text(row, "product_bullet_point"), None,
                                                  text(row, "product_brand"), None, attrs)
    queries = {str(q): t for q, t in zip(ex["query_id"], ex["query"])}
    qrels: dict[str, dict[str, dict[str, int]]] = {}
    for split, qid, pid, label in zip(ex["split"], ex["query_id"], ex["product_id"], ex["esci_label"]):
        qrels.setdefault(str(split), {}).setdefault(str(qid), {})[str(pid)] = ESCI_GRADES[label]
    return RetrievalData(f"esci-{locale}", items, queries, qrels)


# --------------------------------------------------------------------------------------------
# Wayfair WANDS
# --------------------------------------------------------------------------------------------


def _features(raw: Any) -> dict[str, str]:
    """WANDS product_features: "name:value|name:value"."""
    out = {}
    for part in (raw if isinstance(raw, str) else "").split("|"):
        name, sep, value = part.partition(":")
        if sep and name.strip() and value.strip():
            out[name.strip()] = value.strip()
    return out


def load_wands(data_dir: Path) -> RetrievalData:
    import pandas as pd

    paths = {name: data_dir / f"{name}.csv" for name in ("product", "query", "label")}
    frames = {}
    for name, path in paths.items():
        try:
            frames[name] = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{path}: not a tab-separated file ({exc})") from None
    _require(frames["product"], ["product_id", "product_name"], paths["product"])
    _require(frames["query"], ["query_id", "query"], paths["query"])
    _require(frames["label"], ["query_id", "product_id", "label"], paths["label"])
    bad = sorted(set(frames["label"]["label"]) - set(WANDS_GRADES))
    if bad:
        raise DatasetError(f"{paths['label']}: unknown labels {bad} (expected {', '.join(WANDS_GRADES)})")
    items = {}
    for row in frames["product"].to_dict("records"):
        path = [c.strip() for c in row.get("category hierarchy", "").split("/") if c.strip()]
        items[row["product_id"]] = make_item(row["product_id"], row["product_name"], row.get("product_description"),
                                             path, None, None, _features(row.get("product_features")))
    queries = dict(zip(frames["query"]["query_id"], frames["query"]["query"]))
    qrels: dict[str, dict[str, dict[str, int]]] = {}
    for qid, pid, label in zip(frames["label"]["query_id"], frames["label"]["product_id"], frames["label"]["label"]):
        split = "test" if zlib.crc32(qid.encode()) % 100 < WANDS_TEST_PERCENT else "train"
        qrels.setdefault(split, {}).setdefault(qid, {})[pid] = WANDS_GRADES[label]
    return RetrievalData("wands", items, queries, qrels)


# --------------------------------------------------------------------------------------------


def load_dataset(data_dir: Path | str) -> RetrievalData:
    """Detect the layout of ``data_dir`` and load it (see the module docstring)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir}: data directory not found")
    if (data_dir / "corpus.jsonl").exists():
        return load_beir_dataset(data_dir)
    if list(data_dir.glob("*examples*.parquet")):
        return load_esci(data_dir)
    if (data_dir / "label.csv").exists():
        return load_wands(data_dir)
    raise DatasetError(f"{data_dir}: no dataset found (expected BEIR corpus.jsonl + queries.jsonl + qrels/, "
                       "ESCI *examples*.parquet + *products*.parquet, or WANDS product.csv + query.csv + label.csv)")
