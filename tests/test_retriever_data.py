"""Dataset loaders on tiny files written here: BEIR (and the demo generator), ESCI, WANDS."""

import json

import pandas as pd
import pytest

from tailbridge.synthetic import catalog as synth
from tailbridge.models.data.loaders import DatasetError, load_dataset, strata_from_frequency

ITEM_KEYS = {"item_id", "title", "description", "category_path", "brand", "price", "attributes"}


def write_beir(root, corpus, queries, qrels):
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(c) + "\n" for c in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels").mkdir(exist_ok=True)
    for split, rows in qrels.items():
        (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in rows))


def test_beir_title_only_with_frequency_strata(tmp_path):
    write_beir(tmp_path / "b",
               [{"_id": "p1", "title": "Oak Desk"}, {"_id": "p2", "title": "Pine Desk", "text": None},
                {"_id": "p3", "title": "Lamp", "text": ""}],
               [{"_id": "q1", "text": "desk", "metadata": {"frequency": 100}},
                {"_id": "q2", "text": "oak desk", "metadata": {"frequency": 80}},
                {"_id": "q3", "text": "small oak desk for a dorm", "metadata": {"frequency": 1}}],
               {"train": [("q1", "p1", 3), ("q1", "p2", 3), ("q2", "p1", 3), ("q2", "p3", 0)],
                "test": [("q3", "p1", 3), ("q3", "missing-item", 2)]})
    data = load_dataset(tmp_path / "b")
    assert set(data.items) == {"p1", "p2", "p3"}
    assert all(set(it) == ITEM_KEYS and it["description"] == "" for it in data.items.values())
    assert data.queries["q3"] == "small oak desk for a dorm"
    assert data.split("train") == {"q1": {"p1": 3, "p2": 3}, "q2": {"p1": 3, "p3": 0}}
    assert data.split("test") == {"q3": {"p1": 3}}  # judgements of unknown items are dropped
    assert data.strata == {"q1": "head", "q2": "torso", "q3": "tail"}
    with pytest.raises(DatasetError, match="no split 'dev'.*splits: test, train"):
        data.split("dev")


def test_demo_generator_output_loads_without_ground_truth(tmp_path):
    dataset = synth.generate(items=150, users=3, seed=1)
    synth.write(dataset, tmp_path / "demo")
    data = load_dataset(tmp_path / "demo")
    assert len(data.items) == 150 and len(data.queries) == len(dataset.queries)
    first = data.items[dataset.items[0].item_id]
    assert set(first) == ITEM_KEYS and "type" not in first  # the generator's ground truth stays out
    assert first["category_path"] == dataset.items[0].category_path and first["brand"] == dataset.items[0].brand
    assert set(data.strata.values()) == {"head", "torso", "tail"}
    assert data.strata == {q.query_id: q.stratum for q in dataset.queries}
    assert sum(len(v) for v in data.split("test").values()) == sum(
        len(dataset.qrels[q]) for q, s in dataset.split.items() if s == "test")


def test_esci_parquet(tmp_path):
    pd.DataFrame({
        "example_id": [1, 2, 3, 4, 5], "query": ["usb c cable", "usb c cable", "usb c cable", "hdmi", "hdmi"],
        "query_id": [10, 10, 10, 11, 11], "product_id": ["A", "B", "C", "A", "D"],
        "product_locale": ["us", "us", "us", "us", "jp"], "esci_label": ["E", "S", "I", "C", "E"],
        "small_version": [1, 1, 1, 1, 1], "large_version": [1, 1, 1, 1, 1],
        "split": ["train", "train", "train", "test", "test"],
    }).to_parquet(tmp_path / "shopping_queries_dataset_examples.parquet")
    pd.DataFrame({
        "product_id": ["A", "B", "C", "D"], "product_title": ["Anker USB-C Cable 6ft", "USB-C Hub", "Mouse", "HDMI"],
        "product_description": [None, "7-in-1 hub", None, None], "product_bullet_point": ["Fast charging", None, None, None],
        "product_brand": ["Anker", None, "Logi", None], "product_color": ["Black", None, None, None],
        "product_locale": ["us", "us", "us", "jp"],
    }).to_parquet(tmp_path / "shopping_queries_dataset_products.parquet")
    data = load_dataset(tmp_path)
    assert data.name == "esci-us" and set(data.items) == {"A", "B", "C"}
    assert data.items["A"] == {"item_id": "A", "title": "Anker USB-C Cable 6ft", "description": "Fast charging",
                               "category_path": [], "brand": "Anker", "price": 0.0, "attributes": {"color": "Black"}}
    assert data.split("train") == {"10": {"A": 3, "B": 2, "C": 0}}
    assert data.split("test") == {"11": {"A": 1}}  # the jp row is another locale


def test_wands_tab_separated(tmp_path):
    (tmp_path / "product.csv").write_text(
        "product_id\tproduct_name\tproduct_class\tcategory hierarchy\tproduct_description\tproduct_features\n"
        "0\tsolid wood coffee table\tCoffee Tables\tFurniture / Living Room / Coffee Tables\t\tcolor:walnut|material:oak\n"
        "1\tvelvet sofa\tSofas\tFurniture / Living Room / Sofas\tsoft\t\n")
    (tmp_path / "query.csv").write_text("query_id\tquery\tquery_class\n0\twood coffee table\tCoffee Tables\n1\tcomfy couch\tSofas\n")
    (tmp_path / "label.csv").write_text("id\tquery_id\tproduct_id\tlabel\n0\t0\t0\tExact\n1\t0\t1\tIrrelevant\n2\t1\t1\tPartial\n")
    data = load_dataset(tmp_path)
    assert data.items["0"]["category_path"] == ["Furniture", "Living Room", "Coffee Tables"]
    assert data.items["0"]["attributes"] == {"color": "walnut", "material": "oak"}
    judged = {q: j for split in data.qrels.values() for q, j in split.items()}
    assert judged == {"0": {"0": 3, "1": 0}, "1": {"1": 2}}
    assert load_dataset(tmp_path).qrels == data.qrels  # the hash split is stable


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="data directory not found"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no dataset found"):
        load_dataset(tmp_path / "empty")
    write_beir(tmp_path / "noqrels", [{"_id": "p", "title": "x"}], [{"_id": "q", "text": "x"}], {})
    with pytest.raises(DatasetError, match="no qrels"):
        load_dataset(tmp_path / "noqrels")
    write_beir(tmp_path / "badline", [{"_id": "p", "title": "x"}], [{"_id": "q", "text": "x"}], {"test": [("q", "p", "x")]})
    with pytest.raises(DatasetError, match=r"test.tsv:2: score 'x' is not an integer"):
        load_dataset(tmp_path / "badline")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "product.csv").write_text("product_id\tproduct_name\n0\tx\n")
    (tmp_path / "w" / "query.csv").write_text("query_id\tquery\n0\tx\n")
    (tmp_path / "w" / "label.csv").write_text("id\tquery_id\tproduct_id\tlabel\n0\t0\t0\tGreat\n")
    with pytest.raises(DatasetError, match="unknown labels \\['Great'\\]"):
        load_dataset(tmp_path / "w")


def test_strata_by_traffic_share():
    strata = strata_from_frequency({"a": 60, "b": 20, "c": 10, "d": 5, "e": 5})
    assert strata == {"a": "head", "b": "torso", "c": "tail", "d": "tail", "e": "tail"}
