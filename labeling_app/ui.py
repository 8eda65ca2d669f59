"""What every page of the labeling app shares: the store, login and sessions, and safe text.

Model responses, prompts and rationales come from outside and are shown with `st.text`,
which parses neither Markdown nor HTML. Messages that must go through Markdown
(`st.error`, `st.success`) pass any such text through `md_escape` first. Nothing here
uses `unsafe_allow_html`.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import uuid
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import streamlit as st

from labeling_app import auth, sessions
from labeling_app.labels import Progress, Ranking, progress
from labeling_app.store import Label, LabelStore, TaskSet, User, utcnow
from rlhf.artifacts import ArtifactStore
from rlhf.errors import RlhfError

SESSION_PARAM = "s"  # the URL query parameter holding the session id (see sessions.py)
TASK_SET_PARAM = "set"  # ... and the one holding the chosen task set's id
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ROLE_TITLES = {"system": "System", "user": "User", "assistant": "Assistant"}
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~&$:=\"'])")


@st.cache_resource(show_spinner=False)
def _open_store(workspace: str, url: str | None) -> LabelStore:
    return LabelStore.for_workspace(Path(workspace), url)


def store() -> LabelStore:
    """The labels store named by $RLHF_WORKSPACE / $RLHF_LABEL_DB (set by `rlhf label serve`), one per process."""
    return _open_store(os.environ.get("RLHF_WORKSPACE", "workspace"), os.environ.get("RLHF_LABEL_DB") or None)


@st.cache_resource(show_spinner=False)
def _open_artifacts(workspace: str) -> ArtifactStore:
    return ArtifactStore(workspace)


def artifact_store() -> ArtifactStore:
    """The artifact store of the same workspace as `store()` ($RLHF_WORKSPACE), one per process."""
    return _open_artifacts(os.environ.get("RLHF_WORKSPACE", "workspace"))


def md_escape(text: str) -> str:
    """`text` as literal Markdown: every character Markdown, HTML or Streamlit could act on is escaped."""
    return _MD_SPECIAL.sub(r"\\\1", text)


def letter(i: int) -> str:
    return LETTERS[i] if i < len(LETTERS) else f"#{i + 1}"


# -- login and sessions -------------------------------------------------------------------


def client_key() -> str:
    """Who failed logins are counted against: this browser session (see auth.py for why not the IP).

    A logout keeps it, so failures keep counting in this browser after a logout.
    """
    if "client_key" not in st.session_state:
        st.session_state.client_key = uuid.uuid4().hex
    return st.session_state.client_key


def signed_in_user(label_store: LabelStore) -> User | None:
    """The user of this browser session, found from session state or, after a reload, from the URL."""
    sid = st.session_state.get("sid") or st.query_params.get(SESSION_PARAM)
    user = sessions.resolve_session(label_store, sid)
    if user is None:
        for key in ("sid", "user"):
            st.session_state.pop(key, None)
        if SESSION_PARAM in st.query_params:
            del st.query_params[SESSION_PARAM]
        return None
    st.session_state.sid, st.session_state.user = sid, user
    if st.query_params.get(SESSION_PARAM) != sid:
        st.query_params[SESSION_PARAM] = sid  # page switches drop query params; a reload needs it back
    return user


def current_user() -> User:
    """The signed-in user, for a page script; the entry point has already checked the session."""
    user = st.session_state.get("user")
    if user is None:
        st.stop()
    return user


def login_form(label_store: LabelStore) -> None:
    """The token form. A success starts a session and reruns into the app."""
    st.title("Sign in to label")
    key = client_key()
    with st.form("login"):
        token = st.text_input("Login token", type="password", key="login_token",
                              help="The one-time token printed by `rlhf label users add NAME`.")
        clicked = st.form_submit_button("Log in", key="login_submit", type="primary")
    if clicked:
        user = auth.authenticate(label_store, token.strip(), key)
        if user is not None:
            sid = sessions.create_session(label_store, user)
            st.session_state.sid, st.session_state.user = sid, user
            st.query_params[SESSION_PARAM] = sid
            st.rerun()
    until = auth.locked_until(label_store, key)
    if until is not None:
        wait = max(1, int((until - utcnow()).total_seconds() + 0.999))
        st.error(f"Too many failed logins. Try again in {wait} seconds.")
    elif clicked:
        st.error("That token is not valid.")


def logout(label_store: LabelStore) -> None:
    sessions.end_session(label_store, st.session_state.get("sid"))
    for key in list(st.session_state.keys()):
        if key != "client_key":  # failed logins keep counting against this browser after a logout
            del st.session_state[key]
    if SESSION_PARAM in st.query_params:
        del st.query_params[SESSION_PARAM]


# -- page building blocks ------------------------------------------------------------------


T = TypeVar("T")


def flash(kind: str, message: str) -> None:
    """Queue a message for the next run (callbacks run before the page draws)."""
    st.session_state.flash = (kind, message)


def show_flash() -> None:
    kind, message = st.session_state.pop("flash", (None, None))
    if kind:
        {"success": st.success, "error": st.error, "info": st.info}[kind](message)


def show_error(e: RlhfError) -> None:
    flash("error", md_escape(str(e)))


def attempt(action: Callable[[], T], kind: str, message: Callable[[T], str]) -> bool:
    """Run a button's store action: flash `message(result)` after it, or its error instead."""
    try:
        result = action()
    except RlhfError as e:
        show_error(e)
        return False
    flash(kind, message(result))
    return True


def start(label_store: LabelStore, user: User, item_id: int) -> None:
    """The annotator began on a shown item: lease it now (once per item and browser session).

    Pages show items with `peek_item`, so someone who only looks holds no slot. If the
    item filled meanwhile, the error is flashed and the next run shows another item.
    """
    try:
        started(label_store, user, item_id, lambda: None)()
    except RlhfError as e:
        show_error(e)


def started(label_store: LabelStore, user: User, item_id: int, action: Callable[[], T]) -> Callable[[], T]:
    """`action`, run after the item's lease is taken (a vote or a submit can be the first touch)."""
    from labeling_app.assign import start_item

    def run() -> T:
        if st.session_state.get("started_item") != item_id:
            start_item(label_store, user, item_id)
            st.session_state.started_item = item_id
        return action()

    return run


def on_skip(label_store: LabelStore, user, item_id: int) -> None:
    """The Skip button of both labeling pages."""
    from labeling_app.labels import skip

    attempt(started(label_store, user, item_id, lambda: skip(label_store, user, item_id)), "info",
            lambda _: "Skipped. The item goes back to the pool for others.")


def pick_task_set(label_store: LabelStore, kind: str, label: str) -> TaskSet | None:
    """The task set of `kind` to work on: the newest one, or the user's choice when there are several."""
    sets = [ts for ts in reversed(label_store.task_sets()) if ts.kind == kind]
    if not sets:
        what = "ranking" if kind == "rank" else "A/B"
        load = "load candidates:vK" if kind == "rank" else "load-ab candidates:vA candidates:vB"
        st.info(f"No {what} task set is loaded yet. An admin loads one with `rlhf label {load}`.")
        return None
    if len(sets) == 1:
        return sets[0]
    # The choice lives in the URL too, so a reload stays on the same set instead of
    # silently switching to the newest one.
    ids = [ts.id for ts in sets]
    in_url = st.query_params.get(TASK_SET_PARAM, "")
    index = ids.index(int(in_url)) if in_url.isdigit() and int(in_url) in ids else 0
    # A/B sets are offered by number: their names hold the candidate datasets' names,
    # which can hint at the models behind the sides.
    names = {ts.id: (ts.name if kind == "rank" else f"A/B task set {ts.id}") for ts in sets}
    chosen = st.selectbox(label, ids, index=index, format_func=names.__getitem__, key=f"task_set_{kind}")
    st.query_params[TASK_SET_PARAM] = str(chosen)
    return next(ts for ts in sets if ts.id == chosen)


def show_progress(label_store: LabelStore, user: User, task_set: str) -> Progress:
    p = progress(label_store, user, task_set)
    st.progress(p.done / p.assigned if p.assigned else 1.0, text=f"{p.done} / {p.assigned} done")
    return p


def show_conversation(messages: Sequence[dict[str, str]]) -> None:
    """The conversation so far, one message per bubble, each with its role."""
    for message in messages:
        role = message.get("role", "")
        with st.chat_message("user" if role == "user" else "assistant",
                             avatar=":material/settings:" if role == "system" else None):
            st.caption(ROLE_TITLES.get(role, "Message"))
            st.text(message.get("content", ""))


LONG_TEXT_CHARS = 1200  # past this a response scrolls in a box, so Submit stays near the responses
LONG_TEXT_HEIGHT = 320  # px: about 14 lines, two such boxes fit a laptop screen


def show_response(title: str, text: str) -> None:
    st.markdown(f"**{title}**")
    if len(text) > LONG_TEXT_CHARS or text.count("\n") > 14:
        with st.container(height=LONG_TEXT_HEIGHT, border=False):
            st.text(text)
    else:
        st.text(text)


# -- ranks chosen on the page -> a ranking --------------------------------------------------


def ranking_from_ranks(ranks: Sequence[int | None], shown_order: Sequence[str], allow_unranked: bool) -> Ranking:
    """Rank numbers (1 = best; equal numbers tie) per shown response -> groups of ids, best first.

    With nothing ranked and `allow_unranked` (the item is flagged or none is acceptable),
    every response ties: the label then says nothing about order.
    """
    if all(r is None for r in ranks):
        if allow_unranked:
            return [sorted(shown_order)]
        raise RlhfError("rank every response first (1 = best; give equal numbers for a tie)")
    if missing := [letter(i) for i, r in enumerate(ranks) if r is None]:
        raise RlhfError(f"give response {', '.join(missing)} a rank too (equal numbers for a tie)")
    groups: dict[int, list[str]] = {}
    for rank, rid in zip(ranks, shown_order):
        groups.setdefault(rank, []).append(rid)
    return [sorted(groups[r]) for r in sorted(groups)]


def ranks_from_ranking(ranking: Ranking, shown_order: Sequence[str]) -> list[int]:
    """The inverse, for prefilling a revision: each shown response's group number, from 1."""
    group_of = {rid: i + 1 for i, group in enumerate(ranking) for rid in group}
    return [group_of[rid] for rid in shown_order]


def describe_label(label: Label, shown_order: Sequence[str]) -> str:
    """What a label says, for "Saved" and the last-submission panel.

    A flagged or none-acceptable label without ranks is stored as one all-tied group; it
    is described as "no ranking", never as "A = B = C", which would read as a real tie.
    """
    marks = [m for m, on in (("none acceptable", label.none_acceptable), ("flagged", label.flag)) if on]
    if marks and len(label.ranking) == 1:
        return f"no ranking ({', '.join(marks)})"
    return describe_ranking(label.ranking, shown_order) + (f" ({', '.join(marks)})" if marks else "")


def saved_message(label: Label, shown_order: Sequence[str], saved: str = "Saved") -> str:
    """The confirmation after a submit: what was saved, in words that cannot be read as a tie."""
    marks = [m for m, on in (("none acceptable", label.none_acceptable), ("flagged", label.flag)) if on]
    if marks and len(label.ranking) == 1:
        return f"{saved} as {' and '.join(marks)}, with no ranking."
    return f"{saved}. Your ranking: {describe_label(label, shown_order)}"


def describe_ranking(ranking: Ranking, shown_order: Sequence[str]) -> str:
    """A ranking in the annotator's letters, e.g. "B > A = C > D"."""
    letter_of = {rid: letter(i) for i, rid in enumerate(shown_order)}
    return " > ".join(" = ".join(sorted(letter_of[rid] for rid in group)) for group in ranking)


def ago(when: dt.datetime) -> str:
    seconds = max(0, int((utcnow() - when).total_seconds()))
    if seconds < 90:
        return f"{seconds} s ago"
    if seconds < 5400:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"
