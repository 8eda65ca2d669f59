"""Ranking page: the conversation, the K responses in this annotator's recorded order, ranks with ties.

The item comes from `peek_item`, which leases nothing: the lease is taken by the first
touch of a widget (or by Submit / Skip), so someone who only looks holds no slot. It
returns the annotator's held lease first, so a refresh shows the same item. Buttons act
in callbacks bound to the item they were drawn for, so a click always lands on the item
the annotator was looking at, even if another tab has moved on. "Saved" is shown only
after `submit` has committed, beside the Submit button, where the eye is; it sits in a
column that is always there, so its coming and going never shifts the page (which would
rebuild the shortcut script).
"""

from __future__ import annotations

from typing import Any, Sequence

import streamlit as st

from labeling_app import shortcuts, ui
from labeling_app.assign import peek_item
from labeling_app.labels import MAX_FLAG, MAX_RATIONALE, last_label, revise, submit
from labeling_app.store import Item, Label

store, user = ui.store(), ui.current_user()
st.title("Rank the responses")
task_set = ui.pick_task_set(store, "rank", "Task set")
if task_set is None:
    st.stop()
ui.show_progress(store, user, task_set.name)


def rank_widgets(prefix: str, item: Item, shown_order: Sequence[str], saved: Label | None = None) -> None:
    """The conversation, each response with a rank picker, and the extra controls.

    Without `saved` (a new item, not a revision) the first change to any widget leases the item.
    """
    touch = {} if saved else {"on_change": ui.start, "args": (store, user, item.id)}
    st.subheader("Conversation")
    ui.show_conversation(item.prompt)
    st.subheader("Responses")
    k = len(shown_order)
    ranks = ui.ranks_from_ranking(saved.ranking, shown_order) if saved else [None] * k
    for i, response in enumerate(item.shown_responses(list(shown_order))):
        with st.container(border=True, key=f"{prefix}_resp_{i}"):
            ui.show_response(f"Response {ui.letter(i)}", response["text"])
            st.radio(f"Rank of {ui.letter(i)}", list(range(1, k + 1)), horizontal=True, key=f"{prefix}_rank_{i}",
                     index=None if ranks[i] is None else ranks[i] - 1, **touch)
    st.checkbox("None acceptable", value=bool(saved and saved.none_acceptable), key=f"{prefix}_none",
                help="Every response is bad. Ranks are then optional.", **touch)
    st.text_input("Flag this item (reason)", value=(saved.flag or "") if saved else "", key=f"{prefix}_flag",
                  placeholder="leave empty for no flag", max_chars=MAX_FLAG, **touch,
                  help="A reason here flags the item for an admin (e.g. a broken prompt). Ranks are then optional.")
    st.text_area("Rationale (optional)", value=saved.rationale if saved else "", key=f"{prefix}_rationale",
                 max_chars=MAX_RATIONALE, **touch)
    st.caption(shortcuts.RANKING_HELP.format(k=k, last=ui.letter(k - 1)))


def judgement(prefix: str, shown_order: Sequence[str]) -> dict[str, Any]:
    """What the widgets say, as `submit` / `revise` arguments."""
    ranks = [st.session_state.get(f"{prefix}_rank_{i}") for i in range(len(shown_order))]
    none_acceptable = bool(st.session_state.get(f"{prefix}_none"))
    flag = (st.session_state.get(f"{prefix}_flag") or "").strip() or None
    ranking = ui.ranking_from_ranks(ranks, shown_order, allow_unranked=none_acceptable or flag is not None)
    return {"ranking": ranking, "none_acceptable": none_acceptable, "flag": flag,
            "rationale": st.session_state.get(f"{prefix}_rationale") or ""}


def on_submit(item_id: int, shown_order: list[str], prefix: str) -> None:
    ui.attempt(ui.started(store, user, item_id, lambda: submit(store, user, item_id, **judgement(prefix, shown_order))),
               "success", lambda label: ui.saved_message(label, shown_order))


def on_revise(item_id: int, shown_order: list[str], prefix: str) -> None:
    if ui.attempt(lambda: revise(store, user, item_id, **judgement(prefix, shown_order)), "success",
                  lambda label: ui.saved_message(label, shown_order, "Revision saved")):
        st.session_state.pop("revising", None)


def install_shortcuts(prefix: str, k: int, submit_key: str) -> None:
    shortcuts.install(responses=[f"{prefix}_resp_{i}" for i in range(k)],
                      radios=[f"{prefix}_rank_{i}" for i in range(k)], submit=submit_key)


def last_submission(label: Label) -> None:
    """The annotator's own most recent label, with the way to revise it."""
    with st.container(border=True, key="last_submission"):
        st.markdown("**Your last submission**")
        st.markdown(f"Ranking: {ui.describe_label(label, label.shown_order)}")
        if label.flag:
            st.caption("Flag reason")
            st.text(label.flag)
        if label.rationale:
            st.caption("Rationale")
            st.text(label.rationale)
        st.caption(f"Submitted {ui.ago(label.submitted_at)}, revision {label.revision}")
        st.button("Revise last submission", key="start_revise",
                  on_click=lambda: st.session_state.update(revising=label.item_id))


last = last_label(store, user)
if last is not None and store.item(last.item_id).task_set_id != task_set.id:
    last = None  # the latest label belongs to another task set (or the A/B page)

if last is not None and st.session_state.get("revising") == last.item_id:
    item, prefix = store.item(last.item_id), f"rev{last.item_id}_{last.revision}"
    st.info("Revising your last submission.")
    rank_widgets(prefix, item, last.shown_order, saved=last)
    save_col, cancel_col, feedback_col = st.columns([1, 1, 4], vertical_alignment="center")
    save_col.button("Save revision", type="primary", key=f"{prefix}_save", on_click=on_revise,
                    args=(item.id, list(last.shown_order), prefix))
    cancel_col.button("Cancel", key=f"{prefix}_cancel", on_click=lambda: st.session_state.pop("revising", None))
    with feedback_col:
        ui.show_flash()
    install_shortcuts(prefix, len(last.shown_order), f"{prefix}_save")
    st.stop()
st.session_state.pop("revising", None)

got = peek_item(store, user, task_set.name)
if got is None:
    ui.show_flash()  # the last item's "Saved"
    st.success("Nothing left for you to rank in this task set. Thank you!")
else:
    item, shown_order = got
    prefix = f"item{item.id}"
    rank_widgets(prefix, item, shown_order)
    submit_col, skip_col, feedback_col = st.columns([1, 1, 4], vertical_alignment="center")
    submit_col.button("Submit", type="primary", key=f"{prefix}_submit", on_click=on_submit,
                      args=(item.id, shown_order, prefix))
    skip_col.button("Skip", key=f"{prefix}_skip", on_click=ui.on_skip, args=(store, user, item.id))
    with feedback_col:
        ui.show_flash()
    install_shortcuts(prefix, len(shown_order), f"{prefix}_submit")
if last is not None:
    last_submission(last)
