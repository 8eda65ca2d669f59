"""The engineers' dashboard page under Streamlit's AppTest, on a workspace from `build_dashboard_workspace`.

Signs in through the login form as the other page tests do, then switches to the page.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from conftest import JUDGE_REWARD, build_dashboard_workspace
from labeling_app import auth
from labeling_app.store import LabelStore

APP = Path(__file__).resolve().parents[2] / "labeling_app" / "app.py"
PAGE = "views/dashboard.py"


@pytest.fixture
def tokens(tmp_path, monkeypatch) -> dict[str, str]:
    """A labels database with admin root and annotator alice; the workspace is left to each test."""
    monkeypatch.setenv("RLHF_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("RLHF_LABEL_DB", f"sqlite:///{tmp_path / 'labels.db'}")
    store = LabelStore(f"sqlite:///{tmp_path / 'labels.db'}")
    yield {name: auth.add_user(store, name, role)[1] for name, role in (("root", "admin"), ("alice", "annotator"))}
    store.close()


def open_dashboard(token: str) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=30).run()
    at.text_input(key="login_token").input(token)
    at.button(key="login_submit").click().run()
    at.switch_page(PAGE).run()
    assert not at.exception, at.exception
    return at


def frames(at: AppTest, column: str) -> list:
    """The page's tables that have `column`, in page order (AppTest keeps no key for a read-only table)."""
    return [d.value for d in at.dataframe if column in d.value.columns]


def test_the_dashboard_shows_artifacts_lineage_curves_and_the_leaderboard(tmp_path, tokens):
    build_dashboard_workspace(tmp_path / "ws")
    at = open_dashboard(tokens["root"])
    assert [t.value for t in at.title] == ["Dashboard"]
    assert "Dashboard" in [p.proto.label for p in at.get("page_link")]

    [artifacts] = frames(at, "hash")
    assert len(artifacts) == 11 and "reports/compare:v1" in set(artifacts["ref"])

    [chart] = at.get("graphviz_chart")
    assert '"checkpoints/reward:v1" -> "checkpoints/ppo:v1" [label="reward"]' in chart.proto.spec
    at.selectbox(key="lineage_focus").set_value("checkpoints/reward:v2").run()
    [chart] = at.get("graphviz_chart")
    assert '"datasets/hh:v1" -> "checkpoints/reward:v2"' in chart.proto.spec and "ppo" not in chart.proto.spec

    # Gold judge: the leaderboard best first with its CI, and the pairs as percentages with CIs.
    [board] = frames(at, "rating")  # the reward-model judge compared two models: no leaderboard
    assert list(board["model"]) == ["ppo", "dpo"] and list(board["rating"]) == [1052.1, 1010.4]
    assert list(board["95% CI"]) == ["1020.3 – 1081.0", "985.0 – 1033.2"]
    gold, reward = (list(p["a's win rate [95% CI]"]) for p in frames(at, "a's win rate [95% CI]"))
    assert gold == ["60.4% [52.0%, 68.0%]", "66.7% [58.0%, 75.0%]"] and reward == ["55.0% [46.0%, 64.0%]"]
    assert f"Judge: {JUDGE_REWARD}" in [s.value.replace("\\", "") for s in at.subheader]
    assert "No leaderboard: with two models the pair below says it all." in [c.value for c in at.caption]

    [human] = frames(at, "human labels")
    assert dict(zip(human["reward model"], human["human labels"])) == {"checkpoints/reward:v1": True,
                                                                       "checkpoints/reward:v2": False}
    assert list(frames(at, "report")[0]["agreement"]) == ["64.0%"]


def test_training_and_ppo_curves_follow_the_selected_checkpoint(tmp_path, tokens):
    build_dashboard_workspace(tmp_path / "ws")
    at = open_dashboard(tokens["root"])
    at.selectbox(key="metrics_checkpoint").set_value("checkpoints/sft:v1").run()
    [metrics] = frames(at, "metric")
    assert dict(zip(metrics["metric"], metrics["value"]))["eval_loss"] == "1.4"
    assert at.multiselect(key="curve_columns").value == ["loss", "eval_loss"]
    assert [i.proto.imgs[0].caption for i in at.get("image")] == ["logs/loss.png"]
    charts = at.get("vega_lite_chart")
    assert len(charts) == 4  # sft's loss curves; PPO score, KL and diagnostics


def test_an_empty_workspace_says_which_command_makes_what(tokens):
    at = open_dashboard(tokens["root"])
    [info] = [i.value for i in at.info]
    assert "has no artifacts yet" in info and "`rlhf demo`" in info
    assert not at.dataframe


def test_an_annotator_who_opens_the_dashboard_gets_admins_only_and_no_data(tmp_path, tokens):
    build_dashboard_workspace(tmp_path / "ws")
    at = open_dashboard(tokens["alice"])
    assert "Dashboard" not in [p.proto.label for p in at.get("page_link")]
    assert at.error[0].value.startswith("Admins only.")
    assert not at.dataframe and not at.title and not at.get("graphviz_chart")
