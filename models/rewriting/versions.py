"""Rewriter versions: one directory per version under the artifact root
(``DATA_DIR/models/rewriter/<version>/``) with the model, its tokenizer and ``version.json``:
the stage that made it, its parent version, the data (directory, fingerprint, feedback log),
the metrics it was judged by and the settings it was trained with. Serving and the store
refer to a version by its name; nothing overwrites a finished version."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from tailbridge.models.rewriting.generator import Generator, load_dir

RECORD = "version.json"


class VersionError(ValueError):
    pass


def save_version(generator: Generator, root: Path, version: str, record: dict[str, Any]) -> Path:
    """Write the version atomically (a directory renamed into place) and return its path."""
    out = Path(root) / version
    building = out.with_name(out.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    generator.save(building)
    (building / RECORD).write_text(json.dumps({"version": version, "created": time.time()} | record, indent=2))
    if out.exists():
        shutil.rmtree(out)
    building.rename(out)
    return out


def read_record(root: Path, version: str) -> dict[str, Any] | None:
    path = Path(root) / version / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def versions(root: Path) -> list[dict[str, Any]]:
    """Every finished version's record, oldest first."""
    records = [json.loads(p.read_text()) for p in Path(root).glob(f"*/{RECORD}")]
    return sorted(records, key=lambda r: r["created"])


def resolve(root: Path, version: str | None = None, stage: str | None = None) -> dict[str, Any]:
    """A version's record: by name, or the newest (of ``stage``, when given)."""
    if version:
        record = read_record(root, version)
        if record is None:
            raise VersionError(f"no rewriter version {version!r} under {root} (train one: `tailbridge train rewriter`)")
        return record
    found = [r for r in versions(root) if stage is None or r["stage"] == stage]
    if not found:
        raise VersionError(f"no rewriter{' ' + stage if stage else ''} version under {root} "
                           "(train one: `tailbridge train rewriter`)")
    return found[-1]


def load_version(root: Path, version: str, device: str | None = None, int8: bool = False) -> Generator:
    """A version's generator; ``int8``: quantized for generation on a CPU (never to train)."""
    if read_record(root, version) is None:
        raise VersionError(f"no rewriter version {version!r} under {root}")
    return load_dir(Path(root) / version, device, int8)
