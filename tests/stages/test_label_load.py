"""bench/label_load.py runs briefly on SQLite and PostgreSQL, returns its result shape, and its audit comes out clean.

Only the shape and the audit are asserted (nothing lost, duplicated or overfilled; some
submits made): speed figures are the benchmark's to report, never a test's to assert.
"""

from __future__ import annotations

import json

import pytest

from bench import label_load
from conftest import pg_schema_url

# Enough items that 4 annotators flat out cannot finish them in 2 s: on the 2-core AMD EPYC of
# 2026-12-04 they submitted 825 labels/s on SQLite, and 300 items x overlap 3 ran out.
ANNOTATORS, SECONDS, ITEMS = 4, 2.0, 3000
KEYS = {"dialect", "annotators", "seconds", "think_s", "items", "overlap", "load_s", "wall_s", "submits", "submits_per_s",
        "submit_ms", "next_item_ms", "submits_per_s_by_window", "client_cpu_util", "submit_errors",
        "next_item_errors", "first_errors", "ran_out", "labels_in_db", "lost", "duplicated", "overfilled", "extra"}


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'labels.db'}"
        return
    with pg_schema_url() as u:
        yield u


def test_short_load_loses_and_duplicates_nothing(url, tmp_path):
    r = label_load.measure(url, tmp_path, ANNOTATORS, SECONDS, ITEMS)

    assert set(r) == KEYS
    assert r["dialect"] in url
    assert r["submits"] > 0 and r["submits_per_s"] > 0
    assert r["lost"] == r["duplicated"] == r["overfilled"] == r["extra"] == 0
    assert r["submit_errors"] == r["next_item_errors"] == r["ran_out"] == 0, r["first_errors"]
    assert r["labels_in_db"] == r["submits"]
    assert set(r["submit_ms"]) == {"p50", "p95", "p99"}
    assert 0 < r["submit_ms"]["p50"] <= r["submit_ms"]["p95"] <= r["submit_ms"]["p99"]
    assert r["wall_s"] >= SECONDS
    json.dumps(r)  # the result file is JSON


def test_main_writes_results_and_prints_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(label_load, "RESULTS", tmp_path / "results")
    assert label_load.main(["--backend", "sqlite", "--annotators", "2", "--seconds", "0.5", "--items", "50"]) == 0

    [out] = (tmp_path / "results").glob("label_load-*.json")
    saved = json.loads(out.read_text())
    assert set(saved["backends"]) == {"sqlite"} and saved["backends"]["sqlite"]["lost"] == 0
    assert "| sqlite | 2 |" in capsys.readouterr().out


def test_think_time_paces_each_annotator(tmp_path):
    """With a 0.5 s pause after each submit (and a start within one pause), an annotator submits
    at most once per pause in the run: ~4 in 2 s, against hundreds flat out."""
    r = label_load.measure(f"sqlite:///{tmp_path / 'labels.db'}", tmp_path, ANNOTATORS, SECONDS, ITEMS,
                           think=(0.5, 0.5))
    assert r["think_s"] == [0.5, 0.5] and r["lost"] == r["duplicated"] == 0
    assert 0 < r["submits"] <= ANNOTATORS * (SECONDS / 0.5 + 1)


def test_a_bad_think_range_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        label_load.main(["--think", "30,10"])
    assert e.value.code == 2 and "--think takes MIN,MAX" in capsys.readouterr().err
