"""PPO's rollout state: a merged, compute-dtype copy of the policy to sample from, kept in sync.

Sampling itself (prompt encoding, KV-cache generation, response log-probs) is `rlhf/sampling.py`.
"""

from __future__ import annotations

import torch


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
    """Write the policy's current weights, adapter merged, into the sampler (W + B·A·scale), and
    pack them again for the CPU's decoding steps (`rlhf/sampling.py: pack_linear_weights`)."""
    from peft.tuners.lora import LoraLayer

    from rlhf.sampling import pack_linear_weights

    weights = dict(sampler.named_parameters())
    for name, module in policy.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            merged = module.get_base_layer().weight + module.get_delta_weight(module.active_adapters[0])
            weights[f"{name}.weight"].copy_(merged)
    pack_linear_weights(sampler)
