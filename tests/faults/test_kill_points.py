"""Fault-injection tier: SIGKILL every stage at each kill point, re-run the same command, check the store.

Each case copies a prepared workspace, runs the stage's real CLI entry point in a forked child
with RLHF_FAULT=<point> (the child SIGKILLs itself there: rlhf/faults.py), checks what the kill
left, runs the same command again, and compares the result with an uninterrupted run of that
command on another copy. Forked, not spawned: a fresh interpreter spends ~10 s importing trl,
a fork of this one starts at once.

The points (MATRIX below maps each stage's to RLHF_FAULT names and the expected outcome):
  load        after the inputs are loaded, before any work is kept
  mid-train   after step 3, with a trainer checkpoint at step 2
  checkpoint  inside the step-4 save: weights, optimizer and RNG written, trainer_state.json not
  publish     the version built whole in its .tmp-*, before the rename
  published   right after the rename, before a training stage removes its scratch
After the kill and the re-run: no version is half-visible, no .tmp-* is left, every version
verifies; the versions are an uninterrupted run's plus those the killed run published and the
re-run did not reuse; a training stage resumed from the expected step or started clean; the
final metrics are the uninterrupted run's.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
import traceback
from collections import Counter
from pathlib import Path

import pytest

from conftest import DEMO_DATA, build_tiny_model, rlhf, write_marker_preferences
from rlhf import cli
from rlhf.artifacts import ArtifactStore

pytestmark = pytest.mark.faults

TRAIN = ["train.max_steps=6", "train.save_steps=2", "train.logging_steps=1", "train.batch_size=4"]
COMMANDS = {
    "data import": ["data", "import", "prompts", str(DEMO_DATA / "support_prompts_heldout.jsonl"), "--name", "heldout"],
    "sft": ["sft", *TRAIN, "max_length=256", "train.eval_fraction=0.05"],
    "reward": ["reward", "model=base:latest", *TRAIN, "max_length=256", "bootstrap_samples=100",
               "normalization_samples=16"],
    "dpo": ["dpo", "model=base:latest", *TRAIN, "max_length=256", "kl_prompts=2", "max_new_tokens=4"],
    "ppo": ["ppo", "model=base:latest", "train.max_steps=6", "train.save_steps=2", "train.batch_size=4",
            "ppo.minibatch_size=2", "ppo.update_epochs=1", "ppo.max_new_tokens=4", "eval_every=3", "eval_prompts=2"],
    **{stage: [stage, "model=base:latest", *TRAIN, "train.batch_size=2", "num_generations=2", "max_new_tokens=4",
               "eval_prompts=2"] for stage in ("rloo", "grpo")},
    "generate": ["generate", "model=base:latest", "k=2", "limit=4", "sampling.max_new_tokens=4"],
    "compare": ["compare", "checkpoints/base:v1", "checkpoints/other:v1", "judge=gold", "limit=4",
                "sampling.max_new_tokens=4", "bootstrap_samples=100"],
    "label export": ["label", "export"],
}
# The artifact each stage publishes last: where `publish` and `published` kill it.
OUTPUT = {"data import": "heldout", "sft": "sft", "reward": "reward", "dpo": "dpo", "ppo": "ppo", "rloo": "rloo",
          "grpo": "grpo",
          "generate": "candidates", "compare": "compare", "label export": "preferences"}

# stage -> point -> (RLHF_FAULT, outcome). Outcomes: "restarted" (nothing kept), "resumed@N" (from
# trainer step / PPO iteration N), "reused" (the re-run reuses artifacts the killed run published).
TRAINED = {"load": ("load", "restarted"), "mid-train": ("step-3", "resumed@2"),
           "checkpoint": ("checkpoint-4", "resumed@2")}
MATRIX: dict[str, dict[str, tuple[str, str] | str]] = {
    **{stage: {**TRAINED, "publish": (f"publish:{stage}", "resumed@6"), "published": (f"published:{stage}", "resumed@6")}
       for stage in ("sft", "reward", "dpo", "rloo", "grpo")},
    # PPO keeps no state after its last iteration, only at save_steps before it.
    "ppo": {**TRAINED, "publish": ("publish:ppo", "resumed@4"), "published": ("published:ppo", "resumed@4")},
    "data import": {"load": ("load", "restarted"), "mid-train": "N/A: no training; reading and validating the file "
                    "is all of its work (the load point)", "checkpoint": "N/A: nothing to checkpoint",
                    "publish": ("publish:heldout", "restarted"), "published": ("published:heldout", "restarted")},
    "generate": {"load": ("load", "restarted"), "mid-train": "N/A: sampling keeps nothing until it publishes",
                 "checkpoint": "N/A: nothing to checkpoint", "publish": ("publish:candidates", "restarted"),
                 "published": ("published:candidates", "restarted")},
    # compare's checkpoints are each model's answers, published as they are made.
    "compare": {"load": ("load", "restarted"), "mid-train": ("published:responses-base", "reused"),
                "checkpoint": "N/A: the answers it publishes per model are its checkpoints (mid-train)",
                "publish": ("publish:compare", "reused"), "published": ("published:compare", "reused")},
    # export writes rankings, then preferences from the same labels; a re-run writes both again.
    "label export": {"load": ("load", "restarted"), "mid-train": ("published:rankings", "restarted"),
                     "checkpoint": "N/A: nothing to checkpoint", "publish": ("publish:preferences", "restarted"),
                     "published": ("published:preferences", "restarted")},
}
TRAINING = ("sft", "reward", "dpo", "ppo", "rloo", "grpo")
CASES = [pytest.param(stage, point, id=f"{stage.replace(' ', '-')}-{point}")
         for stage, points in MATRIX.items() for point, case in points.items() if not isinstance(case, str)]


@pytest.fixture(scope="session")
def template(tmp_path_factory) -> Path:
    """A workspace with every stage's inputs: base and other (tiny models), sft, prompts and preference
    data, a reward model, and a labels database with a ranked task set."""
    from labeling_app.labels import load_task_set
    from labeling_app.simulated import run_annotators
    from labeling_app.store import LabelStore
    from rlhf import data

    root = tmp_path_factory.mktemp("faults")
    ws = root / "ws"
    model = build_tiny_model(root / "tiny")
    prefs = write_marker_preferences(root / "prefs.jsonl", n=40)
    for args in (["base", "import", str(model)], ["base", "import", str(model), "--name", "other"],
                 ["data", "import", "sft", str(DEMO_DATA / "support_sft.jsonl")],
                 ["data", "import", "prompts", str(DEMO_DATA / "support_prompts.jsonl")],
                 ["data", "import", "preferences", str(prefs)],
                 ["reward", "model=base:latest", "train.max_steps=2", "max_length=256", "bootstrap_samples=100",
                  "normalization_samples=16", "train.batch_size=4"]):
        assert rlhf(ws, *args) == 0, args
    store = ArtifactStore(ws)
    prompts = data.load_rows(store.resolve("prompts:latest"), schema="prompts")[:6]
    rows = [{**p, "responses": [{"response_id": f"{p['prompt_id']}-{j}", "text": text, "model": "base:v1"}
                                for j, text in enumerate(["Sure, I can help.", "No.", "Please email us."])]}
            for p in prompts]
    with store.create("dataset", "candidates", stage="generate", config={"schema": "candidates"}) as w:
        data.write_rows(w.path / data.DATA_FILE, rows)
    labels = LabelStore.for_workspace(ws)
    try:
        load_task_set(labels, store, "candidates:v1", overlap=2)
        run_annotators(labels, ["ann1", "ann2"], "candidates-v1", seed=0, temperature=1.0)
    finally:
        labels.close()
    shutil.rmtree(ws / ".scratch", ignore_errors=True)
    return ws


def copy_of(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest)
    return dest


def run_killed(ws: Path, args: list[str], fault: str, timeout: float = 300) -> int:
    """Run `rlhf ARGS` in a forked child that SIGKILLs itself at `fault`; return its wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            import torch

            # As DataLoader workers do: an OpenMP pool the parent started does not survive a fork.
            torch.set_num_threads(1)
            os.environ["RLHF_FAULT"] = fault
            code = cli.main(["--workspace", str(ws), *args])
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"rlhf {' '.join(args)} did not reach {fault} within {timeout:.0f} s")
        time.sleep(0.05)
    return done[1]


def versions(ws: Path) -> set[str]:
    """The exact ref of every version, asserting that each one is whole."""
    refs = set()
    for ref, art, problem in ArtifactStore(ws).scan():
        assert art is not None, f"{ref} is half-visible: {problem}"
        refs.add(ref)
    return refs


def counts(refs: set[str]) -> Counter:
    return Counter(ref.split(":")[0] for ref in refs)


def temporaries(ws: Path) -> list[Path]:
    return [p for d in ("datasets", "checkpoints", "reports") for p in (ws / d).glob("*/.tmp-*")]


def final(ws: Path, stage: str):
    store = ArtifactStore(ws)
    kind = "report" if stage == "compare" else "dataset" if OUTPUT[stage] in ("heldout", "candidates", "preferences") \
        else "checkpoint"
    return store.resolve(OUTPUT[stage], kind=kind)


def resumed_from(art) -> int | None:
    m = art.manifest["metrics"]
    return m.get("resumed_from_step", m.get("resumed_from_iteration"))


def same_result(art, ref) -> None:
    """The re-run's artifact matches the uninterrupted run's: same steps, the same metrics within noise."""
    m, r = art.manifest["metrics"], ref.manifest["metrics"]
    stage = art.manifest["stage"]
    if stage in ("sft", "reward", "dpo"):
        assert m["steps"] == r["steps"] == 6
        for key in ("train_loss", "eval_loss"):
            assert m[key] == pytest.approx(r[key], rel=1e-3), key
    elif stage in ("rloo", "grpo"):
        assert m["steps"] == r["steps"] == 6
        for key in ("train_loss", "eval_reward", "eval_kl"):
            assert m[key] == pytest.approx(r[key], rel=1e-3, abs=1e-6), key
    elif stage == "ppo":
        assert m["iterations"] == r["iterations"] == 6
        for key in ("final_kl", "eval_score", "eval_kl"):
            assert m[key] == pytest.approx(r[key], rel=1e-3, abs=1e-4), key
    elif stage == "compare":
        assert m["judges"] == r["judges"]
    else:  # datasets: the same rows
        assert art.manifest["files"] == ref.manifest["files"]


@pytest.fixture(scope="session")
def uninterrupted(template, tmp_path_factory):
    """Each stage's artifact and version counts from one uninterrupted run, made on first use."""
    done: dict[str, tuple] = {}

    def get(stage: str):
        if stage not in done:
            ws = copy_of(template, tmp_path_factory.mktemp("reference") / "ws")
            assert rlhf(ws, *COMMANDS[stage]) == 0
            done[stage] = final(ws, stage), versions(ws)
        return done[stage]

    return get


@pytest.mark.parametrize("stage, point", CASES)
def test_kill_then_rerun(stage, point, template, uninterrupted, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # the tokenizers pool would not survive the fork
    fault, outcome = MATRIX[stage][point]
    ws = copy_of(template, tmp_path / "ws")
    before = versions(ws)

    # 1. The kill: the child reached the point and died there; no version is half-visible, and the
    #    faulted artifact is published only when the kill came after its rename.
    status = run_killed(ws, COMMANDS[stage], fault)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"{fault} was never reached"
    left = versions(ws) - before
    faulted = fault.split(":")[1] if ":" in fault else OUTPUT[stage]
    assert (faulted in {ref.split(":")[0].split("/")[1] for ref in left}) == fault.startswith("published:")

    # 2. The same command again: it succeeds, leaves no temporary behind, and every version verifies.
    assert rlhf(ws, *COMMANDS[stage]) == 0
    assert temporaries(ws) == []
    after = versions(ws)
    store = ArtifactStore(ws)
    for ref in after:
        assert store.verify(ref) == [], ref

    # 3. Exactly the versions an uninterrupted run makes, plus those the killed run published and
    #    the re-run made again instead of reusing.
    art = final(ws, stage)
    ref_art, ref_refs = uninterrupted(stage)
    reused = {i["ref"] for i in art.manifest["inputs"] if "ref" in i} & left
    assert counts(after) == counts(ref_refs) + counts(left - reused)
    assert bool(reused) == (outcome == "reused")

    # 4. It resumed where it could, started clean where nothing was kept, and ended where an
    #    uninterrupted run ends.
    if outcome.startswith("resumed@"):
        assert resumed_from(art) == int(outcome.split("@")[1])
    elif stage in TRAINING:
        assert resumed_from(art) is None
    if stage in TRAINING:
        assert not list(ws.glob(".scratch/*")), "a finished run removes its scratch"
    same_result(art, ref_art)
