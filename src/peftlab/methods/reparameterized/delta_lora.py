"""Delta-LoRA (Zi, Qi, Wang, Wang, Wong and Zhang, 2023, "Delta-LoRA: Fine-Tuning High-Rank Parameters
with the Delta of Low-Rank Matrices", arXiv:2309.02411).

LoRA's low-rank update is trained as usual; in addition, after every optimizer step ``t > K`` the
pretrained weight itself moves by the change that step made to the scaled product (the paper's
Algorithm 1; steps counted from 0, as ``TrainingState.step``)::

    h = W x + s B A x                                   s = alpha / r (LoRA's scale), B = 0 at init
    W_{t+1} = W_t + λ s (B_{t+1} A_{t+1} - B_t A_t)     for t > K; W_{t+1} = W_t otherwise

``W`` gets no gradient and no optimizer state: its update costs one rank-r product difference per
layer and step, which is the method's point (a full-rank change of W at LoRA's memory for optimizer
state). The paper writes the product ``A B`` with ``A``: d x r, ``B``: r x k; here it is ``B A`` in
LoRA's (and peft's) shapes, the same matrix.

Where the change of W lives (the decision this implementation makes): the pretrained weight is
never written. Each adapted layer keeps the accumulated change ``D_t = W_t - W_0`` as frozen adapter
state (``delta_lora_weight``, laid out like the base weight: out x in, GPT-2's Conv1D in x out), and
the forward computes with ``W_0 + D`` folded into one temporary weight (one GEMM, as the base layer
runs). So a disabled or deleted adapter gives the pretrained model back exactly, several Delta-LoRA
adapters can share a base, and the checkpoint (A, B and D) rebuilds the trained weights on a fresh
pretrained model. Merging writes ``D + s B A`` into the weight (exact up to float rounding).

Costs, per adapted layer (out x in weight, rank r):
- memory: ``D``, dense out x in, in the adapter's dtype: as large as the adapted weight itself
  (MiniLM query or value, 384 x 384 float32: 576 KiB; the checkpoint carries it too, so a Delta-LoRA
  checkpoint is as large as the adapted weights, not LoRA's r (in + out)). Between ``before_step``
  and ``after_step`` the previous ``A`` and ``B`` are held (r (in + out) values; 24 KiB at r = 8 on
  MiniLM), not the previous product. In training the folded weight ``W_0 + D`` is an out x in
  temporary kept for the backward pass.
- time: per step, one rank-2r GEMM accumulated into ``D`` (``2 r in out`` multiply-adds); per
  forward, one out x in addition to fold ``D`` into ``W_0``.

Placement, initialisation and defaults: query and value projections (LoRA's placement, on which the
paper's experiments build; GPT-2's fused ``c_attn`` as a whole), ``A`` Kaiming-uniform and ``B = 0``
(the paper's Algorithm 1), update ratio ``λ = 2`` and start steps ``K = 500`` (the paper's
implementation details: "We use update ratio λ=2 and set start steps K=500", as a public
reimplementation quotes them — the paper's PDF was not reachable here, and it has no public reference
code), no dropout on the low-rank branch. A run shorter than K steps is plain LoRA: set
``start_steps`` to a fraction of short runs.

Deviations, and why:
- ``W`` itself is not updated: ``W_0 + D`` with ``D`` accumulated as above is the same matrix (see
  above for why it is kept apart).
- The product difference is computed as ``(B_{t+1} - B_t) A_{t+1} + B_t (A_{t+1} - A_t)``, which
  equals ``B_{t+1} A_{t+1} - B_t A_t`` exactly in real arithmetic but does not subtract two large,
  nearly equal products in floating point.
- ``alpha`` defaults to LoRA's here (16 with r = 8, scale 2), as for every LoRA-derived method in
  peftlab; the paper's scale is its ``alpha / r`` per task.
- Dropout on the low-rank branch is refused rather than silently dropped: the paper removes it so
  that the change of ``B A`` stands for the gradient step ``W`` would take.
- Linear and GPT-2 Conv1D layers only (an embedding's ``D`` would be vocab x dim), with
  full-precision weights (the paper updates the float weight; a 4-bit base cannot hold the change).
- Checkpoints are peftlab's own form (HF peft has no Delta-LoRA): ``lora_A.weight``,
  ``lora_B.weight`` and ``delta_lora_weight`` per layer; peft cannot read the file (no ``peft_type``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core import quant
from ...core.config import peft_names
from ...core.errors import PeftlabError
from ...core.hooks import TrainingHooks, TrainingState
from ...core.inject import wrap
from ...core.layer import BufferDict, base_of
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, resolve_targets
from .lora import LoraConfig, LoraLayer, LoraVariant


@peft_names(lora_alpha="alpha", target_modules="targets", lora_dropout="dropout", use_rslora="rslora")
@dataclasses.dataclass(frozen=True)
class DeltaLoraConfig(LoraConfig):
    """LoRA's r, alpha, rslora and targets, plus update_ratio (λ): how much of each step's change of
    ``s B A`` the pretrained weight also takes; start_steps (K): the weight moves after steps t > K
    (steps counted from 0). dropout must stay 0 (the paper removes it)."""

    update_ratio: float = 2.0
    start_steps: int = 500

    def validate(self) -> None:
        super().validate()
        self._require(self.update_ratio > 0, "update_ratio",
                      "a positive number λ, the share of each step's change of s B A also added to the weight "
                      "(the paper uses 2; 0 would be plain LoRA)")
        self._require(self.start_steps >= 0, "start_steps",
                      "a number of steps K >= 0 after which the weight starts to move (the paper uses 500)")
        self._require(self.dropout == 0, "dropout",
                      "0.0: Delta-LoRA removes dropout from the low-rank branch so that the change of B A stands "
                      "for the gradient step of W (as the paper argues); use LoRA for dropout")
        self._require(not self.use_dora, "use_dora", "False: Delta-LoRA updates the weight by plain s B A")

    def variant(self) -> "LoraVariant | None":
        return DELTA_LORA

    def peft_fields(self) -> dict[str, Any]:
        return {}  # peftlab's own form only: HF peft has no Delta-LoRA

    @classmethod
    def from_peft(cls, data: dict[str, Any]) -> "DeltaLoraConfig":
        raise PeftlabError("DeltaLoraConfig cannot read an HF peft config: peft has no Delta-LoRA (a peft LoRA "
                           "checkpoint loads as LoraConfig)")


class DeltaLoraLayer(LoraLayer):
    """A Linear/Conv1D layer with Delta-LoRA adapters (and any plain LoRA adapters added over them).

    Per Delta-LoRA adapter: trained ``lora_A`` (r x in), ``lora_B`` (out x r) and the frozen
    accumulated change of the weight, ``delta_lora_weight`` (laid out like the base weight)."""

    frozen_attrs = ("delta_lora_weight",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.delta_lora_weight = BufferDict()
        # (A_t, B_t) of each adapter, taken before the optimizer step that the W update follows.
        self._before: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self._before.pop(name, None)

    # -- the step rule ------------------------------------------------------------------------
    def remember_factors(self, name: str) -> None:
        """Keep ``A_t`` and ``B_t`` (copies) for the update after the coming optimizer step."""
        a, b, _ = self._factors(name)
        self._before[name] = (a.detach().clone(), b.detach().clone())

    def move_weight(self, name: str, ratio: float) -> None:
        """``D += λ s (B_{t+1} A_{t+1} - B_t A_t)``, with ``A_t``, ``B_t`` from :meth:`remember_factors`."""
        if name not in self._before:
            raise PeftlabError(f"Delta-LoRA adapter {name!r}: the optimizer step ran without A and B having been "
                               "kept before it; call model.optimizer_step(optimizer) (or before_optimizer_step() "
                               "before optimizer.step(), then after_optimizer_step())")
        a_old, b_old = self._before.pop(name)
        a, b, scale = self._factors(name)
        delta = self.delta_lora_weight[name]
        with torch.no_grad():
            a, b = a.detach().to(delta.dtype), b.detach().to(delta.dtype)
            a_old, b_old = a_old.to(delta.dtype), b_old.to(delta.dtype)
            # [B_{t+1} - B_t, B_t] [A_{t+1}; A_{t+1} - A_t]: one rank-2r GEMM, one pass over D.
            left = torch.cat([b - b_old, b_old], dim=1)  # out x 2r
            right = torch.cat([a, a - a_old])  # 2r x in
            if self.transposed:  # Conv1D keeps W as in x out: add the transpose
                delta.addmm_(right.T, left.T, alpha=ratio * scale)
            else:
                delta.addmm_(left, right, alpha=ratio * scale)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        live = self.live_adapters()
        held = [n for n in live if n in self.delta_lora_weight]
        if (not held or args or kwargs or self.mixed_batch is not None or not self._is_plain()
                or any(n in self.variants and n not in self.delta_lora_weight for n in live)):
            # No live Delta-LoRA adapter, another wrapper inside, or another variant beside it:
            # LoRA's general path (Delta-LoRA's own update is then DeltaLora.forward).
            return super().forward(x, *args, **kwargs)
        # W_0 + D folded into one temporary weight: one GEMM, as the base layer runs.
        weight = self.base_layer.weight
        for name in held:
            weight = weight + self.delta_lora_weight[name].to(weight.dtype)
        x2 = x.reshape(-1, self.in_features)
        out = self._base_forward_2d(x2, weight)  # a fresh tensor: the low-rank terms add into it
        for name in live:
            a, b, scale = self._factors(name)
            h = self.lora_dropout[name](x2) if name in self.lora_dropout else x2  # (plain LoRA adapters only)
            low = F.linear(h if h.dtype == a.dtype else h.to(a.dtype), a)
            if out.dtype == low.dtype:
                out = out.addmm_(low, b.T, alpha=scale)
            else:
                out = out + (F.linear(low, b) * scale).to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)


class DeltaLora(LoraVariant):
    """Delta-LoRA's adapter: LoRA's ``s B A`` plus the accumulated change ``D`` of the weight."""

    def add(self, layer: LoraLayer, name: str, config: LoraConfig) -> None:
        if not isinstance(layer, DeltaLoraLayer):
            raise PeftlabError("Delta-LoRA adapters live in DeltaLoraLayer wrappers; add them with DeltaLoraConfig "
                               "through get_peft_model or add_adapter")
        weight = base_of(layer.base_layer).weight
        dtype = layer.lora_A[name].weight.dtype
        layer.delta_lora_weight[name] = torch.zeros(weight.shape, dtype=dtype, device=weight.device)

    def forward(self, layer: LoraLayer, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        a, b, scale = layer._factors(name)
        delta = layer.delta_lora_weight[name]
        h = x.to(a.dtype)
        moved = h @ delta if layer.transposed else F.linear(h, delta)
        return out + (moved + F.linear(F.linear(h, a), b) * scale).to(out.dtype)

    def delta_weight(self, layer: LoraLayer, name: str) -> torch.Tensor:
        a, b, scale = layer._factors(name)
        product = (b @ a) * scale
        return layer.delta_lora_weight[name] + (product.T if layer.transposed else product)


DELTA_LORA = DeltaLora()


# -- training hooks -----------------------------------------------------------------------------

def _layers(model: Any, name: str) -> list[DeltaLoraLayer]:
    return [m for _, m in model._delta_modules() if isinstance(m, DeltaLoraLayer) and name in m.delta_lora_weight]


def _moves(model: Any, name: str, state: TrainingState) -> bool:
    """Whether the weight moves after the step about to be (or just) taken: the paper's ``t > K``."""
    return state.step > model.peft_configs[name].start_steps


def _before_step(model: Any, name: str, state: TrainingState) -> None:
    if _moves(model, name, state):
        for layer in _layers(model, name):
            layer.remember_factors(name)


def _after_step(model: Any, name: str, state: TrainingState) -> None:
    if _moves(model, name, state):
        ratio = model.peft_configs[name].update_ratio
        for layer in _layers(model, name):
            layer.move_weight(name, ratio)


# -- attaching ------------------------------------------------------------------------------------

def attach(model: nn.Module, name: str, config: DeltaLoraConfig, host: Any = None) -> None:
    paths = resolve_targets(model, config.targets, allowed_types=LINEAR_TYPES)
    for path in paths:  # everything checked before the first layer is wrapped
        base = base_of(model.get_submodule(path))
        if quant.is_quantized(base):
            raise PeftlabError(f"Delta-LoRA updates the pretrained weight itself, but {path!r} is quantized "
                               f"({quant.quant_description(base)}); use a full-precision model, or QLoRA on a "
                               "quantized one")
    for path in paths:
        wrap(model, path, DeltaLoraLayer).add(name, config)


# merge_tolerance: LoRA's (the merged weight W_0 + D + s B A against (W_0 + D) x + s B (A x)).
SPEC = register(MethodSpec(
    name="delta_lora", title="Delta-LoRA", family="reparameterized", subcategory="LoRA-guided weight update", config_cls=DeltaLoraConfig,
    trains="low-rank update B A; the pretrained weight also moves by λ times each step's change of s B A",
    attach=attach,
    paper="Zi et al. 2023, Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of Low-Rank Matrices",
    mergeable=True, merge_tolerance=1e-4, default_lr=5e-4,
    # D is adapter state and the factors are copied within one step: a checkpoint holds everything.
    hooks=TrainingHooks(before_step=_before_step, after_step=_after_step, resumable=True),
))
