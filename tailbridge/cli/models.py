"""``tailbridge models list | rollback KIND | refresh-behaviour``: the model registry
(``models/registry.py``) as seen from the command line, the switch of each kind back to the
version that served before, and the serving retriever's behaviour refresh
(``tailbridge/cli/behaviour.py``: graph rows folded in from the log, no new version).

Each kind keeps its own way of being served; the registry records which version it is:

* retriever: the Milvus alias (``streams.item_index``) points at the version's collection;
  rollback moves the alias back (the previous collection must still exist: the loop keeps it)
  and then records the switch;
* ranker: the query handler serves the registry's serving ranker
  (``serving.ranker_reload``), so rollback is the registry change itself;
* rewriter: the rewrite store's live lists are a copy of one version's
  (``streams.rewrite_store``); rollback makes the previous version's lists live
  (``RewriteWriter.promote``), then records the switch.

``sync`` adopts what exists outside the registry (artifacts trained by hand, the version the
alias points at, the ranker ``auto`` serves) so ``list`` shows everything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from tailbridge.models.registry import KINDS, Registry, RegistryError, entry_from_artifact, models_root
from tailbridge.settings import Settings, get_settings

console = Console()
# Per kind, the file that marks a finished artifact directory.
ARTIFACT_MARKERS = {"retriever": "config.json", "ranker": "config.json", "rewriter": "version.json"}


def registry_of(settings: Settings) -> Registry:
    return Registry(models_root(settings.data_dir))


def artifact_dirs(settings: Settings, kind: str) -> list[Path]:
    root = models_root(settings.data_dir) / kind
    marker = ARTIFACT_MARKERS[kind]
    dirs = [p for p in root.iterdir() if (p / marker).is_file()] if root.is_dir() else []
    return sorted(dirs, key=lambda p: p.stat().st_mtime)


def _rewriter_entry(path: Path):
    entry = entry_from_artifact("rewriter", path)
    record = json.loads((path / "version.json").read_text())
    entry.parent = record.get("parent")
    entry.metrics = record.get("metrics") or {}
    entry.data = record.get("data") or {}
    entry.settings = record.get("settings") or {}
    return entry


def milvus_serving_version(settings: Settings) -> str | None:
    from tailbridge.streams.item_index import connect, serving_version

    return serving_version(connect(settings), settings)


def rewrite_writer(settings: Settings):
    """The rewrite store's writer, or None when the online store has no Redis (SQLite fallback)."""
    from tailbridge.feature_repo.online import resolve_online_store
    from tailbridge.streams.rewrite_store import RewriteWriter

    url = resolve_online_store(settings).redis_url
    return RewriteWriter.from_url(url, settings.feast_project, timeout_s=2.0) if url else None


def sync(settings: Settings, milvus: bool = True) -> list[str]:
    """Register artifacts the registry does not know and record what actually serves; returns
    notes on what could not be checked."""
    registry, notes = registry_of(settings), []
    known = registry.read()
    for kind in KINDS:
        for path in artifact_dirs(settings, kind):
            if path.name not in known.versions[kind]:
                registry.register(_rewriter_entry(path) if kind == "rewriter" else entry_from_artifact(kind, path))
    state = registry.read()
    trained = artifact_dirs(settings, "ranker")
    if state.serving("ranker") is None and trained:  # what the handler's `auto` serves without a registry
        registry.reconcile_serving("ranker", trained[-1].name, str(trained[-1]))
    try:
        writer = rewrite_writer(settings)
        version = writer.serving_version() if writer is not None else None
    except Exception as exc:  # Redis down: list still works, and says so
        notes.append(f"rewriter: the rewrite store did not answer ({type(exc).__name__}); serving version not checked")
    else:
        if version is not None:
            path = models_root(settings.data_dir) / "rewriter" / version
            registry.reconcile_serving("rewriter", version, str(path) if path.is_dir() else "")
    if milvus:
        try:
            version = milvus_serving_version(settings)
        except Exception as exc:  # list still works with Milvus down; it says so
            notes.append(f"retriever: Milvus at {settings.milvus_uri} did not answer ({type(exc).__name__}); "
                         "serving version not checked")
        else:
            if version is not None:
                path = models_root(settings.data_dir) / "retriever" / version
                registry.reconcile_serving("retriever", version, str(path) if path.is_dir() else "")
    return notes


def key_metrics(kind: str, entry) -> str:
    """The few numbers that say how good a version is: the gate's, else the trainer's own."""
    parts = []
    gate = entry.gate or {}
    for name, value in (gate.get("candidate") or {}).items():
        if isinstance(value, float):
            parts.append(f"{name} {value:.4f}")
    if not parts:
        m = entry.metrics
        if kind == "ranker":
            parts = [f"AUC {t} {v:.4f}" for t, v in (m.get("test_auc") or {}).items() if v is not None][:3]
        elif kind == "retriever":
            history = [h for h in m.get("history", []) if "dev_ndcg@10" in h]
            parts = [f"dev nDCG@10 {history[-1]['dev_ndcg@10']:.4f}"] if history else []
        parts += [f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float) and "ndcg" in k.lower()][:2]
    if gate:  # why a candidate failed is worth the width; a pass is its numbers
        parts.append("gate: pass" if gate.get("promote") else f"gate: fail ({gate.get('reason', '')})")
    return "; ".join(parts)


def list_table(settings: Settings) -> Table:
    state = registry_of(settings).read()
    table = Table(title=f"models ({registry_of(settings).path})")
    for column in ("kind", "version", "parent", "created", "key metrics", "status"):
        table.add_column(column, no_wrap=column in ("kind", "status"), overflow="fold")
    style = {"serving": "bold green", "rejected": "red", "retired": "dim", "candidate": "yellow"}
    for kind in KINDS:
        for entry in sorted(state.versions[kind].values(), key=lambda e: e.created):
            table.add_row(kind, entry.version, entry.parent or "", entry.created.replace("+00:00", "Z"),
                          key_metrics(kind, entry), f"[{style[entry.status]}]{entry.status}[/]")
    return table


def rollback(settings: Settings, kind: str) -> dict[str, Any]:
    """Switch ``kind`` back to the version that served before; returns {from, to}."""
    registry = registry_of(settings)
    current, previous = registry.rollback_target(kind)
    if kind == "retriever":
        from tailbridge.streams.item_index import connect, live_collections, point_alias

        client = connect(settings)
        if previous.version not in live_collections(client, settings).values():
            raise RegistryError(f"retriever {previous.version}: its Milvus collection was dropped; rebuild it with "
                                f"`tailbridge reindex --model {previous.version} --keep-old`")
        point_alias(client, settings, previous.version)  # serving moves first: the record follows it
    elif kind == "rewriter":
        writer = rewrite_writer(settings)
        if writer is None:
            raise RegistryError("the rewrite store needs Redis (the online store is the SQLite fallback)")
        writer.promote(previous.version)  # the previous version's lists become the live ones
    registry.rollback(kind, expected_current=current.version)
    return {"kind": kind, "from": current.version, "to": previous.version}


# ------------------------------------------------------------------ the commands

app = typer.Typer(help="Model versions: list them, roll serving back, refresh behaviour vectors.",
                  no_args_is_help=True)


@app.command("list")
def list_command(
    check_milvus: Annotated[bool, typer.Option(help="Ask Milvus which retriever version the alias serves.")] = True,
) -> None:
    """Every version of each kind with its parent, key metrics and status."""
    settings = get_settings()
    for note in sync(settings, milvus=check_milvus):
        console.print(f"[yellow]note:[/] {note}")
    console.print(list_table(settings))


@app.command("rollback")
def rollback_command(kind: Annotated[str, typer.Argument(help=f"One of {', '.join(KINDS)}.")]) -> None:
    """Return serving to the version that served before the current one."""
    settings = get_settings()
    try:
        sync(settings, milvus=kind == "retriever")
        result = rollback(settings, kind)
    except RegistryError as exc:
        console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(f"{kind}: serving {result['to']} again (was {result['from']})")


@app.command("refresh-behaviour")
def refresh_behaviour_command(
    feedback: Annotated[Optional[Path], typer.Option(help="Feedback log (default: the stream worker's).")] = None,
    version: Annotated[Optional[str], typer.Option(help="Retriever version (default: the one Milvus serves).")] = None,
) -> None:
    """Fold the behaviour logged since the last refresh into the serving retriever's graph rows
    (new items and queries included; the version stays) and re-upsert the items that changed."""
    from pymilvus.exceptions import MilvusException

    from tailbridge.cli.behaviour import refresh_behaviour

    settings = get_settings()
    log = feedback or settings.data_dir / "offline" / "feedback"
    try:
        report = refresh_behaviour(settings, log, say=console.print, version=version)
    except ValueError as exc:  # the log cannot be read (named in the message)
        console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        raise typer.Exit(1) from None
    except MilvusException as exc:
        console.print(f"[bold red]error:[/] Milvus at {settings.milvus_uri} did not answer ({exc.message}); the "
                      "refresh needs the item index (nothing was written if it failed before the overlay; "
                      "else the next refresh upserts what is pending)", soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(report.line())
