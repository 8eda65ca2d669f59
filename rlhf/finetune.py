"""Training modes the fine-tuning stages share: which weights of a model train.

    lora / qlora  a LoRA adapter from the `lora:` section (qlora: on 4-bit weights, CUDA only)
    peft          any peft method, `peft.method=ia3|prompt_tuning|loha|...`; the other `peft.*`
                  keys go to that method's config class, which validates them
    freeze        the base is frozen except the top `freeze.trainable_layers` blocks and the
                  head (layer-wise fine-tuning; 0 layers = feature extraction)
    full          every weight

Everything that can be wrong with a mode (a key peft does not know, a value it rejects, more
layers than the model has) is found by `check` before a model is loaded.
"""

from __future__ import annotations

from typing import Any

from rlhf.artifacts import Artifact, ArtifactStore
from rlhf.config import check_passthrough
from rlhf.errors import RlhfError

# Fields of every peft config that the stage sets itself, or that only peft's own saving uses.
RESERVED_PEFT_KEYS = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                      "revision", "inference_mode"}


def peft_config(cfg, task_type: str):
    """The peft config for an adapter mode (`None` for full and freeze), validated by peft itself.

    `task_type` is "CAUSAL_LM" for a policy, "SEQ_CLS" for a reward model: with SEQ_CLS peft
    keeps the new `score` head fully trainable next to the adapter.
    """
    if cfg.mode in ("lora", "qlora"):
        from peft import LoraConfig

        return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=cfg.lora.target_modules, task_type=task_type)
    if cfg.mode != "peft":
        return None
    config_cls = peft_method_class(cfg.peft.method)
    options = cfg.peft.options
    if reserved := sorted(RESERVED_PEFT_KEYS & set(options)):
        raise RlhfError(f"config: peft.{reserved[0]} is set by the stage itself; remove it")
    check_passthrough("peft", options, config_cls)
    try:
        return config_cls(task_type=task_type, **options)
    except (TypeError, ValueError) as e:
        raise RlhfError(f"config: peft.method={cfg.peft.method} rejects these options: {_one_line(e)} "
                        f"(see the fields of peft.{config_cls.__name__})") from None


def peft_method_class(method: str) -> type:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    by_name = {str(t.value).lower(): cls for t, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    if method.lower() not in by_name:
        import difflib

        close = difflib.get_close_matches(method.lower(), sorted(by_name), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise RlhfError(f"config: peft.method={method} is not a peft method; {hint}"
                        f"choose one of {', '.join(sorted(by_name))}")
    return by_name[method.lower()]


def check(cfg, store: ArtifactStore, model: Artifact, task_type: str) -> None:
    """Fail before any work on a mode setting that cannot work with this model."""
    peft = peft_config(cfg, task_type)
    if peft is not None and peft.is_prompt_learning:
        # Virtual tokens live outside the weights, so there is nothing to fold them into.
        if getattr(cfg, "merge", False):
            raise RlhfError(f"config: peft.method={cfg.peft.method} learns virtual tokens, which cannot be merged "
                            "into the weights; remove merge=true")
        if task_type == "SEQ_CLS":
            raise RlhfError(f"config: a reward model is saved merged into one classifier, and peft.method="
                            f"{cfg.peft.method} cannot be merged; use a weight adapter (lora, ia3, loha, ...)")
    if cfg.mode == "freeze":
        n_layers = num_layers(store, model)
        if cfg.freeze.trainable_layers > n_layers:
            raise RlhfError(f"config: freeze.trainable_layers={cfg.freeze.trainable_layers} but {model.ref} has "
                            f"{n_layers} transformer blocks; use a value from 0 to {n_layers} "
                            f"(or mode=full to train them all)")


def num_layers(store: ArtifactStore, art: Artifact) -> int:
    """Transformer blocks of a checkpoint, read from its config (an adapter's from its base's)."""
    from rlhf.models import model_config

    return model_config(store, art).get_text_config().num_hidden_layers


# -- freeze ----------------------------------------------------------------------------------


def transformer_blocks(model):
    """The model's stack of transformer blocks: the ModuleList as long as `num_hidden_layers`."""
    import torch

    n = model.config.get_text_config().num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise RlhfError(f"cannot find the {n} transformer blocks of {type(model).__name__}; "
                    "use mode=peft or mode=full for this architecture")


def freeze(model, trainable_layers: int, head: bool = True) -> dict[str, Any]:
    """Freeze everything except the top `trainable_layers` blocks and (with `head`) the head.

    The head is the output layer (an LM head, or a reward model's `score`) plus the final norm
    that feeds it: the base model's parameters outside the blocks and the embeddings. A head
    tied to the input embeddings is the same tensor, so those train with it.
    Returns what was left trainable, for the manifest.
    """
    import torch

    blocks = transformer_blocks(model)
    model.requires_grad_(False)
    for block in blocks[len(blocks) - trainable_layers:] if trainable_layers else []:
        block.requires_grad_(True)
    if head:
        base = getattr(model, model.base_model_prefix)
        in_blocks = {id(p) for p in blocks.parameters()}
        embeddings = {id(p) for m in base.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
        for p in base.parameters():  # the final norm
            if id(p) not in in_blocks and id(p) not in embeddings:
                p.requires_grad_(True)
        for name, p in model.named_parameters():  # lm_head / score, outside the base model
            if not name.startswith(model.base_model_prefix + "."):
                p.requires_grad_(True)
        out = model.get_output_embeddings()
        if out is not None:
            out.weight.requires_grad_(True)
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    return {"trainable_layers": trainable_layers, "of_layers": len(blocks), "head": head,
            "head_tied_to_embeddings": head and tied and model.get_output_embeddings() is not None}


def prepare(cfg, model, task_type: str):
    """Apply the config's mode to a loaded model: freeze it, or return the peft config to wrap it with.

    Returns (peft config or None, facts for the manifest).
    """
    facts: dict[str, Any] = {"mode": cfg.mode}
    if cfg.mode == "freeze":
        facts["freeze"] = freeze(model, cfg.freeze.trainable_layers, cfg.freeze.head)
    if cfg.mode == "peft":
        facts["peft_method"] = cfg.peft.method.lower()
    return peft_config(cfg, task_type), facts


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())
