"""The demo's stage scheduler: overrides that rebuild a config, and a failing job that stops the demo."""

from __future__ import annotations

import json
import os
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


def test_a_stage_takes_the_threads_offered_in_its_file(tmp_path, monkeypatch):
    import torch

    from rlhf.training import THREADS_FILE, take_offered_threads

    offer, before = tmp_path / "job.threads", torch.get_num_threads()
    monkeypatch.setenv(THREADS_FILE, str(offer))
    try:
        torch.set_num_threads(1)
        take_offered_threads()  # nothing offered yet
        assert torch.get_num_threads() == 1
        offer.write_text("2")
        take_offered_threads()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: nothing to offer")
def test_the_job_left_running_alone_is_offered_every_core_and_takes_them(tiny_ws, monkeypatch, capsys):
    """Two single-threaded jobs side by side; once the short one ends, the long one (its
    dependant waits for it) moves onto every core at its next training step."""
    from conftest import DEMO_DATA, rlhf

    monkeypatch.setenv("RLHF_LOG_LEVEL", "INFO")
    assert rlhf(tiny_ws, "data", "import", "prompts", str(DEMO_DATA / "support_prompts.jsonl")) == 0
    store = ArtifactStore(tiny_ws)
    jobs = {
        "short": Job("generate", lambda d: ["model=base:latest", "data=prompts:latest", "k=1", "limit=1",
                                            "sampling.max_new_tokens=2"]),
        "long": Job("sft", lambda d: ["model=base:latest", "data=sft:latest", "train.max_steps=300",
                                      "train.batch_size=2", "max_length=128"]),
        "after": Job("generate", lambda d: [f"model={d['long'].ref}", "data=prompts:latest", "k=1", "limit=1",
                                            "sampling.max_new_tokens=2"], after=("long",)),
    }
    _run_jobs(store, jobs, {})
    out = capsys.readouterr().out
    assert "short: started (1 thread;" in out and "long: started (1 thread;" in out
    assert f"long: alone now, offered {os.cpu_count()} threads" in out
    assert "after: started" in out.split("alone now")[1]  # the offer came before the dependant started
    long_log = next((tiny_ws / "logs").glob("demo-*-long.log")).read_text()
    assert f"now on {os.cpu_count()} threads" in long_log
    assert not list((tiny_ws / "logs").glob("*.threads")) and not list((tiny_ws / "logs").glob("*.tmp"))


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
