"""`rlhf compare`: is this checkpoint preferred over that one, and by how much?

    rlhf compare sft:latest dpo:latest ppo:latest data=heldout:latest judge=gold,reward:latest
                                      # -> reports/compare/vK (summary.md, metrics.json, report.html)

Each model answers the same prompts with the same sampling settings and seed; the answers
are cached as `generate` candidates datasets and reused when asked again. A judge turns the
answers into battles, one per prompt and model pair (or one per human vote):

- `gold`: the demo's documented gold scorer (`rlhf.judges.gold_score`);
- `reward:<ref>`: a reward checkpoint's normalised score;
- `human:<ref>`: blind A/B votes exported from the labeling app (`rlhf label export`).

The statistics are pure functions of outcome arrays (1 = the first model wins, 0.5 = tie,
0 = loss), so ties always count half:
- `win_rate_ci`: win-rate with a bootstrap 95% CI over battles (scipy.stats.bootstrap);
- `length_controlled_win_rate`: the win-rate predicted at equal length, from a logistic fit
  of the outcome on the normalised length difference (AlpacaEval 2.0's length control,
  Dubois et al. 2024, reduced to one model pair);
- `bradley_terry`: maximum-likelihood strengths on the Elo scale, as Chatbot Arena fits
  them (Chiang et al. 2024), with CIs from a bootstrap over prompts, and ranks that only
  separate models whose CIs do not overlap.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from rlhf import faults
from rlhf.artifacts import Artifact, ArtifactStore
from rlhf.config import CompareConfig, dump
from rlhf.errors import RlhfError

ELO_SCALE, ELO_BASE = 400 / math.log(10), 1000.0


# -- statistics (pure) ---------------------------------------------------------------------


def outcomes(scores_a: Sequence[float], scores_b: Sequence[float], tie_margin: float = 0.0) -> np.ndarray:
    """1 where a scored higher by more than `tie_margin`, 0 where b did, 0.5 otherwise."""
    diff = np.asarray(scores_a, dtype=float) - np.asarray(scores_b, dtype=float)
    return np.where(diff > tie_margin, 1.0, np.where(diff < -tie_margin, 0.0, 0.5))


def win_rate_ci(x: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> tuple[float, tuple[float, float]]:
    """Mean outcome (ties as half) and its percentile-bootstrap 95% CI."""
    from scipy.stats import bootstrap

    x = np.asarray(x, dtype=float)
    if len(x) == 0:
        raise RlhfError("no battles to compute a win-rate from")
    if np.all(x == x[0]):  # the bootstrap distribution is a point; scipy would return NaN
        return float(x[0]), (float(x[0]), float(x[0]))
    res = bootstrap((x,), np.mean, n_resamples=n_resamples, confidence_level=0.95, method="percentile",
                    rng=np.random.default_rng(seed))
    return float(x.mean()), (float(res.confidence_interval.low), float(res.confidence_interval.high))


def _logistic_fit(d: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Coefficients of the logistic regression y ~ σ(d·β), by maximum likelihood.

    Soft labels y ∈ [0, 1] (a tie is 0.5), optional per-row weights `w` (a bootstrap's resample
    counts), and a weak ridge (1e-3 · Σβ²) that keeps a perfectly separated fit finite. The
    problem is convex and tiny, so Newton steps (trust-exact) converge in a handful of
    iterations, which keeps a 1000-resample bootstrap to about a second.
    """
    from scipy.optimize import minimize

    w = np.ones(len(y)) if w is None else w

    def nll(beta: np.ndarray) -> tuple[float, np.ndarray]:
        t = d @ beta
        # Soft-label cross-entropy via logaddexp, stable for large |t|.
        loss = w @ (np.logaddexp(0, t) - y * t) + 1e-3 * (beta @ beta)
        return float(loss), d.T @ (w * (1 / (1 + np.exp(-t)) - y)) + 2e-3 * beta

    def hess(beta: np.ndarray) -> np.ndarray:
        p = 1 / (1 + np.exp(-(d @ beta)))
        return (d.T * (w * p * (1 - p))) @ d + 2e-3 * np.eye(d.shape[1])

    return minimize(nll, np.zeros(d.shape[1]), jac=True, hess=hess, method="trust-exact").x


def _lc_fit(y: np.ndarray, z: np.ndarray) -> float:
    """σ(θ) of the fit y ~ σ(θ + φ·z): the win-rate at z = 0."""
    theta = _logistic_fit(np.stack([np.ones_like(z), z], axis=1), y)[0]
    return float(1 / (1 + np.exp(-theta)))


def length_controlled_win_rate(x: np.ndarray, len_a: Sequence[float], len_b: Sequence[float],
                               n_resamples: int = 1000, seed: int = 0) -> tuple[float, tuple[float, float]] | None:
    """Win-rate of a over b had their responses been the same length, with a bootstrap 95% CI.

    The length feature is tanh(Δlength / sd(Δlength)), as in AlpacaEval 2.0, so one very long
    answer cannot dominate the fit. None when lengths never differ (nothing to control for).
    """
    x = np.asarray(x, dtype=float)
    delta = np.asarray(len_a, dtype=float) - np.asarray(len_b, dtype=float)
    sd = delta.std()
    if len(x) < 2 or sd == 0:
        return None
    z = np.tanh(delta / sd)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_resamples):
        i = rng.integers(0, len(x), len(x))
        boots.append(_lc_fit(x[i], z[i]))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return _lc_fit(x, z), (float(lo), float(hi))


def _bt_fit(n_models: int, a: np.ndarray, b: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Bradley–Terry log-strengths: P(a beats b) = σ(β_a − β_b), ties as y = 0.5, centred to mean 0.

    The ridge of `_logistic_fit` also fixes the free offset that the likelihood leaves.
    """
    d = np.zeros((len(y), n_models))  # battle i's design row: +1 at a, -1 at b
    d[np.arange(len(y)), a] += 1
    d[np.arange(len(y)), b] -= 1
    beta = _logistic_fit(d, y, w)
    return beta - beta.mean()


def bradley_terry(models: Sequence[str], battles: Sequence[tuple[int, str, str, float]], n_resamples: int = 1000,
                  seed: int = 0) -> list[dict[str, Any]]:
    """Leaderboard from battles `(prompt_index, model_a, model_b, outcome_for_a)`, best first.

    Ratings are on the Elo scale (1000 = the average model, +400 = 10:1 odds). CIs come from
    a bootstrap that resamples prompts, so the battles of one prompt stay together. A model's
    rank is 1 + the number of models whose CI lies entirely above its own, so models whose
    CIs overlap share a rank (Chatbot Arena's rule).
    """
    index = {m: i for i, m in enumerate(models)}
    p = np.array([bt[0] for bt in battles])
    a = np.array([index[bt[1]] for bt in battles])
    b = np.array([index[bt[2]] for bt in battles])
    y = np.array([bt[3] for bt in battles], dtype=float)
    rating = ELO_BASE + ELO_SCALE * _bt_fit(len(models), a, b, y)
    prompts, p_index = np.unique(p, return_inverse=True)
    rng = np.random.default_rng(seed)
    boots = np.empty((n_resamples, len(models)))
    for r in range(n_resamples):
        # Resampling prompts with replacement = weighting each prompt's battles by its draw count.
        counts = np.bincount(rng.integers(0, len(prompts), len(prompts)), minlength=len(prompts))
        boots[r] = ELO_BASE + ELO_SCALE * _bt_fit(len(models), a, b, y, counts[p_index].astype(float))
    lo, hi = np.percentile(boots, [2.5, 97.5], axis=0)
    board = [{"model": m, "rating": float(rating[i]), "ci95": [float(lo[i]), float(hi[i])]}
             for i, m in enumerate(models)]
    for row in board:
        row["rank"] = 1 + sum(other["ci95"][0] > row["ci95"][1] for other in board)
    return sorted(board, key=lambda r: -r["rating"])


# -- judging -------------------------------------------------------------------------------


@dataclass
class Responses:
    """Every model's answer to every prompt, aligned by prompt index."""

    prompts: list[dict[str, Any]]  # prompt rows: prompt_id, prompt (messages)
    texts: dict[str, list[str]]  # model label -> one answer per prompt

    def words(self, label: str) -> list[int]:
        return [len(t.split()) for t in self.texts[label]]


def score_battles(labels: Sequence[str], scores: dict[str, list[float]], tie_margin: float
                  ) -> list[tuple[int, str, str, float]]:
    """One battle per prompt and model pair, from per-response scores."""
    battles = []
    for ma, mb in itertools.combinations(labels, 2):
        for i, o in enumerate(outcomes(scores[ma], scores[mb], tie_margin)):
            battles.append((i, ma, mb, float(o)))
    return battles


def human_battles(art: Artifact, responses: Responses, tags: dict[str, str]) -> list[tuple[int, str, str, float]]:
    """One battle per blind A/B vote whose two models are both being compared.

    `tags` maps each vote's model tag (`name:vN`, as the candidates record it) to its label here.
    Ties and "both bad" count as ties.
    """
    from rlhf import data

    position = {row["prompt_id"]: i for i, row in enumerate(responses.prompts)}
    battles = []
    for vote in data.load_rows(art):
        ma, mb = tags.get(vote["model_a"]), tags.get(vote["model_b"])
        if ma is None or mb is None or vote["prompt_id"] not in position:
            continue
        y = {"A": 1.0, "B": 0.0}.get(vote["choice"], 0.5)
        battles.append((position[vote["prompt_id"]], ma, mb, y))
    if not battles:
        raise RlhfError(f"judge human:{art.ref}: none of its votes compare two of the models given "
                        f"({', '.join(sorted(tags))}) on these prompts")
    return battles


def pair_table(labels: Sequence[str], battles: Sequence[tuple[int, str, str, float]], responses: Responses,
               n_resamples: int, seed: int) -> list[dict[str, Any]]:
    """Win / tie / loss, win-rate with CI and length-controlled win-rate for each pair that met.

    Each pair is oriented later-model-first (`dpo` vs `sft` when compared as `sft dpo`), so
    a win-rate above 0.5 means the newer checkpoint is preferred.
    """
    words = {m: responses.words(m) for m in labels}
    rows = []
    for mb, ma in itertools.combinations(labels, 2):
        x, la, lb = [], [], []
        for i, m1, m2, y in battles:
            if {m1, m2} == {ma, mb}:
                x.append(y if m1 == ma else 1 - y)
                la.append(words[ma][i])
                lb.append(words[mb][i])
        if not x:
            continue
        x = np.array(x)
        rate, ci = win_rate_ci(x, n_resamples, seed)
        lc = length_controlled_win_rate(x, la, lb, n_resamples=min(n_resamples, 500), seed=seed)
        rows.append({"a": ma, "b": mb, "wins": int((x == 1).sum()), "ties": int((x == 0.5).sum()),
                     "losses": int((x == 0).sum()), "n": len(x), "win_rate": rate, "ci95": list(ci),
                     "lc_win_rate": None if lc is None else lc[0], "lc_ci95": None if lc is None else list(lc[1])})
    return rows


def judge_agreement(by_judge: dict[str, list[tuple[int, str, str, float]]]) -> list[dict[str, Any]]:
    """For each two judges, the share of shared battles (same prompt and pair) they decide alike."""
    def keyed(battles):
        out = {}
        for i, a, b, y in battles:
            out.setdefault((i, a, b) if a < b else (i, b, a), []).append(y if a < b else 1 - y)
        return out

    rows = []
    for j1, j2 in itertools.combinations(by_judge, 2):
        k1, k2 = keyed(by_judge[j1]), keyed(by_judge[j2])
        same = [float(y1 == y2) for key in k1.keys() & k2.keys() for y1 in k1[key] for y2 in k2[key]]
        if same:
            rows.append({"judges": [j1, j2], "agreement": float(np.mean(same)), "n": len(same)})
    return rows


# -- the command ---------------------------------------------------------------------------


def model_labels(arts: Sequence[Artifact]) -> list[str]:
    """Short names for the report: the checkpoint name, or name:vN where two share a name."""
    names = [a.name for a in arts]
    labels = [a.name if names.count(a.name) == 1 else f"{a.name}:v{a.version}" for a in arts]
    if len(set(labels)) != len(labels):
        raise RlhfError(f"the same checkpoint is listed twice: {', '.join(a.ref for a in arts)}")
    return labels


def answers_config(cfg: CompareConfig, model: Artifact, prompts: Artifact):
    """The `generate` run that makes one model's answers for this comparison."""
    from rlhf.config import GenerateConfig

    return GenerateConfig(model=model.ref, data=prompts.ref, output=f"responses-{model.name}", k=1,
                          sampling=cfg.sampling, batch_size=cfg.batch_size, limit=cfg.limit, seed=cfg.seed,
                          precision=cfg.precision)


def cached_responses(store: ArtifactStore, model: Artifact, prompts: Artifact, cfg: CompareConfig) -> Artifact:
    """This model's answers to these prompts with these settings: reused if generated before, else generated."""
    from rlhf.generate import main as generate

    gen = answers_config(cfg, model, prompts)
    wanted = {k: v for k, v in dump(gen).items() if k in ("k", "sampling", "limit", "seed", "max_prompt_length")}
    for art in reversed(store.list()):
        c = art.manifest.get("config", {})
        if (art.manifest.get("stage") == "generate" and all(c.get(k) == v for k, v in wanted.items())
                and (art.input("model") or {}).get("content_hash") == model.content_hash
                and (art.input("data") or {}).get("content_hash") == prompts.content_hash):
            print(f"  {model.ref}: reusing its answers in {art.ref}", flush=True)
            return art
    art = generate(gen, store)
    print(f"  {model.ref}: {art.manifest['metrics']['generated_tokens_per_s']:.0f} new tokens/s -> {art.ref}",
          flush=True)
    return art


@dataclass
class Inputs:
    """compare's checked inputs: the models and their report labels, the prompts, each judge's artifact."""

    models: list[Artifact]
    labels: list[str]
    prompts: Artifact
    rows: list[dict[str, Any]]
    judges: dict[str, Artifact]


def check(cfg: CompareConfig, store: ArtifactStore) -> Inputs:
    """Everything that can fail before any answer is generated."""
    from rlhf import data
    from rlhf.models import check_policy

    store.check_writable()
    models = [check_policy(store.resolve(r, kind="checkpoint")) for r in cfg.models]
    prompts_art = store.resolve(cfg.data, kind="dataset")
    return Inputs(models, model_labels(models), prompts_art,
                  data.load_rows(prompts_art, schema="prompts")[:cfg.limit], _check_judges(store, cfg.judge))


def main(cfg: CompareConfig, store: ArtifactStore) -> Artifact:
    from rlhf import data
    from rlhf.report import write_report

    # 1. Check everything that can fail before any answer is generated.
    inputs = check(cfg, store)
    models, labels, prompts_art, rows, judge_inputs = (inputs.models, inputs.labels, inputs.prompts, inputs.rows,
                                                       inputs.judges)
    faults.point("load")

    # 2. Each model's answers: reused from an identical earlier generate run, or generated.
    answers = {}
    for label, model in zip(labels, models):
        answers[label] = cached_responses(store, model, prompts_art, cfg)
    responses = Responses(rows, {})
    for label, art in answers.items():
        # generate drops empty answers; an empty answer is still an answer, and judged as one.
        got = {r["prompt_id"]: r["responses"][0]["text"] for r in data.load_rows(art)}
        responses.texts[label] = [got.get(r["prompt_id"], "") for r in rows]

    # 3. How far each trained policy moved from its reference, measured on these answers, so that
    #    "better at equal KL" can be read off the report.
    kl = {label: kl_to_reference(store, model, [r["prompt"] for r in rows], responses.texts[label],
                                 cfg.sampling.temperature, cfg.batch_size)
          for label, model in zip(labels, models)}

    # 4. Judge every pair of models on every prompt, by each judge.
    # Votes name a model as its candidates recorded it: `name:vN` (generate) or the full ref.
    tags = {t: label for m, label in zip(models, labels) for t in (f"{m.name}:v{m.version}", m.ref)}
    results, battles_by_judge, scores_by_judge = {}, {}, {}
    for judge in cfg.judge:
        print(f"  judging with {judge}", flush=True)
        if judge.startswith("human:"):
            battles = human_battles(judge_inputs[judge], responses, tags)
            scores = None
        else:
            scores = _judge_scores(store, judge, judge_inputs.get(judge), rows, responses)
            battles = score_battles(labels, scores, cfg.tie_margin)
        name = judge if judge == "gold" else f"{judge.split(':', 1)[0]}:{judge_inputs[judge].ref}"
        battles_by_judge[name] = battles
        scores_by_judge[name] = scores
        results[name] = {
            "mean_score": None if scores is None else {m: float(np.mean(s)) for m, s in scores.items()},
            "pairs": pair_table(labels, battles, responses, cfg.bootstrap_samples, cfg.seed),
            "leaderboard": (bradley_terry(labels, battles, cfg.bootstrap_samples, cfg.seed)
                            if len(labels) >= 3 else []),
        }
        for row in results[name]["leaderboard"]:
            row["mean_score"] = None if scores is None else results[name]["mean_score"][row["model"]]
            row["mean_length"] = float(np.mean(responses.words(row["model"])))
    # 5. Publish the report.
    metrics = {"models": {m: a.ref for m, a in zip(labels, models)}, "prompts": prompts_art.ref,
               "n_prompts": len(rows), "mean_length": {m: float(np.mean(responses.words(m))) for m in labels},
               "kl_to_reference": kl,
               "references": {m: (a.input("reference") or {}).get("ref") for m, a in zip(labels, models)},
               "judges": results, "judge_agreement": judge_agreement(battles_by_judge)}
    with store.create("report", cfg.output, stage="compare", config=dump(cfg)) as w:
        for label, model in zip(labels, models):
            w.add_input(f"model:{label}", model)
            w.add_input(f"responses:{label}", answers[label])
        w.add_input("data", prompts_art)
        for judge, art in judge_inputs.items():
            w.add_input(f"judge:{judge.split(':', 1)[0]}", art)
        write_report(w.path, metrics, responses, scores_by_judge)
        w.metrics.update(metrics)
    print((w.result.path / "summary.md").read_text())
    return w.result


def kl_to_reference(store: ArtifactStore, model: Artifact, prompts: list, texts: list[str], temperature: float,
                    batch_size: int) -> float | None:
    """Mean over prompts of Σ_t [log π(y_t) − log π_ref(y_t)] on the model's own answers y ~ π: an
    estimate of KL(π ‖ π_ref) per response, in nats. None for a model trained without a reference
    (base, sft).

    π_ref is the checkpoint the model's manifest names as its reference (dpo, ppo, rloo and grpo
    record the policy they started from). Both are read at the sampling temperature, so this is
    the KL between the distributions the answers were drawn from; at temperature 0 (greedy
    answers, one point mass) it is not defined and is left out.
    """
    import torch

    from rlhf import models, progress, training
    from rlhf.sampling import forward_response, rollout_of_texts

    ref = (model.input("reference") or {}).get("ref")
    if ref is None or temperature == 0:
        return None
    reference = store.resolve(ref, kind="checkpoint")
    tokenizer = models.load_tokenizer(model)
    batches = [rollout_of_texts(tokenizer, prompts[i:i + batch_size], texts[i:i + batch_size], 1024)
               for i in range(0, len(texts), batch_size)]
    precision, sums = models.resolve_precision("auto"), []
    with progress.phase(f"compare: KL of {model.ref} to its reference {reference.ref}"):
        for art in (model, reference):  # one model in memory at a time
            net = models.for_inference(models.load_causal_lm(store, art, sampling_only=True), precision)
            # Packed where the load check allows: no padding, and the shared system prompt runs once.
            with torch.inference_mode(), training.packed_where_safe(net, True):
                sums.append(torch.cat([(forward_response(net, b, temperature)["logprobs"].cpu()
                                        * b.response_mask).sum(1) for b in batches]))
            del net
    return float((sums[0] - sums[1]).mean())


def _check_judges(store: ArtifactStore, judges: list[str]) -> dict[str, Artifact]:
    """Resolve every judge's artifact before any generation starts, so a bad judge fails fast.

    `reward:latest` and `human:v3` name a version of the default artifact (`reward`,
    `ab_votes`), as the issue's examples write them; `reward:rm-big:v2` names any other.
    """
    import re

    from rlhf.judges import check_reward_checkpoint

    found = {}
    for judge in judges:
        kind, _, ref = judge.partition(":")
        if judge == "gold":
            continue
        if kind not in ("reward", "human") or not ref:
            raise RlhfError(f"unknown judge {judge!r}; use gold, reward:<reward checkpoint ref> or "
                            "human:<ab_votes dataset ref>")
        if re.fullmatch(r"latest|v\d+", ref):
            ref = f"{'reward' if kind == 'reward' else 'ab_votes'}:{ref}"
        if kind == "reward":
            found[judge] = check_reward_checkpoint(store.resolve(ref, kind="checkpoint"))
        else:
            found[judge] = store.resolve(ref, kind="dataset")
            if found[judge].manifest["config"].get("schema") != "ab_votes":
                raise RlhfError(f"judge {judge}: {found[judge].ref} is not an A/B votes dataset; export one with "
                                "`rlhf label export --task-set <A/B task set>`")
    return found


def _judge_scores(store: ArtifactStore, judge: str, art: Artifact | None, rows: list[dict],
                  responses: Responses) -> dict[str, list[float]]:
    """Each model's per-prompt score under a scoring judge (gold or a reward model, loaded once)."""
    prompts = [r["prompt"] for r in rows]
    if judge == "gold":
        from rlhf.judges import gold_score

        return {m: [gold_score(p, t) for p, t in zip(prompts, texts)] for m, texts in responses.texts.items()}
    from rlhf.judges import RewardModel

    rm = RewardModel(store, art.ref)
    return {m: rm.score(prompts, texts) for m, texts in responses.texts.items()}
