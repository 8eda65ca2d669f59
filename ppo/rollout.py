"""Rollout plumbing shared by PPO and DPO's evaluation: tokenise prompts, sample, score tokens.

Sequences are laid out as [left-padded prompt | right-padded response], so every row's
response starts at column `P` (the prompt width) and one forward pass serves the batch.
Position ids are derived from the attention mask so left padding does not shift positions:
generation (which does the same internally) and the training forward then agree token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppo.core import entropy_from_logits, logprobs_from_logits


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


def encode_prompts(tokenizer, prompts: list[list[dict]], max_prompt_length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-padded prompt ids and mask, and how many prompts were cut to `max_prompt_length`.

    Long prompts keep their end (the latest turns, where the question is).
    """
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    truncated = sum(len(x) > max_prompt_length for x in ids)
    ids = [x[-max_prompt_length:] for x in ids]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    return input_ids, mask, truncated


def response_mask(response_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, has_eos): mask is 1 up to and including each row's first EOS, 0 after it."""
    is_eos = response_ids == eos_token_id
    # Tokens strictly after the first EOS have a cumulative EOS count ≥ 1 before them.
    after_eos = (torch.cumsum(is_eos, dim=1) - is_eos.long()) > 0
    return (~after_eos).float(), is_eos.any(dim=1)


@torch.no_grad()
def sample(model, tokenizer, prompt_ids, prompt_mask, max_new_tokens: int, temperature: float) -> Rollout:
    """Sample responses with the KV cache, the whole batch at once."""
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 \
        else {"do_sample": False}
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling)
    response_ids = out[:, prompt_ids.shape[1]:]
    mask, has_eos = response_mask(response_ids, tokenizer.eos_token_id)
    # Positions after EOS hold padding; keep them as pad ids so they are never read as text.
    response_ids = response_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    return Rollout(prompt_ids, prompt_mask, response_ids, mask, has_eos)


def merged_sampler(base, dtype):
    """A frozen copy of `base` (before any adapter is added) to sample rollouts from.

    Sampling through an unmerged LoRA adapter costs two extra small matmuls per linear
    layer per token, and casting fp32 weights to bf16 again at every decoding step;
    measured here on SmolLM2-135M, that halves the tokens/s. The copy holds the merged
    weights in the compute dtype instead; `sync_sampler` refreshes it before each rollout.
    """
    import copy

    return copy.deepcopy(base).to(dtype).eval().requires_grad_(False)


@torch.no_grad()
def sync_sampler(sampler, policy) -> None:
    """Write the policy's current weights, adapter merged, into the sampler (W + B·A·scale)."""
    from peft.tuners.lora import LoraLayer

    weights = dict(sampler.named_parameters())
    for name, module in policy.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            merged = module.get_base_layer().weight + module.get_delta_weight(module.active_adapters[0])
            weights[f"{name}.weight"].copy_(merged)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def forward_response(model, rollout: Rollout, temperature: float = 1.0, value_head=None,
                     with_entropy: bool = False) -> dict[str, torch.Tensor]:
    """Per-response-token log-probs (B, R), and optionally entropy (scalar) and values (B, R).

    Logits are divided by the sampling temperature, so the log-probs are those of the
    distribution the tokens were actually drawn from (N+ implementation details, §"temperature").
    The value of token t is read from the hidden state that predicts it (position t − 1).
    """
    attn = rollout.attention_mask
    R = rollout.response_ids.shape[1]
    # Only the R + 1 last positions are projected to the vocabulary: the prompt's logits are unused.
    out = model(input_ids=rollout.input_ids, attention_mask=attn, position_ids=position_ids(attn),
                output_hidden_states=value_head is not None, use_cache=False, logits_to_keep=R + 1)
    P = rollout.prompt_ids.shape[1]
    logits = out.logits[:, :-1].float() / temperature
    result = {"logprobs": logprobs_from_logits(logits, rollout.response_ids)}
    if with_entropy:
        result["entropy"] = entropy_from_logits(logits, rollout.response_mask)
    if value_head is not None:
        hidden = out.hidden_states[-1][:, P - 1:-1]
        result["values"] = value_head(hidden.to(value_head.weight.dtype)).squeeze(-1).float()
    return result


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    return [t.strip() for t in tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)]
