"""Typed stage configs: YAML file + `key=value` dotted overrides -> a validated pydantic model.

Unknown keys are errors that name the key and the closest valid keys; nothing is fixed up
silently. Library knobs go in a stage's pass-through section (`trl:`), which the library's
own config class validates.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rlhf.errors import RlhfError


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; read it as a float, as YAML 1.2 and users do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+|[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)$"),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class TrainConfig(Section):
    """The optimisation budget every training stage shares."""

    max_steps: int = Field(-1, description="optimizer steps; -1 means run `epochs` full passes")
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    seed: int = 42
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="share of rows held out for eval")
    eval_steps: int | None = Field(None, ge=1, description="evaluate every N steps; default: at the end only")
    save_steps: int = Field(50, ge=1, description="trainer checkpoint for resume every N steps")
    logging_steps: int = Field(5, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto = bf16 autocast where the hardware has it (CUDA bf16, CPU AMX/AVX512-BF16)")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations to save memory; off because small models fit without it")


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class StageConfig(Section):
    """Sections every stage has: input model, input data, training budget, output name."""

    model: str
    data: str
    train: TrainConfig = TrainConfig()
    output: str


class SFTConfig(StageConfig):
    model: str = "base:latest"
    data: str = "sft:latest"
    output: str = "sft"
    mode: Literal["lora", "full", "qlora"] = "lora"
    lora: LoraConfig = LoraConfig()
    max_length: int = Field(512, ge=8, description="tokens per example; longer ones are truncated")
    merge: bool = Field(False, description="merge the LoRA adapter into the weights before saving")
    trl: dict[str, Any] = Field(default_factory=dict, description="passed through to trl.SFTConfig")

    @model_validator(mode="after")
    def _consistent(self) -> SFTConfig:
        if self.mode == "full" and self.merge:
            raise ValueError("merge=true only applies to mode=lora or mode=qlora; remove it for mode=full")
        return self


class RewardConfig(StageConfig):
    model: str = "sft:latest"
    data: str = "preferences:latest"
    output: str = "reward"
    mode: Literal["lora", "full", "qlora"] = "lora"
    lora: LoraConfig = LoraConfig()
    max_length: int = Field(512, ge=8, description="tokens per prompt+response; longer pairs are dropped and counted")
    use_margin: bool = Field(True, description="use the dataset's margin column where every row has one")
    center_coef: float = Field(0.0, ge=0, description="weight of the reward-centering term mean((r_c+r_r)^2)")
    bootstrap_samples: int = Field(1000, ge=100, description="resamples for the held-out accuracy CI")
    normalization_samples: int = Field(512, ge=2, description="training responses scored for the mean/std")
    trl: dict[str, Any] = Field(default_factory=dict, description="passed through to trl.RewardConfig")


class DPOConfig(StageConfig):
    model: str = "sft:latest"
    data: str = "preferences:latest"
    output: str = "dpo"
    mode: Literal["lora", "full", "qlora"] = "lora"
    lora: LoraConfig = LoraConfig()
    max_length: int = Field(512, ge=8, description="tokens per prompt+response")
    beta: float = Field(0.1, gt=0, description="strength of the implicit KL constraint to the reference")
    loss_type: str | list[str] = Field("sigmoid", description="any TRL DPO loss: sigmoid, ipo, hinge, robust, ...")
    precompute_ref_log_probs: bool = Field(False, description="score the reference once before training")
    kl_prompts: int = Field(16, ge=0, description="held-out prompts sampled to measure KL to the reference")
    max_new_tokens: int = Field(48, ge=1, description="response length when sampling for the KL measurement")
    trl: dict[str, Any] = Field(default_factory=dict, description="passed through to trl.DPOConfig")


class PPOHyperparameters(Section):
    """Names and defaults follow "The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024)."""

    epochs: int = Field(2, ge=1, description="optimisation passes over each rollout batch")
    minibatch_size: int = Field(4, ge=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    kl_coef: float = Field(0.05, ge=0, description="initial (adaptive) or fixed KL penalty coefficient")
    adaptive_kl: bool = False
    kl_target: float = Field(6.0, gt=0, description="adaptive only: target KL per response, in nats")
    kl_horizon: int = Field(10000, gt=0, description="adaptive only: controller horizon, in samples")
    temperature: float = Field(0.7, gt=0)
    max_new_tokens: int = Field(48, ge=1)
    max_prompt_length: int = Field(256, ge=8, description="longer prompts keep their last tokens and are counted")
    missing_eos_penalty: float = Field(1.0, ge=0, description="subtracted from the score of a response cut off without EOS")
    value_init: Literal["reward", "zero"] = Field(
        "reward", description="value head start: the reward model's normalised score head, or zeros (V = 0)")


class PPOConfig(StageConfig):
    model: str = "sft:latest"
    reward: str = "reward:latest"
    data: str = "prompts:latest"
    eval_data: str | None = Field(None, description="held-out prompts ref; default: train.eval_fraction of `data`")
    output: str = "ppo"
    mode: Literal["lora", "qlora"] = "lora"
    lora: LoraConfig = LoraConfig()
    ppo: PPOHyperparameters = PPOHyperparameters()
    train: TrainConfig = TrainConfig(max_steps=20, batch_size=8, learning_rate=5e-5, save_steps=5)
    eval_every: int = Field(5, ge=1, description="evaluate on held-out prompts every N iterations")
    eval_prompts: int = Field(16, ge=1)
    samples_kept: int = Field(4, ge=0, description="sample responses kept per evaluation")


class SamplingConfig(Section):
    temperature: float = Field(0.8, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(96, ge=1)


class GenerateConfig(Section):
    model: str = "sft:latest"
    data: str = "prompts:latest"
    output: str = "candidates"
    k: int = Field(4, ge=1, description="responses sampled per prompt")
    sampling: SamplingConfig = SamplingConfig()
    batch_size: int = Field(8, ge=1, description="prompts per generate() call (each with k samples)")
    max_prompt_length: int = Field(512, ge=8)
    limit: int | None = Field(None, ge=1, description="use only the first N prompts")
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"


class ScoreConfig(Section):
    reward: str = "reward:latest"
    data: str = "candidates:latest"
    output: str | None = Field(None, description="dataset name for the scored copy; default: the input's name")
    batch_size: int = Field(16, ge=1)


class CompareConfig(Section):
    models: list[str] = Field(min_length=2, description="checkpoint refs; given as positional arguments")
    data: str = Field("prompts:latest", description="held-out prompts dataset")
    judge: list[str] = Field(["gold"], description="gold, reward:<ref>, human:<ab_votes ref>; comma-separated")
    limit: int | None = Field(None, ge=1, description="use only the first N prompts")
    sampling: SamplingConfig = SamplingConfig(temperature=0.7)
    batch_size: int = Field(32, ge=1, description="prompts per generate() call")
    seed: int = 0
    tie_margin: float = Field(0.0, ge=0, description="score differences up to this count as ties")
    bootstrap_samples: int = Field(1000, ge=100)
    output: str = "compare"
    precision: Literal["auto", "bf16", "fp32"] = "auto"

    @field_validator("judge", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return [j.strip() for j in v.split(",") if j.strip()] if isinstance(v, str) else v


C = TypeVar("C", bound=BaseModel)


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] = ()) -> C:
    """Build `cls` from an optional YAML file plus `a.b=value` overrides; fail on any bad key."""
    source = str(path) if path else "command line"
    raw: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise RlhfError(f"config file {p} not found; pass an existing YAML file to --config")
        try:
            raw = _yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise RlhfError(f"{p}: not valid YAML ({_one_line(e)})") from None
        if not isinstance(raw, dict):
            raise RlhfError(f"{p}: the top level must be a mapping of config keys")
    for item in overrides:
        _apply_override(raw, item)
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise RlhfError(f"config ({source}): {format_validation_error(e, cls)}") from None


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise RlhfError(f"override {item!r} is not key=value; write e.g. train.max_steps=20")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RlhfError(f"override {item!r}: {part!r} is not a section")
        node = child
    try:
        node[parts[-1]] = _yaml(value) if value.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = value


def valid_keys(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key a config class accepts, e.g. `train.max_steps`."""
    keys = []
    for name, f in cls.model_fields.items():
        keys.append(prefix + name)
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += valid_keys(ann, prefix + name + ".")
    return keys


def format_validation_error(e: ValidationError, cls: type[BaseModel]) -> str:
    keys = valid_keys(cls)
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc, keys, n=3, cutoff=0.5)
            hint = (f"; did you mean {', '.join(repr(c) for c in close)}?" if close
                    else f"; valid keys: {', '.join(keys)}")
            parts.append(f"unknown key {loc!r}{hint}")
        elif loc:
            parts.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
        else:
            parts.append(err["msg"].removeprefix("Value error, "))
    return "; ".join(parts)


def check_passthrough(section: str, options: dict[str, Any], library_cls: type) -> None:
    """Reject keys a library config dataclass does not have, before any work starts."""
    fields = {f.name for f in dataclasses.fields(library_cls)}
    for key in options:
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=3)
            hint = f"; did you mean {', '.join(repr(f'{section}.{c}') for c in close)}?" if close else ""
            raise RlhfError(f"config: unknown key '{section}.{key}' for {library_cls.__name__}{hint}")


def dump(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())
