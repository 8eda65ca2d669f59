"""Glue every TRL-based training stage shares: trainer arguments, resume, metrics, logs.

Kept out of the stages so that `sft`, `reward` and `dpo` resume, measure and log the same way.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import resource
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from rlhf.artifacts import Artifact, ArtifactStore
from rlhf.config import FineTuneTrainConfig, TrainConfig
from rlhf.errors import RlhfError

log = logging.getLogger(__name__)


def run_id(config: dict[str, Any], inputs: list[Artifact]) -> str:
    """Same config and same input contents -> same id, so re-running a killed command resumes it."""
    key = json.dumps({"config": config, "inputs": [a.content_hash for a in inputs]}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


RUN_TOTALS = "run_totals.json"

# The logs a training stage leaves in its artifact's logs/; the dashboard reads them by these names.
LOGS_DIR = "logs"
TRAIN_LOG = "train_log.jsonl"  # TRL stages: the trainer's log history
PPO_LOG = "ppo_log.jsonl"  # PPO: one row per iteration
PPO_EVALS = "evals.jsonl"  # PPO: each held-out evaluation, with sample responses
# Where the experiment trackers write during a run: inside the scratch directory, so a resumed
# run appends to the same curves, then copied whole into the artifact's logs/ at publish.
TRACKING = "tracking"

# report.to -> the package that tracker needs (either one, for tensorboard).
TRACKER_PACKAGES = {"tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                    "trackio": ("trackio",)}


def check_trackers(report_to: list[str]) -> None:
    """Each tracker in `report.to` is installed; checked before any model loads."""
    import importlib.util

    for tracker in report_to:
        if not any(importlib.util.find_spec(p) for p in TRACKER_PACKAGES[tracker]):
            raise RlhfError(f"config: report.to={tracker} needs the {TRACKER_PACKAGES[tracker][0]} package; "
                            f"pip install {TRACKER_PACKAGES[tracker][0]}, or leave {tracker} out of report.to")


def tracking_dir(scratch: Path, report_to: list[str]) -> Path:
    """Point every tracker in `report_to` at the run's scratch directory, offline-friendly.

    TensorBoard writes event files there; wandb keeps its run files (all of them in offline mode,
    `WANDB_MODE=offline`) there; MLflow, unless told otherwise, logs to a file store there.
    """
    import os

    out = scratch / TRACKING  # made by the first tracker that writes, so a refused run leaves none
    if "tensorboard" in report_to:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")  # read by transformers' callback
    if "wandb" in report_to:
        out.mkdir(parents=True, exist_ok=True)  # wandb wants its directory to exist
        os.environ["WANDB_DIR"] = str(out)
    if "mlflow" in report_to:
        os.environ.setdefault("MLFLOW_TRACKING_URI", (out / "mlruns").resolve().as_uri())
    return out


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A resolved config as trackers take hyperparameters: dotted keys, scalar values."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return out


def distinct_event_files(trainer) -> None:
    """Give each TensorBoard writer the trainer opens its own event file.

    tensorboardX names a file by the second it opens, and the trainer closes its writer at the
    end of training and opens another for the evaluation after it, often within that second:
    the second file would overwrite the first. A per-writer suffix keeps both.
    """
    import itertools
    import os

    for callback in trainer.callback_handler.callbacks:
        writer_class = getattr(callback, "_SummaryWriter", None)
        if writer_class is None or getattr(writer_class, "distinct", False):
            continue
        counter = itertools.count()

        def opened(*args, _cls=writer_class, _n=counter, **kwargs):
            return _cls(*args, filename_suffix=f".{os.getpid()}.{next(_n)}", **kwargs)

        opened.distinct = True
        callback._SummaryWriter = opened


def publish_tracking(scratch: Path, logs_dir: Path, trainer=None) -> None:
    """Copy what the trackers wrote into the artifact's logs/, so the curves travel with it.

    transformers' TensorBoard callback reopens a writer for the evaluation after training and
    leaves it to flush on its own schedule; closing it first puts those last points on disk.
    """
    for callback in getattr(getattr(trainer, "callback_handler", None), "callbacks", []):
        writer = getattr(callback, "tb_writer", None)
        if writer is not None:
            writer.close()
            callback.tb_writer = None
    if (scratch / TRACKING).is_dir() and any((scratch / TRACKING).iterdir()):
        shutil.copytree(scratch / TRACKING, logs_dir, dirs_exist_ok=True)


def last_complete_checkpoint(scratch: Path) -> Path | None:
    """The newest `checkpoint-N` whose trainer state and run totals were both written.

    transformers writes a checkpoint's files one by one and `trainer_state.json` last, and
    `RunTotals` adds its file after that, so a run killed mid-save leaves a directory without
    one of them; that one is skipped (and removed).
    """
    best = None
    for d in sorted(scratch.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])):
        try:
            json.loads((d / "trainer_state.json").read_text())
            json.loads((d / RUN_TOTALS).read_text())
            best = d
        except (OSError, ValueError):
            shutil.rmtree(d, ignore_errors=True)
    return best


def _run_totals_callback(trainer, prior: dict[str, float], start: float):
    """Writes, into every trainer checkpoint, the loss sum, tokens and wall time of the run so far,
    so that a resumed run's metrics can describe the whole run (the trainer's own cover only the
    part after the resume)."""
    from transformers import TrainerCallback

    class RunTotals(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            totals = {
                "loss_sum": prior["loss_sum"] + trainer._total_loss_scalar + float(trainer._tr_loss),
                "train_tokens": prior["train_tokens"] + trainer._total_train_tokens,
                "wall_s": prior["wall_s"] + time.perf_counter() - start,
            }
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / RUN_TOTALS
            if state.is_world_process_zero and path.parent.is_dir():
                path.write_text(json.dumps(totals))

    return RunTotals()


def trainer_kwargs(train: TrainConfig, scratch: Path, precision: str, has_eval: bool,
                   gradient_checkpointing: bool = False, report_to: list[str] = ()) -> dict[str, Any]:
    """The `transformers.TrainingArguments` fields our `train:` and `report:` sections map to."""
    import torch

    kwargs = {
        "output_dir": str(scratch),
        "max_steps": train.max_steps,
        "num_train_epochs": train.epochs,
        "per_device_train_batch_size": train.batch_size,
        "per_device_eval_batch_size": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "learning_rate": train.learning_rate,
        "seed": train.seed,
        "data_seed": train.seed,
        "bf16": precision == "bf16",  # autocast; on a CPU it needs use_cpu below
        "fp16": precision == "fp16",  # autocast with a loss scaler, on CUDA only (resolve_precision)
        "use_cpu": not torch.cuda.is_available(),
        # TRL turns this on by default; the recompute costs ~30% step time, so it is on only where
        # memory needs it (`checkpointing_decision`).
        "activation_checkpointing": gradient_checkpointing,  # transformers 5's name for it
        # Batches of rows of similar length pad far less (`LengthGroupedBatches`, `length_grouped`).
        "train_sampling_strategy": ("group_by_length" if isinstance(train, FineTuneTrainConfig)
                                    and train.group_by_length else "random"),
        "eval_strategy": "steps" if (has_eval and train.eval_steps) else "no",
        "eval_steps": train.eval_steps,
        "save_strategy": "steps",
        "save_steps": train.save_steps,
        # Two, so that a kill during a save still leaves the previous complete checkpoint.
        "save_total_limit": 2,
        "logging_steps": train.logging_steps,
        "report_to": list(report_to),  # pointed at the scratch directory below
        "disable_tqdm": False,
    }
    if report_to:
        tracking_dir(scratch, list(report_to))
    if isinstance(train, FineTuneTrainConfig) and train.early_stopping_patience is not None:
        kwargs.update({
            "load_best_model_at_end": True,
            "metric_for_best_model": "eval_loss",
            "greater_is_better": False,
            # A checkpoint at each new best eval_loss, so the best is on disk to restore at the end
            # (with fixed save_steps the best step may fall between saves and be lost).
            "save_strategy": "best",
            # A resumed run keeps its count of evaluations without improvement.
            "restore_callback_states_from_checkpoint": True,
        })
    return kwargs


def chat_lengths(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool = False) -> list[int]:
    """Token count of each conversation as TRL tokenises it (the chat template applied)."""
    ids = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=False,
                                        add_generation_prompt=add_generation_prompt)
    return [len(x) for x in ids]


def available_memory_bytes() -> int:
    """Free memory where training runs: the GPU's, else what the kernel can still give this process
    (MemAvailable, capped by a cgroup memory limit where one is set)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    free = None
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            free = int(line.split()[1]) * 1024
    try:
        limit, used = (Path("/sys/fs/cgroup", f).read_text().strip() for f in ("memory.max", "memory.current"))
        if limit != "max":
            free = min(free or 1 << 62, int(limit) - int(used))
    except OSError:
        pass
    return free if free is not None else 1 << 62


def activation_bytes(model_config, sequences: int, length: int) -> int:
    """Estimated activations a backward pass keeps for `sequences` rows of `length` tokens, without
    checkpointing: per token and layer, about 8 hidden-size, 4 MLP-size and 2·heads·length attention
    values (scores and probabilities, as the math attention path materialises them), in fp32, which
    CPU autocast keeps for norms and softmax. Close to Korthikanti et al. 2022's count; on
    SmolLM2-135M at 16 × 512 tokens it gives ~18 GB; the reward stage was seen to reach 20 GB."""
    cfg = model_config.get_text_config()
    h, layers, heads = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads
    mlp = getattr(cfg, "intermediate_size", None) or 4 * h
    per_token_layer = 4 * (8 * h + 4 * mlp + 2 * heads * length)
    return sequences * length * layers * per_token_layer


def checkpointing_decision(setting: bool | str, model_config, sequences: int, length: int) -> tuple[bool, str]:
    """Whether to recompute activations, and why, for batches of `sequences` rows of up to `length` tokens."""
    if setting != "auto":
        return bool(setting), f"train.gradient_checkpointing={str(setting).lower()}"
    need, free = activation_bytes(model_config, sequences, length), available_memory_bytes()
    on = need > free / 2
    gb = lambda b: f"{b / 2**30:.1f} GB"
    return on, (f"auto: the longest batch ({sequences} x {length} tokens) needs ~{gb(need)} of activations, "
                f"{'more' if on else 'less'} than half the {gb(free)} free")


def row_lengths(dataset) -> list[int] | None:
    """Tokens each row of a TRL-tokenised dataset puts in the padded batch, or None if unknown.

    SFT rows hold `input_ids`; preference rows `chosen_ids` and `rejected_ids` (DPO also
    `prompt_ids`), stacked in one batch, so a pair is as long as its prompt and longer side.
    """
    columns = dataset.column_names
    if "input_ids" in columns:
        return [len(x) for batch in dataset.select_columns(["input_ids"]).iter(1024) for x in batch["input_ids"]]
    if not {"chosen_ids", "rejected_ids"} <= set(columns):
        return None
    sides = [c for c in ("prompt_ids", "chosen_ids", "rejected_ids") if c in columns]
    return [len(p) + max(len(c), len(r)) for batch in dataset.select_columns(sides).iter(1024)
            for p, c, r in zip(batch.get("prompt_ids") or [()] * len(batch["chosen_ids"]), batch["chosen_ids"],
                               batch["rejected_ids"])]


class LengthGroupedBatches:
    """Training rows in batches of similar length, the batches themselves in random order.

    A batch pads to its longest row, so random batches of real data carry much padding, which
    costs time and memory. Rows are shuffled, cut into megabatches of `megabatch` batches, sorted
    by length within each and cut into batches; then the batches are shuffled. transformers'
    `LengthGroupedSampler` keeps each megabatch longest-first instead, so a short run sees only
    the longest rows and every run walks long -> short. The same seed and epoch give the same
    order, so a resumed run skips exactly the batches it had trained on.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, megabatch: int = 50):
        self.lengths, self.batch_size, self.seed, self.megabatch = lengths, batch_size, seed, megabatch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # called by the trainer at each epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        import torch

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        rows = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.megabatch * self.batch_size
        batches = []
        for start in range(0, len(rows), size):
            group = sorted(rows[start:start + size], key=self.lengths.__getitem__)
            batches += [group[i:i + self.batch_size] for i in range(0, len(group), self.batch_size)]
        # A short last batch stays last: the loader cuts the index stream every batch_size rows.
        short = [batches.pop()] if len(batches[-1]) < self.batch_size else []
        for batch in [batches[b] for b in torch.randperm(len(batches), generator=generator).tolist()] + short:
            yield from batch


def length_grouped(trainer_cls: type) -> type:
    """`trainer_cls` whose training batches are `LengthGroupedBatches` under
    `train_sampling_strategy="group_by_length"` (`train.group_by_length`), and whose evaluation
    runs through its rows shortest first (the mean loss does not depend on the order)."""

    class LengthGrouped(trainer_cls):
        def _grouped_lengths(self, dataset) -> list[int] | None:
            return row_lengths(dataset) if self.args.train_sampling_strategy == "group_by_length" else None

        def _get_train_sampler(self, train_dataset=None):
            lengths = self._grouped_lengths(train_dataset if train_dataset is not None else self.train_dataset)
            if lengths is None:
                return super()._get_train_sampler(train_dataset)
            return LengthGroupedBatches(lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        self.args.data_seed if self.args.data_seed is not None else self.args.seed)

        def _get_eval_sampler(self, eval_dataset):
            lengths = self._grouped_lengths(eval_dataset) if self.args.world_size == 1 else None
            if lengths is None:
                return super()._get_eval_sampler(eval_dataset)
            return sorted(range(len(lengths)), key=lengths.__getitem__)

    LengthGrouped.__name__ = LengthGrouped.__qualname__ = trainer_cls.__name__
    return LengthGrouped


def callbacks(train: TrainConfig) -> list:
    """Trainer callbacks for the `train:` section: early stopping on eval_loss when asked for."""
    if not isinstance(train, FineTuneTrainConfig) or train.early_stopping_patience is None:
        return []
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(train.early_stopping_patience, train.early_stopping_threshold)]


def stop_metrics(trainer, train: TrainConfig) -> dict[str, Any]:
    """At which step and why training stopped; with early stopping, the best step it restored."""
    from transformers import EarlyStoppingCallback

    state = trainer.state
    stopper = next((c for c in trainer.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback)), None)
    if stopper and stopper.early_stopping_patience_counter >= stopper.early_stopping_patience:
        reason = (f"early stopping: eval_loss did not improve by more than {stopper.early_stopping_threshold} "
                  f"for {stopper.early_stopping_patience} evaluation(s) in a row")
    elif train.max_steps > 0:
        reason = f"max_steps={train.max_steps} reached"
    else:
        reason = f"epochs={train.epochs:g} completed"
    out: dict[str, Any] = {"stopped_at_step": state.global_step, "stop_reason": reason}
    if stopper:
        out.update({"best_step": state.best_global_step, "best_eval_loss": state.best_metric,
                    "restored_best_checkpoint": state.best_model_checkpoint is not None})
    return out


@contextmanager
def fast_lm_head_on_cpu() -> Iterator[None]:
    """Make TRL's chunked LM head (SFT, DPO) cheap on a CPU, for the duration of the block.

    TRL projects to the vocabulary in tiles so the full logits never exist. Off CUDA it
    (1) scores every position, prompt and padding included, where CUDA scores only the
    labelled ones, and (2) computes the backward matmul in fp32, which on this CPU runs at
    a fraction of the bf16 rate (AMX). With a 49k vocabulary that head cost as much as the
    whole backbone. Here it scores only labelled positions, and the backward matmul runs in
    the compute dtype and is summed in fp32, as autocast does for every other layer.
    Measured with `python -m bench` (README, Performance). Nothing changes on CUDA, or if
    TRL's internals move (then TRL's own path runs unchanged).
    """
    import torch

    try:
        from trl.kernels import chunked_logprob
        from trl.trainer import utils as trl_utils

        saved = chunked_logprob._addmm_fp32, trl_utils._use_triton
    except (ImportError, AttributeError):
        saved = None
    if saved is None or torch.cuda.is_available():
        yield
        return

    def addmm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        acc.add_(torch.mm(a, b))

    chunked_logprob._addmm_fp32 = addmm
    # In trl.trainer.utils this name only decides whether to score just the labelled positions.
    trl_utils._use_triton = lambda device: True
    try:
        yield
    finally:
        chunked_logprob._addmm_fp32, trl_utils._use_triton = saved


@functools.cache
def _lora_linear():
    """The autograd function of `fused_lora_on_cpu`, made on first use (torch loads lazily here)."""
    import torch

    class LoRALinear(torch.autograd.Function):
        """y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ in the compute dtype of `weight` (a copy of the frozen base weight).

        x: (tokens, in); weight: (out, in); lora_a: (r, in); lora_b: (out, r). Returns (tokens, out) in
        the compute dtype, as autocast gives. The frozen weight and bias get no gradient."""

        @staticmethod
        def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
            dtype = weight.dtype
            xc, a, b = x.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
            h = xc @ a.t()
            y = xc @ weight.t() if bias is None else torch.addmm(bias.to(dtype), xc, weight.t())
            y = torch.addmm(y, h, b.t(), alpha=scaling)
            ctx.save_for_backward(xc, weight, a, b, h)
            ctx.scaling, ctx.dtypes = scaling, (x.dtype, lora_a.dtype, lora_b.dtype)
            return y

        @staticmethod
        def backward(ctx, grad_y):
            xc, weight, a, b, h = ctx.saved_tensors
            (s, (x_dtype, a_dtype, b_dtype)), grad_y = (ctx.scaling, ctx.dtypes), grad_y.to(weight.dtype)
            t = grad_y @ b  # (tokens, r)
            grad_x = torch.addmm(grad_y @ weight, t, a, alpha=s).to(x_dtype) if ctx.needs_input_grad[0] else None
            # The adapter's gradients summed in the compute dtype, scaled in fp32, as autocast's would be.
            grad_a = (t.t() @ xc).float().mul_(s).to(a_dtype)
            grad_b = (grad_y.t() @ h).float().mul_(s).to(b_dtype)
            return grad_x, None, None, grad_a, grad_b, None

    return LoRALinear


@contextmanager
def fused_lora_on_cpu(model, keep_weights: bool = True) -> Iterator[int]:
    """Run each LoRA linear layer of `model` as one autograd function on a CPU under bf16 autocast,
    for the block; yields how many layers take it.

    peft computes base(x) + B(A(x))·s as separate operations, and under autocast each one casts: x to
    bf16 for the base and again for A, and the frozen fp32 weight to bf16 at every forward (autocast
    keeps its cast only of weights that train), then a multiply and an add over the output. Here x is
    cast once, the frozen weight's bf16 copy is made once for the block with `keep_weights` (pass
    False where the model recomputes its activations, as memory is short there: then once per
    forward, as autocast does), the adapter's product is added by the same addmm, and the backward
    computes the input's and the adapter's gradients in five matmuls. The same matmuls in the same
    dtype: the sum rounds once where peft's rounds twice (`tests/stages/test_training_inputs.py`).
    Measured with the bench (README, Performance).

    A layer runs peft's own forward where its adapter is off or merged (a reference pass), for a
    DoRA or other variant, with adapter dropout, more than one active adapter, extra arguments,
    autocast off (fp32 training) or to another dtype, and on any device but the CPU.

    A frozen LM head (`get_output_embeddings`, a plain linear) runs from a kept bf16 copy of its
    weight in the same way, bit for bit what autocast computes: PPO projects to the vocabulary in
    every forward, and autocast would cast the 49k x 576 weight each time.
    """
    import torch
    from peft.tuners.lora.layer import Linear as LoraLinear

    layers = [m for m in model.modules()
              if isinstance(m, LoraLinear) and type(m.base_layer) is torch.nn.Linear and "forward" not in m.__dict__
              and not m.base_layer.weight.requires_grad and m.base_layer.weight.device.type == "cpu"
              and not m.lora_variant and all(isinstance(d, torch.nn.Identity) for d in m.lora_dropout.values())]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not (type(head) is torch.nn.Linear and not head.weight.requires_grad and head.weight.device.type == "cpu"
            and "forward" not in head.__dict__):
        head = None
    function = _lora_linear()

    def bf16_autocast_on_cpu(x) -> bool:
        return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16)

    def bf16_copy():
        """A frozen weight's bf16 copy: made once for the block with `keep_weights`, else at every call."""
        kept: tuple[int, torch.Tensor] | None = None  # (the weight's version, its bf16 copy)

        def of(weight):
            nonlocal kept
            if kept is not None and kept[0] == weight._version:  # a weight changed in place (a merge) is copied again
                return kept[1]
            copy = weight.detach().to(torch.bfloat16)
            kept = (weight._version, copy) if keep_weights else None
            return copy
        return of

    def fused(layer):
        copy_of = bf16_copy()

        def forward(x, *args, **kwargs):
            active = layer.active_adapters
            if (args or kwargs or layer.disable_adapters or layer.merged or len(active) != 1
                    or active[0] not in layer.lora_A or not bf16_autocast_on_cpu(x)):
                return type(layer).forward(layer, x, *args, **kwargs)
            name = active[0]
            y = function.apply(x.reshape(-1, x.shape[-1]), copy_of(layer.base_layer.weight), layer.base_layer.bias,
                               layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return forward

    def frozen_head(layer):
        """The frozen LM head as autocast runs it, but from a kept bf16 copy of its (vocabulary-sized) weight."""
        copy_of = bf16_copy()

        def forward(x):
            if not bf16_autocast_on_cpu(x):
                return type(layer).forward(layer, x)
            bias = None if layer.bias is None else layer.bias.to(torch.bfloat16)
            return torch.nn.functional.linear(x.to(torch.bfloat16), copy_of(layer.weight), bias)
        return forward

    patched = [(layer, fused(layer)) for layer in layers] + ([(head, frozen_head(head))] if head is not None else [])
    for layer, forward in patched:
        layer.forward = forward
    try:
        yield len(layers)
    finally:
        for layer, _ in patched:
            del layer.forward  # the class's own forward again, and its kept copy goes with this one


def first_fit_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Bin packing, first fit decreasing: the indices of `lengths` in rows of at most `row_tokens`
    (a longer sequence gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), len(rows))
        if row == len(rows):
            rows.append([])
            room.append(row_tokens)
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def _backbone(model):
    """The decoder inside a (DDP-, peft-wrapped) transformers model, or None."""
    import torch
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    backbone = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    return backbone if isinstance(backbone, torch.nn.Module) else None


# The attention implementation `packed_backbone` switches an SDPA model to while it runs packed:
# SDPA over each packed sequence on its own (`_attention_by_sequence`).
BY_SEQUENCE = "rlhf_sdpa_by_sequence"
# Sequences of up to this many tokens that train attend by matmul and softmax, the rest by SDPA's
# kernel. Per call, forward and backward, the two are even at 256 tokens; at 192 the explicit
# form was 1.14x faster but kept 4-8% more of the reward model's memory for no gain in its step.
EXPLICIT_MAX_TOKENS = 128
# Packed by sequence, a sequence whose first tokens (at least this many) are those of an earlier
# sequence in the batch runs only the tokens after them (`packed_backbone`). 0 turns this off.
SHARED_PREFIX_MIN_TOKENS = 16
_by_sequence_calls = 0  # how many attention calls ran by sequence; padding_free_decision checks it moved


def _attention_by_sequence(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           packed_lengths=None, packed_prefixes=None, **kwargs):
    """transformers' SDPA attention, but for a packed row (`packed_lengths`, from `packed_backbone`) one
    causal attention per sequence: SDPA's kernel, or for a short sequence that trains on a CPU,
    matmul and softmax. transformers keeps packed sequences apart with a block mask over
    the whole row, and with a mask the CPU flash kernel computes every pair of the row's positions,
    the half above the diagonal included; by sequence it computes only the pairs a sequence attends
    to, so packing needs no rows of the batch's width and no padding to fill them.

    `packed_prefixes[s]`, where not None, lists the tokens before segment s's own as (segment, m)
    pieces, the first m tokens of an earlier segment each: a sequence whose first tokens are an
    earlier sequence's runs only the rest, and attends to the earlier one's keys and values."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if packed_lengths is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    global _by_sequence_calls
    _by_sequence_calls += 1
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # once per layer, not per sequence
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    # On a CPU the flash kernel's backward costs ten to twenty times its forward; for a short sequence
    # that trains, two matmuls and a softmax forward and backward take half its time (README,
    # Performance). Without a backward to run, the kernel is three times faster; a GPU's kernels
    # were not measured.
    trains = torch.is_grad_enabled() and query.requires_grad and not dropout
    explicit_max = EXPLICIT_MAX_TOKENS if trains and query.device.type == "cpu" else 0
    prefixes = packed_prefixes or [None] * len(packed_lengths)
    upper = None
    out = []
    # split, not slicing: a slice's backward writes its gradient into a zeroed tensor of the whole
    # row, once per sequence, where split's backward is one concatenation.
    keys, values = key.split(packed_lengths, dim=2), value.split(packed_lengths, dim=2)
    for q, k, v, prefix in zip(query.split(packed_lengths, dim=2), keys, values, prefixes):
        p = 0
        if prefix is not None:
            p = sum(m for _, m in prefix)
            k = torch.cat([*(keys[segment][:, :, :m] for segment, m in prefix), k], dim=2)
            v = torch.cat([*(values[segment][:, :, :m] for segment, m in prefix), v], dim=2)
        n = q.shape[2]
        # The scores a call computes, against a causal sequence of the cap's length.
        if n * (p + n) > explicit_max * explicit_max:
            # Query i sits at position p + i and attends to keys 0..p + i.
            mask = torch.ones(n, p + n, dtype=torch.bool, device=q.device).tril(p) if p else None
            out.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                                        scale=scale, is_causal=not p))
            continue
        # softmax(q·kᵀ·scale) v, causal, as transformers' eager attention computes it (softmax in fp32).
        if upper is None or upper.shape[0] < p + n:
            m = max(p + n, min(max(packed_lengths), explicit_max))
            upper = torch.ones(m, m, dtype=torch.bool, device=q.device).triu(1)
        scores = torch.matmul(q, k.transpose(2, 3)).mul_(scale).masked_fill_(upper[p:p + n, :p + n], float("-inf"))
        out.append(torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v))
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


_packed_forward = False  # True while `packed_backbone` runs a packed row by sequence: no mask to build


def _mask_by_sequence(*args, **kwargs):
    """SDPA's mask, but none for a packed row: `_attention_by_sequence` needs none, and the row's
    block mask would be (tokens in the batch)² booleans built for nothing."""
    from transformers.masking_utils import sdpa_mask

    return None if _packed_forward else sdpa_mask(*args, **kwargs)


def _register_by_sequence() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(BY_SEQUENCE, _attention_by_sequence)
    AttentionMaskInterface.register(BY_SEQUENCE, _mask_by_sequence)


def _can_run_by_sequence(config) -> bool:
    """An SDPA model with no sliding window: a window needs the mask that by sequence does without."""
    full = set(getattr(config, "layer_types", None) or []) <= {"full_attention"}
    return (config._attn_implementation in ("sdpa", BY_SEQUENCE) and full
            and getattr(config, "sliding_window", None) is None)


@contextmanager
def packed_backbone(model, by_sequence: bool = True) -> Iterator[None]:
    """Run the decoder of `model` padding-free for the block.

    A batch of padded rows (SFT's, right-padded; the chosen and rejected sides of DPO's and the
    reward model's pairs; PPO's rollouts, a left-padded prompt and a right-padded response) runs
    packed, each sequence with position ids from 0; the decoder's hidden states are then put
    back in the padded layout, so the heads and losses above it see what they always see.

    With `by_sequence` and an SDPA model, every sequence goes into one row with no padding at all,
    and attention runs over each sequence on its own (`_attention_by_sequence`). Otherwise the
    sequences go into as few rows of the batch's width as hold them, longest first into the first
    row with room, and transformers reads the sequence boundaries from the position ids, so no
    token attends across them. Over an epoch of the HH pairs in batches of 8 at 512 tokens, padded
    rows hold 2.15 tokens per token of text; packed into rows of the batch's width, 1.12. Batches
    with a cache (sampling), with padding inside a row, or with position ids of their own run as
    they come.

    By sequence, a sequence that begins with at least `SHARED_PREFIX_MIN_TOKENS` of an earlier
    sequence's tokens runs only the tokens after them, at their own positions, attending to the
    earlier sequence's keys for the shared ones; the shared positions' hidden states are the earlier
    sequence's. In a causal decoder those tokens compute the same thing in both sequences, so this
    changes nothing but the work: on the bench's HH pairs the reward model ran 1,143 tokens of a
    batch's 1,842, and DPO 1,533 of 2,839.
    """
    import torch

    backbone = _backbone(model)
    if backbone is None:
        yield
        return
    forward = backbone.forward
    config = backbone.config
    attention = config._attn_implementation
    by_sequence = by_sequence and _can_run_by_sequence(config)

    def packed(input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        spans = None if input_ids is None or past_key_values is not None else _spans(attention_mask, position_ids)
        if spans is None:
            return forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           past_key_values=past_key_values, **kwargs)
        starts, lengths = spans
        # Each sequence's (earlier sequence, tokens shared with it), by sequence; the shared tokens run once.
        shared = _shared_prefixes(input_ids, starts, lengths) if by_sequence else [(None, 0)] * len(lengths)
        width = sum(lengths) - sum(p for _, p in shared) if by_sequence else input_ids.shape[1]
        rows = [list(range(len(lengths)))] if by_sequence else first_fit_rows(lengths, width)
        device = input_ids.device
        ids = torch.zeros((len(rows), width), dtype=input_ids.dtype, device=device)
        positions = torch.zeros_like(ids)
        # Where each padded slot's hidden state is in the packed rows (padding reads slot 0).
        source = torch.zeros(input_ids.shape, dtype=torch.long, device=device)
        # Each sequence's tokens as (segment, its first m tokens) pieces; a sequence runs only its last piece.
        pieces: list[list[tuple[int, int]]] = []
        segments, prefixes = [], []
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                a, n = starts[i], lengths[i]
                earlier, p = shared[i]
                prefix = []
                if p:  # the shared tokens' hidden states and keys are the earlier sequence's
                    source[i, a:a + p] = source[earlier, starts[earlier]:starts[earlier] + p]
                    left = p
                    for segment, m in pieces[earlier]:
                        if left:
                            prefix.append((segment, min(m, left)))
                            left -= min(m, left)
                pieces.append(prefix + ([(len(segments), n - p)] if n > p else []))
                if n == p:
                    continue
                ids[r, at:at + n - p] = input_ids[i, a + p:a + n]
                positions[r, at:at + n - p] = torch.arange(p, n, device=device)
                source[i, a + p:a + n] = torch.arange(r * width + at, r * width + at + n - p, device=device)
                prefixes.append(prefix or None)
                segments.append(n - p)
                at += n - p
            positions[r, at:] = torch.arange(width - at, device=device)  # the padding tail: a sequence of its own
        kwargs["use_cache"] = False  # with a cache, transformers would not read boundaries from positions
        global _packed_forward
        if by_sequence:
            kwargs["packed_lengths"] = segments
            if any(prefixes):
                kwargs["packed_prefixes"] = prefixes
        _packed_forward = by_sequence
        try:
            out = forward(input_ids=ids, position_ids=positions, **kwargs)
        finally:
            _packed_forward = False
        out["last_hidden_state"] = out.last_hidden_state.flatten(0, 1)[source]
        if out.get("hidden_states") is not None:  # output_hidden_states: every layer's, in the padded layout too
            out["hidden_states"] = tuple(h.flatten(0, 1)[source] for h in out.hidden_states)
        return out

    own = backbone.__dict__.get("forward")  # a forward something else patched in, if any
    backbone.forward = packed
    if by_sequence:
        _register_by_sequence()
        config._attn_implementation = BY_SEQUENCE  # for the whole block: a checkpointed layer's recompute too
    try:
        yield
    finally:
        config._attn_implementation = attention
        if own is None:
            del backbone.forward  # the class's own forward again
        else:
            backbone.forward = own


def _shared_prefixes(input_ids, starts: list[int], lengths: list[int]) -> list[tuple[int | None, int]]:
    """For each sequence, the earlier sequence it shares the most first tokens with and how many, where
    that is at least `SHARED_PREFIX_MIN_TOKENS`, else (None, 0). The chosen and rejected sides of a
    pair share their prompt, and rows that open with the same system prompt share it."""
    import torch

    n = len(lengths)
    if not SHARED_PREFIX_MIN_TOKENS or n < 2:
        return [(None, 0)] * n
    at = torch.arange(max(lengths), device=input_ids.device)
    valid = at < torch.tensor(lengths, device=input_ids.device)[:, None]
    index = (torch.tensor(starts, device=input_ids.device)[:, None] + at).clamp(max=input_ids.shape[1] - 1)
    ids = torch.where(valid, input_ids.gather(1, index), -1)  # each sequence from its first token; -1 after it
    shared: list[tuple[int | None, int]] = [(None, 0)]
    for i in range(1, n):
        common = ((ids[:i] == ids[i]) & valid[i]).int().cumprod(dim=1).sum(dim=1)
        j = int(common.argmax())
        shared.append((j, int(common[j])) if common[j] >= SHARED_PREFIX_MIN_TOKENS else (None, 0))
    return shared


def _spans(attention_mask, position_ids) -> tuple[list[int], list[int]] | None:
    """(start, length) of each row's tokens, where every row of the mask is one run of tokens (padding
    on either side) and any position ids count from 0 along it, as packing would number them; else None."""
    import torch

    if attention_mask is None or attention_mask.dim() != 2:
        return None
    mask = attention_mask.bool()
    lengths, starts = mask.sum(1), mask.int().argmax(1)
    at = torch.arange(mask.shape[1], device=mask.device)
    if not torch.equal(mask, (at >= starts[:, None]) & (at < (starts + lengths)[:, None])):
        return None
    if position_ids is not None and (position_ids.shape != mask.shape
                                     or not torch.equal(position_ids[mask], (at - starts[:, None])[mask])):
        return None
    return starts.tolist(), lengths.tolist()


@contextmanager
def packed_where_safe(model, enabled: bool, decision: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """`packed_backbone` for the block where `padding_free_decision` allows it; yields the decision.
    A caller that runs many blocks on one model passes the decision it made once."""
    decision = decision if enabled and decision else padding_free_decision(model, enabled)
    with packed_backbone(model, decision.get("attention") == "by sequence") if decision["enabled"] else nullcontext():
        yield decision


def padding_free_decision(model, enabled: bool) -> dict[str, Any]:
    """Whether to train `model` padding-free (`packed_backbone`), and why: four short sequences in a
    batch, two of which share a packed row and two their first 20 tokens, must give the hidden states
    they give alone.
    transformers separates packed sequences only where the architecture builds its attention mask
    from position ids. `attention` says how: "by sequence" where the architecture hands the packed
    lengths on to `_attention_by_sequence` and has no sliding window, else "block mask"."""
    import torch

    if not enabled:
        return {"enabled": False, "reason": "padding_free=false"}
    backbone = _backbone(model)
    if backbone is None:
        return {"enabled": False, "reason": f"{type(model).__name__} has no decoder to run packed"}
    vocab = backbone.get_input_embeddings().num_embeddings
    sequences = [[(7 * i + k) % vocab for i in range(n)] for k, n in ((11, 24), (23, 8), (37, 8))]
    sequences.append(sequences[0][:20] + [(5 * i + 3) % vocab for i in range(4)])  # a shared prefix
    device = next(model.parameters()).device
    hidden = lambda ids, mask: backbone(input_ids=torch.tensor(ids, device=device), use_cache=False,
                                        attention_mask=torch.tensor(mask, device=device)).last_hidden_state.float()
    padded = ([ids + [0] * (24 - len(ids)) for ids in sequences],
              [[1] * len(ids) + [0] * (24 - len(ids)) for ids in sequences])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = [hidden([ids], [[1] * len(ids)])[0] for ids in sequences]
            calls, by_sequence = _by_sequence_calls, _can_run_by_sequence(backbone.config)
            with packed_backbone(model, by_sequence):
                batch = hidden(*padded)
            attention = "by sequence" if _by_sequence_calls > calls else "block mask"
            if by_sequence and attention == "block mask":  # the lengths never reached the attention
                with packed_backbone(model, by_sequence=False):
                    batch = hidden(*padded)
    except TypeError as e:  # a decoder that takes no position ids
        return {"enabled": False, "reason": f"{type(backbone).__name__} cannot run packed rows ({e})"}
    finally:
        model.train(was_training)
    # The two layouts run different kernels: fp32 agrees to ~1e-6, bf16 or fp16 compute to ~1e-2.
    tol = 1e-3 if next(backbone.parameters()).dtype == torch.float32 else 3e-2
    worst = max(float((batch[i, :len(a)] - a).abs().max() / a.abs().max().clamp(min=1e-6))
                for i, a in enumerate(alone))
    if worst <= tol:
        return {"enabled": True, "reason": "packed sequences match their unpacked selves", "attention": attention}
    return {"enabled": False, "reason": f"{type(backbone).__name__} let packed sequences see each other "
                                        f"(hidden states off by {worst:.1e} of their scale)"}


def peak_memory_mb() -> float:
    """Peak CUDA memory allocated if on a GPU, else this process's peak RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def save_logs(trainer, scratch: Path, out_dir: Path) -> None:
    """The trainer's log history as JSONL, a loss-curve PNG, and the trackers' own files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    publish_tracking(scratch, out_dir, trainer)
    log_history = trainer.state.log_history
    with open(out_dir / TRAIN_LOG, "w") as f:
        for entry in log_history:
            f.write(json.dumps(entry) + "\n")
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    if not train and not evals:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)


@dataclass
class TrainRun:
    """What a finished `trainer.train()` leaves for the manifest: totals over the whole run,
    the part before a resume included."""

    train_loss: float
    train_tokens: int
    wall_s: float
    resumed_from: Path | None


def _fault_points(trainer) -> None:
    """The kill points of tests/faults (rlhf/faults.py): after loading, at a step, and inside a
    checkpoint save once its weights, optimizer and RNG are written but not yet trainer_state.json."""
    from transformers import TrainerCallback

    from rlhf import faults

    class FaultPoints(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            faults.point("load")

        def on_step_end(self, args, state, control, **kwargs):
            faults.point(f"step-{state.global_step}")

    trainer.add_callback(FaultPoints())
    save_rng_state = trainer._save_rng_state

    def save_rng_state_then_point(output_dir):
        save_rng_state(output_dir)
        faults.point(f"checkpoint-{trainer.state.global_step}")

    trainer._save_rng_state = save_rng_state_then_point


def let_collectives_settle(accelerator) -> None:
    """After a distributed run's last collective: release the GIL for a moment.

    gloo's worker thread frees each finished collective after the caller has moved on, and the
    last one holds tensors whose Python objects need the GIL to be freed. A process that frees
    its DDP model right after the final barrier (every rank but the main one returns at once)
    destroys the process group while holding the GIL, and the destructor joins that worker
    thread, which waits for the GIL: a deadlock (pytorch/pytorch#56297), seen here as a
    two-process run that published and never exited. The sleep lets the worker finish first.
    """
    if accelerator.num_processes > 1:
        time.sleep(0.5)


THREADS_FILE = "RLHF_THREADS_FILE"


def take_offered_threads() -> None:
    """Between steps: compute on the number of threads written in $RLHF_THREADS_FILE, if it is set.

    `rlhf demo` runs two single-threaded stages side by side; when one ends and nothing can start
    beside the other, it offers that one every core through this file. A file read between steps,
    not a signal: nothing can reach the process while it starts or exits. (The thread count
    changes bf16 rounding, so a stage that moves is not bit-for-bit a stage that never moved.)
    """
    path = os.environ.get(THREADS_FILE)
    if not path:
        return
    try:
        n = int(Path(path).read_text())
    except (OSError, ValueError):  # not offered yet
        return
    import torch

    if n != torch.get_num_threads():
        torch.set_num_threads(n)
        log.info("now on %d threads", n)


def _offered_threads(trainer) -> None:
    from transformers import TrainerCallback

    class OfferedThreads(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            take_offered_threads()

    trainer.add_callback(OfferedThreads())


def train_resumable(trainer, scratch: Path) -> TrainRun:
    """Train, continuing from the last complete checkpoint an identical killed run left in `scratch`."""
    distinct_event_files(trainer)
    _fault_points(trainer)
    _offered_threads(trainer)
    resume = last_complete_checkpoint(scratch) if scratch.exists() else None
    prior = {"loss_sum": 0.0, "train_tokens": 0, "wall_s": 0.0}
    if resume:
        log.warning("resuming from %s", resume)
        prior = json.loads((resume / RUN_TOTALS).read_text())
    start = time.perf_counter()
    trainer.add_callback(_run_totals_callback(trainer, prior, start))
    resumed_steps = int(resume.name.split("-")[-1]) if resume else 0
    if resume and _finished(resume):
        _load_finished(trainer, resume)
        session_loss = 0.0
    else:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        # transformers' training_loss is the mean over the steps of this process only.
        session_loss = result.training_loss * (trainer.state.global_step - resumed_steps)
    steps = trainer.state.global_step
    loss_sum = prior["loss_sum"] + session_loss
    return TrainRun(train_loss=loss_sum / max(steps, 1), train_tokens=prior["train_tokens"] + trainer._total_train_tokens,
                    wall_s=prior["wall_s"] + time.perf_counter() - start, resumed_from=resume)


def _finished(checkpoint: Path) -> bool:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["global_step"] >= state["max_steps"] > 0


def _load_finished(trainer, checkpoint: Path):
    """Load a run's final checkpoint without training: it was killed after training, while publishing.

    `trainer.train` resumed from a checkpoint at max_steps takes one step more before it checks
    whether to stop (transformers 5.24), so the re-run would publish different weights.
    """
    from transformers import TrainerState

    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))


def run_metrics(trainer, run: TrainRun, precision: str) -> dict[str, Any]:
    """Loss, throughput, memory and sizes every TRL-based stage records in its manifest."""
    from rlhf.models import count_parameters

    trainable, total = count_parameters(trainer.model)
    return {
        "train_loss": run.train_loss,
        "steps": trainer.state.global_step,
        # Real (non-padding) tokens, counted by TRL per batch across processes.
        "train_tokens": run.train_tokens,
        "tokens_per_s": run.train_tokens / run.wall_s,
        "wall_s": run.wall_s,
        "peak_mem_mb": peak_memory_mb(),
        "precision": precision,
        "trainable_params": trainable,
        "total_params": total,
        "processes": trainer.accelerator.num_processes,
        "distributed": trainer.accelerator.distributed_type.value,  # NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED
        "resumed_from_step": int(run.resumed_from.name.split("-")[-1]) if run.resumed_from else None,
    }


@dataclass
class Fit:
    """Held-out metrics before and after training, the run's totals, and why it stopped."""

    initial: dict[str, float]
    final: dict[str, float]
    run: TrainRun
    stop: dict[str, Any]
    padding_free: dict[str, Any]


def fit(trainer, scratch: Path, train: TrainConfig, padding_free: bool = False) -> Fit | None:
    """Evaluate, train (resuming an identical killed run), evaluate again.

    None on every process but the main one, which alone publishes under `accelerate launch`.
    """
    distinct_event_files(trainer)
    with fast_lm_head_on_cpu(), fused_lora_on_cpu(trainer.model, keep_weights=not trainer.args.gradient_checkpointing), \
            packed_where_safe(trainer.model, padding_free) as packing:
        initial = trainer.evaluate()
        run = train_resumable(trainer, scratch)
        stop = stop_metrics(trainer, train)  # before the final evaluation, which is not a patience step
        final = trainer.evaluate()
    trainer.accelerator.wait_for_everyone()
    let_collectives_settle(trainer.accelerator)
    return Fit(initial, final, run, stop, packing) if trainer.accelerator.is_main_process else None


@dataclass
class Inputs:
    """A TRL stage's checked inputs: the precision to train in, the model, each dataset and its rows."""

    precision: str
    model: Artifact
    datasets: list[Artifact]
    rows: list[list[dict]]


# TrainingArguments fields the suite sets from its own keys, so a `trl.` copy would collide.
SUITE_KEYS = {
    "report_to": "report.to", "max_steps": "train.max_steps", "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size", "per_device_eval_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum", "learning_rate": "train.learning_rate",
    "seed": "train.seed", "data_seed": "train.seed", "bf16": "train.precision", "fp16": "train.precision",
    "use_cpu": "train.precision",
    "activation_checkpointing": "train.gradient_checkpointing", "padding_free": "padding_free",
    "train_sampling_strategy": "train.group_by_length",
    "gradient_checkpointing": "train.gradient_checkpointing", "eval_steps": "train.eval_steps",
    "save_steps": "train.save_steps", "logging_steps": "train.logging_steps", "output_dir": "output",
    "max_length": "max_length",
}


def check_trl_keys(cfg, library_config: type, stage_keys: dict[str, str] | None = None) -> None:
    """`trl:` holds only fields of `library_config`, and none the suite sets from its own keys
    (those of every stage, and `stage_keys`: library field -> the suite key that sets it)."""
    from rlhf.config import check_passthrough

    check_passthrough("trl", cfg.trl, library_config)
    suite = SUITE_KEYS | (stage_keys or {})
    owned = set(trainer_kwargs(cfg.train, Path("."), "fp32", has_eval=True)) | set(suite)
    for key in cfg.trl:
        if key in owned:
            instead = f"set {suite[key]}=... instead" if key in suite else "remove it"
            raise RlhfError(f"config: trl.{key} is set by the suite itself from its own keys; {instead} "
                            f"(`rlhf <stage> --help` lists them)")


def check_adapter_dropout(cfg, library_config: type) -> None:
    """A LoRA dropout that TRL would switch off is a contradiction, not a setting to ignore.

    TRL's reward and DPO trainers zero every dropout module by default (`disable_dropout`), the
    adapter's included, so `lora.dropout` > 0 would be accepted and silently not applied.
    """
    field = getattr(library_config, "__dataclass_fields__", {}).get("disable_dropout")
    if (field is not None and cfg.mode in ("lora", "qlora") and cfg.lora.dropout > 0
            and cfg.trl.get("disable_dropout", field.default)):
        raise RlhfError(f"config: lora.dropout={cfg.lora.dropout:g} would have no effect: TRL's "
                        f"{library_config.__name__.removesuffix('Config')}Trainer turns dropout off by default; "
                        "set lora.dropout=0, or add trl.disable_dropout=false to train with it")


def prepare_inputs(cfg, store: ArtifactStore, library_config: type, schema: str,
                   task_type: str | None = None) -> Inputs:
    """Everything a TRL stage can fail on before any work: pass-through keys, mode, precision,
    a writable workspace, the refs and each dataset's schema.

    With `task_type` ("CAUSAL_LM" or "SEQ_CLS") the training mode is checked against the model
    as well (peft options, freeze.trainable_layers).
    """
    from rlhf import data, finetune, models

    check_trl_keys(cfg, library_config)
    check_adapter_dropout(cfg, library_config)
    check_trackers(cfg.report.to)
    models.check_launch()
    models.check_mode(cfg.mode)
    precision = models.resolve_precision(cfg.train.precision)
    store.check_writable()
    model = store.resolve(cfg.model, kind="checkpoint")
    refs = [cfg.data] if isinstance(cfg.data, str) else list(cfg.data)
    datasets = [store.resolve(ref, kind="dataset") for ref in refs]
    if task_type:
        finetune.check(cfg, store, model, task_type)
    return Inputs(precision, model, datasets, [data.load_rows(d, schema=schema) for d in datasets])


def split_and_mix(inputs: Inputs, cfg, split: Callable[[Artifact, list[dict]], Any]):
    """Split every dataset into train/test with `split`, then mix: returns (DatasetDict, facts for the manifest).

    Each dataset is split before mixing, so that a row the weighted mix repeats can never be on
    both sides, and the held-out set is every dataset's own held-out rows, unweighted.
    """
    from rlhf import data

    splits = [split(ds, rows) for ds, rows in zip(inputs.datasets, inputs.rows)]
    weights = cfg.data_weights if len(splits) > 1 else None
    try:
        mixed = data.mix(splits, weights, cfg.train.seed, cfg.data_stopping_strategy)
    except ValueError as e:
        raise RlhfError(f"cannot mix {', '.join(d.ref for d in inputs.datasets)}: {' '.join(str(e).split())[:300]}"
                        " (the datasets need the same columns)") from None
    total = sum(weights) if weights else None
    facts = [{"ref": ds.ref, "weight": w / total if total else None, "train_rows": len(s["train"]),
              "eval_rows": len(s["test"])}
             for ds, s, w in zip(inputs.datasets, splits, weights or [None] * len(splits))]
    return mixed, facts
