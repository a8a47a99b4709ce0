"""LoRA-FA (Zhang, Zhang, Shi, Chu and Li, 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation for
Large Language Models Fine-tuning", arXiv 2308.03303v1).

LoRA with the projection-down ``A`` frozen at its random initialisation; only the projection-up
``B`` trains::

    h = W0 x + (alpha / r) B (A x)        A: r x in, random, frozen;  B: out x r, zero, trained

The point is activation memory. LoRA's gradient of ``A`` is ``(scale B^T g) x^T``: training keeps
the layer's full-width input ``x`` (tokens x in) for every adapted layer. With ``A`` frozen, the
only adapter gradient is ``B``'s, ``scale g (x A^T)^T``, which needs the r-wide ``low = x A^T``
(tokens x r) alone; the gradient flowing back to ``x`` needs ``A`` itself, not ``x``. The update
stays in the r-dimensional row space of ``A`` (``dW = s B A``), so it merges exactly as LoRA's.

How that is made true here: each adapter is a LoRA adapter of :class:`~.lora.LoraLayer` whose
``lora_A`` entry is a :class:`FrozenDown` — a module holding ``A`` as a *buffer*, not a parameter.
So no optimizer ever sees it, ``requires_grad`` stays False whatever ``set_adapter`` does, and
``F.linear(x, A)`` records only ``A`` for backward (autograd saves ``x`` for a linear only when the
weight needs a gradient). The adapter runs as a :class:`~.lora.LoraVariant`, so it takes none of
LoRA's fast paths (the shared query/key/value down-projection ``_JointDown`` among them, which also
keeps no ``x`` when every ``A`` is frozen).

Placement, initialisation, defaults: as peftlab's LoRA (query and value, ``r = 8``, ``alpha = 16``,
no dropout); ``A`` is drawn as LoRA draws it (Kaiming-uniform, loralib's and peft's), ``B = 0``,
identity at init — the paper's "A is randomly initialised and frozen, B is zero". Optimizer: plain
AdamW on ``B`` (the paper's v1 setting). The checkpoint is a LoRA adapter in HF peft's layout
(``lora_A.weight``, ``lora_B.weight``; peft has LoRA-FA only as an optimizer over ordinary LoRA
adapters, ``peft.optimizers.create_lorafa_optimizer``): peft loads it as LoRA with equal outputs,
and a ``"peftlab": {"method": "lora_fa"}`` entry, which peft ignores, makes peftlab read it back as
LoRA-FA. ``A`` is stored, not regenerated from a seed: that is the only form peft reads, a seed
would tie the checkpoint to one torch version's RNG and one device's generator, and ``A`` is
small (r x in per layer, the size of ``B``).

Deviations, and why:
- The paper's v2 (2025, "LoRA-FA: Efficient and Effective Low Rank Representation Fine-tuning", the
  form peft's optimizer implements) adds a closed-form gradient correction,
  ``g_B <- g_B (A A^T)^{-1} / s^2``. This is v1, the 2023 method the task names; for v2, train this
  adapter's ``B`` with peft's ``LoraFAOptimizer`` (it reads A and B pairs by name).
- Embedding targets are refused: peft's LoRA starts an embedding with ``A = 0``, B random, and a
  frozen zero ``A`` would never learn (nor is there an activation to save: the input is ids).
- With ``dropout > 0`` training keeps dropout's mask (one byte per input element) for the gradient
  of ``x``; the paper's saving is then ``x``'s bytes less the mask's.
- LoRA's in-place add of the update into the base output is not used: the update is added with one
  ``addmm`` into a new tensor (same numbers; one more output-sized temporary, nothing more saved).
- Mixed batches (one adapter per example) are not served, as for LoRA's other variants.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import PEFTLAB_KEY, peft_names
from ...core.errors import PeftlabError
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, resolve_targets
from . import lora


@peft_names(**lora.LoraConfig.peft_aliases)
@dataclasses.dataclass(frozen=True)
class LoraFAConfig(lora.LoraConfig):
    """LoRA's r, alpha, dropout, rslora and targets (Linear/Conv1D layers only); A is frozen at its
    random initialisation and only B trains."""

    def validate(self) -> None:
        super().validate()
        if self.use_dora:
            raise PeftlabError("LoraFAConfig.use_dora=True is not supported: DoRA trains its own magnitude and "
                               "direction on top of A and B, which is not LoRA-FA; use use_dora=False")

    def variant(self) -> "lora.LoraVariant | None":
        return LORA_FA

    def peft_fields_for(self, model: Any, adapter_name: str) -> dict[str, Any]:
        # peft's LoRA form (peft loads A and B as LoRA) plus the marker that reads it back as LoRA-FA.
        return {PEFTLAB_KEY: {"method": self.method}}

    @classmethod
    def from_peft(cls, data: dict[str, Any]) -> "LoraFAConfig":
        extras = sorted(k for k in (data.get(PEFTLAB_KEY) or {}) if k != "method")
        if extras:
            raise PeftlabError(f"the {PEFTLAB_KEY!r} entry of this LoRA-FA config has {extras}; LoRA-FA reads only "
                               "'method'")
        return super().from_peft(data)  # type: ignore[return-value]


class FrozenDown(nn.Module):
    """LoRA-FA's projection-down ``A`` (r x in): a buffer named ``weight``, so the checkpoint key is
    LoRA's ``lora_A.weight`` while no optimizer, ``requires_grad_`` or ``set_adapter`` can train it."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, frozen"


class LoraFA(lora.LoraVariant):
    """The update ``s B (x A^T)`` with ``A`` a frozen buffer: backward keeps ``x A^T``, ``A`` and
    ``B``, never ``x``."""

    def add(self, layer: lora.LoraLayer, name: str, config: lora.LoraConfig) -> None:
        if layer.is_embedding:  # attach refuses these first; a direct LoraLayer.add lands here
            raise PeftlabError("LoRA-FA adapts Linear/Conv1D layers; a target is an Embedding (its LoRA A starts at "
                               "zero, so a frozen A would never learn). Narrow the targets")
        # Keep the A that LoraLayer.add drew (LoRA's Kaiming-uniform), as a frozen buffer.
        layer.lora_A[name] = FrozenDown(layer.lora_A[name].weight)

    def forward(self, layer: lora.LoraLayer, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        a, b, scale = layer._factors(name)
        h = layer.lora_dropout[name](x) if name in layer.lora_dropout else x
        # A needs no gradient: autograd records A (for the gradient of x), not x.
        low = F.linear(h.to(a.dtype), a).reshape(-1, a.shape[0])
        out2 = out.reshape(-1, layer.out_features)
        if out2.dtype == low.dtype:
            new = torch.addmm(out2, low, b.T, alpha=scale)
        else:  # (autocast, or a base in another dtype)
            new = out2 + (F.linear(low, b) * scale).to(out2.dtype)
        return new.view(out.shape)

    def delta_weight(self, layer: lora.LoraLayer, name: str) -> torch.Tensor:
        a, b, scale = layer._factors(name)
        delta = (b @ a) * scale  # out x in
        return delta.T if layer.transposed else delta


LORA_FA = LoraFA()


def attach(model: nn.Module, name: str, config: LoraFAConfig, host: Any = None) -> None:
    # Linear/Conv1D only, checked before any layer is wrapped: a refused config changes nothing.
    resolve_targets(model, config.targets, allowed_types=LINEAR_TYPES)
    lora.attach(model, name, config, host)


SPEC = register(MethodSpec(
    name="lora_fa", title="LoRA-FA", family="reparameterized", subcategory="LoRA-based improvement", config_cls=LoraFAConfig,
    trains="projection-up B of a low-rank update B A, with A frozen at its random initialisation", attach=attach,
    paper="Zhang et al. 2023, LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning",
    mergeable=True, merge_tolerance=1e-4, default_lr=5e-4,
))
