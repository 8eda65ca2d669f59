"""`rlhf demo`: the loop so far, on the packaged SmolLM2-135M-Instruct and the demo data.

    base import -> data import (SFT set, held-out prompts) -> sft -> sample replies

Every step writes new artifact versions; nothing is overwritten. `--quick` runs the same
path with tiny sizes as a smoke test.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rlhf.artifacts import ArtifactStore
from rlhf.config import SFTConfig, load_config

DEMO_DATA = Path(__file__).parent / "demo_data"

# SFT budget: one pass over the ~216 training rows at batch 8 (full), or 3 steps (quick).
SFT_OVERRIDES = {
    "full": ["train.epochs=1", "train.batch_size=8", "train.learning_rate=2e-4", "max_length=384"],
    "quick": ["train.max_steps=3", "train.batch_size=4", "max_length=256", "train.eval_fraction=0.05"],
}


@contextmanager
def _step(n: int, total: int, title: str, timings: dict[str, float]) -> Iterator[None]:
    print(f"\n[{n}/{total}] {title}", flush=True)
    start = time.perf_counter()
    yield
    timings[title] = time.perf_counter() - start
    print(f"[{n}/{total}] {title}: done in {timings[title]:.1f}s", flush=True)


def run_demo(store: ArtifactStore, quick: bool = False) -> dict[str, float]:
    from rlhf import data, models
    from rlhf.generate import complete
    from sft.train import main as sft_main

    store.check_writable()
    timings: dict[str, float] = {}
    total = 4
    with _step(1, total, "base import (SmolLM2-135M-Instruct GGUF)", timings):
        base = models.import_base(store)
        print(f"  {base.ref}")
    with _step(2, total, "data import (demo SFT set and held-out prompts)", timings):
        sft_data = data.import_dataset(store, "sft", DEMO_DATA / "support_sft.jsonl", name="sft")
        heldout = data.import_dataset(store, "prompts", DEMO_DATA / "support_prompts_heldout.jsonl", name="heldout")
        print(f"  {sft_data.ref} ({sft_data.manifest['metrics']['rows']} rows), "
              f"{heldout.ref} ({heldout.manifest['metrics']['rows']} prompts)")
    with _step(3, total, "sft (LoRA)", timings):
        overrides = [f"model={base.ref}", f"data={sft_data.ref}", *SFT_OVERRIDES["quick" if quick else "full"]]
        sft = sft_main(load_config(SFTConfig, None, overrides), store)
        m = sft.manifest["metrics"]
        print(f"  {sft.ref}: eval loss {m['eval_loss_initial']:.3f} -> {m['eval_loss']:.3f}, "
              f"{m['tokens_per_s']:.0f} train tokens/s ({m['precision']})")
    with _step(4, total, "sample replies to held-out prompts", timings):
        tokenizer = models.load_tokenizer(sft)
        model = models.load_causal_lm(store, sft)
        prompts = data.load_rows(heldout, schema="prompts")[:2]
        for row, reply in zip(prompts, complete(model, tokenizer, [r["prompt"] for r in prompts],
                                                max_new_tokens=24 if quick else 80)):
            print(f"  user: {row['prompt'][-1]['content']}\n  sft:  {reply}\n")

    print("\nstage timings:")
    for title, seconds in timings.items():
        print(f"  {seconds:7.1f}s  {title}")
    print(f"  {sum(timings.values()):7.1f}s  total")
    print(f"\nlineage of {sft.ref}:\n{store.lineage(sft.ref)}")
    print(f"\nworkspace: {store.root}")
    return timings
