"""PNG plots of an assessment (matplotlib, Agg backend: no display needed).

* ``score_vs_trainable.png``: average task score against trainable share (log x), one point per method;
* ``peak_memory.png``: peak training memory per method, one bar per task;
* ``step_time.png``: median training-step time per method, one bar per task.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .report import _name, grid, task_label


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def write_plots(rows: list[dict[str, Any]], folder: Path, title: str) -> list[str]:
    """Write the plots that the rows support; returns their paths relative to ``folder.parent``."""
    folder.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    written: list[str] = []
    tasks, methods, cell = grid(rows)

    points = []
    for m in methods:
        scores = [cell.get((t, m), {}).get("score") for t in tasks]
        share = next((cell[(t, m)]["trainable_percent"] for t in tasks
                      if cell.get((t, m), {}).get("trainable_percent")), None)
        if share and scores and all(s is not None for s in scores):
            points.append((_name(m), share, float(np.mean(scores))))
    if points:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, share, score in points:
            ax.scatter(share, score, s=40)
            ax.annotate(name, (share, score), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (% of the model, log scale)")
        ax.set_ylabel("average score over " + ", ".join(task_label(t) for t in tasks))
        ax.set_title(f"{title}: score against trainable share")
        ax.grid(True, which="both", alpha=0.3)
        written.append(_save(fig, folder / "score_vs_trainable.png", plt))

    for key, label, name in (("peak_memory_mb", "peak training memory (MB)", "peak_memory.png"),
                             ("median_step_ms", "median training-step time (ms)", "step_time.png")):
        values = np.array([[cell.get((t, m), {}).get(key) or np.nan for t in tasks] for m in methods], dtype=float)
        if np.isnan(values).all():
            continue
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(methods) * max(1, len(tasks)) ** 0.5))
        height = 0.8 / len(tasks)
        ys = np.arange(len(methods))
        for i, t in enumerate(tasks):
            ax.barh(ys + i * height, np.nan_to_num(values[:, i]), height=height, label=task_label(t))
        ax.set_yticks(ys + 0.4 - height / 2, [_name(m) for m in methods])
        ax.invert_yaxis()
        ax.set_xlabel(label)
        ax.set_title(f"{title}: {label.split(' (')[0]} per method")
        if len(tasks) > 1:
            ax.legend(fontsize=8)
        ax.grid(True, axis="x", alpha=0.3)
        written.append(_save(fig, folder / name, plt))
    return [str(Path(folder.name) / Path(p).name) for p in written]


def _save(fig: Any, path: Path, plt: Any) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
