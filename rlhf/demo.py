"""`rlhf demo`: the loop on the packaged SmolLM2-135M-Instruct and the demo data.

    base import -> data import -> sft -> generate -> simulated annotators rank in the labeling
    store -> export preferences -> reward -> dpo and ppo -> held-out results

Every step writes new artifact versions; nothing is overwritten. `--quick` runs the same
path with tiny sizes as a smoke test. The sizes below are chosen for a 2-core CPU.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rlhf.artifacts import Artifact, ArtifactStore
from rlhf.config import DPOConfig, GenerateConfig, PPOConfig, RewardConfig, SFTConfig, load_config

DEMO_DATA = Path(__file__).parent / "demo_data"
ANNOTATORS = [f"annotator-{i}" for i in range(1, 6)]

SIZES = {
    "full": {
        "sft": ["train.max_steps=20", "train.batch_size=8", "train.learning_rate=2e-4", "max_length=384"],
        "generate": ["k=4", "limit=64", "sampling.temperature=0.9", "sampling.max_new_tokens=64", "batch_size=8"],
        "overlap": 3,
        "reward": ["train.max_steps=20", "train.batch_size=8", "train.learning_rate=3e-4", "max_length=320",
                   "normalization_samples=128"],
        "dpo": ["train.max_steps=20", "train.batch_size=8", "train.learning_rate=2e-4", "beta=0.1",
                "max_length=320", "kl_prompts=8", "max_new_tokens=32"],
        "ppo": ["train.max_steps=12", "train.batch_size=8", "train.learning_rate=1e-4", "ppo.minibatch_size=4",
                "ppo.max_new_tokens=48", "eval_every=6", "eval_prompts=16"],
    },
    "quick": {
        "sft": ["train.max_steps=3", "train.batch_size=4", "max_length=256", "train.eval_fraction=0.05"],
        "generate": ["k=3", "limit=8", "sampling.temperature=0.9", "sampling.max_new_tokens=24", "batch_size=8"],
        "overlap": 2,
        "reward": ["train.max_steps=2", "train.batch_size=4", "max_length=192", "normalization_samples=16",
                   "bootstrap_samples=100", "train.eval_fraction=0.2"],
        "dpo": ["train.max_steps=2", "train.batch_size=4", "max_length=192", "kl_prompts=2", "max_new_tokens=8",
                "train.eval_fraction=0.2"],
        "ppo": ["train.max_steps=2", "train.batch_size=4", "ppo.minibatch_size=2", "ppo.max_new_tokens=12",
                "eval_every=2", "eval_prompts=4"],
    },
}


@contextmanager
def _step(n: int, total: int, title: str, timings: dict[str, float]) -> Iterator[None]:
    print(f"\n[{n}/{total}] {title}", flush=True)
    start = time.perf_counter()
    yield
    timings[title] = time.perf_counter() - start
    print(f"[{n}/{total}] {title}: done in {timings[title]:.1f}s", flush=True)


def run_demo(store: ArtifactStore, quick: bool = False, seed: int = 0) -> dict[str, float]:
    from labeling_app.export import export
    from labeling_app.labels import load_task_set
    from labeling_app.simulated import run_annotators
    from labeling_app.store import LabelStore
    from ppo.dpo import main as dpo_main
    from ppo.ppo import main as ppo_main
    from reward.train import main as reward_main
    from rlhf import data, models
    from rlhf.generate import main as generate_main
    from sft.train import main as sft_main

    store.check_writable()
    size = SIZES["quick" if quick else "full"]
    timings: dict[str, float] = {}
    total = 9
    seed_args = [f"train.seed={seed}"]

    with _step(1, total, "base import (SmolLM2-135M-Instruct GGUF)", timings):
        base = models.import_base(store)
        print(f"  {base.ref}")
    with _step(2, total, "data import (SFT set, prompts, held-out prompts)", timings):
        sft_data = data.import_dataset(store, "sft", DEMO_DATA / "support_sft.jsonl", name="sft")
        prompts = data.import_dataset(store, "prompts", DEMO_DATA / "support_prompts.jsonl", name="prompts")
        heldout = data.import_dataset(store, "prompts", DEMO_DATA / "support_prompts_heldout.jsonl", name="heldout")
        print(f"  {sft_data.ref}, {prompts.ref}, {heldout.ref}")
    with _step(3, total, "sft (LoRA)", timings):
        sft = sft_main(load_config(SFTConfig, None, [f"model={base.ref}", f"data={sft_data.ref}", "merge=true",
                                                     *seed_args, *size["sft"]]), store)
        m = sft.manifest["metrics"]
        print(f"  {sft.ref}: eval loss {m['eval_loss_initial']:.3f} -> {m['eval_loss']:.3f}, "
              f"{m['tokens_per_s']:.0f} train tokens/s ({m['precision']})")
    with _step(4, total, "generate candidates", timings):
        candidates = generate_main(load_config(GenerateConfig, None, [
            f"model={sft.ref}", f"data={prompts.ref}", f"seed={seed}", *size["generate"]]), store)
        m = candidates.manifest["metrics"]
        print(f"  {candidates.ref}: {m['responses']} responses to {m['prompts']} prompts "
              f"({m['duplicates_removed']} duplicates removed)")
    with _step(5, total, "simulated annotators rank them in the labeling store", timings):
        labels = LabelStore.for_workspace(store.root)
        loaded = load_task_set(labels, store, candidates.ref, overlap=size["overlap"],
                               name=f"demo-{candidates.name}-v{candidates.version}")
        sim = run_annotators(labels, ANNOTATORS, loaded.task_set.name, seed=seed)
        print(f"  {len(sim.submitted)} rankings of {loaded.items} items by {len(ANNOTATORS)} simulated annotators "
              f"(Plackett–Luce temperature {sim.temperature:.2f})")
    with _step(6, total, "export preferences", timings):
        preferences, _ = export(store, labels, pairs="all", task_set=loaded.task_set.name)
        m = preferences.manifest["metrics"]
        print(f"  {preferences.ref}: {m['rows']} pairs, pairwise agreement "
              f"{_fmt(m.get('pairwise_agreement'))}, Krippendorff's alpha {_fmt(m.get('krippendorff_alpha'))}")
    with _step(7, total, "reward model", timings):
        reward = reward_main(load_config(RewardConfig, None, [
            f"model={sft.ref}", f"data={preferences.ref}", *seed_args, *size["reward"]]), store)
        m = reward.manifest["metrics"]
        lo, hi = m["eval_accuracy_ci95"]
        print(f"  {reward.ref}: held-out accuracy {m['eval_accuracy']:.3f} (95% CI {lo:.3f}–{hi:.3f}), "
              f"ECE {m['eval_ece']:.3f}")
    with _step(8, total, "dpo", timings):
        dpo = dpo_main(load_config(DPOConfig, None, [
            f"model={sft.ref}", f"data={preferences.ref}", *seed_args, *size["dpo"]]), store)
        m = dpo.manifest["metrics"]
        print(f"  {dpo.ref}: held-out reward accuracy {m['eval_reward_accuracy_initial']:.3f} -> "
              f"{m['eval_reward_accuracy']:.3f}, KL to reference {m['eval_kl_to_reference']:.3f}")
    with _step(9, total, "ppo", timings):
        ppo = ppo_main(load_config(PPOConfig, None, [
            f"model={sft.ref}", f"reward={reward.ref}", f"data={prompts.ref}", f"eval_data={heldout.ref}",
            *seed_args, *size["ppo"]]), store)
        m = ppo.manifest["metrics"]
        print(f"  {ppo.ref}: held-out reward-model score {m['eval_score_initial']:.3f} (SFT) -> "
              f"{m['eval_score']:.3f}, KL {m['eval_kl']:.3f}; generation {m['generation_tokens_per_s']:.0f} tok/s, "
              f"update {m['update_tokens_per_s']:.0f} tok/s")

    _summary(store, timings, [sft, reward, dpo, ppo])
    return timings


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _summary(store: ArtifactStore, timings: dict[str, float], finals: list[Artifact]) -> None:
    print("\nstage timings:")
    for title, seconds in timings.items():
        print(f"  {seconds:7.1f}s  {title}")
    print(f"  {sum(timings.values()):7.1f}s  total")
    print(f"\nlineage of {finals[-1].ref}:\n{store.lineage(finals[-1].ref)}")
    print(f"\nworkspace: {store.root}")
