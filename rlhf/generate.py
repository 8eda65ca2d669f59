"""Batched, seeded sampling of chat replies from a checkpoint (`rlhf generate`, compare, the demo).

    rlhf generate model=sft:latest data=prompts:latest k=4 sampling.temperature=0.8
                                            # -> datasets/candidates/vK
"""

from __future__ import annotations

import time

from rlhf import faults
from rlhf.artifacts import Artifact, ArtifactStore
from rlhf.config import GenerateConfig, dump


def check(cfg: GenerateConfig, store: ArtifactStore) -> tuple[Artifact, Artifact, list[dict]]:
    """Everything that can fail before a model loads: the workspace, the policy, the prompt rows."""
    from rlhf import data as rdata
    from rlhf import models

    store.check_writable()
    policy = models.check_policy(store.resolve(cfg.model, kind="checkpoint"))
    prompts_art = store.resolve(cfg.data, kind="dataset")
    return policy, prompts_art, rdata.load_rows(prompts_art, schema="prompts")[:cfg.limit]


def main(cfg: GenerateConfig, store: ArtifactStore) -> Artifact:
    """`rlhf generate`: k sampled responses per prompt -> a candidates dataset, duplicates removed."""
    from rlhf import data as rdata
    from rlhf import models
    from rlhf.sampling import sample_replies

    # 1. Check everything that can fail before a model loads.
    policy, prompts_art, rows = check(cfg, store)

    # 2. The policy, adapters merged, in the compute dtype.
    tokenizer = models.load_tokenizer(policy)
    model = models.for_inference(models.load_causal_lm(store, policy, sampling_only=True),
                                 models.resolve_precision(cfg.precision))
    faults.point("load")

    # 3. k samples per prompt, batched with the KV cache.
    start = time.perf_counter()
    samples = sample_replies(model, tokenizer, [r["prompt"] for r in rows], cfg.sampling.max_new_tokens,
                             cfg.sampling.temperature, cfg.batch_size, cfg.seed, k=cfg.k, top_p=cfg.sampling.top_p,
                             max_prompt_length=cfg.max_prompt_length)
    wall = time.perf_counter() - start

    # 4. Drop empty and repeated responses (counted), and publish.
    tag = f"{policy.name}:v{policy.version}"
    out, duplicates, empty = [], 0, 0
    for row, texts in zip(rows, samples):
        seen: set[str] = set()
        responses = []
        for j, text in enumerate(texts):
            key = " ".join(text.lower().split())
            if not key:
                empty += 1
            elif key in seen:
                duplicates += 1
            else:
                seen.add(key)
                responses.append({"response_id": f"{row['prompt_id']}-{j}", "text": text, "model": tag})
        if responses:
            out.append({**row, "responses": responses})
    n_tokens = sum(len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) for o in out for r in o["responses"])
    with store.create("dataset", cfg.output, stage="generate", config={**dump(cfg), "schema": "candidates"}) as w:
        rdata.write_rows(w.path / rdata.DATA_FILE, out)
        w.add_input("model", policy, loaded_as=models.loaded_as(store, policy))
        w.add_input("data", prompts_art)
        w.metrics.update({"prompts": len(rows), "responses": sum(len(o["responses"]) for o in out),
                          "duplicates_removed": duplicates, "empty_removed": empty,
                          "generated_tokens_per_s": n_tokens / wall, "wall_s": wall})
    return w.result
