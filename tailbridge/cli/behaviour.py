"""``tailbridge models refresh-behaviour``, and the same step in every ``tailbridge loop`` poll:
the serving retriever's behaviour vectors refreshed from the feedback log
(``models.retrieval.behaviour``), its changed items re-upserted to Milvus.

One refresh, in the order that survives a kill -9 at any instant:

1. the items whose rows change (and any a killed refresh left) are recorded as pending;
2. the overlay is replaced whole: the stream indexer and the query handler load it (each notices
   a new file and loads the version's encoders again beside the old ones);
3. the pending items' rows are read back from every live collection of the version, re-encoded
   and upserted whole (``streams.indexer.refresh_vectors``); then nothing is pending.

The version (the Milvus alias, the registry) does not change: the overlay is data of the
serving version, so query and item vectors stay comparable throughout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tailbridge.settings import Settings

Say = Callable[[str], None]


@dataclass
class BehaviourReport:
    version: str | None
    refreshed: bool = False
    note: str = ""
    refreshes: int = 0  # the overlay's counter after this refresh
    searches: int = 0
    engagements: int = 0
    item_rows: int = 0
    new_items: int = 0
    query_rows: int = 0
    new_queries: int = 0
    changed_items: int = 0
    upserted: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        if not self.refreshed:
            return f"behaviour refresh: {self.note}"
        return (f"behaviour refresh #{self.refreshes} of {self.version}: {self.searches} new searches, "
                f"{self.engagements} engagements; rows for {self.item_rows} items ({self.new_items} new) and "
                f"{self.query_rows} queries ({self.new_queries} new); {self.changed_items} items changed, "
                f"{self.upserted} vectors re-upserted; {self.seconds:.1f} s")


def refresh_behaviour(settings: Settings, log_dir: Path, say: Say = print, thresholds: bool = False,
                      version: str | None = None) -> BehaviourReport:
    """One refresh of ``version`` (default: the one the Milvus alias serves). With ``thresholds``
    (the loop) only when ``behaviour_refresh_seconds`` passed since the last one and
    ``behaviour_refresh_min_engagements`` engagements were logged since."""
    from tailbridge.models.data.feedback import read_feedback
    from tailbridge.models.retrieval import behaviour
    from tailbridge.models.retrieval.encoders import UnifiedEncoder, retriever_dir
    from tailbridge.models.retrieval.graph import GraphFactors
    from tailbridge.streams import item_index
    from tailbridge.streams.indexer import refresh_vectors

    started = time.monotonic()
    milvus = item_index.connect(settings)
    version = version or item_index.serving_version(milvus, settings)
    report = BehaviourReport(version)
    if version is None:
        report.note = "nothing is indexed yet (no collection behind the alias)"
        return report
    model_dir = retriever_dir(version)
    factors_file = behaviour.factors_path(model_dir)
    if not factors_file.is_file():
        report.note = (f"{version} has no graph factors ({factors_file}): not a trained retriever, or trained before "
                       "they were saved (train or fine-tune it again: `tailbridge loop` does)")
        return report
    factors = GraphFactors.load(factors_file)
    previous = behaviour.read_overlay(model_dir)
    result = behaviour.refresh(factors, previous, read_feedback(log_dir))
    leftover = behaviour.read_pending(model_dir)  # what a killed refresh did not upsert
    pending = sorted(set(leftover) | set(result.changed_items))
    if result.searches == 0 and not pending:
        report.note = f"{version}: no searches logged since the last refresh"
        return report
    if thresholds and not leftover:
        waited = time.time() - datetime.fromisoformat(previous.refreshed_at).timestamp() if previous else None
        if waited is not None and waited < settings.behaviour_refresh_seconds:
            report.note = (f"{version}: not due ({waited:.0f} s < {settings.behaviour_refresh_seconds:.0f} s "
                           "since the last refresh)")
            return report
        if result.engagements < settings.behaviour_refresh_min_engagements:
            report.note = (f"{version}: not due ({result.engagements} engagements < "
                           f"{settings.behaviour_refresh_min_engagements} logged since the last refresh)")
            return report
    behaviour.write_pending(model_dir, pending)
    behaviour.write_overlay(model_dir, result.overlay, factors.rank)
    written = {"upserted": 0}
    if pending:
        say(f"behaviour refresh of {version}: re-encoding {len(pending)} items")
        written = refresh_vectors(settings, milvus, version, pending, UnifiedEncoder(model_dir))
    behaviour.write_pending(model_dir, [])
    overlay = result.overlay
    report.refreshed, report.refreshes = True, overlay.refreshes
    report.searches, report.engagements = result.searches, result.engagements
    report.item_rows, report.new_items = len(overlay.item_rows), result.new_items
    report.query_rows, report.new_queries = len(overlay.query_rows), result.new_queries
    report.changed_items, report.upserted = len(pending), written["upserted"]
    report.seconds = time.monotonic() - started
    return report
