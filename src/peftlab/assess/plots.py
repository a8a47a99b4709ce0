"""PNG plots of an assessment (matplotlib, Agg backend: no display needed).

* ``score_vs_trainable.png``: per task, score against trainable share (log x) with seed error bars,
  full fine-tuning and the constant-prediction baseline as lines, and the Pareto front;
* ``peak_memory.png``: peak training memory per method, one bar per task, as a ratio to the frozen
  floor measured in the same run (MB where the runs have no floor);
* ``step_time.png``: training-step time per method, likewise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .report import method_title, grid, task_label
from .suites import FULL


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def write_plots(rows: list[dict[str, Any]], folder: Path, title: str) -> list[str]:
    """Write the plots that the rows support; returns their paths relative to ``folder.parent``."""
    folder.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    written: list[str] = []
    tasks, methods, cell = grid(rows)

    panels = [t for t in tasks if any(cell.get((t, m), {}).get("score") is not None for m in methods)]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
        for ax, task in zip(axes[0], panels):
            _score_panel(ax, task, methods, cell)
        fig.suptitle(f"{title}: score against trainable share, per task")
        written.append(save_figure(fig, folder / "score_vs_trainable.png", plt))

    floor = any(r.get("step_x_floor") is not None for r in rows)
    costs = ((("memory_x_floor", "peak training memory (× the frozen floor in the same run)", "peak_memory.png"),
              ("step_x_floor", "training-step time (× the frozen floor in the same run)", "step_time.png")) if floor
             else (("peak_memory_mb", "peak training memory (MB)", "peak_memory.png"),
                   ("median_step_ms", "median training-step time (ms)", "step_time.png")))
    for key, label, name in costs:
        values = np.array([[cell.get((t, m), {}).get(key) or np.nan for t in tasks] for m in methods], dtype=float)
        if np.isnan(values).all():
            continue
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(methods) * max(1, len(tasks)) ** 0.5))
        height = 0.8 / len(tasks)
        ys = np.arange(len(methods))
        for i, t in enumerate(tasks):
            ax.barh(ys + i * height, np.nan_to_num(values[:, i]), height=height, label=task_label(t))
        ax.set_yticks(ys + 0.4 - height / 2, [method_title(m) for m in methods])
        ax.invert_yaxis()
        ax.set_xlabel(label)
        if floor:
            ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)  # the floor itself
        ax.set_title(f"{title}: {label.split(' (')[0]} per method")
        if len(tasks) > 1:
            ax.legend(fontsize=8)
        ax.grid(True, axis="x", alpha=0.3)
        written.append(save_figure(fig, folder / name, plt))
    return [str(Path(folder.name) / Path(p).name) for p in written]


def _score_panel(ax: Any, task: str, methods: list[str], cell: dict[tuple[str, str], dict[str, Any]]) -> None:
    """One task: each PEFT method at (trainable share, mean score) with its seeds' std as an error
    bar; full fine-tuning and the constant-prediction baseline as reference lines (a task where
    they meet is at chance for everyone, and says so); the Pareto front (no method both smaller
    and better) joined by a line."""
    points = []
    for m in methods:
        row = cell.get((task, m), {})
        if row.get("score") is None:
            continue
        if m == FULL:
            ax.axhline(row["score"], color="black", linestyle="--", linewidth=1, label="full fine-tuning")
        elif row.get("trainable_percent"):
            points.append((row["trainable_percent"], row["score"], row.get("score_std") or 0.0, method_title(m)))
    baseline = next((cell[(task, m)]["baseline"] for m in methods if cell.get((task, m), {}).get("baseline") is not None),
                    None)
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle=":", linewidth=1, label="constant-prediction baseline")
    for share, score, std, name in points:
        ax.errorbar(share, score, yerr=std, fmt="o", capsize=3, markersize=5)
        ax.annotate(name, (share, score), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front, best = [], -np.inf
    for share, score, _, _ in sorted(points, key=lambda p: (p[0], -p[1])):
        if score > best:
            front.append((share, score))
            best = score
    if len(front) > 1:
        ax.plot(*zip(*front), color="tab:green", alpha=0.5, linewidth=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    ax.set_ylabel(f"{task_label(task)} score (mean over seeds, bars: std)")
    ax.set_title(task_label(task))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def save_figure(fig: Any, path: Path, plt: Any) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_search_front(result: Any, folder: str | Path) -> tuple[Path, Path]:
    """A search's trials (a :class:`~peftlab.core.search.SearchResult`): ``front.md`` (every trial, the
    Pareto front marked, the chosen one in bold; a trial's ``info["summary"]`` describes it) and
    ``front.png`` (held-out score against trained entries, log x; the front joined, the chosen ringed)."""
    from ..core.errors import PeftlabError

    if not result.trials:
        raise PeftlabError("write_search_front: the search result holds no trials; nothing to write")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    same = [i for i, t in enumerate(result.trials) if t.config == result.config]
    chosen = next((i for i in same if i in result.front), same[0] if same else None)
    rows = ["| trial | held-out score | trained entries | front | configuration |", "|---:|---:|---:|:---:|:---|"]
    for i, t in enumerate(result.trials):
        mark = ("**chosen**" if i == chosen else "yes") if i in result.front else ("chosen" if i == chosen else "")
        rows.append(f"| {i} | {t.score:.4f} | {t.trainable:,} | {mark} | {t.info.get('summary', t.config.method)} |")
    table = folder / "front.md"
    table.write_text(f"# {result.method} search: {len(result.trials)} trials, {result.seconds:.0f} s\n\n"
                     + "\n".join(rows) + "\n\n" + "\n".join(f"- {n}" for n in result.notes) + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([t.trainable for t in result.trials], [t.score for t in result.trials], c="0.6", label="trials")
    front = sorted(result.front, key=lambda i: result.trials[i].trainable)
    ax.plot([result.trials[i].trainable for i in front], [result.trials[i].score for i in front], "o-", c="C0",
            label="Pareto front")
    if chosen is not None:
        ax.scatter([result.trials[chosen].trainable], [result.trials[chosen].score], s=180, facecolors="none",
                   edgecolors="C3", linewidths=2, label="chosen")
    ax.set_xscale("log")
    ax.set_xlabel("trained entries (log)")
    ax.set_ylabel("held-out score")
    ax.set_title(f"{result.method}: {len(result.trials)} trials")
    ax.legend(loc="lower right")
    fig.tight_layout()
    plot = folder / "front.png"
    fig.savefig(plot, dpi=100)
    plt.close(fig)
    return table, plot
