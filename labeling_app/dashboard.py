"""What the engineers' dashboard shows, gathered from the artifact store. No Streamlit here.

    rows = artifact_rows(store)                 # one row per artifact version
    dot = lineage_dot(store, "checkpoints/ppo:v1")   # Graphviz DOT of that version's ancestry
    curves = training_curves(store.resolve("sft:latest"))
    reports = compare_reports(store)            # every `rlhf compare` report, judge by judge

`views/dashboard.py` draws these; the unit tests check them without a page. Everything is
read from manifests and the files stages write (`logs/train_log.jsonl` from the TRL stages,
`logs/ppo_log.jsonl` and `logs/evals.jsonl` from PPO, `metrics.json` from compare), so the
dashboard needs no stage code.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from labeling_app.export import STAGE as EXPORT_STAGE
from rlhf.artifacts import Artifact, ArtifactStore
from rlhf.report import pct
from rlhf.training import LOGS_DIR, PPO_EVALS, PPO_LOG, TRAIN_LOG

# Shown first in an artifact's one-line summary, when present: the numbers an engineer
# looks for per stage (loss for SFT/DPO, accuracy for reward, score and KL for PPO, sizes for data).
KEY_METRICS = ("eval_loss", "eval_accuracy", "eval_score", "final_kl", "rows", "votes", "n_prompts")
SUMMARY_LEN = 4
# The trainer's last log entry summarises the whole run at the final step; as curves they
# would be single points, and `train_loss` would read as a second loss curve.
RUN_SUMMARY_KEYS = frozenset({"train_runtime", "train_samples_per_second", "train_steps_per_second",
                              "total_flos", "train_loss"})
KIND_COLOURS = {"dataset": "#dbeafe", "checkpoint": "#fef3c7", "report": "#e5e7eb"}


# -- the artifact table ------------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)
    return str(v)


def metrics_summary(metrics: dict[str, Any], limit: int = SUMMARY_LEN) -> str:
    """A few scalar metrics as `key=value`, the stage's key metrics first."""
    scalars = [k for k, v in metrics.items() if _is_number(v)]
    keys = [k for k in KEY_METRICS if k in scalars] + [k for k in scalars if k not in KEY_METRICS]
    return ", ".join(f"{k}={_fmt(metrics[k])}" for k in keys[:limit])


def artifact_rows(store: ArtifactStore) -> list[dict[str, Any]]:
    """One row per artifact version: ref, kind, stage, created_at, content hash prefix, key metrics."""
    return [{"ref": a.ref, "kind": a.kind, "stage": a.manifest.get("stage", ""),
             "created_at": a.manifest.get("created_at", ""), "hash": a.content_hash[:12],
             "metrics": metrics_summary(a.manifest.get("metrics") or {})}
            for a in store.list()]


def metrics_table(artifact: Artifact) -> list[dict[str, str]]:
    """A manifest's metrics as (metric, value) rows; values as text, since they mix numbers, lists and dicts."""
    return [{"metric": k, "value": _fmt(v)} for k, v in (artifact.manifest.get("metrics") or {}).items()]


# -- lineage ---------------------------------------------------------------------------------------


def _dot_str(text: str) -> str:
    """`text` as a quoted DOT string. Newlines become DOT's `\\n` line breaks."""
    lines = (line.replace("\\", "\\\\").replace('"', '\\"') for line in text.split("\n"))
    return '"' + "\\n".join(lines) + '"'


def _input_node(inp: dict[str, Any]) -> str:
    """The node id of one manifest input: its ref, or for a raw file input (which has no ref) its path."""
    return inp["ref"] if "ref" in inp else f"file:{inp.get('file', '?')}"


def _ancestry(by_ref: dict[str, Artifact], ref: str) -> list[Artifact]:
    """`ref` and every artifact it was built from, found through manifest inputs."""
    seen, order, queue = {ref}, [], deque([ref])
    while queue:
        art = by_ref.get(queue.popleft())
        if art is None:
            continue  # an input missing from this workspace: drawn as a dangling node
        order.append(art)
        for inp in art.manifest.get("inputs", []):
            if "ref" in inp and inp["ref"] not in seen:
                seen.add(inp["ref"])
                queue.append(inp["ref"])
    return order


def lineage_dot(store: ArtifactStore, ref: str | None = None) -> str:
    """The artifact graph as Graphviz DOT: an edge from each input to the artifact built from it,
    labelled by the input's role. With `ref`, only that artifact's ancestry.

    As in `rlhf artifacts lineage`, an input whose content hash no longer matches is marked
    "changed", and one missing from the workspace is drawn dashed.
    """
    by_ref = {a.ref: a for a in store.list()}
    arts = list(by_ref.values()) if ref is None else _ancestry(by_ref, store.resolve(ref).ref)
    lines = ["digraph lineage {", "  rankdir=LR;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
             '  edge [fontname="Helvetica", fontsize=9];']
    extra: dict[str, str] = {}  # nodes for inputs that are not artifacts here: files and missing refs
    for art in arts:
        label = f"{art.ref}\n[{art.manifest.get('stage', '')}] @{art.content_hash[:8]}"
        lines.append(f"  {_dot_str(art.ref)} [label={_dot_str(label)}, fillcolor=\"{KIND_COLOURS[art.kind]}\"];")
    for art in arts:
        for inp in art.manifest.get("inputs", []):
            node = _input_node(inp)
            parent = by_ref.get(node)
            if "file" in inp:
                label = f"file {Path(inp['file']).name}\nsha256 {inp.get('sha256', '')[:8]}"
                extra[node] = f'[label={_dot_str(label)}, shape=note, fillcolor="white"]'
            elif parent is None:
                extra[node] = f'[label={_dot_str(node + " (missing)")}, style="rounded,dashed"]'
            changed = parent is not None and parent.content_hash != inp.get("content_hash")
            role = inp.get("role", "") + (" (changed)" if changed else "")
            colour = ', color="#c0392b", fontcolor="#c0392b"' if changed else ""
            lines.append(f"  {_dot_str(node)} -> {_dot_str(art.ref)} [label={_dot_str(role)}{colour}];")
    lines += [f"  {_dot_str(node)} {attrs};" for node, attrs in extra.items()]
    lines.append("}")
    return "\n".join(lines)


# -- curves ----------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]] | None:
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _numeric_frame(entries: Iterable[dict[str, Any]], index: str, drop: Iterable[str] = ()) -> pd.DataFrame:
    """One row per `index` value and one column per numeric key; entries at the same index merge."""
    drop = set(drop)
    rows = [{k: v for k, v in e.items() if _is_number(v) and k not in drop} for e in entries if index in e]
    if not rows:
        return pd.DataFrame(index=pd.Index([], name=index))
    # A step can have a training entry and an evaluation entry; first() takes each column's
    # first non-missing value, so they become one row.
    return pd.DataFrame(rows).groupby(index).first().sort_index()


def training_curves(artifact: Artifact) -> pd.DataFrame | None:
    """The TRL log history (`logs/train_log.jsonl`) indexed by `step`, one column per logged number
    (`loss`, `eval_loss`, `learning_rate`, ...), NaN where a step did not log it. None without a log."""
    entries = _read_jsonl(artifact.path / LOGS_DIR / TRAIN_LOG)
    if entries is None:
        return None
    return _numeric_frame(entries, "step", drop=RUN_SUMMARY_KEYS)


def long_form(frame: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """`columns` of a step- or iteration-indexed frame as (x, curve, value) rows, missing values dropped.

    A chart of the wide frame breaks each line at every missing value, so a curve logged at
    other steps than the rest (eval_loss every eval_steps, the held-out PPO score every
    eval_every) would show as scattered points, or nothing.
    """
    x = frame.index.name
    return frame[list(columns)].reset_index().melt(id_vars=x, var_name="curve").dropna()


@dataclass
class PPOCurves:
    iterations: pd.DataFrame  # `logs/ppo_log.jsonl`, indexed by iteration: score, kl, entropy, clipfrac, ...
    evals: pd.DataFrame       # `logs/evals.jsonl`, indexed by iteration: held-out score and kl

    def scores(self) -> pd.DataFrame:
        """The rollout score per iteration beside the held-out score where it was evaluated (NaN elsewhere)."""
        parts = [self.iterations[["score"]].rename(columns={"score": "rollout score"})]
        if "score" in self.evals:
            parts.append(self.evals[["score"]].rename(columns={"score": "held-out score"}))
        return pd.concat(parts, axis=1).sort_index().rename_axis("iteration")


def ppo_curves(artifact: Artifact) -> PPOCurves | None:
    """Per-iteration PPO diagnostics and the held-out evaluations; None without a PPO log."""
    history = _read_jsonl(artifact.path / LOGS_DIR / PPO_LOG)
    if history is None:
        return None
    evals = _read_jsonl(artifact.path / LOGS_DIR / PPO_EVALS) or []
    return PPOCurves(_numeric_frame(history, "iteration"), _numeric_frame(evals, "iteration"))


def plot_images(artifact: Artifact) -> list[Path]:
    """The plots a stage saved with the artifact: `logs/*.png` (loss, PPO curves) and `report/*.png`
    (the reward model's margin histogram)."""
    return [p for d in (LOGS_DIR, "report") for p in sorted((artifact.path / d).glob("*.png"))]


# -- compare reports -------------------------------------------------------------------------------


def pct_ci(rate: float | None, ci: list[float] | None) -> str:
    """A rate with its 95% interval, e.g. `60.4% [52.0%, 68.0%]`."""
    if rate is None:
        return "n/a"
    return pct(rate) if not ci else f"{pct(rate)} [{pct(ci[0])}, {pct(ci[1])}]"


@dataclass
class JudgeTables:
    leaderboard: pd.DataFrame  # one row per model, best first; empty for two models
    pairs: pd.DataFrame        # one row per model pair


@dataclass
class CompareReport:
    ref: str
    created_at: str
    models: dict[str, str]     # short name -> checkpoint ref
    prompts: str
    n_prompts: int | None
    mean_length: dict[str, float]
    judges: dict[str, JudgeTables]
    agreement: pd.DataFrame    # judge pairs and how often they pick the same winner
    raw: dict[str, Any] = field(repr=False)


def _leaderboard(rows: list[dict[str, Any]]) -> pd.DataFrame:
    columns = ["rank", "model", "rating", "95% CI", "mean score", "mean length"]
    return pd.DataFrame([{"rank": r.get("rank"), "model": r["model"], "rating": round(r["rating"], 1),
                          "95% CI": "{:.1f} – {:.1f}".format(*r["ci95"]) if r.get("ci95") else "n/a",
                          "mean score": r.get("mean_score"), "mean length": r.get("mean_length")}
                         for r in sorted(rows, key=lambda r: r.get("rank", 0))], columns=columns)


def _pairs(rows: list[dict[str, Any]]) -> pd.DataFrame:
    columns = ["a", "b", "a wins", "ties", "b wins", "n", "a's win rate [95% CI]", "length-controlled"]
    return pd.DataFrame([{"a": p["a"], "b": p["b"], "a wins": p["wins"], "ties": p["ties"], "b wins": p["losses"],
                          "n": p["n"], "a's win rate [95% CI]": pct_ci(p.get("win_rate"), p.get("ci95")),
                          "length-controlled": pct_ci(p.get("lc_win_rate"), p.get("lc_ci95"))} for p in rows], columns=columns)


def _agreement(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame([{"judges": " vs ".join(a["judges"]), "agreement": pct(a.get("agreement")), "n": a.get("n")}
                         for a in rows], columns=["judges", "agreement", "n"])


def compare_reports(store: ArtifactStore) -> list[CompareReport]:
    """Every compare report (kind report, stage compare) with a `metrics.json`, newest last.

    The schema (`rlhf compare`'s contract): models, prompts, n_prompts, mean_length,
    judges.<name>.{mean_score, pairs, leaderboard}, judge_agreement. `lc_win_rate` may be
    null (and `lc_ci95`, its interval, null or absent), a leaderboard may be empty and
    `judge_agreement` may be an empty list.
    """
    reports = []
    for art in store.list():
        path = art.path / "metrics.json"
        if art.kind != "report" or art.manifest.get("stage") != "compare" or not path.is_file():
            continue
        m = json.loads(path.read_text())
        judges = {name: JudgeTables(_leaderboard(j.get("leaderboard") or []), _pairs(j.get("pairs") or []))
                  for name, j in (m.get("judges") or {}).items()}
        reports.append(CompareReport(art.ref, art.manifest.get("created_at", ""), m.get("models") or {},
                                     m.get("prompts", ""), m.get("n_prompts"), m.get("mean_length") or {},
                                     judges, _agreement(m.get("judge_agreement") or []), m))
    return sorted(reports, key=lambda r: r.created_at)


# -- human labels versus reward models -------------------------------------------------------------


@dataclass
class RewardAgreement:
    reward_models: pd.DataFrame  # each reward checkpoint's held-out accuracy on its preference data
    human_judges: pd.DataFrame   # compare reports' agreement between a human judge and another judge


def reward_agreement(store: ArtifactStore) -> RewardAgreement:
    """How well reward models agree with the preferences they learned from, and with human judges.

    A reward checkpoint's `eval_accuracy` is the fraction of held-out preference pairs it
    orders as the labels do; when its `data` input came from `rlhf label export`, that is
    agreement with human annotators.
    """
    arts = store.list()
    by_ref = {a.ref: a for a in arts}
    rows = []
    for art in arts:
        if art.kind != "checkpoint" or art.manifest.get("stage") != "reward":
            continue
        metrics = art.manifest.get("metrics") or {}
        data_input = art.input("data") or {}
        dataset = by_ref.get(data_input.get("ref", ""))
        source = dataset.manifest.get("stage", "") if dataset else "missing"
        rows.append({"reward model": art.ref, "preference data": data_input.get("ref", data_input.get("file", "")),
                     "human labels": source == EXPORT_STAGE, "data from": source,
                     "held-out accuracy [95% CI]": pct_ci(metrics.get("eval_accuracy"), metrics.get("eval_accuracy_ci95")),
                     "eval pairs": metrics.get("eval_pairs")})
    humans = [{"report": r.ref, "judges": " vs ".join(a["judges"]), "agreement": pct(a.get("agreement")),
               "n": a.get("n")}
              for r in compare_reports(store) for a in r.raw.get("judge_agreement") or []
              if any(str(j).startswith("human:") for j in a["judges"])]
    return RewardAgreement(
        pd.DataFrame(rows, columns=["reward model", "preference data", "human labels", "data from",
                                    "held-out accuracy [95% CI]", "eval pairs"]),
        pd.DataFrame(humans, columns=["report", "judges", "agreement", "n"]))
