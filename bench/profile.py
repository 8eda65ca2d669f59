"""`python -m bench.profile`: where a training step's time goes, operator by operator.

    python -m bench.profile                          # sft, reward, dpo, ppo_update on the packaged model
    python -m bench.profile --stages dpo --steps 3   # one stage, three profiled steps
    python -m bench.profile --quick --model DIR      # tiny budgets: checks the harness, not the profile
    python -m bench.profile --stages dpo --by-shape  # one row per operator and input shapes

Each stage runs its suite side from `bench/stages.py`, on the same data and budget as
`python -m bench` (SFT and PPO on the demo data, reward and DPO on real HH pairs), with
`torch.profiler` over optimiser steps 2 to 1 + `--steps` (step 1 warms up). It prints the
operators with the most self CPU time and their share of the profiled time, and how much of
that time is matmul (the only part MFU counts). Results go to `bench/results/profile-<ts>.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

from bench.__main__ import BUDGET, QUICK, RESULTS, prepare

# Operators that are matrix multiplications (their self time is the matmul work itself).
MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
          "aten::_scaled_dot_product_attention_math", "aten::mkldnn_linear", "aten::_mkldnn_linear")


def table(name: str, prof, top: int, by_shape: bool = False) -> str:
    events = [e for e in prof.key_averages(group_by_input_shape=by_shape) if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL)
    lines = [f"### {name}: {total / 1e3:.0f} ms profiled, {100 * matmul / total:.1f}% of it in matmuls", "",
             f"| operator{' (input shapes)' if by_shape else ''} | self CPU ms | share | calls |", "|---|---:|---:|---:|"]
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        shapes = f" {[s for s in e.input_shapes if s]}" if by_shape else ""
        lines.append(f"| `{e.key}`{shapes} | {e.self_cpu_time_total / 1e3:.0f} | "
                     f"{100 * e.self_cpu_time_total / total:.1f}% | {e.count} |")
    return "\n".join(lines)


@contextlib.contextmanager
def profiled_trainer_steps(first: int, steps: int, found: list, by_shape: bool = False):
    """Profile optimiser steps first..first+steps-1 of whatever TRL trainer the stage builds."""
    import torch
    from transformers import TrainerCallback

    from rlhf import training

    class Profile(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == first:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                   record_shapes=by_shape)
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None and state.global_step == first + steps - 1:
                self.prof.__exit__(None, None, None)
                found.append(self.prof)
                self.prof = None

    original = training.callbacks
    training.callbacks = lambda train: [*original(train), Profile()]
    try:
        yield
    finally:
        training.callbacks = original


@contextlib.contextmanager
def profiled_ppo_update(found: list, by_shape: bool = False):
    """Profile PPO's whole optimisation phase on one rollout batch (`ppo.update_epochs` passes)."""
    import torch

    import ppo.train

    original = ppo.train.ppo_update

    def profiled(*args, **kwargs):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=by_shape) as prof:
            out = original(*args, **kwargs)
        found.append(prof)
        return out

    ppo.train.ppo_update = profiled
    try:
        yield
    finally:
        ppo.train.ppo_update = original


def main(argv: list[str] | None = None) -> Path:
    from bench import stages
    from rlhf.artifacts import ArtifactStore

    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    p.add_argument("--stages", default="sft,reward,dpo,ppo_update")
    p.add_argument("--steps", type=int, default=2, help="optimiser steps profiled per TRL stage")
    p.add_argument("--top", type=int, default=12, help="operators listed per stage")
    p.add_argument("--model", help="a local checkpoint directory instead of the packaged SmolLM2")
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks the harness, not the profile")
    p.add_argument("--by-shape", action="store_true", help="one row per operator and input shapes, to tell "
                                                           "apart the calls of one operator (e.g. which mul)")
    p.add_argument("--out", default=str(RESULTS), help=f"results directory (default {RESULTS})")
    args = p.parse_args(argv)
    chosen = args.stages.split(",")
    if unknown := [s for s in chosen if s not in stages.STAGES or s == "ppo_rollout"]:
        raise SystemExit(f"error: cannot profile stage {unknown[0]!r}; choose from sft, reward, dpo, ppo_update")
    budget = {**BUDGET, **(QUICK if args.quick else {}), "steps": 1 + args.steps}
    sections = []
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        ws = Path(tmp)
        prepare(ws, args.model, chosen)
        store = ArtifactStore(ws)
        for stage in chosen:
            found: list = []
            hook = (profiled_ppo_update(found, args.by_shape) if stage == "ppo_update"
                    else profiled_trainer_steps(2, args.steps, found, args.by_shape))
            with hook:
                stages.STAGES[stage]("suite", store, budget)
            what = "one rollout batch's update" if stage == "ppo_update" else f"optimiser steps 2–{1 + args.steps}"
            sections.append(table(f"{stage} ({what}, batch {budget['batch_size']}, max_length {budget['max_length']})",
                                  found[0], args.top, args.by_shape))
            print(sections[-1] + "\n", flush=True)
    out = Path(args.out) / f"profile-{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Operator profile of the suite's training steps (`python -m bench.profile`)\n\n"
                   + "\n\n".join(sections) + "\n")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
