"""The labeling store: schema, users and login throttling, leases, submit / revise / skip, admin views.

Store tests run on SQLite and on the local PostgreSQL (each run in its own schema). Times
are passed as `now=` instead of sleeping.
"""

from __future__ import annotations

import datetime as dt
import sqlite3

import pytest
from sqlalchemy import text

from conftest import label_of, pg_schema_url
from labeling_app import auth
from labeling_app.assign import next_item, peek_item, start_item
from labeling_app.labels import (annotator_progress, flagged_items, last_label, load_ab_task_set,
                                 load_task_set, progress, revise, skip, submit, submit_ab, task_set_progress)
from labeling_app.store import SCHEMA_VERSION, Assignment, Item, Label, LabelStore
from rlhf import data
from rlhf.artifacts import ArtifactStore
from rlhf.errors import RlhfError

T0 = dt.datetime(2026, 1, 1, 12, 0, 0)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = LabelStore(f"sqlite:///{tmp_path / 'labels.db'}")
        yield s
        s.close()
    else:
        with pg_schema_url() as url:
            s = LabelStore(url)
            yield s
            s.close()


@pytest.fixture
def arts(tmp_path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "ws")


def make_candidates(arts: ArtifactStore, n_items: int = 4, n_responses: int = 4, name: str = "candidates",
                    model: str = "checkpoints/sft:v1", tag: str = "") -> str:
    """Publish a candidates dataset; return its exact ref."""
    rows = [{"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": f"question {i}"}],
             "responses": [{"response_id": f"p{i}-r{j}", "text": f"{tag}answer {j} to question {i}", "model": model}
                           for j in range(n_responses)]} for i in range(n_items)]
    with arts.create("dataset", name, stage="generate", config={"schema": "candidates"}) as w:
        data.write_rows(w.path / data.DATA_FILE, rows)
    return w.result.ref


@pytest.fixture
def ts(store, arts) -> str:
    """A ranking task set of 4 items x 4 responses, overlap 2."""
    return load_task_set(store, arts, make_candidates(arts), overlap=2).task_set.name


def users(store, *names):
    return [auth.add_user(store, n)[0] for n in names]


def ranking_of(item) -> list[list[str]]:
    return [[rid] for rid in item.response_ids]


# -- schema and engine ------------------------------------------------------------------------


def test_sqlite_runs_in_wal_mode_with_foreign_keys_and_a_schema_version(tmp_path):
    db = tmp_path / "labels.db"
    LabelStore(f"sqlite:///{db}").close()
    store = LabelStore(f"sqlite:///{db}")  # opening an existing database is fine
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    store.close()
    raw = sqlite3.connect(db)
    assert raw.execute("SELECT id, version FROM schema_version").fetchall() == [(1, SCHEMA_VERSION)]
    raw.execute("UPDATE schema_version SET version = 99")
    raw.commit()
    raw.close()
    with pytest.raises(RlhfError, match="schema v99, newer than"):
        LabelStore(f"sqlite:///{db}")


def test_a_v1_database_migrates_and_its_finished_items_are_marked_complete(store, ts):
    """v2 added items.complete; a v1 database gets it filled in from the labels already there."""
    a, b, c = users(store, "a", "b", "c")
    for user in (a, b):  # overlap 2: both finish the first item; c leases the second
        item, _ = next_item(store, user, ts, now=T0)
        submit(store, user, item.id, ranking_of(item), now=T0)
    held, _ = next_item(store, c, ts, now=T0)
    with store.engine.begin() as conn:  # back to the v1 schema, as an older rlhf-suite left it
        conn.execute(text("DROP INDEX ix_items_open"))
        conn.execute(text("ALTER TABLE items DROP COLUMN complete"))
        conn.execute(text("UPDATE schema_version SET version = 1"))
    url = store.url
    store.close()
    migrated = LabelStore(url)
    try:
        with migrated.engine.connect() as conn:
            assert conn.execute(text("SELECT version FROM schema_version")).scalar() == SCHEMA_VERSION
            complete = dict(conn.execute(text("SELECT id, complete FROM items ORDER BY id")).all())
        assert [bool(v) for v in complete.values()] == [True, False, False, False]
        assert held.id != item.id
        # The finished item is passed over; the third annotator keeps their lease.
        assert next_item(migrated, c, ts, now=T0)[0].id == held.id
        d = users(migrated, "d")[0]
        assert next_item(migrated, d, ts, now=T0)[0].id == held.id  # overlap 2: c's item has a slot left
    finally:
        migrated.close()


def test_a_connection_the_server_dropped_is_replaced_and_the_call_rerun(arts):
    """No pre-ping: a pooled connection killed under the pool fails once, and the call reruns on a fresh one."""
    with pg_schema_url() as url:
        store = LabelStore(url)
        try:
            ts_name = load_task_set(store, arts, make_candidates(arts), overlap=2).task_set.name
            user = users(store, "a")[0]
            item, _ = next_item(store, user, ts_name, now=T0)
            with store.engine.connect() as conn:  # the one connection the pool holds after serial use
                pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            with LabelStore(url).engine.connect() as admin:
                assert admin.exec_driver_sql(f"SELECT pg_terminate_backend({pid})").scalar()
            submit(store, user, item.id, ranking_of(item), now=T0)
            assert label_of(store, user, item.id).ranking == [sorted(g) for g in ranking_of(item)]
        finally:
            store.close()


def test_only_label_commits_wait_for_the_disk_on_sqlite(tmp_path, arts):
    """A lease may be lost to a power cut without harm; a label may not (synchronous=FULL)."""
    from sqlalchemy import event

    store = LabelStore(f"sqlite:///{tmp_path / 'labels.db'}")
    ts_name = load_task_set(store, arts, make_candidates(arts), overlap=2).task_set.name
    user = users(store, "a")[0]
    seen: list[str] = []
    event.listen(store.engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *args: seen.append(statement) if "synchronous" in statement else None)
    item, _ = next_item(store, user, ts_name, now=T0)
    lease = list(seen)
    submit(store, user, item.id, ranking_of(item), now=T0)
    assert lease == ["PRAGMA synchronous=NORMAL"] and seen[len(lease):] == ["PRAGMA synchronous=FULL"]
    store.close()


def test_workspace_url_comes_from_the_argument_then_the_environment_then_the_workspace(tmp_path, monkeypatch):
    monkeypatch.delenv("RLHF_LABEL_DB", raising=False)
    store = LabelStore.for_workspace(tmp_path / "ws")
    assert store.url == f"sqlite:///{tmp_path / 'ws' / 'labels.db'}" and (tmp_path / "ws" / "labels.db").exists()
    store.close()
    monkeypatch.setenv("RLHF_LABEL_DB", f"sqlite:///{tmp_path / 'env.db'}")
    store = LabelStore.for_workspace(tmp_path / "ws")
    assert store.url.endswith("env.db")
    store.close()
    store = LabelStore.for_workspace(tmp_path / "ws", f"sqlite:///{tmp_path / 'arg.db'}")
    assert store.url.endswith("arg.db")
    store.close()


def test_a_bad_or_unreachable_database_is_one_clear_error():
    with pytest.raises(RlhfError, match="cannot open the labels database") as info:
        LabelStore("postgresql+psycopg2://nobody:secret@127.0.0.1:1/none")
    assert "secret" not in str(info.value)
    with pytest.raises(RlhfError, match="not a usable database URL"):
        LabelStore("labels.db")


# -- users and login ----------------------------------------------------------------------------


def test_only_the_token_hash_is_stored_and_names_are_unique(store):
    user, token = auth.add_user(store, "alice", "admin")
    assert user.is_admin and len(token) >= 40
    with store.engine.connect() as conn:
        dumped = " ".join(str(v) for row in conn.execute(text("SELECT * FROM users")) for v in row)
    assert token not in dumped and auth.hash_token(token) in dumped
    with pytest.raises(RlhfError, match="already exists"):
        auth.add_user(store, "alice")
    with pytest.raises(RlhfError, match="role 'boss' is not valid"):
        auth.add_user(store, "bob", "boss")
    with pytest.raises(RlhfError, match="not valid"):
        auth.add_user(store, "no spaces")


def test_a_wrong_token_is_refused_and_a_right_one_accepted(store):
    _, token = auth.add_user(store, "alice")
    assert auth.authenticate(store, token + "x", "ip-1", now=T0) is None
    assert auth.authenticate(store, "", "ip-1", now=T0) is None
    assert auth.authenticate(store, token, "ip-1", now=T0).name == "alice"


def test_repeated_failures_lock_the_client_out_with_exponential_backoff(store):
    _, token = auth.add_user(store, "alice")
    for i in range(auth.FREE_FAILURES - 1):
        assert auth.authenticate(store, "guess", "ip-1", now=T0) is None
    assert auth.locked_until(store, "ip-1", now=T0) is None
    # The FREE_FAILURES-th failure locks ip-1 for BASE_LOCKOUT (30 s).
    assert auth.authenticate(store, "guess", "ip-1", now=T0) is None
    assert auth.locked_until(store, "ip-1", now=T0) == T0 + auth.BASE_LOCKOUT
    # While locked, even the right token is refused; another client is unaffected.
    assert auth.authenticate(store, token, "ip-1", now=T0 + dt.timedelta(seconds=29)) is None
    assert auth.authenticate(store, token, "ip-2", now=T0).name == "alice"
    # After the lockout one more failure doubles it: 60 s.
    t1 = T0 + dt.timedelta(seconds=31)
    assert auth.authenticate(store, "guess", "ip-1", now=t1) is None
    assert auth.locked_until(store, "ip-1", now=t1) == t1 + 2 * auth.BASE_LOCKOUT
    # Once it passes, the right token works and clears the record.
    t2 = t1 + dt.timedelta(seconds=61)
    assert auth.authenticate(store, token, "ip-1", now=t2).name == "alice"
    assert auth.authenticate(store, "guess", "ip-1", now=t2) is None
    assert auth.locked_until(store, "ip-1", now=t2) is None  # a fresh count: 1 failure is free


def test_a_success_never_resets_another_clients_count_and_a_guessed_prefix_locks_across_sessions(store):
    _, token = auth.add_user(store, "alice")
    for i in range(auth.FREE_FAILURES - 1):
        assert auth.authenticate(store, f"guess-{i}-of-many", "session-1", now=T0) is None
    assert auth.authenticate(store, token, "session-2", now=T0).name == "alice"
    # session-1's count went on: its next failure is the 5th and locks it.
    assert auth.authenticate(store, "another-guess", "session-1", now=T0) is None
    assert auth.locked_until(store, "session-1", now=T0) == T0 + auth.BASE_LOCKOUT
    # Guessing the rest of a known token beginning from fresh sessions meets that prefix's lock.
    known = token[:auth.PREFIX_CHARS]
    for i in range(auth.FREE_FAILURES):
        assert auth.authenticate(store, known + f"guess{i}", f"fresh-{i}", now=T0) is None
    assert auth.authenticate(store, token, "fresh-last", now=T0) is None
    assert auth.authenticate(store, token, "fresh-last", now=T0 + auth.BASE_LOCKOUT).name == "alice"


def test_lockout_backoff_is_capped_and_old_failures_are_forgotten(store):
    assert auth.lockout_for(auth.FREE_FAILURES - 1) == dt.timedelta(0)
    assert auth.lockout_for(auth.FREE_FAILURES + 2) == 4 * auth.BASE_LOCKOUT
    assert auth.lockout_for(100) == auth.MAX_LOCKOUT
    auth.add_user(store, "alice")
    for _ in range(auth.FREE_FAILURES):
        auth.authenticate(store, "guess", "ip-1", now=T0)
    later = T0 + auth.FORGET_AFTER + dt.timedelta(seconds=1)
    assert auth.locked_until(store, "ip-1", now=later) is None
    assert auth.authenticate(store, "guess", "ip-1", now=later) is None
    assert auth.locked_until(store, "ip-1", now=later) is None  # counting restarted at 1


# -- task sets ----------------------------------------------------------------------------------


def test_loading_candidates_makes_one_item_per_prompt_and_records_the_source(store, arts):
    ref = make_candidates(arts, n_items=3)
    loaded = load_task_set(store, arts, ref, overlap=2)
    assert (loaded.items, loaded.skipped, loaded.task_set.name) == (3, {}, "candidates-v1")
    assert loaded.task_set.candidate_refs == [{"ref": ref, "content_hash": arts.resolve(ref).content_hash}]
    item = store.items("candidates-v1")[0]
    assert item.prompt_id == "p0" and item.response_ids == ["p0-r0", "p0-r1", "p0-r2", "p0-r3"]
    assert item.responses[0]["model"] == "checkpoints/sft:v1"
    with pytest.raises(RlhfError, match="already exists; pass --name"):
        load_task_set(store, arts, ref)


def test_loading_refuses_what_is_not_a_candidates_dataset(store, arts):
    with arts.create("dataset", "prompts", stage="data import", config={"schema": "prompts"}) as w:
        data.write_rows(w.path / data.DATA_FILE, [{"prompt_id": "p", "prompt": [{"role": "user", "content": "q"}]}])
    with pytest.raises(RlhfError, match="'prompts' dataset; labeling needs a candidates dataset"):
        load_task_set(store, arts, "prompts:latest")
    with pytest.raises(RlhfError, match="no artifact named 'nope'"):
        load_task_set(store, arts, "nope:v1")
    with pytest.raises(RlhfError, match="no prompt has 2 or more responses"):
        load_task_set(store, arts, make_candidates(arts, n_responses=1))
    with pytest.raises(RlhfError, match="overlap must be at least 1"):
        load_task_set(store, arts, make_candidates(arts, name="c2"), overlap=0)


# -- leases ------------------------------------------------------------------------------------


def test_a_refresh_returns_the_same_item_in_the_same_order(store, ts):
    alice, = users(store, "alice")
    item, a = next_item(store, alice, ts, now=T0)
    again, b = next_item(store, alice, ts, now=T0 + dt.timedelta(seconds=60))
    assert (again.id, b.id, b.shown_order) == (item.id, a.id, a.shown_order)
    assert b.lease_expires_at > a.lease_expires_at  # the refresh renewed the lease
    assert sorted(a.shown_order) == item.response_ids
    shown = item.shown_responses(a.shown_order)
    assert [r["response_id"] for r in shown] == a.shown_order and all("model" not in r for r in shown)


def test_shown_order_is_random_per_annotator(store, arts):
    name = load_task_set(store, arts, make_candidates(arts, n_items=6), overlap=2).task_set.name
    alice, bob = users(store, "alice", "bob")
    orders = {}
    for user in (alice, bob):
        while (got := next_item(store, user, name, now=T0)) is not None:
            item, a = got
            orders[user.name, item.id] = a.shown_order
            submit(store, user, item.id, ranking_of(item), now=T0)
    items = {i for _, i in orders}
    # 24 orders of 4 responses: two annotators seeing the same order on all 6 items is a bug.
    assert any(orders["alice", i] != orders["bob", i] for i in items)
    assert len({tuple(orders["alice", i]) for i in items}) > 1


def test_each_item_goes_to_at_most_overlap_annotators(store, ts):
    alice, bob, carol = users(store, "alice", "bob", "carol")
    first = next_item(store, alice, ts, now=T0)[0]
    assert next_item(store, bob, ts, now=T0)[0].id == first.id  # overlap 2: items fill in order
    assert next_item(store, carol, ts, now=T0)[0].id != first.id


def test_an_expired_lease_returns_the_item_to_the_pool(store, arts):
    name = load_task_set(store, arts, make_candidates(arts, n_items=1), overlap=1).task_set.name
    alice, bob = users(store, "alice", "bob")
    item, _ = next_item(store, alice, name, lease_seconds=60, now=T0)
    assert next_item(store, bob, name, now=T0 + dt.timedelta(seconds=59)) is None
    taken, _ = next_item(store, bob, name, now=T0 + dt.timedelta(seconds=61))
    assert taken.id == item.id
    # Alice's lease expired and the slot went to bob: her late submit is refused, and she
    # does not get the item back.
    with pytest.raises(RlhfError, match="^not assigned: alice's lease on item .* expired"):
        submit(store, alice, item.id, ranking_of(item), now=T0 + dt.timedelta(seconds=62))
    assert next_item(store, alice, name, now=T0 + dt.timedelta(seconds=62)) is None


def test_an_expired_lease_is_still_honoured_while_its_slot_is_free(store, ts):
    alice, = users(store, "alice")
    item, a = next_item(store, alice, ts, lease_seconds=60, now=T0)
    later = T0 + dt.timedelta(hours=2)
    again, b = next_item(store, alice, ts, now=later)
    assert (again.id, b.id) == (item.id, a.id)
    assert submit(store, alice, item.id, ranking_of(item), now=later).revision == 1


def test_an_annotator_never_gets_the_same_item_twice(store, ts):
    alice, = users(store, "alice")
    first, _ = next_item(store, alice, ts, now=T0)
    skip(store, alice, first.id)
    seen = [first.id]
    while (got := next_item(store, alice, ts, now=T0)) is not None:
        item, _ = got
        seen.append(item.id)
        submit(store, alice, item.id, ranking_of(item), now=T0)
    assert sorted(seen) == sorted(i.id for i in store.items(ts)) and len(set(seen)) == len(seen)


# -- submit, revise, skip ---------------------------------------------------------------------------


def test_submit_saves_once_and_the_same_label_again_is_a_no_op(store, ts):
    alice, = users(store, "alice")
    item, a = next_item(store, alice, ts, now=T0)
    ranking = [[item.response_ids[1], item.response_ids[0]], [item.response_ids[2]], [item.response_ids[3]]]
    label = submit(store, alice, item.id, ranking, rationale="  clear  ", now=T0)
    # Ties are stored canonically (ids sorted within a group), the shown order is copied.
    assert label.ranking[0] == sorted(ranking[0]) and label.rationale == "clear"
    assert label.shown_order == a.shown_order and label.revision == 1
    again = submit(store, alice, item.id, ranking, rationale="clear", now=T0 + dt.timedelta(seconds=5))
    assert (again.id, again.submitted_at) == (label.id, label.submitted_at)
    with pytest.raises(RlhfError, match="already labeled by alice; revise it"):
        submit(store, alice, item.id, ranking_of(item), now=T0)
    with store.session() as s:
        assert s.query(Label).count() == 1
        assert s.get(Assignment, a.id).status == "done"


def test_a_ranking_must_be_a_partition_of_the_items_responses(store, ts):
    alice, = users(store, "alice")
    item, _ = next_item(store, alice, ts, now=T0)
    r0, r1, r2, r3 = item.response_ids
    bad = {
        "leaves out": [[r0], [r1], [r2]],
        "more than once": [[r0], [r1, r0], [r2], [r3]],
        "does not have: zz": [[r0], [r1], [r2], [r3, "zz"]],
        "non-empty list of response ids": [[r0], [], [r1, r2, r3]],
        "non-empty list of groups": [],
    }
    for message, ranking in bad.items():
        with pytest.raises(RlhfError, match=message):
            submit(store, alice, item.id, ranking, now=T0)
    with pytest.raises(RlhfError, match="a flag needs a reason"):
        submit(store, alice, item.id, ranking_of(item), flag="  ", now=T0)
    assert submit(store, alice, item.id, [[r0, r1, r2, r3]], now=T0).ranking == [sorted([r0, r1, r2, r3])]


def test_an_annotator_cannot_submit_for_an_item_not_assigned_to_them(store, ts):
    alice, bob = users(store, "alice", "bob")
    item, _ = next_item(store, alice, ts, now=T0)
    with pytest.raises(RlhfError, match="^not assigned: item .* is not assigned to bob"):
        submit(store, bob, item.id, ranking_of(item), now=T0)
    with pytest.raises(RlhfError, match="no item 999999"):
        submit(store, bob, 999999, ranking_of(item), now=T0)
    with pytest.raises(RlhfError, match="^not assigned"):
        skip(store, bob, item.id)


def test_revise_replaces_only_the_latest_submission_and_bumps_its_revision(store, ts):
    alice, = users(store, "alice")
    first, _ = next_item(store, alice, ts, now=T0)
    submit(store, alice, first.id, ranking_of(first), now=T0)
    with pytest.raises(RlhfError, match="^not assigned: alice has no submission"):
        revise(store, alice, first.id + 1000, ranking_of(first), now=T0)
    second, _ = next_item(store, alice, ts, now=T0)
    submit(store, alice, second.id, ranking_of(second), now=T0 + dt.timedelta(seconds=1))
    with pytest.raises(RlhfError, match=f"most recent submission .* item {second.id}, not {first.id}"):
        revise(store, alice, first.id, list(reversed(ranking_of(first))), now=T0)
    new = list(reversed(ranking_of(second)))
    revised = revise(store, alice, second.id, new, flag="typo in r0", now=T0 + dt.timedelta(seconds=9))
    assert (revised.ranking, revised.flag, revised.revision) == (new, "typo in r0", 2)
    assert revise(store, alice, second.id, new, flag="typo in r0", now=T0).revision == 2  # unchanged: no-op
    assert last_label(store, alice).id == revised.id and label_of(store, alice, second.id).revision == 2
    assert label_of(store, alice, first.id).revision == 1


def test_skip_returns_the_item_to_others_but_never_to_the_skipper(store, arts):
    name = load_task_set(store, arts, make_candidates(arts, n_items=1), overlap=1).task_set.name
    alice, bob = users(store, "alice", "bob")
    item, _ = next_item(store, alice, name, now=T0)
    assert next_item(store, bob, name, now=T0) is None
    assert skip(store, alice, item.id).status == "skipped"
    assert skip(store, alice, item.id).status == "skipped"  # again: nothing changes
    with pytest.raises(RlhfError, match="^not assigned"):
        submit(store, alice, item.id, ranking_of(item), now=T0)
    assert next_item(store, alice, name, now=T0) is None
    assert next_item(store, bob, name, now=T0)[0].id == item.id
    submit(store, bob, item.id, ranking_of(item), now=T0)
    with pytest.raises(RlhfError, match="cannot be skipped now"):
        skip(store, bob, item.id)


# -- progress and admin ---------------------------------------------------------------------------


def test_progress_counts_done_against_what_is_left_for_the_annotator(store, ts):
    alice, bob, carol = users(store, "alice", "bob", "carol")
    assert progress(store, alice, ts, now=T0) == (0, 4)
    item, _ = next_item(store, alice, ts, now=T0)
    submit(store, alice, item.id, ranking_of(item), flag="prompt is garbled", now=T0)
    assert progress(store, alice, ts, now=T0) == (1, 4)
    # bob and carol fill the second item (overlap 2) and bob the first: alice can no longer get item 2.
    for user in (bob, carol, bob):
        got, _ = next_item(store, user, ts, now=T0)
        submit(store, user, got.id, ranking_of(got), now=T0)
    assert progress(store, alice, ts, now=T0) == (1, 3)
    by_name = {p.name: p for p in annotator_progress(store, ts, now=T0)}
    assert (by_name["alice"].done, by_name["alice"].flagged, by_name["bob"].done) == (1, 1, 2)
    next_item(store, carol, ts, now=T0)
    assert [p.leased for p in annotator_progress(store, now=T0)] == [0, 0, 1]
    [p] = task_set_progress(store)
    assert (p.items, p.labels, p.needed, p.complete_items) == (4, 4, 8, 2)
    [flagged] = flagged_items(store, ts)
    assert (flagged.annotator, flagged.flag, flagged.item_id) == ("alice", "prompt is garbled", item.id)


# -- blind A/B ------------------------------------------------------------------------------------


def test_ab_items_hide_models_shuffle_sides_and_record_them_with_the_vote(store, arts):
    ref_a = make_candidates(arts, n_items=12, n_responses=2, name="cand-a", model="checkpoints/sft:v1", tag="A ")
    ref_b = make_candidates(arts, n_items=10, n_responses=1, name="cand-b", model="checkpoints/dpo:v1", tag="B ")
    loaded = load_ab_task_set(store, arts, ref_a, ref_b)
    assert (loaded.items, loaded.skipped) == (10, {f"only in {ref_a}": 2})
    items = store.items(loaded.task_set.name)
    assert all(item.response_ids == ["A", "B"] for item in items)
    models_on_a = [item.responses[0]["model"] for item in items]
    assert set(models_on_a) == {"checkpoints/sft:v1", "checkpoints/dpo:v1"}  # sides are shuffled per item
    alice, = users(store, "alice")
    item, a = next_item(store, alice, loaded.task_set.name, now=T0)
    assert a.shown_order == ["A", "B"]
    label = submit_ab(store, alice, item.id, "B", now=T0)
    assert (label.choice, label.ranking) == ("B", [["B"], ["A"]])
    assert (label.model_a, label.model_b) == (item.responses[0]["model"], item.responses[1]["model"])
    item2, _ = next_item(store, alice, loaded.task_set.name, now=T0)
    with pytest.raises(RlhfError, match="use submit_ab"):
        submit(store, alice, item2.id, [["A"], ["B"]], now=T0)
    both_bad = submit_ab(store, alice, item2.id, "both_bad", now=T0)
    assert both_bad.none_acceptable and both_bad.ranking == [["A", "B"]]
    with pytest.raises(RlhfError, match="choice 'C' is not valid"):
        submit_ab(store, alice, item2.id, "C", now=T0)
    with pytest.raises(RlhfError, match="differs between"):
        other = make_candidates(arts, n_items=2, name="cand-c", tag="C ")
        with arts.create("dataset", "cand-d", stage="generate", config={"schema": "candidates"}) as w:
            data.write_rows(w.path / data.DATA_FILE, [{"prompt_id": "p0", "prompt": [{"role": "user", "content": "x"}],
                                                       "responses": [{"response_id": "x", "text": "y"}]}])
        load_ab_task_set(store, arts, other, w.result.ref)


def test_peeking_holds_no_slot_and_starting_takes_one_unless_the_item_filled_meanwhile(store, arts):
    name = load_task_set(store, arts, make_candidates(arts, n_items=1), overlap=1).task_set.name
    alice, bob = users(store, "alice", "bob")
    item, order = peek_item(store, alice, name, now=T0)
    assert peek_item(store, bob, name, now=T0)[0].id == item.id  # looking took nothing
    started = start_item(store, alice, item.id, now=T0)
    assert started.status == "leased" and started.shown_order == order
    assert peek_item(store, bob, name, now=T0) is None
    with pytest.raises(RlhfError, match="other annotators took this item meanwhile"):
        start_item(store, bob, item.id, now=T0)
    assert peek_item(store, alice, name, now=T0)[0].id == item.id  # her own lease comes back
    submit(store, alice, item.id, [sorted(item.response_ids)], now=T0)
    assert peek_item(store, alice, name, now=T0) is None
