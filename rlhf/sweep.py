"""`rlhf sweep <stage>`: grid, random or TPE search over a training stage's config.

    rlhf sweep sft lora.r=8,16 train.learning_rate=1e-4,5e-5            # grid: 4 trials
    rlhf sweep sft --search random --trials 8 train.learning_rate=log:1e-5..1e-3 lora.r=8,16,32
    rlhf sweep reward --search tpe --trials 12 --metric eval_accuracy train.learning_rate=log:1e-5..1e-3

An override whose value lists several values (`a,b,c`; brackets keep a list whole:
`data=[a:v1,b:v1]`) or a range (`lo..hi`, `log:lo..hi`; random and TPE search only) is an
axis of the search; every other override, and `--config`, is shared by all trials.

Each trial is an ordinary run of the stage, published as `checkpoints/<output>-sweep/vK`
(`sft-sweep` unless `output=` says otherwise), so a sweep never moves `sft:latest`. A
trial is found again by its resolved config and the content of its inputs, so running the
same command again resumes: finished trials are read back, not retrained. Random and TPE
search (Optuna, seeded) replay the same suggestions given the same results, so they resume
too. The sweep writes `reports/<name>/vK` (default `sweep`): summary.md with the table of
trials, metrics.json, plots/sweep.png and the best trial's ref.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from pydantic import BaseModel

from rlhf.artifacts import Artifact, ArtifactStore, check_name
from rlhf.config import dump, load_config
from rlhf.errors import RlhfError

log = logging.getLogger(__name__)
SEARCHES = ("grid", "random", "tpe")
# Metrics shown next to the searched one in the table, where a stage reports them.
SHOWN_METRICS = ("eval_loss", "eval_accuracy", "eval_reward_accuracy", "train_loss", "trainable_params", "steps",
                 "wall_s")
# Config fields that hold refs, and the kind each resolves to: a trial's identity includes their content.
REF_FIELDS = {"model": "checkpoint", "reward": "checkpoint", "data": "dataset", "eval_data": "dataset"}


@dataclass(frozen=True)
class Axis:
    """One searched key: a list of raw override values, or a numeric range."""

    key: str
    values: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    @property
    def is_range(self) -> bool:
        return self.low is not None

    def describe(self) -> Any:
        if self.is_range:
            return {"low": self.low, "high": self.high, "log": self.log}
        return list(self.values)


# -- parsing ---------------------------------------------------------------------------------


def split_top_level(value: str) -> list[str]:
    """Split on commas outside brackets, braces and quotes: `a,[b,c]` -> `a`, `[b,c]`."""
    parts, depth, quote, current = [], 0, "", ""
    for ch in value:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += ch
    return parts + [current.strip()]


def _number(text: str, item: str) -> float | int:
    from rlhf.config import _yaml

    value = _yaml(text)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RlhfError(f"sweep range {item!r}: {text!r} is not a number; write e.g. train.learning_rate=log:1e-5..1e-3")
    return value


def parse_axes(overrides: list[str]) -> tuple[list[str], list[Axis]]:
    """Separate shared overrides from search axes (several values, or a range)."""
    fixed, axes = [], []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RlhfError(f"override {item!r} is not key=value; write e.g. lora.r=8,16")
        spec = value.removeprefix("log:")
        if ".." in spec and not spec.startswith(("[", "{", "'", '"')):
            lo, _, hi = spec.partition("..")
            low, high = _number(lo, item), _number(hi, item)
            if not low < high:
                raise RlhfError(f"sweep range {item!r}: the low end must be below the high end")
            is_log = value.startswith("log:")
            if is_log and low <= 0:
                raise RlhfError(f"sweep range {item!r}: a log range needs a positive low end")
            axes.append(Axis(key, low=low, high=high, log=is_log,
                             integer=isinstance(low, int) and isinstance(high, int)))
            continue
        values = split_top_level(value)
        if len(values) == 1:
            fixed.append(item)
        elif len(set(values)) < len(values) or not all(values):
            raise RlhfError(f"sweep axis {item!r} lists an empty or repeated value; give each value once")
        else:
            axes.append(Axis(key, values=tuple(values)))
    keys = [a.key for a in axes]
    if dup := next((k for k in keys if keys.count(k) > 1 or any(f.startswith(k + "=") for f in fixed)), None):
        raise RlhfError(f"sweep key {dup!r} is given more than once; give it once, with all its values")
    if "output" in keys:
        raise RlhfError("output cannot be a sweep axis: all trials of a sweep share one artifact name")
    if not axes:
        raise RlhfError("nothing to sweep: give at least one key with several values (lora.r=8,16) "
                        "or a range (train.learning_rate=log:1e-5..1e-3)")
    return fixed, axes


# -- trials ----------------------------------------------------------------------------------


@dataclass
class Sweep:
    stage: str
    config_cls: type[BaseModel]
    config_path: str | None
    fixed: list[str]
    axes: list[Axis]

    def config(self, point: dict[str, str]) -> BaseModel:
        """A trial's config: the shared settings, the point's values, and the sweep's output name."""
        overrides = self.fixed + [f"{k}={v}" for k, v in point.items()]
        cfg = load_config(self.config_cls, self.config_path, overrides)
        return cfg.model_copy(update={"output": f"{cfg.output}-sweep"})


def grid(axes: list[Axis]) -> list[dict[str, str]]:
    ranged = [a.key for a in axes if a.is_range]
    if ranged:
        raise RlhfError(f"grid search needs a list of values for {ranged[0]} (e.g. {ranged[0]}=1e-4,5e-5); "
                        "use --search random or tpe for a range")
    return [dict(zip([a.key for a in axes], combo)) for combo in itertools.product(*(a.values for a in axes))]


def _distributions(axes: list[Axis]) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for a in axes:
        if not a.is_range:
            out[a.key] = CategoricalDistribution(list(a.values))
        elif a.integer:
            out[a.key] = IntDistribution(int(a.low), int(a.high), log=a.log)
        else:
            out[a.key] = FloatDistribution(float(a.low), float(a.high), log=a.log)
    return out


def find_finished(store: ArtifactStore, cfg: BaseModel) -> Artifact | None:
    """A published trial with this exact resolved config, trained on the inputs its refs name now."""
    config = dump(cfg)
    current = set()
    for field, kind in REF_FIELDS.items():
        value = getattr(cfg, field, None)
        for ref in [value] if isinstance(value, str) else (value or []):
            current.add(store.resolve(ref, kind=kind).content_hash)
    for version in reversed(store.versions("checkpoint", cfg.output)):
        art = store.load("checkpoint", cfg.output, version)
        used = {i["content_hash"] for i in art.manifest.get("inputs", []) if "content_hash" in i}
        if art.manifest.get("config") == config and used <= current:
            return art
    return None


def metric_value(art: Artifact, metric: str) -> float:
    value = art.manifest.get("metrics", {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        numeric = sorted(k for k, v in art.manifest.get("metrics", {}).items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise RlhfError(f"--metric {metric} is not a number in {art.ref}'s metrics; choose one of "
                        f"{', '.join(numeric)} (finished trials are kept and reused on the next run)")
    return float(value)


def _points(search: str, axes: list[Axis], trials: int | None, seed: int, direction: str
            ) -> Iterator[tuple[dict[str, str], Callable[[float], None]]]:
    """(point, report its value) pairs: the grid in order, or Optuna's suggestions one at a time."""
    if search == "grid":
        for point in grid(axes):
            yield point, lambda value: None
        return
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = (optuna.samplers.RandomSampler(seed=seed) if search == "random"
               else optuna.samplers.TPESampler(seed=seed))
    study = optuna.create_study(direction=direction, sampler=sampler)
    distributions = _distributions(axes)
    for _ in range(trials):
        trial = study.ask(distributions)
        point = {a.key: (trial.params[a.key] if not a.is_range else repr(trial.params[a.key])) for a in axes}
        yield point, lambda value, trial=trial: study.tell(trial, value)


def run_sweep(store: ArtifactStore, sweep: Sweep, runner: Callable, check: Callable | None, *, search: str = "grid",
              trials: int | None = None, metric: str = "eval_loss", direction: str | None = None, seed: int = 0,
              name: str = "sweep", command: str = "") -> Artifact:
    """Run (or read back) every trial, then publish the report. Returns the report artifact."""
    if search not in SEARCHES:
        raise RlhfError(f"--search {search} is not a search; use one of {', '.join(SEARCHES)}")
    if search == "grid" and trials is not None:
        raise RlhfError("--trials applies to --search random or tpe; grid search runs every combination")
    if search != "grid" and not trials:
        raise RlhfError(f"--search {search} needs --trials N (how many configs to try)")
    direction = direction or ("minimize" if metric.endswith("loss") else "maximize")
    check_name(name)  # the report is written last: a bad --name must not cost the trials
    store.check_writable()

    # Every grid trial's config is checked before the first one trains; a searched trial's just before it runs.
    if search == "grid":
        for point in grid(sweep.axes):
            cfg = sweep.config(point)
            if check:
                check(cfg, store)
    records, best = [], None
    for i, (point, tell) in enumerate(_points(search, sweep.axes, trials, seed, direction), 1):
        cfg = sweep.config(point)
        art = find_finished(store, cfg)
        status = "reused"
        if art is None:
            if check:
                check(cfg, store)
            print(f"[sweep] trial {i}: {_params(point)}", flush=True)
            art, status = runner(cfg, store), "trained"
        value = metric_value(art, metric)
        tell(value)
        record = {"trial": i, "params": point, "ref": art.ref, "value": value, "status": status,
                  "metrics": {k: art.manifest["metrics"][k] for k in SHOWN_METRICS if k in art.manifest["metrics"]}}
        records.append(record)
        if best is None or (value < best["value"] if direction == "minimize" else value > best["value"]):
            best = record
        print(f"[sweep] trial {i}: {_params(point)} -> {art.ref} {metric}={value:.4g} ({status})", flush=True)

    metrics = {"stage": sweep.stage, "search": search, "metric": metric, "direction": direction, "seed": seed,
               "axes": {a.key: a.describe() for a in sweep.axes}, "trials": records,
               "best": {k: best[k] for k in ("trial", "ref", "value", "params")},
               "trained": sum(r["status"] == "trained" for r in records),
               "reused": sum(r["status"] == "reused" for r in records)}
    config = {"stage": sweep.stage, "config_file": sweep.config_path, "overrides": sweep.fixed,
              "axes": metrics["axes"], "search": search, "trials": trials, "metric": metric, "direction": direction,
              "seed": seed, "command": command}
    with store.create("report", name, stage="sweep", config=config) as w:
        write_report(w.path, metrics, command)
        for ref in dict.fromkeys(r["ref"] for r in records):  # a repeated suggestion is one input
            w.add_input("trial", store.resolve(ref))
        w.metrics.update({"best_ref": best["ref"], "best_value": best["value"], "metric": metric,
                          "trials": len(records), "trained": metrics["trained"], "reused": metrics["reused"]})
    return w.result


def _params(point: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items())


# -- report ----------------------------------------------------------------------------------


def summary_markdown(metrics: dict[str, Any], command: str) -> str:
    keys = list(metrics["axes"])
    shown = [k for k in SHOWN_METRICS if k != metrics["metric"] and any(k in r["metrics"] for r in metrics["trials"])]
    best = metrics["best"]
    lines = [f"# Sweep: {metrics['stage']}, {metrics['search']} search, {metrics['direction']} {metrics['metric']}", "",
             f"Best: trial {best['trial']}, `{best['ref']}`, {metrics['metric']} = {best['value']:.4g} "
             f"({_params(best['params'])})", "",
             f"Trials: {len(metrics['trials'])} ({metrics['trained']} trained now, {metrics['reused']} reused "
             "from earlier runs)", ""]
    if command:
        lines += ["Run again (finished trials are reused):", "", f"    {command}", ""]
    lines += ["| trial | " + " | ".join(keys) + f" | **{metrics['metric']}** | " + " | ".join(shown) + " | ref | status |",
              "|---:|" + "---|" * len(keys) + "---:|" + "---:|" * len(shown) + "---|---|"]
    for r in metrics["trials"]:
        mark = "best" if r["trial"] == best["trial"] else ""
        cells = [str(r["trial"]), *(str(r["params"][k]) for k in keys), f"{r['value']:.4g}",
                 *(_cell(r["metrics"].get(k)) for k in shown), f"`{r['ref']}`", f"{r['status']} {mark}".strip()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def plot(out: Path, metrics: dict[str, Any]) -> None:
    """The metric against each searched key, and by trial with the best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials, name = metrics["trials"], metrics["metric"]
    keys = list(metrics["axes"])
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4 * (len(keys) + 1), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        spec = metrics["axes"][key]
        xs = [r["params"][key] for r in trials]
        if isinstance(spec, dict):  # a range: a numeric axis
            xs = [float(x) for x in xs]
            if spec["log"]:
                ax.set_xscale("log")
        else:  # listed values, in the order given
            xs = [spec.index(x) for x in xs]
            ax.set_xticks(range(len(spec)), spec, rotation=20, fontsize=8)
        best = [r["trial"] == metrics["best"]["trial"] for r in trials]
        ax.scatter(xs, [r["value"] for r in trials], c=["#dd8452" if b else "#4c72b0" for b in best])
        ax.set_xlabel(key)
        ax.set_ylabel(name)
    ax = axes[0][-1]
    values = [r["value"] for r in trials]
    pick = min if metrics["direction"] == "minimize" else max
    ax.plot(range(1, len(values) + 1), values, "o", color="#4c72b0", label="trial")
    ax.step(range(1, len(values) + 1), [pick(values[:i + 1]) for i in range(len(values))], where="post",
            color="#dd8452", label="best so far")
    ax.set_xlabel("trial")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "sweep.png", dpi=100)
    plt.close(fig)


def write_report(out: Path, metrics: dict[str, Any], command: str) -> None:
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "summary.md").write_text(summary_markdown(metrics, command))
    plot(out / "plots", metrics)
