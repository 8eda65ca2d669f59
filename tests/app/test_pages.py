"""The labeling app's pages under Streamlit's AppTest: login, ranking, A/B, admin, escaping.

Each test builds a workspace with a SQLite labels database, users and task sets through
the backend API, then drives `labeling_app/app.py` as a browser would: typing, clicking,
reloading (a new AppTest with the session id from the URL) and opening a second tab (two
AppTests on one session id). What the pages claim is checked against the store.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from labeling_app import auth, labels, sessions, ui
from labeling_app.assign import next_item, peek_item
from conftest import label_of
from labeling_app.labels import (agreement_report, label_records, load_ab_task_set, load_task_set,
                                 submit)
from labeling_app.store import Assignment, Item, LabelStore, TaskSet
from rlhf import data
from rlhf.artifacts import ArtifactStore
from rlhf.errors import RlhfError

APP = Path(__file__).resolve().parents[2] / "labeling_app" / "app.py"
CONVERSATION = [{"role": "system", "content": "You answer questions about bikes."},
                {"role": "user", "content": "How often should I oil my chain?"},
                {"role": "assistant", "content": "It depends on how you ride. Where do you ride?"},
                {"role": "user", "content": "Mostly in the rain."}]
HOSTILE = "<script>alert('pwned')</script> and <b>bold</b> **not bold** [link](javascript:alert(1))"
SECRET_MODEL = "checkpoints/secret-model:v7"


@dataclass
class Env:
    store: LabelStore
    arts: ArtifactStore
    task_set: str
    tokens: dict[str, str]


def make_candidates(arts: ArtifactStore, n_items: int = 3, name: str = "candidates", model: str = SECRET_MODEL,
                    texts: list[str] | None = None) -> str:
    texts = texts or [f"reply {j}" for j in range(4)]
    rows = [{"prompt_id": f"p{i}", "prompt": CONVERSATION,
             "responses": [{"response_id": f"r{j}", "text": f"{t} (item {i})", "model": model}
                           for j, t in enumerate(texts)]} for i in range(n_items)]
    with arts.create("dataset", name, stage="generate", config={"schema": "candidates"}) as w:
        data.write_rows(w.path / data.DATA_FILE, rows)
    return w.result.ref


@pytest.fixture
def env(tmp_path, monkeypatch) -> Env:
    """3 ranking items x 4 responses (overlap 2); annotators alice and bob, admin root."""
    ws, db = tmp_path / "ws", f"sqlite:///{tmp_path / 'labels.db'}"
    monkeypatch.setenv("RLHF_WORKSPACE", str(ws))
    monkeypatch.setenv("RLHF_LABEL_DB", db)
    store, arts = LabelStore(db), ArtifactStore(ws)
    texts = [HOSTILE, "Oil it every week.", "Never.", "After every wet ride, then wipe it."]
    ts = load_task_set(store, arts, make_candidates(arts, texts=texts), overlap=2).task_set.name
    tokens = {name: auth.add_user(store, name, role)[1]
              for name, role in (("alice", "annotator"), ("bob", "annotator"), ("root", "admin"))}
    yield Env(store, arts, ts, tokens)
    store.close()


# -- driving the app --------------------------------------------------------------------------


def open_app(sid: str | None = None) -> AppTest:
    """A fresh browser load of the app, with the URL's session id if given (a reload or a second tab)."""
    at = AppTest.from_file(str(APP), default_timeout=30)
    if sid:
        at.query_params[ui.SESSION_PARAM] = sid
    return at.run()


def log_in(env: Env, name: str, token: str | None = None) -> AppTest:
    at = open_app()
    at.text_input(key="login_token").input(token or env.tokens[name])
    at.button(key="login_submit").click().run()
    assert not at.exception, at.exception
    return at


def sid_of(at: AppTest) -> str:
    return at.query_params[ui.SESSION_PARAM]


def lease(env: Env, name: str, kind: str = "rank") -> tuple[Item, list[str]]:
    """The item of `kind` the user's page is showing (their lease, else the next open item) and its shown order."""
    user = env.store.user(name)
    kinds = [ts.name for ts in env.store.task_sets() if ts.kind == kind]
    return peek_item(env.store, user, kinds[-1] if kind == "ab" else env.task_set)


def set_ranks(at: AppTest, prefix: str, ranks: list[int | None]) -> AppTest:
    for i, rank in enumerate(ranks):
        at.radio(key=f"{prefix}_rank_{i}").set_value(rank)
    return at


def click(at: AppTest, key: str) -> AppTest:
    at.button(key=key).click().run()
    assert not at.exception, at.exception
    return at


def page_text(at: AppTest) -> str:
    """Every element's content on the page, as one string, for "is X shown anywhere" checks."""
    out: list[str] = []

    def walk(node) -> None:
        proto = getattr(node, "proto", None)
        if proto is not None:
            out.append(str(proto))
        for child in getattr(node, "children", {}).values():
            walk(child)

    walk(at._tree)
    return "\n".join(out)


def messages(at: AppTest, kind: str) -> list[str]:
    return [e.value for e in getattr(at, kind)]


# -- pure helpers ---------------------------------------------------------------------------


def test_ranks_on_the_page_become_groups_best_first_with_equal_ranks_tied():
    shown = ["r2", "r0", "r3", "r1"]  # letters A..D
    assert ui.ranking_from_ranks([2, 1, 2, 3], shown, allow_unranked=False) == [["r0"], ["r2", "r3"], ["r1"]]
    assert ui.ranks_from_ranking([["r0"], ["r2", "r3"], ["r1"]], shown) == [2, 1, 2, 3]
    assert ui.describe_ranking([["r0"], ["r2", "r3"], ["r1"]], shown) == "B > A = C > D"
    assert ui.ranking_from_ranks([None] * 4, shown, allow_unranked=True) == [["r0", "r1", "r2", "r3"]]
    with pytest.raises(RlhfError, match="rank every response"):
        ui.ranking_from_ranks([None] * 4, shown, allow_unranked=False)
    with pytest.raises(RlhfError, match="give response B, D a rank"):
        ui.ranking_from_ranks([1, None, 2, None], shown, allow_unranked=True)


def test_sessions_expire_when_idle_are_extended_by_use_and_end_at_logout(env):
    alice = env.store.user("alice")
    t0 = dt.datetime(2026, 1, 1, 12)
    sid = sessions.create_session(env.store, alice, now=t0)
    with env.store.session() as s:
        assert s.scalar(select(sessions.WebSession.id_hash)) != sid  # only the hash is stored
    assert sessions.resolve_session(env.store, sid, now=t0 + dt.timedelta(hours=11)).name == "alice"
    # That use moved the idle deadline to t0 + 23 h.
    assert sessions.resolve_session(env.store, sid, now=t0 + dt.timedelta(hours=22)).name == "alice"
    assert sessions.resolve_session(env.store, sid, now=t0 + dt.timedelta(hours=35)) is None
    assert sessions.resolve_session(env.store, "made-up") is None
    sid = sessions.create_session(env.store, alice)
    sessions.end_session(env.store, sid)
    assert sessions.resolve_session(env.store, sid) is None


# -- login --------------------------------------------------------------------------------------


def test_a_wrong_token_is_refused_and_the_right_one_logs_in(env):
    at = log_in(env, "alice", token="not-a-real-token")
    assert messages(at, "error") == ["That token is not valid."]
    assert ui.SESSION_PARAM not in at.query_params and messages(at, "title") == ["Sign in to label"]

    at.text_input(key="login_token").input(env.tokens["alice"])
    at.button(key="login_submit").click().run()
    assert messages(at, "title") == ["Rank the responses"] and not at.error
    assert env.tokens["alice"] not in str(at.query_params)  # the URL carries a session id, never the token
    assert sessions.resolve_session(env.store, sid_of(at)).name == "alice"


def test_repeated_failures_lock_the_client_out_even_for_the_right_token(env):
    at = open_app()
    for _ in range(auth.FREE_FAILURES):
        at.text_input(key="login_token").input("wrong")
        at.button(key="login_submit").click().run()
    # The 5th failure locks the client for auth.BASE_LOCKOUT (30 s), counted down from when it failed.
    [locked] = messages(at, "error")
    assert re.fullmatch(r"Too many failed logins\. Try again in (2\d|30) seconds\.", locked), locked
    at.text_input(key="login_token").input(env.tokens["alice"])
    at.button(key="login_submit").click().run()
    assert messages(at, "title") == ["Sign in to label"] and "Too many failed logins" in messages(at, "error")[0]


def test_a_reload_keeps_the_user_signed_in_and_logout_ends_the_session(env):
    sid = sid_of(log_in(env, "alice"))
    reloaded = open_app(sid)
    assert messages(reloaded, "title") == ["Rank the responses"]
    assert "Signed in as **alice** (annotator)" in messages(reloaded, "markdown")

    click(reloaded, "logout")
    assert messages(reloaded, "title") == ["Sign in to label"] and ui.SESSION_PARAM not in reloaded.query_params
    assert messages(open_app(sid), "title") == ["Sign in to label"]
    assert messages(open_app("forged-session-id"), "title") == ["Sign in to label"]


# -- ranking ------------------------------------------------------------------------------------


def test_the_page_shows_the_conversation_then_the_responses_in_the_recorded_order(env):
    at = log_in(env, "alice")
    item, shown = lease(env, "alice")
    texts = messages(at, "text")
    # The four messages of the conversation, in order, each under its role, then the responses.
    assert texts[:4] == [m["content"] for m in CONVERSATION]
    assert messages(at, "caption")[:4] == ["System", "User", "Assistant", "User"]
    by_id = {r["response_id"]: r["text"] for r in item.responses}
    assert texts[4:8] == [by_id[rid] for rid in shown]
    assert [m for m in messages(at, "markdown") if m.startswith("**Response")] == [
        "**Response A**", "**Response B**", "**Response C**", "**Response D**"]
    assert at.get("progress")[0].proto.text == "0 / 3 done"
    # Shortcuts are documented and bound to this item's widgets.
    assert any("Ctrl+Enter submits" in c for c in messages(at, "caption"))
    script = at.get("iframe")[0].proto.srcdoc
    assert f'"submit": "item{item.id}_submit"' in script and f"item{item.id}_rank_3" in script


def test_submit_stores_the_ranking_groups_and_shown_order_and_only_then_says_saved(env):
    at = log_in(env, "alice")
    item, shown = lease(env, "alice")
    prefix = f"item{item.id}"
    alice = env.store.user("alice")

    click(at, f"{prefix}_submit")
    assert "rank every response first" in messages(at, "error")[0] and label_of(env.store, alice, item.id) is None
    click(set_ranks(at, prefix, [1, None, 2, None]), f"{prefix}_submit")
    assert "give response B, D a rank too" in messages(at, "error")[0].replace("\\", "")

    set_ranks(at, prefix, [2, 1, 2, 3])
    at.text_area(key=f"{prefix}_rationale").input("B is the only complete answer.")
    click(at, f"{prefix}_submit")
    assert messages(at, "success") == ["Saved. Your ranking: B > A = C > D"]
    label = label_of(env.store, alice, item.id)
    a, b, c, d = shown
    assert label.ranking == [[b], sorted([a, c]), [d]] and label.shown_order == shown
    assert label.rationale == "B is the only complete answer." and label.flag is None and not label.none_acceptable

    # The page moved on to the next item and counts the label.
    assert lease(env, "alice")[0].id != item.id and at.get("progress")[0].proto.text == "1 / 3 done"
    assert "Ranking: B > A = C > D" in messages(at, "markdown")


def test_none_acceptable_or_a_flag_makes_ranks_optional_and_is_stored(env):
    at = log_in(env, "alice")
    item, _ = lease(env, "alice")
    prefix = f"item{item.id}"
    at.checkbox(key=f"{prefix}_none").check()
    at.text_input(key=f"{prefix}_flag").input("The prompt is cut off.")
    click(at, f"{prefix}_submit")
    label = label_of(env.store, env.store.user("alice"), item.id)
    assert label.ranking == [sorted(item.response_ids)] and label.none_acceptable
    assert label.flag == "The prompt is cut off."
    # Said as what it is, never as "A = B = C = D", which reads as a four-way tie.
    assert messages(at, "success") == ["Saved as none acceptable and flagged, with no ranking."]
    assert "Ranking: no ranking (none acceptable, flagged)" in messages(at, "markdown")


def test_a_second_submit_of_the_same_label_is_a_no_op_and_the_last_submission_can_be_revised(env):
    tab1 = log_in(env, "alice")
    tab2, tab3 = open_app(sid_of(tab1)), open_app(sid_of(tab1))  # the same item in three tabs
    item, shown = lease(env, "alice")
    prefix = f"item{item.id}"
    alice = env.store.user("alice")

    click(set_ranks(tab1, prefix, [1, 2, 3, 4]), f"{prefix}_submit")
    first = label_of(env.store, alice, item.id)
    click(set_ranks(tab2, prefix, [1, 2, 3, 4]), f"{prefix}_submit")  # a resent form
    assert messages(tab2, "success") == ["Saved. Your ranking: A > B > C > D"]
    again = label_of(env.store, alice, item.id)
    assert (again.id, again.revision, again.submitted_at) == (first.id, 1, first.submitted_at)
    click(set_ranks(tab3, prefix, [4, 3, 2, 1]), f"{prefix}_submit")
    assert "already labeled" in messages(tab3, "error")[0]
    assert label_of(env.store, alice, item.id).ranking == [[rid] for rid in shown]
    assert len(label_records(env.store, env.task_set)) == 1

    click(tab1, "start_revise")
    rev = f"rev{item.id}_1"
    assert [tab1.radio(key=f"{rev}_rank_{i}").value for i in range(4)] == [1, 2, 3, 4]  # prefilled
    set_ranks(tab1, rev, [3, 3, 2, 1])
    tab1.text_area(key=f"{rev}_rationale").input("Changed my mind.")
    click(tab1, f"{rev}_save")
    assert messages(tab1, "success") == ["Revision saved. Your ranking: D > C > A = B"]
    revised = label_of(env.store, alice, item.id)
    assert revised.revision == 2 and revised.rationale == "Changed my mind."
    assert revised.ranking == [[shown[3]], [shown[2]], sorted(shown[:2])]
    assert tab1.get("progress")[0].proto.text == "1 / 3 done"  # revising adds no label


def test_an_annotator_cannot_submit_for_an_item_not_assigned_to_them(env):
    tab1 = log_in(env, "bob")
    tab2 = open_app(sid_of(tab1))
    item, _ = lease(env, "bob")
    prefix = f"item{item.id}"
    click(tab1, f"{prefix}_skip")  # the item is no longer bob's ...
    assert messages(tab1, "info") == ["Skipped. The item goes back to the pool for others."]
    click(set_ranks(tab2, prefix, [1, 2, 3, 4]), f"{prefix}_submit")  # ... so the stale tab's submit fails
    assert "not assigned" in messages(tab2, "error")[0]
    assert label_of(env.store, env.store.user("bob"), item.id) is None


def test_an_annotator_never_sees_another_annotators_label(env):
    alice = env.store.user("alice")
    item, _ = next_item(env.store, alice, env.task_set)
    submit(env.store, alice, item.id, [[rid] for rid in item.response_ids], flag="alice-flag-reason",
           rationale="alice-private-rationale")
    bob_page = log_in(env, "bob")
    assert lease(env, "bob")[0].id == item.id  # bob is shown the item alice labeled
    shown = page_text(bob_page)
    assert "alice-private-rationale" not in shown and "alice-flag-reason" not in shown and "alice" not in shown
    assert "Your last submission" not in shown


def test_model_and_rationale_text_is_shown_literally_never_as_html(env):
    at = log_in(env, "alice")
    item, _ = lease(env, "alice")
    prefix = f"item{item.id}"
    assert f"{HOSTILE} (item {item.prompt_id[1:]})" in messages(at, "text")
    set_ranks(at, prefix, [1, 2, 3, 4])
    rationale = "<b>mine</b><script>document.title='x'</script>"
    at.text_area(key=f"{prefix}_rationale").input(rationale)
    click(at, f"{prefix}_submit")
    assert rationale in messages(at, "text")  # the last-submission panel, verbatim

    # Nothing on the page hands raw HTML or model text to Markdown.
    assert not any(m.allow_html for m in at.markdown)
    assert all("<script" not in m and "<b>" not in m for m in messages(at, "markdown"))
    assert not at.get("html") and SECRET_MODEL not in page_text(at)


# -- A/B ----------------------------------------------------------------------------------------


def test_the_ab_page_stores_a_vote_without_ever_showing_model_names(env):
    ref_a = make_candidates(env.arts, 2, name="cand-sft", model="checkpoints/sft:v1", texts=["Oil it weekly.", "x"])
    ref_b = make_candidates(env.arts, 2, name="cand-dpo", model="checkpoints/dpo:v2", texts=["Oil it daily.", "y"])
    ts = load_ab_task_set(env.store, env.arts, ref_a, ref_b).task_set
    at = log_in(env, "alice")
    at.switch_page("views/ab.py").run()
    assert messages(at, "title") == ["Blind A/B comparison"]
    item, _ = lease(env, "alice", kind="ab")
    assert item.task_set_id == ts.id
    texts = messages(at, "text")
    assert [r["text"] for r in item.responses] == texts[-2:]
    shown = page_text(at)
    assert "checkpoints/" not in shown and "sft" not in shown and "dpo" not in shown

    click(at, f"ab{item.id}_B")
    assert messages(at, "success") == ["Saved. Your vote: B is better"]
    label = label_of(env.store, env.store.user("alice"), item.id)
    assert label.choice == "B" and label.ranking == [["B"], ["A"]]
    assert (label.model_a, label.model_b) == (item.responses[0]["model"], item.responses[1]["model"])

    at.radio(key=f"change_vote_{item.id}_1").set_value("tie")
    click(at, "change_vote")
    label = label_of(env.store, env.store.user("alice"), item.id)
    assert label.choice == "tie" and label.revision == 2


# -- admin --------------------------------------------------------------------------------------


def label_everything(env: Env) -> None:
    """alice and bob rank all 3 items; they agree on two; bob flags the third with hostile text."""
    for name in ("alice", "bob"):
        user = env.store.user(name)
        while (got := next_item(env.store, user, env.task_set)) is not None:
            item, _ = got
            ids = sorted(item.response_ids)
            last = item.prompt_id == "p2"
            ranking = [[rid] for rid in (ids[::-1] if name == "bob" and item.prompt_id == "p1" else ids)]
            submit(env.store, user, item.id, ranking, flag="<script>x()</script> broken" if last and name == "bob"
                   else None)


def test_the_admin_page_shows_progress_agreement_and_flags(env):
    label_everything(env)
    at = log_in(env, "root")
    assert "Admin" in [p.proto.label for p in at.get("page_link")]
    at.switch_page("views/admin.py").run()
    assert not at.exception and messages(at, "title") == ["Admin"]
    sets, people, consensus, flagged = (d.value for d in at.dataframe)
    row = sets[sets["name"] == env.task_set].iloc[0]
    assert (row["items"], row["labels"], row["complete_items"], row["labels needed"]) == (3, 6, 3, 6)
    done = dict(zip(people["name"], people["done"]))
    assert done == {"alice": 3, "bob": 3, "root": 0}
    assert dict(zip(people["name"], people["flagged"]))["bob"] == 1

    report = agreement_report(env.store, env.task_set)
    metrics = {m.label: m.value for m in at.metric}
    # p0 agree on all 6 pairs, p1 disagree on all 6, p2 is flagged and left out: 6 / 12.
    assert report.pairwise.agree == 6 and report.pairwise.total == 12
    assert metrics["Pairwise agreement"] == "50.0%" and metrics["Comparisons"] == "12"
    assert metrics["Krippendorff's α (ordinal)"] == f"{report.krippendorff_alpha:.3f}"
    assert list(consensus["annotator"]) == ["alice", "bob"] and list(consensus["rate"]) == ["50.0%", "50.0%"]
    assert flagged.to_dict("records")[0] | {"submitted_at": None} == {
        "prompt_id": "p2", "annotator": "bob", "reason": "<script>x()</script> broken", "rationale": "",
        "submitted_at": None}


def test_an_annotator_who_opens_the_admin_page_gets_admins_only_and_no_data(env):
    label_everything(env)
    at = log_in(env, "alice")
    assert "Admin" not in [p.proto.label for p in at.get("page_link")]
    at.switch_page("views/admin.py").run()
    assert messages(at, "error")[0].startswith("Admins only.")
    assert not at.dataframe and not at.metric and not at.title
    assert "bob" not in page_text(at)


# -- leases, task sets in the URL, long texts, limits -------------------------------------------


def leases_of(env: Env, name: str) -> list[Assignment]:
    with env.store.session() as s:
        return list(s.scalars(select(Assignment).where(Assignment.user_id == env.store.user(name).id)))


def test_looking_at_the_ranking_page_leases_nothing_until_the_annotator_starts_on_the_item(env):
    admin = log_in(env, "root")  # an admin who only looks
    open_app(sid_of(admin))  # ... and reloads
    assert leases_of(env, "root") == []
    at = log_in(env, "alice")
    item, _ = lease(env, "alice")
    assert leases_of(env, "alice") == []
    at.radio(key=f"item{item.id}_rank_0").set_value(1).run()  # the first touch leases the item
    [held] = leases_of(env, "alice")
    assert (held.item_id, held.status) == (item.id, "leased")
    open_app(sid_of(at))  # a reload shows the same item and takes no second lease
    assert lease(env, "alice")[0].id == item.id and len(leases_of(env, "alice")) == 1


def test_a_reload_stays_on_the_chosen_task_set_through_the_url(env):
    newer = load_task_set(env.store, env.arts, make_candidates(env.arts, 2, name="later"), overlap=1).task_set
    older = env.store.task_set(env.task_set)
    at = log_in(env, "alice")
    assert at.selectbox(key="task_set_rank").value == newer.id  # the newest set comes first
    at.selectbox(key="task_set_rank").set_value(older.id).run()
    assert at.query_params[ui.TASK_SET_PARAM] == str(older.id)
    reloaded = AppTest.from_file(str(APP), default_timeout=30)
    reloaded.query_params.update({ui.SESSION_PARAM: sid_of(at), ui.TASK_SET_PARAM: str(older.id)})
    reloaded.run()
    assert reloaded.selectbox(key="task_set_rank").value == older.id
    shown = next(m for m in messages(reloaded, "markdown") if m.startswith("**Response"))
    assert shown == "**Response A**" and lease(env, "alice")[0].task_set_id == older.id


def test_long_responses_scroll_in_fixed_height_boxes_and_short_ones_do_not(env):
    long_text = "A long answer. " * 4000  # 60 KB
    ts = load_task_set(env.store, env.arts, make_candidates(env.arts, 1, name="long", texts=[long_text, "short"]),
                       overlap=1).task_set
    at = log_in(env, "alice")
    at.selectbox(key="task_set_rank").set_value(ts.id).run()
    item, _ = lease(env, "alice")

    def texts_in_boxes(node, inside: bool = False) -> list[tuple[str, bool]]:
        """Every text on the page, and whether it sits in a fixed-height (scrolling) box."""
        proto = getattr(node, "proto", None)
        height = getattr(getattr(proto, "height_config", None), "pixel_height", 0)
        inside = inside or height == ui.LONG_TEXT_HEIGHT
        if type(node).__name__ == "Text":
            return [(node.value, inside)]
        return [t for child in getattr(node, "children", {}).values() for t in texts_in_boxes(child, inside)]

    boxed = dict(texts_in_boxes(at._tree))
    assert boxed[f"{long_text} (item 0)"] and not boxed["short (item 0)"]
    assert not any(boxed[m["content"]] for m in CONVERSATION)


def test_flag_and_rationale_limits_hold_in_the_widgets_and_in_the_store(env):
    at = log_in(env, "alice")
    item, _ = lease(env, "alice")
    prefix = f"item{item.id}"
    assert at.text_input(key=f"{prefix}_flag").proto.max_chars == labels.MAX_FLAG
    assert at.text_area(key=f"{prefix}_rationale").proto.max_chars == labels.MAX_RATIONALE
    alice = env.store.user("alice")
    next_item(env.store, alice, env.task_set)
    with pytest.raises(RlhfError, match="flag reason is 1000000 characters"):
        submit(env.store, alice, item.id, [sorted(item.response_ids)], flag="x" * 1_000_000)
    assert label_of(env.store, alice, item.id) is None


def test_a_flagged_item_with_ranks_confirms_its_ranking_and_the_flag(env):
    at = log_in(env, "alice")
    item, _ = lease(env, "alice")
    prefix = f"item{item.id}"
    set_ranks(at, prefix, [1, 2, 2, 3])
    at.text_input(key=f"{prefix}_flag").input("Typo in the prompt.")
    click(at, f"{prefix}_submit")
    assert messages(at, "success") == ["Saved. Your ranking: A > B = C > D (flagged)"]
