"""Engineers' dashboard: artifacts, lineage, training curves, PPO, compare leaderboards, agreement.

Admins only, checked before anything is read, as on the Admin page. All data comes from
`labeling_app/dashboard.py`; this file only draws it. Text goes through `st.dataframe` (or
`md_escape`), so names and metrics from the workspace cannot inject markup.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from labeling_app import dashboard, ui

user = ui.current_user()
if not user.is_admin:
    st.error("Admins only. Your account is an annotator account; ask an admin for this view.")
    st.stop()

st.set_page_config(layout="wide")  # tables of eight columns and the lineage graph need the width
st.title("Dashboard")
arts = ui.artifact_store()
rows = dashboard.artifact_rows(arts)
if not rows:
    st.info(f"The workspace {ui.md_escape(str(arts.root))} has no artifacts yet. "
            "Run `rlhf demo` for the whole loop, or start with `rlhf base import`.")
    st.stop()
refs = [r["ref"] for r in rows]
checkpoints = [r["ref"] for r in rows if r["kind"] == "checkpoint"]


def table(frame: pd.DataFrame | list[dict], key: str) -> None:
    st.dataframe(pd.DataFrame(frame), hide_index=True, key=key)


def line_chart(long: pd.DataFrame) -> None:
    """One line per curve of a `dashboard.long_form` frame, against its step or iteration."""
    st.line_chart(long, x=long.columns[0], y="value", color="curve")


st.header("Artifacts")
table(rows, "artifacts_table")

st.header("Lineage")
ALL = "(every artifact)"
focus = st.selectbox("Ancestry of", [ALL] + refs[::-1], key="lineage_focus",
                     help="Pick one artifact to see only what it was built from.")
st.graphviz_chart(dashboard.lineage_dot(arts, None if focus == ALL else focus), width="stretch")

st.header("Stage metrics & training curves")
if not checkpoints:
    st.info("No checkpoint yet. Run `rlhf base import`, then `rlhf sft`.")
else:
    art = arts.resolve(st.selectbox("Checkpoint", checkpoints[::-1], key="metrics_checkpoint"))
    table(dashboard.metrics_table(art), "metrics_table")
    curves = dashboard.training_curves(art)
    if curves is not None and not curves.empty:
        losses = [c for c in curves.columns if c.endswith("loss")] or list(curves.columns[:1])
        shown = st.multiselect("Curves", list(curves.columns), default=losses, key="curve_columns")
        if shown:
            line_chart(dashboard.long_form(curves, shown))
    else:
        st.caption("This checkpoint has no training log (logs/train_log.jsonl).")
    for png in dashboard.plot_images(art):
        st.image(str(png), caption=png.relative_to(art.path).as_posix())

st.header("PPO reward & KL")
ppo_refs = [r["ref"] for r in rows if r["kind"] == "checkpoint" and r["stage"] == "ppo"]
if not ppo_refs:
    st.info("No PPO checkpoint yet. Run `rlhf ppo model=sft:latest reward=reward:latest data=prompts:latest`.")
else:
    ppo = dashboard.ppo_curves(arts.resolve(st.selectbox("PPO checkpoint", ppo_refs[::-1], key="ppo_checkpoint")))
    if ppo is None:
        st.caption("This checkpoint has no PPO log (logs/ppo_log.jsonl).")
    else:
        it = ppo.iterations
        score_col, kl_col = st.columns(2)
        with score_col:
            st.markdown("**Reward-model score**")
            scores = ppo.scores()
            line_chart(dashboard.long_form(scores, scores.columns))
        with kl_col:
            st.markdown("**KL to the reference (nats / response)**")
            line_chart(dashboard.long_form(it, ["kl"]))
        others = [c for c in it.columns if c not in ("score", "kl", "eval_score")]
        picked = st.multiselect("Diagnostics", others, default=[c for c in ("entropy", "clipfrac") if c in others],
                                key="ppo_columns")
        if picked:
            line_chart(dashboard.long_form(it, picked))

st.header("Compare leaderboard")
reports = dashboard.compare_reports(arts)
if not reports:
    st.info("No compare report yet. Run `rlhf compare ...` on two or more checkpoints to rank them.")
else:
    by_ref = {r.ref: r for r in reports}
    report = by_ref[st.selectbox("Report", list(by_ref)[::-1], key="compare_report")]
    st.caption(ui.md_escape(f"{report.n_prompts} prompts from {report.prompts}. Models: "
                            + ", ".join(f"{k} = {v}" for k, v in report.models.items())))
    table([{"model": k, "checkpoint": v, "mean length": report.mean_length.get(k)}
           for k, v in report.models.items()], "compare_models")
    for i, (judge, t) in enumerate(report.judges.items()):
        st.subheader(f"Judge: {ui.md_escape(judge)}")
        if t.leaderboard.empty:
            st.caption("No leaderboard: with two models the pair below says it all.")
        else:
            table(t.leaderboard, f"leaderboard_{i}")
        table(t.pairs, f"pairs_{i}")
    if not report.agreement.empty:
        st.markdown("**How often two judges pick the same winner**")
        table(report.agreement, "judge_agreement")

st.header("Human vs reward model agreement")
agreement = dashboard.reward_agreement(arts)
if agreement.reward_models.empty:
    st.info("No reward model yet. Run `rlhf label export`, then `rlhf reward data=preferences:latest`.")
else:
    st.caption("Held-out accuracy: how often the reward model orders a held-out pair of its preference data "
               "as the labels do. With `human labels` ticked, those labels came from `rlhf label export`.")
    table(agreement.reward_models, "reward_agreement")
    if not agreement.reward_models["human labels"].any():
        st.info("No reward model was trained on human labels yet. Run `rlhf label export`, "
                "then `rlhf reward data=preferences:latest`.")
if not agreement.human_judges.empty:
    st.markdown("**Human judges in compare reports**")
    table(agreement.human_judges, "human_judges")
