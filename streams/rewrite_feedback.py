"""Rewrite feedback, continuously: from closed searches to per-(query, rewrite) statistics.

1. When a search's attribution window closes, the behaviour processor's feedback flush hands
   the closed searches to ``Emitter.emit``: for every rewrite the search used, one
   ``RewriteFeedback`` (``events_for``) with the page split by route, the items that came from
   the rewrite's routes (``rewrite:<text>``) against those from the original query's, each with
   how many were engaged, carted and purchased. Its ``event_id`` is derived from the search and
   the rewrite, so a flush repeated after a crash emits the same events again, and they are
   recognised as duplicates below.
2. This module's processor reads ``rewrite_feedback`` and adds the counts into one Redis hash per
   query key (``tb:<project>:rewrite_stats:<query_key>``, fields ``<rewrite>|<counter>``), once
   per event id (a Lua script: the dedup mark and the increments in one step).
3. Right after, for each query whose statistics changed, it judges the query's live rewrites
   (``models.rewrite_evidence``: a minimum of evidence, then the posterior probability that
   the rewrite's routes engage less than the original query's) and rewrites the live list the
   query handler reads (``streams.rewrite_store``): a demoted rewrite moves to the end (search
   uses the first few), a dropped one leaves it. The handler needs no change and acts on the
   verdict with its next read, long before any retraining. The version's own lists are left
   as they are: promoting a new rewriter version starts from its own lists, and the next
   feedback on a rewrite that keeps failing demotes it again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

import orjson
import pandas as pd

from tailbridge.models.rewrite_evidence import EvidenceRule, RewriteEvidence, RouteCounts, order_rewrites
from tailbridge.settings import Settings
from tailbridge.streams import feedback
from tailbridge.streams.events import RewriteFeedback, encode
from tailbridge.streams.processor import Counts, Processor, Resources
from tailbridge.streams.rewrite_store import RewriteWriter
from tailbridge.streams.topics import TOPICS, make_producer
from tailbridge.vocab import normalize_query

COUNTERS = ("shown", "engaged", "carts", "purchases")
# Gain level (0 shown, 1 clicked, 2 carted, 3 purchased) from which an item counts in a counter.
_LEAST = {"shown": 0, "engaged": 1, "carts": 2, "purchases": 3}
_OUTCOME = ("served", "clicked", "added_to_cart", "purchased")  # RewriteOutcome by gain level
SEEN_TTL_S = 14 * 24 * 3600  # longer than any redelivery or re-flush


def events_for(fields: Mapping[str, bytes | str], window_s: float) -> list[RewriteFeedback]:
    """The feedback of each rewrite one closed search used (the feedback log's labels)."""
    examples, _ = feedback.label_rows(fields, window_s)
    if not examples:
        return []
    query = orjson.loads(fields[feedback.QUERY_FIELD])
    rewrites = query["rewrites_used"]
    if not rewrites:
        return []
    original = [e for e in examples if not e["source"].startswith(feedback.REWRITE_SOURCE_PREFIX)]
    counts_original = _counts(original)
    version = query.get("model_versions", {}).get("rewrites") or "unknown"
    when = pd.Timestamp(query["event_time"]).to_pydatetime()
    out = []
    for rewrite in rewrites:
        routed = [e for e in examples if e["source"] == feedback.REWRITE_SOURCE_PREFIX + rewrite]
        best = max((e["label_rank"] for e in routed), default=0)
        engaged = [e for e in routed if e["label_rank"] == best and best > 0]
        out.append(RewriteFeedback(
            event_id=_event_id(query["query_id"], rewrite), event_time=when, query_id=query["query_id"],
            user_id=query["user_id"], session_id=query["session_id"], query=query["query"],
            query_key=normalize_query(query["query"]), rewrite=rewrite, rewriter_version=version, outcome=_OUTCOME[best],
            item_id=engaged[0]["item_id"] if engaged else None, **_counts(routed),
            **{f"original_{k}": v for k, v in counts_original.items()}))
    return out


def _counts(rows: Sequence[Mapping]) -> dict[str, int]:
    return {name: sum(1 for r in rows if r["label_rank"] >= least) for name, least in _LEAST.items()}


def _event_id(query_id: str, rewrite: str) -> str:
    return "rf-" + hashlib.blake2b(f"{query_id}\x1f{rewrite}".encode(), digest_size=12).hexdigest()


class Emitter:
    """Publishes the rewrite feedback of closed searches. The producer is made on first use:
    a worker whose searches never use rewrites never connects it."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._producer = None
        self.topic = TOPICS["rewrite_feedback"].topic(settings)

    def emit(self, closed: Iterable[Mapping[str, bytes | str]]) -> int:
        """Publish and wait for the broker's acknowledgement, so the caller forgets the
        searches only once their feedback is safe (a failure raises: the flush is retried)."""
        events = [e for fields in closed if feedback.QUERY_FIELD in fields
                  for e in events_for(fields, self.settings.feedback_window_seconds)]
        if not events:
            return 0
        if self._producer is None:
            self._producer = make_producer(self.settings, client_id="tailbridge-rewrite-feedback")
        sent = [self._producer.send(self.topic, key=event.key.encode(), value=encode(event)) for event in events]
        self._producer.flush(timeout=30)
        for future in sent:
            future.get(timeout=30)  # raises the broker's error, if any
        return len(events)


# ------------------------------------------------------------------ the statistics in Redis


def stats_key(settings: Settings, query_key: str) -> str:
    return f"tb:{settings.feast_project}:rewrite_stats:{query_key}"


def _seen_key(settings: Settings, event_id: str) -> str:
    return f"tb:{settings.feast_project}:rewrite_feedback_seen:{event_id}"


# KEYS: [seen, stats] per event; ARGV: ttl, then per event its 8 field names and 8 increments.
_APPLY = """
local ttl, applied = tonumber(ARGV[1]), 0
local a = 2
for k = 1, #KEYS, 2 do
  if redis.call('SET', KEYS[k], '1', 'NX', 'EX', ttl) then
    for f = 0, 7 do
      redis.call('HINCRBY', KEYS[k + 1], ARGV[a + f], tonumber(ARGV[a + 8 + f]))
    end
    applied = applied + 1
  end
  a = a + 16
end
return applied
"""


def field_name(rewrite: str, side: str, counter: str) -> str:
    """``side`` is ``rewrite`` or ``original`` (the original query's routes on the same pages)."""
    return f"{rewrite}|{side}|{counter}"


def apply_events(redis_client, settings: Settings, events: Sequence[RewriteFeedback]) -> int:
    """Add each event's counts to its query's statistics, once per event id; returns how many
    were new."""
    keys, args = [], [SEEN_TTL_S]
    for e in events:
        keys += [_seen_key(settings, e.event_id), stats_key(settings, e.query_key)]
        names = [field_name(e.rewrite, side, c) for side in ("rewrite", "original") for c in COUNTERS]
        values = [getattr(e, c) for c in COUNTERS] + [getattr(e, f"original_{c}") for c in COUNTERS]
        args += names + values
    if not events:
        return 0
    return int(redis_client.eval(_APPLY, len(keys), *keys, *args))


def decode_stats(raw: Mapping[bytes | str, bytes | str]) -> dict[str, RewriteEvidence]:
    """One query's hash as evidence per rewrite."""
    per: dict[str, dict[str, dict[str, int]]] = {}
    for name, value in raw.items():
        name = name.decode() if isinstance(name, bytes) else name
        rewrite, side, counter = name.rsplit("|", 2)
        per.setdefault(rewrite, {"rewrite": {}, "original": {}})[side][counter] = int(value)
    return {r: RewriteEvidence(RouteCounts(**sides["rewrite"]), RouteCounts(**sides["original"]))
            for r, sides in per.items()}


def read_all_stats(redis_client, settings: Settings) -> dict[str, dict[str, RewriteEvidence]]:
    """Every query's statistics, by query key (the alignment loop orders rewrites by them)."""
    prefix = stats_key(settings, "")
    out = {}
    for raw in redis_client.scan_iter(match=prefix + "*", count=1000):
        key = raw.decode()
        out[key[len(prefix):]] = decode_stats(redis_client.hgetall(key))
    return out


def evidence_rule(settings: Settings) -> EvidenceRule:
    return EvidenceRule(settings.rewrite_min_shown, settings.rewrite_demote_probability,
                        settings.rewrite_drop_probability)


def judge_live(redis_client, settings: Settings, query_keys: Sequence[str]) -> dict[str, int]:
    """Re-order or shorten each query's live rewrites by their evidence; returns how many
    rewrites were demoted and dropped. A writer changing a list meanwhile wins (WATCH): the
    next feedback on the query judges its new list."""
    import redis

    live = RewriteWriter(redis_client, settings.feast_project)
    rule, counts = evidence_rule(settings), {"rewrites_demoted": 0, "rewrites_dropped": 0}
    for query_key in dict.fromkeys(query_keys):
        key = live.live_key(query_key)
        with redis_client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)
                current = [raw.decode() for raw in pipe.lrange(key, 0, -1)]
                served, verdicts = order_rewrites(current, decode_stats(pipe.hgetall(stats_key(settings, query_key))),
                                                  rule)
                if served == current:
                    continue
                pipe.multi()
                pipe.delete(key)
                if served:
                    pipe.rpush(key, *served)
                pipe.execute()
            except redis.WatchError:
                continue
        counts["rewrites_demoted"] += sum(v == "demote" and r in current for r, v in verdicts.items())
        counts["rewrites_dropped"] += sum(v == "drop" and r in current for r, v in verdicts.items())
    return counts


def processor(resources: Resources) -> Processor:
    settings, client = resources.settings, resources.redis

    def apply(events) -> Counts:
        applied = apply_events(client, settings, events)
        judged = judge_live(client, settings, [e.query_key for e in events])
        return {"rewrite_feedback_applied": applied, "duplicates": len(events) - applied, **judged}

    return Processor("rewrite_stats", ("rewrite_feedback",), apply)
