"""One GLUE fine-tuning run: a model folder or hub id, a task, a method (or full fine-tuning).

Used by ``peftlab train`` and by the assessment, so both measure the same thing.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.config import PeftConfig
from ..core.model import get_peft_model
from ..tasks.errors import TaskDataError
from ..tasks.glue import get_glue_task, glue_metrics, load_glue
from .data import encode_pairs, make_loader
from .loop import StepProbe, TrainArgs, predict, train

# Both names peft uses for a new classification head; a model has one of them.
HEADS = ("classifier", "score")


@dataclass(frozen=True)
class GlueRun:
    model: str
    task: str
    data_dir: str | None
    train_limit: int | None = None
    eval_limit: int | None = None
    batch_size: int = 32
    max_length: int = 64


def load_classifier(model_path: str, num_labels: int) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "head is newly initialised" notice is expected here
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=num_labels, problem_type="regression" if num_labels == 1 else None)
    if tokenizer.pad_token is None:  # decoders classify from the last non-pad token
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def run_glue(run: GlueRun, config: PeftConfig | None, args: TrainArgs, out: str | Path | None = None,
             probe: StepProbe | None = None) -> dict[str, Any]:
    """Train ``config``'s method (``None``: full fine-tuning) and score the dev split(s).

    ``probe`` goes to :func:`~peftlab.train.loop.train` (the assessment measures memory with it).
    """
    task = get_glue_task(run.task)
    torch.manual_seed(args.seed)
    model, tokenizer = load_classifier(run.model, task.num_labels)
    if config is not None:
        if not config.modules_to_save:
            config = config.replace(modules_to_save=HEADS)
        model = get_peft_model(model, config)
    else:
        trainable = total = sum(p.numel() for p in model.parameters())
    train_rows = encode_pairs(load_glue(task, run.data_dir, "train", run.train_limit), tokenizer, run.max_length)
    loader = make_loader(train_rows, tokenizer, run.batch_size, shuffle=True, seed=args.seed)
    started = time.perf_counter()
    result = train(model, loader, args, probe=probe)
    if config is not None:
        # Counted after training: a masked method's trainable entries are chosen by its data pass.
        # The review's count: entries that can change; the total is the base model plus those.
        report = model.trainable_parameters_report()
        trainable, total = report.trainable_entries, report.base + report.trainable_entries
    metrics: dict[str, float] = {}
    for split in task.eval_splits:
        try:
            examples = load_glue(task, run.data_dir, split, run.eval_limit)
        except TaskDataError as err:
            if split == task.eval_splits[0]:
                raise
            # e.g. MNLI's pcp_subset variant has no mismatched dev set: score the splits there are
            warnings.warn(f"{err}; {task.dir_name} is scored without its {split} split", stacklevel=2)
            continue
        rows = encode_pairs(examples, tokenizer, run.max_length)
        logits, labels = predict(model, make_loader(rows, tokenizer, 128, shuffle=False))
        scores = glue_metrics(task, logits, labels)
        metrics.update(scores if len(task.eval_splits) == 1 else {f"{split}/{k}": v for k, v in scores.items()})
    summary = {
        "run": asdict(run), "method": getattr(config, "method", None) or "full",
        "config": config.to_dict() if config else None, "train_args": asdict(args),
        "trainable_params": trainable, "total_params": total, "trainable_percent": 100.0 * trainable / total,
        "steps": result.steps, "final_loss": result.final_loss, "median_step_s": result.median_step_s,
        "tokens_per_s": result.tokens_per_s, "wall_s": time.perf_counter() - started, "metrics": metrics,
    }
    if out is not None:
        out = Path(out)
        if config is not None:
            model.save_pretrained(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary
