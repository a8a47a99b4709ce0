"""LoRAPrune (Zhang, Chen, Zhuang, Liu, Chen, He and Shen, 2023, "LoRAPrune: Pruning Meets Low-Rank
Parameter-Efficient Fine-Tuning", Findings of ACL 2024).

LoRA trains ``h = W x + s B A x`` (``W`` frozen, out x in; ``s = alpha / r``) while structured groups
of the frozen weight are pruned. A weight's importance is a first-order Taylor estimate
``|dL/dW ⊙ W|``, but ``dL/dW`` is never computed (``W`` keeps no gradient): it is estimated from the
LoRA gradients, and ``W`` is taken with the update folded in (the paper's eq. for G, as its
reference code aim-uofa/LoRAPrune computes it)::

    G~ = dL/dB · A + B · dL/dA - dL/dB · dL/dA   (dL/dB, dL/dA: the gradients autograd left on B and A)
    I~ = |(W + s B A) ⊙ G~|                      elementwise, out x in
    I_g = sum of I~ over group g, then I / ||I||_2 per layer      (a group: one output channel)
    Ī <- 0.9 Ī + 0.1 I                           moving average from Ī = 0, every optimizer step

Pruning is iterative, before the optimizer step, every ``prune_every`` steps: each adapted layer
masks the unpruned channels of lowest ``Ī`` until ``floor(ratio(t) * out)`` are masked (masks only
grow), with the reference's cubic schedule over ``T`` steps::

    ratio(t) = init_ratio                         t <= warmup T
             = prune_ratio                        t >  T - cooldown T
             = prune_ratio + (init_ratio - prune_ratio) (1 - (t - warmup T) / (T - (warmup + cooldown) T))^3

A masked channel outputs nothing: its row of ``W``, its bias and its row of the LoRA update are
multiplied by 0 (the reference multiplies the layer's output by the mask)::

    h = m ⊙ (W x + s B A x + bias)                m: 1 per kept output channel, 0 per pruned one

The mask (``prune_mask``, bool, one entry per output channel) is frozen adapter state: saved and
loaded strictly with A and B. It is applied in the forward only, never written into the pretrained
weights, so disabling or deleting the adapter gives the unpruned model back; merging writes
``W ⊙ m + s (B A) ⊙ m`` and ``bias ⊙ m`` (pruned rows exactly zero), unmerging restores both.

Placement and defaults, from the paper and its reference code: LoRA on every linear layer of
attention and MLP (``targets="all-linear"``), prune_ratio 0.5 (the paper's main setting),
init_ratio 0.1, warmup 0.1, cooldown 0.1 (prune.py's defaults), prune_every 10 (its script),
moving average 0.9. LoRA's rank and scale stay peftlab's (r = 8, alpha = 16, as the reference's).

Deviations, and why:
- Structure: one output channel of each adapted layer, pruned per layer at the same ratio. The
  reference groups dependent structures of LLaMA by module name (a head of q/k/v sharing one score
  summed over q, k, v, o's input columns; an FFN channel over gate/up and down's input) so that
  pruned units can be cut out physically; peftlab adapts layers one at a time without
  model-specific wiring, and the output channel is the unit every linear layer has. Nothing is cut
  out physically: the mask computes what the pruned model computes.
- The target is reached: the reference prunes only while ``init_ratio < ratio(t) < prune_ratio``,
  so its last pruning stops short of the target; here the first step of the cooldown (or the last
  step of training) prunes to ``prune_ratio`` exactly.
- No LoRA dropout (the reference's script uses 0.05): the importance is read from the gradients of
  A and B, and peftlab's dropout would make them those of another input than the merge computes.
- The checkpoint is peftlab's own form (A, B and the mask): HF peft has no LoRAPrune.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import peft_names
from ...core.errors import PeftlabError
from ...core.hooks import TrainingHooks, TrainingState
from ...core.inject import wrap
from ...core.layer import BufferDict
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, resolve_targets
from .lora import LoraConfig, LoraLayer, LoraVariant


@peft_names(lora_alpha="alpha", target_modules="targets", lora_dropout="dropout", use_rslora="rslora")
@dataclasses.dataclass(frozen=True)
class LoraPruneConfig(LoraConfig):
    """LoRA's r, alpha, rslora, plus prune_ratio: the share of output channels of every adapted layer
    pruned by the end of the schedule; init_ratio: the share the cubic schedule starts from after the
    warmup; warmup, cooldown: fractions of training before and after the schedule (pruning stops at
    the cooldown, at prune_ratio); prune_every: steps between pruning steps; importance_beta: the
    moving-average constant of the channel importance."""

    targets: tuple[str, ...] | str | None = "all-linear"
    prune_ratio: float = 0.5
    init_ratio: float = 0.1
    warmup: float = 0.1
    cooldown: float = 0.1
    prune_every: int = 10
    importance_beta: float = 0.9

    def validate(self) -> None:
        super().validate()
        self._require(isinstance(self.prune_ratio, (int, float)) and 0.0 <= self.prune_ratio < 1.0, "prune_ratio",
                      "a share of channels in [0, 1) (the paper's main setting: 0.5)")
        self._require(isinstance(self.init_ratio, (int, float)) and 0.0 <= self.init_ratio <= self.prune_ratio,
                      "init_ratio", f"a share in [0, prune_ratio={self.prune_ratio}] (the reference's: 0.1)")
        self._require(isinstance(self.warmup, (int, float)) and 0.0 <= self.warmup < 1.0, "warmup",
                      "a fraction of training in [0, 1) such as 0.1")
        self._require(isinstance(self.cooldown, (int, float)) and 0.0 <= self.cooldown < 1.0
                      and self.warmup + self.cooldown < 1.0, "cooldown",
                      f"a fraction of training in [0, 1) with warmup + cooldown < 1 (warmup={self.warmup})")
        self._require(isinstance(self.prune_every, int) and not isinstance(self.prune_every, bool)
                      and self.prune_every >= 1, "prune_every", "a positive number of steps such as 10")
        self._require(isinstance(self.importance_beta, (int, float)) and 0.0 <= self.importance_beta < 1.0,
                      "importance_beta", "a moving-average constant in [0, 1) such as 0.9")
        if self.use_dora:
            raise PeftlabError("LoraPruneConfig.use_dora=True is not supported: LoRAPrune masks W + s B A by output "
                               "channel, DoRA renormalises it; use use_dora=False")
        if self.dropout:
            raise PeftlabError(f"LoraPruneConfig.dropout={self.dropout!r} is not supported: the importance is read "
                               "from the gradients of A and B, which dropout would make those of another input; "
                               "use dropout=0.0")

    def variant(self) -> "LoraVariant | None":
        return LORAPRUNE

    def peft_fields(self) -> dict[str, Any]:
        return {}  # peftlab's own form only (HF peft has no LoRAPrune)


def cubic_ratio(step: int, total: int, config: LoraPruneConfig) -> float:
    """The reference's share of channels pruned at step ``step`` (steps taken so far) of ``total``."""
    start, stop = config.warmup * total, total - config.cooldown * total
    if step <= start:
        return config.init_ratio
    if step > stop:
        return config.prune_ratio
    left = 1 - (step - start) / (stop - start)
    return config.prune_ratio + (config.init_ratio - config.prune_ratio) * left ** 3


def final_step(total: int, config: LoraPruneConfig) -> int:
    """The step that prunes to ``prune_ratio``: the first of the cooldown, or the last of training."""
    return min(total - 1, math.floor(total - config.cooldown * total) + 1)


def lora_importance(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor,
                    grad_b: torch.Tensor, scale: float) -> torch.Tensor:
    """Per output channel: ``sum_j |(W + s B A) ⊙ (dL/dB A + B dL/dA - dL/dB dL/dA)|_ij``, divided by
    its L2 norm over the layer's channels (float32, length out)."""
    a, b, grad_a, grad_b = a.detach().float(), b.detach().float(), grad_a.float(), grad_b.float()
    estimate = grad_b @ a + b @ grad_a - grad_b @ grad_a
    full = weight.detach().float() + scale * (b @ a)
    score = (full * estimate).abs().sum(1)
    return score / (torch.linalg.vector_norm(score) + 1e-8)


class LoraPruneLayer(LoraLayer):
    """A LoraLayer whose LoRAPrune adapters also carry an output-channel mask (``prune_mask``)."""

    frozen_attrs = ("prune_mask",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.prune_mask = BufferDict()
        self._importance: dict[str, torch.Tensor] = {}  # moving averages (training state, not saved)
        self._bias_undo: dict[str, torch.Tensor] = {}  # the bias each merge masked, for unmerge

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self._importance.pop(name, None)

    def _variant_forward(self, x: torch.Tensor, live: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        masks = [self.prune_mask[n] for n in live if n in self.prune_mask]
        if self.mixed_batch is not None or not masks:
            return super()._variant_forward(x, live, *args, **kwargs)
        keep = masks[0]
        for m in masks[1:]:
            keep = keep & m
        # (Always masked, never skipped when nothing is pruned yet: that branch would depend on
        # tensor values and break tracing.)
        weight = self.base_weight_out_in()
        bias = self.base_layer.bias
        out = F.linear(x.to(weight.dtype), weight * keep[:, None].to(weight.dtype),
                       None if bias is None else bias * keep.to(bias.dtype))
        for name in live:
            if name in self.variants:
                out = self.variants[name].forward(self, name, x, out)
            else:
                a, b, scale = self._factors(name)
                out = out + F.linear(F.linear(x.to(a.dtype), a), b).to(out.dtype) * scale
        return out

    def merge(self, name: str) -> None:
        super().merge(name)
        bias = self.base_layer.bias
        if name in self.prune_mask and bias is not None:
            self._bias_undo[name] = bias.detach().clone()
            with torch.no_grad():
                bias.mul_(self.prune_mask[name].to(bias.dtype))

    def unmerge(self, name: str) -> None:
        super().unmerge(name)
        undo = self._bias_undo.pop(name, None)
        if undo is not None:
            with torch.no_grad():
                self.base_layer.bias.copy_(undo)


class LoraPrune(LoraVariant):
    """The masked LoRA update of one LoRAPrune adapter."""

    def add(self, layer: LoraLayer, name: str, config: LoraConfig) -> None:
        if not isinstance(layer, LoraPruneLayer) or type(layer.base_layer) not in LINEAR_TYPES:
            found = type(layer.base_layer).__name__
            layer.delete_adapter(name)  # what LoraLayer.add made before calling here: leave nothing half-added
            raise PeftlabError(f"LoRAPrune masks the rows of a plain Linear/Conv1D weight; this layer wraps {found}. "
                               "Add LoRAPrune before other adapters of the layer, through get_peft_model or "
                               "add_adapter with a LoraPruneConfig")
        layer.prune_mask[name] = torch.ones(layer.out_features, dtype=torch.bool, device=layer.lora_B[name].weight.device)

    def forward(self, layer: LoraLayer, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        a, b, scale = layer._factors(name)
        keep = layer.prune_mask[name].to(b.dtype)
        return out + (F.linear(F.linear(x.to(a.dtype), a), b) * (scale * keep)).to(out.dtype)

    def delta_weight(self, layer: LoraLayer, name: str) -> torch.Tensor:
        # W ⊙ m + s (B A) ⊙ m - W: the pruned rows' -W cancels W exactly when merged.
        a, b, scale = layer._factors(name)
        keep = layer.prune_mask[name][:, None]
        weight = layer.base_weight_out_in()
        delta = torch.where(keep, (b @ a) * scale, -weight.to(b.dtype))
        return delta.T if layer.transposed else delta


LORAPRUNE = LoraPrune()


# -- training hooks --------------------------------------------------------------------------------

def _layers(model: Any, name: str) -> list[LoraPruneLayer]:
    return [m for _, m in model._delta_modules() if isinstance(m, LoraPruneLayer) and name in m.prune_mask]


def _total_steps(state: TrainingState) -> int:
    if not state.total_steps:
        raise PeftlabError("LoRAPrune's pruning schedule needs the number of training steps: call "
                           "model.begin_training(loader, total_steps=...) (peftlab's loop and Trainer do)")
    return state.total_steps


def accumulate_importance(layers: list[LoraPruneLayer], name: str, beta: float) -> None:
    """Fold this step's LoRA-gradient importance of every channel into the moving averages (from 0);
    a step whose scores are not finite anywhere is skipped, as the reference does."""
    scores = []
    for layer in layers:
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        if a.grad is None or b.grad is None:
            return
        scores.append(lora_importance(layer.base_weight_out_in(), a, b, a.grad, b.grad, layer.settings[name]))
    if any(not bool(torch.isfinite(s).all()) for s in scores):
        return
    for layer, score in zip(layers, scores):
        old = layer._importance.get(name)
        old = torch.zeros_like(score) if old is None else old
        layer._importance[name] = beta * old + (1 - beta) * score


def prune_to(layer: LoraPruneLayer, name: str, ratio: float) -> None:
    """Mask the unpruned channels of lowest importance until ``floor(ratio * out)`` are masked."""
    keep = layer.prune_mask[name]
    extra = math.floor(ratio * layer.out_features + 1e-9) - int((~keep).sum())
    if extra <= 0:
        return
    score = layer._importance.get(name)
    if score is None:
        score = torch.zeros(layer.out_features, device=keep.device)
    score = score.to(keep.device).masked_fill(~keep, float("inf"))
    keep[torch.topk(score, extra, largest=False).indices] = False


def _before_step(model: Any, name: str, state: TrainingState) -> None:
    config: LoraPruneConfig = model.peft_configs[name]
    total = _total_steps(state)
    step, last = state.step, final_step(total, config)  # step: optimizer steps taken so far
    if step > last:
        return  # the masks are final
    layers = _layers(model, name)
    accumulate_importance(layers, name, config.importance_beta)
    if step == last:
        ratio = config.prune_ratio
    elif step % config.prune_every == 0:
        ratio = cubic_ratio(step, total, config)
        if ratio <= config.init_ratio and config.init_ratio < config.prune_ratio:
            return  # warmup: the reference prunes only once the schedule has left init_ratio
    else:
        return
    for layer in layers:
        prune_to(layer, name, ratio)
        if step == last:
            layer._importance.pop(name, None)


def pruned_share(model: Any, name: str) -> float:
    """The share of output channels masked over every layer of adapter ``name``."""
    masks = [layer.prune_mask[name] for layer in _layers(model, name)]
    total = sum(m.numel() for m in masks)
    return sum(int((~m).sum()) for m in masks) / total if total else 0.0


def attach(model: nn.Module, name: str, config: LoraPruneConfig, host: Any = None) -> None:
    paths = resolve_targets(model, config.targets, allowed_types=LINEAR_TYPES)
    for path in paths:  # check every target before wrapping any
        module = model.get_submodule(path)
        if type(module) not in LINEAR_TYPES and not isinstance(module, LoraPruneLayer):
            raise PeftlabError(f"layer {path!r} is already wrapped ({type(module).__name__}); LoRAPrune masks the rows "
                               "of a plain Linear/Conv1D weight: add LoRAPrune before other adapters of that layer, "
                               "or narrow its targets")
        if isinstance(module, LoraPruneLayer) and type(module.base_layer) not in LINEAR_TYPES:
            raise PeftlabError(f"layer {path!r} wraps {type(module.base_layer).__name__}, not a plain Linear/Conv1D")
    for path in paths:
        wrap(model, path, LoraPruneLayer).add(name, config)


SPEC = register(MethodSpec(
    name="loraprune", title="LoRAPrune", family="reparameterized", subcategory="LoRA-guided weight update",
    config_cls=LoraPruneConfig,
    trains="low-rank update B A while output channels of the frozen weights are pruned by LoRA-gradient importance",
    attach=attach, paper="Zhang et al. 2023, LoRAPrune: Pruning Meets Low-Rank Parameter-Efficient Fine-Tuning",
    mergeable=True, merge_tolerance=1e-5, default_lr=5e-4,
    hooks=TrainingHooks(before_step=_before_step),
))
