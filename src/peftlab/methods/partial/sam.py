"""SAM, the Second-order Approximation Method (Fu, Yang, So, Lam, Bing and Collier, 2023, "On the
Effectiveness of Parameter-Efficient Fine-Tuning", AAAI): train only the pretrained weights whose
tuning lowers a second-order approximation of the loss most, chosen once before training; every
other weight stays frozen.

The paper approximates the loss around the pretrained weights ``w0``, tuning the entries of a 0/1
diagonal mask ``M``, by its Taylor expansion ``L(w0) + g^T M d + 1/2 (M d)^T H (M d)`` with
``g = grad L(w0)`` over the training data. With ``H`` diagonal (``h_i``) the best ``d`` gives the
loss reduction ``sum_i M_i g_i^2 / (2 h_i)``, so the optimal mask keeps the top ``g_i^2 / h_i``
(its Theorem 3). As the Hessian diagonal is too costly, SAM minimises the upper bound in which every
``h_i`` is replaced by ``|lambda_max|`` (the Hessian's largest eigenvalue, one constant), which drops
the curvature from the ranking::

    g    = sum_{t<=T} grad L_batch_t(w0)        gradient of the training loss, accumulated over T
                                                batches at the pretrained weights (no update between)
    s_i  = g_i^2                                (= g_i^2 / |lambda_max| up to a constant)
    M    = top-k of s within each targeted tensor (k = keep_ratio * its size)
    W    = W0 + M * d,   only d on M trains     (d = 0 at start: identity at init)

The ranking squares the *accumulated* gradient (signed batch gradients summed first), which sets it
apart from its neighbours: Child-Tuning_D sums squared batch gradients, FISH Mask squared
per-example gradients. The review files SAM under delta weight masking; peftlab holds it as a sparse
difference (:mod:`.sparse_delta`): only the chosen entries are parameters (optimizer state for them
alone), the checkpoint keeps them as index/value pairs, merging adds them into the weights.

Defaults (the reference code, github.com/fuzihaofzh/AnalyzeParameterEfficientFinetune, its
``scripts/train.sh``: ``bsearch=0.005,burnin=600``, batch size 16, learning rate 1e-4) and deviations:
- ``keep_ratio = 0.005`` (0.5%), ``num_batches = 600``, learning rate 1e-4. The reference sums the
  gradients of its burn-in steps without updating the weights (it then returns before the optimizer
  step) and chooses at step 600, so 599 batches enter its sum.
- Top-k within each tensor (``per_tensor=True``), as the reference does; the paper's Theorem 3 ranks
  all parameters together: ``per_tensor=False``. Per tensor ``k`` is rounded up, at least 1 (the
  reference rounds down, so a tensor under 200 entries gets none at 0.5%).
- At most one pass over the data: the reference's loader cycles, but with the weights fixed another
  pass over the same examples adds only dropout noise. Dropout stays on, as in the reference.
- The reference clips each batch gradient to norm 1 (its training loop's setting) before adding it;
  peftlab sums the unclipped gradients, the gradient of the training loss the paper names.
- Targets: every weight and bias of the transformer blocks and the LayerNorms (``@query`` ...
  ``@ffn_out``, ``@layernorm``). The reference ranks all encoder tensors, embedding tables included;
  they are left out here (add ``@embeddings`` where not tied to the output layer), as their dense
  gradient would cost what the sparse optimizer state saves. A task head trains in full in the
  reference: name it in ``modules_to_save``.
- The reference masks gradients, so AdamW's weight decay still shrinks unchosen weights there; here
  they stay frozen, the p-sparse model the paper analyses.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch
from torch import nn

from ...core.config import PeftConfig
from ...core.hooks import TrainingHooks
from ...core.registry import MethodSpec, register
from .sparse_delta import (attach_sparse, base_tensors, batch_loss, batches, combine_sparse, count_of, entries,
                           is_chosen, select_top)

NAME = "SAM"


@dataclasses.dataclass(frozen=True)
class SAMConfig(PeftConfig):
    """keep_ratio: share of the targeted entries that train; num_batches: training batches whose
    gradients are summed (T); per_tensor: rank within each tensor (reference) or across the model."""

    targets: tuple[str, ...] | str | None = ("@query", "@key", "@value", "@attn_out", "@ffn_in", "@ffn_out",
                                             "@layernorm")
    keep_ratio: float = 0.005
    num_batches: int = 600
    per_tensor: bool = True

    def validate(self) -> None:
        self._require(isinstance(self.keep_ratio, (int, float)) and 0 < self.keep_ratio <= 1, "keep_ratio",
                      "a share in (0, 1] such as 0.005")
        self._require(isinstance(self.num_batches, int) and not isinstance(self.num_batches, bool)
                      and self.num_batches > 0, "num_batches", "a positive number of batches, such as 600")
        self._require(isinstance(self.per_tensor, bool), "per_tensor",
                      "True (top-k within each tensor) or False (one ranking across the model)")


def accumulated_gradient(model: Any, name: str, data: Iterable[Any], num_batches: int) -> list[torch.Tensor]:
    """Sum over up to ``num_batches`` batches (one pass at most) of the batch-loss gradient of each
    targeted base tensor (order of :func:`.sparse_delta.entries`), at the current weights. Taken with
    ``torch.autograd.grad``: no ``.grad`` is touched and no weight changes."""
    tensors = base_tensors(model, name)
    flags = [t.requires_grad for t in tensors]
    total = [torch.zeros_like(t, dtype=torch.float32) for t in tensors]
    model.train()
    try:
        for t in tensors:
            t.requires_grad_(True)
        for batch in batches(data, NAME, limit=num_batches):
            grads = torch.autograd.grad(batch_loss(model, batch, NAME), tensors, allow_unused=True)
            for acc, g in zip(total, grads):
                if g is not None:
                    acc.add_(g.float())
    finally:
        for t, flag in zip(tensors, flags):
            t.requires_grad_(flag)
    return total


def _choose(model: Any, name: str, data: Iterable[Any]) -> None:
    if is_chosen(model, name):
        return  # a mask loaded with the adapter: keep it
    config: SAMConfig = model.peft_configs[name]
    scores = [g * g for g in accumulated_gradient(model, name, data, config.num_batches)]
    if not config.per_tensor:
        select_top(model, name, scores, count_of(config.keep_ratio, sum(s.numel() for s in scores)), NAME)
        return
    for (layer, part), score in zip(entries(model, name), scores):
        layer.set_entries(name, part, score.reshape(-1).topk(count_of(config.keep_ratio, score.numel())).indices)


def attach(model: nn.Module, name: str, config: SAMConfig, host: Any = None) -> None:
    attach_sparse(model, name, config.targets, NAME)


SPEC = register(MethodSpec(
    name="sam", title="SAM", family="partial", subcategory="delta weight masking", config_cls=SAMConfig,
    trains="the pretrained weights with the largest squared accumulated gradient (a fixed sparse mask chosen "
           "before training by a second-order approximation of the loss)",
    attach=attach, paper="Fu, Yang, So, Lam, Bing and Collier 2023, On the Effectiveness of Parameter-Efficient "
                         "Fine-Tuning",
    mergeable=True, merge_tolerance=1e-5, default_lr=1e-4, needs_weight_gradients=True,
    hooks=TrainingHooks(before_training=_choose), combine=combine_sparse, combination_types=("linear",),
))
