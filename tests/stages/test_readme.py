"""The README's commands, run: every command line in the sections a new user follows, on a tiny
random model, from a directory that is not the checkout (so `demo:` files and `configs/` paths
must resolve through the suite itself).

`README` maps each command line of those sections, exactly as the README shows it, to the
concrete commands that run it here: a synopsis line (`FILE`, `[--name N]`) becomes the forms it
stands for, and training stages get tiny sizes appended (keys the line sets itself are kept).
`test_the_readme_shows_exactly_these_commands` fails when the README gains, loses or changes a
command line, so neither side can rot without the other.
"""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import rlhf, shared_data, write_marker_preferences

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("Commands", "Fine-tuning methods", "GPUs and several processes", "Comparing checkpoints", "Human feedback",
            "The artifact store")

# Sizes that keep each stage to seconds on the tiny model.
TINY = {
    "sft": ["train.max_steps=2", "train.batch_size=4", "max_length=128"],
    "reward": ["train.max_steps=2", "train.batch_size=4", "max_length=192", "bootstrap_samples=100",
               "normalization_samples=16"],
    "dpo": ["train.max_steps=2", "train.batch_size=4", "max_length=192", "kl_prompts=2", "max_new_tokens=4"],
    "ppo": ["train.max_steps=1", "train.batch_size=4", "ppo.minibatch_size=2", "ppo.max_new_tokens=6",
            "eval_every=100", "eval_prompts=2"],
    **{stage: ["train.max_steps=1", "train.batch_size=2", "num_generations=2", "max_new_tokens=6", "eval_prompts=2"]
       for stage in ("rloo", "grpo")},
    "generate": ["limit=4", "sampling.max_new_tokens=8"],
    "compare": ["limit=4", "sampling.max_new_tokens=8", "bootstrap_samples=100"],
}
FIXED_SFT = "train.max_steps=6 train.batch_size=8 train.learning_rate=2e-4 train.seed=0 max_length=384"
ELSEWHERE = "covered elsewhere"

# README line -> commands run for it: a string (exit 0 expected), (string, exit code), a callable
# of the workspace, or ELSEWHERE with the test that covers it.
README: dict[str, dict[str, list]] = {
    "Commands": {
        "rlhf base import": ["base import {tiny}"],  # the packaged model: tests/integration
        "rlhf base import PATH": ["base import {tiny} --name base2"],
        "rlhf data import sft FILE [--name N] [--skip-invalid]": [
            "data import sft demo:support_sft.jsonl", "data import sft demo:support_sft.jsonl --name sft2 --skip-invalid"],
        "rlhf data import prompts FILE [--name N]": ["data import prompts demo:support_prompts.jsonl",
                                                     "data import prompts demo:support_prompts_heldout.jsonl --name heldout"],
        "rlhf data import preferences FILE [--format trl|hh] [--name N]": [
            "data import preferences {prefs}", "data import preferences {prefs} --format trl --name prefs2"],
        "rlhf sft [--config configs/sft.yaml] [key=value ...]": ["sft --config configs/sft.yaml", "sft lora.r=4"],
        "rlhf generate [--config configs/generate.yaml] model=sft:latest data=prompts:latest k=4": [
            "generate --config configs/generate.yaml model=sft:latest data=prompts:latest k=4"],
        "rlhf reward [--config configs/reward.yaml] model=sft:latest data=preferences:latest": [
            "reward --config configs/reward.yaml model=sft:latest data=preferences:latest"],
        "rlhf score reward=reward:latest data=candidates:latest": ["score reward=reward:latest data=candidates:latest"],
        "rlhf dpo [--config configs/dpo.yaml] model=sft:latest data=preferences:latest": [
            "dpo --config configs/dpo.yaml model=sft:latest data=preferences:latest"],
        "rlhf ppo [--config configs/ppo.yaml] model=sft:latest reward=reward:latest data=prompts:latest": [
            "ppo --config configs/ppo.yaml model=sft:latest reward=reward:latest data=prompts:latest"],
        "rlhf rloo [--config configs/rloo.yaml] model=sft:latest reward=reward:latest data=prompts:latest": [
            "rloo --config configs/rloo.yaml model=sft:latest reward=reward:latest data=prompts:latest"],
        "rlhf grpo [--config configs/grpo.yaml] model=sft:latest reward=reward:latest data=prompts:latest": [
            "grpo --config configs/grpo.yaml model=sft:latest reward=reward:latest data=prompts:latest"],
        "rlhf compare sft:latest dpo:latest ppo:latest data=heldout:latest judge=gold,reward:latest": [
            "compare sft:latest dpo:latest ppo:latest data=heldout:latest judge=gold,reward:latest"],
        "rlhf artifacts list | show REF | lineage REF | verify REF": [
            "artifacts list", "artifacts show ppo:latest", "artifacts lineage ppo:latest", "artifacts verify ppo:latest"],
        "rlhf config show STAGE [--config F] [key=value ...]": ["config show sft",
                                                                 "config show dpo --config configs/dpo.yaml beta=0.2"],
        "rlhf export REF DIR [--dtype bf16|fp16|fp32]": ["export ppo:latest served-synopsis",
                                                         "export sft:latest served-sft --dtype fp32"],
        "rlhf demo [--quick] [--methods dpo,ppo,rloo,grpo]": [
            ELSEWHERE, "tests/integration/test_default_model.py runs rlhf demo --quick, then with --methods"],
        # A typical SFT run on your own data, in a workspace of its own as a new user starts
        # (here `sft` would also name the synopsis' dataset, and the ref would be ambiguous).
        "rlhf data import sft my_support_chats.jsonl --name support": [
            "--workspace {typical} base import {tiny}", "--workspace {typical} data import sft my_support_chats.jsonl --name support"],
        "rlhf sft data=support:latest train.epochs=2 lora.r=8": [
            "--workspace {typical} sft data=support:latest train.epochs=2 lora.r=8"],
        "rlhf artifacts lineage sft:latest": ["--workspace {typical} artifacts lineage sft:latest"],
        "rlhf sft train.max_step=3": [("sft train.max_step=3", 2)],  # shown as the unknown-key error
        "rlhf sft trl.lr_scheduler_type=cosine trl.warmup_steps=0.05": [
            "sft trl.lr_scheduler_type=cosine trl.warmup_steps=0.05"],
        "rlhf config show ppo --config configs/ppo.yaml ppo.kl_coef=0.1": [
            "config show ppo --config configs/ppo.yaml ppo.kl_coef=0.1"],
        "rlhf export ppo:latest served-ppo": ["export ppo:latest served-ppo"],
        "rlhf export reward:latest served-rm --dtype fp32": ["export reward:latest served-rm --dtype fp32"],
        "accelerate launch --config_file configs/accelerate/ddp.yaml -m rlhf.cli sft": [
            ELSEWHERE, "tests/stages/test_sft.py::test_sft_runs_under_accelerate_launch_with_two_cpu_processes"],
        "accelerate launch --multi_gpu --num_processes 2 -m rlhf.cli sft train.max_steps=10": [
            ELSEWHERE, "tests/stages/test_sft.py::test_sft_runs_under_accelerate_launch_with_two_cpu_processes"],
        "rlhf data import preferences FILE --format hh": [
            lambda ws: ["data", "import", "preferences", str(shared_data("hh-rlhf-harmless/dev.jsonl")),
                        "--format", "hh", "--name", "hh-dev"]],
        "rlhf data import preferences ../shared/data/hh-rlhf-harmless/train.jsonl --format hh": [
            lambda ws: ["data", "import", "preferences", str(shared_data("hh-rlhf-harmless/train.jsonl")),
                        "--format", "hh"],
            "reward model=sft:latest data=preferences:latest train.max_steps=1"],
    },
    "Fine-tuning methods": {
        "rlhf sft lora.r=16 lora.alpha=32": ["sft lora.r=16 lora.alpha=32"],
        "rlhf sft mode=qlora": [("sft mode=qlora", 2)],  # needs CUDA, and says so
        "rlhf sft mode=full train.learning_rate=2e-5": ["sft mode=full train.learning_rate=2e-5"],
        "rlhf sft mode=freeze freeze.trainable_layers=2": ["sft mode=freeze freeze.trainable_layers=2"],
        "rlhf reward mode=freeze freeze.trainable_layers=0": ["reward mode=freeze freeze.trainable_layers=0"],
        "rlhf sft mode=peft peft.method=ia3": ["sft mode=peft peft.method=ia3"],
        "rlhf sft mode=peft peft.method=prompt_tuning peft.num_virtual_tokens=16": [
            "sft mode=peft peft.method=prompt_tuning peft.num_virtual_tokens=16"],
        "rlhf sft mode=peft peft.method=loha peft.r=8 peft.target_modules=[q_proj,v_proj]": [
            "sft mode=peft peft.method=loha peft.r=8 peft.target_modules=[q_proj,v_proj]"],
        "rlhf sft model=sft:v1 data=domain:latest output=sft-domain": [
            "data import sft demo:support_sft.jsonl --name domain", "sft model=sft:v1 data=domain:latest output=sft-domain"],
        "rlhf sft data=[support:latest,chitchat:v2] data_weights=[0.7,0.3]": [
            "data import sft demo:support_sft.jsonl --name support",
            "data import sft demo:support_sft.jsonl --name chitchat",
            "data import sft demo:support_sft.jsonl --name chitchat --normalize-whitespace",
            "sft data=[support:latest,chitchat:v2] data_weights=[0.7,0.3]"],
        "rlhf sft train.eval_steps=10 train.early_stopping_patience=3": [
            "sft train.eval_steps=10 train.early_stopping_patience=3"],
        "rlhf sweep sft lora.r=8,16 train.learning_rate=1e-4,5e-5": ["sweep sft lora.r=8,16 train.learning_rate=1e-4,5e-5"],
        "rlhf sweep sft --search tpe --trials 12 train.learning_rate=log:1e-5..1e-3 lora.r=8,16,32": [
            "sweep sft --search tpe --trials 12 train.learning_rate=log:1e-5..1e-3 lora.r=8,16,32"],
        "rlhf data import sft FILE --normalize-whitespace --drop-empty-turns --dedup near --max-tokens 512": [
            "data import sft demo:support_sft.jsonl --normalize-whitespace --drop-empty-turns --dedup near "
            "--max-tokens 512"],
        "rlhf --workspace /tmp/w8 base import": ["--workspace {w8} base import {tiny}"],
        "rlhf --workspace /tmp/w8 data import sft demo:support_sft.jsonl": [
            "--workspace {w8} data import sft demo:support_sft.jsonl"],
        f"rlhf --workspace /tmp/w8 sft {FIXED_SFT} output=m-lora": [f"--workspace {{w8}} sft {FIXED_SFT} output=m-lora"],
        "rlhf --workspace /tmp/w8 sft ... mode=freeze freeze.trainable_layers=2 output=m-freeze": [
            f"--workspace {{w8}} sft {FIXED_SFT} mode=freeze freeze.trainable_layers=2 output=m-freeze"],
        "rlhf --workspace /tmp/w8 sft ... mode=peft peft.method=ia3 output=m-ia3": [
            f"--workspace {{w8}} sft {FIXED_SFT} mode=peft peft.method=ia3 output=m-ia3"],
        "rlhf --workspace /tmp/w8 sft ... mode=full output=m-full": [
            f"--workspace {{w8}} sft {FIXED_SFT} mode=full output=m-full"],
    },
    "GPUs and several processes": {
        "accelerate launch --config_file configs/accelerate/ddp.yaml -m rlhf.cli dpo": [
            ELSEWHERE, "tests/stages/test_distributed.py::test_dpo_trains_on_two_shards_and_learns_what_one_process_learns"],
        "accelerate launch --multi_gpu --num_processes 2 -m rlhf.cli reward train.max_steps=10": [
            ELSEWHERE,
            "tests/stages/test_distributed.py::test_reward_trains_on_two_shards_and_learns_what_one_process_learns"],
    },
    "Comparing checkpoints": {
        "rlhf data import prompts demo:support_prompts_heldout.jsonl --name heldout": [
            "data import prompts demo:support_prompts_heldout.jsonl --name heldout"],
        "rlhf compare sft:latest dpo:latest ppo:latest data=heldout:latest judge=gold,reward:latest": [
            "compare sft:latest dpo:latest ppo:latest data=heldout:latest judge=gold,reward:latest"],
        "rlhf label load-ab responses-sft:latest responses-dpo:latest": [
            "label load-ab responses-sft:latest responses-dpo:latest"],
        "rlhf label serve": ["serve"],
        "rlhf label export --task-set ab-...": [lambda ws: ["label", "export", "--task-set", _label_all(ws)]],
        "rlhf compare sft:latest dpo:latest data=heldout:latest judge=human:latest,gold": [
            "compare sft:latest dpo:latest data=heldout:latest judge=human:latest,gold"],
    },
    "Human feedback": {
        "rlhf data import prompts demo:support_prompts.jsonl": ["data import prompts demo:support_prompts.jsonl"],
        "rlhf generate model=sft:latest data=prompts:latest k=4": ["generate model=sft:latest data=prompts:latest k=4"],
        "rlhf label users add alice": ["label users add alice"],
        "rlhf label users add bob --role admin": ["label users add bob --role admin"],
        "rlhf label load candidates:v1 --overlap 3": ["label load candidates:v1 --overlap 3"],
        "rlhf label serve --port 8501": ["serve"],
        # Between serve and status the annotators rank: simulated ones here.
        "rlhf label status": [lambda ws: _label_all(ws) and ["label", "status"]],
        "rlhf label export --pairs all": ["label export --pairs all"],
        "rlhf label load-ab candidates:vA candidates:vB": [
            "generate model=base:latest data=prompts:latest k=2 output=candidates-base",
            "label load-ab candidates:latest candidates-base:latest"],
    },
    "The artifact store": {
        "rlhf artifacts verify REF": ["artifacts verify sft:latest"],
        "rlhf artifacts lineage REF": ["artifacts lineage sft:latest"],
    },
}
# What each section's commands need that the README builds in an earlier section.
SETUP = {
    "Commands": [],
    "GPUs and several processes": [],
    "Fine-tuning methods": ["base import {tiny}", "data import sft demo:support_sft.jsonl",
                            "data import preferences {prefs}", "sft"],
    "Comparing checkpoints": ["base import {tiny}", "data import sft demo:support_sft.jsonl",
                              "data import preferences {prefs}", "data import prompts demo:support_prompts.jsonl",
                              "sft", "reward", "dpo", "ppo"],
    "Human feedback": ["base import {tiny}", "data import sft demo:support_sft.jsonl", "sft"],
    "The artifact store": ["base import {tiny}", "data import sft demo:support_sft.jsonl --name support",
                           "sft data=support:latest"],
}


def readme_commands(section: str) -> list[str]:
    """The command lines of a README section: its code blocks (`$ ` prompts and `# ` comments
    dropped), its table cells and the code spans in its prose, whitespace collapsed."""
    out, current = [], None
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].startswith(section)
            continue
        if not current:
            continue
        if line.startswith("    "):
            found = [line.strip().removeprefix("$ ")]
        elif line.startswith("|"):
            found = re.findall(r"`([^`]+)`", line)
        else:  # in prose, a code span with arguments is a command too (`rlhf sft` alone names a stage)
            found = [c for c in re.findall(r"`([^`]+)`", line) if len(c.split()) >= 4]
        for cmd in found:
            cmd = re.sub(r"\s+", " ", re.sub(r"\s+#.*$", "", cmd)).strip()
            if cmd.startswith(("rlhf ", "accelerate ")):
                out.append(cmd)
    return out


@pytest.mark.parametrize("section", SECTIONS)
def test_the_readme_shows_exactly_these_commands(section):
    # A line the README repeats (the typical SFT run starts with `rlhf base import` again) runs once.
    assert list(dict.fromkeys(readme_commands(section))) == list(README[section])


def _label_all(ws: Path) -> str:
    """What annotators do in the browser: simulated annotators label the newest task set."""
    from labeling_app.simulated import run_annotators
    from labeling_app.store import LabelStore

    labels = LabelStore.for_workspace(ws)
    try:
        name = labels.task_set(None).name
        run_annotators(labels, ["ann-1", "ann-2", "ann-3"], name, seed=0, temperature=0.5)
    finally:
        labels.close()
    return name


def _serve(ws: Path) -> None:
    """`rlhf label serve` answers HTTP, then stops cleanly on SIGTERM."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "--workspace", str(ws), "label", "serve",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while True:
            try:
                assert urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).status == 200
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "rlhf label serve did not come up"
                time.sleep(0.5)
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) is not None


def _run(ws: Path, command, tiny_model: Path, prefs: Path) -> None:
    if command == "serve":
        return _serve(ws)
    rc = 0
    if isinstance(command, tuple):
        command, rc = command
    args = command(ws) if callable(command) else shlex.split(command.format(tiny=tiny_model, prefs=prefs,
                                                                            w8=ws.parent / "w8",
                                                                            typical=ws.parent / "typical"))
    if args[0] == "--workspace":  # a line that names its own workspace
        ws, args = Path(args[1]), args[2:]
    stage = args[1] if args[0] == "sweep" else args[0]
    given = {a.split("=", 1)[0] for a in args if "=" in a}
    args += [o for o in TINY.get(stage, []) if o.split("=", 1)[0] not in given]
    assert rlhf(ws, *args) == rc, args


@pytest.mark.parametrize("section", SECTIONS)
def test_the_readme_commands_run_from_another_directory(section, tmp_path, monkeypatch, tiny_model_dir):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    shutil.copy(ROOT / "rlhf" / "demo_data" / "support_sft.jsonl", elsewhere / "my_support_chats.jsonl")
    prefs = write_marker_preferences(tmp_path / "prefs.jsonl", n=40)
    ws = tmp_path / "ws"
    for command in SETUP[section]:
        _run(ws, command, tiny_model_dir, prefs)
    for line, commands in README[section].items():
        if commands[0] == ELSEWHERE:
            continue
        for command in commands:
            _run(ws, command, tiny_model_dir, prefs)
