"""`rlhf score`: add a normalised reward-model score to every response of a dataset.

    rlhf score reward=reward:latest data=candidates:v2     # -> candidates:v3, each response with "score"
    rlhf score reward=reward:v1 data=hh:latest              # preferences: adds "chosen_score", "rejected_score"
                                                            # and "p_chosen", the calibrated P(chosen ≻ rejected)

The scoring itself lives in `rlhf.judges` (PPO and compare use it too); this is the verb.
"""

from __future__ import annotations

from rlhf import data as rdata
from rlhf.artifacts import Artifact, ArtifactStore
from rlhf.config import ScoreConfig, dump
from rlhf.errors import RlhfError
from rlhf.judges import RewardModel, check_reward_checkpoint


def check(cfg: ScoreConfig, store: ArtifactStore) -> tuple[Artifact, str]:
    """Everything that can fail before the reward model loads; returns the dataset and its schema."""
    store.check_writable()
    dataset = store.resolve(cfg.data, kind="dataset")
    schema = dataset.manifest.get("config", {}).get("schema")
    if schema not in ("candidates", "preferences"):
        raise RlhfError(f"{dataset.ref} is a {schema!r} dataset; rlhf score takes candidates or preferences")
    check_reward_checkpoint(store.resolve(cfg.reward, kind="checkpoint"))
    return dataset, schema


def main(cfg: ScoreConfig, store: ArtifactStore) -> Artifact:
    # 1. Check everything that can fail before the reward model loads.
    dataset, schema = check(cfg, store)

    # 2. Score every response with the reward model's normalisation.
    judge = RewardModel(store, cfg.reward)
    rows = rdata.load_rows(dataset)
    if schema == "candidates":
        pairs = [(row["prompt"], resp) for row in rows for resp in row["responses"]]
        scores = judge.score([p for p, _ in pairs], [r["text"] for _, r in pairs], cfg.batch_size)
        for (_, resp), s in zip(pairs, scores):
            resp["score"] = s
    else:
        for side in ("chosen", "rejected"):
            scores = judge.score([r["prompt"] for r in rows], [r[side][0]["content"] for r in rows], cfg.batch_size)
            for row, s in zip(rows, scores):
                row[f"{side}_score"] = s
        for row in rows:
            row["p_chosen"] = judge.preference_probability(row["chosen_score"], row["rejected_score"])
    all_scores = ([r["score"] for row in rows for r in row["responses"]] if schema == "candidates"
                  else [row[k] for row in rows for k in ("chosen_score", "rejected_score")])

    # 3. Publish the scored copy.
    config = {**dump(cfg), "schema": schema}
    with store.create("dataset", cfg.output or dataset.name, stage="score", config=config) as w:
        rdata.write_rows(w.path / rdata.DATA_FILE, rows)
        w.add_input("data", dataset)
        w.add_input("reward", judge.artifact)
        w.metrics.update({"rows": len(rows), "scored": len(all_scores),
                          "mean_score": sum(all_scores) / len(all_scores)})
    return w.result
