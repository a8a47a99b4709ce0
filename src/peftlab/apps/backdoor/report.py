"""The backdoor suite's report: Markdown tables and a plot of CACC and ASR against the poison share."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...assess.plots import pyplot, save_figure
from ...assess.report import method_title, markdown_table, method_order
from .. import report_tail


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def _by_cell(attack: list[dict[str, Any]]) -> tuple[list[str], list[float], dict[tuple[str, float], list[dict]]]:
    methods = method_order(r["method"] for r in attack)
    shares = sorted({r["share"] for r in attack})
    cell: dict[tuple[str, float], list[dict]] = {}
    for r in attack:
        cell.setdefault((r["method"], r["share"]), []).append(r)
    return methods, shares, cell


def attack_table(attack: list[dict[str, Any]]) -> str:
    methods, shares, cell = _by_cell(attack)
    head = ["Method", "Trainable %"] + [f"p = {p:g}: CACC / ASR" for p in shares]
    rows = []
    for m in methods:
        runs = [r for p in shares for r in cell.get((m, p), [])]
        row = [method_title(m), f"{runs[0]['trainable_percent']:.3g}"]
        for p in shares:
            got = cell.get((m, p), [])
            row.append(f"{_mean_std([r['cacc'] for r in got])} / {_mean_std([r['asr'] for r in got])}" if got else "–")
        rows.append(row)
    return markdown_table(head, rows)


def markdown(results: dict[str, Any]) -> str:
    s = results["suite"]
    out = [f"# Backdoor attack and defence: {s['task'].upper()}, {Path(s['model']).name}", ""]
    out += [f"Trigger {s['trigger']!r} (a rare word, Kurita et al. 2020) inserted at a random word position; target "
            f"label {s['target']}. Training: the first {s['train_limit']} training sentences, a share p of them "
            f"poisoned (drawn from those whose label is not the target), one run per method, share and seed "
            f"(seeds {', '.join(map(str, s['seeds']))}), {s['epochs']:g} epoch(s) at each method's default learning "
            f"rate × {s['lr_scale']:g} (full fine-tuning {s['full_lr']:g}). CACC: accuracy on the clean dev set. ASR: "
            "the share of dev sentences whose true label is not the target that the model assigns the target once "
            "the trigger is inserted. The poisoned data lives in memory only.", ""]
    if results.get("wall_s"):
        out += [f"Wall time: {results['wall_s'] / 60:.1f} min with {results.get('threads')} torch threads.", ""]
    if results["attack"]:
        out += ["## 1. Attack by data poisoning during training", "", attack_table(results["attack"]), ""]
        if 0.0 in {r["share"] for r in results["attack"]}:
            out += ["At p = 0 nothing is poisoned: the ASR there is the share of triggered non-target sentences the "
                    "clean model gets wrong anyway, the floor an attack is measured against.", ""]
    if results["shared"]:
        out += [f"## 2. A poisoned shared adapter ({method_title(s['shared_method'])}, p = {s['shared_share']:g})", "",
                "Adapter arithmetic combines the adapters; the two task heads (full trainable copies) are averaged "
                "for every merge type.", "",
                markdown_table(["What", "CACC", "ASR", "Seconds"], [[r["what"], f"{r['cacc']:.1f}", f"{r['asr']:.1f}",
                                                            f"{r['seconds']:.0f}" if r["seconds"] else "–"]
                                                           for r in results["shared"]]), ""]
    if results["defences"]:
        out += ["## 3. Defences of the poisoned adapter", ""]
        rows = []
        for r in results["defences"]:
            extra = (f"detects {100 * r['detected']:.1f} % of triggered inputs; false rejections {100 * r['frr']:.1f} % "
                     f"(threshold set for {100 * r['frr_target']:g} % on the other dev half); mean entropy clean "
                     f"{r['clean_entropy']:.3f}, triggered {r['triggered_entropy']:.3f}") if "frr" in r else \
                f"{r['reset_entries']:,} trained entries reset"
            rows.append([r["defence"], extra, r["evaluated_on"], r["cost"], f"{r['cacc']:.1f}", f"{r['asr']:.1f}",
                         f"{r['seconds']:.0f}"])
        out += [markdown_table(["Defence", "What it did", "Evaluated on", "Cost", "CACC", "ASR", "Seconds"], rows, 4), "",
                "STRIP's CACC is the accuracy on the clean inputs it accepts; its ASR counts a triggered input as a "
                "success only when STRIP accepts it and the model answers the target.", ""]
    d = results.get("detector")
    if d:
        out += ["## 4. Detecting poisoned adapters from their weights", "",
                f"{len(d['truth'])} {method_title(d['method'])} adapters trained on {d['train_limit']} sentences (half clean, "
                "half poisoned with varied triggers, shares and seeds); a logistic regression on per-tensor statistics "
                f"(log norm, log largest entry, kurtosis), scored leave-one-out: **accuracy {100 * d['accuracy']:.0f} %** "
                f"({d['false_alarms']} clean adapters flagged, {d['missed']} poisoned ones missed).", ""]
    out += report_tail(results.get("notes", []), results.get("plots", []))
    return "\n".join(out)


def write_plots(results: dict[str, Any], folder: Path) -> list[str]:
    methods, shares, cell = _by_cell(results["attack"])
    if not methods:
        return []
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in methods:
        xs = [p for p in shares if cell.get((m, p))]
        for ax, key in zip(axes, ("asr", "cacc")):
            ax.plot([100 * p for p in xs], [np.mean([r[key] for r in cell[(m, p)]]) for p in xs], marker="o",
                    label=method_title(m))
    axes[0].set(xlabel="poisoned share of the training set (%)", ylabel="attack success rate (%)", ylim=(0, 101))
    axes[1].set(xlabel="poisoned share of the training set (%)", ylabel="clean accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Backdoor by data poisoning: trigger {results['suite']['trigger']!r}")
    return [save_figure(fig, folder / "backdoor_attack.png", plt)]
