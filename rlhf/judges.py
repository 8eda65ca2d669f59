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
                max_length: int = 1024, padding_free: bool | dict = True) -> list[float]:
    """The classifier's scalar output for each full conversation (prompt + response), unnormalised.

    Sequences are sorted by length so each batch pads little, and left-truncated to
    `max_length` so the response being judged is never the part cut off. With `padding_free`
    each batch runs packed, where the load check allows it (`training.packed_where_safe`): no
    padding, and a system prompt the conversations share runs once. A caller that scores
    often passes the load check's decision instead of True, so the check runs once.
    """
    import torch

    from rlhf.models import resolve_precision, torch_dtype
    from rlhf.sampling import device_of, pad
    from rlhf.training import packed_where_safe

    dtype = torch_dtype(resolve_precision("auto"))
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][-max_length:] for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = [0.0] * len(ids)
    device = device_of(model)
    model.eval()
    with packed_where_safe(model, bool(padding_free), padding_free if isinstance(padding_free, dict) else None):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            # Right padding: the classifier reads the last non-pad token of each row.
            input_ids, attention = pad([ids[i] for i in idx], tokenizer.pad_token_id, side="right")
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            for row, i in enumerate(idx):
                out[i] = float(logits[row, 0])
    return out


def check_reward_checkpoint(art: Artifact) -> Artifact:
    """`art`, if `rlhf reward` made it; otherwise a one-line error that says what it is."""
    if art.manifest.get("stage") != "reward":
        raise RlhfError(f"{art.ref} is a {art.manifest.get('stage')!r} checkpoint, not a reward "
                        "model; pass a checkpoint made by `rlhf reward`")
    return art


class RewardModel:
    """A trained reward checkpoint, ready to score conversations."""

    def __init__(self, store: ArtifactStore, ref: str):
        from transformers import AutoModelForSequenceClassification

        from rlhf.models import cuda_available, load_tokenizer

        self.artifact: Artifact = check_reward_checkpoint(store.resolve(ref, kind="checkpoint"))
        metrics = self.artifact.manifest["metrics"]
        self.mean, self.std = metrics["normalization"]["mean"], metrics["normalization"]["std"]
        # Reward checkpoints made before calibration was fitted have none: T = 1 is σ(r_a − r_b) as trained.
        self.temperature = metrics.get("calibration", {}).get("temperature", 1.0)
        self.max_length = self.artifact.manifest["config"]["max_length"]
        self.tokenizer = load_tokenizer(self.artifact)
        # fp32 weights under autocast, as when the reward stage fitted the normalisation.
        self.model = AutoModelForSequenceClassification.from_pretrained(self.artifact.path)
        self.model.to("cuda" if cuda_available() else "cpu")
        self.padding_free: dict | None = None  # the load check's decision, at the first packed scoring

    def score(self, prompts: Sequence[Messages], responses: Sequence[str], batch_size: int = 16,
              padding_free: bool = True) -> list[float]:
        """Normalised reward of each `response` as the assistant's reply to the matching prompt."""
        from rlhf.training import padding_free_decision

        conversations = [list(p) + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
        if padding_free and self.padding_free is None:  # PPO scores every iteration: check the model once
            self.padding_free = padding_free_decision(self.model, True)
        raw = raw_rewards(self.model, self.tokenizer, conversations, batch_size, self.max_length,
                          padding_free and self.padding_free)
        return [(r - self.mean) / self.std for r in raw]

    def preference_probability(self, score_a: float, score_b: float) -> float:
        """Calibrated P(a ≻ b) from two normalised scores: σ((r_a − r_b) / T) with the stored temperature."""
        import math

        # σ(x) = (1 + tanh(x/2)) / 2: no exp to overflow when a confident model's margin is large.
        return (1 + math.tanh(self.std * (score_a - score_b) / self.temperature / 2)) / 2


# -- the demo's gold scorer ------------------------------------------------------

STOPWORDS = frozenset("""a an the and or but if then so to of in on at for with from by about as is are was were be been
being it its this that these those i me my we our you your he she they them their what which who whom how when where why
can could would should will shall do does did done have has had not no yes just please hi hello hey there here up out
get got am im i'm it's don't can't""".split())
POLITE = ("thank", "thanks", "sorry", "happy to help", "glad", "appreciate", "of course", "sure", "understand",
          "apologi")
RUDE = ("stupid", "idiot", "not my problem", "whatever", "calm down", "deal with it", "your fault", "obviously",
        "can't help you", "go away", "shut up")
ACTIONS = ("reply with", "please", "you can", "we'll", "we will", "i'll", "use the", "visit", "click", "go to",
           "within", "send", "share", "check", "contact", "email", "call", "open", "select", "choose", "let us know",
           "let me know")
EVASIVE = ("as an ai", "i am an ai", "i'm an ai", "language model", "i cannot help", "i can't assist",
           "i'm not able to help", "consult a professional")


def _words(text: str) -> list[str]:
    import re

    return re.findall(r"[a-z0-9']+", text.lower())


def gold_score(prompt: list[dict[str, str]], response: str) -> float:
    """A fixed, documented judge of support replies for the demo domain; it knows no trained model.

    It encodes the house style the demo data was written in, as a sum of six parts:

    - tone (−2…+1): +1 if the reply is polite (thanks, sorry, glad, happy to help…), −2 per
      rude phrase, −0.5 for grovelling (more than two apologies);
    - brevity (−2…+1): +1 for 15–70 words, falling linearly to −2 at 160 words; −1 under 6 words;
    - structure (−1…+0.5): +0.5 for 2–4 sentences, −1 for more than 6;
    - next step (0…+1): +1 if it names a concrete action ("reply with", "you can", "we'll", "visit"…);
    - relevance (−1…+1.5): share of the user's last message's content words that the reply uses,
      scaled to +1.5, and −1 for evasive boilerplate ("as an AI", "consult a professional");
    - repetition (−2…0): −2 × the share of repeated word trigrams (loops and rambling).

    Deterministic, pure Python, and independent of any model, so win-rates judged by it are
    honest: no policy or reward model was trained on it (only simulated annotators use it,
    through noisy rankings).
    """
    text = response.strip()
    low = text.lower()
    words = _words(text)
    n = len(words)
    if n == 0:
        return -5.0
    score = 0.0
    # tone
    score += 1.0 if any(p in low for p in POLITE) else 0.0
    score -= 2.0 * sum(low.count(r) for r in RUDE)
    score -= 0.5 if low.count("sorry") + low.count("apologi") > 2 else 0.0
    # brevity
    if n < 6:
        score -= 1.0
    elif n <= 70:
        score += 1.0
    else:
        score += 1.0 - 3.0 * min(1.0, (n - 70) / 90)
    # structure
    import re

    sentences = [s for s in re.split(r"[.!?]+(?:\s|$)", text) if s.strip()]
    score += 0.5 if 2 <= len(sentences) <= 4 else (-1.0 if len(sentences) > 6 else 0.0)
    # next step
    score += 1.0 if any(a in low for a in ACTIONS) else 0.0
    # relevance
    user = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
    asked = {w for w in _words(user) if w not in STOPWORDS and len(w) > 2}
    if asked:
        score += 1.5 * len(asked & set(words)) / len(asked)
    score -= 1.0 if any(e in low for e in EVASIVE) else 0.0
    # repetition
    trigrams = list(zip(words, words[1:], words[2:]))
    if trigrams:
        score -= 2.0 * (1 - len(set(trigrams)) / len(trigrams))
    return round(score, 6)
