"""Score responses with a reward checkpoint, applying its saved normalisation.

Scoring works from text: each (prompt, response) conversation is rendered with the reward
model's own chat template and tokenizer, so a policy with a different tokenizer is scored
correctly. A normalised score of 0 means "an average response" of the reward model's
training data; 1 means one standard deviation better.
"""

from __future__ import annotations

from typing import Sequence

from rlhf.artifacts import Artifact, ArtifactStore
from rlhf.errors import RlhfError

Messages = list[dict[str, str]]


def raw_rewards(model, tokenizer, conversations: Sequence[Messages], batch_size: int = 16,
                max_length: int = 1024) -> list[float]:
    """The classifier's scalar output for each full conversation (prompt + response), unnormalised.

    Sequences are sorted by length so each batch pads little, and left-truncated to
    `max_length` so the response being judged is never the part cut off.
    """
    import torch

    from rlhf.models import resolve_precision

    bf16 = resolve_precision("auto") == "bf16"
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][-max_length:] for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = [0.0] * len(ids)
    pad = tokenizer.pad_token_id
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(ids[i]) for i in idx)
        # Right padding: the classifier reads the last non-pad token of each row.
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
            attention[row, :len(ids[i])] = 1
        with torch.inference_mode(), torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device)).logits
        for row, i in enumerate(idx):
            out[i] = float(logits[row, 0])
    return out


class RewardModel:
    """A trained reward checkpoint, ready to score conversations."""

    def __init__(self, store: ArtifactStore, ref: str):
        from transformers import AutoModelForSequenceClassification

        from rlhf.models import load_tokenizer

        self.artifact: Artifact = store.resolve(ref, kind="checkpoint")
        if self.artifact.manifest.get("stage") != "reward":
            raise RlhfError(f"{self.artifact.ref} is a {self.artifact.manifest.get('stage')!r} checkpoint, not a reward "
                            "model; pass a checkpoint made by `rlhf reward`")
        norm = self.artifact.manifest["metrics"]["normalization"]
        self.mean, self.std = norm["mean"], norm["std"]
        self.max_length = self.artifact.manifest["config"]["max_length"]
        self.tokenizer = load_tokenizer(self.artifact)
        self.model = AutoModelForSequenceClassification.from_pretrained(self.artifact.path)
        import torch

        if torch.cuda.is_available():
            self.model.to("cuda")

    def score(self, prompts: Sequence[Messages], responses: Sequence[str], batch_size: int = 16) -> list[float]:
        """Normalised reward of each `response` as the assistant's reply to the matching prompt."""
        conversations = [list(p) + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
        raw = raw_rewards(self.model, self.tokenizer, conversations, batch_size, self.max_length)
        return [(r - self.mean) / self.std for r in raw]
