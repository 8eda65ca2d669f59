"""The labeling store under load: simulated annotators label flat out, then every label is accounted for.

    python -m bench.label_load                              # 50 annotators, 60 s, on SQLite then PostgreSQL
    python -m bench.label_load --seconds 5 --annotators 8   # a quick look
    python -m bench.label_load --think 10,30 --seconds 120  # a realistic pace: a submit every 10-30 s each
    python -m bench.label_load --backend postgres --pg-url postgresql+psycopg2://me@dbhost/labels

Each backend gets a fresh database: a SQLite file in a temporary directory, or a fresh
schema in the PostgreSQL database at `--pg-url` (dropped afterwards). A ranking task set of
`--items` prompts x 4 responses, overlap 3, is loaded from a candidates artifact in a
temporary workspace, as `rlhf label load` does. Then every annotator, in its own thread,
loops `next_item` -> rank -> `submit` through the same API as the ranking page, with no
think time (or `--think MIN,MAX` seconds after each submit), until `--seconds` have passed. Its ranking is a Plackett-Luce sample
(`labeling_app.simulated.plackett_luce`) over scores drawn when the items were made.

Concurrency model: threads in one process sharing one `LabelStore` (one engine and
connection pool); each call opens its own session. That is how the app runs: every browser
tab is a Streamlit session, a thread of one server process, and `labeling_app/ui.py` caches
one `LabelStore` for all of them. So SQLite writers queue on the store's in-process writer
lock, and with more annotators than the pool's 30 connections some wait for a connection,
both inside the measured calls, as in the app. The GIL serialises the Python half of each
call (SQLAlchemy, the annotators' own few microseconds of work), but it does the same in the
Streamlit server, so threads are the representative model, not a handicap of it. Processes
would model several app servers on one database, which is not how `rlhf label serve` is
deployed. `client_cpu_util` (process CPU seconds / wall seconds) says whether the client
was the bottleneck: near 1.0 means GIL-bound, well below means the database was.

Figures per backend: submits/s (successful submits over the run's wall time), p50 / p95 /
p99 latency of the `submit` call in ms (and of `next_item`), and the audit:
- lost: (annotator, item) pairs whose `submit` returned but whose label is missing from the
  database, or holds another ranking than the one submitted;
- duplicated: labels beyond the first for one (annotator, item), counted both in the
  database and in the annotators' own records (one item submitted twice by one annotator);
- overfilled: items holding more labels than their overlap;
- extra: labels in the database no returned `submit` accounts for (e.g. a submit that
  raised after its commit); failed submits are counted in `submit_errors`.
Lost, duplicated and overfilled must all be zero. Results go to
bench/results/label_load-<time>.json, with a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
OVERLAP, RESPONSES, TEMPERATURE = 3, 4, 0.5
BACKENDS = ("sqlite", "postgres")


@dataclass
class Annotator:
    """What one simulated annotator saw: the submits that returned, and how long calls took."""

    name: str
    submitted: list[tuple[int, list[list[str]]]] = field(default_factory=list)  # (item id, ranking): submit returned
    submit_s: list[float] = field(default_factory=list)
    next_item_s: list[float] = field(default_factory=list)
    finished_at: list[float] = field(default_factory=list)  # perf_counter() at each returned submit
    errors: list[str] = field(default_factory=list)
    ran_out: bool = False


def candidate_rows(n_items: int, seed: int) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """`n_items` candidates rows and each response's hidden score, prompt_id -> {response_id: score}."""
    rng = random.Random(seed)
    rows, scores = [], {}
    for i in range(n_items):
        pid = f"p{i:06d}"
        scores[pid] = {f"r{j}": rng.gauss(0, 1) for j in range(RESPONSES)}
        rows.append({"prompt_id": pid, "prompt": [{"role": "user", "content": f"Question {i}: how do I reset it?"}],
                     "responses": [{"response_id": rid, "text": f"Answer {j} to question {i}. " * 8, "model": "bench"}
                                   for j, rid in enumerate(scores[pid])]})
    return rows, scores


def load_items(store, workdir: Path, n_items: int, seed: int) -> tuple[str, dict[str, dict[str, float]]]:
    """Load a fresh ranking task set the way `rlhf label load` does; return its name and the scores."""
    from labeling_app.labels import load_task_set
    from rlhf import data
    from rlhf.artifacts import ArtifactStore

    rows, scores = candidate_rows(n_items, seed)
    arts = ArtifactStore(workdir / "ws")
    with arts.create("dataset", "candidates", stage="generate", config={"schema": "candidates"}) as w:
        data.write_rows(w.path / data.DATA_FILE, rows)
    return load_task_set(store, arts, w.result.ref, overlap=OVERLAP).task_set.name, scores


def run_annotators(store, task_set: str, users: list, seconds: float, scores: dict[str, dict[str, float]],
                   seed: int, think: tuple[float, float] = (0.0, 0.0)) -> tuple[list[Annotator], float, float]:
    """Each annotator in its own thread: next_item -> submit until `seconds` pass, pausing a random
    `think` seconds (uniform in the range) after each submit, as a person reading the next item does.

    Returns the annotators, and the start (a perf_counter() reading) and wall time of the run.
    """
    from labeling_app.assign import next_item
    from labeling_app.labels import submit
    from labeling_app.simulated import plackett_luce

    annotators = [Annotator(user.name) for user in users]
    start = threading.Barrier(len(users) + 1)
    deadline = 0.0  # set once every thread is waiting at the barrier

    def work(user, me: Annotator) -> None:
        start.wait()
        if think[1] > 0:  # people do not all start at the same instant: a random offset within one pause
            time.sleep(random.Random(f"label-load:{seed}:{user.name}").uniform(0, think[1]))
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                got = next_item(store, user, task_set)
            except Exception as e:  # noqa: BLE001 -- counted and reported; the run goes on
                me.errors.append(f"next_item: {e!r}"[:300])
                continue
            me.next_item_s.append(time.perf_counter() - t0)
            if got is None:
                me.ran_out = True
                return
            item, _ = got
            ids = list(scores[item.prompt_id])
            rng = random.Random(f"label-load:{seed}:{user.name}:{item.prompt_id}")
            order = plackett_luce([scores[item.prompt_id][rid] / TEMPERATURE for rid in ids], rng)
            ranking = [[ids[i]] for i in order]
            t1 = time.perf_counter()
            try:
                submit(store, user, item.id, ranking)
            # A failed submit is not a believed one; next_item hands the same item back.
            except Exception as e:  # noqa: BLE001 -- counted and reported; the run goes on
                me.errors.append(f"submit: {e!r}"[:300])
                continue
            t2 = time.perf_counter()
            me.submit_s.append(t2 - t1)
            me.finished_at.append(t2)
            me.submitted.append((item.id, ranking))
            if think[1] > 0:
                time.sleep(min(rng.uniform(*think), max(0.0, deadline - time.perf_counter())))

    threads = [threading.Thread(target=work, args=(u, a), daemon=True) for u, a in zip(users, annotators)]
    for t in threads:
        t.start()
    began = time.perf_counter()
    deadline = began + seconds
    start.wait()
    for t in threads:
        t.join()
    return annotators, began, time.perf_counter() - began


def audit(store, task_set: str, annotators: list[Annotator]) -> dict[str, int]:
    """Compare what annotators believe they submitted with the labels in the database, by (annotator, item)."""
    from labeling_app.labels import label_records

    believed = Counter((a.name, item_id) for a in annotators for item_id, _ in a.submitted)
    rankings = {(a.name, item_id): ranking for a in annotators for item_id, ranking in a.submitted}
    records = label_records(store, task_set)
    stored = Counter((r.annotator, r.item_id) for r in records)
    stored_rankings = {(r.annotator, r.item_id): r.ranking for r in records}
    per_item = Counter(r.item_id for r in records)
    return {"labels_in_db": len(records),
            # Missing, or stored with another ranking than the one submitted: either way the judgement is gone.
            "lost": sum(1 for key in believed if stored_rankings.get(key) != rankings[key]),
            "duplicated": sum(n - 1 for n in stored.values()) + sum(n - 1 for n in believed.values()),
            "overfilled": sum(1 for n in per_item.values() if n > OVERLAP),
            "extra": sum(1 for key in stored if key not in believed)}


def percentiles_ms(seconds: list[float]) -> dict[str, float | None]:
    if len(seconds) < 2:
        return {"p50": None, "p95": None, "p99": None}
    q = statistics.quantiles(seconds, n=100, method="inclusive")
    return {"p50": q[49] * 1000, "p95": q[94] * 1000, "p99": q[98] * 1000}


def per_window(annotators: list[Annotator], began: float, wall_s: float, window_s: float) -> list[float]:
    """Submits/s in consecutive windows: shows whether throughput holds up as the tables grow."""
    n = max(1, round(wall_s / window_s))
    counts = Counter(min(int((t - began) / window_s), n - 1) for a in annotators for t in a.finished_at)
    return [round(counts[i] / window_s, 1) for i in range(n)]


def measure(url: str, workdir: Path, annotators: int, seconds: float, items: int, seed: int = 0,
            think: tuple[float, float] = (0.0, 0.0)) -> dict:
    """One backend's run: fresh task set, `annotators` threads for `seconds`, then the audit."""
    from labeling_app.auth import add_user
    from labeling_app.store import LabelStore

    store = LabelStore(url)
    try:
        t0 = time.perf_counter()
        task_set, scores = load_items(store, workdir, items, seed)
        load_s = time.perf_counter() - t0
        users = [add_user(store, f"sim-{i:03d}")[0] for i in range(annotators)]
        cpu0 = time.process_time()
        sims, began, wall_s = run_annotators(store, task_set, users, seconds, scores, seed, think)
        cpu_s = time.process_time() - cpu0
        submit_s = [s for a in sims for s in a.submit_s]
        errors = [e for a in sims for e in a.errors]
        return {"dialect": store.dialect, "annotators": annotators, "seconds": seconds, "think_s": list(think),
                "items": items,
                "overlap": OVERLAP, "load_s": round(load_s, 1), "wall_s": round(wall_s, 3), "submits": len(submit_s),
                "submits_per_s": len(submit_s) / wall_s, "submit_ms": percentiles_ms(submit_s),
                "next_item_ms": percentiles_ms([s for a in sims for s in a.next_item_s]),
                "submits_per_s_by_window": per_window(sims, began, wall_s, max(1.0, seconds / 6)),
                "client_cpu_util": round(cpu_s / wall_s, 2),
                "submit_errors": sum(e.startswith("submit") for e in errors),
                "next_item_errors": sum(e.startswith("next_item") for e in errors),
                "first_errors": errors[:5], "ran_out": sum(a.ran_out for a in sims),
                **audit(store, task_set, sims)}
    finally:
        store.close()


@contextmanager
def sqlite_url() -> Iterator[tuple[str, Path]]:
    with tempfile.TemporaryDirectory(prefix="label-load-sqlite-") as d:
        yield f"sqlite:///{Path(d) / 'labels.db'}", Path(d)


@contextmanager
def pg_url(admin_url: str) -> Iterator[tuple[str, Path]]:
    """A URL into a fresh schema of `admin_url`'s database, dropped (with everything in it) afterwards."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    from labeling_app.store import scratch_schema

    with ExitStack() as stack:
        try:
            url = stack.enter_context(scratch_schema(admin_url, "label_load"))
        except OperationalError as e:
            raise SystemExit(f"PostgreSQL at {make_url(admin_url).render_as_string(hide_password=True)} is unusable "
                             f"({str(e.orig).strip().splitlines()[0]}); pass --pg-url, or --backend sqlite") from None
        yield url, Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="label-load-pg-")))


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def markdown_table(results: dict[str, dict]) -> str:
    lines = ["| backend | annotators | s | submits | submits/s | submit p50 ms | p95 ms | p99 ms | lost | duplicated |"
             " overfilled | errors |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        q = r["submit_ms"]
        lines.append(f"| {name} | {r['annotators']} | {r['seconds']:g} | {r['submits']} | {r['submits_per_s']:.1f} | "
                     f"{_ms(q['p50'])} | {_ms(q['p95'])} | {_ms(q['p99'])} | {r['lost']} | {r['duplicated']} | "
                     f"{r['overfilled']} | {r['submit_errors'] + r['next_item_errors']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=BACKENDS, action="append",
                   help="sqlite or postgres; repeat for both (default: both)")
    p.add_argument("--annotators", type=int, default=50)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--items", type=int, default=20_000,
                   help="prompts in the task set (x3 overlap); enough that nobody runs out (default 20000)")
    p.add_argument("--pg-url", default=DEFAULT_PG_URL, help=f"PostgreSQL database to use (default {DEFAULT_PG_URL})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--think", type=lambda v: tuple(float(x) for x in v.split(",")), default=(0.0, 0.0),
                   metavar="MIN,MAX", help="seconds each annotator pauses after a submit, uniform in MIN..MAX "
                                           "(default 0,0: flat out); a realistic pace is 10,30")
    args = p.parse_args(argv)
    if args.annotators < 1 or args.seconds <= 0 or args.items < 1:
        p.error("--annotators, --seconds and --items must be positive")
    if len(args.think) != 2 or not 0 <= args.think[0] <= args.think[1]:
        p.error("--think takes MIN,MAX seconds with 0 <= MIN <= MAX, e.g. --think 10,30")

    from sqlalchemy.engine import make_url

    results = {}
    for backend in args.backend or BACKENDS:
        print(f"{backend}: {args.annotators} annotators for {args.seconds:g} s ...", flush=True)
        with sqlite_url() if backend == "sqlite" else pg_url(args.pg_url) as (url, workdir):
            results[backend] = measure(url, workdir, args.annotators, args.seconds, args.items, args.seed,
                                       args.think)
        if results[backend]["ran_out"]:
            print(f"warning: {results[backend]['ran_out']} annotators ran out of items; raise --items", flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"label_load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    safe_pg = make_url(args.pg_url).render_as_string(hide_password=True)
    out.write_text(json.dumps({"args": vars(args) | {"pg_url": safe_pg}, "backends": results}, indent=2))
    print("\n" + markdown_table(results) + f"\n\nwrote {out}")
    bad = [b for b, r in results.items() if r["lost"] or r["duplicated"] or r["overfilled"]]
    if bad:
        print(f"FAILED: labels lost, duplicated or overfilled on {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
