"""LoRAHub (Huang et al., 2023, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA
Composition"): a LoRA adapter for an unseen task, composed from LoRA adapters trained on other tasks
with weights found by a gradient-free search on a few examples of the new task. (Multi-task LoRA.)

With N trained LoRA adapters ``(A_i, B_i)`` of equal rank (A: r x in, B: out x r), the composed
adapter is::

    A = sum_i w_i A_i,    B = sum_i w_i B_i,    h = W0 x + s B A x

and ``w`` (N weights in ``[-1.5, 1.5]``, starting at 0) minimises, over ``steps`` evaluations of a
gradient-free optimiser (CMA-ES, as the paper, from nevergrad)::

    L_few-shot(w) + l1 * sum_i |w_i|

Only forward passes on the few examples: no gradient, no backward, nothing trained. The paper's
defaults are kept: 40 steps, ``l1 = 0.05``, bounds 1.5, init 0. The composition is LoRA's
``"linear"`` combination (``PeftModel.add_weighted_adapter(..., combination_type="linear")``), which
writes the result as a plain LoRA adapter.

Deviations:
- The official code asks nevergrad's ``NGOpt``, which in nevergrad 1.0 picks Cobyla for budgets
  this small: a local method that, started at ``w = 0`` where the composed update ``(sum w B)(sum w A)``
  is flat (quadratic in ``w``) and the L1 term pulls back, often never leaves 0. The default here
  is CMA-ES, the algorithm the paper names; ``optimizer="NGOpt"`` gives the code's choice.
- The penalty is ``l1 * sum |w_i|`` as the paper writes it; the official code uses the mean
  (``0.05 * sum |w_i| / N``): pass ``l1=0.05 / N`` for the code's value.
- The result is the best candidate the search evaluated (the loss has no noise in eval mode),
  not nevergrad's recommendation, which for some optimisers is a point never evaluated.
- Adapters with unequal scales (alpha/r) are composed as LoRA's "linear" does: each ``B_i`` is
  rescaled to the first adapter's scale (the paper's adapters share one config).
- The loss is the model's own (``model(**batch).loss``) or any ``loss_fn(model, batch)``; the paper
  uses the few-shot cross-entropy of Flan-T5.

Why LoRAHub has no registry entry: it trains nothing and adds no layer of its own — it is a way to
build a LoRA adapter from other LoRA adapters, and its result is a ``LoraConfig`` adapter that saves,
loads and merges as LoRA. A registered method needs a config that ``attach`` applies to a model on
its own (what the conformance suite checks); LoRAHub needs trained adapters and examples, which a
config cannot hold, and would have nothing to train or identity to keep. So it is a function here,
beside LoRA, that writes through the public ``add_weighted_adapter``.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Iterable, Mapping

import torch

from ...core.errors import PeftlabError
from .lora import write_combination

Batch = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class LoraHubResult:
    """What the search found: one weight per adapter (in the order given), the few-shot loss at
    those weights and the objective that was minimised (loss + l1 * sum |w|)."""

    weights: list[float]
    loss: float
    objective: float


def lorahub(model: Any, adapters: list[str], examples: Batch | Iterable[Batch], new_name: str, *,
            steps: int = 40, l1: float = 0.05, bound: float = 1.5, optimizer: str = "CMA", seed: int | None = 0,
            loss_fn: Callable[[Any, Batch], torch.Tensor] | None = None) -> LoraHubResult:
    """Search weights for the LoRA ``adapters`` of ``model`` (a PeftModel) on ``examples`` of a new
    task and add the composed adapter as ``new_name`` (inactive, as ``add_weighted_adapter`` adds).

    examples: one batch (a dict of tensors, e.g. ``input_ids``, ``attention_mask``, ``labels``) or a
        list of them; the loss is their mean. loss_fn(model, batch) -> scalar tensor replaces
        ``model(**batch).loss``.
    steps: loss evaluations (the optimiser's budget). l1: weight of the L1 penalty. bound: each weight
        lies in [-bound, bound]. optimizer: a name in ``nevergrad.optimizers.registry`` (``"CMA"``, the
        paper's; ``"NGOpt"``, its code's). seed: fixes the search (``None``: nevergrad's own randomness).

    The model's active adapters, trainable set and train/eval modes are as before afterwards.
    """
    batches = _batches(examples)
    _check_search(model, adapters, new_name, steps, l1, bound)
    try:
        import nevergrad as ng
        import numpy as np
    except ImportError as err:  # pragma: no cover - nevergrad is a dependency
        raise PeftlabError("LoRAHub needs nevergrad: pip install 'nevergrad>=1.0.12,<1.1'") from err
    if optimizer not in ng.optimizers.registry:
        raise PeftlabError(f"optimizer={optimizer!r} is not a nevergrad optimizer; use 'CMA' (the paper's), "
                           "'NGOpt' (its code's), or another name in nevergrad.optimizers.registry")
    n = len(adapters)
    space = ng.p.Array(init=np.zeros(n), lower=-bound, upper=bound)
    if seed is not None:
        space.random_state = np.random.RandomState(seed)
    search = ng.optimizers.registry[optimizer](parametrization=space, budget=steps)

    # One scratch adapter, rewritten in place per candidate (adding one per candidate would re-wrap
    # every layer each time). Creating it also checks the adapters can be combined at all.
    scratch = _free_name(model, f"{new_name}_search")
    model.add_weighted_adapter(adapters, [0.0] * n, scratch, "linear")
    active, trainable = model.active_adapters, model.trainable_adapters()
    modes = [(m, m.training) for m in model.modules()]
    best: LoraHubResult | None = None
    try:
        model.set_adapter(scratch)
        model.eval()  # no dropout: the same weights always give the same loss
        with warnings.catch_warnings():
            # cma remarks that nevergrad's injected start point (w = 0) comes one candidate at a time: harmless.
            warnings.filterwarnings("ignore", message=".*orphanated injected solution")
            for _ in range(steps):
                candidate = search.ask()
                weights = [float(v) for v in candidate.value]
                write_combination(model, adapters, weights, scratch, "linear")
                loss = few_shot_loss(model, batches, loss_fn)
                objective = loss + l1 * sum(abs(w) for w in weights)
                search.tell(candidate, objective)
                if best is None or objective < best.objective:
                    best = LoraHubResult(weights, loss, objective)
    finally:
        model.set_adapter(active, None if set(trainable) == set(active) else trainable)
        model.delete_adapter(scratch)
        for module, mode in modes:
            module.training = mode
    assert best is not None  # steps >= 1
    model.add_weighted_adapter(adapters, best.weights, new_name, "linear")
    return best


def few_shot_loss(model: Any, examples: Batch | Iterable[Batch],
                  loss_fn: Callable[[Any, Batch], torch.Tensor] | None = None) -> float:
    """Mean loss of ``model`` (its active adapters, in eval mode, no gradient) over the batches."""
    batches = _batches(examples)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            losses = [_loss(model, batch, loss_fn) for batch in batches]
    finally:
        for module, mode in modes:
            module.training = mode
    return sum(losses) / len(losses)


def _loss(model: Any, batch: Batch, loss_fn: Callable[[Any, Batch], torch.Tensor] | None) -> float:
    if loss_fn is not None:
        return float(loss_fn(model, batch))
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise PeftlabError(f"the model returned no loss for a batch with keys {sorted(batch)}; give examples with "
                           "labels, or loss_fn(model, batch) -> scalar tensor")
    return float(loss)


def _batches(examples: Batch | Iterable[Batch]) -> list[Batch]:
    batches = [examples] if isinstance(examples, Mapping) else list(examples)
    if not batches or not all(isinstance(b, Mapping) for b in batches):
        raise PeftlabError("examples: expected a batch (a dict of tensors such as input_ids and labels) or a "
                           f"non-empty list of them; got {type(examples).__name__}")
    return batches


def _check_search(model: Any, adapters: list[str], new_name: str, steps: int, l1: float, bound: float) -> None:
    # Checked before the search, so a bad request costs no loss evaluations.
    if new_name in model.peft_configs:
        raise PeftlabError(f"an adapter named {new_name!r} already exists; pick another name or delete it first")
    if len(adapters) < 2 or len(set(adapters)) != len(adapters):
        raise PeftlabError(f"adapters={list(adapters)!r}: LoRAHub composes at least two distinct LoRA adapters")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PeftlabError(f"steps={steps!r}: expected a positive number of loss evaluations (the paper: 40)")
    if not (isinstance(l1, (int, float)) and math.isfinite(l1) and l1 >= 0):
        raise PeftlabError(f"l1={l1!r}: expected a finite number >= 0 (the paper: 0.05)")
    if not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
        raise PeftlabError(f"bound={bound!r}: expected a positive number (the paper: 1.5)")


def _free_name(model: Any, name: str) -> str:
    while name in model.peft_configs:
        name += "_"
    return name
