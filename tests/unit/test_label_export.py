"""From labels to datasets: ranking-to-pairs, aggregation across annotators, export counts, the CLI."""

from __future__ import annotations

import argparse
import datetime as dt
import os

import pytest

from labeling_app import auth
from labeling_app.assign import next_item
from labeling_app.cli import add_label_parser, run_label
from labeling_app.export import aggregate_pairs, export, export_ab
from labeling_app.labels import load_ab_task_set, load_task_set, submit, submit_ab
from labeling_app.store import LabelStore
from rlhf import data
from rlhf.artifacts import ArtifactStore
from rlhf.errors import RlhfError

T0 = dt.datetime(2026, 1, 1, 12, 0, 0)


@pytest.fixture
def arts(tmp_path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "ws")


@pytest.fixture
def store(arts):
    s = LabelStore.for_workspace(arts.root, f"sqlite:///{arts.root.parent / 'labels.db'}")
    yield s
    s.close()


def make_candidates(arts: ArtifactStore, n_items: int = 3, n_responses: int = 3, name: str = "candidates",
                    model: str = "checkpoints/sft:v1") -> str:
    rows = [{"prompt_id": f"p{i}", "prompt": [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": f"question {i}"}],
             "responses": [{"response_id": f"r{j}", "text": f"{name} answer {j} to {i}", "model": model}
                           for j in range(n_responses)]} for i in range(n_items)]
    with arts.create("dataset", name, stage="generate", config={"schema": "candidates"}) as w:
        data.write_rows(w.path / data.DATA_FILE, rows)
    return w.result.ref


# -- pure conversion ----------------------------------------------------------------------------


def test_a_ranking_implies_every_pair_across_groups_and_a_tie_within_one():
    votes = aggregate_pairs([[["a"], ["b", "c"], ["d"]]], ["a", "b", "c", "d"])
    assert [(v.chosen, v.rejected) for v in votes if not v.is_tie] == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "d"),
                                                                       ("c", "d")]
    assert [(v.chosen, v.rejected, v.votes_tied, v.margin) for v in votes if v.is_tie] == [("b", "c", 1, 0.0)]


def test_votes_are_aggregated_per_pair_with_margin_from_agreement():
    r1, r2, r3 = [["a"], ["b"], ["c"]], [["b"], ["a"], ["c"]], [["a", "b"], ["c"]]
    votes = {(v.chosen, v.rejected): v for v in aggregate_pairs([r1, r2, r3], ["a", "b", "c"])}
    # a vs b: r1 a>b, r2 b>a, r3 tie -> 1 for, 1 against: a tie, no pair.
    assert votes["a", "b"].is_tie
    # a vs c and b vs c: all three put c last -> margin (3 - 0)/3 = 1.
    assert votes["a", "c"].margin == votes["b", "c"].margin == 1.0
    # Two of three put a above b, one below: chosen a, margin (2 - 1)/3.
    [v] = aggregate_pairs([r1, r1, r2], ["a", "b"], "all")
    assert (v.chosen, v.rejected, v.votes_for, v.votes_against, v.margin) == ("a", "b", 2, 1, pytest.approx(1 / 3))
    # A tie vote dilutes the margin: a>b, a>b, tie -> (2 - 0)/3.
    [v] = aggregate_pairs([r1, r1, r3], ["a", "b"], "all")
    assert v.margin == pytest.approx(2 / 3) and v.votes_tied == 1


def test_best_vs_rest_pairs_the_consensus_best_with_each_other_response():
    r1, r2 = [["a"], ["b"], ["c"]], [["a"], ["c"], ["b"]]
    # Mean mid-ranks: a 1, b 2.5, c 2.5 -> best a; pairs (a, b) and (a, c) only.
    assert [(v.chosen, v.rejected) for v in aggregate_pairs([r1, r2], ["a", "b", "c"], "best-vs-rest")] == [
        ("a", "b"), ("a", "c")]
    # r3 makes a and b share the best mean rank (1.5 each): both are paired with c, not with each other.
    r3, r4 = [["a"], ["b"], ["c"]], [["b"], ["a"], ["c"]]
    assert [(v.chosen, v.rejected) for v in aggregate_pairs([r3, r4], ["a", "b", "c"], "best-vs-rest")] == [
        ("a", "c"), ("b", "c")]


# -- export --------------------------------------------------------------------------------------


@pytest.fixture
def labeled(store, arts):
    """3 items x 3 responses, overlap 3. p0: alice, bob, carol (flagged); p1: alice (none acceptable), bob; p2: none."""
    ref = make_candidates(arts)
    name = load_task_set(store, arts, ref, overlap=3).task_set.name
    alice, bob, carol = (auth.add_user(store, n)[0] for n in ("alice", "bob", "carol"))
    p0 = {u.name: next_item(store, u, name, now=T0)[0] for u in (alice, bob, carol)}
    submit(store, alice, p0["alice"].id, [["r0"], ["r1"], ["r2"]], rationale="<b>r0</b> is exact", now=T0)
    submit(store, bob, p0["bob"].id, [["r0"], ["r2"], ["r1"]], now=T0)
    submit(store, carol, p0["carol"].id, [["r1"], ["r0"], ["r2"]], flag="prompt unclear", now=T0)
    p1 = {u.name: next_item(store, u, name, now=T0)[0] for u in (alice, bob)}
    submit(store, alice, p1["alice"].id, [["r0"], ["r1"], ["r2"]], none_acceptable=True, now=T0)
    submit(store, bob, p1["bob"].id, [["r1"], ["r0", "r2"]], now=T0)
    return ref, name


def test_export_writes_preferences_and_raw_rankings_with_counts(store, arts, labeled):
    _, name = labeled
    preferences, rankings = export(arts, store)
    m = preferences.manifest["metrics"]
    # p0 (alice, bob usable): r0>r1 2-0, r0>r2 2-0, r1 vs r2 split 1-1 (tie).
    # p1 (bob usable): r1>r0, r1>r2, r0 vs r2 tied.  p2: no labels, below min_annotators=1.
    assert {k: m[k] for k in ("items", "labels", "pairs", "ties", "excluded_flagged", "excluded_none_acceptable",
                              "skipped_min_annotators", "annotators", "rows")} == {
        "items": 3, "labels": 5, "pairs": 4, "ties": 2, "excluded_flagged": 1, "excluded_none_acceptable": 1,
        "skipped_min_annotators": 1, "annotators": 3, "rows": 4}
    # Agreement over usable labels: only p0 has two (alice vs bob): 2 of 3 pairs, alpha 7/12
    # (worked out in test_label_agreement.py for the same two orders).
    assert m["pairwise_agreement"] == pytest.approx(2 / 3) and m["krippendorff_alpha"] == pytest.approx(7 / 12)
    assert rankings.manifest["metrics"]["pairs"] == 4

    rows = data.load_rows(preferences, schema="preferences")
    first = rows[0]
    assert first["prompt"][-1] == {"role": "user", "content": "question 0"}
    assert first["chosen"] == [{"role": "assistant", "content": "candidates answer 0 to 0"}]
    assert first["rejected"] == [{"role": "assistant", "content": "candidates answer 1 to 0"}]
    assert first["margin"] == 1.0
    source = first["source"]
    assert {k: source[k] for k in ("task_set", "prompt_id", "chosen_id", "rejected_id", "n_annotators",
                                   "votes_for", "votes_against", "agree", "chosen_model")} == {
        "task_set": name, "prompt_id": "p0", "chosen_id": "r0", "rejected_id": "r1", "n_annotators": 2,
        "votes_for": 2, "votes_against": 0, "agree": 1.0, "chosen_model": "checkpoints/sft:v1"}
    assert [(r["source"]["prompt_id"], r["source"]["chosen_id"], r["source"]["rejected_id"]) for r in rows] == [
        ("p0", "r0", "r1"), ("p0", "r0", "r2"), ("p1", "r1", "r0"), ("p1", "r1", "r2")]

    raw = data.load_rows(rankings, schema="rankings")
    assert len(raw) == 5
    carol = next(r for r in raw if r["annotator"] == "carol")
    assert carol["flags"] == {"flag": "prompt unclear", "none_acceptable": False}
    alice_p0 = next(r for r in raw if r["annotator"] == "alice" and r["prompt_id"] == "p0")
    assert alice_p0["rationale"] == "<b>r0</b> is exact" and sorted(alice_p0["shown_order"]) == ["r0", "r1", "r2"]
    assert alice_p0["submitted_at"] == "2026-01-01T12:00:00Z"


def test_export_manifests_trace_back_to_the_candidates_and_the_task_set(store, arts, labeled):
    ref, name = labeled
    preferences, rankings = export(arts, store, pairs="best-vs-rest", min_annotators=2)
    candidates = arts.resolve(ref)
    [source] = rankings.manifest["inputs"]
    assert (source["role"], source["ref"], source["content_hash"]) == ("candidates", ref, candidates.content_hash)
    assert [i["role"] for i in preferences.manifest["inputs"]] == ["candidates", "rankings"]
    config = preferences.manifest["config"]
    assert (config["schema"], config["task_set"], config["pairs"], config["min_annotators"], config["candidates"]) == (
        "preferences", name, "best-vs-rest", 2, [ref])
    assert rankings.manifest["config"]["schema"] == "rankings"
    # min_annotators=2 leaves only p0; best-vs-rest there: mean ranks r0 1, r1 2.5, r2 2.5 -> r0 vs r1, r0 vs r2.
    m = preferences.manifest["metrics"]
    assert (m["pairs"], m["ties"], m["skipped_min_annotators"]) == (2, 0, 2)
    lineage = arts.lineage(preferences.ref)
    assert f"candidates: {ref}" in lineage and f"rankings: {rankings.ref}" in lineage


def test_export_refuses_when_there_is_nothing_to_write(store, arts):
    name = load_task_set(store, arts, make_candidates(arts), overlap=1).task_set.name
    with pytest.raises(RlhfError, match="has no labels yet"):
        export(arts, store)
    alice = auth.add_user(store, "alice")[0]
    item, _ = next_item(store, alice, name, now=T0)
    submit(store, alice, item.id, [["r0", "r1", "r2"]], now=T0)  # all tied: no pair
    with pytest.raises(RlhfError, match="gives no preference pair"):
        export(arts, store, task_set=name)
    assert arts.names("dataset") == ["candidates"]  # nothing half-written
    with pytest.raises(RlhfError, match="--pairs best is not valid"):
        export(arts, store, pairs="best")


def test_ab_votes_export_for_compare(store, arts):
    ref_a = make_candidates(arts, n_responses=1, name="cand-a", model="checkpoints/sft:v1")
    ref_b = make_candidates(arts, n_responses=1, name="cand-b", model="checkpoints/dpo:v1")
    name = load_ab_task_set(store, arts, ref_a, ref_b, overlap=2).task_set.name
    alice, bob = (auth.add_user(store, n)[0] for n in ("alice", "bob"))
    votes = {}
    for user, choices in ((alice, ["A", "tie", "both_bad"]), (bob, ["B", "A", "A"])):
        for choice in choices:
            item, _ = next_item(store, user, name, now=T0)
            votes[user.name, item.prompt_id] = (choice, item.responses[0]["model"], item.responses[1]["model"])
            submit_ab(store, user, item.id, choice, flag="odd" if (user.name, choice) == ("bob", "B") else None,
                      now=T0)
    with pytest.raises(RlhfError, match="is an A/B task set"):
        export(arts, store, task_set=name)
    art = export_ab(arts, store)
    rows = data.load_rows(art, schema="ab_votes")
    assert len(rows) == 5 and art.manifest["metrics"]["excluded_flagged"] == 1
    for row in rows:
        assert (row["choice"], row["model_a"], row["model_b"]) == votes[row["annotator"], row["prompt_id"]]
    by_model = art.manifest["metrics"]["by_model"]
    assert sum(c.get("wins", 0) for c in by_model.values()) == 3  # alice's A and bob's two A's
    assert by_model["checkpoints/sft:v1"]["both_bad"] == by_model["checkpoints/dpo:v1"]["both_bad"] == 1
    assert [i["ref"] for i in art.manifest["inputs"]] == [ref_a, ref_b]


# -- the CLI --------------------------------------------------------------------------------------


def label_cli(arts: ArtifactStore, *argv: str) -> int:
    """`rlhf label ...` through the parser and runner that rlhf/cli.py hooks in."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workspace", default=argparse.SUPPRESS)
    parser = argparse.ArgumentParser(prog="rlhf", parents=[common])
    add_label_parser(parser.add_subparsers(dest="command", required=True), common)
    return run_label(parser.parse_args(["label", *argv]), arts)


def test_cli_adds_users_loads_reports_and_exports(arts, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RLHF_LABEL_DB", raising=False)
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    assert label_cli(arts, "users", "add", "alice", "--role", "admin", "--db", db) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    store = LabelStore(db)
    assert auth.authenticate(store, token, "cli-test").name == "alice"
    with pytest.raises(RlhfError, match="user 'alice' already exists"):
        label_cli(arts, "--db", db, "users", "add", "alice")

    ref = make_candidates(arts)
    assert label_cli(arts, "load", ref, "--overlap", "2", "--db", db) == 0
    assert "loaded rank task set 'candidates-v1': 3 items x 2 annotators" in capsys.readouterr().out
    with pytest.raises(RlhfError, match="no artifact named 'candidatez'"):
        label_cli(arts, "load", "candidatez:v1", "--db", db)

    alice = store.user("alice")
    item, _ = next_item(store, alice)
    submit(store, alice, item.id, [["r2"], ["r0"], ["r1"]])
    assert label_cli(arts, "status", "--db", db) == 0
    out = capsys.readouterr().out
    assert "candidates-v1" in out and "1/6" in out and "alice" in out

    assert label_cli(arts, "export", "--db", db) == 0
    out = capsys.readouterr().out
    assert "wrote datasets/rankings:v1" in out and "wrote datasets/preferences:v1: 3 pairs" in out

    other = make_candidates(arts, n_responses=1, name="cand-b")
    assert label_cli(arts, "load-ab", ref, other, "--name", "ab1", "--db", db) == 0
    item, _ = next_item(store, alice, "ab1")
    submit_ab(store, alice, item.id, "tie")
    assert label_cli(arts, "export", "--task-set", "ab1", "--db", db) == 0
    assert "wrote datasets/ab_votes:v1: 1 votes" in capsys.readouterr().out
    store.close()


def test_cli_uses_the_workspace_database_by_default(arts, capsys, monkeypatch):
    monkeypatch.delenv("RLHF_LABEL_DB", raising=False)
    assert label_cli(arts, "users", "add", "bob") == 0
    assert (arts.root / "labels.db").exists()
    with pytest.raises(SystemExit):
        label_cli(arts, "load", "candidates:v1", "--overlap", "0")
    assert "must be at least 1" in capsys.readouterr().err


def test_the_labels_database_is_created_readable_by_its_owner_only(arts, monkeypatch):
    monkeypatch.delenv("RLHF_LABEL_DB", raising=False)
    previous = os.umask(0o022)  # the usual umask, which alone would make it 0644
    try:
        assert label_cli(arts, "users", "add", "bob") == 0
    finally:
        os.umask(previous)
    for path in arts.root.glob("labels.db*"):  # the database, and its -wal and -shm if left
        assert path.stat().st_mode & 0o777 == 0o600, path


def test_serve_listens_on_127_0_0_1_unless_told_and_rejects_a_bad_address(arts, capsys, monkeypatch):
    started: list[list[str]] = []

    class Server:
        def __init__(self, cmd, env):
            started.append(cmd)

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr("subprocess.Popen", Server)
    assert label_cli(arts, "serve") == 0
    assert label_cli(arts, "serve", "--address", "0.0.0.0", "--port", "9000") == 0
    default, everywhere = started
    assert default[default.index("--server.address") + 1] == "127.0.0.1"
    assert everywhere[everywhere.index("--server.address") + 1] == "0.0.0.0"
    assert "on http://127.0.0.1:8501" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        label_cli(arts, "serve", "--address", "not a host!")
    assert exit_.value.code == 2
    assert "'not a host!' is not an IP address or host name" in capsys.readouterr().err
