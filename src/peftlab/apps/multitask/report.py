"""The multi-task suite's report: Markdown tables and plots of the combinations and the transfer."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...assess.plots import pyplot, save_figure
from ...assess.report import method_title, markdown_table
from ...tasks.glue import get_glue_task
from .. import report_tail

_METRIC = {"accuracy": "acc.", "matthews_corr": "MCC", "f1": "F1"}


def _head(task: str) -> str:
    glue = get_glue_task(task)
    return f"{glue.dir_name} ({_METRIC.get(glue.main_metric, glue.main_metric)})"


def _mean(scores: dict[str, float]) -> str:
    return f"{np.mean(list(scores.values())):.1f}"


def single_rows(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    for r in results["single"]:
        rows.setdefault(r["method"], {})[r["task"]] = r["score"]
    return rows


def markdown(results: dict[str, Any]) -> str:
    s = results["suite"]
    tasks = list(s["tasks"])
    out = [f"# Multi-task learning: {', '.join(get_glue_task(t).dir_name for t in tasks)}; {Path(s['model']).name}", ""]
    out += [f"Each task: its first {s['train_limit']} training examples, {s['epochs']:g} epoch(s) at each method's "
            f"default learning rate × {s['lr_scale']:g}, seed {s['seed']}; scored on its first "
            f"{s['eval_limit'] or 'all'} dev examples by its main metric (CoLA: Matthews correlation × 100; the others: "
            f"accuracy %). Every head has {max(get_glue_task(t).num_labels for t in tasks)} outputs so that one model "
            "holds all the tasks' heads; a task with fewer classes has the extra outputs fixed at -10^4 (no probability, "
            "no gradient), so it trains and scores as a head of its own width. Merges and fusions combine the "
            "adapters; each task keeps its own head in front of the combined body.", ""]
    if results.get("wall_s"):
        out += [f"Wall time: {results['wall_s'] / 60:.1f} min with {results.get('threads')} torch threads.", ""]
    heads = [_head(t) for t in tasks]
    if results["single"]:
        out += ["## 1. One adapter per task", ""]
        rows = []
        trainable = {r["method"]: r["trainable_percent"] for r in results["single"]}
        for method, scores in single_rows(results).items():
            rows.append([method_title(method), f"{trainable[method]:.3g}"] + [f"{scores[t]:.1f}" if t in scores else "–"
                                                                       for t in tasks])
        out += [markdown_table(["Method", "Trainable %"] + heads, rows), ""]
    if results["combined"]:
        out += ["## 2. Combinations, scored on every task", ""]
        own = single_rows(results)
        rows = []
        for r in results["combined"]:
            base = own.get(s["merge_method"] if r["kind"] != "fusion" else s["fusion_adapter"], {})
            rows.append([r["combination"]] + [f"{r['scores'][t]:.1f}" for t in tasks] + [_mean(r["scores"]),
                        f"{np.mean([r['scores'][t] - base[t] for t in tasks if t in base]):+.1f}" if base else "–"])
        for method in (s["merge_method"], s["fusion_adapter"]):
            if set(own.get(method, {})) >= set(tasks):
                rows.insert(0 if method == s["merge_method"] else len(rows),
                            [f"each task's own {method_title(method)}"] + [f"{own[method][t]:.1f}" for t in tasks]
                            + [_mean({t: own[method][t] for t in tasks}), "0"])
        out += [markdown_table(["Combination"] + heads + ["Mean", "vs own adapters"], rows), "",
                "The merges are one adapter for all tasks (no training); each AdapterFusion is trained on its task, "
                "over every task's adapter; the joint adapter is trained once on every task's examples, each routed by "
                "its task id, with one head per task. 'vs own adapters': the mean change against "
                "each task's own adapter of the kind combined (for the joint adapter, the task LoRAs).", ""]
    if results["transfer"]:
        target = get_glue_task(s["target"])
        out += [f"## 3. Transfer to a low-resource {target.dir_name} ({s['target_shots']} training examples, "
                f"{s['target_epochs']:g} epochs)", ""]
        rows = []
        for r in results["transfer"]:
            extra = ""
            if "weights" in r:
                extra = "weights " + ", ".join(f"{t} {w:+.2f}" for t, w in r["weights"].items())
            rows.append([r["what"], f"{r['score']:.1f}", f"{r['trainable']:,}", f"{r['wall_s']:.0f}", extra])
        out += [markdown_table(["What", _head(s["target"]), "Trainable", "Seconds", "Notes"], rows), "",
                f"Training {target.dir_name} on its {s['train_limit']} examples instead: "
                + ", ".join(f"{method_title(m)} {v[s['target']]:.1f}" for m, v in single_rows(results).items()
                            if s["target"] in v) + ".", ""]
    m = results.get("mixed")
    if m:
        speed = m["mixed_examples_per_s"] / m["per_task_examples_per_s"]
        padded = (m["mixed_padded_tokens"] / m["mixed_s"]) / (m["per_task_padded_tokens"] / m["per_task_s"])
        out += ["## 4. Mixed-task batches", "",
                f"One model holding the {len(m['tasks'])} task {method_title(s['merge_method'])} adapters and heads; "
                f"{m['examples']} dev examples ({m['examples'] // len(m['tasks'])} per task), batches of "
                f"{m['batch_size']}, inference, best of {s['mixed_repeats']} passes.", "",
                markdown_table(["Batches", "Examples/s", "Seconds", "Padded tokens"], [
                    ["mixing the tasks (adapter_names per row)", f"{m['mixed_examples_per_s']:.0f}",
                     f"{m['mixed_s']:.2f}", f"{m['mixed_padded_tokens']:,}"],
                    ["one task per batch (set_adapter per batch)", f"{m['per_task_examples_per_s']:.0f}",
                     f"{m['per_task_s']:.2f}", f"{m['per_task_padded_tokens']:,}"]]), "",
                f"Mixed batches run at {speed:.2f}× the speed of one task per batch, and at {padded:.2f}× per padded "
                "token (the rest is the padding that mixing short and long examples in a batch adds); the largest "
                f"difference between the two ways' logits is {m['max_logit_difference']:.1e}.", ""]
    out += report_tail(results.get("notes", []), results.get("plots", []))
    return "\n".join(out)


def write_plots(results: dict[str, Any], folder: Path) -> list[str]:
    s = results["suite"]
    tasks = list(s["tasks"])
    plots = []
    if results["combined"]:
        plt = pyplot()
        own = single_rows(results)
        bars = [(f"own {method_title(m)}", own[m]) for m in (s["merge_method"], s["fusion_adapter"])
                if set(own.get(m, {})) >= set(tasks)]
        bars += [({"fusion": "AdapterFusion", "joint": f"{method_title(r['method'])} (joint)"}.get(r["kind"], r["kind"]),
                  r["scores"]) for r in results["combined"]]
        fig, ax = plt.subplots(figsize=(10, 4.2))
        width = 0.8 / len(bars)
        for i, (label, scores) in enumerate(bars):
            ax.bar(np.arange(len(tasks)) + i * width, [scores[t] for t in tasks], width, label=label)
        ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, [_head(t) for t in tasks])
        ax.set(ylabel="dev score", title="Task adapters and their combinations")
        ax.legend(fontsize=8)
        plots.append(save_figure(fig, folder / "multitask_combinations.png", plt))
    if results["transfer"]:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(10, 4.2))
        rows = results["transfer"]
        ax.barh(range(len(rows)), [r["score"] for r in rows], color=["#999" if r["kind"] == "alone" else "#36c"
                                                                       for r in rows])
        ax.set_yticks(range(len(rows)), [r["what"][:60] for r in rows], fontsize=7)
        ax.set(xlabel=_head(s["target"]), title=f"Transfer to {get_glue_task(s['target']).dir_name} "
                                                 f"({s['target_shots']} examples); grey: the target alone")
        plots.append(save_figure(fig, folder / "multitask_transfer.png", plt))
    return plots
