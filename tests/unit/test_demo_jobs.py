"""The demo's stage scheduler: overrides that rebuild a config, and a failing job that stops the demo."""

from __future__ import annotations

import json
import time

import pytest

from rlhf.artifacts import ArtifactStore
from rlhf.config import CompareConfig, GenerateConfig, dump, load_config
from rlhf.demo import SIZES, Job, _run_jobs, flat_overrides, plan_starts
from rlhf.errors import RlhfError


def test_flat_overrides_rebuild_the_same_config():
    cfg = load_config(CompareConfig, None, ["models=[sft:v1, dpo:v2]", "sampling.max_new_tokens=64", "limit=12"])
    again = load_config(CompareConfig, None, flat_overrides(dump(cfg)))
    assert again == cfg
    gen = GenerateConfig(model="checkpoints/sft:v1", data="datasets/heldout:v1", k=1, limit=None)
    assert load_config(GenerateConfig, None, flat_overrides(dump(gen))) == gen


def test_a_failing_job_stops_the_demo_with_its_log_and_its_dependants_never_start(tmp_path):
    store = ArtifactStore(tmp_path / "ws")
    jobs = {
        # Fails at once: there is no such checkpoint.
        "bad": Job("generate", lambda done: ["model=nope:latest"]),
        "after": Job("generate", lambda done: [], after=("bad",)),
    }
    start = time.perf_counter()
    with pytest.raises(RlhfError, match=r"the bad job failed \(exit 2\); its log .* ends:\n.*nope") as e:
        _run_jobs(store, jobs, {})
    assert time.perf_counter() - start < 60
    log = str(e.value).split("its log ")[1].split(" ends")[0]
    assert "no artifact named 'nope'" in open(log).read()
    assert store.list() == []
    assert [p.name.split("-")[-1] for p in (tmp_path / "ws" / "logs").iterdir()] == ["bad.log"]  # "after" never ran


def test_the_critical_job_runs_alone_on_every_core_then_the_rest_share_them():
    overrides = lambda done: []
    jobs = {"reward": Job("reward", overrides, alone=True), "dpo": Job("dpo", overrides),
            "ppo": Job("ppo", overrides, after=("reward",)), "answers": Job("generate", overrides)}
    pending = list(jobs)
    assert plan_starts(jobs, pending, [], set(), slots=2, cpus=2) == [("reward", 2)]
    assert plan_starts(jobs, pending[1:], ["reward"], set(), slots=2, cpus=2) == []
    # reward done: dpo and ppo share the cores; answers waits for a free slot.
    assert plan_starts(jobs, pending[1:], [], {"reward"}, slots=2, cpus=2) == [("dpo", 1), ("ppo", 1)]
    # The last job left gets every core.
    assert plan_starts(jobs, ["answers"], [], {"reward", "dpo", "ppo"}, slots=2, cpus=2) == [("answers", 2)]
    # A job whose inputs are missing never starts, and does not hold a slot.
    assert plan_starts(jobs, ["ppo", "answers"], ["dpo"], set(), slots=2, cpus=2) == [("answers", 1)]


def test_an_alone_job_that_can_start_holds_back_the_jobs_after_it():
    overrides = lambda done: []
    jobs = {"a": Job("x", overrides), "b": Job("x", overrides, alone=True), "c": Job("x", overrides)}
    assert plan_starts(jobs, ["b", "c"], ["a"], set(), slots=2, cpus=2) == []
    assert plan_starts(jobs, ["b", "c"], [], set(), slots=2, cpus=2) == [("b", 2)]


@pytest.mark.parametrize("size", list(SIZES))
def test_every_demo_size_preset_loads_with_its_stage_config(size):
    """A preset key its stage no longer has (or a value it refuses) would fail only minutes into `make demo`."""
    from rlhf.cli import STAGES

    for stage, overrides in SIZES[size].items():
        if stage == "overlap":  # not a stage: the labeling overlap
            assert isinstance(overrides, int) and overrides >= 1
            continue
        models = [f"models={json.dumps(['a:v1', 'b:v1'])}"] if stage == "compare" else []
        load_config(STAGES[stage][0], None, [*models, *overrides])


@pytest.mark.parametrize("methods, says", [("dpo,sft", "'sft' is not a method"), ("ppo,ppo", "each method once"),
                                           ("", "each method once")])
def test_a_bad_methods_list_fails_in_one_line_before_any_work(tmp_path, capsys, methods, says):
    from conftest import rlhf

    assert rlhf(tmp_path / "ws", "demo", "--quick", "--methods", methods) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err, err
    assert not (tmp_path / "ws").exists() or not any((tmp_path / "ws").iterdir())
