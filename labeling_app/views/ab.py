"""Blind A/B page: two responses to one prompt, labelled only "A" and "B"; the annotator votes.

Nothing here names a model: `shown_responses` carries ids ("A", "B") and text only, and
task sets are offered by number because their names hold candidate dataset names. The
sides were shuffled per item at load time (`load_ab_task_set`).
"""

from __future__ import annotations

import streamlit as st

from labeling_app import shortcuts, ui
from labeling_app.assign import peek_item
from labeling_app.labels import MAX_FLAG, MAX_RATIONALE, last_label, revise_ab, submit_ab

CHOICES = {"A": "A is better", "B": "B is better", "tie": "Tie", "both_bad": "Both bad"}
KEYS = {"A": "a", "B": "b", "tie": "t", "both_bad": "x"}

store, user = ui.store(), ui.current_user()
st.title("Blind A/B comparison")
task_set = ui.pick_task_set(store, "ab", "Comparison set")
if task_set is None:
    st.stop()
ui.show_progress(store, user, task_set.name)


def extras(prefix: str) -> tuple[str | None, str]:
    return ((st.session_state.get(f"{prefix}_flag") or "").strip() or None,
            st.session_state.get(f"{prefix}_rationale") or "")


def on_vote(item_id: int, choice: str, prefix: str) -> None:
    flag, rationale = extras(prefix)
    ui.attempt(ui.started(store, user, item_id, lambda: submit_ab(store, user, item_id, choice, flag=flag,
                                                                  rationale=rationale)), "success",
               lambda _: f"Saved. Your vote: {CHOICES[choice]}")


def on_change_vote(item_id: int, key: str) -> None:
    choice = st.session_state.get(key)
    ui.attempt(lambda: revise_ab(store, user, item_id, choice), "success",
               lambda _: f"Vote changed to: {CHOICES[choice]}")


got = peek_item(store, user, task_set.name)  # a vote or Skip leases it: looking holds no slot
if got is None:
    ui.show_flash()  # the last item's "Saved"
    st.success("Nothing left for you to compare in this set. Thank you!")
else:
    item, shown = got
    prefix = f"ab{item.id}"
    st.subheader("Conversation")
    ui.show_conversation(item.prompt)
    st.subheader("Responses")
    for i, (column, response) in enumerate(zip(st.columns(2), item.shown_responses(shown))):
        with column, st.container(border=True):
            ui.show_response(f"Response {ui.letter(i)}", response["text"])
    st.text_input("Flag this item (reason)", key=f"{prefix}_flag", placeholder="leave empty for no flag",
                  max_chars=MAX_FLAG)
    st.text_area("Rationale (optional)", key=f"{prefix}_rationale", max_chars=MAX_RATIONALE)
    buttons = {choice: f"{prefix}_{choice}" for choice in CHOICES}
    for column, (choice, title) in zip(st.columns(len(CHOICES)), CHOICES.items()):
        column.button(title, key=buttons[choice], on_click=on_vote, args=(item.id, choice, prefix),
                      type="primary" if choice in ("A", "B") else "secondary", width="stretch")
    # Feedback beside Skip, under the votes where the eye is, in a column that is always there.
    skip_col, feedback_col = st.columns([1, 5], vertical_alignment="center")
    skip_col.button("Skip", key=f"{prefix}_skip", on_click=ui.on_skip, args=(store, user, item.id))
    with feedback_col:
        ui.show_flash()
    st.caption(shortcuts.AB_HELP)
    shortcuts.install(keys={KEYS[c]: key for c, key in buttons.items()} | {"s": f"{prefix}_skip"})

last = last_label(store, user)
if last is not None and last.choice is not None and store.item(last.item_id).task_set_id == task_set.id:
    with st.container(border=True, key="last_vote"):
        st.markdown(f"**Your last vote:** {CHOICES[last.choice]} (revision {last.revision})")
        key = f"change_vote_{last.item_id}_{last.revision}"
        st.radio("Change it to", list(CHOICES), index=list(CHOICES).index(last.choice), horizontal=True,
                 format_func=CHOICES.__getitem__, key=key)
        st.button("Change last vote", key="change_vote", on_click=on_change_vote, args=(last.item_id, key))
