"""The one way to sample: encode prompts, batched KV-cache sampling, response log-probs, decoding.

`rlhf generate`, compare, PPO's rollouts and DPO's KL check all sample through here, and the
reward judge pads through `pad`. Sequences are laid out as [left-padded prompt | right-padded
response], so every row's response starts at column `P` (the prompt width) and one forward pass
serves the batch. Position ids are derived from the attention mask so left padding does not
shift positions: generation (which does the same internally) and the training forward then
agree token for token.

Every function that hands tensors to a model first moves them to that model's device, so no
caller can forget to (a CPU prompt reaching a CUDA model is the classic crash).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

Messages = list[dict[str, str]]


@dataclass
class Rollout:
    """One batch of sampled responses. Shapes: (B, P) prompt, (B, R) response."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor  # float, 1 on response tokens up to and including the first EOS
    has_eos: torch.Tensor  # bool (B,)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask.long()], dim=1)

    def to(self, device) -> Rollout:
        return Rollout(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def device_of(model) -> torch.device:
    """Where the model's weights are (a PEFT wrapper or a plain module alike)."""
    return next(model.parameters()).device


def pad(sequences: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token lists padded to the longest, on the `left` or the `right`."""
    width = max(len(x) for x in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, x in enumerate(sequences):
        cols = slice(width - len(x), width) if side == "left" else slice(0, len(x))
        ids[i, cols] = torch.tensor(x, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def encode_prompts(tokenizer, prompts: list[Messages], max_prompt_length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-padded prompt ids and mask, and how many prompts were cut to `max_prompt_length`.

    Long prompts keep their end (the latest turns, where the question is).
    """
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    truncated = sum(len(x) > max_prompt_length for x in ids)
    input_ids, mask = pad([x[-max_prompt_length:] for x in ids], tokenizer.pad_token_id, side="left")
    return input_ids, mask, truncated


def response_mask(response_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, has_eos): mask is 1 up to and including each row's first EOS, 0 after it."""
    is_eos = response_ids == eos_token_id
    # Tokens strictly after the first EOS have a cumulative EOS count ≥ 1 before them.
    after_eos = (torch.cumsum(is_eos, dim=1) - is_eos.long()) > 0
    return (~after_eos).float(), is_eos.any(dim=1)


class InverseTransformSampling:
    """A `generate` logits processor that draws each row's next token by inverse transform
    sampling and leaves it the only choice, so greedy decoding emits it.

    `generate`'s own sampling draws with `torch.multinomial`, which for one sample computes
    argmax(p / E) over a fresh exponential variate E per vocabulary entry: on a CPU, 49k
    exponentials a row took 20% of a SmolLM2-135M decoding step (profile in the README,
    Performance). One uniform per row against the cumulative probabilities draws from the
    same distribution. A token of probability 0 (cut by top-p) can never be drawn: its
    cumulative value equals its predecessor's, and the first value above the draw is taken.
    """

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cdf = scores.softmax(-1, dtype=torch.float32).double().cumsum(-1)  # float64: the tail stays exact
        u = torch.rand(len(cdf), 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


def sampling_kwargs(temperature: float, top_p: float = 1.0) -> dict[str, Any]:
    """`generate` settings: temperature 0 is greedy; otherwise pure nucleus sampling, drawn by
    `InverseTransformSampling`. Both decode greedily, so none of the checkpoint's
    generation_config sampling settings (its top_k, say) can narrow the distribution behind
    the caller's back: only the temperature and top-p given here shape it."""
    if temperature <= 0:
        return {"do_sample": False}
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    shape = [TemperatureLogitsWarper(temperature), *([TopPLogitsWarper(top_p)] if top_p < 1 else [])]
    return {"do_sample": False, "logits_processor": LogitsProcessorList([*shape, InverseTransformSampling()])}


def _packed_linear(self, x: torch.Tensor) -> torch.Tensor:
    """`nn.Linear.forward` through the weight `pack_linear_weights` packed; the plain one where
    a gradient could be asked for or the input is in another dtype (the packed kernel has no
    backward and no autocast)."""
    if torch.is_grad_enabled() or x.dtype != self._packed_weight.dtype:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight, self.bias, "none", [], "")


def pack_linear_weights(model) -> bool:
    """Give every plain linear layer of an inference-only CPU model a copy of its weight in
    oneDNN's blocked layout, and compute through it; True if it did.

    A bf16 or fp32 linear layer on a CPU reorders its weight into that layout at every call.
    For the prompt that is a small part of a large matmul; for a decoding step, a few rows
    against the whole weight, it is most of the call: one 576→1536 layer at 16 rows took 188
    against 116 µs in bf16 and 415 against 217 µs in fp32 (a 2-core AMD EPYC with
    AVX512-BF16). The packed layer runs the same bf16 kernel, so the sampled tokens are the
    same bit for bit (fp32 differs by rounding, about 1e-6 of the output's scale).

    The weights stay as they are, so the packed copies are extra memory, a second copy of the
    linear weights; after the weights change, call this again (`ppo/rollout.py: sync_sampler`).
    Nothing is packed on a GPU, in a torch without oneDNN, in fp16, or where the packed
    layer would not give the plain layer's output.
    """
    from torch import nn

    linears = [m for m in model.modules() if type(m) is nn.Linear]
    if not linears or device_of(model).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    dtype = linears[0].weight.dtype
    if dtype not in (torch.float32, torch.bfloat16) or (
            dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    with torch.no_grad():
        try:
            # The hint is the rows of a decoding step; any other number of rows works too.
            packed = [torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 16) for m in linears]
            # Its own generator: packing must not move the seeded stream the sampler draws from.
            probe = torch.randn(3, linears[0].in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
            got = torch.ops.mkldnn._linear_pointwise(probe, packed[0], linears[0].bias, "none", [], "")
        except RuntimeError:  # an op this torch build lacks
            return False
        want = torch.nn.functional.linear(probe, linears[0].weight, linears[0].bias)
    if not torch.allclose(got.float(), want.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-4, atol=1e-4):
        return False
    for m, weight in zip(linears, packed):
        m._packed_weight = weight  # an attribute, not a buffer: state_dict and saving are untouched
        m.forward = _packed_linear.__get__(m)
    return True


# Static-cache prompts are left-padded to a multiple of this, so a run compiles few shapes.
STATIC_PROMPT_BUCKET = 64


@torch.no_grad()
def sample(model, tokenizer, prompt_ids, prompt_mask, max_new_tokens: int, temperature: float,
           top_p: float = 1.0, k: int = 1, cache: str = "dynamic") -> Rollout:
    """Sample `k` responses per prompt with the KV cache, the whole batch at once.

    The rollout's rows are prompt-major (prompt 0's k samples first) and live on the model's
    device. Greedy decoding is deterministic, so it decodes once and repeats each row k times.

    `cache="static"` preallocates the KV cache at its final size, which transformers then
    compiles the decode step for with torch.compile on CUDA (fewer, fused kernels per token);
    a compiled step is reused only for the shape it was compiled for, so the prompts are first
    left-padded to a multiple of STATIC_PROMPT_BUCKET tokens.
    """
    device = device_of(model)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    extra: dict[str, Any] = {}
    if cache == "static":
        short = -prompt_ids.shape[1] % STATIC_PROMPT_BUCKET
        prompt_ids = torch.nn.functional.pad(prompt_ids, (short, 0), value=tokenizer.pad_token_id)
        prompt_mask = torch.nn.functional.pad(prompt_mask, (short, 0), value=0)
        extra["cache_implementation"] = "static"
    k_times = lambda t: t.repeat_interleave(k, dim=0)  # prompt-major: prompt 0's k rows first
    greedy = temperature <= 0
    if not greedy:
        prompt_ids, prompt_mask = k_times(prompt_ids), k_times(prompt_mask)
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         **sampling_kwargs(temperature, top_p), **extra)
    if greedy:
        out, prompt_ids, prompt_mask = k_times(out), k_times(prompt_ids), k_times(prompt_mask)
    response_ids = out[:, prompt_ids.shape[1]:]
    mask, has_eos = response_mask(response_ids, tokenizer.eos_token_id)
    # Positions after EOS hold padding; keep them as pad ids so they are never read as text.
    response_ids = response_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    return Rollout(prompt_ids, prompt_mask, response_ids, mask, has_eos)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per position.

    logits: (batch, T, vocab); labels: (batch, T) long, every entry a valid token id (pad
    with any id and mask the result). Returns (batch, T).

    Computed as logit[label] − logsumexp(logits), which equals gathering from log_softmax
    without materialising a second (batch, T, vocab) tensor. Sampling temperature is the
    caller's business: divide the logits by it first, as the N+ details stress.
    """
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


# Rows of logits taken at a time by `TokenLogprobs`: 8 rows of a 49k vocabulary in fp32 (1.5 MB)
# stay in cache through the passes over them. 16 and 32 measured within 20% of 8, all rows at once 2.5x slower.
LOGPROB_ROWS = 8


class TokenLogprobs(torch.autograd.Function):
    """log softmax(logits / temperature)[label] for (N, vocab) logits of any float dtype, in fp32.

    Plain autograd over `logits.float() / t` and `logsumexp` makes and keeps whole (N, vocab) fp32
    tensors, and its backward passes over them six times (the gather's zeroed gradient, the
    subtraction, exp, product, division and cast). Here a few rows at a time are cast, scaled and
    reduced while they are in cache; the backward recomputes softmax from the logits and the saved
    logsumexp in one pass, p = exp(logit / t − lse), and gives (onehot − p)·g / t in the logits' dtype.
    The forward is the plain one's, bit for bit; the gradient differs by fp32 rounding."""

    @staticmethod
    def forward(ctx, logits, labels, temperature: float):
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for s in range(0, logits.shape[0], LOGPROB_ROWS):
            x = logits[s:s + LOGPROB_ROWS].to(torch.float32, copy=True)  # scaled in place below
            torch.logsumexp(x.div_(temperature), dim=-1, out=lse[s:s + LOGPROB_ROWS])
        picked = logits.gather(-1, labels[:, None]).squeeze(-1).float()
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature = temperature
        return picked / temperature - lse

    @staticmethod
    def backward(ctx, grad):
        logits, labels, lse = ctx.saved_tensors
        t = ctx.temperature
        g = grad.float()[:, None] / t
        grad_logits = torch.empty_like(logits)
        for s in range(0, logits.shape[0], LOGPROB_ROWS):
            rows = slice(s, s + LOGPROB_ROWS)
            p = torch.add(-lse[rows, None], logits[rows], alpha=1 / t).exp_().mul_(-g[rows])
            grad_logits[rows] = p.scatter_add_(1, labels[rows, None], g[rows])
        return grad_logits, None, None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`logprobs_from_logits(logits.float() / temperature, labels)`, (batch, T), computed by
    `TokenLogprobs`: the same values, and no fp32 copy of the logits kept for the backward. For
    8 x 48 positions of a 49k vocabulary in bf16, forward and backward took 59 against 257 ms
    (a 2-core AMD EPYC with AVX512-BF16)."""
    return TokenLogprobs.apply(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               temperature).view(labels.shape)


def forward_response(model, rollout: Rollout, temperature: float = 1.0,
                     with_hidden: bool = False) -> dict[str, torch.Tensor]:
    """One forward pass over the rollout: per-response-token `logprobs` (B, R) and their
    `logits` (B, R, vocab) as the model gives them; with `with_hidden`, the last layer's `hidden`
    states (B, R, H).

    The log-probs are of the logits divided by the sampling temperature, the distribution the
    tokens were actually drawn from (N+ implementation details, §"temperature"); divide `logits`
    by it too before reading them as that distribution. Row t of `logits` and `hidden` is read at
    position t − 1, the one that predicts token t.
    """
    rollout = rollout.to(device_of(model))
    attn = rollout.attention_mask
    L, R = attn.shape[1], rollout.response_ids.shape[1]
    # The last hidden states are the LM head's input, taken there: `output_hidden_states` would
    # return every layer's, and a packed forward would put each back in the padded layout.
    heard: list[torch.Tensor] = []
    hook = (model.get_output_embeddings().register_forward_hook(lambda head, args, _: heard.append(args[0]))
            if with_hidden else None)
    try:
        # Only the R positions that predict the response are projected to the vocabulary (the
        # prompt's logits are unused), by index, so the logits come contiguous: no slice, no copy.
        out = model(input_ids=rollout.input_ids, attention_mask=attn, position_ids=position_ids(attn),
                    use_cache=False, logits_to_keep=torch.arange(L - R - 1, L - 1, device=attn.device))
    finally:
        if hook is not None:
            hook.remove()
    result = {"logits": out.logits, "logprobs": token_logprobs(out.logits, rollout.response_ids, temperature)}
    if with_hidden:
        # A model that projects every position (the bench's plain baseline) gave the head all L.
        result["hidden"] = heard[0] if heard[0].shape[1] == R else heard[0][:, -R - 1:-1]
    return result


def rollout_of_texts(tokenizer, prompts: list[Messages], responses: list[str], max_prompt_length: int) -> Rollout:
    """A Rollout of responses given as text: each re-tokenised (no special tokens), right-padded.

    For scoring answers sampled earlier (compare's KL to the reference); re-tokenising decoded
    text gives the sampled ids back except where the tokenizer would have merged differently.
    """
    prompt_ids, prompt_mask, _ = encode_prompts(tokenizer, prompts, max_prompt_length)
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id] for r in responses]
    response_ids, mask = pad(ids, tokenizer.pad_token_id, side="right")
    return Rollout(prompt_ids, prompt_mask, response_ids, mask.float(), torch.zeros(len(ids), dtype=torch.bool))


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    return [t.strip() for t in tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)]


def sample_replies(model, tokenizer, prompts: list[Messages], max_new_tokens: int = 128, temperature: float = 0.0,
                   batch_size: int = 8, seed: int = 0, k: int = 1, top_p: float = 1.0,
                   max_prompt_length: int = 512) -> list[list[str]]:
    """`k` replies (text) to each conversation in `prompts`, seeded; `temperature=0` is greedy."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model.eval()
    replies: list[list[str]] = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=f"sampling {k} per prompt", unit="batch"):
        ids, mask, _ = encode_prompts(tokenizer, prompts[i:i + batch_size], max_prompt_length)
        with torch.inference_mode():
            decoded = decode_responses(tokenizer, sample(model, tokenizer, ids, mask, max_new_tokens, temperature,
                                                         top_p=top_p, k=k))
        replies += [decoded[j:j + k] for j in range(0, len(decoded), k)]
    return replies


def complete(model, tokenizer, prompts: list[Messages], max_new_tokens: int = 128, temperature: float = 0.0,
             batch_size: int = 8, seed: int = 0, **kwargs: Any) -> list[str]:
    """One reply to each conversation in `prompts`; `temperature=0` is greedy."""
    return [r[0] for r in sample_replies(model, tokenizer, prompts, max_new_tokens, temperature, batch_size, seed,
                                         k=1, **kwargs)]
