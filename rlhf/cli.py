"""`rlhf <command> [--config F] [key=value ...]`: thin wiring from the command line to each stage.

    rlhf base import [PATH]                       # packaged SmolLM2-135M-Instruct, or a local checkpoint
    rlhf data import sft FILE [--name N] [--skip-invalid]
    rlhf data import preferences FILE [--format trl|hh]
    rlhf data import sft FILE --normalize-whitespace --drop-empty-turns --dedup near --max-tokens 512
    rlhf generate model=sft:latest data=prompts:latest k=4 sampling.temperature=0.8
    rlhf sft [--config configs/sft.yaml] train.max_steps=20
    rlhf reward [--config configs/reward.yaml] model=sft:latest data=preferences:latest
    rlhf score reward=reward:latest data=candidates:latest
    rlhf dpo [--config configs/dpo.yaml] model=sft:latest data=preferences:latest
    rlhf ppo [--config configs/ppo.yaml] model=sft:latest reward=reward:latest data=prompts:latest
    rlhf rloo [--config configs/rloo.yaml] model=sft:latest reward=reward:latest data=prompts:latest
    rlhf grpo [--config configs/grpo.yaml] model=sft:latest reward=reward:latest data=prompts:latest
    rlhf compare sft:latest dpo:latest ppo:latest data=heldout:latest judge=gold,reward:latest
    rlhf sweep sft [--config F] lora.r=8,16 train.learning_rate=1e-4,5e-5 [--search grid|random|tpe --trials N
                   --metric eval_loss --direction minimize|maximize]
    rlhf label users add NAME | load candidates:vK | load-ab A B | serve | export | status
    rlhf artifacts list | show REF | lineage REF | verify REF
    rlhf config show STAGE [--config F] [key=value ...]   # the effective config, as YAML
    rlhf export REF DIR [--dtype bf16|fp16|fp32]          # a standalone HF checkpoint with a model card
    rlhf demo [--quick] [--methods dpo,ppo,rloo,grpo]

The workspace is `--workspace DIR`, else $RLHF_WORKSPACE, else ./workspace. A user error
prints one line `error: ...` and exits 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from typing import Callable

from rlhf.artifacts import KIND_DIRS, ArtifactStore, check_name
from rlhf.config import (PROJECT_CONFIGS, CompareConfig, DPOConfig, GenerateConfig, GRPOConfig, PPOConfig,
                         RewardConfig, RLOOConfig, ScoreConfig, SFTConfig, describe, dump, load_config)
from rlhf.errors import RlhfError

# stage name -> (config class, "module:function"); modules are imported only when run.
STAGES: dict[str, tuple[type, str]] = {
    "sft": (SFTConfig, "sft.train:main"),
    "generate": (GenerateConfig, "rlhf.generate:main"),
    "reward": (RewardConfig, "reward.train:main"),
    "score": (ScoreConfig, "reward.score:main"),
    "dpo": (DPOConfig, "dpo.train:main"),
    "ppo": (PPOConfig, "ppo.train:main"),
    "rloo": (RLOOConfig, "rloo.train:main"),
    "grpo": (GRPOConfig, "grpo.train:main"),
    "compare": (CompareConfig, "rlhf.compare:main"),
}


# Training stages a sweep can search over; each publishes a checkpoint with metrics.
SWEEPABLE = ("sft", "reward", "dpo", "ppo", "rloo", "grpo")

# The line a stage prints last, naming what it published; the demo reads it from each job's log.
WROTE = "wrote"


def wrote_line(art) -> str:
    return f"{WROTE} {art.ref} -> {art.path}"


# The figures a person reads first, in this order; `X_initial` beside `X` shows as "before → after".
SUMMARY = ("eval_loss", "eval_accuracy", "eval_reward_accuracy", "eval_score", "eval_kl_to_reference", "eval_kl",
           "prompts", "responses", "rows", "wall_s", "peak_mem_mb")


def summary(art) -> str:
    """One readable line of a stage's result, printed last (after the trainer's own raw dict)."""
    m = art.manifest["metrics"]
    parts = []
    for key in SUMMARY:
        value = m.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key == "wall_s":
            parts.append(f"{value:.0f}s")
        elif key == "peak_mem_mb":
            parts.append(f"peak memory {value / 1024:.1f} GB")
        elif isinstance(m.get(f"{key}_initial"), (int, float)):
            parts.append(f"{key} {m[key + '_initial']:.4g} → {value:.4g}")
        else:
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return f"{art.manifest['stage']}: " + ", ".join(parts) if parts else ""


def written_ref(output: str) -> str | None:
    """The ref of the last artifact a command's output says it published, if any."""
    refs = [line.split()[1] for line in output.splitlines() if line.startswith(f"{WROTE} ")]
    return refs[-1] if refs else None


def _stage_runner(name: str, func: str | None = None) -> Callable | None:
    """The stage's entry point, or another function of its module by name (None if it has none)."""
    import importlib

    module, main = STAGES[name][1].split(":")
    return getattr(importlib.import_module(module), func or main, None)


def config_help(stage: str) -> str:
    """The `--help` epilog of a stage: every config key with its type, default and meaning."""
    rows = describe(STAGES[stage][0])
    key_w, type_w = max(len(r[0]) for r in rows), min(28, max(len(r[1]) for r in rows))
    lines = [f"config keys (key=value, or in a --config YAML; the shipped one: {PROJECT_CONFIGS / stage}.yaml;",
             f"`rlhf config show {stage}` prints the resolved config):"]
    lines += [f"  {k:{key_w}}  {t:{type_w}}  {d:14} {why}".rstrip() for k, t, d, why in rows]
    return "\n".join(lines)


def stage_overrides(stage: str, overrides: list[str]) -> list[str]:
    """compare takes the models to compare as bare words; every other stage only key=value."""
    if stage != "compare":
        return overrides
    models = [o for o in overrides if "=" not in o]
    return [o for o in overrides if "=" in o] + ([f"models={json.dumps(models)}"] if models else [])


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workspace", default=argparse.SUPPRESS,
                        help="workspace directory (default: $RLHF_WORKSPACE or ./workspace)")
    p = argparse.ArgumentParser(prog="rlhf", parents=[common], description="RLHF alignment suite")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    base = sub.add_parser("base", parents=[common], help="import a base model")
    base_sub = base.add_subparsers(dest="action", required=True)
    imp = base_sub.add_parser("import", parents=[common], help="packaged default model, or PATH")
    imp.add_argument("path", nargs="?", help="a local transformers checkpoint directory")
    imp.add_argument("--name", default="base")
    imp.add_argument("--chat-template", metavar="FILE",
                     help="a Jinja chat template for a tokenizer that has none (or to replace its own)")

    data = sub.add_parser("data", parents=[common], help="import datasets")
    data_sub = data.add_subparsers(dest="action", required=True)
    dimp = data_sub.add_parser("import", parents=[common], help="validate a file and store it as a dataset")
    dimp.add_argument("schema", choices=["sft", "prompts", "preferences"])
    dimp.add_argument("file")
    dimp.add_argument("--name", help="dataset name (default: the schema)")
    dimp.add_argument("--skip-invalid", action="store_true", help="drop bad rows and count them instead of failing")
    dimp.add_argument("--format", choices=["trl", "hh"], default="trl",
                      help="preferences only: trl (conversational) or hh (Anthropic HH-RLHF transcripts)")
    clean = dimp.add_argument_group("cleaning (each step opt-in, counted in the manifest)")
    clean.add_argument("--normalize-whitespace", action="store_true",
                       help="LF line ends, one space between words, at most one blank line, trimmed ends")
    clean.add_argument("--drop-empty-turns", action="store_true",
                       help="drop rows with an empty message instead of failing on them")
    clean.add_argument("--dedup", choices=["exact", "near"],
                       help="drop repeated rows: exact copies, or also near copies (MinHash on character 5-grams)")
    clean.add_argument("--near-threshold", type=float,
                       help="--dedup near: Jaccard similarity from which a row is a near copy (default 0.8)")
    clean.add_argument("--min-tokens", type=int, help="drop rows shorter than N tokens (chat template included)")
    clean.add_argument("--max-tokens", type=int, help="drop rows longer than N tokens (chat template included)")
    clean.add_argument("--tokenizer", help="checkpoint ref or tokenizer directory the lengths are counted with "
                                           "(default base:latest)")

    for stage in STAGES:
        sp = sub.add_parser(stage, parents=[common], help=f"run the {stage} stage", epilog=config_help(stage),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("--config", help=f"YAML config (the shipped one: {PROJECT_CONFIGS / stage}.yaml)")
        sp.add_argument("overrides", nargs="*", metavar="REF" if stage == "compare" else "key=value")

    conf = sub.add_parser("config", parents=[common], help="show a stage's effective configuration")
    conf_sub = conf.add_subparsers(dest="action", required=True)
    show = conf_sub.add_parser("show", parents=[common], help="print the resolved config as YAML")
    show.add_argument("stage", choices=list(STAGES))
    show.add_argument("--config", help="YAML config, as the stage takes it")
    show.add_argument("overrides", nargs="*", metavar="key=value")

    sweep = sub.add_parser("sweep", parents=[common], help="grid, random or TPE search over a training stage")
    sweep_sub = sweep.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage in SWEEPABLE:
        sp = sweep_sub.add_parser(stage, parents=[common], help=f"sweep the {stage} stage")
        sp.add_argument("--config", help=f"YAML config shared by every trial (see configs/{stage}.yaml)")
        sp.add_argument("--search", choices=["grid", "random", "tpe"], default="grid")
        sp.add_argument("--trials", type=int, help="random and tpe: how many configs to try")
        sp.add_argument("--metric", default="eval_loss", help="a metric in the trials' manifests (default eval_loss)")
        sp.add_argument("--direction", choices=["minimize", "maximize"],
                        help="default: minimize a metric whose name ends in 'loss', else maximize")
        sp.add_argument("--seed", type=int, default=0, help="random and tpe: the sampler's seed")
        sp.add_argument("--name", default="sweep", help="report name -> reports/NAME/vK")
        sp.add_argument("overrides", nargs="*", metavar="key=v1,v2")

    art = sub.add_parser("artifacts", parents=[common], help="inspect the artifact store")
    art_sub = art.add_subparsers(dest="action", required=True)
    art_sub.add_parser("list", parents=[common])
    for action in ("show", "lineage", "verify"):
        a = art_sub.add_parser(action, parents=[common])
        a.add_argument("ref")

    exp = sub.add_parser("export", parents=[common], help="write a checkpoint as a standalone HF model directory")
    exp.add_argument("ref", help="checkpoint ref, e.g. dpo:latest (adapters are merged into their base)")
    exp.add_argument("dir", help="new (or empty) directory to write: weights, tokenizer, generation config, README.md")
    exp.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                     help="weight dtype (default bf16); always safetensors")

    from labeling_app.cli import add_label_parser

    add_label_parser(sub, common)

    demo = sub.add_parser("demo", parents=[common], help="run the whole loop on the packaged model and demo data")
    demo.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    demo.add_argument("--methods", default="dpo,ppo", metavar="M,M,...",
                      help="the methods trained from the SFT model and compared with it: any of dpo, ppo, rloo, grpo "
                           "(default dpo,ppo)")
    return p


def run(args: argparse.Namespace) -> int:
    store = ArtifactStore.from_env(getattr(args, "workspace", None))
    if args.command == "base":
        from rlhf.models import import_base

        # The name is checked before the model loads.
        art = import_base(store, args.path, name=check_name(args.name), chat_template=args.chat_template)
        print(f"imported {art.ref} -> {art.path}")
    elif args.command == "data":
        from rlhf.data import import_dataset

        if args.format != "trl" and args.schema != "preferences":
            raise RlhfError(f"--format {args.format} applies to preferences only, not {args.schema}")
        from rlhf.cleaning import Cleaning

        cleaning = Cleaning(normalize_whitespace=args.normalize_whitespace, drop_empty_turns=args.drop_empty_turns,
                            dedup=args.dedup, near_threshold=args.near_threshold, min_tokens=args.min_tokens,
                            max_tokens=args.max_tokens, tokenizer=args.tokenizer)
        art = import_dataset(store, args.schema, args.file, name=args.name, skip_invalid=args.skip_invalid,
                             fmt=args.format, cleaning=cleaning)
        m = art.manifest["metrics"]
        print(f"imported {m['rows']} rows -> {art.ref}"
              + (f" ({m['dropped']} invalid rows dropped; see the manifest)" if m["dropped"] else ""))
        for reason, n in m["filter_reasons"].items():
            print(f"  filtered out {n}: {reason}")
        for step, n in m.get("cleaning", {}).items():
            print(f"  cleaning: {step.replace('_', ' ')}: {n}")
    elif args.command in STAGES:
        cfg = load_config(STAGES[args.command][0], args.config, stage_overrides(args.command, args.overrides))
        art = _stage_runner(args.command)(cfg, store)
        if art is not None:
            print(json.dumps({k: v for k, v in art.manifest["metrics"].items() if isinstance(v, (int, float))}))
            print(wrote_line(art))
            if line := summary(art):
                print(line)
    elif args.command == "config":
        import yaml

        cfg = load_config(STAGES[args.stage][0], args.config, stage_overrides(args.stage, args.overrides))
        print(yaml.safe_dump(dump(cfg), sort_keys=False, allow_unicode=True), end="")
    elif args.command == "export":
        from rlhf.export import export

        art, out = export(store, args.ref, args.dir, dtype=args.dtype)
        print(f"exported {art.ref} -> {out}")
    elif args.command == "sweep":
        return _sweep(store, args)
    elif args.command == "artifacts":
        return _artifacts(store, args)
    elif args.command == "label":
        from labeling_app.cli import run_label

        return run_label(args, store)
    elif args.command == "demo":
        from rlhf.demo import check_methods, run_demo

        methods = check_methods([m.strip() for m in args.methods.split(",") if m.strip()])
        run_demo(store, quick=args.quick, methods=methods)
    return 0


def _sweep(store: ArtifactStore, args: argparse.Namespace) -> int:
    import shlex

    from rlhf.sweep import Sweep, parse_axes, run_sweep

    fixed, axes = parse_axes(args.overrides)
    sweep = Sweep(args.stage, STAGES[args.stage][0], args.config, fixed, axes)
    # The workspace too: run from anywhere, the line finds the finished trials and reuses them.
    command = shlex.join(["rlhf", "--workspace", str(store.root), "sweep", args.stage,
                          *(["--config", args.config] if args.config else []),
                          *args.overrides, "--search", args.search,
                          *(["--trials", str(args.trials)] if args.trials else []), "--metric", args.metric,
                          *(["--direction", args.direction] if args.direction else []),
                          *(["--seed", str(args.seed)] if args.search != "grid" else []), "--name", args.name])
    art = run_sweep(store, sweep, _stage_runner(args.stage), _stage_runner(args.stage, "check"),
                    search=args.search, trials=args.trials, metric=args.metric, direction=args.direction,
                    seed=args.seed, name=args.name, command=command)
    m = art.manifest["metrics"]
    print(wrote_line(art))
    print(f"best: {m['best_ref']} ({m['metric']}={m['best_value']:.4g}); {m['trained']} trial(s) trained, "
          f"{m['reused']} reused")
    return 0


def _artifacts(store: ArtifactStore, args: argparse.Namespace) -> int:
    if args.action == "list":
        listed = damaged = 0
        for ref, a, problem in store.scan():
            if a is None:  # reported, and the rest still listed
                print(f"error: {ref} is damaged: {problem}; run `rlhf artifacts verify {ref}`", file=sys.stderr)
                damaged += 1
                continue
            listed += 1
            print(f"{a.ref:40s} {a.manifest['stage']:12s} {a.manifest['created_at']}  @{a.content_hash[:12]}")
        if not listed and not damaged:
            print(f"no artifacts in {store.root}")
        return 1 if damaged else 0
    elif args.action == "show":
        print(json.dumps(store.resolve(args.ref, check_files=False).manifest, indent=2))
    elif args.action == "lineage":
        print(store.lineage(args.ref))
    elif args.action == "verify":
        kind, name, version = store.locate(args.ref)
        ref = f"{KIND_DIRS[kind]}/{name}:v{version}"
        problems = store.verify(args.ref)
        for p in problems:
            print(f"{ref}: {p}")
        if problems:
            print(f"error: {ref} failed verification ({len(problems)} problem(s))", file=sys.stderr)
            return 1
        print(f"{ref}: ok, {len(store.load(kind, name, version).manifest['files'])} files match their hashes")
    return 0


# Libraries whose deprecation notices are not the user's to act on. Warnings from trl and
# transformers stay visible: the suite patches TRL internals (training.fast_lm_head_on_cpu), and
# a deprecation there is the first sign that TRL has moved.
QUIET_MODULES = r"(streamlit|torch|datasets|accelerate|peft|bitsandbytes|pyarrow|sqlalchemy|gguf|optuna|matplotlib)(\.|$)"


def _quiet_libraries() -> None:
    """Keep the terminal for our own output."""
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=QUIET_MODULES)
    # TRL 1.16 still asks transformers 5.24 for the old name on every trainer start; nothing here to change.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # bitsandbytes warns on every CPU import that its optional 4-bit CPU kernels are absent.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # transformers reports the reward model's new `score` head as "missing" on every load: expected here.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("RLHF_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    parser = build_parser()
    # argparse ends a positional list at the first option, so `key=value` overrides written after
    # an option (`rlhf sweep sft lora.r=8,16 --search grid train.max_steps=6`) come back unparsed.
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        rc = run(args)
        sys.stdout.flush()  # inside the try: a closed pipe shows here, not at exit
        return rc
    except BrokenPipeError:
        # The reader went away (`rlhf artifacts show X | head`): stop quietly. Python's recipe
        # (docs: signal, "Note on SIGPIPE"): point stdout at devnull so the flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except RlhfError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = {"sweep": "; finished trials are kept: run the same command to resume"}.get(
            args.command, "; run the same command again to resume from its last trainer checkpoint"
            if args.command in SWEEPABLE else "")
        print(f"error: interrupted; the run in progress published no artifact{resume}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
