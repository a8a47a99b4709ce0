"""Diff pruning (Guo, Rush and Kim, 2021, "Parameter-Efficient Transfer Learning with Diff Pruning",
ACL): learn a task-specific difference to the pretrained weights under a relaxed L0 penalty, prune
it to a fixed share of entries, then fine-tune those entries with the mask fixed::

    stage 1  W = W0 + z * z_g * w          w: a dense difference (0 at start)
             z   ~ HardConcrete(alpha)     one gate per entry; z_g one per tensor (the group gate)
             loss + lambda * (sum_i sigmoid(alpha_i - log(-l/r)) + sum_g sigmoid(alpha_g - log(-l/r)))
                                           (the expected number of open gates: a relaxed L0 norm)
    stage 2  M = the K entries of largest |E[z] * E[z_g] * w|, one ranking across all targets
    stage 3  W = W0 + M * d,   d = w on M at start, trained with M fixed and no penalty

    HardConcrete(alpha): u ~ U(0, 1), s = sigmoid(log u - log(1 - u) + alpha),
                         z = clamp(s * (r - l) + l, 0, 1),   l = -1.5, r = 1.5

Gates are sampled afresh at every step and the gradient flows through the sample (the
reparameterisation trick), so the penalty pushes ``alpha`` down wherever the loss does not need the
entry. peftlab runs stages 1 and 2 in the method's data pass (``begin_training``), with their own
optimizer, and stage 3 as the regular training that follows. The result is a sparse difference
(:mod:`.sparse_delta`): in stage 3 only the K entries are parameters (optimizer state for them
alone); the checkpoint holds them as index/value pairs; differences add like LT-SFT's.

Defaults (the reference code, github.com/dguo98/DiffPruning, its README and example scripts) and
deviations:
- ``l = -1.5, r = 1.5``, no temperature (the reference's stretch; not the L0 paper's -0.1, 1.1);
  ``alpha_init = 5`` (every gate starts almost surely open); ``sparsity_penalty = 1.25e-7``;
  group gates per tensor on (the reference's ``per_params_alpha``), each counted once in the penalty.
- Stage 1 trains ``w`` (and a task head) at ``l0_lr = 1e-5`` decaying linearly, the gates at
  ``alpha_lr = 0.1`` held constant (the reference's second scheduler is never stepped), AdamW without
  weight decay, gradients clipped to norm 1 separately for the two groups. It lasts as long as the
  run (``l0_steps=None``), as the reference's 3 + 3 epochs.
- ``keep_ratio = 0.005`` (0.5%, the README's target) or ``num_entries``; stage 3 at 5e-5, starting
  from stage 1's raw ``w`` on the kept entries (the reference's ``--finetune 1``).
- Pruning ranks ``|E[z] * E[z_g] * w|`` with the deterministic gate ``E[z] = clamp(sigmoid(alpha)(r - l)
  + l, 0, 1)``; the reference ranks the difference under the last *sampled* gates, one random draw.
  It keeps exactly K entries (top-K) where the reference binary-searches a threshold.
- Targets: the transformer blocks' weights and biases and the LayerNorms. The reference also prunes
  the embeddings: left out by default (add ``@embeddings`` where not tied to the output layer), as
  their dense difference would cost what the sparse stage saves. A task head (``modules_to_save``)
  trains in full in both stages and keeps what it learned in stage 1; the reference prunes its
  difference with the rest.
- Stage 1 holds ``w``, ``alpha`` and their AdamW moments densely: six times the targeted weights on
  top of the model, more than full fine-tuning, for that stage only.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Iterable

import torch
from torch import nn

from ...core.config import PeftConfig
from ...core.errors import PeftlabError
from ...core.hooks import TrainingHooks
from ...core.registry import MethodSpec, register
from .sparse_delta import (attach_sparse, base_tensors, batch_loss, batches, combine_sparse, entry_budget, is_chosen,
                           select_top)

NAME = "Diff pruning"
LOWER, UPPER = -1.5, 1.5  # the hard-concrete stretch
SHIFT = math.log(-LOWER / UPPER)  # alpha - SHIFT: log-odds of a gate being non-zero (0 for this stretch)


@dataclasses.dataclass(frozen=True)
class DiffPruningConfig(PeftConfig):
    """keep_ratio: share of the targeted entries kept after pruning (num_entries: their number);
    sparsity_penalty: lambda of the L0 term; alpha_init: every gate's start log-odds; group_gates: a
    gate per tensor on top of the per-entry ones; l0_steps: stage-1 steps (None: as many as the run);
    l0_lr, alpha_lr: stage-1 learning rates of the difference and of the gates."""

    targets: tuple[str, ...] | str | None = ("@query", "@key", "@value", "@attn_out", "@ffn_in", "@ffn_out",
                                             "@layernorm")
    keep_ratio: float = 0.005
    num_entries: int | None = None
    sparsity_penalty: float = 1.25e-7
    alpha_init: float = 5.0
    group_gates: bool = True
    l0_steps: int | None = None
    l0_lr: float = 1e-5
    alpha_lr: float = 0.1

    def validate(self) -> None:
        self._require(isinstance(self.keep_ratio, (int, float)) and 0 < self.keep_ratio <= 1, "keep_ratio",
                      "a share in (0, 1] such as 0.005")
        self._require(self.num_entries is None or (isinstance(self.num_entries, int) and self.num_entries > 0),
                      "num_entries", "a positive number of entries, or None to use keep_ratio")
        self._require(isinstance(self.sparsity_penalty, (int, float)) and self.sparsity_penalty >= 0,
                      "sparsity_penalty", "a number >= 0 such as 1.25e-7")
        self._require(isinstance(self.alpha_init, (int, float)) and math.isfinite(self.alpha_init), "alpha_init",
                      "a finite log-odds such as 5.0")
        self._require(self.l0_steps is None or (isinstance(self.l0_steps, int) and self.l0_steps > 0), "l0_steps",
                      "a positive number of steps, or None for as many as the run")
        for field in ("l0_lr", "alpha_lr"):
            value = getattr(self, field)
            self._require(isinstance(value, (int, float)) and value > 0, field, "a positive learning rate")


def sample_gate(alpha: torch.Tensor) -> torch.Tensor:
    """A hard-concrete sample per entry, differentiable in ``alpha``; exactly 0 or 1 with positive probability."""
    u = torch.rand_like(alpha).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid(torch.log(u) - torch.log1p(-u) + alpha)
    return (s * (UPPER - LOWER) + LOWER).clamp(0, 1)


def expected_gate(alpha: torch.Tensor) -> torch.Tensor:
    """The deterministic gate used for pruning: the stretched sigmoid without noise."""
    return (torch.sigmoid(alpha) * (UPPER - LOWER) + LOWER).clamp(0, 1)


def expected_nonzeros(alpha: torch.Tensor) -> torch.Tensor:
    """Sum over entries of P(gate != 0): the relaxed L0 norm the penalty weighs."""
    return torch.sigmoid(alpha - SHIFT).sum()


@dataclasses.dataclass
class StageOne:
    """What stage 1 leaves: the dense difference, the entry gates' and the group gates' log-odds."""

    diffs: list[torch.Tensor]
    alphas: list[torch.Tensor]
    group_alphas: torch.Tensor | None

    def scores(self) -> list[torch.Tensor]:
        groups = expected_gate(self.group_alphas) if self.group_alphas is not None else None
        return [(expected_gate(a) * (groups[i] if groups is not None else 1.0) * w).abs()
                for i, (a, w) in enumerate(zip(self.alphas, self.diffs))]


def l0_stage(model: Any, name: str, data: Iterable[Any], steps: int) -> StageOne:
    """Stage 1: train ``W0 + z * z_g * w`` under the L0 penalty for ``steps`` batches (cycling). The
    base weights are not touched: the model runs with them replaced functionally."""
    config: DiffPruningConfig = model.peft_configs[name]
    tensors = base_tensors(model, name)
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    paths = [names[id(t)] for t in tensors]
    diffs = [torch.zeros_like(t, dtype=torch.float32, requires_grad=True) for t in tensors]
    alphas = [torch.full_like(t, config.alpha_init, dtype=torch.float32, requires_grad=True) for t in tensors]
    groups = (torch.full((len(tensors),), float(config.alpha_init), device=tensors[0].device, requires_grad=True)
              if config.group_gates else None)
    gates = alphas + ([groups] if groups is not None else [])
    heads = [p for p in model.adapter_parameters(name) if p.numel()]  # before pruning only a head trains
    optimizer = torch.optim.AdamW([{"params": diffs + heads, "lr": config.l0_lr},
                                   {"params": gates, "lr": config.alpha_lr}], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda s: max(0.0, 1 - s / steps), lambda s: 1.0])
    model.train()
    for batch in itertools.islice(batches(data, NAME, steps, cycle=True), steps):
        group = sample_gate(groups) if groups is not None else None
        weights = {path: t + ((group[i] if group is not None else 1.0) * sample_gate(a) * w).to(t.dtype)
                   for i, (path, t, a, w) in enumerate(zip(paths, tensors, alphas, diffs))}

        def run(**inputs: Any) -> Any:
            return torch.func.functional_call(model, weights, (), inputs)

        penalty = sum(expected_nonzeros(a) for a in gates)
        loss = batch_loss(run, batch, NAME) + config.sparsity_penalty * penalty
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diffs + heads, 1.0)
        torch.nn.utils.clip_grad_norm_(gates, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    detach = [t.detach() for t in diffs], [a.detach() for a in alphas]
    return StageOne(*detach, groups.detach() if groups is not None else None)


def _prune(model: Any, name: str, data: Iterable[Any]) -> None:
    """Stages 1 and 2; stage 3 is the training that follows."""
    if is_chosen(model, name):
        return  # a difference loaded with the adapter: keep its entries
    config: DiffPruningConfig = model.peft_configs[name]
    k = entry_budget(model, name, NAME)
    steps = config.l0_steps or model.training_state.total_steps
    if steps is None:
        raise PeftlabError(f"{NAME}: stage 1 lasts as long as the run, but the run's length is unknown: pass "
                           "model.begin_training(loader, total_steps) or set l0_steps")
    stage = l0_stage(model, name, data, steps)
    select_top(model, name, stage.scores(), k, NAME, start=stage.diffs)


def attach(model: nn.Module, name: str, config: DiffPruningConfig, host: Any = None) -> None:
    attach_sparse(model, name, config.targets, NAME)


SPEC = register(MethodSpec(
    name="diff_pruning", title="Diff pruning", family="partial", subcategory="delta weight masking", config_cls=DiffPruningConfig,
    trains="a sparse difference to the pretrained weights: learned under a relaxed L0 penalty, pruned to the K "
           "largest entries, then fine-tuned with that mask fixed",
    attach=attach, paper="Guo, Rush and Kim 2021, Parameter-Efficient Transfer Learning with Diff Pruning",
    mergeable=True, merge_tolerance=1e-5, default_lr=5e-5, needs_weight_gradients=True,
    hooks=TrainingHooks(before_training=_prune), combine=combine_sparse, combination_types=("linear",),
    draws_per_forward=True,  # a hard-concrete gate sample per forward pass
))
