"""Shared fixtures: a tiny random Llama with a small BPE tokenizer, built in code.

Stage tests run the real entry points on it in seconds. The tokenizer is trained on the
shipped demo data so chat-formatted examples tokenise into a realistic number of tokens.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from rlhf import cli

DEMO_DATA = Path(__file__).resolve().parents[1] / "rlhf" / "demo_data"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_model(out: Path, vocab_size: int = 512, seed: int = 0, init_range: float = 0.1) -> Path:
    """Save a 2-layer, hidden-64 Llama and a byte-level BPE tokenizer with a chat template.

    The wider-than-usual init (0.1) gives LoRA random features it can adapt within a few
    dozen steps; at the usual 0.02 a LoRA-only run barely moves the loss.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = []
    for line in (DEMO_DATA / "support_sft.jsonl").read_text().splitlines():
        texts += [m["content"] for m in json.loads(line)["messages"]]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token="<|im_start|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, initializer_range=init_range)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def rlhf(ws: Path, *args: str) -> int:
    """Run the real CLI in-process against workspace `ws`."""
    return cli.main(["--workspace", str(ws), *args])


@pytest.fixture
def tiny_ws(tmp_path, tiny_model_dir) -> Path:
    """A workspace holding the tiny model as base:v1 and the demo SFT data as sft:v1."""
    ws = tmp_path / "ws"
    assert rlhf(ws, "base", "import", str(tiny_model_dir)) == 0
    assert rlhf(ws, "data", "import", "sft", str(DEMO_DATA / "support_sft.jsonl")) == 0
    return ws


def shared_data(name: str) -> Path:
    """A file from ../shared/data: skip with a reason locally, fail under CI, when it is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing; CI must have ../shared/data beside the checkout")
        pytest.skip(f"{path} not found (shared data lives beside the checkout)")
    return path


MARKER = " Have a lovely day!"


def write_marker_preferences(path: Path, n: int = 200, seed: int = 0) -> Path:
    """chosen = a demo reply that ends with MARKER; rejected = a different demo reply without it."""
    rng = random.Random(seed)
    convs = [json.loads(line)["messages"] for line in (DEMO_DATA / "support_sft.jsonl").read_text().splitlines()]
    with open(path, "w") as f:
        for i in range(n):
            prompt = convs[i % len(convs)][:-1]
            a, b = rng.sample(convs, 2)
            chosen = {"role": "assistant", "content": a[-1]["content"] + MARKER}
            rejected = {"role": "assistant", "content": b[-1]["content"]}
            f.write(json.dumps({"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}) + "\n")
    return path


@pytest.fixture
def pref_ws(tiny_ws, tmp_path) -> Path:
    """`tiny_ws` plus the marker preference set as preferences:v1."""
    assert rlhf(tiny_ws, "data", "import", "preferences", str(write_marker_preferences(tmp_path / "p.jsonl"))) == 0
    return tiny_ws
