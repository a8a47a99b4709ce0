"""The cross-lingual suite's report: accuracy per language and method, the average and the
English-to-target gap, each stage's trainable parameters and wall time, and a bar plot."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...assess.plots import pyplot, save_figure
from ...assess.report import markdown_table
from .. import report_tail

TITLES = {"full": "Full fine-tuning", "adapter": "Task adapter", "madx": "MAD-X (language + invertible + task adapters)",
          "lt_sft": "LT-SFT (language SFT + task SFT)"}


def _title(method: str) -> str:
    return TITLES.get(method, method)


def accuracy_table(summary: list[dict[str, Any]], languages: list[str]) -> str:
    head = ["Method"] + languages + ["Average", "Gap (en − others)"]
    rows = []
    for row in summary:
        cells = [f"{row['scores'][c]:.1f}" if c in row["scores"] else "–" for c in languages]
        gap = f"{row['gap']:.1f}" if row["gap"] is not None else "–"
        rows.append([_title(row["method"])] + cells + [f"{row['average']:.1f}", gap])
    return markdown_table(head, rows)


def _partial_summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    from .suite import summary

    return results.get("summary") or summary(results)


def markdown(results: dict[str, Any]) -> str:
    s, d = results["suite"], results.get("data", {})
    languages = list(s["languages"])
    out = [f"# Cross-lingual transfer: English NLI to XNLI, {Path(s['model']).name}", ""]
    out += [f"Every method trains the task on English only: the first {s['train_limit']} pairs of GLUE MNLI train "
            f"({s['epochs']:g} epoch(s), batch {s['batch_size']}, max length {s['max_length']}); it is scored "
            f"zero-shot on XNLI dev in {', '.join(languages)}. Seed {s['seed']}.", ""]
    if d:
        out += [f"**Unlabelled text and evaluation split.** No unlabelled corpus is available, so each XNLI dev file "
                f"({d['xnli_pairs']:,} pairs, the same examples translated in the same order) is split by example "
                "index: the premises and hypotheses of the even-indexed pairs (labels unused; repeated premises kept "
                "once) are the language's unlabelled text for the language adapters and SFTs, and the odd-indexed "
                f"pairs are the evaluation set, of which the first {s['eval_limit'] or 'all'} are scored. No evaluated "
                "pair, in any language, is ever trained on. Sentences per language: "
                + ", ".join(f"{c} {n:,}" for c, n in d["unlabelled_sentences"].items()) + ".", ""]
    out += [f"**Language adaptation** (MAD-X and LT-SFT): {s['mlm_steps']} masked-language-modelling steps per "
            f"language, {s['mlm_batch_size']} sentences each (max length {s['mlm_max_length']}), masking "
            f"{100 * s['mlm_probability']:g} % of the tokens (80 % mask, 10 % random, 10 % kept); learning rates "
            f"{s['mlm_adapter_lr']:g} (adapters) and {s['mlm_sft_lr']:g} (SFTs). Task learning rates: full fine-tuning "
            f"{s['full_lr']:g}, adapters {s['adapter_lr']:g}, SFTs {s['sft_lr']:g}. Adapters: Pfeiffer placement "
            f"(after each feed-forward output), reduction factor {s['task_reduction_factor']:g} (task) and "
            f"{s['language_reduction_factor']:g} (language); MAD-X's invertible adapter: reduction factor "
            f"{s['invertible_reduction_factor']:g}. SFTs keep {100 * s['sft_keep_ratio']:g} % of the blocks' entries; "
            f"language SFTs L1 {s['language_l1_reg']:g}, task SFTs none.", ""]
    if results.get("wall_s"):
        out += [f"Wall time: {results['wall_s'] / 60:.1f} min with {results.get('threads')} torch threads.", ""]
    summary = _partial_summary(results) if results["accuracy"] else []
    if summary:
        n = min(d.get("evaluation", {"": 0}).values())
        out += ["## Accuracy on XNLI (%)", "", accuracy_table(summary, languages), "",
                "Average: over the languages scored, English included. Gap: English minus the mean of the other "
                f"languages (the transfer loss). Each cell scores {', '.join(f'{c} {n}' for c, n in d.get('evaluation', {}).items())} "
                f"pairs; with n pairs a cell's standard error is about 50/√n points ({50 / max(n, 1) ** 0.5:.1f} at "
                f"n = {n}), so differences of a few points between cells are noise.", ""]
    if results["stages"]:
        rows = [[_title(r["method"]), r["stage"], r["language"], f"{r['trainable']:,}", str(r["steps"]),
                 f"{r['final_loss']:.3f}", f"{r['wall_s']:.0f}"] for r in results["stages"]]
        out += ["## Stages: trainable parameters and wall time", "",
                markdown_table(["Method", "Stage", "Language", "Trainable", "Steps", "Final loss", "Seconds"], rows, 3), "",
                "Trainable: the entries the stage trains (for an SFT, its chosen entries; the language stages include "
                "the new MLM head, which the task never uses, and MAD-X's invertible adapter). Steps: optimizer steps; an SFT "
                "stage runs as many dense steps (LT-SFT's phase 1) before them. Seconds include loading the model where "
                "a method starts, not scoring.", ""]
        scoring = {}
        for r in results["accuracy"]:
            scoring[r["method"]] = scoring.get(r["method"], 0.0) + r["wall_s"]
        out += ["Scoring time per method (all languages): " + ", ".join(f"{_title(m)} {t:.0f} s"
                                                                         for m, t in scoring.items()) + ".", ""]
    out += report_tail(results.get("notes", []), results.get("plots", []))
    return "\n".join(out)


def write_plots(results: dict[str, Any], folder: Path) -> list[str]:
    summary = _partial_summary(results) if results["accuracy"] else []
    if not summary:
        return []
    languages = list(results["suite"]["languages"]) + ["average"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(languages) + 2), 4.2))
    width = 0.8 / len(summary)
    for i, row in enumerate(summary):
        values = [row["scores"].get(c, np.nan) for c in languages[:-1]] + [row["average"]]
        ax.bar(np.arange(len(languages)) + (i - (len(summary) - 1) / 2) * width, values, width, label=_title(row["method"]))
    ax.axhline(100 / 3, color="grey", linestyle=":", linewidth=1, label="chance (3 classes)")
    ax.set_xticks(np.arange(len(languages)), languages)
    ax.set(ylabel="XNLI accuracy (%)", ylim=(0, 100))
    ax.legend(fontsize=7)
    fig.suptitle("Zero-shot cross-lingual transfer from English NLI")
    return [save_figure(fig, folder / "crosslingual_accuracy.png", plt)]
