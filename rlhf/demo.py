"""`rlhf demo`: the loop on the packaged SmolLM2-135M-Instruct and the demo data.

    base import -> data import -> sft -> generate -> simulated annotators rank in the labeling
    store -> export preferences -> reward -> dpo and ppo -> compare sft, dpo and ppo on held-out
    prompts, judged by the gold scorer and by the reward model -> the report

Every step writes new artifact versions; nothing is overwritten. `--quick` runs the same
path with tiny sizes as a smoke test. `--methods dpo,ppo,rloo,grpo` trains each named method
from the same SFT model, reward model and prompts, and compares them all in one report. The
sizes below are chosen for a 2-core CPU.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from rlhf.artifacts import Artifact, ArtifactStore
from rlhf.config import CompareConfig, GenerateConfig, SFTConfig, dump, load_config

ANNOTATORS = [f"annotator-{i}" for i in range(1, 6)]
# The methods that start from the SFT model; the default keeps the demo within its time budget.
METHODS = ("dpo", "ppo", "rloo", "grpo")
DEFAULT_METHODS = ("dpo", "ppo")

SIZES = {
    "full": {
        "sft": ["train.max_steps=10", "train.batch_size=8", "train.learning_rate=2e-4", "max_length=384"],
        "generate": ["k=4", "limit=64", "sampling.temperature=0.9", "sampling.max_new_tokens=64", "batch_size=8"],
        "overlap": 3,
        "reward": ["train.max_steps=24", "train.batch_size=8", "train.learning_rate=3e-4", "max_length=320",
                   "normalization_samples=128"],
        "dpo": ["train.max_steps=20", "train.batch_size=8", "train.learning_rate=5e-4", "beta=0.1",
                "max_length=320", "kl_prompts=4", "max_new_tokens=32"],
        # 64 new tokens, as the candidates and compare's answers have: at 48, 44% of the SFT
        # model's replies were cut and lost the missing-EOS penalty, so PPO first learned to be
        # short (gold win-rate against SFT 59.6% at 48, 67.5% at 64; README, PPO). 24 iterations:
        # at 16 PPO's gold score was still rising (63.7% against SFT; 70.8% at 24 on the same chain).
        "ppo": ["train.max_steps=24", "train.batch_size=16", "train.learning_rate=3e-4", "ppo.minibatch_size=8",
                "ppo.max_new_tokens=64", "eval_every=8", "eval_prompts=8", "eval_gold=true"],
        # The same 384 sampled responses of 64 tokens as PPO: 24 steps x 4 prompts x 4 completions.
        **{method: ["train.max_steps=24", "train.batch_size=4", "num_generations=4", "train.learning_rate=3e-4",
                    "max_new_tokens=64", "eval_prompts=8", "eval_gold=true"] for method in ("rloo", "grpo")},
        "compare": ["sampling.max_new_tokens=64"],
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
                "eval_every=2", "eval_prompts=4", "eval_gold=true"],
        **{method: ["train.max_steps=2", "train.batch_size=2", "num_generations=2", "max_new_tokens=12",
                    "eval_prompts=4", "eval_gold=true"] for method in ("rloo", "grpo")},
        "compare": ["limit=12", "sampling.max_new_tokens=16", "bootstrap_samples=200"],
    },
}


@contextmanager
def _step(n: int, total: int, title: str, timings: dict[str, float]) -> Iterator[None]:
    print(f"\n[{n}/{total}] {title}", flush=True)
    start = time.perf_counter()
    yield
    timings[title] = time.perf_counter() - start
    print(f"[{n}/{total}] {title}: done in {timings[title]:.1f}s", flush=True)


def check_methods(methods: list[str]) -> tuple[str, ...]:
    """The methods to train, in the order given; an unknown or repeated one fails before any work."""
    from rlhf.errors import RlhfError

    if unknown := [m for m in methods if m not in METHODS]:
        raise RlhfError(f"--methods: {unknown[0]!r} is not a method the demo trains; choose from "
                        f"{', '.join(METHODS)} (sft is always trained and compared)")
    if not methods or len(set(methods)) < len(methods):
        raise RlhfError(f"--methods needs each method once, e.g. --methods {','.join(METHODS)}")
    return tuple(methods)


def run_demo(store: ArtifactStore, quick: bool = False, seed: int = 0,
             methods: tuple[str, ...] = DEFAULT_METHODS) -> dict[str, float]:
    from labeling_app.export import export
    from labeling_app.labels import load_task_set
    from labeling_app.simulated import run_annotators
    from labeling_app.store import LabelStore
    from rlhf import data, models
    from rlhf.compare import answers_config
    from rlhf.compare import main as compare_main
    from rlhf.generate import main as generate_main
    from sft.train import main as sft_main

    store.check_writable()
    size = SIZES["quick" if quick else "full"]
    timings: dict[str, float] = {}
    total = 8
    seed_args = [f"train.seed={seed}"]

    with _step(1, total, "base import (SmolLM2-135M-Instruct GGUF)", timings):
        base = models.import_base(store)
        print(f"  {base.ref}")
    with _step(2, total, "data import (SFT set, prompts, held-out prompts)", timings):
        sft_data = data.import_dataset(store, "sft", data.DEMO_DATA / "support_sft.jsonl", name="sft")
        prompts = data.import_dataset(store, "prompts", data.DEMO_DATA / "support_prompts.jsonl", name="prompts")
        heldout = data.import_dataset(store, "prompts", data.DEMO_DATA / "support_prompts_heldout.jsonl", name="heldout")
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
        # Each prompt's best response against each of the others (the binarisation UltraFeedback
        # uses): the pairs with the clearest contrast. Measured on this demo, DPO and the reward
        # model trained on them improve the gold win-rate more than on every pair the rankings
        # imply, whose middle pairs carry mostly annotator noise.
        preferences, _ = export(store, labels, pairs="best-vs-rest", task_set=loaded.task_set.name)
        m = preferences.manifest["metrics"]
        print(f"  {preferences.ref}: {m['rows']} pairs (best vs rest), pairwise agreement "
              f"{_fmt(m.get('pairwise_agreement'))}, Krippendorff's alpha {_fmt(m.get('krippendorff_alpha'))}")
    compare_args = [f"data={heldout.ref}", f"seed={seed}", *size["compare"]]
    probe = load_config(CompareConfig, None, [f"models={json.dumps([sft.ref, sft.ref])}", *compare_args])

    def answers(role: str) -> Job:
        # The answers `compare` will ask for, made early so they overlap with training; compare
        # finds them by model, prompts and settings and reuses them.
        return Job("generate", lambda done: flat_overrides(dump(answers_config(probe, done.get(role, sft), heldout))),
                   after=(role,) if role != "sft" else ())

    # The reward-model methods: each trains on the prompts, is evaluated on the held-out ones.
    online = lambda method: Job(method, lambda d: [
        f"model={sft.ref}", f"reward={d['reward'].ref}", f"data={prompts.ref}", f"eval_data={heldout.ref}",
        *seed_args, *size[method]], after=("reward",))
    method_jobs = {
        "dpo": Job("dpo", lambda d: [f"model={sft.ref}", f"data={preferences.ref}", *seed_args, *size["dpo"]]),
        "ppo": online("ppo"), "rloo": online("rloo"), "grpo": online("grpo"),
    }
    names = ", ".join(["reward", *methods])
    with _step(7, total, f"{names} and the held-out answers, two stages at a time", timings):
        # The reward model is needed by every method but DPO, and by compare: it is the critical
        # path, so it runs first on every core. Then the methods run beside each other and the
        # answer sets: on a small CPU two single-threaded stages side by side finish sooner
        # than the same stages one after the other on every core. The last one left (PPO)
        # moves onto every core.
        done = _run_jobs(store, {
            "reward": Job("reward", lambda d: [f"model={sft.ref}", f"data={preferences.ref}", *seed_args,
                                                 *size["reward"]], alone=True),
            **{method: method_jobs[method] for method in methods},
            "answers-sft": answers("sft"),
            **{f"answers-{method}": answers(method) for method in methods},
        }, timings)
        reward = done["reward"]
        m = reward.manifest["metrics"]
        lo, hi = m["eval_accuracy_ci95"]
        print(f"  {reward.ref}: held-out accuracy {m['eval_accuracy']:.3f} (95% CI {lo:.3f}–{hi:.3f}), "
              f"ECE {m['eval_ece']:.3f}")
        for method in methods:
            print(f"  {done[method].ref}: {_method_line(done[method].manifest['metrics'])}")
    with _step(8, total, f"compare sft, {', '.join(methods)} on held-out prompts (gold judge and reward model)",
               timings):
        report = compare_main(load_config(CompareConfig, None, [
            f"models={json.dumps([sft.ref, *(done[method].ref for method in methods)])}",
            f"judge=gold,reward:{reward.ref}", *compare_args]), store)

    _summary(store, timings, report)
    return timings


@dataclass
class Job:
    """One `rlhf <command>` run as a subprocess once the jobs named in `after` have finished.

    `overrides` gets the artifacts of finished jobs by name, so a job can use what an
    earlier one wrote (ppo the reward model's exact ref).
    """

    command: str
    overrides: Callable[[dict[str, Artifact]], list[str]]
    after: tuple[str, ...] = ()
    # A job on the critical path: it waits for an idle machine, takes every core, and nothing
    # starts beside it, so the jobs that need it can start as early as possible.
    alone: bool = False


def plan_starts(jobs: dict[str, Job], pending: list[str], running: list[str], done: set[str], slots: int,
                cpus: int) -> list[tuple[str, int]]:
    """The pending jobs to start now, in the order given, each with its number of threads.

    A job can start once the jobs it needs are done and a slot is free. The cores are shared
    by the jobs that can run now; one alone gets them all. An `alone` job that can start
    holds back every job after it until the machine is idle.
    """
    def ready(name: str) -> bool:
        return all(dep in done for dep in jobs[name].after)

    if any(jobs[name].alone for name in running):
        return []
    busy, starts = len(running), []
    waiting = [name for name in pending if ready(name)]
    for i, name in enumerate(waiting):
        if jobs[name].alone:
            return starts + ([(name, cpus)] if busy == 0 else [])
        if busy < slots:
            starts.append((name, max(1, cpus // min(slots, busy + len(waiting) - i))))
            busy += 1
    return starts


def flat_overrides(config: dict, prefix: str = "") -> list[str]:
    """A config dict as the `a.b=value` overrides that rebuild it (values as JSON, which YAML reads)."""
    out = []
    for key, value in config.items():
        if isinstance(value, dict):
            out += flat_overrides(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


def _run_jobs(store: ArtifactStore, jobs: dict[str, Job], timings: dict[str, float], slots: int = 2
              ) -> dict[str, Artifact]:
    """Run `jobs` as `rlhf` subprocesses, `slots` at a time, each on its share of the cores.

    A job starts as soon as the jobs it needs are done, in the order given. When one job is left
    running and nothing can start beside it, it is offered every core. Each writes its
    output to workspace/logs/; a failure stops the demo with that job's last log lines (the
    others are stopped, and, like any stage, leave no half-written artifact).
    """
    import os
    import subprocess
    import sys

    from rlhf.cli import written_ref
    from rlhf.errors import RlhfError
    from rlhf.training import THREADS_FILE

    logs = store.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or slots
    done: dict[str, Artifact] = {}
    pending, running = dict(jobs), {}
    try:
        while pending or running:
            for name, n in plan_starts(jobs, list(pending), list(running), set(done), slots, cpus):
                job, threads = pending[name], str(n)
                log = logs / f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{name}.log"
                env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                       THREADS_FILE: str(log.with_suffix(".threads"))}
                argv = [sys.executable, "-m", "rlhf.cli", "--workspace", str(store.root), job.command,
                        *job.overrides(done)]
                with open(log, "w") as f:
                    proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env)
                running[name] = (proc, log, time.perf_counter(), n)
                del pending[name]
                print(f"  {name}: started ({threads} thread{'s' if threads != '1' else ''}; log {log})", flush=True)
            time.sleep(0.5)
            for name, (proc, log, start, _) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                log.with_suffix(".threads").unlink(missing_ok=True)
                lines = log.read_text(errors="replace").splitlines()
                ref = written_ref("\n".join(lines))
                if proc.returncode != 0 or not ref:
                    tail = "\n".join(lines[-5:])
                    raise RlhfError(f"the {name} job failed (exit {proc.returncode}); its log {log} ends:\n{tail}")
                done[name] = store.resolve(ref)
                timings[f"  {name}"] = time.perf_counter() - start
                print(f"  {name}: {done[name].ref} in {timings[f'  {name}']:.0f}s", flush=True)
            if len(running) == 1 and not plan_starts(jobs, list(pending), list(running), set(done), slots, cpus):
                # The job left runs alone until it ends (what is pending needs it): offer it every
                # core, which it takes at its next step (rlhf.training.take_offered_threads).
                name, (proc, log, start, n) = next(iter(running.items()))
                if n < cpus:
                    offer = log.with_suffix(".threads")
                    offer.with_suffix(".tmp").write_text(str(cpus))
                    offer.with_suffix(".tmp").replace(offer)  # whole, never a half-written number
                    running[name] = (proc, log, start, cpus)
                    print(f"  {name}: alone now, offered {cpus} threads", flush=True)
        return done
    finally:
        for proc, log, _, _ in running.values():
            proc.terminate()
            proc.wait()
            log.with_suffix(".threads").unlink(missing_ok=True)


def _method_line(m: dict) -> str:
    """What a trained method's manifest says about its held-out result, in one line."""
    if "eval_reward_accuracy" in m:  # dpo
        return (f"held-out reward accuracy {m['eval_reward_accuracy_initial']:.3f} -> {m['eval_reward_accuracy']:.3f}, "
                f"KL to reference {m['eval_kl_to_reference']:.3f}")
    if "eval_score" in m:  # ppo
        return (f"held-out reward-model score {m['eval_score_initial']:.3f} (SFT) -> {m['eval_score']:.3f}, KL "
                f"{m['eval_kl']:.3f}; generation {m['generation_tokens_per_s']:.0f} tok/s, update "
                f"{m['update_tokens_per_s']:.0f} tok/s")
    # rloo, grpo
    return (f"held-out reward-model score {m['eval_reward_initial']:.3f} (SFT) -> {m['eval_reward']:.3f}, "
            f"KL {_fmt(m['eval_kl'])}, {m['tokens_per_s']:.0f} tok/s")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _summary(store: ArtifactStore, timings: dict[str, float], report: Artifact) -> None:
    from rlhf.report import pct

    print("\nstage timings:")
    for title, seconds in timings.items():
        print(f"  {seconds:7.1f}s  {title}")
    # Indented entries are jobs inside a step; the step's own entry already counts their time.
    print(f"  {sum(v for k, v in timings.items() if not k.startswith(' ')):7.1f}s  total")
    gold = report.manifest["metrics"]["judges"]["gold"]
    print("\nleaderboard, judged by the gold scorer on held-out prompts (Bradley–Terry, Elo scale):")
    for r in gold["leaderboard"]:
        print(f"  {r['rank']}. {r['model']:4s} {r['rating']:6.0f}  95% CI [{r['ci95'][0]:.0f}, {r['ci95'][1]:.0f}]  "
              f"mean gold score {r['mean_score']:.2f}, {r['mean_length']:.0f} words")
    for p in gold["pairs"]:
        if p["b"] == "sft":
            print(f"  {p['a']} beats sft {pct(p['win_rate'])} of the time (95% CI {pct(p['ci95'][0])}–"
                  f"{pct(p['ci95'][1])}; length-controlled {pct(p['lc_win_rate'])})")
    print(f"\nreport: {report.path / 'report.html'}")
    print(f"workspace: {store.root}; see the lineage of any artifact with `rlhf artifacts lineage REF`")
