"""The whole fine-tuning job, side by side: the HF ``Trainer`` script against ``peftlab train``.

    python -m benchmarks.job                          # the LoRA job below, seeds 0-4, writes docs/benchmarks_job.md/.json
    python -m benchmarks.job --methods families       # also one method of each other family
    python -m benchmarks.job --train-limit 64 --repeats 1 --out /tmp/job   # smoke run

The job a user would otherwise write: LoRA (r 8, alpha 16, query and value, the classification head
trained in full) on the MiniLM, the first 5,000 SST-2 training examples, one epoch, batch 32, max
length 64, learning rate 1e-3 (the method's ``default_lr`` x 2), seeds 0 to 4, scored on the whole SST-2 dev
set. The HF side is the plain script (no peftlab import where peft has the method): SST-2 read with ``csv``, the
tokenizer over the examples, ``DataCollatorWithPadding``
(each batch padded to its longest example), ``TrainingArguments`` defaults otherwise (AdamW, linear
decay, no warm-up), ``Trainer.train`` then ``Trainer.predict``; the adapter is HF peft's own
implementation where peft has the method (built from the config peftlab writes in peft's layout),
else peftlab's adapter under ``peftlab.train.hf.Trainer`` (what a user of the HF Trainer runs). The
peftlab side is ``peftlab.train.glue_job.run_glue``, what ``peftlab train`` runs, with the same
hyper-parameters (``warmup_ratio=0``, as the Trainer's default).

Each job runs in its own process (fresh allocator, its own peak RSS), one after the other and
alternating (HF, peftlab, peftlab, HF, ...) so drifting machine load falls on both. Per job:
- wall: the whole job, from the process's start (imports included) to the dev score;
- train tokens/s: non-padding training tokens (each example's length, summed over the epoch) over the
  training time alone (``Trainer.train`` / peftlab's loop);
- peak RSS: the process's resident-set high-water mark (``ru_maxrss``), Python and libraries included;
- dev accuracy. Both sides draw plainly shuffled batches (peftlab runs each as parts of similar
  length, the same gradient) and are deterministic for a seed, but their shuffles and dropout masks
  come from different generators, so one seed compares two draws; ``--seeds`` gives the mean and
  standard deviation over seeds on each side, the fair comparison of accuracy.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROCESS_START = time.perf_counter()  # before torch, transformers and either library are imported
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SIDES = ("hf", "peftlab")
# --methods families: the LoRA job plus one method of each other family of the taxonomy
FAMILIES = ("lora", "sequential_adapter", "bitfit", "mam_adapter", "propetl")


def _sst2(data_dir: str, split: str, limit: int | None) -> list[tuple[str, int]]:
    """(sentence, label) rows of SST-2's TSV, as a plain script reads them: the HF side imports no peftlab."""
    with open(Path(data_dir) / "SST-2" / f"{split}.tsv", newline="") as f:
        rows = [(r["sentence"], int(r["label"])) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return rows[:limit] if limit else rows


def run_hf(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def encode(examples: list[tuple[str, int]]) -> list[dict[str, Any]]:
        enc = tokenizer([text for text, _ in examples], truncation=True, max_length=args.max_length)
        return [{"input_ids": ids, "attention_mask": mask, "labels": label}
                for ids, mask, (_, label) in zip(enc["input_ids"], enc["attention_mask"], examples)]

    train_rows = encode(_sst2(args.data_dir, "train", args.train_limit))
    dev_rows = encode(_sst2(args.data_dir, "dev", None))
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    model, trainer_cls, impl = _hf_adapter(model, args)
    training = TrainingArguments(output_dir=args.scratch, per_device_train_batch_size=args.batch_size,
                                 per_device_eval_batch_size=128, num_train_epochs=1, learning_rate=args.lr,
                                 seed=args.seed, report_to=[], save_strategy="no", logging_strategy="no",
                                 disable_tqdm=True, use_cpu=True)
    trainer = (trainer_cls or Trainer)(model=model, args=training, train_dataset=train_rows,
                      data_collator=DataCollatorWithPadding(tokenizer))
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    predictions = trainer.predict(dev_rows)
    accuracy = float(np.mean(predictions.predictions.argmax(-1) == predictions.label_ids))
    tokens = sum(len(r["input_ids"]) for r in train_rows)
    return {"wall_s": time.perf_counter() - PROCESS_START, "train_s": train_s, "tokens": tokens, "accuracy": accuracy,
            "impl": impl}


def _config(method: str) -> Any:
    from peftlab.core.registry import get_method

    return get_method(method).config_cls(modules_to_save=("classifier",))


def _hf_adapter(model: Any, args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(model, Trainer class or None for transformers', what the HF side runs): HF peft's adapter from the
    peft-layout config the parent wrote (``--peft-config``), else peftlab's adapter in its HF Trainer."""
    if args.peft_config:
        import peft

        peft_config = peft.PeftConfig.from_pretrained(args.peft_config)
        peft_config.inference_mode = False  # a saved config is marked for inference: this one trains
        return peft.get_peft_model(model, peft_config), None, "HF peft"
    import peftlab
    from peftlab.train.hf import Trainer as PeftlabTrainer

    return peftlab.get_peft_model(model, _config(args.method)), PeftlabTrainer, "peftlab adapter in the HF Trainer"


def _write_peft_config(method: str, args: argparse.Namespace) -> str | None:
    """In the parent, untimed: the method's config in peft's layout (written by peftlab), where peft has it."""
    import peftlab
    from peftlab.core.registry import get_method
    from transformers import AutoModelForSequenceClassification

    if not get_method(method).peft_type:
        return None
    folder = Path(args.scratch) / f"config-{method}"
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    peftlab.get_peft_model(model, _config(method)).save_pretrained(folder)
    return str(folder)


def run_peftlab(args: argparse.Namespace) -> dict[str, Any]:
    from peftlab.train.glue_job import GlueRun, run_glue
    from peftlab.train.loop import TrainArgs

    run = GlueRun(model=args.model, task="sst2", data_dir=args.data_dir, train_limit=args.train_limit,
                  batch_size=args.batch_size, max_length=args.max_length, split_by_length=not args.plain_batches)
    summary = run_glue(run, _config(args.method),
                       TrainArgs(lr=args.lr, epochs=1, warmup_ratio=0.0, seed=args.seed, progress=False))
    return {"wall_s": time.perf_counter() - PROCESS_START, "train_s": summary["train_s"], "tokens": summary["tokens"],
            "accuracy": summary["metrics"]["accuracy"], "impl": "peftlab train"}


def _child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = (run_hf if args.side == "hf" else run_peftlab)(args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print("RESULT " + json.dumps(result))


def _spawn(side: str, method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, "-m", "benchmarks.job", "--side", side, "--method", method, "--model", args.model,
            "--data-dir", args.data_dir, "--threads", str(args.threads), "--batch-size", str(args.batch_size),
            "--max-length", str(args.max_length), "--seed", str(seed),
            "--lr", str(args.lrs[method]), "--scratch", args.scratch] + (["--plain-batches"] if args.plain_batches else [])
    if side == "hf" and args.peft_configs.get(method):
        argv += ["--peft-config", args.peft_configs[method]]
    if args.train_limit:
        argv += ["--train-limit", str(args.train_limit)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"{side} job of {method} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by_seed = {r["seed"]: r["accuracy"] for r in runs}  # a seed's runs agree: each job is deterministic
    scores = list(by_seed.values())
    return {"wall_s": statistics.median(r["wall_s"] for r in runs),
            "tokens_per_s": statistics.median(r["tokens"] / r["train_s"] for r in runs),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
            "accuracy": statistics.fmean(scores), "accuracy_std": statistics.stdev(scores) if len(scores) > 1 else None,
            "by_seed": by_seed, "impl": runs[0]["impl"]}


def _acc(side: dict[str, Any]) -> str:
    return f"{side['accuracy']:.4f}" + (f" ± {side['accuracy_std']:.4f}" if side.get("accuracy_std") is not None else "")


def markdown(data: dict[str, Any]) -> str:
    s = data["settings"]
    lines = [
        "# The whole job: the HF Trainer script against peftlab",
        "",
        f"Written by `python -m benchmarks.job` (edit that file, not this one) on {data['date']}. "
        f"{s['model_name']}, SST-2 first {s['train_limit'] or 'all'} training examples, 1 epoch, batch "
        f"{s['batch_size']}, max length {s['max_length']}, each method at its `default_lr` x {s['lr_scale']:g} "
        f"(LoRA: 1e-3), seed(s) {', '.join(str(x) for x in s['seeds'])}, {s['threads']} thread(s), the classification head trained; "
        + ("peftlab side with batches run whole (not split by length); " if s.get("plain_batches") else "") +
        f"{s['repeats']} round(s), each job in its own process, alternating sides; times: medians over all runs; "
        "dev accuracy: mean (± standard deviation) over the seeds, and the mean of peftlab minus HF per seed. "
        "HF side: the `transformers.Trainer` script with HF peft's adapter where peft has the method, else "
        "peftlab's adapter in `peftlab.train.hf.Trainer`; peftlab side: `peftlab train`'s job.",
        "",
        "| method | HF side | wall HF s | wall peftlab s | speed-up | tokens/s HF | tokens/s peftlab | "
        "peak RSS HF MB | peak RSS peftlab MB | dev acc HF | dev acc peftlab | acc peftlab - HF |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, sides in data["summary"].items():
        hf, pl = sides["hf"], sides["peftlab"]
        lines.append(f"| {method} | {hf['impl']} | {hf['wall_s']:.1f} | {pl['wall_s']:.1f} | "
                     f"**{hf['wall_s'] / pl['wall_s']:.2f}x** | {hf['tokens_per_s']:.0f} | {pl['tokens_per_s']:.0f} | "
                     f"{hf['peak_rss_mb']:.0f} | {pl['peak_rss_mb']:.0f} | {_acc(hf)} | {_acc(pl)} | "
                     f"{pl['accuracy'] - hf['accuracy']:+.4f} |")
    lines += ["", "Speed-up: HF wall / peftlab wall. Every run, in the order run:", "",
              "| round | seed | method | side | wall s | train s | real tokens | peak RSS MB | dev accuracy |",
              "|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['round']} | {r['seed']} | {r['method']} | {r['side']} | {r['wall_s']:.1f} | {r['train_s']:.1f} | {r['tokens']} | "
              f"{r['peak_rss_mb']:.0f} | {r['accuracy']:.4f} |" for r in data["runs"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(SHARED / "models" / "all-MiniLM-L6-v2"))
    parser.add_argument("--data-dir", default=str(SHARED / "data" / "glue"))
    parser.add_argument("--methods", default="lora", help="comma-separated methods, or 'families' (one per family)")
    parser.add_argument("--train-limit", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr-scale", type=float, default=2.0, help="each method's default_lr times this")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds; each round runs every seed")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # internal: the one job's seed
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="rounds; each runs both jobs of every method and seed")
    parser.add_argument("--plain-batches", action="store_true",
                        help="peftlab side with each batch run whole, padded to its longest row (as the HF side runs it)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_job"), help="writes OUT.md and OUT.json")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: run one job in this process
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--peft-config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        _child(args)
        return None
    import tempfile

    from peftlab.core.registry import get_method

    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2")
    methods = list(FAMILIES) if args.methods == "families" else [get_method(m).name for m in args.methods.split(",")]
    runs: list[dict[str, Any]] = []
    args.lrs = {m: get_method(m).default_lr * args.lr_scale for m in methods}
    with tempfile.TemporaryDirectory() as scratch:
        args.scratch = scratch
        args.peft_configs = {m: _write_peft_config(m, args) for m in methods}
        turn = 0
        for r in range(args.repeats):
            for seed in seeds:
                for method in methods:
                    for side in (SIDES if turn % 2 == 0 else SIDES[::-1]):
                        result = _spawn(side, method, seed, args)
                        runs.append({"round": r, "seed": seed, "method": method, "side": side, **result})
                        print(f"round {r} seed {seed} {method} {side}: {result['wall_s']:.1f} s, "
                              f"accuracy {result['accuracy']:.4f}", flush=True)
                turn += 1
    settings = {k: getattr(args, k) for k in ("train_limit", "batch_size", "max_length", "lr_scale", "threads",
                                               "repeats", "plain_batches")}
    settings["seeds"] = seeds
    settings["model_name"] = Path(args.model).name
    data = {"date": time.strftime("%Y-%m-%d"), "settings": settings, "runs": runs,
            "summary": {m: {side: _summary([r for r in runs if r["side"] == side and r["method"] == m])
                            for side in SIDES} for m in methods}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2))
    out.with_suffix(".md").write_text(markdown(data))
    print(markdown(data))
    return data


if __name__ == "__main__":
    main()
