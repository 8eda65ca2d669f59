"""The files of a compare report: summary.md, metrics.json, plots/*.png, responses.jsonl, report.html.

report.html is self-contained (its plots are embedded as base64 PNGs) so it can be mailed or
attached to a ticket. Every model-written string is HTML-escaped before it is placed there.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ci(ci: list[float] | None, fmt=pct) -> str:
    return "" if ci is None else f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def summary_markdown(metrics: dict[str, Any]) -> str:
    lines = [f"# Compare: {', '.join(metrics['models'])} on {metrics['n_prompts']} prompts of {metrics['prompts']}",
             ""]
    if kl_rows := _kl_rows(metrics):
        lines += ["| model | KL to its reference (nats per response) | reference |", "|---|---:|---|"]
        lines += [f"| {' | '.join(row)} |" for row in kl_rows]
        lines.append("")
    for judge, res in metrics["judges"].items():
        lines += [f"## Judge: {judge}", ""]
        if res["leaderboard"]:
            lines += ["| rank | model | rating (Elo scale) | 95% CI | mean score | mean length (words) |",
                      "|---:|---|---:|---|---:|---:|"]
            for r in res["leaderboard"]:
                score = "n/a" if r["mean_score"] is None else f"{r['mean_score']:.3f}"
                lines.append(f"| {r['rank']} | {r['model']} | {r['rating']:.0f} | "
                             f"[{r['ci95'][0]:.0f}, {r['ci95'][1]:.0f}] | {score} | {r['mean_length']:.1f} |")
            lines.append("")
        lines += ["| pair | win / tie / loss | win-rate | 95% CI | length-controlled |", "|---|---|---:|---|---:|"]
        for p in res["pairs"]:
            lines.append(f"| {p['a']} vs {p['b']} | {p['wins']} / {p['ties']} / {p['losses']} | {pct(p['win_rate'])} "
                         f"| {_ci(p['ci95'])} | {pct(p['lc_win_rate'])} {_ci(p['lc_ci95'])} |")
        lines.append("")
    if metrics["judge_agreement"]:
        lines += ["## Judge agreement", ""]
        for a in metrics["judge_agreement"]:
            lines.append(f"- {a['judges'][0]} and {a['judges'][1]} decide {pct(a['agreement'])} of "
                         f"{a['n']} shared battles alike")
        lines.append("")
    lines.append("Win-rates count ties as half. CIs are 95% bootstrap intervals. Lengths are in words.")
    return "\n".join(lines) + "\n"


def _kl_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """[model, KL, reference] for each model trained against a reference; none when no model was."""
    kl = metrics.get("kl_to_reference") or {}
    if all(v is None for v in kl.values()):
        return []
    refs = metrics.get("references", {})
    return [[m, "n/a" if kl.get(m) is None else f"{kl[m]:.3f}", refs.get(m) or "none"] for m in metrics["models"]]


def _plots(out: Path, metrics: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    judges = list(metrics["judges"].items())
    files = []

    fig, axes = plt.subplots(1, len(judges), figsize=(5 * len(judges), 0.6 * max(3, len(judges[0][1]["pairs"])) + 1.5),
                             squeeze=False)
    for ax, (judge, res) in zip(axes[0], judges):
        names = [f"{p['a']} vs {p['b']}" for p in res["pairs"]]
        rates = [p["win_rate"] for p in res["pairs"]]
        err = [[r - p["ci95"][0] for r, p in zip(rates, res["pairs"])],
               [p["ci95"][1] - r for r, p in zip(rates, res["pairs"])]]
        ax.barh(names, rates, xerr=err, color="#4c72b0", capsize=4)
        ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_title(f"win-rate, judge {judge}", fontsize=9)
    fig.tight_layout()
    files.append(out / "win_rates.png")
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)

    boards = [(j, r["leaderboard"]) for j, r in judges if r["leaderboard"]]
    if boards:
        fig, axes = plt.subplots(1, len(boards), figsize=(5 * len(boards), 3), squeeze=False)
        for ax, (judge, board) in zip(axes[0], boards):
            names = [r["model"] for r in board][::-1]
            ratings = [r["rating"] for r in board][::-1]
            err = [[r["rating"] - r["ci95"][0] for r in board][::-1], [r["ci95"][1] - r["rating"] for r in board][::-1]]
            ax.errorbar(ratings, names, xerr=err, fmt="o", capsize=4)
            ax.set_title(f"Bradley–Terry rating, judge {judge}", fontsize=9)
        fig.tight_layout()
        files.append(out / "leaderboard.png")
        fig.savefig(files[-1], dpi=100)
        plt.close(fig)
    return files


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(out: Path, metrics: dict[str, Any], responses, scores_by_judge: dict[str, Any]) -> None:
    """Write every report file into `out` (the artifact's temporary directory)."""
    labels = list(metrics["models"])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    summary = summary_markdown(metrics)
    (out / "summary.md").write_text(summary)
    per_prompt = []
    for i, row in enumerate(responses.prompts):
        per_prompt.append({
            "prompt_id": row["prompt_id"], "prompt": row["prompt"],
            "responses": {m: {"text": responses.texts[m][i], "words": len(responses.texts[m][i].split()),
                              "scores": {j: s[m][i] for j, s in scores_by_judge.items() if s is not None}}
                          for m in labels}})
    (out / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in per_prompt))
    plots = _plots(out / "plots", metrics)

    parts = [f"<h1>{html.escape(summary.splitlines()[0].lstrip('# '))}</h1>"]
    if kl_rows := _kl_rows(metrics):
        parts.append(_table(["model", "KL to its reference (nats per response)", "reference"], kl_rows))
    for judge, res in metrics["judges"].items():
        parts.append(f"<h2>Judge: {html.escape(judge)}</h2>")
        if res["leaderboard"]:
            parts.append(_table(["rank", "model", "rating", "95% CI", "mean score", "mean length"], [
                [str(r["rank"]), r["model"], f"{r['rating']:.0f}", f"[{r['ci95'][0]:.0f}, {r['ci95'][1]:.0f}]",
                 "n/a" if r["mean_score"] is None else f"{r['mean_score']:.3f}", f"{r['mean_length']:.1f}"]
                for r in res["leaderboard"]]))
        parts.append(_table(["pair", "win / tie / loss", "win-rate", "95% CI", "length-controlled"], [
            [f"{p['a']} vs {p['b']}", f"{p['wins']} / {p['ties']} / {p['losses']}", pct(p["win_rate"]),
             _ci(p["ci95"]), f"{pct(p['lc_win_rate'])} {_ci(p['lc_ci95'])}"] for p in res["pairs"]]))
    for png in plots:
        data = base64.b64encode(png.read_bytes()).decode()
        parts.append(f'<p><img alt="{png.stem}" src="data:image/png;base64,{data}"></p>')
    parts.append("<h2>Responses, side by side</h2>")
    judges = [j for j, s in scores_by_judge.items() if s is not None]
    parts.append(_table(["prompt"] + labels, [
        [r["prompt"][-1]["content"]] + [
            r["responses"][m]["text"] + "".join(f"\n[{j}: {r['responses'][m]['scores'][j]:.2f}]" for j in judges)
            for m in labels] for r in per_prompt]))
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;white-space:pre-wrap}")
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>compare report</title>"
                                     f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
