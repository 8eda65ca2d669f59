"""`python -m bench --quick` runs every stage, both sides, on a tiny model and writes the one result shape.

Only the harness is checked: speed figures are the benchmark's to report, never a test's.
"""

from __future__ import annotations

import json
import math

import pytest

from bench.__main__ import main
from bench.stages import STAGES
from conftest import shared_data

SIDE_KEYS = {"tokens_per_s", "peak_mem_mb", "wall_s", "metric", "mfu"}


@pytest.mark.slow
def test_quick_bench_writes_every_stage_in_the_fixed_shape(tiny_model_dir, tmp_path):
    shared_data("hh-rlhf-harmless/train.jsonl")  # reward and dpo train on it
    result = main(["--quick", "--model", str(tiny_model_dir), "--out", str(tmp_path)])

    written = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert written == json.loads(json.dumps(result))
    assert set(written["machine"]["peak_gflops"]) == {"bf16", "fp32"}
    assert all(v > 0 for v in written["machine"]["peak_gflops"].values())
    assert list(written["stages"]) == list(STAGES)
    for stage, s in written["stages"].items():
        for side in ("suite", "baseline"):
            assert SIDE_KEYS <= set(s[side]), (stage, side)
            assert s[side]["tokens_per_s"] > 0 and 0 < s[side]["mfu"] < 1 and math.isfinite(s[side]["metric"])
        assert s["ratio"]["tokens_per_s"] == pytest.approx(s["suite"]["tokens_per_s"] / s["baseline"]["tokens_per_s"])
    table = next(tmp_path.glob("*.md")).read_text()
    assert all(f"| {stage} | **suite / baseline** |" in table for stage in STAGES)


@pytest.mark.slow
def test_the_profiler_times_each_stage_by_operator(tiny_model_dir, tmp_path):
    from bench.profile import main as profile

    shared_data("hh-rlhf-harmless/train.jsonl")
    report = profile(["--quick", "--steps", "1", "--model", str(tiny_model_dir), "--out", str(tmp_path)]).read_text()
    for stage in ("sft", "reward", "dpo", "ppo_update"):
        [heading] = [line for line in report.splitlines() if line.startswith(f"### {stage} ")]
        share = float(heading.split(", ")[-1].split("%")[0])
        assert 0 < share < 100, heading  # some, not all, of a step is matmul
    assert report.count("| `aten::mm` |") == 4


def test_bench_refuses_an_unknown_stage_or_budget_key(capsys):
    with pytest.raises(SystemExit, match="unknown stage 'sfft'; choose from sft, reward"):
        main(["--stages", "sfft"])
    with pytest.raises(SystemExit, match="unknown budget key 'stepz'"):
        main(["--quick", "--stages", "sft", "--set", "stepz=3"])


@pytest.mark.slow
def test_the_gpu_acceptance_check_runs_every_stage_in_cpu_smoke_mode(tmp_path):
    import subprocess
    import sys

    # A subprocess, as a user runs it: the check imports and launches everything itself.
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--cpu-smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("gpu-check-cpu-smoke-*.json")).read_text())
    status = {c["name"]: c["status"] for c in result["checks"]}
    ran = ["sft lora", "sft full", "sft suite / plain TRL", "reward", "dpo", "ppo (merged sampler)",
           "ppo (static KV cache)", "ppo rollout suite / HF generate", "generate", "compare"]
    assert all(status[name] == "ok" for name in ran), status
    # Only what needs CUDA (or the packaged model, which the integration tier runs) is skipped, and says why.
    skipped = {c["name"]: c["skipped"] for c in result["checks"] if c["status"] == "skipped"}
    assert set(skipped) == set(status) - set(ran)
    assert skipped["sft qlora"] == skipped["fsdp (configs/accelerate/fsdp.yaml)"] == "needs CUDA"
    by = {c["name"]: c for c in result["checks"]}
    for name in ("sft suite / plain TRL", "ppo rollout suite / HF generate"):
        assert by[name]["ratio"] == pytest.approx(by[name]["tokens_per_s"] / by[name]["baseline_tokens_per_s"])
    assert all(0 < by[name]["mfu"] < 1 for name in ("sft lora", "sft full", "reward", "dpo"))
    assert by["compare"]["artifact"].startswith("reports/compare:")
    table = next(tmp_path.glob("gpu-check-cpu-smoke-*.md")).read_text()
    assert all(f"| {name} |" in table for name in status)
