"""Task adapters held apart from their heads, and models built from several of them.

A task adapter here is what one task's training left: the adapter's tensors and the task's head (a
full trainable copy of the classifier). Adapter arithmetic (merges, LoRAHub) and AdapterFusion act on
the adapters only; a head belongs to its task and is put in front of whatever body is scored on that
task. Every head has the same width (the largest class count of the suite's tasks) so that one model
can hold all of them at once, as mixed-task batches need; a task with fewer classes has its extra
outputs closed (:func:`close_extra_outputs`) and is scored on its own classes' logits.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ...core.config import PeftConfig
from ...core.errors import PeftlabError
from ...core.layer import TrainableCopy
from ...core.model import PeftModel, get_peft_model
from ...tasks.glue import Example, GlueTask, glue_metrics
from ...train.data import encode_pairs, make_loader, make_scoring_loader
from ...train.glue_job import HEADS, Fitted, load_classifier
from ...train.loop import predict


@dataclass
class TaskAdapter:
    """One task's trained adapter: ``config`` with the head in ``modules_to_save``, ``state`` every
    saved tensor (adapter and head), ``head`` the head's tensors by module path, ``base`` the model it
    was trained on."""

    task: str
    config: PeftConfig
    state: dict[str, torch.Tensor]
    head: dict[str, dict[str, torch.Tensor]]
    base: str

    @classmethod
    def from_fitted(cls, task: str, fitted: Fitted, base: str) -> "TaskAdapter":
        model = fitted.model
        head = {path: {k: v.detach().clone() for k, v in m.copies["default"].state_dict().items()}
                for path, m in model.base_model.named_modules() if isinstance(m, TrainableCopy)}
        if not head:
            raise PeftlabError(f"the {task} adapter has no trained head ({', '.join(HEADS)})")
        state = {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}
        return cls(task, fitted.config, state, head, base)

    def headless(self) -> PeftConfig:
        return self.config.replace(modules_to_save=())

    def body(self) -> dict[str, torch.Tensor]:
        """The adapter's own tensors, without the head's."""
        ends = tuple(f"{path}.{key}" for path, tensors in self.head.items() for key in tensors)
        return {k: v for k, v in self.state.items() if not k.endswith(ends)}


def check_same_base(adapters: dict[str, TaskAdapter], model_path: str) -> None:
    """Adapters combined in one model must come from that model: the same shapes are not enough."""
    other = {name: a.base for name, a in adapters.items() if a.base != model_path}
    if other:
        raise PeftlabError(f"adapters {sorted(other)} were trained on {sorted(set(other.values()))}, not on "
                           f"{model_path!r}, the model they are combined on; train every adapter on one base model")


def build(model_path: str, width: int, adapters: dict[str, TaskAdapter], heads: bool) -> tuple[PeftModel, Any]:
    """A model holding each of ``adapters`` under its name, loaded strictly; with ``heads`` each adapter
    keeps its own head (a model for mixed-task batches), without them the classifier is the base's,
    to be set per task by :func:`put_head`."""
    check_same_base(adapters, model_path)
    base, tokenizer = load_classifier(model_path, width)
    model: PeftModel | None = None
    for name, adapter in adapters.items():
        config = adapter.config if heads else adapter.headless()
        if model is None:
            model = get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        wanted = model.adapter_state_dict(name)
        model.load_adapter_state_dict(name, {k: adapter.state[k] for k in wanted}, source=f"the {name} adapter")
    if model is None:
        raise PeftlabError("build: no adapters given")
    return model, tokenizer


def close_extra_outputs(model: PeftModel, adapter: str, num_labels: int) -> None:
    """Fix the outputs past ``num_labels`` of ``adapter``'s new head at -10^4 (zero weights): the
    softmax gives them no mass and no gradient, so the head trains and scores as a head of the task's
    own width. (Left open, a 2-class task under a 3-wide head did not learn in the quick budget:
    SST-2 stayed at the majority class.)"""
    copies = [m.copies[adapter] for _, m in model.base_model.named_modules()
              if isinstance(m, TrainableCopy) and adapter in m.copies]
    if not copies:
        raise PeftlabError(f"adapter {adapter!r} has no head of its own ({', '.join(HEADS)}) to close")
    with torch.no_grad():
        for head in copies:
            weight, bias = head.weight, head.bias
            if weight.shape[0] > num_labels:
                weight[num_labels:] = 0.0
                bias[num_labels:] = _CLOSED


_CLOSED = -1e4


def put_head(model: PeftModel, head: dict[str, dict[str, torch.Tensor]]) -> None:
    """Write a task's head into the model's own classifier (a model built without heads)."""
    for path, tensors in head.items():
        module = model.base_model.get_submodule(path)
        if isinstance(module, TrainableCopy):
            raise PeftlabError(f"{path} is an adapter's head copy here; put_head writes the base classifier")
        module.load_state_dict(tensors)


def score(model: Any, tokenizer: Any, task: GlueTask, examples: list[Example], max_length: int,
          task_id: int | None = None) -> float:
    """The task's main metric (x 100) on ``examples``, from the logits of its own classes. ``task_id``:
    every example goes in as that task (``model(..., task_ids=...)``), for a model that routes by task."""
    rows = encode_pairs(examples, tokenizer, max_length)
    if task_id is not None:
        rows = [{**row, "task_ids": task_id} for row in rows]
    logits, labels = predict(model, make_scoring_loader(rows, tokenizer))  # length order: fine for a metric
    return 100 * glue_metrics(task, logits[:, :task.num_labels], labels)[task.main_metric]


def joint_rows(examples: dict[str, list[Example]], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """Every task's examples as one training set for a model that routes by task: each row carries its
    task's index in ``examples`` (``task_ids``)."""
    return [{**row, "task_ids": task_id} for task_id, task in enumerate(examples)
            for row in encode_pairs(examples[task], tokenizer, max_length)]


class TaskHeads(nn.Module):
    """One classification head per task in place of the model's head, for batches that mix tasks:
    each example's logits come from its own task's head (the task id the model is called with), and
    the outputs past that task's class count are closed (-10^4, as :func:`close_extra_outputs`), so
    every task trains and scores as a head of its own width."""

    def __init__(self, in_features: int, widths: list[int], init_std: float) -> None:
        super().__init__()
        width = max(widths)
        self.weight = nn.Parameter(torch.randn(len(widths), width, in_features) * init_std)
        self.bias = nn.Parameter(torch.zeros(len(widths), width))
        closed = torch.zeros(len(widths), width)
        for task, classes in enumerate(widths):
            closed[task, classes:] = _CLOSED
        self.register_buffer("closed", closed, persistent=False)
        self.task_ids: torch.Tensor | None = None  # the current call's, set by the hook of :meth:`follow`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task_ids is None:
            raise PeftlabError("TaskHeads: the call gave no task ids; call the model with task_ids= (one int, or "
                               "one id per example)")
        ids = self.task_ids.to(x.device).expand(x.shape[0]) if self.task_ids.dim() == 0 else self.task_ids.to(x.device)
        logits = torch.einsum("b...i,bwi->b...w", x, self.weight[ids])
        return logits + (self.bias[ids] + self.closed[ids]).view(x.shape[0], *[1] * (x.dim() - 2), -1)

    @classmethod
    def install(cls, base: nn.Module, widths: list[int]) -> "TaskHeads":
        """Replace ``base``'s classification head (one of HEADS, a Linear) by task heads, trainable."""
        path = next((p for p in HEADS if isinstance(getattr(base, p, None), nn.Linear)), None)
        if path is None:
            raise PeftlabError(f"TaskHeads: {type(base).__name__} has no linear head named {' or '.join(HEADS)}")
        old = getattr(base, path)
        heads = cls(old.in_features, widths, getattr(base.config, "initializer_range", 0.02)).to(old.weight.device)
        setattr(base, path, heads)
        return heads

    def follow(self, model: nn.Module) -> None:
        """Read each call's ``task_ids`` from ``model``'s keyword arguments (a forward pre-hook), and
        keep the heads trainable (wrapping the base in a PeftModel froze them)."""
        def read(_: nn.Module, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("task_ids")
            self.task_ids = None if ids is None else torch.as_tensor(ids, dtype=torch.long)

        model.register_forward_pre_hook(read, with_kwargs=True)
        self.weight.requires_grad_(True)
        self.bias.requires_grad_(True)


def _batches(rows: list[dict[str, Any]], tokenizer: Any, batch_size: int) -> list[dict[str, torch.Tensor]]:
    loader = make_loader(rows, tokenizer, batch_size, shuffle=False)
    return [{k: v for k, v in batch.items() if k != "labels"} for batch in loader]


def _timed(run: Any, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def mixed_batch_throughput(model: PeftModel, tokenizer: Any, examples: dict[str, list[Example]], max_length: int,
                           batch_size: int, seed: int = 0, repeats: int = 3) -> dict[str, Any]:
    """Inference throughput over the same examples, two ways: batches of one task each (the task's
    adapter set before each), and batches mixing every task (each row routed to its own adapter by
    ``adapter_names``). The best of ``repeats`` passes; also the largest logit difference between them."""
    rows, owners = [], []
    for task, items in examples.items():
        rows += encode_pairs(items, tokenizer, max_length)
        owners += [task] * len(items)
    order = np.random.default_rng(seed).permutation(len(rows))
    mixed = [(_batch, [owners[i] for i in order[at:at + batch_size]])
             for at, _batch in zip(range(0, len(rows), batch_size),
                                   _batches([rows[i] for i in order], tokenizer, batch_size))]
    per_task = []
    at = 0
    for task, items in examples.items():
        per_task += [(task, b) for b in _batches(rows[at:at + len(items)], tokenizer, batch_size)]
        at += len(items)
    active = model.active_adapters
    model.eval()
    logits_mixed: list[torch.Tensor] = []
    logits_single: list[torch.Tensor] = []

    def run_mixed() -> None:
        logits_mixed.clear()
        with torch.inference_mode():
            for batch, names in mixed:
                logits_mixed.append(model(**batch, adapter_names=names).logits)

    def run_single() -> None:
        logits_single.clear()
        with torch.inference_mode():
            for task, batch in per_task:
                model.set_adapter(task)
                logits_single.append(model(**batch).logits)

    try:
        mixed_s = _timed(run_mixed, repeats)
        single_s = _timed(run_single, repeats)
    finally:
        model.set_adapter(active)
    by_mixed = torch.cat(logits_mixed)[torch.as_tensor(order).argsort()]
    gap = float((by_mixed - torch.cat(logits_single)).abs().max())
    tokens = sum(int(b["attention_mask"].numel()) for b, _ in mixed)
    return {"examples": len(rows), "tasks": list(examples), "batch_size": batch_size,
            "mixed_examples_per_s": len(rows) / mixed_s, "per_task_examples_per_s": len(rows) / single_s,
            "mixed_s": mixed_s, "per_task_s": single_s, "mixed_padded_tokens": tokens,
            "per_task_padded_tokens": sum(int(b["attention_mask"].numel()) for _, b in per_task),
            "max_logit_difference": gap}

