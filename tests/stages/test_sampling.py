"""`rlhf/sampling.py`, the one sampler of generate, compare, PPO and DPO's KL check: its layout,
its log-probs, and that it moves its inputs to the model's device itself."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import DEMO_DATA, TINY_ARCHS
from rlhf import sampling, training


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tokenizer


def prompts(n: int) -> list:
    lines = (DEMO_DATA / "support_prompts.jsonl").read_text().splitlines()[:n]
    return [json.loads(line)["prompt"] for line in lines]


def test_pad_puts_tokens_on_the_requested_side():
    ids, mask = sampling.pad([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = sampling.pad([[5, 6, 7], [8]], pad_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_long_prompts_keep_their_end_and_are_counted(tiny):
    _, tokenizer = tiny
    full, _, cut = sampling.encode_prompts(tokenizer, prompts(3), max_prompt_length=10_000)
    short, mask, cut_short = sampling.encode_prompts(tokenizer, prompts(3), max_prompt_length=8)
    assert cut == 0 and cut_short == 3 and short.shape == (3, 8) and bool(mask.all())
    assert short[:, -8:].tolist() == full[:, -8:].tolist()  # every prompt ends in the generation prompt


def test_k_samples_per_prompt_come_prompt_major_and_greedy_repeats_one(tiny):
    model, tokenizer = tiny
    ids, mask, _ = sampling.encode_prompts(tokenizer, prompts(2), 256)
    torch.manual_seed(0)
    rollout = sampling.sample(model, tokenizer, ids, mask, max_new_tokens=6, temperature=1.0, k=3)
    assert rollout.response_ids.shape[0] == 6 and torch.equal(rollout.prompt_ids, ids.repeat_interleave(3, dim=0))
    greedy = sampling.sample(model, tokenizer, ids, mask, max_new_tokens=6, temperature=0.0, k=2)
    assert torch.equal(greedy.response_ids[0], greedy.response_ids[1])
    assert torch.equal(greedy.response_ids[2], greedy.response_ids[3])
    # After the first EOS a row holds padding, masked out.
    pad_id = tokenizer.pad_token_id
    assert bool((rollout.response_ids[rollout.response_mask == 0] == pad_id).all())


def test_inverse_transform_sampling_draws_from_the_distribution_and_never_a_cut_token():
    """20,000 draws from two rows: the frequencies fit the probabilities (chi-square), and a
    token of probability 0 (what top-p leaves a cut token) never comes up."""
    from scipy.stats import chisquare

    p = torch.tensor([[0.5, 0.25, 0.125, 0.0, 0.125], [0.0, 0.0, 0.9, 0.09, 0.01]])
    torch.manual_seed(0)
    draw = sampling.InverseTransformSampling()
    drawn = torch.stack([draw(None, p.log().repeat(1000, 1)).argmax(-1).view(1000, 2) for _ in range(10)]).view(-1, 2)
    for row in range(2):
        counts = torch.bincount(drawn[:, row], minlength=5)
        assert counts[p[row] == 0].sum() == 0
        seen = p[row] > 0
        assert chisquare(counts[seen].numpy(), p[row][seen].numpy() * len(drawn)).pvalue > 1e-3
    # The chosen token is the only one left: greedy decoding emits it.
    out = draw(None, p.log())
    assert bool(((out == 0).sum(-1) == 1).all()) and bool((out[out != 0] == float("-inf")).all())


def test_response_logprobs_are_the_sampling_distribution(tiny):
    """The log-probs of the one-pass response forward equal those `generate` sampled from,
    step by step with the KV cache, left padding included."""
    model, tokenizer = tiny
    ids, mask, _ = sampling.encode_prompts(tokenizer, prompts(3), 256)
    assert not bool(mask.all())  # prompts of different lengths: some rows are left-padded
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **sampling.sampling_kwargs(0.7))
    response = out.sequences[:, ids.shape[1]:]
    # The raw logits over the temperature (top_p 1): the distribution each token was drawn from.
    expected = torch.stack([(s / 0.7).log_softmax(-1).gather(-1, response[:, [t]]).squeeze(-1)
                            for t, s in enumerate(out.logits)], dim=1)
    m, has_eos = sampling.response_mask(response, tokenizer.eos_token_id)
    rollout = sampling.Rollout(ids, mask, response.masked_fill(m == 0, tokenizer.pad_token_id), m, has_eos)
    got = sampling.forward_response(model, rollout, temperature=0.7)["logprobs"]
    assert torch.allclose(got[m.bool()], expected[m.bool()], atol=1e-4)


def test_a_rollout_packed_gives_the_logprobs_and_hidden_states_it_gives_padded(tiny):
    """PPO's forward over a rollout (left-padded prompts, right-padded replies), padding-free."""
    model, tokenizer = tiny
    # One long prompt and three short ones, so the short rows share packed rows.
    long = [{"role": "user", "content": " ".join(["My order has not arrived yet."] * 8)}]
    short = [[{"role": "user", "content": w}] for w in ("Hi", "Refund?", "Thanks")]
    ids, mask, _ = sampling.encode_prompts(tokenizer, [long, *short], 256)
    torch.manual_seed(0)
    m = (torch.arange(7) < torch.tensor([[5], [2], [7], [3]])).float()
    response = torch.randint(3, 100, (4, 7)).masked_fill(m == 0, tokenizer.pad_token_id)
    rollout = sampling.Rollout(ids, mask, response, m, torch.zeros(4, dtype=torch.bool))
    rows = []
    hook = model.get_input_embeddings().register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    with torch.no_grad():
        padded = sampling.forward_response(model, rollout, 0.7, with_hidden=True)
        with training.packed_backbone(model):
            packed = sampling.forward_response(model, rollout, 0.7, with_hidden=True)
    hook.remove()
    assert rows[0] == 4 and rows[1] < 4  # the second pass ran packed
    keep = m.bool()
    assert torch.allclose(packed["logprobs"][keep], padded["logprobs"][keep], rtol=1e-4, atol=1e-5)
    assert torch.allclose(packed["hidden"][keep], padded["hidden"][keep], rtol=1e-4, atol=1e-5)


def test_the_response_forward_reads_the_logits_and_last_hidden_state_of_the_positions_before_each_token(tiny):
    """forward_response projects only the R positions that predict the response, and takes the value
    head's input at the LM head: the same tensors as a full forward with every hidden state, sliced;
    also where the model projects every position anyway (the bench's plain baseline)."""
    model, tokenizer = tiny
    ids, mask, _ = sampling.encode_prompts(tokenizer, prompts(3), 256)
    torch.manual_seed(0)
    rollout = sampling.sample(model, tokenizer, ids, mask, max_new_tokens=5, temperature=1.0)
    R = rollout.response_ids.shape[1]
    with torch.no_grad():
        attn = rollout.attention_mask
        full = model(input_ids=rollout.input_ids, attention_mask=attn, position_ids=sampling.position_ids(attn),
                     output_hidden_states=True)
        got = sampling.forward_response(model, rollout, 0.7, with_hidden=True)
        forward = model.forward

        def every_position(*args, logits_to_keep, **kwargs):  # as the bench's baseline: all projected, then kept
            out = forward(*args, **kwargs)
            out.logits = out.logits[:, logits_to_keep]
            return out

        model.forward = every_position
        try:
            every = sampling.forward_response(model, rollout, 0.7, with_hidden=True)
        finally:
            del model.forward
    logits, hidden = full.logits[:, -R - 1:-1], full.hidden_states[-1][:, -R - 1:-1]
    assert torch.allclose(got["logits"], logits, atol=1e-5) and torch.equal(got["hidden"], hidden)
    assert torch.equal(every["hidden"], hidden) and "hidden" not in sampling.forward_response(model, rollout)
    expected = (logits / 0.7).log_softmax(-1).gather(-1, rollout.response_ids[..., None]).squeeze(-1)
    assert torch.allclose(got["logprobs"], expected, atol=1e-5)


def test_only_one_run_of_tokens_per_row_counted_from_zero_is_packed():
    left, right = torch.tensor([[0, 1, 1], [1, 1, 1]]), torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert training._spans(left, None) == ([1, 0], [2, 3])
    assert training._spans(right, sampling.position_ids(right)) == ([0, 0], [2, 1])
    assert training._spans(torch.tensor([[1, 0, 1]]), None) is None  # padding inside a row
    assert training._spans(right, torch.tensor([[5, 6, 7], [5, 6, 7]])) is None  # positions of its own


class OnMeta(torch.nn.Module):
    """A model whose weights sit on another device (`meta`, so the test runs on any machine):
    it refuses inputs that were left behind on the CPU."""

    def __init__(self, vocab: int = 11):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(vocab, device="meta"))

    def _check(self, *tensors):
        assert all(t.device.type == "meta" for t in tensors), [t.device for t in tensors]

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        self._check(input_ids, attention_mask)
        return torch.cat([input_ids, torch.empty(len(input_ids), max_new_tokens, dtype=torch.long, device="meta")], 1)

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep, **_):
        self._check(input_ids, attention_mask, position_ids)
        kept = len(logits_to_keep) if isinstance(logits_to_keep, torch.Tensor) else logits_to_keep  # positions or a count
        logits = torch.empty(*input_ids.shape[:1], kept, len(self.weight), device="meta")
        return type("Out", (), {"logits": logits})()


def test_sampling_moves_cpu_inputs_to_the_models_device(tiny):
    _, tokenizer = tiny
    ids, mask, _ = sampling.encode_prompts(tokenizer, prompts(2), 256)
    assert ids.device.type == "cpu"
    model = OnMeta()
    rollout = sampling.sample(model, tokenizer, ids, mask, max_new_tokens=4, temperature=1.0, k=2)
    assert rollout.response_ids.device.type == "meta"
    cpu_rollout = sampling.Rollout(  # a rollout a caller built on the CPU ...
        ids, mask, torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4), torch.zeros(2, dtype=torch.bool))
    out = sampling.forward_response(model, cpu_rollout)  # ... is moved too
    assert out["logprobs"].shape == (2, 4) and out["logprobs"].device.type == "meta"


def test_a_static_cache_samples_what_the_dynamic_one_does(tiny):
    # The static cache (compiled on CUDA) pads prompts to a 64-token bucket: the same greedy
    # replies, and the same log-probs of them, as the growing cache without the extra padding.
    model, tokenizer = tiny
    ids, mask, _ = sampling.encode_prompts(tokenizer, prompts(3), 256)
    dynamic = sampling.sample(model, tokenizer, ids, mask, max_new_tokens=8, temperature=0.0)
    static = sampling.sample(model, tokenizer, ids, mask, max_new_tokens=8, temperature=0.0, cache="static")
    assert static.prompt_ids.shape[1] % sampling.STATIC_PROMPT_BUCKET == 0
    assert torch.equal(static.prompt_ids[:, -ids.shape[1]:], ids) and static.prompt_mask.sum() == mask.sum()
    assert torch.equal(static.response_ids, dynamic.response_ids)
    assert torch.allclose(sampling.forward_response(model, static)["logprobs"] * static.response_mask,
                          sampling.forward_response(model, dynamic)["logprobs"] * dynamic.response_mask, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", *sorted(TINY_ARCHS)])
def test_packed_linear_weights_sample_the_same_tokens_and_follow_a_weight_change(arch, tiny, monkeypatch):
    """A model whose linear layers compute through oneDNN-packed weights samples the plain
    model's tokens from the same seed (bf16: bit for bit; fp32: logits to rounding), falls back
    to the plain layer where a gradient is asked for, and packed again after its weights
    change, follows them."""
    import transformers
    from transformers import AutoModelForCausalLM

    from rlhf import models

    _, tokenizer = tiny
    config_name, extra = TINY_ARCHS.get(arch, ("LlamaConfig", {"intermediate_size": 128, "num_key_value_heads": 2}))
    config = getattr(transformers, config_name)(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, pad_token_id=tokenizer.pad_token_id,
                                                eos_token_id=tokenizer.eos_token_id, initializer_range=0.1, **extra)
    ids, mask, _ = sampling.encode_prompts(tokenizer, prompts(4), 256)
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or real(*a), raising=False)
    for precision in ("bf16", "fp32"):
        torch.manual_seed(0)
        plain = AutoModelForCausalLM.from_config(config).to(models.torch_dtype(precision)).eval()
        packed = AutoModelForCausalLM.from_config(config)
        packed.load_state_dict(plain.state_dict())
        rng = torch.get_rng_state()
        if not sampling.pack_linear_weights(packed.to(plain.dtype).eval()):
            # Only bf16 on a CPU without native bf16 may go unpacked: it samples in fp32 there.
            assert precision == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported()
            continue
        assert torch.equal(rng, torch.get_rng_state()), "packing must not move the sampler's seeded stream"
        linears = [m for m in packed.modules() if type(m) is torch.nn.Linear]
        assert linears and all(hasattr(m, "_packed_weight") for m in linears)
        assert set(packed.state_dict()) == set(plain.state_dict())  # nothing extra would be saved
        calls.clear()
        with torch.no_grad():
            want, got = plain(input_ids=ids).logits.float(), packed(input_ids=ids).logits.float()
        assert len(calls) == len(linears), "every linear layer must run packed"
        tol = 0 if precision == "bf16" else 1e-5
        assert (got - want).abs().max() <= tol * want.abs().max(), (precision, (got - want).abs().max())
        outs = []
        for model in (plain, packed):
            torch.manual_seed(1)
            outs.append(sampling.sample(model, tokenizer, ids, mask, max_new_tokens=8, temperature=1.0).response_ids)
        if precision == "bf16":
            assert torch.equal(outs[0], outs[1])
        # With gradients on, the plain layer runs, and they flow.
        calls.clear()
        packed.lm_head.weight.requires_grad_(True)
        packed(input_ids=ids).logits.float().sum().backward()
        assert not calls and packed.lm_head.weight.grad is not None
        # New weights: the stale packed copies would give the old logits; packed again, the new ones.
        with torch.no_grad():
            for model in (plain, packed):
                for m in model.modules():
                    if type(m) is torch.nn.Linear:
                        m.weight.mul_(-1.5)
            want = plain(input_ids=ids).logits.float()
            stale = packed(input_ids=ids).logits.float()
            sampling.pack_linear_weights(packed)
            got = packed(input_ids=ids).logits.float()
        assert (stale - want).abs().max() > 0.1 * want.abs().max()
        assert (got - want).abs().max() <= tol * want.abs().max()
