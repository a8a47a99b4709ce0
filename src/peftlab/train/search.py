"""Search contexts: candidate configurations trained by peftlab's loop and scored on held-out examples.

:class:`LoopSearchContext` serves any model and data; :func:`glue_search_context` builds one for a
GLUE task, holding part of the training split out for scoring (the dev set stays for the final score).
"""
from __future__ import annotations

import copy
import math
import dataclasses
import random
import time
from typing import Any, Callable

import torch
from torch import nn

from ..core.config import PeftConfig
from ..core.errors import PeftlabError
from ..core.model import get_peft_model
from ..core.registry import spec_for_config
from ..core.search import Trial
from .loop import TrainArgs, predict, train


class LoopSearchContext:
    """Each candidate: a copy of ``base`` (the same pretrained weights and head initialisation for
    every candidate), the config attached with ``head`` trained beside it, ``args`` (steps replaced by
    the search's), then ``score(model)`` (higher is better)."""

    def __init__(self, base: nn.Module, train_loader: Callable[[], Any], score: Callable[[nn.Module], float],
                 args: TrainArgs, head: tuple[str, ...] = ()) -> None:
        self.base, self.train_loader, self.score, self.head = base, train_loader, score, head
        self.args = dataclasses.replace(args, progress=False, save_every=None, resume=False)
        self.seed = args.seed

    @property
    def run_steps(self) -> int:
        """Optimizer steps of one candidate run at the context's own length (``args``)."""
        if self.args.max_steps:
            return self.args.max_steps
        return max(1, math.ceil(len(self.train_loader()) * self.args.epochs / self.args.grad_accum_steps))

    def new_model(self) -> nn.Module:
        return copy.deepcopy(self.base)

    def fit(self, config: PeftConfig, steps: int | None = None, keep_model: bool = False) -> tuple[Trial, Any]:
        started = time.perf_counter()
        attached = config
        if self.head and not config.modules_to_save and not spec_for_config(config).replaces_head:
            attached = config.replace(modules_to_save=self.head)
        torch.manual_seed(self.seed)
        model = get_peft_model(self.new_model(), attached)
        args = dataclasses.replace(self.args, max_steps=steps or self.args.max_steps)
        train(model, self.train_loader(), args)
        score = float(self.score(model))
        trial = Trial(config, score, model.trainable_parameters_report().trainable_entries,
                      time.perf_counter() - started)
        return trial, (model if keep_model else None)


def glue_search_context(run: Any, args: TrainArgs, holdout: float = 0.2) -> LoopSearchContext:
    """A :class:`LoopSearchContext` for ``run`` (a :class:`~peftlab.train.glue_job.GlueRun`): its
    training examples shuffled with ``args.seed``, ``holdout`` of them scored (the task's main metric),
    the rest trained on."""
    from ..tasks.glue import get_glue_task, glue_metrics, load_glue
    from .data import encode_pairs, make_loader, make_scoring_loader
    from .glue_job import HEADS, load_classifier

    if not isinstance(holdout, float) or not 0.0 < holdout < 1.0:
        raise PeftlabError(f"holdout={holdout!r}: expected the share of training examples scored during the "
                           "search, strictly between 0 and 1 (e.g. 0.2)")
    task = get_glue_task(run.task)
    examples = load_glue(task, run.data_dir, "train", run.train_limit)
    held = int(len(examples) * holdout)
    if held < 1 or held == len(examples):
        raise PeftlabError(f"GLUE {task.dir_name}: {len(examples)} training examples cannot give both a search "
                           f"training set and a held-out set of {holdout:.0%}; raise train_limit")
    order = list(range(len(examples)))
    random.Random(args.seed).shuffle(order)
    scored = [examples[i] for i in order[:held]]
    fitted = [examples[i] for i in order[held:]]
    torch.manual_seed(args.seed)
    base, tokenizer = load_classifier(run.model, task.num_labels)
    fit_rows = encode_pairs(fitted, tokenizer, run.max_length)
    score_rows = encode_pairs(scored, tokenizer, run.max_length)

    def train_loader() -> Any:
        return make_loader(fit_rows, tokenizer, run.batch_size, shuffle=True, seed=args.seed)

    def score(model: nn.Module) -> float:
        logits, labels = predict(model, make_scoring_loader(score_rows, tokenizer))
        return glue_metrics(task, logits, labels)[task.main_metric]

    return LoopSearchContext(base, train_loader, score, dataclasses.replace(args, split_by_length=run.split_by_length),
                             head=HEADS)
