"""The live part of `make demo`: a stream worker processes the replay while a dashboard shows
user features and item stats (Feast) and item vectors (Milvus) changing. The replay ends once
every catalog item is indexed, every event applied and every search's feedback window closed
and logged; then what was published is put beside what the worker made of it."""

from __future__ import annotations

import itertools
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import redis
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from tailbridge.feature_repo.store import feature_store
from tailbridge.feature_repo.online import resolve_online_store
from tailbridge.infra.stack import log_file
from tailbridge.streams import item_index
from tailbridge.streams.behaviour import Keys, feedback_dir
from tailbridge.streams.events import InteractionEvent, QueryEvent
from tailbridge.streams.feedback import read_examples
from tailbridge.models.data.user_context import epoch_ms
from tailbridge.synthetic.replay import replay_dataset
from tailbridge.streams.topics import all_topic_names, count_messages
from tailbridge.settings import Settings
from tailbridge.vocab import LABEL_OF_ACTION

DEMO_FEEDBACK_WINDOW_S = 10  # at least: short, so the demo shows labelled feedback before it ends
# The replay's window is as long as its sessions take at the replay's rate (``demo_window_s``), with
# this margin for a publisher that falls behind the rate (stretching the sessions in event time).
WINDOW_MARGIN = 2.0
# The replay's events are stamped as they are sent: a partition quiet for 3 s has nothing late
# coming, so the last searches' windows close soon after the replay (streams.event_time).
DEMO_WORKER_ENV = {"TAILBRIDGE_FEEDBACK_WINDOW_SECONDS": str(DEMO_FEEDBACK_WINDOW_S),
                   "TAILBRIDGE_WORKER_IDLE_SECONDS": "3"}
CATCH_UP_TIMEOUT_S = 120
# Set by the demo's Ctrl-C handler: a KeyboardInterrupt that a library call swallowed (a broad
# except around a connect or a retry) still ends the live replay at its next check.
INTERRUPTED = threading.Event()


def on_sigint(signum, frame) -> None:
    INTERRUPTED.set()
    signal.default_int_handler(signum, frame)
WATCHED_USERS = 3
WORKER_STOP_S = 10


def start_worker(settings: Settings, env_overrides: dict[str, str]) -> subprocess.Popen:
    log = log_file(settings, "worker")
    log.parent.mkdir(parents=True, exist_ok=True)
    env = os.environ | settings.as_env() | env_overrides
    with log.open("ab") as out:
        return subprocess.Popen([str(Path(sys.executable).parent / "tailbridge"), "worker"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_worker(worker: subprocess.Popen) -> None:
    """SIGTERM to the worker's process group (it stops within seconds, even while it retries);
    SIGKILL if it has not stopped after WORKER_STOP_S, or on a second Ctrl-C while waiting."""
    if worker.poll() is not None:
        return
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(WORKER_STOP_S)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


def demo_window_s(dataset, rate: float, events: int, seed: int) -> float:
    """A feedback window that holds the replay's sessions: the events are stamped as they are
    sent, so a search's engagements come (events published in between) / rate seconds after it.
    The widest such gap of the replay (the simulator is deterministic), at the rate, with a
    margin; at least DEMO_FEEDBACK_WINDOW_S (also when the rate is unbounded)."""
    from tailbridge.synthetic.shoppers import simulate

    searched, widest = {}, 0
    for n, event in enumerate(itertools.islice(simulate(dataset, seed=seed), events)):
        if isinstance(event, QueryEvent):
            searched[event.query_id] = n
        elif isinstance(event, InteractionEvent) and event.action in LABEL_OF_ACTION and event.query_id in searched:
            widest = max(widest, n - searched[event.query_id])
    return float(max(DEMO_FEEDBACK_WINDOW_S, math.ceil(WINDOW_MARGIN * widest / rate) if rate > 0 else 0))


def live_replay(settings: Settings, dataset, rate: float, events: int, seed: int, console: Console) -> list:
    window_s = demo_window_s(dataset, rate, events, seed)
    worker = start_worker(settings, DEMO_WORKER_ENV | {"TAILBRIDGE_FEEDBACK_WINDOW_SECONDS": f"{window_s:g}"})
    sent = Counter()
    active_users, engaged_items = Counter(), Counter()
    tally = EngagedPairs(window_s)

    def on_behaviour(event) -> None:
        sent["behaviour"] += 1
        tally.add(event)
        if isinstance(event, InteractionEvent) and event.action != "impression":
            active_users[event.user_id] += 1
            engaged_items[event.item_id] += 1

    reports: list = []
    publisher = threading.Thread(target=lambda: reports.extend(replay_dataset(
        settings, dataset, rate, events, seed, catalog=True,
        on_catalog=lambda e: sent.update(["catalog"]), on_behaviour=on_behaviour)), daemon=True)
    try:  # from here on a Ctrl-C (or any error) stops the worker this function started
        dashboard = Dashboard(settings, len(dataset.items), events, sent, active_users, engaged_items,
                              {item.item_id: item.title for item in dataset.items}, tally)
        publisher.start()
        with Live(dashboard.render(), console=console, refresh_per_second=2) as live:
            deadline, progress = None, None
            while True:
                time.sleep(0.5)
                if INTERRUPTED.is_set():
                    raise KeyboardInterrupt
                live.update(dashboard.render())
                if worker.poll() is not None:
                    raise SystemExit(f"the worker exited; see {log_file(settings, 'worker')}")
                if publisher.is_alive():
                    continue
                if dashboard.progress() != progress:  # give up only once nothing moves for the timeout
                    progress, deadline = dashboard.progress(), time.monotonic() + CATCH_UP_TIMEOUT_S
                if dashboard.caught_up() and not dashboard.open_searches or time.monotonic() > deadline:
                    break
    finally:
        stop_worker(worker)
    if not dashboard.caught_up():
        console.print(f"[yellow]the worker made no progress for {CATCH_UP_TIMEOUT_S} s before it caught up; "
                      f"see {log_file(settings, 'worker')}[/]")
    dashboard.print_counts(console)
    return reports


class EngagedPairs:
    """The engaged (search, item) pairs of the replayed stream: a click, add to cart or purchase
    of an item on the search's page; ``count`` those the feedback log should label, no later than
    the search's time plus the feedback window (event time, as the worker attributes them),
    ``count_all`` every one, whenever it came."""

    def __init__(self, window_s: float):
        self.window_ms = int(window_s * 1000)
        self.searches: dict[str, tuple[int, set[str]]] = {}  # query id -> (time ms, served item ids)
        self.actions: dict[tuple[str, str], int] = {}  # (query id, item id) -> earliest engaged action ms

    def add(self, event) -> None:
        if isinstance(event, QueryEvent):
            self.searches[event.query_id] = (epoch_ms(event.event_time), {s.item_id for s in event.served})
        elif isinstance(event, InteractionEvent) and event.query_id and event.action in LABEL_OF_ACTION:
            pair, at = (event.query_id, event.item_id), epoch_ms(event.event_time)
            self.actions[pair] = min(at, self.actions.get(pair, at))

    def count(self, window_ms: float | None = None) -> int:
        window_ms = self.window_ms if window_ms is None else window_ms
        searches, actions = dict(self.searches), list(self.actions.items())  # copies: the publisher adds meanwhile
        return sum(1 for (query, item), at in actions
                   if query in searches and item in searches[query][1] and at <= searches[query][0] + window_ms)

    def count_all(self) -> int:
        return self.count(float("inf"))


class Dashboard:
    def __init__(self, settings, catalog_size, behaviour_total, sent, active_users, engaged_items, titles,
                 tally: EngagedPairs):
        self.settings, self.catalog_size, self.behaviour_total = settings, catalog_size, behaviour_total
        self.sent, self.active_users, self.engaged_items, self.titles = sent, active_users, engaged_items, titles
        self.tally = tally
        self.keys = Keys(settings)
        self.redis = redis.Redis.from_url(resolve_online_store(settings).redis_url)
        self.store = feature_store(settings)
        self.milvus = item_index.connect(settings)
        self.indexed = self.applied = self.feedback_rows = self.engaged_rows = self.open_searches = 0
        self.applied_before = int(self.redis.get(self.keys.applied) or 0)  # an earlier demo on this Redis

    def caught_up(self) -> bool:
        return self.indexed >= self.catalog_size and self.applied >= self.behaviour_total

    def progress(self) -> tuple[int, ...]:
        return self.indexed, self.applied, self.feedback_rows, self.open_searches

    def _refresh(self) -> None:
        self.applied = int(self.redis.get(self.keys.applied) or 0) - self.applied_before
        alias = item_index.alias_name(self.settings)
        self.indexed = item_index.count(self.milvus, alias) if item_index.serving_collection(
            self.milvus, self.settings) else 0
        rows = read_examples(feedback_dir(self.settings))
        rows = rows[rows["query_id"].isin(list(self.tally.searches))]  # this replay's: the log may hold earlier demos
        self.feedback_rows = len(rows)
        self.engaged_rows = int((rows["label"] != "shown_unclicked").sum())
        # Searches whose window is open, or closed and being written to the log.
        self.open_searches = self.redis.zcard(self.keys.feedback_open) + self.redis.zcard(self.keys.feedback_flushing)

    def render(self) -> Group:
        self._refresh()
        flow = Table(title="stream worker", expand=False)
        for column in ("", "published", "processed"):
            flow.add_column(column, justify="right" if column else "left")
        flow.add_row("catalog upserts -> Milvus vectors", str(self.sent["catalog"]), str(self.indexed))
        flow.add_row("queries + interactions -> Feast", str(self.sent["behaviour"]), str(self.applied))
        flow.add_row(f"labelled feedback rows ({self.tally.window_ms / 1000:g} s window)", "", str(self.feedback_rows))
        flow.add_row("engaged (search, item) pairs -> engaged rows in the log", str(self.tally.count()),
                     str(self.engaged_rows))
        flow.add_row("searches with their feedback window open", "", str(self.open_searches))
        return Group(flow, self._users(), self._items())

    def print_counts(self, console: Console) -> None:
        """What the replay published beside what the worker made of it (they match once caught up)."""
        self._refresh()
        table = Table(title="the replay, end to end")
        for column in ("", "published", "processed"):
            table.add_column(column, justify="right" if column else "left")
        table.add_row("catalog items -> indexed in Milvus", str(self.catalog_size), str(self.indexed))
        table.add_row("engaged (search, item) pairs in the stream", str(self.tally.count_all()), "")
        table.add_row("  of them inside their search's window -> labelled engaged rows in the feedback log",
                      str(self.tally.count()), str(self.engaged_rows))
        console.print(table)
        console.print(f"feedback window: {self.tally.window_ms / 1000:g} s of event time (at least "
                      f"{DEMO_FEEDBACK_WINDOW_S} s; else {WINDOW_MARGIN:g} x the replay's widest gap from a search to "
                      "an engagement, at the replay rate); the log labels only engagements inside it")
        if self.open_searches:
            console.print(f"[yellow]{self.open_searches} searches still had their feedback window open (not logged "
                          f"yet) when the demo stopped waiting[/]")

    def _users(self) -> Table:
        table = Table(title="user_context in Feast (most active shoppers)")
        for column in ("user", "last items", "top categories", "session clicks/carts/buys"):
            table.add_column(column)
        users = [u for u, _ in self.active_users.most_common(WATCHED_USERS)]
        if not users:
            return table
        rows = self.store.get_online_features(
            features=[f"user_context:{f}" for f in ("recent_item_ids", "affinity_categories", "affinity_weights",
                                                    "session_clicks", "session_carts", "session_purchases")],
            entity_rows=[{"user_id": u} for u in users]).to_dict()
        for i, user in enumerate(users):
            items = rows["recent_item_ids"][i] or []
            categories = zip(rows["affinity_categories"][i] or [], rows["affinity_weights"][i] or [])
            table.add_row(user, "\n".join(self.titles.get(item, item)[:40] for item in items[:3]),
                          ", ".join(f"{c} {w:.2f}" for c, w in list(categories)[:3]),
                          f"{rows['session_clicks'][i] or 0}/{rows['session_carts'][i] or 0}/"
                          f"{rows['session_purchases'][i] or 0}")
        return table

    def _items(self) -> Table:
        table = Table(title="item_stats in Feast: best-converting of the most engaged items (the ranker reads them)")
        for column in ("item", "title", "ctr_24h", "purchases_24h"):
            table.add_column(column)
        items = [item for item, _ in self.engaged_items.most_common(50)]
        if not items:
            return table
        rows = self.store.get_online_features(features=["item_stats:ctr_24h", "item_stats:purchases_24h"],
                                              entity_rows=[{"item_id": item} for item in items]).to_dict()
        written = [i for i in range(len(items)) if rows["purchases_24h"][i] is not None]
        for i in sorted(written, key=lambda i: (-rows["purchases_24h"][i], -rows["ctr_24h"][i]))[:5]:
            table.add_row(items[i], self.titles.get(items[i], items[i])[:40], f"{rows['ctr_24h'][i]:.3f}",
                          str(rows["purchases_24h"][i]))
        return table


def print_topic_counts(settings: Settings, console: Console) -> None:
    with console.status("reading every topic back from the broker..."):
        counts = count_messages(settings, all_topic_names(settings))
    table = Table(title="what flowed per topic (read back from the broker)")
    table.add_column("topic")
    table.add_column("messages", justify="right")
    for topic, count in counts.items():
        table.add_row(topic, str(count))
    console.print(table)


# ------------------------------------------------------------------ the end: serving

DEMO_RANKER_VERSION = "demo"
DEMO_RANKER_MINUTES = 3.0


def train_demo_ranker(settings: Settings, data_dir: Path, console: Console) -> bool:
    """Train the multi-task ranker on the feedback log the worker just wrote from the replay:
    the loop stream -> feedback log -> model -> serving, in minutes. False when it cannot."""
    from tailbridge.cli.training import CommandError, train_ranker

    from tailbridge.models.ranking.model import is_current

    root = settings.data_dir / "models" / "ranker"
    if is_current(root / DEMO_RANKER_VERSION):
        console.print(f"ranker {DEMO_RANKER_VERSION!r} already trained ({root / DEMO_RANKER_VERSION}): reusing it")
        return True
    if (root / DEMO_RANKER_VERSION).is_dir():
        console.print(f"ranker {DEMO_RANKER_VERSION!r} was trained by an older ranker version: training it again")
    try:
        train_ranker(data_dir, root, DEMO_RANKER_VERSION, feedback_dir(settings), 0, baseline=False, threads=None,
                     train_overrides={"max_minutes": DEMO_RANKER_MINUTES})
        return True
    except CommandError as exc:
        console.print(f"[yellow]no ranker ({exc}); search serves retrieval order[/]")
        return False


DEMO_RETRIEVER_VERSION = "demo"
DEMO_RETRIEVER_MINUTES = 8.0  # the trainer's budget counts its preparation too (caching, candidate pool)
MINILM_DEPTH = 10  # "MiniLM misses it": not in MiniLM's top 10 over the same catalog
TAIL_CANDIDATES = 80  # test tail queries tried for the long-tail example


def serve_demo_retriever(settings: Settings, data_dir: Path, console: Console) -> bool:
    """Train the unified retriever on the demo data within a small budget (a finished artifact
    is reused on the next run), then reindex serving to it beside MiniLM's collection, which is
    kept for the long-tail comparison. False (MiniLM keeps serving) when there is no model."""
    from tailbridge.cli.training import CommandError, train_retriever
    from tailbridge.models.retrieval.encoders import load_encoder, retriever_dir
    from tailbridge.models.retrieval.export import INT8_FILE
    from tailbridge.streams.indexer import reindex

    model_dir = retriever_dir(DEMO_RETRIEVER_VERSION)
    if (model_dir / INT8_FILE).is_file():
        console.print(f"retriever {DEMO_RETRIEVER_VERSION!r} already trained ({model_dir}): reusing it")
    else:
        try:
            train_retriever(data_dir, model_dir.parent, DEMO_RETRIEVER_VERSION, feedback_dir(settings), 0, False, None,
                            {"max_minutes": DEMO_RETRIEVER_MINUTES})
        except CommandError as exc:
            console.print(f"[yellow]no trained retriever ({exc}); search serves MiniLM[/]")
            return False
        if not (model_dir / INT8_FILE).is_file():
            console.print(f"[yellow]the retriever trainer wrote no servable model at {model_dir}; search serves MiniLM[/]")
            return False
    milvus = item_index.connect(settings)
    if item_index.serving_version(milvus, settings) != DEMO_RETRIEVER_VERSION:
        with console.status(f"re-encoding the catalog with {DEMO_RETRIEVER_VERSION!r} (`tailbridge reindex`), "
                            "MiniLM's collection kept beside it"):
            result = reindex(settings, DEMO_RETRIEVER_VERSION, milvus, load_encoder(DEMO_RETRIEVER_VERSION),
                             keep_old=True)
        console.print(f"serving {result['to']} ({result['items']} items re-encoded); {result['from']} kept")
    return True


def minilm_top(settings: Settings):
    """MiniLM alone: text -> its top MINILM_DEPTH item ids (dense search of MiniLM's collection,
    kept beside the serving one), or None when that collection is not there."""
    from tailbridge.models.retrieval.encoders import MINILM_VERSION
    from tailbridge.models.retrieval.export import MINILM_ONNX_DIR, OnnxMiniLMEncoder

    milvus = item_index.connect(settings)
    collection = item_index.collection_name(settings, MINILM_VERSION)
    if item_index.serving_version(milvus, settings) == MINILM_VERSION or not milvus.has_collection(collection):
        return None
    encoder = OnnxMiniLMEncoder(settings.data_dir / "models" / MINILM_ONNX_DIR)

    def top(text: str) -> list[str]:
        vector = encoder.encode_queries([text])[0].tolist()
        hits = item_index.dense_search(milvus, collection, [vector], MINILM_DEPTH, "", ["item_id"], 10.0)[0]
        return [str(hit["entity"]["item_id"]) for hit in hits]

    return top


def example_searches(dataset, users: list[str]) -> list[tuple[str, dict]]:
    """A head query for two shoppers with different tastes."""
    head = max((q for q in dataset.queries if q.stratum == "head"), key=lambda q: q.frequency)
    return [(f"head query for {user}", {"query": head.text, "user_id": user, "k": 5, "explain": True})
            for user in users[:2]]


def show_long_tail(client, settings: Settings, dataset, console: Console) -> None:
    """A long-tail test query whose served results include a relevant item (judged exact or
    substitute) that MiniLM alone does not have in its top 10: the first whose item came by the
    dense route (the unified retriever itself), else the first by any route. Without a trained
    retriever, the first tail query as it is served."""
    tails = [q for q in dataset.queries if q.stratum == "tail" and dataset.split.get(q.query_id) == "test"]
    titles = {item.item_id: item.title for item in dataset.items}
    minilm = minilm_top(settings)
    found = None
    for query in tails[:TAIL_CANDIDATES if minilm else 1]:
        request = {"query": query.text, "k": 5, "explain": True}
        body = client.post("/search", json=request).json()
        if minilm is None:
            print_results(console, "long-tail query (anonymous)", request, body)
            return
        judged = dataset.qrels.get(query.query_id, {})
        baseline = minilm(query.text)
        missed = [hit for hit in body["results"] if judged.get(hit["item_id"], 0) >= 2 and hit["item_id"] not in baseline]
        if missed and (found is None or any(hit["source"] == "dense" for hit in missed)):
            found = (request, body, judged, baseline, missed)
            if any(hit["source"] == "dense" for hit in missed):
                break
    if found is None:
        console.print(f"[yellow]none of {TAIL_CANDIDATES} test tail queries has a relevant result MiniLM misses[/]")
        return
    request, body, judged, baseline, missed = found
    print_results(console, "long-tail query (anonymous)", request, body)
    for hit in missed:
        console.print(f"  [green]#{hit['position']} {hit['title']!r}[/] (judged "
                      f"{'exact' if judged[hit['item_id']] == 3 else 'substitute'}, by the {hit['source']} route) is "
                      f"not in MiniLM's top {MINILM_DEPTH} for this query")
    console.print("  MiniLM alone: " + "; ".join(f"{titles.get(i, i)[:40]!r}{' (relevant)' if judged.get(i, 0) >= 2 else ''}"
                                               for i in baseline[:3]) + " ...")


def two_different_shoppers(settings: Settings) -> list[str]:
    """Two shoppers with a context whose strongest categories differ (personalisation shows)."""
    store = feature_store(settings)
    r = redis.Redis.from_url(resolve_online_store(settings).redis_url)
    prefix = Keys(settings).user("")
    users = sorted(key.decode()[len(prefix):] for key in r.scan_iter(prefix + "*", count=2000))[:300]
    rows = store.get_online_features(features=["user_context:affinity_categories"],
                                     entity_rows=[{"user_id": u} for u in users]).to_dict()
    top = {u: cats[0] for u, cats in zip(users, rows["affinity_categories"]) if cats}
    first = next(iter(top), None)
    second = next((u for u, c in top.items() if c != top[first]), None) if first else None
    return [u for u in (first, second) if u]


def print_results(console: Console, title: str, request: dict, body: dict) -> None:
    table = Table(title=f"{title}: {request['query']!r}  ({body['timings_ms']['total']:.0f} ms"
                        f"{', personalised' if body['personalized'] else ''}"
                        f"{', degraded: ' + ', '.join(body['degraded']) if body['degraded'] else ''})")
    for column in ("#", "title", "category", "price", "score", "route"):
        table.add_column(column, justify="right" if column in ("#", "price", "score") else "left")
    for hit in body["results"]:
        table.add_row(str(hit["position"]), hit["title"][:48], hit["category"], f"{hit['price']:.2f}",
                      f"{hit['score']:.4f}", hit["source"])
    console.print(table)


def serve(settings: Settings, dataset, console: Console, keep_serving: bool) -> None:
    """Serve the trained unified retriever (trained and indexed first; MiniLM when it cannot
    be), start the query handler (with a worker, so page clicks flow back into features), show
    a head query for two shoppers and a long-tail query, then keep serving until Ctrl-C (or
    stop, with keep_serving False)."""
    import httpx
    import uvicorn

    from tailbridge.serving.app import create_app

    console.rule("the unified retriever, trained on the demo data, serves")
    serve_demo_retriever(settings, settings.data_dir / "demo", console)  # where `make demo` synthesised the data
    worker = start_worker(settings, DEMO_WORKER_ENV)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=settings.serve_host, port=settings.serve_port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    url = f"http://{settings.serve_host}:{settings.serve_port}"
    try:
        with console.status(f"starting the query handler on {url} ..."):
            thread.start()
            deadline = time.monotonic() + 120
            while not server.started:
                if not thread.is_alive() or time.monotonic() > deadline:
                    raise SystemExit(f"the query handler did not start on {url} (port taken?)")
                time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=30) as client:
            console.print(f"readiness: {client.get('/readyz').json()['dependencies']}")
            for title, request in example_searches(dataset, two_different_shoppers(settings)):
                response = client.post("/search", json=request)
                if response.status_code != 200:
                    console.print(f"[red]{title}: {response.status_code} {response.text}[/]")
                    continue
                print_results(console, title, request, response.json())
            from tailbridge.cli.rewriting import show_rewritten  # the rewriter's example (cli/rewriting.py)

            show_rewritten(client, settings, console, print_results)
            show_long_tail(client, settings, dataset, console)
        if keep_serving:
            console.print(f"\n[bold]tailbridge is serving at {url}/[/] (search page), API docs at {url}/docs; "
                          "a worker keeps features fresh.")
            console.print("Ctrl-C stops the query handler and the worker; the stack stays up.")
            thread.join()
        else:
            console.print("\nThe query handler and the worker stop here (--no-serve); the stack stays up. "
                          "`tailbridge serve` and `tailbridge worker` start them again.")
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        thread.join(10)
        stop_worker(worker)
