"""`rlhf sft` on a tiny random Llama: learning, output contract, resume after SIGKILL, DDP, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DEMO_DATA, rlhf

FAST = ["train.batch_size=8", "max_length=256", "train.logging_steps=2"]


def manifest(ws: Path, name: str = "sft", version: int = 1) -> dict:
    return json.loads((ws / "checkpoints" / name / f"v{version:04d}" / "manifest.json").read_text())


def test_lora_sft_lowers_eval_loss_and_writes_the_contracted_layout(tiny_ws):
    assert rlhf(tiny_ws, "sft", "train.max_steps=30", "train.learning_rate=1e-2", *FAST) == 0
    m = manifest(tiny_ws)
    metrics = m["metrics"]
    # Learning happened on held-out rows of the training distribution, not just "weights changed".
    assert metrics["eval_loss"] < 0.93 * metrics["eval_loss_initial"]
    assert metrics["steps"] == 30
    assert metrics["train_tokens"] > 0 and metrics["tokens_per_s"] > 0 and metrics["peak_mem_mb"] > 0
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert {i["role"]: i["ref"] for i in m["inputs"]} == {"model": "checkpoints/base:v1", "data": "datasets/sft:v1"}
    assert m["config"]["train"]["max_steps"] == 30 and m["config"]["mode"] == "lora"
    # The layout is a contract: an adapter, its tokenizer and chat template, logs, the manifest.
    files = {p.relative_to(tiny_ws / "checkpoints/sft/v0001").as_posix()
             for p in (tiny_ws / "checkpoints/sft/v0001").rglob("*") if p.is_file()}
    events = {f for f in files if f.startswith("logs/tensorboard/events.out.tfevents.")}
    assert events, "the TensorBoard curves of report.to's default"
    assert files - events == {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json",
                     "tokenizer_config.json", "chat_template.jinja", "logs/train_log.jsonl", "logs/loss.png",
                     "manifest.json"}
    losses = [json.loads(line)["loss"] for line in (tiny_ws / "checkpoints/sft/v0001/logs/train_log.jsonl")
              .read_text().splitlines() if "loss" in json.loads(line)]
    assert losses[-1] < losses[0]
    # Scratch checkpoints are removed after success.
    assert not any((tiny_ws / ".scratch").glob("sft-*"))


def test_full_sft_with_merge_rejected_and_full_mode_trains_every_weight(tiny_ws, capsys):
    assert rlhf(tiny_ws, "sft", "mode=full", "merge=true") == 2
    assert "merge=true only applies" in capsys.readouterr().err
    assert rlhf(tiny_ws, "sft", "mode=full", "train.max_steps=10", "train.learning_rate=1e-3", *FAST) == 0
    metrics = manifest(tiny_ws)["metrics"]
    assert metrics["trainable_params"] == metrics["total_params"]
    assert metrics["eval_loss"] < metrics["eval_loss_initial"]
    assert (tiny_ws / "checkpoints/sft/v0001/model.safetensors").is_file()


def test_merged_lora_checkpoint_loads_as_plain_weights_and_continues_from_adapter(tiny_ws):
    """An adapter checkpoint can be the `model` of the next SFT run (sequential fine-tuning)."""
    assert rlhf(tiny_ws, "sft", "train.max_steps=4", *FAST) == 0
    assert rlhf(tiny_ws, "sft", "model=sft:v1", "merge=true", "train.max_steps=4", *FAST) == 0
    m2 = manifest(tiny_ws, version=2)
    assert (tiny_ws / "checkpoints/sft/v0002/model.safetensors").is_file()
    assert m2["inputs"][0]["ref"] == "checkpoints/sft:v1"

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_ws / "checkpoints/sft/v0002")
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_a_merged_checkpoint_keeps_the_whole_update_in_fp32(tiny_ws):
    """Trained under autocast (bf16 where the machine has it), the adapter is merged into the fp32 weights,
    so none of its update rounds away."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf import models
    from rlhf.artifacts import ArtifactStore

    # precision=auto: bf16 on a machine with AMX, AVX512-BF16 or a bf16 GPU, where the rounding risk is;
    # fp32 elsewhere (bf16 is refused there), where the merge must still carry the whole update.
    assert rlhf(tiny_ws, "sft", "train.max_steps=4", "train.precision=auto", *FAST) == 0
    assert rlhf(tiny_ws, "sft", "train.max_steps=4", "train.precision=auto", "merge=true", *FAST) == 0
    store = ArtifactStore(tiny_ws)
    adapter = models.load_causal_lm(store, store.resolve("checkpoints/sft:v1"))  # merged in fp32 on load: the reference
    merged = AutoModelForCausalLM.from_pretrained(tiny_ws / "checkpoints/sft/v0002")
    base = AutoModelForCausalLM.from_pretrained(tiny_ws / "checkpoints/base/v0001")
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    ids = torch.randint(3, 100, (2, 16))
    with torch.no_grad():
        got, want, before = (m(input_ids=ids).logits for m in (merged, adapter, base))
    # Same seed and data, so both runs learned the same update: the merge must carry all of it.
    assert (want - before).abs().max() > 1e-3
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("args, expected", [
    (["mode=qlora"], "mode=qlora needs a CUDA GPU"),
    (["train.max_step=3"], "did you mean 'train.max_steps'"),
    (["model=nope:latest"], "no artifact named 'nope'"),
    (["data=sft:v7"], "no version v7 of datasets/sft; it has v1"),
    (["trl.not_a_knob=1"], "unknown key 'trl.not_a_knob'"),
    (["data=base:latest"], "'base:latest' is a checkpoint (checkpoints/base), not a dataset; give a dataset here"),
])
def test_bad_input_is_one_line_and_publishes_nothing(tiny_ws, capsys, args, expected):
    if expected.startswith("mode=qlora"):
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA, so qlora is allowed")
    assert rlhf(tiny_ws, "sft", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err
    assert not (tiny_ws / "checkpoints" / "sft").exists()


def test_unwritable_workspace_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert rlhf(blocker / "ws", "sft") == 2
    err = capsys.readouterr().err.strip()
    assert f"workspace {blocker / 'ws'} is under {blocker}, which is a file" in err and "\n" not in err


def _cli(ws: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "rlhf.cli", "--workspace", str(ws), *args]


@pytest.mark.slow
def test_sigkilled_run_resumes_from_its_last_checkpoint(tiny_ws):
    cmd = _cli(tiny_ws, "sft", "mode=full", "train.max_steps=400", "train.save_steps=10", *FAST)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            states = list((tiny_ws / ".scratch").glob("sft-*/checkpoint-*/trainer_state.json"))
            if any(int(s.parent.name.split("-")[1]) >= 20 for s in states):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (tiny_ws / "checkpoints" / "sft").exists(), "a killed run must publish nothing"

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stderr
    metrics = manifest(tiny_ws)["metrics"]
    assert metrics["resumed_from_step"] >= 20 and metrics["steps"] == 400
    assert metrics["eval_loss"] < metrics["eval_loss_initial"]
    assert not any((tiny_ws / ".scratch").glob("sft-*"))


@pytest.mark.slow
def test_sft_runs_under_accelerate_launch_with_two_cpu_processes(tiny_ws):
    # accelerate's `--cpu` launcher starts one process; `--multi_gpu` goes through torchrun,
    # which on a machine without CUDA runs the processes on the CPU with the gloo backend.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "-m", "rlhf.cli", "--workspace", str(tiny_ws), "sft", "train.max_steps=6",
           "train.learning_rate=1e-2", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    # One artifact, published once by the main process, trained by both.
    assert [p.name for p in (tiny_ws / "checkpoints" / "sft").iterdir() if p.name.startswith("v")] == ["v0001"]
    metrics = manifest(tiny_ws)["metrics"]
    assert metrics["processes"] == 2
    assert metrics["eval_loss"] < metrics["eval_loss_initial"]


def test_sequential_sft_starts_where_the_previous_run_ended_and_shows_in_the_lineage(tiny_ws):
    assert rlhf(tiny_ws, "sft", "train.max_steps=10", "train.learning_rate=1e-2", *FAST) == 0
    assert rlhf(tiny_ws, "sft", "model=sft:v1", "train.max_steps=10", "train.learning_rate=1e-2", *FAST) == 0
    first, second = manifest(tiny_ws)["metrics"], manifest(tiny_ws, version=2)["metrics"]
    # Same data and seed -> the same held-out rows: the second run starts at the first one's end.
    assert second["eval_loss_initial"] == pytest.approx(first["eval_loss"], rel=1e-3)
    assert second["eval_loss"] < second["eval_loss_initial"] < first["eval_loss_initial"]
    from rlhf.artifacts import ArtifactStore

    lines = ArtifactStore(tiny_ws).lineage("checkpoints/sft:v2").splitlines()
    assert lines[0].startswith("checkpoints/sft:v2  [sft]")
    assert any("model: checkpoints/sft:v1  [sft]" in line for line in lines)
    assert any("model: checkpoints/base:v1  [base import]" in line for line in lines)


def test_two_datasets_mix_by_weight_and_both_are_inputs(tiny_ws, tmp_path):
    # A second task: the same prompts, always answered with one fixed sign-off.
    rows = [json.loads(line) for line in (DEMO_DATA / "support_sft.jsonl").read_text().splitlines()[:60]]
    signoff = tmp_path / "signoff.jsonl"
    signoff.write_text("".join(json.dumps({"messages": r["messages"][:-1] + [
        {"role": "assistant", "content": "Thanks for reaching out. Have a lovely day!"}]}) + "\n" for r in rows))
    assert rlhf(tiny_ws, "data", "import", "sft", str(signoff), "--name", "signoff") == 0

    assert rlhf(tiny_ws, "sft", "data=[sft:v1, signoff:latest]", "data_weights=[0.7, 0.3]", "train.max_steps=20",
                "train.learning_rate=1e-2", *FAST) == 0
    m = manifest(tiny_ws)
    assert [(i["role"], i["ref"]) for i in m["inputs"]] == [
        ("model", "checkpoints/base:v1"), ("data", "datasets/sft:v1"), ("data", "datasets/signoff:v1")]
    mix = m["metrics"]["data_mix"]
    assert [d["ref"] for d in mix] == ["datasets/sft:v1", "datasets/signoff:v1"]
    assert [d["weight"] for d in mix] == pytest.approx([0.7, 0.3])
    # Held out per dataset, pooled unweighted; every training row of both is used at least once.
    assert m["metrics"]["eval_rows"] == sum(d["eval_rows"] for d in mix) == 24 + 6
    assert m["metrics"]["train_rows"] >= sum(d["train_rows"] for d in mix)
    assert m["metrics"]["eval_loss"] < 0.93 * m["metrics"]["eval_loss_initial"]
    from rlhf.artifacts import ArtifactStore

    lineage = ArtifactStore(tiny_ws).lineage("checkpoints/sft:v1")
    assert "data: datasets/sft:v1" in lineage and "data: datasets/signoff:v1" in lineage


def test_early_stopping_keeps_the_best_checkpoint_of_an_overfitting_run(tiny_ws, tmp_path):
    # 24 rows, full fine-tuning at a high learning rate: held-out loss bottoms out, then rises.
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join((DEMO_DATA / "support_sft.jsonl").read_text().splitlines()[:24]) + "\n")
    assert rlhf(tiny_ws, "data", "import", "sft", str(small), "--name", "small") == 0
    assert rlhf(tiny_ws, "sft", "data=small:latest", "mode=full", "train.max_steps=200", "train.learning_rate=1e-2",
                "train.batch_size=4", "train.eval_fraction=0.25", "train.eval_steps=3",
                "train.early_stopping_patience=2", "max_length=256", "train.logging_steps=3") == 0
    m = manifest(tiny_ws)["metrics"]
    log = [json.loads(line) for line in (tiny_ws / "checkpoints/sft/v0001/logs/train_log.jsonl").read_text().splitlines()]
    evals = [(e["step"], e["eval_loss"]) for e in log if "eval_loss" in e][:-1]  # the last one is the final evaluate()
    best_step, best = min(evals, key=lambda e: e[1])

    assert m["stop_reason"].startswith("early stopping: eval_loss did not improve")
    assert m["stopped_at_step"] == m["steps"] < 200
    # It stopped `patience` evaluations after the best one, and the published weights are the best ones.
    assert m["best_step"] == best_step and m["stopped_at_step"] == best_step + 2 * 3
    assert all(loss >= best for step, loss in evals if step > best_step)
    assert m["restored_best_checkpoint"] is True
    assert m["eval_loss"] == pytest.approx(best, rel=1e-4) == pytest.approx(m["best_eval_loss"], rel=1e-4)
    assert m["eval_loss"] < m["eval_loss_initial"]
    assert not any((tiny_ws / ".scratch").glob("sft-*"))


def test_without_early_stopping_the_manifest_says_the_budget_ran_out(tiny_ws):
    assert rlhf(tiny_ws, "sft", "train.max_steps=2", *FAST) == 0
    m = manifest(tiny_ws)["metrics"]
    assert (m["stopped_at_step"], m["stop_reason"]) == (2, "max_steps=2 reached")
