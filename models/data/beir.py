"""A small loader for datasets in the BEIR layout.

    <dir>/corpus.jsonl    {"_id", "title", "text", "metadata"?} per line
    <dir>/queries.jsonl   {"_id", "text", "metadata"?} per line
    <dir>/qrels/<split>.tsv   query-id <TAB> corpus-id <TAB> score  (header line optional)

Title-only corpora (missing, null or empty "text") load fine. Anything malformed raises
:class:`BeirFormatError` naming the file and the 1-based line number, so a broken download
or a hand-edited file is found at once rather than as a KeyError deep in an evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson


class BeirFormatError(ValueError):
    def __init__(self, path: Path | str, line: int | None, message: str):
        self.path, self.line = Path(path), line
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


@dataclass
class BeirDataset:
    corpus: dict[str, dict]  # doc id -> {"title", "text", "metadata"}
    queries: dict[str, dict]  # query id -> {"text", "metadata"}
    qrels: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # split -> qid -> doc -> score

    def split_queries(self, split: str) -> dict[str, dict]:
        """The queries that have judgements in ``split``."""
        return {qid: self.queries[qid] for qid in self.qrels.get(split, {}) if qid in self.queries}


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; errors name the file and line."""
    if not path.is_file():
        raise BeirFormatError(path, None, "file not found")
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise BeirFormatError(path, lineno, f"not valid JSON ({exc})") from None
            if not isinstance(obj, dict):
                raise BeirFormatError(path, lineno, "expected a JSON object")
            yield lineno, obj


def _id(obj: dict, path: Path, lineno: int) -> str:
    raw = obj.get("_id")
    if raw is None or (isinstance(raw, str) and not raw.strip()) or isinstance(raw, (dict, list, bool)):
        raise BeirFormatError(path, lineno, 'missing or empty "_id"')
    return str(raw)  # some public sets use integer ids


def _text(obj: dict, key: str, path: Path, lineno: int) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BeirFormatError(path, lineno, f'"{key}" must be a string, got {type(value).__name__}')
    return value


def _metadata(obj: dict, path: Path, lineno: int) -> dict:
    value = obj.get("metadata")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BeirFormatError(path, lineno, '"metadata" must be an object')
    return value


def _records(path: Path, fields: Callable[[dict, int], dict]) -> dict[str, dict]:
    """One record per line keyed by its "_id"; a repeated id is an error naming both lines."""
    records: dict[str, dict] = {}
    first_line: dict[str, int] = {}
    for lineno, obj in read_jsonl(path):
        record_id = _id(obj, path, lineno)
        if record_id in records:
            raise BeirFormatError(path, lineno, f"duplicate _id {record_id!r} (first on line {first_line[record_id]})")
        first_line[record_id] = lineno
        records[record_id] = fields(obj, lineno) | {"metadata": _metadata(obj, path, lineno)}
    return records


def load_corpus(path: Path) -> dict[str, dict]:
    return _records(path, lambda obj, lineno: {"title": _text(obj, "title", path, lineno),
                                               "text": _text(obj, "text", path, lineno)})


def load_queries(path: Path) -> dict[str, dict]:
    def fields(obj: dict, lineno: int) -> dict:
        if "text" not in obj:
            raise BeirFormatError(path, lineno, 'missing "text"')
        return {"text": _text(obj, "text", path, lineno)}

    return _records(path, fields)


def load_qrels(path: Path) -> dict[str, dict[str, int]]:
    if not path.is_file():
        raise BeirFormatError(path, None, "file not found")
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) != 3:
                raise BeirFormatError(path, lineno, f"expected 3 tab-separated columns, got {len(cols)}")
            qid, doc_id, score = (c.strip() for c in cols)
            try:
                value = int(score)
            except ValueError:
                try:
                    as_float = float(score)
                except ValueError:
                    as_float = None
                if as_float is not None and as_float.is_integer():
                    value = int(as_float)  # "1.0" in some exports
                elif lineno == 1:
                    continue  # the "query-id corpus-id score" header
                else:
                    raise BeirFormatError(path, lineno, f"score {score!r} is not an integer") from None
            if not qid or not doc_id:
                raise BeirFormatError(path, lineno, "empty query or corpus id")
            qrels.setdefault(qid, {})[doc_id] = value
    return qrels


def load_beir(data_dir: Path, splits: Iterable[str] | None = None) -> BeirDataset:
    """Load corpus, queries and the qrels of ``splits`` (default: every qrels/*.tsv)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise BeirFormatError(data_dir, None, "data directory not found")
    corpus = load_corpus(data_dir / "corpus.jsonl")
    queries = load_queries(data_dir / "queries.jsonl")
    qrels_dir = data_dir / "qrels"
    if splits is None:
        names = sorted(p.stem for p in qrels_dir.glob("*.tsv")) if qrels_dir.is_dir() else []
    else:
        names = list(splits)
    qrels = {name: load_qrels(qrels_dir / f"{name}.tsv") for name in names}
    return BeirDataset(corpus, queries, qrels)
