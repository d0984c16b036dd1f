"""The Milvus Lite server shared by two processes: one writes, another searches."""

import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest
from pymilvus import DataType, MilvusClient

from tailbridge.streams.item_index import MILVUS_GRPC_OPTIONS
from tests.conftest import settings_env

pytestmark = pytest.mark.integration

DIM = 16


def make_collection(client: MilvusClient, name: str) -> None:
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("item_id", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
    index = client.prepare_index_params()
    index.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
    client.create_collection(name, schema=schema, index_params=index)


def test_insert_in_one_process_search_from_another(stack_settings):
    name = f"t_{uuid.uuid4().hex[:10]}"
    client = MilvusClient(uri=stack_settings.milvus_uri, grpc_options=MILVUS_GRPC_OPTIONS)
    make_collection(client, name)
    vectors = np.eye(DIM, dtype=np.float32)
    client.insert(name, [{"item_id": f"item_{i}", "vector": v.tolist()} for i, v in enumerate(vectors)])
    client.flush(name)
    try:
        # A second OS process (as a stream worker beside the query handler would be) searches.
        searcher = textwrap.dedent(f"""
            import sys
            from pymilvus import MilvusClient
            client = MilvusClient(uri={stack_settings.milvus_uri!r})
            client.load_collection({name!r})
            query = [0.0] * {DIM}; query[5] = 1.0
            hits = client.search({name!r}, data=[query], limit=3, output_fields=["item_id"])[0]
            print(",".join(hit["entity"]["item_id"] for hit in hits))
            # and writes one more item the parent must then find
            client.insert({name!r}, [{{"item_id": "from_child", "vector": [0.5] * {DIM}}}])
            client.flush({name!r})
        """)
        out = subprocess.run([sys.executable, "-c", searcher], env=settings_env(stack_settings),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().split(",")[0] == "item_5"

        hits = client.search(name, data=[[0.5] * DIM], limit=1, output_fields=["item_id"])[0]
        assert hits[0]["entity"]["item_id"] == "from_child"
        assert client.get_collection_stats(name)["row_count"] == DIM + 1
    finally:
        client.drop_collection(name)
        client.close()
