"""Admin page: progress per task set and annotator, agreement, and the flagged items.

The role check comes before any query, so an annotator who opens this page's URL gets
"admins only" and no data. Tables go through `st.dataframe`, which shows cell text as
text, so flag reasons and rationales cannot inject markup.
"""

from __future__ import annotations

import dataclasses

import pandas as pd
import streamlit as st

from labeling_app import ui
from rlhf.report import pct
from labeling_app.labels import agreement_report, annotator_progress, flagged_items, task_set_progress

store, user = ui.store(), ui.current_user()
if not user.is_admin:
    st.error("Admins only. Your account is an annotator account; ask an admin for this view.")
    st.stop()

st.title("Admin")


sets = task_set_progress(store)
if not sets:
    st.info("No task sets yet. Load one with `rlhf label load candidates:vK`.")
    st.stop()

st.subheader("Task sets")
st.dataframe(pd.DataFrame([{**dataclasses.asdict(p), "labels needed": p.needed} for p in sets]),
             hide_index=True, key="task_sets_table")

names = [p.name for p in reversed(sets)]
name = st.selectbox("Task set", names, key="admin_task_set")

st.subheader("Annotators")
people = annotator_progress(store, name)
st.dataframe(pd.DataFrame([dataclasses.asdict(a) for a in people]), hide_index=True, key="annotators_table")

st.subheader("Agreement")
st.caption("Over usable labels: flagged and none-acceptable labels are left out. Ties follow labeling_app/agreement.py.")
report = agreement_report(store, name)
pairwise_col, alpha_col, comparisons_col = st.columns(3)
pairwise_col.metric("Pairwise agreement", pct(report.pairwise.rate))
alpha = report.krippendorff_alpha
alpha_col.metric("Krippendorff's α (ordinal)", "n/a" if alpha is None else f"{alpha:.3f}")
comparisons_col.metric("Comparisons", report.pairwise.total)
if report.with_consensus:
    st.markdown("**Each annotator's agreement with the consensus of the others**")
    st.dataframe(pd.DataFrame([{"annotator": a, "agree": v.agree, "comparisons": v.total, "rate": pct(v.rate)}
                               for a, v in report.with_consensus.items()]),
                 hide_index=True, key="consensus_table")
else:
    st.caption("No item has two annotators yet, so there is no agreement to report.")

st.subheader("Flagged items")
flagged = flagged_items(store, name)
if flagged:
    st.dataframe(pd.DataFrame([{"prompt_id": r.prompt_id, "annotator": r.annotator, "reason": r.flag,
                                "rationale": r.rationale, "submitted_at": r.submitted_at} for r in flagged]),
                 hide_index=True, key="flagged_table")
else:
    st.caption("No flagged items.")
