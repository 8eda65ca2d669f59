"""Batched, seeded sampling of chat replies from a checkpoint."""

from __future__ import annotations

from typing import Any


def complete(model, tokenizer, prompts: list[list[dict[str, str]]], max_new_tokens: int = 128,
             temperature: float = 0.0, batch_size: int = 8, seed: int = 0) -> list[str]:
    """Reply to each conversation in `prompts`; `temperature=0` is greedy.

    Prompts are left-padded so every row's reply starts at the same position, which lets one
    forward pass with a KV cache serve the whole batch.
    """
    import torch

    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    replies: list[str] = []
    model.eval()
    for i in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in prompts[i:i + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        sampling: dict[str, Any] = ({"do_sample": True, "temperature": temperature} if temperature > 0
                                    else {"do_sample": False})
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **sampling)
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        replies += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return replies
