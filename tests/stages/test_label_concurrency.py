"""Concurrent annotators on SQLite and PostgreSQL: nothing lost, nothing duplicated, overlap exact.

20 simulated annotators, each in its own thread, label 30 items with overlap 3 through the
same store API the browser uses. Submit latency is printed (p50 / p95), never asserted:
speed targets live in bench/.
"""

from __future__ import annotations

import random
import statistics
import threading
from collections import Counter

import pytest
from sqlalchemy import select

from conftest import pg_schema_url
from labeling_app import auth
from labeling_app.assign import next_item
from labeling_app.labels import label_records, load_task_set
from labeling_app.simulated import run_annotators
from labeling_app.store import Assignment, LabelStore
from rlhf import data
from rlhf.artifacts import ArtifactStore

ANNOTATORS, ITEMS, OVERLAP = 20, 30, 3


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """A store on a temporary SQLite file, or in a fresh PostgreSQL schema dropped afterwards."""
    if request.param == "sqlite":
        s = LabelStore(f"sqlite:///{tmp_path / 'labels.db'}")
        yield s
        s.close()
        return
    with pg_schema_url() as url:
        s = LabelStore(url)
        try:
            yield s
        finally:
            s.close()


def task_set(store: LabelStore, tmp_path, n_items: int, overlap: int) -> str:
    arts = ArtifactStore(tmp_path / "ws")
    rng = random.Random(0)
    rows = [{"prompt_id": f"p{i:02d}", "prompt": [{"role": "user", "content": f"question {i}"}],
             "responses": [{"response_id": f"r{j}", "text": f"reply {j} score={rng.gauss(0, 1):.3f}", "model": "m"}
                           for j in range(4)]} for i in range(n_items)]
    with arts.create("dataset", "candidates", stage="generate", config={"schema": "candidates"}) as w:
        data.write_rows(w.path / data.DATA_FILE, rows)
    return load_task_set(store, arts, w.result.ref, overlap=overlap).task_set.name


def test_concurrent_annotators_lose_and_duplicate_nothing(store, tmp_path, capsys):
    name = task_set(store, tmp_path, ITEMS, OVERLAP)
    names = [f"sim-{i:02d}" for i in range(ANNOTATORS)]
    result = run_annotators(store, names, name, seed=0, workers=ANNOTATORS, temperature=0.5,
                            score_fn=lambda prompt, text: float(text.split("score=")[1]))

    # Every submit that returned is in the store exactly once, and nothing else is.
    records = label_records(store, name)
    assert len(result.submitted) == ITEMS * OVERLAP
    assert sorted((r.annotator, r.item_id) for r in records) == sorted(result.submitted)
    # Every item has exactly `overlap` labels, from distinct annotators.
    per_item = Counter(r.item_id for r in records)
    assert per_item == Counter({item.id: OVERLAP for item in store.items(name)})
    assert len({(r.annotator, r.item_id) for r in records}) == len(records)
    with store.session() as s:
        assert Counter(s.scalars(select(Assignment.status))) == Counter(done=ITEMS * OVERLAP)

    q = statistics.quantiles(result.submit_seconds, n=100)
    with capsys.disabled():
        print(f"\n[{store.dialect}] submit latency, {len(result.submit_seconds)} submits by {ANNOTATORS} concurrent "
              f"annotators: p50 {q[49] * 1000:.1f} ms, p95 {q[94] * 1000:.1f} ms")


def test_annotators_racing_for_one_item_never_overfill_it(store, tmp_path):
    name = task_set(store, tmp_path, 1, OVERLAP)
    users = [auth.add_user(store, f"racer-{i:02d}")[0] for i in range(ANNOTATORS)]
    start = threading.Barrier(ANNOTATORS)
    got, errors = [], []

    def race(user):
        start.wait()  # all ask at once
        try:
            got.append(next_item(store, user, name))
        except Exception as e:  # noqa: BLE001 -- asserted below: a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=race, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(g is not None for g in got) == OVERLAP
