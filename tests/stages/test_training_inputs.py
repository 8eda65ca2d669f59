"""Training stages off the demo's path: budgets and lengths that cannot work, outputs named badly,
interrupted and resumed runs, early stopping's report, and the memory the longest batch needs."""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext

import pytest
import torch

from conftest import DEMO_DATA, TINY_ARCHS, rlhf
from rlhf import training
from rlhf.artifacts import ArtifactStore

TINY = ["train.batch_size=4", "max_length=128"]


def nothing_written(ws) -> bool:
    return not (ws / "checkpoints" / "sft").exists() and not any((ws / ".scratch").glob("*"))


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_a_budget_of_no_steps_is_refused(tiny_ws, capsys, steps):
    assert rlhf(tiny_ws, "sft", f"train.max_steps={steps}") == 2
    err = capsys.readouterr().err.strip()
    assert f"train.max_steps={steps} trains nothing" in err and "-1" in err and "\n" not in err
    assert nothing_written(tiny_ws)


def test_an_invalid_output_name_is_refused_before_any_work(tiny_ws, capsys):
    for stage in ("sft", "reward", "dpo", "ppo", "generate", "compare"):
        extra = ["base:latest", "sft:latest"] if stage == "compare" else []
        assert rlhf(tiny_ws, stage, *extra, "output=../../x") == 2
        err = capsys.readouterr().err.strip()
        assert "output: artifact name '../../x' is not valid" in err, stage
    assert nothing_written(tiny_ws) and not (tiny_ws.parent.parent / "x").exists()


def test_sft_with_no_reply_left_under_max_length_fails_before_loading_and_leaves_nothing(tiny_ws, capsys,
                                                                                           monkeypatch):
    from rlhf import models

    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded"))
    assert rlhf(tiny_ws, "sft", "max_length=8") == 2
    err = capsys.readouterr().err.strip()
    assert "have prompts of max_length=8 tokens or more" in err and "raise max_length" in err and "\n" not in err
    assert nothing_written(tiny_ws)


def test_reward_with_every_pair_too_long_fails_before_loading_and_leaves_nothing(pref_ws, capsys, monkeypatch):
    from rlhf import models

    monkeypatch.setattr(models, "load_sequence_classifier", lambda *a, **k: pytest.fail("the model was loaded"))
    assert rlhf(pref_ws, "reward", "model=base:latest", "max_length=16", "truncation=drop") == 2
    err = capsys.readouterr().err.strip()
    assert "training pairs of datasets/preferences:v1 are longer than max_length=16" in err
    assert not (pref_ws / "checkpoints" / "reward").exists() and not any((pref_ws / ".scratch").glob("*"))


def test_sft_counts_the_examples_it_cuts_and_suggests_the_import_filter(tiny_ws, tmp_path, caplog):
    rows = [json.loads(line) for line in (DEMO_DATA / "support_sft.jsonl").read_text().splitlines()][:20]
    rows[0]["messages"][-1]["content"] = "word " * 4000  # one huge reply
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert rlhf(tiny_ws, "data", "import", "sft", str(tmp_path / "long.jsonl"), "--name", "long") == 0
    assert rlhf(tiny_ws, "sft", "data=long:latest", "train.max_steps=1", "train.eval_fraction=0.5",
                "train.batch_size=4", "max_length=1024") == 0
    m = ArtifactStore(tiny_ws).resolve("checkpoints/sft:latest").manifest["metrics"]
    assert m["train_rows_truncated"] + m["eval_rows_truncated"] == 1
    assert m["train_rows_dropped_too_long"] == m["eval_rows_dropped_too_long"] == 0
    assert "--max-tokens 1024" in caplog.text


def _interrupt_at(monkeypatch, hook: str, step: int) -> None:
    """Make the next training run raise KeyboardInterrupt (as Ctrl+C does) in `hook` at `step`."""
    from transformers import TrainerCallback

    real = training.callbacks

    class Interrupt(TrainerCallback):
        pass

    def interrupt(self, args, state, control, **kwargs):
        if state.global_step == step:
            monkeypatch.setattr(training, "callbacks", real)  # once
            raise KeyboardInterrupt

    setattr(Interrupt, hook, interrupt)
    monkeypatch.setattr(training, "callbacks", lambda train: real(train) + [Interrupt()])


def test_an_interrupted_run_says_how_to_resume_and_its_resumed_metrics_cover_the_whole_run(
        tiny_ws, tmp_path, monkeypatch, capsys):
    args = ["mode=full", "train.max_steps=6", "train.save_steps=2", "train.logging_steps=1", *TINY]
    clean = tmp_path / "clean"
    shutil.copytree(tiny_ws, clean)
    assert rlhf(clean, "sft", *args) == 0
    whole = ArtifactStore(clean).resolve("checkpoints/sft:latest").manifest["metrics"]

    _interrupt_at(monkeypatch, "on_step_begin", 5)  # checkpoint-4 saved, step 5 not done
    assert rlhf(tiny_ws, "sft", *args) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert rlhf(tiny_ws, "sft", *args) == 0
    m = ArtifactStore(tiny_ws).resolve("checkpoints/sft:latest").manifest["metrics"]
    assert m["resumed_from_step"] == 4 and m["steps"] == m["stopped_at_step"] == 6
    assert m["train_tokens"] == whole["train_tokens"]
    assert m["train_loss"] == pytest.approx(whole["train_loss"], rel=0.02)
    assert m["eval_loss"] == pytest.approx(whole["eval_loss"], rel=0.02)


def test_a_run_interrupted_after_its_last_step_resumes_to_the_same_step(tiny_ws, monkeypatch):
    args = ["train.max_steps=1", "train.save_steps=1", *TINY]
    _interrupt_at(monkeypatch, "on_train_end", 1)
    assert rlhf(tiny_ws, "sft", *args) == 130
    assert rlhf(tiny_ws, "sft", *args) == 0
    m = ArtifactStore(tiny_ws).resolve("checkpoints/sft:latest").manifest["metrics"]
    assert m["resumed_from_step"] == 1 and m["steps"] == m["stopped_at_step"] == 1
    assert m["train_tokens"] > 0 and m["train_loss"] > 0


def test_early_stopping_is_reported_only_when_patience_ran_out(tiny_ws, tmp_path):
    """The final evaluation after training is not one of the evaluations patience counts."""
    assert rlhf(tiny_ws, "data", "import", "sft", str(DEMO_DATA / "support_sft.jsonl"), "--name", "b") == 0
    assert rlhf(tiny_ws, "sft", "data=[sft:latest,b:latest]", "data_weights=[0.7,0.3]", "mode=freeze",
                "freeze.trainable_layers=2", "train.eval_steps=1", "train.early_stopping_patience=1",
                "train.max_steps=2", "train.learning_rate=1e-3", *TINY) == 0
    art = ArtifactStore(tiny_ws).resolve("checkpoints/sft:latest")
    evals = [e["eval_loss"] for e in map(json.loads, (art.path / "logs" / "train_log.jsonl").read_text().splitlines())
             if "eval_loss" in e]
    assert evals[1] < evals[0], "the setup needs the second evaluation to improve"
    assert art.manifest["metrics"]["stop_reason"] == "max_steps=2 reached"


def test_checkpointing_turns_on_only_when_the_longest_batch_would_not_fit(monkeypatch):
    from transformers import LlamaConfig

    # SmolLM2-135M's shape.
    smollm2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9)
    monkeypatch.setattr(training, "available_memory_bytes", lambda: 20 * 2**30)
    # The reward stage at its defaults on HH: 8 pairs = 16 sequences of up to 512 tokens.
    on, why = training.checkpointing_decision("auto", smollm2, 16, 512)
    assert on and "16 x 512 tokens" in why and "more than half the 20.0 GB free" in why
    # The demo's SFT: 8 rows of about 200 tokens.
    on, why = training.checkpointing_decision("auto", smollm2, 8, 200)
    assert not on and "less than half" in why
    assert training.checkpointing_decision(False, smollm2, 16, 512) == (False, "train.gradient_checkpointing=false")


def test_sft_records_its_checkpointing_choice(tiny_ws, monkeypatch):
    monkeypatch.setattr(training, "available_memory_bytes", lambda: 2**20)  # 1 MB free: must recompute
    assert rlhf(tiny_ws, "sft", "train.max_steps=2", *TINY) == 0
    m = ArtifactStore(tiny_ws).resolve("checkpoints/sft:latest").manifest["metrics"]
    assert m["gradient_checkpointing"]["enabled"] and m["gradient_checkpointing"]["reason"].startswith("auto:")
    assert m["eval_loss"] < m["eval_loss_initial"] * 1.01


def test_length_grouped_batches_pad_little_cover_every_row_once_and_keep_a_random_batch_order():
    import random

    from scipy.stats import spearmanr

    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(1001)]  # 1001: the last batch is short
    sampler = training.LengthGroupedBatches(lengths, batch_size=8, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(1001)) and len(sampler) == 1001
    batches = [order[i:i + 8] for i in range(0, 1001, 8)]
    assert len(batches[-1]) == 1  # the short batch comes last, so every other cut is a whole batch

    def padding(bs):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in bs)

    shuffled = list(range(1001))
    rng.shuffle(shuffled)
    assert padding(batches) < 0.1 * padding([shuffled[i:i + 8] for i in range(0, 1001, 8)])
    # Sorted within megabatches but not served in that order: a batch's length does not follow its
    # position (transformers' LengthGroupedSampler serves each megabatch longest first, rho = -1).
    longest = [max(lengths[i] for i in b) for b in batches[:-1]]
    assert abs(spearmanr(range(50), longest[:50]).statistic) < 0.3
    assert abs(spearmanr(range(len(longest)), longest).statistic) < 0.2
    # The same seed and epoch give the same order (a resumed run skips what it trained on).
    assert list(training.LengthGroupedBatches(lengths, 8, seed=3)) == order
    sampler.set_epoch(1)
    assert list(sampler) != order


@pytest.mark.parametrize("stage,ws", [("sft", "tiny_ws"), ("reward", "pref_ws"), ("dpo", "pref_ws")])
def test_each_trl_stage_batches_by_length_when_told_to(stage, ws, request, monkeypatch):
    made = []
    init = training.LengthGroupedBatches.__init__

    def record(self, lengths, *args, **kwargs):
        made.append(lengths)
        init(self, lengths, *args, **kwargs)

    monkeypatch.setattr(training.LengthGroupedBatches, "__init__", record)
    ws = request.getfixturevalue(ws)
    extra = ["model=base:latest", "train.batch_size=4", "max_length=256"] if stage != "sft" else TINY
    assert rlhf(ws, stage, *extra, "train.max_steps=1") == 0
    assert not made  # random batches by default
    assert rlhf(ws, stage, *extra, "train.max_steps=1", "train.group_by_length=true") == 0
    # One length per training row, as the trainer tokenised it (TRL's column names are read).
    assert len(made) == 1 and len(made[0]) > 8 and all(n > 0 for n in made[0])


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_an_adapter_dropout_trl_would_switch_off_is_refused_before_loading(pref_ws, capsys, monkeypatch, stage):
    from rlhf import models

    for loader in ("load_causal_lm", "load_sequence_classifier"):
        monkeypatch.setattr(models, loader, lambda *a, **k: pytest.fail("the model was loaded"))
    assert rlhf(pref_ws, stage, "model=base:latest", "lora.dropout=0.1") == 2
    err = capsys.readouterr().err.strip()
    assert "lora.dropout=0.1 would have no effect" in err and "trl.disable_dropout=false" in err and "\n" not in err
    assert not (pref_ws / "checkpoints" / stage).exists() and not any((pref_ws / ".scratch").glob("*"))


def test_an_adapter_dropout_is_kept_where_trl_is_told_to_keep_it():
    import trl

    from rlhf.config import RewardConfig, SFTConfig, load_config

    # SFT has no disable_dropout: its adapter dropout always applies.
    training.check_adapter_dropout(load_config(SFTConfig, None, ["lora.dropout=0.1"]), trl.SFTConfig)
    training.check_adapter_dropout(load_config(RewardConfig, None, ["lora.dropout=0.1", "trl.disable_dropout=false"]),
                                   trl.RewardConfig)
    training.check_adapter_dropout(load_config(RewardConfig, None, ["lora.dropout=0.1", "mode=full"]),
                                   trl.RewardConfig)


def test_first_fit_rows_put_the_longest_first_into_the_first_row_with_room():
    assert training.first_fit_rows([4, 3, 2, 5], 6) == [[3], [0, 2], [1]]
    assert training.first_fit_rows([7, 1], 6) == [[0], [1]]  # too long for any row: one of its own


def _tiny_decoder(arch: str):
    import transformers
    from transformers import AutoModelForCausalLM

    config_name, extra = TINY_ARCHS.get(arch, ("LlamaConfig", {"intermediate_size": 128, "num_key_value_heads": 2}))
    config = getattr(transformers, config_name)(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, pad_token_id=0, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()


def _logits_and_grads(model, rows_seen: list, ids=None, **packing):
    """Logits and gradients of a batch of right-padded rows (four random ones unless `ids` are given,
    0 padding), padded or (with `packing`) packed."""
    if ids is None:
        torch.manual_seed(1)
        ids = torch.randint(1, 100, (4, 12)) * (torch.arange(12) < torch.tensor([[12], [5], [9], [3]]))
    mask = (ids != 0).long()
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: rows_seen.append(tuple(a[0].shape)))
    with training.packed_backbone(model, **packing) if packing else nullcontext():
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits * mask[..., None]).sum().backward()
    hook.remove()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return logits[mask.bool()], grads


def assert_same_logits_and_grads(packed, padded) -> None:
    assert torch.allclose(packed[0], padded[0], atol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(packed[1], padded[1]))


@pytest.fixture
def kernel_lengths(monkeypatch) -> list[int]:
    """The sequence lengths that reach SDPA's kernel from here on."""
    seen: list[int] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *args, **kwargs: seen.append(q.shape[2]) or sdpa(q, *args, **kwargs))
    return seen


# The lengths the kernel sees in a packed forward, by the explicit-attention cap: none (every
# sequence by matmul and softmax), the two longer than 5 tokens, or all four.
KERNEL_LENGTHS = {128: [], 5: [12, 9], 0: [12, 5, 9, 3]}


@pytest.mark.parametrize("explicit_max", sorted(KERNEL_LENGTHS))
@pytest.mark.parametrize("arch", ["llama", *sorted(TINY_ARCHS)])
def test_packed_attention_runs_each_sequence_alone_in_one_row_and_gives_the_padded_gradients(
        arch, explicit_max, kernel_lengths, monkeypatch):
    model = _tiny_decoder(arch)
    decision = training.padding_free_decision(model, True)
    assert decision["enabled"] and decision["attention"] == "by sequence"
    rows: list = []
    padded = _logits_and_grads(model, rows)
    kernel_lengths.clear()  # the padded run's and the check's calls
    monkeypatch.setattr(training, "EXPLICIT_MAX_TOKENS", explicit_max)
    packed = _logits_and_grads(model, rows, by_sequence=True)
    assert rows == [(4, 12), (1, 12 + 5 + 9 + 3)]  # packed: one row, not a padding slot in it
    assert kernel_lengths == KERNEL_LENGTHS[explicit_max] * model.config.num_hidden_layers
    assert_same_logits_and_grads(packed, padded)
    assert model.config._attn_implementation == "sdpa"  # restored after the block


def _pairs_with_shared_prompts() -> torch.Tensor:
    """Right-padded rows as a batch of preference pairs brings them: prompts shared by two sides."""
    torch.manual_seed(2)
    a, b, c = (torch.randint(1, 100, (n,)).tolist() for n in (20, 9, 6))
    rows = [a,                     # a sequence of its own
            a[:18] + c[:4],        # its first 18 tokens: shared, the rest run after them
            b,                     # of its own
            a[:16],                # every token shared: nothing of its own to run
            b[:5] + c,             # 5 in common, fewer than SHARED_PREFIX_MIN_TOKENS: of its own
            a[:18] + c[:2] + b]    # 20 shared with the second row: 18 of them the first's
    return torch.tensor([r + [0] * (29 - len(r)) for r in rows])


@pytest.mark.parametrize("explicit_max", [128, 0])
@pytest.mark.parametrize("arch", ["llama", *sorted(TINY_ARCHS)])
def test_sequences_that_share_their_first_tokens_run_them_once_and_give_the_padded_gradients(
        arch, explicit_max, kernel_lengths, monkeypatch):
    # In float64: a shared token's gradient is the sum of its two sequences', and in fp32 the two
    # orders of summing differ by more than the padded run's tolerance.
    model = _tiny_decoder(arch).double()
    assert training.SHARED_PREFIX_MIN_TOKENS == 16
    ids = _pairs_with_shared_prompts()
    rows: list = []
    padded = _logits_and_grads(model, rows, ids)
    kernel_lengths.clear()
    monkeypatch.setattr(training, "EXPLICIT_MAX_TOKENS", explicit_max)
    packed = _logits_and_grads(model, rows, ids, by_sequence=True)
    assert rows == [(6, 29), (1, 20 + 4 + 9 + 11 + 9)]
    # Through the kernel, the second row's own 4 tokens are a query of 4 against 22 keys.
    assert kernel_lengths == ([20, 4, 9, 11, 9] if explicit_max == 0 else []) * model.config.num_hidden_layers
    assert_same_logits_and_grads(packed, padded)


def test_the_load_check_turns_padding_free_off_where_shared_tokens_are_not_attended_to(monkeypatch):
    # As a broken sharing would be: the tokens after a shared prefix attend only to each other.
    attention = training._attention_by_sequence
    monkeypatch.setattr(training, "_attention_by_sequence",
                        lambda *args, packed_prefixes=None, **kwargs: attention(*args, **kwargs))
    decision = training.padding_free_decision(_tiny_decoder("llama"), True)
    assert not decision["enabled"] and "see each other" in decision["reason"]


def test_a_packed_forward_without_gradients_runs_every_sequence_through_the_kernel(kernel_lengths):
    model = _tiny_decoder("llama")
    mask = (torch.arange(12) < torch.tensor([[12], [5]])).long()
    with torch.no_grad(), training.packed_backbone(model):
        model(input_ids=torch.randint(1, 100, (2, 12)) * mask, attention_mask=mask)
    assert kernel_lengths == [12, 5] * model.config.num_hidden_layers


def test_a_sliding_window_model_packs_rows_of_the_batch_width_with_its_mask():
    import transformers
    from transformers import AutoModelForCausalLM

    # Mistral attends through a window of 4 here, which only the mask keeps.
    config = transformers.MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
    assert training.padding_free_decision(model, True)["attention"] == "block mask"
    rows: list = []
    padded = _logits_and_grads(model, rows)
    packed = _logits_and_grads(model, rows, by_sequence=True)
    assert rows == [(4, 12), (3, 12)]
    assert_same_logits_and_grads(packed, padded)


def test_an_attention_that_drops_the_packed_lengths_falls_back_to_rows_of_the_batch_width(
        attention_drops_packed_lengths):
    model = _tiny_decoder("llama")
    decision = training.padding_free_decision(model, True)
    assert decision["enabled"] and decision["attention"] == "block mask"
    rows: list = []
    padded = _logits_and_grads(model, rows)
    packed = _logits_and_grads(model, rows, by_sequence=False)
    assert rows == [(4, 12), (3, 12)]  # first fit, longest first: [12], [9, 3], [5]
    assert_same_logits_and_grads(packed, padded)


@pytest.mark.parametrize("stage,ws", [("sft", "tiny_ws"), ("dpo", "pref_ws")])
def test_each_trl_stage_trains_padding_free_as_it_trains_padded(stage, ws, request, capsys):
    # In fp32 the packed decoder takes the same steps as the padded one.
    ws = request.getfixturevalue(ws)
    extra = ["model=base:latest", "train.batch_size=4", "max_length=256"] if stage != "sft" else TINY
    runs = {}
    for packed in ("true", "false"):
        assert rlhf(ws, stage, *extra, "train.max_steps=4", "train.logging_steps=1", "train.precision=fp32",
                    f"padding_free={packed}", f"output={stage}-{packed}") == 0
        art = ArtifactStore(ws).resolve(f"checkpoints/{stage}-{packed}:latest")
        log = [json.loads(line) for line in (art.path / "logs" / "train_log.jsonl").read_text().splitlines()]
        runs[packed] = art.manifest["metrics"], [e["loss"] for e in log if "loss" in e]
    (packed, packed_losses), (padded, padded_losses) = runs["true"], runs["false"]
    assert packed["padding_free"]["enabled"] and not padded["padding_free"]["enabled"]
    assert len(packed_losses) == 4 and packed_losses == pytest.approx(padded_losses, rel=1e-4)
    assert packed["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-4)
    capsys.readouterr()
    # TRL's own padding_free is the suite's key.
    assert rlhf(ws, stage, *extra, "trl.padding_free=true") == 2
    assert "set padding_free=... instead" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["llama", *sorted(TINY_ARCHS)])
def test_fused_lora_layers_train_as_peft_does_to_bf16_rounding_and_step_aside_where_they_must(arch, monkeypatch):
    import copy

    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import Linear as LoraLinear

    model = get_peft_model(_tiny_decoder(arch), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                           target_modules="all-linear"))
    adapted = [m for m in model.modules() if isinstance(m, LoraLinear)]
    with torch.no_grad():  # a trained adapter, so its product counts, and biases that count (Qwen2, GPT-NeoX)
        for m in adapted:
            m.lora_B["default"].weight.normal_(0, 0.1)
            if m.base_layer.bias is not None:
                m.base_layer.bias.normal_(0, 0.1)
    ids = torch.randint(1, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    calls = []
    real = training._lora_linear()

    class Counted(real):
        @staticmethod
        def forward(ctx, *args):
            calls.append(1)
            return real.forward(ctx, *args)

    monkeypatch.setattr(training, "_lora_linear", lambda: Counted)

    def loss_and_grads(net, autocast=True):
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach().double(), torch.cat([p.grad.double().flatten() for p in net.parameters() if p.requires_grad])

    exact = loss_and_grads(copy.deepcopy(model).double(), autocast=False)
    error = lambda got: (float((got[0] - exact[0]).abs()), float((got[1] - exact[1]).norm() / exact[1].norm()))
    peft_error = error(loss_and_grads(model))
    head = model.get_output_embeddings()
    with training.fused_lora_on_cpu(model) as n:
        fused = loss_and_grads(model)
        fused_error = error(fused)
        assert n == len(adapted) and len(calls) == len(adapted)  # every adapted layer, once per forward
        assert "forward" in head.__dict__  # the frozen LM head from its kept bf16 copy (the logits below)
        # Off the fused path: the reference pass (adapter off) and fp32 run peft's own forward, bit for bit.
        with torch.no_grad(), model.disable_adapter(), torch.autocast("cpu", dtype=torch.bfloat16):
            reference = model(input_ids=ids).logits
        fp32 = loss_and_grads(model, autocast=False)
        assert len(calls) == len(adapted)
    assert not any("forward" in m.__dict__ for m in [*adapted, head])  # their own forwards again after the block
    with torch.no_grad(), model.disable_adapter(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(reference, model(input_ids=ids).logits)
    assert all(torch.equal(a, b) for a, b in zip(fp32, loss_and_grads(model, autocast=False)))
    with training.fused_lora_on_cpu(model, keep_weights=False):  # a copy per forward computes the same
        assert all(torch.equal(a, b) for a, b in zip(fused, loss_and_grads(model)))
    # The same bf16 matmuls: as close to the float64 loss and gradients as peft's own (a wrong scale,
    # transpose or missing bias would be off by the adapter's whole contribution).
    assert fused_error[0] <= max(2 * peft_error[0], 2e-3) and fused_error[1] <= max(1.5 * peft_error[1], 2e-2)
