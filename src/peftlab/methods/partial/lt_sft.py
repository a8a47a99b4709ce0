"""LT-SFT (Ansell, Ponti, Korhonen and Vulić, 2022, "Composable Sparse Fine-Tuning for Cross-Lingual
Transfer", ACL): Lottery-Ticket Sparse Fine-Tuning. Two phases::

    phase 1   W1 = full fine-tuning from W0,   loss + l1 * sum|W - W0| / N
    select    M  = the K entries with the largest |W1 - W0|, one ranking across all targets
    reset     every trained tensor back to its value before phase 1 (W0, and a new head's init)
    phase 2   W  = W0 + M * d, only d on M trains (d = 0 at start),   loss + l1 * sum|d| / N

(N: the model's number of parameters, as the reference code divides by.) The result is a sparse
fine-tuning (SFT) ``d``. SFTs compose by addition, ``W = W0 + d_lang + d_task``: a language SFT
trained by masked language modelling and a task SFT trained on a source language give zero-shot
cross-lingual transfer. Stack them with ``model.set_adapter([lang, task])`` or write their sum as
one adapter with ``model.add_weighted_adapter([lang, task], [1, 1], name)``.

peftlab runs phase 1 inside the method's data pass (``begin_training``), over the same training
batches with its own optimizer, and phase 2 as the regular training that follows, with the run's
optimizer and schedule, fresh, as the reference restarts both. The SFT is a sparse difference
(:mod:`.sparse_delta`): in phase 2 the optimizer holds state for the K entries only, and the
checkpoint holds them as index/value pairs.

Defaults (from the paper and its reference code, cambridgeltl/composable-sft) and deviations:
- K: ``keep_ratio`` of the targeted entries, or ``num_entries`` exactly. The paper's task SFTs
  keep K = 14.2M entries, 8% of mBERT's weights: the default ``keep_ratio = 0.08``.
- Phase 1 lasts as long as phase 2 (``dense_steps=None``: the run's total steps), as the paper's
  NLI set-up (5 + 5 epochs); it trains at the run's learning rate (``dense_lr`` overrides),
  decaying linearly to zero (the reference also warms up; here phase 1 starts at the full rate).
- ``l1_reg = 0``: the reference's task SFTs use no L1 term; its language SFTs use 0.1 in both
  phases (set ``l1_reg=0.1`` for one).
- Targets: the transformer blocks' weights and biases; LayerNorms stay frozen, as in every set-up of
  the reference. Deviation: the embeddings, which the reference also ranks, are left out by default
  (add ``@embeddings``; a table tied to the output layer is refused): in phase 2 their dense gradient
  would cost what the sparse optimizer state saves, and decoder models tie them.
- A task head new to the model (``modules_to_save``) trains in full in both phases and is reset to
  its initialisation between them, as the reference does.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch
from torch import nn

from ...core.config import PeftConfig
from ...core.errors import PeftlabError
from ...core.hooks import TrainingHooks
from ...core.registry import MethodSpec, register
from .sparse_delta import (attach_sparse, base_tensors, combine_sparse, entries, entry_budget, is_chosen, learning_rate,
                           select_top, train_phase)

NAME = "LT-SFT"


@dataclasses.dataclass(frozen=True)
class LtSftConfig(PeftConfig):
    """keep_ratio: K as a share of the targeted entries; num_entries: K itself (overrides keep_ratio);
    dense_steps: phase-1 steps (None: as many as the run); dense_lr: phase-1 learning rate (None: the
    run's); l1_reg: strength of the L1 pull towards the pretrained weights (0 turns it off)."""

    targets: tuple[str, ...] | str | None = ("@query", "@key", "@value", "@attn_out", "@ffn_in", "@ffn_out")
    keep_ratio: float = 0.08
    num_entries: int | None = None
    dense_steps: int | None = None
    dense_lr: float | None = None
    l1_reg: float = 0.0

    def validate(self) -> None:
        self._require(isinstance(self.keep_ratio, (int, float)) and 0 < self.keep_ratio <= 1, "keep_ratio",
                      "a share in (0, 1] such as 0.08")
        self._require(self.num_entries is None or (isinstance(self.num_entries, int) and self.num_entries > 0),
                      "num_entries", "a positive number of entries, or None to use keep_ratio")
        self._require(self.dense_steps is None or (isinstance(self.dense_steps, int) and self.dense_steps > 0),
                      "dense_steps", "a positive number of steps, or None for as many as the run")
        self._require(self.dense_lr is None or (isinstance(self.dense_lr, (int, float)) and self.dense_lr > 0),
                      "dense_lr", "a positive learning rate, or None for the run's")
        self._require(isinstance(self.l1_reg, (int, float)) and self.l1_reg >= 0, "l1_reg", "a number >= 0")


def _dense_phase(model: Any, name: str, data: Iterable[Any]) -> None:
    """Phase 1, selection and reset."""
    if is_chosen(model, name):
        return  # an SFT loaded with the adapter: keep its entries
    config: LtSftConfig = model.peft_configs[name]
    tensors = base_tensors(model, name)
    k = entry_budget(model, name, NAME)
    steps = config.dense_steps or model.training_state.total_steps
    if steps is None:
        raise PeftlabError(f"{NAME}: phase 1 lasts as long as the run, but the run's length is unknown: pass "
                           "model.begin_training(loader, total_steps, learning_rate) or set dense_steps")
    lr = learning_rate(model, config.dense_lr, NAME)
    originals = [t.detach().clone() for t in tensors]
    flags = [t.requires_grad for t in tensors]
    # Before selection the SFT's values are empty: what else trains is a head (modules_to_save).
    heads = [p for p in model.adapter_parameters(name) if p.numel()]
    head_starts = [p.detach().clone() for p in heads]
    n = _model_size(model)

    def l1() -> torch.Tensor:
        return config.l1_reg * sum((t - o).abs().sum() for t, o in zip(tensors, originals)) / n

    try:
        for t in tensors:
            t.requires_grad_(True)
        train_phase(model, list(tensors) + heads, data, steps, lr, NAME, loss_term=l1 if config.l1_reg else None)
        moved = [(t.detach() - o).abs() for t, o in zip(tensors, originals)]
    finally:
        with torch.no_grad():  # reset everything phase 1 trained, whatever happened
            for t, o, flag in zip(tensors, originals, flags):
                t.copy_(o)
                t.requires_grad_(flag)
                t.grad = None
            for p, start in zip(heads, head_starts):
                p.copy_(start)
    select_top(model, name, moved, k, NAME)


def _model_size(model: Any) -> int:
    return model.trainable_parameters_report().base  # the base model's own parameters


def _l1_term(model: Any, name: str) -> torch.Tensor | None:
    """Phase 2's L1 pull of the SFT towards zero (the pretrained weights)."""
    config: LtSftConfig = model.peft_configs[name]
    values = [layer.values(part)[name] for layer, part in entries(model, name)]
    values = [v for v in values if v.numel()]
    if not config.l1_reg or not values:
        return None
    return config.l1_reg * sum(v.abs().sum() for v in values) / _model_size(model)


def attach(model: nn.Module, name: str, config: LtSftConfig, host: Any = None) -> None:
    attach_sparse(model, name, config.targets, NAME)


SPEC = register(MethodSpec(
    name="lt_sft", title="LT-SFT", family="partial", subcategory="delta weight masking", config_cls=LtSftConfig,
    trains="a sparse difference to the pretrained weights: the K entries that moved most in a full fine-tuning",
    attach=attach, paper="Ansell, Ponti, Korhonen and Vulić 2022, Composable Sparse Fine-Tuning for "
                         "Cross-Lingual Transfer",
    mergeable=True, merge_tolerance=1e-5, default_lr=2.5e-5, needs_weight_gradients=True,
    hooks=TrainingHooks(before_training=_dense_phase, loss=_l1_term),
    combine=combine_sparse, combination_types=("linear",),
))
