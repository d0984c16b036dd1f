"""The realistic synthetic style: title-only items, noisy and varied queries, many graded
judgements per query (most partly relevant), deterministic, readable by the loaders."""

import collections

from tailbridge.models.data.loaders import load_dataset

from tailbridge.synthetic import catalog as synth
from tailbridge.synthetic import realistic


def test_realistic_set_looks_like_a_real_catalog(tmp_path):
    ds = realistic.generate(items=300, seed=4)
    assert ds == realistic.generate(items=300, seed=4)  # same seed, same data
    assert all(it.description == "" and not it.category_path and not it.attributes for it in ds.items)
    assert any(any(c.isdigit() for c in it.title.split()[-1]) for it in ds.items)  # model numbers in titles
    forms = collections.Counter(q.form for q in ds.queries)
    assert forms["model"] and forms["spec"] and forms["noun"]  # partial model numbers, specs, bare nouns
    judged = [len(j) for j in ds.qrels.values()]
    assert min(judged) >= 10 and sum(judged) / len(judged) >= 20  # many judged items per query
    grades = collections.Counter(g for j in ds.qrels.values() for g in j.values())
    assert grades[1] + grades[2] > grades[3] and grades[0] > 0  # most judged items are partly relevant
    synth.write(ds, tmp_path)
    data = load_dataset(tmp_path)
    assert len(data.items) == 300 and data.split("train") and data.split("test")
    assert set(data.strata.values()) == {"head", "torso", "tail"}
