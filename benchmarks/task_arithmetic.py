"""Task arithmetic over LoRA and L-LoRA adapters: single-task scores and the merged multi-task model.

The L-LoRA paper's experiment (Tang et al., ICLR 2024, section 5) at the size of a CPU: MiniLM
(all-MiniLM-L6-v2), three binary GLUE tasks (SST-2, CoLA, RTE), one adapter per task trained by
peftlab's GLUE job (its training loop), each with its own classification head trained alongside and
kept per task. Each method's task vectors are merged by task arithmetic in parameter space, as the
paper (and its code, ``tanganke/peta``) merges both methods::

    phi_merged = phi0 + lambda * sum_t (phi_t - phi0)      phi = every A and B of the adapter

``phi0`` is the adapters' common initialisation (plain LoRA: the same seed before each task's
adapter is made, as the paper's code seeds; L-LoRA: its ``init_seed``). The merged model scores task
t with task t's head. ``lambda`` is chosen per method from a grid, by the mean score over the tasks
on a held-out split of each task's training file (rows not trained on); the dev-set scores are
reported at that ``lambda``.

Run from the repository root (10 to 15 minutes on one CPU thread shared with other jobs)::

    OMP_NUM_THREADS=1 python -m benchmarks.task_arithmetic            # writes docs/task_arithmetic.md

Needs ``../shared`` (the model and the GLUE files).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from peftlab import LoraConfig, get_peft_model
from peftlab.core.layer import TrainableCopy
from peftlab.methods.reparameterized.l_lora import LLoraConfig
from peftlab.tasks.glue import get_glue_task, glue_metrics, load_glue
from peftlab.train.data import encode_pairs, make_loader
from peftlab.train.glue_job import HEADS, GlueRun, load_classifier, run_glue
from peftlab.train.loop import TrainArgs, predict

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT.parent / "shared" / "models" / "all-MiniLM-L6-v2")
DATA = str(ROOT.parent / "shared" / "data" / "glue")
TASKS = ("sst2", "cola", "rte")
LAMBDAS = (0.2, 0.4, 0.6, 0.8, 1.0)
METHODS = {
    "LoRA": LoraConfig(r=8, alpha=16, modules_to_save=HEADS),
    "L-LoRA": LLoraConfig(r=8, alpha=16, modules_to_save=HEADS),
}


def _fresh(config: Any, seed: int) -> tuple[Any, Any]:
    """The model exactly as ``run_glue`` builds it before training (same seed, same draws): its
    adapter state is ``phi0`` (plain LoRA's A is drawn from the global RNG right here)."""
    torch.manual_seed(seed)
    model, tokenizer = load_classifier(MODEL, 2)
    return get_peft_model(model, config), tokenizer


def _score(pm: Any, tokenizer: Any, task: str, examples: list, max_length: int) -> float:
    rows = encode_pairs(examples, tokenizer, max_length)
    logits, labels = predict(pm, make_loader(rows, tokenizer, 128, shuffle=False))
    return glue_metrics(get_glue_task(task), logits, labels)["score"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=1500, help="training rows per task (the file's first)")
    parser.add_argument("--held-out", type=int, default=150, help="rows after them, to choose lambda on")
    parser.add_argument("--dev", type=int, default=300, help="dev rows scored per task (the file's first)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "task_arithmetic.md"))
    parser.add_argument("--append", action="store_true", help="add this run's section to --out, not overwrite it")
    opts = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    started = time.perf_counter()
    max_length = 64
    args = TrainArgs(epochs=1.0, lr=opts.lr, seed=opts.seed, progress=False)
    held = {t: load_glue(t, DATA, "train", opts.train + opts.held_out)[opts.train:] for t in TASKS}
    dev = {t: load_glue(t, DATA, "dev", opts.dev) for t in TASKS}
    results: dict[str, Any] = {"settings": {**vars(opts), "tasks": TASKS, "lambdas": LAMBDAS, "max_length": max_length,
                                            "model": "all-MiniLM-L6-v2"},
                          "dev_rows": {t: len(v) for t, v in dev.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        for method, config in METHODS.items():
            single: dict[str, float] = {}
            states: dict[str, dict[str, torch.Tensor]] = {}
            for task in TASKS:
                run = GlueRun(model=MODEL, task=task, data_dir=DATA, train_limit=opts.train, eval_limit=opts.dev,
                              batch_size=opts.batch, max_length=max_length)
                out = Path(tmp) / method / task
                summary = run_glue(run, config, args, out)
                single[task] = summary["metrics"]["score"]
                states[task] = load_file(str(out / "adapter_model.safetensors"))
                print(f"{method} {task}: dev score {single[task]:.4f} ({summary['steps']} steps, "
                      f"{summary['wall_s']:.0f} s)", flush=True)
            pm, tokenizer = _fresh(config, opts.seed)
            pm.eval()
            phi0 = {k: v.detach().clone() for k, v in pm.adapter_state_dict().items()}
            heads = {k for k, (module, _, _) in pm._state_entries("default").items() if isinstance(module, TrainableCopy)}

            def merged(task: str, lam: float) -> dict[str, torch.Tensor]:
                # phi0 + lam * sum of task vectors for the adapter; task ``task``'s own head.
                return {k: states[task][k] if k in heads else
                        phi0[k] + lam * sum(states[t][k] - phi0[k] for t in TASKS) for k in phi0}

            held_scores: dict[float, dict[str, float]] = {}
            for lam in LAMBDAS:
                held_scores[lam] = {}
                for task in TASKS:
                    pm.load_adapter_state_dict("default", merged(task, lam))
                    held_scores[lam][task] = _score(pm, tokenizer, task, held[task], max_length)
                print(f"{method} lambda {lam}: held-out {held_scores[lam]}", flush=True)
            best = max(LAMBDAS, key=lambda lam: sum(held_scores[lam].values()))
            merged_dev = {}
            for task in TASKS:
                pm.load_adapter_state_dict("default", merged(task, best))
                merged_dev[task] = _score(pm, tokenizer, task, dev[task], max_length)
            print(f"{method} merged at lambda {best}: dev {merged_dev}", flush=True)
            results[method] = {"single": single, "held_out": {str(k): v for k, v in held_scores.items()},
                               "lambda": best, "merged": merged_dev}
    results["wall_s"] = time.perf_counter() - started
    out = Path(opts.out)
    text = (out.read_text() if opts.append and out.exists() else HEADER) + _section(results)
    out.write_text(text)
    print(json.dumps(results))
    print(f"wrote {opts.out} in {results['wall_s']:.0f} s")


HEADER = """# Task arithmetic: LoRA vs L-LoRA

Generated by `benchmarks/task_arithmetic.py` (edit that file, not this one): each section is one run,
`python -m benchmarks.task_arithmetic` for the first, `--lr 5e-3 --append` for the second.

Read with care: at this size (1,500 rows per task, one epoch, on one CPU thread) MiniLM learns
SST-2 only. CoLA stays at MCC 0 (one class predicted) and RTE near chance, so their task vectors
carry little beyond noise, and the merged scores show how much each method's SST-2 ability survives
the addition of two other task vectors rather than a multi-task score. One seed, small dev sets.
"""


def _section(r: dict[str, Any]) -> str:
    s = r["settings"]
    names = {"sst2": "SST-2 (acc)", "cola": "CoLA (MCC)", "rte": "RTE (acc)"}
    lines = [
        "",
        f"## lr {s['lr']}",
        "",
        f"MiniLM ({s['model']}), tasks {', '.join(names[t] for t in s['tasks'])}; per task the first {s['train']} "
        f"training rows, one epoch, batch {s['batch']}, lr {s['lr']}, max length {s['max_length']}, seed {s['seed']}; r 8, "
        "alpha 16, query and value; a classification head per task trained alongside and kept per task. "
        f"Merged: `phi0 + lambda * sum_t (phi_t - phi0)` over every A and B (the paper's task arithmetic, the same "
        f"for both methods); lambda chosen per method from {list(s['lambdas'])} by the mean score over the tasks on "
        f"{s['held_out']} held-out training rows per task; dev scores on the first {s['dev']} dev rows per task "
        f"(fewer where the dev set is smaller: {r['dev_rows']}). One seed: differences of a point or two are within "
        "run-to-run noise.",
        "",
        "| method | " + " | ".join(f"{names[t]} single" for t in s["tasks"]) + " | mean single | "
        + " | ".join(f"{names[t]} merged" for t in s["tasks"]) + " | mean merged | lambda |",
        "|---" * (2 * len(s["tasks"]) + 4) + "|",
    ]
    for method in ("LoRA", "L-LoRA"):
        m = r[method]
        single = [m["single"][t] for t in s["tasks"]]
        merged = [m["merged"][t] for t in s["tasks"]]
        lines.append(f"| {method} | " + " | ".join(f"{v:.3f}" for v in single) + f" | {sum(single) / len(single):.3f} | "
                     + " | ".join(f"{v:.3f}" for v in merged) + f" | {sum(merged) / len(merged):.3f} | {m['lambda']} |")
    lines += ["", "Held-out mean score of the merged model per lambda:", "",
              "| method | " + " | ".join(str(lam) for lam in s["lambdas"]) + " |",
              "|---" * (len(s["lambdas"]) + 1) + "|"]
    for method in ("LoRA", "L-LoRA"):
        held = r[method]["held_out"]
        lines.append(f"| {method} | " + " | ".join(
            f"{sum(held[str(lam)].values()) / len(held[str(lam)]):.3f}" for lam in s["lambdas"]) + " |")
    lines += ["", f"Wall time: {r['wall_s']:.0f} s (one CPU thread, shared with other jobs).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
