"""Calibration of Laplace-LoRA against plain LoRA (MAP) on SST-2 dev: accuracy, NLL and ECE.

The quick set-up: MiniLM (../shared/models/all-MiniLM-L6-v2), the first 5,000 SST-2 training examples,
max length 64, batch 32, one epoch, learning rate 4x LoRA's default, seed 0, through peftlab's own GLUE
pieces (:mod:`peftlab.train.glue_job`) and training loop, which runs Laplace-LoRA's post-hoc fit
(``after_training``) after the last step. Both methods train the same way from the same seed (Laplace-LoRA
trains as LoRA; the tests check the two train identically), so plain LoRA's MAP is the Laplace-LoRA
adapter's own MAP, read by merging it (``merge_adapter``: the MAP weights, LoRA's prediction); the Laplace
row is the linearised predictive of the fit. ``--check-lora`` also trains plain LoRA separately and adds its
row (about three more minutes).

Run from the repository root, at one thread::

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m benchmarks.calibration               # the quick set-up
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m benchmarks.calibration --setup long   # 1,000 x 5 epochs

Each writes its section of docs/calibration.md and keeps the other's.

ECE: 15 equal-width bins of the top-class probability, sum over bins of (bin share) x |accuracy - mean
confidence|. NLL: mean of -log p(true label). Mean confidence: the mean top-class probability (below the
accuracy: underconfident).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def calibration(log_probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL and ECE (``bins`` equal-width bins of the top-class probability)."""
    log_probs = log_probs - np.logaddexp.reduce(log_probs, axis=1, keepdims=True)  # normalised
    probs = np.exp(log_probs)
    conf, pred = probs.max(1), probs.argmax(1)
    correct = (pred == labels).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return {"accuracy": float(correct.mean()), "nll": float(-log_probs[np.arange(len(labels)), labels].mean()),
            "ece": float(ece), "mean_confidence": float(conf.mean())}


def run(method: str, args: argparse.Namespace) -> dict[str, object]:
    from peftlab.core.registry import get_method
    from peftlab.methods.reparameterized.laplace_lora import is_fitted
    from peftlab.core.model import get_peft_model
    from peftlab.tasks.glue import get_glue_task
    from peftlab.train.data import encode_pairs, make_loader
    from peftlab.train.glue_job import HEADS, GlueRun, load_classifier, load_splits
    from peftlab.train.loop import TrainArgs, predict, train

    spec = get_method(method)
    glue = GlueRun(model=str(args.model), task="SST-2", data_dir=str(args.data), train_limit=args.train_limit,
                   batch_size=32, max_length=64)
    task = get_glue_task(glue.task)
    train_examples, evals = load_splits(task, glue)
    train_args = TrainArgs(epochs=args.epochs, lr=4 * get_method("lora").default_lr, seed=args.seed, progress=False)
    torch.manual_seed(train_args.seed)
    model, tokenizer = load_classifier(glue.model, task.num_labels)
    model = get_peft_model(model, spec.config_cls(modules_to_save=HEADS))
    loader = make_loader(encode_pairs(train_examples, tokenizer, glue.max_length), tokenizer, glue.batch_size,
                         shuffle=True, seed=train_args.seed)
    started = time.perf_counter()
    result = train(model, loader, train_args)  # ends with model.end_training(loader): Laplace-LoRA's fit
    train_s = time.perf_counter() - started
    dev = make_loader(encode_pairs(evals["dev"], tokenizer, glue.max_length), tokenizer, 128, shuffle=False)
    rows: dict[str, object] = {"method": method, "steps": result.steps, "train_and_fit_s": round(train_s, 1)}
    started = time.perf_counter()
    with torch.no_grad():
        logits, labels = predict(model, dev)
    rows["predict_s"] = round(time.perf_counter() - started, 1)
    if method == "laplace_lora":
        assert is_fitted(model, "default")
        delta = float(next(b for n, b in model.named_buffers() if n.endswith("prior_precision")))
        rows["prior_precision"] = delta
        rows["laplace"] = calibration(logits, labels)
        model.merge_adapter()  # the MAP weights: plain LoRA's prediction from the same adapter
        with torch.no_grad():
            map_logits, _ = predict(model, dev)
        rows["map"] = calibration(torch.from_numpy(map_logits).log_softmax(-1).numpy(), labels)
    else:
        rows["map"] = calibration(torch.from_numpy(logits).log_softmax(-1).numpy(), labels)
    return rows


# Named set-ups: (training examples, epochs). "quick" is the study's quick set-up; "long" trains a fifth
# of the data five times as long (the same number of steps), the regime where MAP grows overconfident.
SETUPS = {"quick": (5000, 1.0), "long": (1000, 5.0)}


def render(results: dict[str, list[dict[str, object]]]) -> str:
    lines = [
        "# Calibration: Laplace-LoRA vs LoRA (MAP) on SST-2 dev",
        "",
        "Written by `python -m benchmarks.calibration --setup <name>` (one thread; each run replaces its own "
        "set-up's section and keeps the others, read back from the JSON block at the end). MiniLM "
        "(all-MiniLM-L6-v2), the first N SST-2 training examples, max length 64, batch 32, lr 0.002 (4x LoRA's "
        "default), seed 0; LoRA r 8, alpha 16 on query/value, classifier trained in full. Laplace-LoRA: KFAC over "
        "all LoRA A and B, exact Fisher over the training batches, prior precision by marginal likelihood, "
        "linearised predictive with 10,000 correlated MC draws. Plain LoRA's MAP is the same adapter merged "
        "(Laplace-LoRA trains exactly as LoRA; `--check-lora` trains plain LoRA separately as well). ECE: 15 "
        "equal-width bins of the top-class probability; mean confidence below accuracy means underconfident.",
    ]
    for name, runs in results.items():
        laplace = runs[-1]
        train_limit, epochs = laplace["train_limit"], laplace["epochs"]
        lines += ["", f"## {name}: {train_limit} training examples, {epochs:g} epoch(s), {laplace['steps']} steps", "",
                  "| model | accuracy | NLL | ECE | mean confidence |", "|---|---|---|---|---|"]
        rows = [("LoRA (MAP): the adapter merged", laplace["map"]),
                ("Laplace-LoRA (linearised predictive)", laplace["laplace"])]
        if len(runs) > 1:
            rows.insert(0, ("LoRA (MAP), trained separately", runs[0]["map"]))
        for label, row in rows:
            lines.append(f"| {label} | {row['accuracy']:.4f} | {row['nll']:.4f} | {row['ece']:.4f} | "
                         f"{row['mean_confidence']:.4f} |")
        gap = laplace["map"]["mean_confidence"] - laplace["map"]["accuracy"]
        state = ("about as confident as accurate" if abs(gap) < 0.01
                 else "overconfident" if gap > 0 else "underconfident")
        lines += ["", f"MAP is {state} here (mean confidence - accuracy = "
                  f"{gap:+.4f}); the Laplace predictive changes NLL by "
                  f"{laplace['laplace']['nll'] - laplace['map']['nll']:+.4f} and ECE by "
                  f"{laplace['laplace']['ece'] - laplace['map']['ece']:+.4f} (accuracy: argmax of the MC "
                  "predictive, which can flip near-ties)."]
        lines += ["", f"Prior precision chosen: {laplace['prior_precision']:.4g}. Wall time: training and fit "
                  f"{laplace['train_and_fit_s']} s, dev prediction with the Laplace predictive "
                  f"{laplace['predict_s']} s."]
    lines += ["", "```json", json.dumps(results, indent=2), "```", ""]
    return "\n".join(lines)


def _previous(path: Path) -> dict[str, list[dict[str, object]]]:
    if not path.is_file():
        return {}
    found = re.search(r"```json\n(.*?)\n```", path.read_text(), re.S)
    return json.loads(found.group(1)) if found else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "all-MiniLM-L6-v2")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "glue")
    parser.add_argument("--setup", choices=sorted(SETUPS), default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "calibration.md")
    parser.add_argument("--check-lora", action="store_true", help="also train plain LoRA separately")
    args = parser.parse_args()
    args.train_limit, args.epochs = SETUPS[args.setup]
    methods = ("lora", "laplace_lora") if args.check_lora else ("laplace_lora",)
    runs = [{**run(method, args), "train_limit": args.train_limit, "epochs": args.epochs} for method in methods]
    if not all(math.isfinite(r["map"]["nll"]) for r in runs):
        raise SystemExit("non-finite NLL")
    results = _previous(args.out)
    results[args.setup] = runs
    results = {k: results[k] for k in SETUPS if k in results}
    text = render(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
