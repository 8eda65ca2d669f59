"""The CPU path for TRL's chunked LM head gives TRL's own log-probs and gradients, and undoes itself."""

from __future__ import annotations

import torch

from rlhf.training import fast_lm_head_on_cpu


def test_the_cpu_lm_head_matches_trls_and_restores_it(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from trl.kernels import chunked_logprob
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (3, 24))
    labels = ids.clone()
    labels[:, :8] = -100  # a prompt
    labels[0, 18:] = -100  # padding
    hidden_weight = model.model.layers[-1].mlp.down_proj.weight

    def run():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        return out.loss.detach(), out.log_probs.detach(), hidden_weight.grad.clone()

    original = chunked_logprob._addmm_fp32
    want = run()
    with fast_lm_head_on_cpu():
        got = run()
    assert chunked_logprob._addmm_fp32 is original
    assert torch.allclose(got[0], want[0], rtol=1e-3), (got[0], want[0])
    assert torch.allclose(got[1], want[1], atol=2e-2)
    assert (got[1][labels[:, 1:] == -100] == 0).all()  # unlabelled positions are still zero
    # Gradients reaching the backbone agree to bf16 precision.
    assert (got[2] - want[2]).norm() / want[2].norm() < 2e-2
