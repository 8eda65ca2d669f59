"""Simulated annotators: scripted labelers that go through the same API as the browser.

    result = run_annotators(store, ["sim-1", "sim-2", "sim-3"], "candidates-v3", seed=0)

Each simulated annotator asks `next_item` for work and answers with `submit` (or
`submit_ab`), exactly as the ranking page does, until nothing is left for it. Its taste is
a gold scorer, `rlhf.judges.gold_score(prompt_messages, response_text)` by default, which
knows nothing of any trained model. Its noise is Plackett–Luce: the ranking is sampled
with utilities score / temperature, best first.

The temperature is calibrated so that two simulated annotators order a response pair the
same way about 73% of the time: InstructGPT's inter-labeler agreement (72.6 ± 1.5%,
Ouyang et al. 2022). Under Plackett–Luce, the chance that response i lands above j is the
Bradley–Terry p_ij = sigmoid((s_i - s_j) / T), so two independent annotators agree on the
pair with probability p_ij² + (1 - p_ij)². The mean of that over a reference set falls
monotonically from its T -> 0 limit to 0.5 as T grows, and `calibrate_temperature` solves
it for the target by bisection: exact, with no sampling noise in the answer.
"""

from __future__ import annotations

import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from labeling_app.agreement import pairwise_agreement
from labeling_app.assign import DEFAULT_LEASE_SECONDS, next_item
from labeling_app.auth import add_user
from labeling_app.labels import submit, submit_ab
from labeling_app.store import LabelStore, User
from rlhf.errors import RlhfError

ScoreFn = Callable[[list[dict[str, str]], str], float]
TARGET_AGREEMENT = 0.73


def gold_scorer() -> ScoreFn:
    # Imported when used: the judges module is the spine's, and loading it is not free.
    from rlhf.judges import gold_score

    return gold_score


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1 / (1 + math.exp(-x))
    e = math.exp(x)
    return e / (1 + e)


def plackett_luce(utilities: Sequence[float], rng: random.Random) -> list[int]:
    """Indices best first, sampled from Plackett–Luce with these utilities (log-weights).

    Adding independent Gumbel(0, 1) noise to each utility and sorting gives exactly a
    Plackett–Luce sample (the Gumbel-max trick; Yellott 1977), in one pass.
    """
    keys = []
    for u in utilities:
        x = rng.random()
        while x == 0.0:  # log(0) is undefined; random() returns 0.0 with probability 2**-53
            x = rng.random()
        keys.append(u - math.log(-math.log(x)))
    return sorted(range(len(keys)), key=lambda i: -keys[i])


def expected_agreement(scores: Sequence[Sequence[float]], temperature: float) -> float:
    """Mean over within-item response pairs of p² + (1-p)², p = sigmoid(Δscore / temperature)."""
    total, n = 0.0, 0
    for item_scores in scores:
        for si, sj in combinations(item_scores, 2):
            p = _sigmoid((si - sj) / temperature)
            total += p * p + (1 - p) * (1 - p)
            n += 1
    if n == 0:
        raise RlhfError("calibration needs items with at least 2 responses")
    return total / n


class Calibration(NamedTuple):
    temperature: float
    expected_agreement: float  # what the temperature gives in expectation (the target, up to bisection precision)
    measured_agreement: float  # simulated annotator pairs actually sampled over the items with `seed`


def _scores(score_fn: ScoreFn, items: Sequence[Mapping[str, Any]]) -> list[list[float]]:
    return [[float(score_fn(item["prompt"], r["text"])) for r in item["responses"]] for item in items]


def _measured(scores: list[list[float]], temperature: float, seed: int, min_comparisons: int = 5000) -> float:
    """Agreement of simulated annotator pairs over the items, rerun with fresh pairs until
    `min_comparisons` pairs are compared: pairs within one item are not independent, so one
    run over a small set is a noisy check."""
    rng = random.Random(seed)
    pairs_per_round = sum(len(s) * (len(s) - 1) // 2 for s in scores)
    rounds = max(1, math.ceil(min_comparisons / pairs_per_round))
    by_item = {}
    for round_ in range(rounds):
        for i, item_scores in enumerate(scores):
            utilities = [s / temperature for s in item_scores]
            by_item[round_, i] = {who: [[str(j)] for j in plackett_luce(utilities, rng)] for who in ("x", "y")}
    return pairwise_agreement(by_item).rate


def calibrate_temperature(score_fn: ScoreFn, items: Sequence[Mapping[str, Any]], target: float = TARGET_AGREEMENT,
                          seed: int = 0) -> Calibration:
    """The Plackett–Luce temperature at which two simulated annotators agree on `target` of pairs.

    `items`: candidate rows, {"prompt": [messages], "responses": [{"text": ...}, ...]}.
    `seed` drives the check in `measured_agreement`, not the solution, which is exact.
    """
    if not 0.5 < target < 1:
        raise RlhfError(f"target agreement must lie between 0.5 (chance) and 1, got {target}")
    scores = _scores(score_fn, items)
    gaps = sorted(abs(a - b) for s in scores for a, b in combinations(s, 2) if a != b)
    if not gaps:
        raise RlhfError("the scorer gives every response of every item the same score; nothing to calibrate")
    scale = gaps[len(gaps) // 2]
    lo, hi = math.log(scale * 1e-6), math.log(scale * 1e6)
    ceiling = expected_agreement(scores, math.exp(lo))
    if ceiling <= target:
        raise RlhfError(f"the scorer ties too many pairs: even noiseless annotators would agree on only "
                        f"{ceiling:.1%}, below the {target:.0%} target")
    for _ in range(100):  # agreement falls as the temperature rises: bisect on log T
        mid = (lo + hi) / 2
        if expected_agreement(scores, math.exp(mid)) > target:
            lo = mid
        else:
            hi = mid
    temperature = math.exp((lo + hi) / 2)
    return Calibration(temperature, expected_agreement(scores, temperature), _measured(scores, temperature, seed))


@dataclass
class SimulationResult:
    temperature: float
    submitted: list[tuple[str, int]] = field(default_factory=list)  # (annotator, item_id) per submit call
    submit_seconds: list[float] = field(default_factory=list)       # wall time of each submit call


def _user(store: LabelStore, name: str) -> User:
    try:
        return store.user(name)
    except RlhfError:
        # Their token is discarded: simulated annotators act as an already signed-in session.
        return add_user(store, name, "annotator")[0]


def run_annotators(store: LabelStore, names: Sequence[str], task_set: str, seed: int,
                   score_fn: ScoreFn | None = None, workers: int = 1, temperature: float | None = None,
                   lease_seconds: int = DEFAULT_LEASE_SECONDS) -> SimulationResult:
    """Register `names` if missing, and label the task set through the store API until nothing is left.

    Annotators take turns item by item. Each annotator's judgement of an item is seeded by
    (seed, task set, annotator, prompt_id), so it never depends on scheduling; with
    `workers=1` which annotator gets which item is deterministic too. With `workers` > 1
    the annotators are split across that many threads that run concurrently.
    `temperature` None calibrates it on the task set's own items (see `calibrate_temperature`).
    """
    if workers < 1:
        raise RlhfError(f"workers must be at least 1, got {workers}")
    score_fn = score_fn or gold_scorer()
    ts = store.task_set(task_set)
    users = [_user(store, name) for name in names]
    items = store.items(ts.name)
    # Scored up front, once per response: threads then only read this.
    scores = {item.id: [float(score_fn(item.prompt, r["text"])) for r in item.responses] for item in items}
    if temperature is None:
        rows = [{"prompt": item.prompt, "responses": item.responses} for item in items]
        temperature = calibrate_temperature(score_fn, rows, seed=seed).temperature
    result = SimulationResult(temperature)
    record = threading.Lock()

    def label_one(user: User) -> bool:
        got = next_item(store, user, ts.name, lease_seconds)
        if got is None:
            return False
        item, _ = got
        rng = random.Random(f"simulated:{seed}:{ts.name}:{user.name}:{item.prompt_id}")
        order = plackett_luce([s / temperature for s in scores[item.id]], rng)
        ids = item.response_ids
        start = time.perf_counter()
        if ts.kind == "rank":
            submit(store, user, item.id, [[ids[i]] for i in order])
        else:
            submit_ab(store, user, item.id, ids[order[0]])
        elapsed = time.perf_counter() - start
        with record:
            result.submitted.append((user.name, item.id))
            result.submit_seconds.append(elapsed)
        return True

    def work(group: list[User]) -> None:
        active = group
        while active:
            active = [u for u in active if label_one(u)]

    if workers == 1:
        work(users)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, [users[i::workers] for i in range(workers)]))  # list(): re-raise any error
    return result
