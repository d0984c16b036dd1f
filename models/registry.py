"""The model registry: every version of every model kind, its lineage, metrics and status.

One JSON file, ``DATA_DIR/models/registry.json``, holds every kind (``retriever``, ``ranker``,
``rewriter``). It is only ever replaced whole (written to a temporary file, fsynced, renamed
over the old one), so a process killed at any instant leaves either the old or the new file,
never a mix: the set of serving versions it names is always one that was complete together.
Writers (the alignment loop, ``tailbridge models rollback``) hold an exclusive ``flock`` on a
lock file beside it while they read, change and replace it.

The registry does not move artifacts: each kind keeps its own layout
(``DATA_DIR/models/<kind>/<version>/``, the retriever's Milvus collection per version behind the
alias). It records where each version is and which one serves. The ranker's serving version
is read from here by the query handler (``serving.models``), which reloads when it changes;
the retriever's is the Milvus alias, moved before the registry records it
(``reconcile_serving`` repairs the record if a crash fell between the two).

A version's status: ``candidate`` (trained, not judged yet), ``serving``, ``retired`` (served
before), ``rejected`` (the gate said no). ``history`` is the order in which versions were
made to serve, per kind; ``rollback`` steps back along it.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

KINDS = ("retriever", "ranker", "rewriter")
Status = Literal["candidate", "serving", "retired", "rejected"]
REGISTRY_FILE, LOCK_FILE = "registry.json", ".registry.lock"


class RegistryError(ValueError):
    pass


@dataclass
class ModelVersion:
    kind: str
    version: str
    path: str  # the artifact directory (the retriever's vectors live in Milvus under this version)
    status: Status = "candidate"
    parent: str | None = None  # the version it was trained from (fine-tuned, or replacing)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    metrics: dict[str, Any] = field(default_factory=dict)  # the trainer's own (metrics.json)
    data: dict[str, Any] = field(default_factory=dict)  # what it was trained on
    settings: dict[str, Any] = field(default_factory=dict)  # training settings
    gate: dict[str, Any] | None = None  # the gate's comparison with the serving version, when judged

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> ModelVersion:
        return cls(**{k: row[k] for k in cls.__dataclass_fields__ if k in row})


@dataclass
class RegistryState:
    versions: dict[str, dict[str, ModelVersion]] = field(default_factory=lambda: {k: {} for k in KINDS})
    history: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})

    def serving(self, kind: str) -> ModelVersion | None:
        return next((v for v in self.versions[_kind(kind)].values() if v.status == "serving"), None)

    def get(self, kind: str, version: str) -> ModelVersion:
        try:
            return self.versions[_kind(kind)][version]
        except KeyError:
            known = ", ".join(self.versions[kind]) or "none"
            raise RegistryError(f"no {kind} version {version!r} in the registry (known: {known})") from None

    def to_json(self) -> dict[str, Any]:
        return {"versions": {k: {n: asdict(v) for n, v in vs.items()} for k, vs in self.versions.items()},
                "history": self.history}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> RegistryState:
        state = cls()
        for kind, rows in raw.get("versions", {}).items():
            state.versions.setdefault(kind, {}).update({n: ModelVersion.from_json(r) for n, r in rows.items()})
        for kind, order in raw.get("history", {}).items():
            state.history[kind] = list(order)
        return state


def _kind(kind: str) -> str:
    if kind not in KINDS:
        raise RegistryError(f"unknown model kind {kind!r} (one of {', '.join(KINDS)})")
    return kind


def _write_atomically(path: Path, payload: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


class Registry:
    def __init__(self, models_root: Path):
        self.root = Path(models_root)
        self.path = self.root / REGISTRY_FILE

    def read(self) -> RegistryState:
        """The current state (a lock-free read: the file is only ever replaced whole)."""
        if not self.path.is_file():
            return RegistryState()
        return RegistryState.from_json(json.loads(self.path.read_bytes()))

    def stamp(self) -> tuple[int, int] | None:
        """What changes with every write: readers poll it to notice a promotion or rollback. Each
        write renames a new file into place, so its inode changes even within one mtime tick."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    @contextmanager
    def change(self) -> Iterator[RegistryState]:
        """Read, let the caller change, then replace the file, under an exclusive lock."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.read()
            yield state
            _write_atomically(self.path, json.dumps(state.to_json(), indent=1, sort_keys=True).encode())

    # ------------------------------------------------------------------ changes

    def register(self, entry: ModelVersion) -> ModelVersion:
        """Record a new version (a candidate unless said otherwise); re-registering one is an update."""
        with self.change() as state:
            known = state.versions[_kind(entry.kind)].get(entry.version)
            if known is not None and known.status in ("serving", "retired"):
                entry.status = known.status  # re-recording an artifact never changes who serves
            state.versions[entry.kind][entry.version] = entry
            if entry.status == "serving":
                _make_serving(state, entry.kind, entry.version)
        return entry

    def promote(self, kind: str, version: str, gate: Mapping[str, Any] | None = None) -> ModelVersion:
        with self.change() as state:
            entry = state.get(kind, version)
            if gate is not None:
                entry.gate = dict(gate)
            _make_serving(state, kind, version)
        return entry

    def reject(self, kind: str, version: str, gate: Mapping[str, Any]) -> ModelVersion:
        with self.change() as state:
            entry = state.get(kind, version)
            entry.status, entry.gate = "rejected", dict(gate)
        return entry

    def rollback_target(self, kind: str) -> tuple[ModelVersion, ModelVersion]:
        """(serving now, the version that served before it): what ``rollback`` would switch."""
        state = self.read()
        return _rollback_pair(state, kind)

    def rollback(self, kind: str, expected_current: str | None = None) -> ModelVersion:
        """Make the version that served before the current one serve again; the current one is
        retired and leaves the history, so a second rollback steps back further."""
        with self.change() as state:
            current, previous = _rollback_pair(state, kind)
            if expected_current is not None and current.version != expected_current:
                raise RegistryError(f"{kind}: serving changed meanwhile ({current.version}, not {expected_current})")
            state.history[kind].pop()
            current.status = "retired"
            previous.status = "serving"
        return previous

    def reconcile_serving(self, kind: str, version: str, path: str) -> bool:
        """Record ``version`` as serving when the system serves it but the registry says
        otherwise (a crash between a switch and its record, or a version served before the
        registry existed). Returns whether anything changed."""
        state = self.read()
        current = state.serving(kind)
        if current is not None and current.version == version:
            return False
        with self.change() as state:
            if version not in state.versions[_kind(kind)]:
                state.versions[kind][version] = ModelVersion(kind, version, path, status="serving")
            _make_serving(state, kind, version)
        return True


def _make_serving(state: RegistryState, kind: str, version: str) -> None:
    for entry in state.versions[kind].values():
        if entry.status == "serving" and entry.version != version:
            entry.status = "retired"
    state.versions[kind][version].status = "serving"
    history = state.history.setdefault(kind, [])
    if not history or history[-1] != version:
        history.append(version)


def _rollback_pair(state: RegistryState, kind: str) -> tuple[ModelVersion, ModelVersion]:
    current = state.serving(kind)
    if current is None:
        raise RegistryError(f"no {kind} version is serving: nothing to roll back")
    history = [v for v in state.history.get(kind, []) if v in state.versions[kind]]
    if len(history) < 2 or history[-1] != current.version:
        raise RegistryError(f"{kind} {current.version} is the first version that served: nothing to roll back to")
    return current, state.versions[kind][history[-2]]


def models_root(data_dir: Path) -> Path:
    return Path(data_dir) / "models"


def entry_from_artifact(kind: str, path: Path, parent: str | None = None) -> ModelVersion:
    """A registry entry for an artifact directory as the trainers write it: ``metrics.json``
    (its ``data`` block is the data; the rest the metrics) and the ``training`` block of
    ``config.json`` (the settings). Missing files leave those fields empty."""
    path = Path(path)
    metrics = _json(path / "metrics.json")
    data = metrics.pop("data", {}) if isinstance(metrics.get("data"), dict) else {}
    metrics.pop("history", None)  # per-epoch curves: the artifact keeps them, the registry the results
    return ModelVersion(_kind(kind), path.name, str(path), parent=parent, metrics=metrics, data=data,
                        settings=_json(path / "config.json").get("training", {}))


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
