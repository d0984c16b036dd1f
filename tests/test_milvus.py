"""Both Milvus paths, on real servers: the embedded Milvus 2.3.5 server (no BM25, so the term
index beside it) and a BM25-capable Milvus (Milvus Lite 3.2.2 here, Milvus 2.5+ in containers).
The same indexer and search functions serve both."""

import ipaddress
import re
import subprocess
import sys
import textwrap
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
import redis
from pymilvus import DataType, MilvusClient

from tailbridge.feature_repo.online import resolve_online_store
from tailbridge.streams import item_index
from tailbridge.streams.events import CatalogDelete, CatalogUpsert
from tailbridge.streams.indexer import Indexer
from tailbridge.streams.item_index import MILVUS_GRPC_OPTIONS
from tailbridge.streams.term_index import TermFilters
from tests.conftest import BACKEND, settings_env, wait_until

pytestmark = pytest.mark.integration

DIM = 16
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["server", "bm25"], scope="module")
def engine(request) -> tuple[str, object]:
    """(which, settings) with a namespace of the module's own on that engine."""
    base = request.getfixturevalue("milvus_server_settings" if request.param == "server" else "bm25_milvus_settings")
    run_id = uuid.uuid4().hex[:8]
    settings = base.model_copy(update={"topic_prefix": f"tbm_{run_id}", "feast_project": f"tbm_{run_id}"})
    yield request.param, settings
    milvus = item_index.connect(settings)
    for name in item_index.live_collections(milvus, settings):
        milvus.drop_collection(name)


def make_collection(client: MilvusClient, name: str) -> None:
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("item_id", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
    index = client.prepare_index_params()
    index.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
    client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")


def test_insert_in_one_process_search_from_another(engine):
    _, settings = engine
    name = f"t_{uuid.uuid4().hex[:10]}"
    client = MilvusClient(uri=settings.milvus_uri, grpc_options=MILVUS_GRPC_OPTIONS)
    make_collection(client, name)
    vectors = np.eye(DIM, dtype=np.float32)
    # No flush: the collection reads at Strong consistency, which sees every acknowledged write.
    client.insert(name, [{"item_id": f"item_{i}", "vector": v.tolist()} for i, v in enumerate(vectors)])
    try:
        # A second OS process (as a stream worker beside the query handler would be) searches.
        searcher = textwrap.dedent(f"""
            import sys
            from pymilvus import MilvusClient
            client = MilvusClient(uri={settings.milvus_uri!r})
            client.load_collection({name!r})
            query = [0.0] * {DIM}; query[5] = 1.0
            hits = client.search({name!r}, data=[query], limit=3, output_fields=["item_id"])[0]
            print(",".join(hit["entity"]["item_id"] for hit in hits))
            # and writes one more item the parent must then find
            client.insert({name!r}, [{{"item_id": "from_child", "vector": [0.5] * {DIM}}}])
        """)
        out = subprocess.run([sys.executable, "-c", searcher], env=settings_env(settings),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().split(",")[0] == "item_5"

        hits = client.search(name, data=[[0.5] * DIM], limit=1, output_fields=["item_id"])[0]
        assert hits[0]["entity"]["item_id"] == "from_child"
        assert client.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"] == DIM + 1
    finally:
        client.drop_collection(name)
        client.close()


class HashEncoder:
    """Item vectors from a hash of the title: no model to load; only the plumbing is under test."""

    version, dim = "hash-test", DIM

    def encode_items(self, items):
        out = np.zeros((len(items), DIM), dtype=np.float32)
        for row, item in zip(out, items):
            row[zlib.crc32(item["title"].encode()) % DIM] = 1.0
        return out


CATALOG = [
    ("hp1", "Sony WH-1000XM4 Wireless Headphones", "Sony", "Headphones", 349.0),
    ("hp2", "Sony WH-1000XM5 Wireless Headphones", "Sony", "Headphones", 399.0),
    ("hp3", "Bose QuietComfort 45 Headphones", "Bose", "Headphones", 329.0),
    ("sh1", "Trail Running Shoe Size 10.5 Wide", "Brooks", "Running Shoes", 140.0),
    ("sh2", "Trail Running Shoe Size 10 Wide", "Brooks", "Running Shoes", 135.0),
    ("sh3", "Road Running Shoe Size 5", "Hoka", "Running Shoes", 150.0),
]


def upserts() -> list[CatalogUpsert]:
    return [CatalogUpsert(item_id=i, title=t, brand=b, category_path=["Shop", c], price=p) for i, t, b, c, p in CATALOG]


def lexical(settings, milvus, texts, filters=TermFilters(), expr=""):
    collection = item_index.serving_collection(milvus, settings)
    terms = None if item_index.has_bm25(milvus, collection) else item_index.terms(settings)
    return item_index.lexical_search(milvus, collection, texts, 10, expr, ["item_id", "brand", "price"], 10,
                                     terms, filters)


def ids(hits) -> list[str]:
    return [hit["entity"]["item_id"] for hit in hits]


def test_indexer_feeds_both_routes_with_exact_matches_filters_deletes_and_crash_repair(engine, monkeypatch):
    which, settings = engine
    milvus = item_index.connect(settings)
    r = redis.Redis.from_url(resolve_online_store(settings).redis_url)
    indexer = Indexer(settings, milvus, r, encoder_loader=lambda version: HashEncoder())
    indexer.process(upserts())
    collection = item_index.serving_collection(milvus, settings)
    assert item_index.has_bm25(milvus, collection) == (which == "bm25")
    assert item_index.server_has_bm25(milvus) == (which == "bm25")

    xm4, size, brand = lexical(settings, milvus, ["WH-1000XM4", "shoe size 10.5", "bose"])
    assert ids(xm4)[0] == "hp1" and ids(size)[0] == "sh1" and ids(brand) == ["hp3"]
    # The same filters on both routes: Milvus' expression and the term index's SQL agree.
    expr, filters = 'brand == "Sony" and price <= 350.0', TermFilters(brand="Sony", price_max=350.0)
    [filtered] = lexical(settings, milvus, ["headphones"], filters, expr)
    assert ids(filtered) == ["hp1"]
    query = HashEncoder().encode_items([{"title": CATALOG[2][1]}]).tolist()
    # Searches read at Bounded consistency: new rows show within the server's graceful time.
    wait_until(lambda: ids(item_index.dense_search(milvus, collection, query, 10, expr, ["item_id"], 10)[0]) == ["hp1"],
               10, "the filtered dense search to find hp1 only")

    # A crash after the collection write and before the term write: the replay repairs it.
    changed = CatalogUpsert(item_id="hp3", title="Bose QC45 Headphones Refurbished", brand="Bose",
                            category_path=["Shop", "Headphones"], price=199.0)
    if indexer._terms is not None:
        def crash(rows):
            raise OSError("killed")
        monkeypatch.setattr(indexer._terms, "upsert", crash)
        with pytest.raises(OSError):
            indexer.process([changed])
        monkeypatch.undo()
        assert "hp3" not in ids(lexical(settings, milvus, ["refurbished"])[0])  # the term write was lost
    indexer.process([changed])  # the redelivered batch
    [[hit]] = lexical(settings, milvus, ["refurbished"])
    assert hit["entity"]["item_id"] == "hp3" and hit["entity"]["price"] == 199.0

    indexer.process([CatalogDelete(item_id="hp1")])
    assert "hp1" not in ids(lexical(settings, milvus, ["WH-1000XM4"])[0])
    query = HashEncoder().encode_items([{"title": CATALOG[0][1]}]).tolist()
    wait_until(lambda: "hp1" not in ids(item_index.dense_search(milvus, collection, query, 10, "", ["item_id"], 10)[0]),
               10, "the delete to reach dense search")


def test_nothing_but_the_indexer_writes_milvus_rows():
    """Behaviour stats live in the online store: no other module upserts (let alone partially)
    a Milvus row, so clicks never move an item's lexical score on either path."""
    writes = re.compile(r"\b(milvus|client)\.(upsert|insert|delete)\(")
    # (bench/ fills collections of its own)
    writers = {path.relative_to(ROOT).as_posix() for folder in ("streams", "serving", "models", "tailbridge")
               for path in (ROOT / folder).rglob("*.py") if writes.search(path.read_text())}
    assert writers == {"streams/indexer.py"}, writers
    behaviour = (ROOT / "streams" / "behaviour.py").read_text()
    assert "resources.milvus" not in behaviour and "term_index" not in behaviour  # nor does it hold a client


@pytest.mark.skipif(BACKEND != "embedded", reason="the containers' Milvus is not started by the stack")
def test_every_server_the_stack_started_listens_on_loopback_only(stack_settings, milvus_server_settings,
                                                                  bm25_milvus_settings):
    """Every listening socket of every process the stack started is on a loopback address, or
    in a private network namespace whose only interface is loopback (the Milvus 2.3.5 server,
    which binds all interfaces there)."""
    from tailbridge.infra import stack

    host_netns = Path("/proc/self/ns/net").readlink()
    seen = []
    started = [(settings, name) for settings in (stack_settings, milvus_server_settings, bm25_milvus_settings)
               for name in stack.COMPONENTS]
    for settings, name in started:
        leader = stack._live_pid(settings, name)
        if leader is None:
            continue
        for pid in stack.group_pids(leader):
            netns = Path(f"/proc/{pid}/ns/net").readlink()
            for host, port in listening(pid):
                seen.append((name, pid, host, port))
                if netns == host_netns:
                    ip = ipaddress.ip_address(host)
                    assert ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped and ip.ipv4_mapped.is_loopback), \
                        (name, pid, host, port)
                else:
                    interfaces = [line.split(":")[0].strip() for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]]
                    assert interfaces == ["lo"], (name, pid, interfaces)
    assert {name for name, *_ in seen} >= {"kafka", "milvus"}, seen
    assert any(Path(f"/proc/{pid}/ns/net").readlink() != host_netns for _, pid, *_ in seen)  # the confined server


def listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of the TCP sockets process ``pid`` listens on, from its namespace's tables."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                found.append((decode(address, width), int(port, 16)))
    return found


def decode(hex_address: str, width: int) -> str:
    raw = bytes.fromhex(hex_address)
    if width == 8:
        return ".".join(str(b) for b in reversed(raw))
    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]  # /proc writes each 32-bit word host-endian
    return str(ipaddress.IPv6Address(b"".join(words)))
