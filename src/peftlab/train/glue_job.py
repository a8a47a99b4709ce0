"""One GLUE fine-tuning run: a model folder or hub id, a task, a method (or full fine-tuning).

Used by ``peftlab train`` and by the assessment, so both measure the same thing.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..core.config import PeftConfig
from ..core.errors import PeftlabError
from ..core.registry import spec_for_config
from ..core.model import get_peft_model
from ..tasks.errors import TaskDataError, describe_folder
from ..tasks.glue import Example, GlueTask, get_glue_task, glue_metrics, load_glue
from .data import encode_pairs, make_loader, make_scoring_loader
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
    # Each training batch (drawn as plain shuffling draws it) run as parts of similar length, its
    # gradient unchanged: far less padding on sentences of varied length (TrainArgs.split_by_length).
    split_by_length: bool = True

    def __post_init__(self) -> None:
        # Refused here: a limit of 0 used to surface as an IndexError deep inside the tokenizer.
        for name in ("train_limit", "eval_limit", "batch_size", "max_length"):
            value = getattr(self, name)
            if value is None and name.endswith("_limit"):
                continue  # None: the whole split
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                whole = " (or None for the whole split)" if name.endswith("_limit") else ""
                raise PeftlabError(f"GlueRun.{name}={value!r}: expected a positive whole number{whole}")


def model_source_hint(model: str) -> str:
    """Why ``model`` could not be found, for error messages: transformers speaks of repo ids
    even when a local folder was meant, so say whether a folder exists and whether it is a hub id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(model)
    if path.is_dir():
        return f"the folder {path} exists ({describe_folder(path)})"
    local = (f"{path} is a file, not a model folder" if path.exists()
             else f"the folder {path} does not exist ({describe_folder(path.parent)})")
    try:
        validate_repo_id(model)
    except HFValidationError:
        return f"{local}, and {model!r} is not a valid hub id either ('name' or 'namespace/name')"
    return f"{local}, so it was looked up as a hub id"


def load_classifier(model_path: str, num_labels: int) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "head is newly initialised" notice is expected here
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=num_labels, problem_type="regression" if num_labels == 1 else None)
    except (OSError, ValueError) as err:  # a wrong path or hub id: the user's to fix, not a bug
        detail = " ".join(str(err).split())[:300]
        raise PeftlabError(f"cannot load model {model_path!r}: {model_source_hint(model_path)} ({detail}). "
                           "Pass a folder holding config.json, the weights and the tokenizer, or a hub id "
                           "that exists") from err
    if tokenizer.pad_token is None:  # decoders classify from the last non-pad token
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_eval_splits(task: GlueTask, data_dir: str | None, limit: int | None) -> dict[str, list[Example]]:
    """Each scored split's examples, every row checked (TaskDataError names the file and line).
    A missing extra split (MNLI's mismatched dev set) is warned about and skipped; an empty split
    is refused, since it cannot be scored."""
    evals: dict[str, list[Example]] = {}
    for split in task.eval_splits:
        try:
            examples = load_glue(task, data_dir, split, limit)
        except TaskDataError as err:
            if split == task.eval_splits[0]:
                raise
            # e.g. MNLI's pcp_subset variant has no mismatched dev set: score the splits there are
            warnings.warn(f"{err}; {task.dir_name} is scored without its {split} split", stacklevel=3)
            continue
        if not examples:
            raise TaskDataError(f"GLUE {task.dir_name} {split} split in {data_dir or 'the hub glue dataset'} has "
                                "no examples; expected rows below the header")
        evals[split] = examples
    return evals


def load_splits(task: GlueTask, run: GlueRun) -> tuple[list[Example], dict[str, list[Example]]]:
    """The training examples and the scored splits' examples (see :func:`load_eval_splits`)."""
    train_examples = load_glue(task, run.data_dir, "train", run.train_limit)
    if not train_examples:
        raise TaskDataError(f"GLUE {task.dir_name} train split in {run.data_dir or 'the hub glue dataset'} has "
                            "no examples; expected rows below the header")
    return train_examples, load_eval_splits(task, run.data_dir, run.eval_limit)


@dataclass
class Fitted:
    """A trained classifier: the model (a PeftModel, or the whole model for full fine-tuning), its
    tokenizer, the config it ran with (the head added to ``modules_to_save``), the loop's result, and
    the review's parameter counts; ``initial``: the trainable tensors before training, when asked for."""

    model: Any
    config: PeftConfig | None
    tokenizer: Any
    result: Any
    trainable: int
    total: int
    initial: dict[str, torch.Tensor] | None = None


def fit_classifier(model_path: str, num_labels: int, config: PeftConfig | None, examples: list[Example],
                   args: TrainArgs, max_length: int, batch_size: int, split_by_length: bool = True,
                   probe: StepProbe | None = None, keep_batches: int = 0, keep_initial: bool = False,
                   prepare: Callable[[Any], None] | None = None) -> Fitted:
    """Load ``model_path`` with a new head, wrap it with ``config`` (``None``: full fine-tuning; the head
    trains either way) and train it on ``examples``. ``keep_initial``: copy the trainable tensors first
    (``Fitted.initial``, by parameter name). ``prepare(model)`` runs on the wrapped model before
    training, e.g. to start an adapter from another one's tensors."""
    torch.manual_seed(args.seed)
    model, tokenizer = load_classifier(model_path, num_labels)
    if config is not None:
        if not config.modules_to_save and not spec_for_config(config).replaces_head:
            config = config.replace(modules_to_save=HEADS)
        model = get_peft_model(model, config)
    if prepare is not None:
        prepare(model)
    if config is None:
        trainable = total = sum(p.numel() for p in model.parameters())
    loader = make_loader(encode_pairs(examples, tokenizer, max_length), tokenizer, batch_size, shuffle=True,
                         seed=args.seed)
    initial = ({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
               if keep_initial else None)
    result = train(model, loader, replace(args, split_by_length=split_by_length), probe=probe,
                   keep_batches=keep_batches)
    if config is not None:
        # Counted after training: a masked method's trainable entries are chosen by its data pass.
        # The review's count: entries that can change; the total is the base model plus those.
        report = model.trainable_parameters_report()
        trainable, total = report.trainable_entries, report.base + report.trainable_entries
    return Fitted(model, config, tokenizer, result, trainable, total, initial)


def classify(model: Any, tokenizer: Any, examples: list[Example], max_length: int) -> tuple[Any, Any]:
    """Logits and labels of ``examples``, in their order (scored in batches of similar length)."""
    rows = encode_pairs(examples, tokenizer, max_length)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    logits, labels = predict(model, make_loader([rows[i] for i in order], tokenizer, 128, shuffle=False))
    back = np.argsort(order)
    return logits[back], labels[back]


def run_glue(run: GlueRun, config: PeftConfig | None, args: TrainArgs, out: str | Path | None = None,
             probe: StepProbe | None = None, floor_steps: int = 0,
             floor_probe: StepProbe | None = None) -> dict[str, Any]:
    """Train ``config``'s method (``None``: full fine-tuning) and score the dev split(s).

    ``probe`` goes to :func:`~peftlab.train.loop.train` (the assessment measures memory with it).
    ``floor_steps`` > 0 then times the frozen floor (:func:`frozen_floor`, measured by ``floor_probe``)
    on the run's first batches, in this process: ``summary["floor"]`` holds both step times.
    """
    task = get_glue_task(run.task)
    # Every split is read and checked before the model loads: a bad dev row fails in seconds,
    # not after training.
    train_examples, eval_examples = load_splits(task, run)
    started = time.perf_counter()
    fitted = fit_classifier(run.model, task.num_labels, config, train_examples, args, run.max_length, run.batch_size,
                            run.split_by_length, probe=probe, keep_batches=floor_steps)
    model, result = fitted.model, fitted.result
    metrics: dict[str, float] = {}
    for split, examples in eval_examples.items():
        rows = encode_pairs(examples, fitted.tokenizer, run.max_length)
        logits, labels = predict(model, make_scoring_loader(rows, fitted.tokenizer))  # length order: fine for metrics
        scores = glue_metrics(task, logits, labels)
        metrics.update(scores if len(task.eval_splits) == 1 else {f"{split}/{k}": v for k, v in scores.items()})
    floor = None
    if floor_steps:
        steps = min(floor_steps, result.steps)
        # Batches split as the run's were (a method drawing per forward pass ran them whole): the same work.
        reference = frozen_floor(run, task, result.kept_batches[:steps],
                                 replace(args, split_by_length=result.split_by_length), floor_probe)
        # The same batches as the run's first steps, so identical work: with batches of very different
        # lengths, the ratio of summed times is steadier than a ratio of medians.
        floor = {"steps": steps, "median_step_s": reference.median_step_s_over(steps),  # the drift notes' figure
                 "timed_s": float(sum(reference.timed_steps_over(steps))),
                 "run_timed_s": float(sum(result.timed_steps_over(steps)))}
    result.kept_batches.clear()
    summary = {
        "run": asdict(run), "method": getattr(config, "method", None) or "full",
        "config": fitted.config.to_dict() if fitted.config else None, "train_args": asdict(args),
        "trainable_params": fitted.trainable, "total_params": fitted.total,
        "trainable_percent": 100.0 * fitted.trainable / fitted.total,
        "steps": result.steps, "final_loss": result.final_loss, "median_step_s": result.median_step_s,
        "tokens_per_s": result.tokens_per_s, "tokens": result.tokens, "train_s": result.wall_s,
        "wall_s": time.perf_counter() - started, "metrics": metrics,
        **({"floor": floor} if floor else {}),
    }
    if out is not None:
        out = Path(out)
        if config is not None:
            model.save_pretrained(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def frozen_floor(run: GlueRun, task: GlueTask, batches: list[dict[str, Any]], args: TrainArgs,
                 probe: StepProbe | None = None) -> Any:
    """The frozen floor, as the benchmarks define it, plus the head: every pretrained weight frozen,
    the embedding output made to require grad (so the backward runs through every layer, computing
    activation gradients but no weight gradient), the new head trained. A PEFT method that changes
    the layers pays at least this, so its cost over the floor's is what the method itself adds.
    Trains one step per batch of ``batches`` (a run's first ones: ``train(keep_batches=)``); returns
    the :class:`~peftlab.train.loop.TrainResult`."""
    torch.manual_seed(args.seed)
    model, _ = load_classifier(run.model, task.num_labels)
    heads = [module for name in HEADS if isinstance(module := getattr(model, name, None), torch.nn.Module)]
    if not heads:
        raise PeftlabError(f"{type(model).__name__} has no classification head named {' or '.join(HEADS)}, so its "
                           "frozen floor cannot be measured")
    model.requires_grad_(False)
    for head in heads:
        head.requires_grad_(True)
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    floor_args = replace(args, max_steps=len(batches), progress=False, save_every=None, checkpoint_dir=None,
                         resume=False)
    return train(model, batches, floor_args, probe=probe)
