"""The device audit: precision chosen from the hardware, one QLoRA setting, inference on the model's device."""

from __future__ import annotations

import pytest
import torch

from rlhf import models
from rlhf.config import TrainConfig
from rlhf.errors import RlhfError
from rlhf.training import trainer_kwargs


@pytest.mark.parametrize("cuda, bf16, expected", [
    (True, True, "bf16"),    # A100, H100
    (True, False, "fp16"),   # T4, V100: fp16 tensor cores, no bf16
    (False, True, "bf16"),   # a CPU with AMX or AVX512-BF16
    (False, False, "fp32"),
])
def test_auto_precision_follows_the_hardware(monkeypatch, cuda, bf16, expected):
    monkeypatch.setattr(models, "cuda_available", lambda: cuda)
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: bf16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert models.resolve_precision("auto") == expected


def test_fp16_is_refused_without_a_gpu_and_bf16_without_the_units(monkeypatch):
    monkeypatch.setattr(models, "cuda_available", lambda: False)
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)
    with pytest.raises(RlhfError, match="precision=fp16 needs a CUDA GPU"):
        models.resolve_precision("fp16")
    with pytest.raises(RlhfError, match="no native bf16"):
        models.resolve_precision("bf16")


def test_fp16_training_is_mixed_precision_with_a_loss_scaler(tmp_path):
    kwargs = trainer_kwargs(TrainConfig(), tmp_path, "fp16", has_eval=False)
    assert kwargs["fp16"] is True and kwargs["bf16"] is False
    assert trainer_kwargs(TrainConfig(), tmp_path, "bf16", has_eval=False)["fp16"] is False


def test_policy_and_reward_model_load_qlora_with_one_and_the_same_setting(monkeypatch, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf.artifacts import ArtifactStore

    store = ArtifactStore(tmp_path / "ws")
    art = models.import_base(store, str(tiny_model_dir))
    seen = {}

    def capture(kind):
        def from_pretrained(path, **kwargs):
            seen[kind] = kwargs["quantization_config"].to_dict()
            raise StopIteration  # nothing to load: the setting is what is under test
        return from_pretrained

    monkeypatch.setattr(models, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", capture("policy"))
    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", capture("reward"))
    for load in (models.load_causal_lm, models.load_sequence_classifier):
        with pytest.raises(StopIteration):
            load(store, art, mode="qlora")
    assert seen["policy"] == seen["reward"]
    assert seen["policy"]["bnb_4bit_quant_type"] == "nf4" and seen["policy"]["bnb_4bit_use_double_quant"] is True
    assert seen["policy"]["bnb_4bit_compute_dtype"] == "bfloat16"


def test_generate_samples_with_the_model_prepared_for_inference(monkeypatch, tiny_ws):
    # `rlhf generate` (and `compare`, through it) once left the policy on the CPU of a GPU machine.
    from conftest import DEMO_DATA, rlhf

    prepared = []
    original = models.for_inference

    def recording(model, precision):
        prepared.append(precision)
        return original(model, precision)

    monkeypatch.setattr(models, "for_inference", recording)
    assert rlhf(tiny_ws, "data", "import", "prompts", str(DEMO_DATA / "support_prompts.jsonl")) == 0
    assert rlhf(tiny_ws, "generate", "model=base:latest", "k=1", "limit=2", "sampling.max_new_tokens=4", "precision=fp32") == 0
    assert prepared == ["fp32"]


def test_inference_weights_take_the_precision_dtype(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = models.for_inference(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and not model.training


@pytest.mark.parametrize("var", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_a_sharded_launch_without_gpus_is_refused_before_loading(monkeypatch, tiny_ws, capsys, var, stage):
    # accelerate on CPUs trains an FSDP launch as plain DDP (distributed MULTI_CPU): say so instead.
    from conftest import rlhf

    monkeypatch.setattr(models, "cuda_available", lambda: False)
    monkeypatch.setenv(var, "true")
    assert rlhf(tiny_ws, stage, "model=base:latest", "data=sft:latest") == 2
    err = capsys.readouterr().err
    assert "accelerate runs on CUDA GPUs only" in err and "--multi_gpu" in err
    assert not (tiny_ws / "checkpoints" / stage).exists() and not list((tiny_ws / ".scratch").glob("*"))
