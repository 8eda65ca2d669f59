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
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


PROJECT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _artifact_name(name: str) -> str:
    from rlhf.artifacts import check_name

    try:
        return check_name(name)
    except RlhfError as e:
        raise ValueError(str(e)) from None


# An output name, checked with the config so that a bad one fails before any work, not at publish.
ArtifactName = Annotated[str, AfterValidator(_artifact_name)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class BudgetConfig(Section):
    """The optimisation budget every training stage shares, PPO's loop included."""

    max_steps: int = Field(-1, description="optimizer steps; -1 means run `epochs` full passes")
    epochs: float = Field(1.0, gt=0, description="full passes over the data when max_steps is -1")
    batch_size: int = Field(8, ge=1, description="examples per optimizer step and process (before grad_accum)")
    learning_rate: float = Field(2e-4, gt=0, description="peak learning rate")
    seed: int = Field(42, description="seed of the split, the shuffle and the new weights")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="share of rows held out for eval")
    save_steps: int = Field(50, ge=1, description="trainer checkpoint for resume every N steps")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto = bf16 autocast where the hardware has it (CUDA bf16, CPU AMX/AVX512-BF16), "
                            "fp16 on a CUDA GPU without bf16, else fp32")

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError(f"train.max_steps={v} trains nothing; give a positive number of steps, "
                             "or -1 to run train.epochs full passes")
        return v


class TrainConfig(BudgetConfig):
    """The budget of the TRL stages, which also accumulate gradients, evaluate and log on a schedule."""

    grad_accum: int = Field(1, ge=1, description="batches whose gradients add up to one optimizer step")
    eval_steps: int | None = Field(None, ge=1, description="evaluate every N steps; default: at the end only")
    logging_steps: int = Field(5, ge=1, description="log the training metrics every N steps")


class FineTuneTrainConfig(TrainConfig):
    """The budget of the TRL fine-tuning stages (sft, reward, dpo), which can also stop early."""

    gradient_checkpointing: Literal["auto"] | bool = Field(
        "auto", description="recompute activations to save memory (~30% slower steps); auto = on only when the "
                            "longest batch's estimated activations exceed half the free memory (the manifest says "
                            "what was chosen and why)")

    # Off by default: faster on real data (less padding), but one epoch on the same rows measured
    # a slightly higher held-out loss for SFT and the reward model (README, Performance).
    group_by_length: bool = Field(
        False, description="draw each batch from rows of similar length, in random batch order, so batches pad "
                           "little (faster on data of mixed lengths); false = random batches")

    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after K evaluations without improvement of eval_loss and keep the best "
                                "checkpoint (needs eval_steps); checkpoints are then saved at each new best")
    early_stopping_threshold: float = Field(0.0, ge=0, description="how much eval_loss must fall to count as better")

    @model_validator(mode="after")
    def _early_stopping_needs_evaluations(self) -> FineTuneTrainConfig:
        if self.early_stopping_patience is not None and self.eval_steps is None:
            raise ValueError("train.early_stopping_patience needs evaluations during training; "
                             "set train.eval_steps too (e.g. train.eval_steps=10)")
        return self


class AdapterConfig(Section):
    """PPO's LoRA adapter: no dropout, so the log-probs of a rollout are the same in every pass."""

    r: int = Field(16, ge=1, description="rank of the LoRA update B·A")
    alpha: int = Field(32, ge=1, description="the update is scaled by alpha / r")
    target_modules: list[str] | str = Field("all-linear", description="module names to adapt, or all-linear")


class LoraConfig(AdapterConfig):
    # 0 by default: its masks took 19% of an SFT step on a CPU (README, Performance).
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")


class FreezeConfig(Section):
    """mode=freeze: the base stays fixed except the top blocks (layer-wise fine-tuning, feature extraction)."""

    trainable_layers: int | None = Field(None, ge=0, description="top transformer blocks that train; 0 = the head only")
    head: bool = Field(True, description="train the output head and final norm too (a head tied to the input "
                                         "embeddings, as in SmolLM2, trains them with it)")


class PeftMethodConfig(Section):
    """mode=peft: any peft method; every key besides `method` goes to that method's peft config class."""

    model_config = ConfigDict(extra="allow")
    method: str | None = Field(None, description="a peft.PeftType in lower case: lora, ia3, prompt_tuning, loha, ...")

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio", "none")


class ReportConfig(Section):
    """Where training curves go besides the artifact's JSONL logs."""

    to: list[Literal[TRACKERS]] = Field(  # type: ignore[valid-type]
        ["tensorboard"], description="experiment trackers: tensorboard (event files in the artifact's "
                                     "logs/tensorboard), wandb, mlflow, trackio, or none; comma-separated")

    @field_validator("to", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return [t.strip() for t in v.split(",") if t.strip()] if isinstance(v, str) else v

    @field_validator("to")
    @classmethod
    def _none_alone(cls, v: list[str]) -> list[str]:
        if "none" in v and len(v) > 1:
            raise ValueError(f"report.to={','.join(v)} names none beside a tracker; give none alone, or the trackers")
        return [t for t in v if t != "none"]


class StageConfig(Section):
    """Sections every training stage has: input model, input data, training budget, output name, trackers."""

    model: str = Field(description="checkpoint ref to start from")
    data: str = Field(description="dataset ref")
    train: TrainConfig = TrainConfig()
    output: ArtifactName = Field(description="artifact name: checkpoints/<output>/vK")
    report: ReportConfig = ReportConfig()


ADAPTER_MODES = ("lora", "qlora", "peft")


class FineTuneConfig(StageConfig):
    """What sft, reward and dpo share: which weights train, the mix of datasets they learn from, and how
    batches run."""

    data: str | list[str] = Field(description="dataset ref, or a list of them: [a:latest, b:v2]")
    data_weights: list[float] | None = Field(
        None, description="relative sampling weight of each dataset in `data`; none: use every row of each once")
    data_stopping_strategy: Literal["all_exhausted", "first_exhausted", "all_exhausted_without_replacement"] = Field(
        "all_exhausted", description="with data_weights: when the mix ends (datasets.interleave_datasets); "
                                     "all_exhausted repeats the smaller sets so every row is seen")
    train: FineTuneTrainConfig = FineTuneTrainConfig()
    mode: Literal["lora", "qlora", "full", "freeze", "peft"] = Field(
        "lora", description="what trains: a LoRA adapter (qlora: on 4-bit weights, CUDA), all weights, the top "
                            "blocks, or any peft method")
    lora: LoraConfig = LoraConfig()
    freeze: FreezeConfig = FreezeConfig()
    peft: PeftMethodConfig = PeftMethodConfig()
    padding_free: bool = Field(True, description="run the decoder on each batch's sequences packed into as few rows "
                                                 "as hold them, the first tokens sequences share once, instead of "
                                                 "padded to the longest (checked on load)")

    @property
    def data_refs(self) -> list[str]:
        return [self.data] if isinstance(self.data, str) else list(self.data)

    @model_validator(mode="after")
    def _consistent_finetune(self) -> FineTuneConfig:
        refs = self.data_refs
        if not refs:
            raise ValueError("data is an empty list; name at least one dataset, e.g. data=[sft:latest]")
        if len(set(refs)) < len(refs):
            raise ValueError(f"data lists a dataset twice ({', '.join(refs)}); give each once and weight it "
                             "with data_weights instead")
        if self.data_weights is not None:
            if len(self.data_weights) != len(refs):
                raise ValueError(f"data_weights has {len(self.data_weights)} weight(s) but data names {len(refs)} "
                                 f"dataset(s); give one weight per dataset, e.g. data=[a:latest, b:latest] "
                                 "data_weights=[0.7, 0.3]")
            if any(w <= 0 for w in self.data_weights):
                raise ValueError(f"data_weights must all be positive (got {self.data_weights}); "
                                 "leave a dataset out of data instead of giving it weight 0")
        elif self.data_stopping_strategy != "all_exhausted":
            raise ValueError("data_stopping_strategy applies only with data_weights; remove it or add data_weights")
        # A section for another mode would be ignored; say so rather than train something else.
        # (Compared with the defaults, not with what was set, so a dumped config loads again.)
        for section, default in (("freeze", FreezeConfig()), ("peft", PeftMethodConfig())):
            if getattr(self, section) != default and self.mode != section:
                raise ValueError(f"{section}.* settings apply only to mode={section}, but mode={self.mode}; "
                                 f"add mode={section} or remove the {section} settings")
        if self.mode == "freeze" and self.freeze.trainable_layers is None:
            raise ValueError("mode=freeze needs freeze.trainable_layers=N: how many top transformer blocks train "
                             "(0 = the head only)")
        if self.mode == "peft" and self.peft.method is None:
            raise ValueError("mode=peft needs peft.method: a peft method such as ia3, prompt_tuning or loha")
        return self


class SFTConfig(FineTuneConfig):
    model: str = "base:latest"
    data: str | list[str] = "sft:latest"
    output: ArtifactName = "sft"
    max_length: int = Field(512, ge=8, description="tokens per example; longer ones are truncated")
    merge: bool = Field(False, description="merge the LoRA adapter into the weights before saving")
    trl: dict[str, Any] = Field(default_factory=dict, description="passed through to trl.SFTConfig")

    @model_validator(mode="after")
    def _consistent(self) -> SFTConfig:
        if self.merge and self.mode not in ADAPTER_MODES:
            raise ValueError(f"merge=true only applies to the adapter modes (lora, qlora, peft); mode={self.mode} "
                             "already saves full weights, so remove merge=true")
        return self


class RewardTrainConfig(FineTuneTrainConfig):
    # On the 299 HH dev pairs after one epoch: 62.2% at 2e-4, 64.9% at 5e-4 (plain TRL at its 1e-4: 60.5%).
    learning_rate: float = Field(5e-4, gt=0, description="peak learning rate")


class RewardConfig(FineTuneConfig):
    model: str = "sft:latest"
    data: str | list[str] = "preferences:latest"
    output: ArtifactName = "reward"
    train: RewardTrainConfig = RewardTrainConfig()
    eval_data: str | None = Field(None, description="preferences ref scored after training besides the held-out "
                                                    "split, e.g. a dev set; never trained on")
    max_length: int = Field(512, ge=8, description="tokens per prompt+response")
    truncation: Literal["left", "drop"] = Field(
        "left", description="a pair longer than max_length: left = each side keeps its last max_length tokens, "
                            "as rlhf score and PPO read it; drop = the pair is skipped (TRL's behaviour); both counted")
    use_margin: bool = Field(True, description="use the dataset's margin column where every row has one")
    center_coef: float = Field(0.0, ge=0, description="weight of the reward-centering term mean((r_c+r_r)^2)")
    bootstrap_samples: int = Field(1000, ge=100, description="resamples for the held-out accuracy CI")
    normalization_samples: int = Field(512, ge=2, description="training responses scored for the mean/std")
    trl: dict[str, Any] = Field(default_factory=dict, description="passed through to trl.RewardConfig")


class DPOConfig(FineTuneConfig):
    model: str = "sft:latest"
    data: str | list[str] = "preferences:latest"
    output: ArtifactName = "dpo"
    max_length: int = Field(512, ge=8, description="tokens per prompt+response")
    beta: float = Field(0.1, gt=0, description="strength of the implicit KL constraint to the reference")
    loss_type: str | list[str] = Field("sigmoid", description="any TRL DPO loss: sigmoid, ipo, hinge, robust, ...")
    precompute_ref_log_probs: bool = Field(False, description="score the reference once before training")
    kl_prompts: int = Field(16, ge=0, description="held-out prompts sampled to measure KL to the reference")
    max_new_tokens: int = Field(48, ge=1, description="response length when sampling for the KL measurement")
    trl: dict[str, Any] = Field(default_factory=dict, description="passed through to trl.DPOConfig")


class PPOHyperparameters(Section):
    """Names and defaults follow "The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024)."""

    update_epochs: int = Field(2, ge=1, description="optimisation passes over each rollout batch "
                                                    "(train.epochs counts passes over the prompts)")
    minibatch_size: int = Field(4, ge=1, description="responses per gradient step; divides train.batch_size")
    cliprange: float = Field(0.2, gt=0, description="ε of the clipped policy ratio")
    cliprange_value: float = Field(0.2, gt=0, description="clip of the value update around the old value")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    gamma: float = Field(1.0, gt=0, le=1, description="GAE discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ")
    kl_coef: float = Field(0.05, ge=0, description="initial (adaptive) or fixed KL penalty coefficient")
    adaptive_kl: bool = Field(False, description="adapt kl_coef toward kl_target (Ziegler et al. 2019)")
    kl_target: float = Field(6.0, gt=0, description="adaptive only: target KL per response, in nats")
    kl_horizon: int = Field(10000, gt=0, description="adaptive only: controller horizon, in samples")
    temperature: float = Field(0.7, gt=0, description="rollout sampling temperature (log-probs use it too)")
    max_new_tokens: int = Field(64, ge=1, description="response length limit; it should cover the policy's replies, "
                                                      "or the missing-EOS penalty teaches brevity first")
    max_prompt_length: int = Field(256, ge=8, description="longer prompts keep their last tokens and are counted")
    missing_eos_penalty: float = Field(1.0, ge=0, description="subtracted from the score of a response cut off without EOS")
    value_init: Literal["reward", "zero"] = Field(
        "zero", description="value head start: zeros (V = 0), or the reward model's normalised score head read off "
                            "the policy's hidden states (measured worse on the demo)")
    merged_sampler: bool = Field(
        True, description="sample from a copy with the adapter merged, in the compute dtype (about 2x the tokens/s); "
                          "false samples through the adapter (always so for qlora and sharded training)")
    rollout_cache: Literal["dynamic", "static"] = Field(
        "dynamic", description="KV cache of the rollouts: static preallocates it, and on CUDA transformers "
                               "compiles the decode step for it (torch.compile); dynamic grows it per token")


class PPOTrainConfig(BudgetConfig):
    """PPO's budget: a step is one iteration (rollouts, scoring, `ppo.update_epochs` passes)."""

    max_steps: int = Field(20, description="PPO iterations; -1 means run `epochs` passes over the prompts")
    batch_size: int = Field(8, ge=1, description="prompts (rollouts) per iteration and process")
    learning_rate: float = Field(5e-5, gt=0, description="learning rate of the adapter and value head")
    save_steps: int = Field(5, ge=1, description="resumable state every N iterations")


class PPOConfig(StageConfig):
    model: str = "sft:latest"
    reward: str = Field("reward:latest", description="reward checkpoint ref (rlhf reward)")
    data: str = Field("prompts:latest", description="prompts dataset ref")
    eval_data: str | None = Field(None, description="held-out prompts ref; default: train.eval_fraction of `data`")
    output: ArtifactName = "ppo"
    mode: Literal["lora", "qlora"] = Field("lora", description="the policy's adapter: lora, or qlora (4-bit, CUDA)")
    lora: AdapterConfig = AdapterConfig()
    ppo: PPOHyperparameters = PPOHyperparameters()
    train: PPOTrainConfig = PPOTrainConfig()
    eval_every: int = Field(5, ge=1, description="evaluate on held-out prompts every N iterations")
    eval_prompts: int = Field(16, ge=1, description="held-out prompts per evaluation")
    samples_kept: int = Field(4, ge=0, description="sample responses kept per evaluation")
    padding_free: bool = Field(True, description="run the policy's decoder on each rollout batch packed into as few "
                                                 "rows as hold it, the first tokens rollouts share once, instead of "
                                                 "padded (checked on load); the reward model scores them so too")
    eval_gold: bool = Field(False, description="also score held-out answers with the demo's gold scorer "
                                           "(rlhf.judges.gold_score), which training never sees: the reward model's "
                                           "score beside it shows over-optimisation (Gao et al. 2022); meaningful on "
                                           "the demo's support domain only")

    @model_validator(mode="after")
    def _consistent(self) -> PPOConfig:
        if self.train.batch_size % self.ppo.minibatch_size:
            raise ValueError(f"train.batch_size={self.train.batch_size} must be a multiple of "
                             f"ppo.minibatch_size={self.ppo.minibatch_size}")
        # Settings the fixed controller would ignore. (Compared with the defaults, so a dumped config loads again.)
        default = PPOHyperparameters()
        if not self.ppo.adaptive_kl and (self.ppo.kl_target, self.ppo.kl_horizon) != (default.kl_target,
                                                                                        default.kl_horizon):
            raise ValueError("ppo.kl_target and ppo.kl_horizon apply only to the adaptive KL controller; "
                             "add ppo.adaptive_kl=true or remove them")
        return self


class OnlineTrainConfig(TrainConfig):
    """The budget of rloo and grpo: a step is one optimizer step on `batch_size` prompts, each
    answered `num_generations` times."""

    max_steps: int = Field(20, description="optimizer steps; -1 means run `epochs` passes over the prompts")
    batch_size: int = Field(4, ge=1, description="prompts per optimizer step and process (before grad_accum); "
                                                  "each is answered num_generations times")
    learning_rate: float = Field(5e-5, gt=0, description="learning rate of the adapter")
    save_steps: int = Field(5, ge=1, description="trainer checkpoint for resume every N steps")
    logging_steps: int = Field(1, ge=1, description="log reward, KL and length every N steps")


class OnlineRLConfig(StageConfig):
    """What rloo and grpo share: a LoRA policy samples a group of completions per prompt, the suite's
    reward model scores them, and each completion's advantage is its reward against its group's."""

    model: str = "sft:latest"
    reward: str = Field("reward:latest", description="reward checkpoint ref (rlhf reward)")
    data: str = Field("prompts:latest", description="prompts dataset ref")
    eval_data: str | None = Field(None, description="held-out prompts ref; default: train.eval_fraction of `data`")
    mode: Literal["lora", "qlora"] = Field("lora", description="the policy's adapter: lora, or qlora (4-bit, CUDA)")
    lora: AdapterConfig = AdapterConfig()
    train: OnlineTrainConfig = OnlineTrainConfig()
    num_generations: int = Field(4, ge=2, description="completions sampled per prompt: the group each is compared with")
    beta: float = Field(0.05, ge=0, description="KL coefficient toward the reference (the input policy, adapter off); "
                                                "0 drops the KL term and its measurement")
    temperature: float = Field(0.7, gt=0, description="sampling temperature (log-probs use it too)")
    max_new_tokens: int = Field(64, ge=1, description="completion length limit; it should cover the policy's replies")
    max_prompt_length: int = Field(256, ge=8, description="prompts longer than this (in tokens, chat template "
                                                          "included) are left out and counted")
    missing_eos_penalty: float = Field(1.0, ge=0, description="subtracted from the reward of a completion cut off "
                                                              "without EOS")
    eval_prompts: int = Field(16, ge=1, description="held-out prompts answered in each evaluation")
    eval_gold: bool = Field(False, description="also score held-out answers with the demo's gold scorer "
                                           "(rlhf.judges.gold_score), which training never sees: the reward model's "
                                           "score beside it shows over-optimisation (Gao et al. 2022); meaningful on "
                                           "the demo's support domain only")


class RLOOConfig(OnlineRLConfig):
    output: ArtifactName = "rloo"
    trl: dict[str, Any] = Field(default_factory=dict, description="passed through to trl.RLOOConfig "
                                                                  "(e.g. normalize_advantages, num_iterations)")


class GRPOConfig(OnlineRLConfig):
    output: ArtifactName = "grpo"
    trl: dict[str, Any] = Field(default_factory=dict, description="passed through to trl.GRPOConfig "
                                                                  "(e.g. loss_type, scale_rewards, num_iterations)")


class SamplingConfig(Section):
    temperature: float = Field(0.8, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: the smallest token set with this mass")
    max_new_tokens: int = Field(96, ge=1, description="response length limit")


class GenerateConfig(Section):
    model: str = Field("sft:latest", description="checkpoint ref to sample from")
    data: str = Field("prompts:latest", description="prompts dataset ref")
    output: ArtifactName = Field("candidates", description="dataset name: datasets/<output>/vK")
    k: int = Field(4, ge=1, description="responses sampled per prompt")
    sampling: SamplingConfig = SamplingConfig()
    batch_size: int = Field(8, ge=1, description="prompts per generate() call (each with k samples)")
    max_prompt_length: int = Field(512, ge=8, description="longer prompts keep their last tokens")
    limit: int | None = Field(None, ge=1, description="use only the first N prompts")
    seed: int = Field(0, description="sampling seed")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 weights where the hardware has bf16 matmuls, fp16 on a CUDA GPU without")


class ScoreConfig(Section):
    reward: str = Field("reward:latest", description="reward checkpoint ref (rlhf reward)")
    data: str = Field("candidates:latest", description="candidates dataset ref")
    output: ArtifactName | None = Field(None, description="dataset name for the scored copy; default: the input's name")
    batch_size: int = Field(16, ge=1, description="conversations per forward pass")


class CompareConfig(Section):
    models: list[str] = Field(min_length=2, description="checkpoint refs; given as positional arguments")
    data: str = Field("prompts:latest", description="held-out prompts dataset")
    judge: list[str] = Field(["gold"], description="gold, reward:<ref>, human:<ab_votes ref>; comma-separated")
    limit: int | None = Field(None, ge=1, description="use only the first N prompts")
    sampling: SamplingConfig = SamplingConfig(temperature=0.7)
    batch_size: int = Field(32, ge=1, description="prompts per generate() call")
    seed: int = Field(0, description="sampling and bootstrap seed")
    tie_margin: float = Field(0.0, ge=0, description="score differences up to this count as ties")
    bootstrap_samples: int = Field(1000, ge=100, description="resamples of the prompts for each CI")
    output: ArtifactName = Field("compare", description="report name: reports/<output>/vK")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 weights where the hardware has bf16 matmuls, fp16 on a CUDA GPU without")

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
        if not p.is_file() and not p.is_absolute() and p.parts[:1] == ("configs",):
            # The shipped configs, as the README names them, from any directory.
            p = PROJECT_CONFIGS.parent / p
        if not p.is_file():
            raise RlhfError(f"config file {path} not found; pass an existing YAML file to --config "
                            f"(the shipped ones are {PROJECT_CONFIGS}/<stage>.yaml)")
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


def _type_name(annotation: Any) -> str:
    """`int | None` -> `int|null`, `Literal['a', 'b']` -> `a|b`: the shape a user types."""
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "|".join(str(a).lower() if isinstance(a, bool) else str(a) for a in args)
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, __import__("types").UnionType):
        return "|".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{','.join(_type_name(a) for a in args)}]"
    return {type(None): "null"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _description(cls: type[BaseModel], name: str) -> str:
    """A field's description, or that of the field it overrides in a parent class."""
    for klass in cls.__mro__:
        f = getattr(klass, "model_fields", {}).get(name)
        if f is not None and f.description:
            return f.description
    return ""


def describe(cls: type[BaseModel]) -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) of every key `cls` accepts, nested sections flattened
    with the defaults the stage gives them (PPO's `train.max_steps` is 20, not TrainConfig's -1)."""
    rows: list[tuple[str, str, str, str]] = []

    def walk(klass: type[BaseModel], defaults: dict[str, Any] | None, prefix: str) -> None:
        for name, f in klass.model_fields.items():
            default = (defaults or {}).get(name, f.get_default(call_default_factory=True))
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, default.model_dump(mode="json") if isinstance(default, BaseModel) else default,
                     f"{prefix}{name}.")
                if ann.model_config.get("extra") == "allow":
                    rows.append((f"{prefix}{name}.<option>", "any", "", "passed to the library's own config class"))
                continue
            shown = "required" if f.is_required() else yaml.safe_dump(default, default_flow_style=True,
                                                                       width=10_000).strip().removesuffix("...").strip()
            rows.append((prefix + name, _type_name(ann), shown, _description(klass, name)))

    walk(cls, None, "")
    return rows


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
        elif err["type"] == "value_error":  # our validators' messages, which may name their key
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(msg if not loc or loc in msg else f"{loc}: {msg}")
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
