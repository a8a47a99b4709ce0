"""Threshold-Mask (Zhao, Lin, Mi, Jaggi and Schütze, 2020, "Masking as an Efficient Alternative to
Finetuning for Pretrained Language Models", EMNLP): the pretrained weights never change; a binary
mask chosen per task selects which of them the model uses::

    M = 1[s > tau],    W = W0 * M                     (elementwise; one real score s per weight)
    dL/ds := dL/dM = dL/dW * W0                       (straight-through estimator: the binarizer's
                                                       gradient is taken as the identity)
    s <- s - lr * Adam(dL/ds)

Several live adapters on one layer multiply their masks, ``W = W0 * M1 * M2`` (masking twice is
masking with the intersection; ``dL/ds1 = dL/dW * W0 * M2``). Disabled, or with no live adapter, the
layer is the base layer, exactly. Biases are not masked (as the reference's default).

The checkpoint holds each mask as packed bits, 8 entries a byte (``mask.bits``, uint8, ``ceil(n/8)``
bytes for an ``n``-entry weight, entry ``8k+i`` in bit ``i`` of byte ``k``): the paper's point is a
1-bit-per-weight footprint per task. The float scores are not saved: loading sets each score to
``init_score`` (kept) or ``2*tau - init_score`` (dropped), the same distance from ``tau`` on either
side, so the mask is reproduced exactly and resumed training restarts the scores there. Merging sets
the dropped entries of ``W0`` to zero and keeps their values beside the layer, so unmerging restores
``W0`` exactly (an entry comes back once no merged adapter drops it any more). The parameter report
counts one trainable entry per masked weight (the scores: every mask bit can flip), the dense size.

Defaults and deviations (source: the authors' code, github.com/ptlmasking/maskbert, ``code/parameters.py``
and the configuration ``main.py`` runs with):
- ``threshold = 1e-2``: the reference's ``--threshold`` (Piggyback, which the method follows, used 5e-3).
- Learning rate 1e-3 (Adam, no weight decay): the reference trains masks and head at ``lr=1e-3``,
  batch 32. Scores take no weight decay here either (the ``param_groups`` hook): decay pulls every
  score toward 0, below ``tau``, and so would prune weights the loss never asked to drop.
- Identity at init (deviation): every score starts at ``init_score = 0.3``, so ``M`` is all ones and
  the adapter starts as the base model (peftlab's contract). The reference draws scores uniformly in
  ``(-0.02, 0.58)``, so that 5% of the weights start dropped at random; its kept entries start on
  average 0.29 above ``tau``, and ``0.3`` puts every entry there. The start must be far from ``tau``:
  Adam moves a score by about ``lr`` a step whatever the gradient's size, so noisy gradients make a
  random walk. Measured on SST-2 (MiniLM, 157 steps of 32): scores at ``2 * tau = 0.02`` and lr 1e-3
  ended with 9.3% of the weights dropped by that walk and dev accuracy 50.9 (the majority class); at
  ``0.3`` and lr 4e-3, 0.06% dropped, each by a consistent gradient, and 73.4.
- Targets: the six linear layers of every transformer block (``@query`` ... ``@ffn_out``). The reference
  masks those of layers 2-11 of BERT-base and the pooler; here all blocks by default (name a subset in
  ``targets`` to follow it). Embeddings and layer norms are never masked, as in the paper.
- The head (deviation): the paper stacks a randomly initialised classifier and masks it too; here a
  new head is trained in full through ``modules_to_save``, as for every peftlab method.
- No sparsity schedule: the reference's Lagrangian sparsity control is off in its runs (``lambdas_lr=0``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from ...core.config import PeftConfig
from ...core.errors import CheckpointError, PeftlabError
from ...core.hooks import TrainingHooks
from ...core.inject import wrap
from ...core.layer import DeltaModule, base_of
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, resolve_targets

BITS_KEY = "mask.bits"


@dataclasses.dataclass(frozen=True)
class ThresholdMaskConfig(PeftConfig):
    """threshold: tau, a weight is kept while its score is above it; init_score: every score's start
    (above tau, so the mask starts all ones); scores move at the optimizer's learning rate."""

    targets: tuple[str, ...] | str | None = ("@query", "@key", "@value", "@attn_out", "@ffn_in", "@ffn_out")
    threshold: float = 1e-2
    init_score: float = 0.3

    def validate(self) -> None:
        for field in ("threshold", "init_score"):
            value = getattr(self, field)
            self._require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                          field, "a finite number (threshold 1e-2 and init_score 0.3 by default)")
        self._require(self.init_score > self.threshold, "init_score",
                      f"a start above threshold={self.threshold!r} (so the mask starts all ones), e.g. threshold + 0.29 as the default")


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, 8 entries a byte: entry ``8k+i`` is bit ``i`` of byte ``k``."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)]).view(-1, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
    return (flat << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:numel].bool()


def read_mask(bits: torch.Tensor, shape: torch.Size, label: str, what: str, mismatch: str) -> torch.Tensor:
    """The bool mask of ``shape`` that :func:`pack_bits` wrote as ``bits`` (checkpoint key ``label``,
    holding ``what``); a wrong size or dtype is refused with ``mismatch`` (its likely cause), set
    padding bits as damage."""
    numel = math.prod(shape)
    size = math.ceil(numel / 8)
    if bits.dtype != torch.uint8 or tuple(bits.shape) != (size,):
        raise CheckpointError(f"{label}: {what} of shape {tuple(shape)} is {size} packed bytes (uint8); found "
                              f"{bits.dtype} {tuple(bits.shape)}. {mismatch}")
    if numel % 8 and int(bits[-1]) >> (numel % 8):
        raise CheckpointError(f"{label}: padding bits past the {numel} mask entries are set; the file is damaged")
    return unpack_bits(bits, numel).view(shape)


class ThresholdMaskLayer(DeltaModule):
    """Wraps an ``nn.Linear`` or GPT-2 ``Conv1D`` (under any wrappers); runs it with ``W0 * M``."""

    adapter_attrs = ("scores",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scores = nn.ParameterDict()
        # The wrapped module's weight and its name relative to base_layer, for functional_call.
        inner, prefix = base_layer, ""
        while isinstance(inner, DeltaModule) and "base_layer" in inner._modules:
            inner, prefix = inner.base_layer, prefix + "base_layer."
        self.path, self.inner = prefix + "weight", [inner]  # a list: not registered twice
        # Entries of W0 zeroed by merged masks (flat index, original value), restored on unmerge.
        self.register_buffer("removed_index", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("removed_values", inner.weight.new_zeros(0), persistent=False)

    def add(self, name: str, config: ThresholdMaskConfig) -> None:
        weight = self.inner[0].weight
        self.scores[name] = nn.Parameter(torch.full_like(weight, config.init_score))
        self.settings[name] = (config.threshold, config.init_score)

    def dropped(self, name: str) -> torch.Tensor:
        return self.scores[name].detach() <= self.settings[name][0]

    def mask(self, name: str) -> torch.Tensor:
        """The binary mask, with the straight-through gradient: ``s - s.detach()`` is exactly 0 in the
        forward pass and passes the gradient to ``s`` unchanged."""
        scores = self.scores[name]
        return (scores > self.settings[name][0]).to(scores.dtype) + (scores - scores.detach())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        live = self.live_adapters()
        if not live:
            return self.base_layer(*args, **kwargs)
        weight = self.inner[0].weight
        for name in live:
            weight = weight * self.mask(name).to(weight.dtype)
        return torch.func.functional_call(self.base_layer, {self.path: weight}, args, kwargs)

    # -- checkpoint: the mask as bits ------------------------------------------------------
    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {BITS_KEY: pack_bits(~self.dropped(name))} if name in self.scores else {}

    def load_adapter_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        scores = self.scores[name]
        kept = read_mask(tensors[BITS_KEY].to(scores.device), scores.shape, BITS_KEY, "a mask",
                         "The file is damaged or was saved for another model.")
        threshold, init = self.settings[name]
        with torch.no_grad():
            scores.copy_(torch.where(kept, init, 2 * threshold - init))

    # -- merging: W0 <- W0 * M, with the dropped entries kept to unmerge exactly ------------
    def merge(self, name: str) -> None:
        flat = self.inner[0].weight.data.view(-1)
        drop = self.dropped(name).view(-1).nonzero().view(-1)
        new = drop[~torch.isin(drop, self.removed_index)]
        self.removed_index = torch.cat([self.removed_index, new])
        self.removed_values = torch.cat([self.removed_values, flat[new]])
        flat[new] = 0
        self.merged_adapters.append(name)

    def unmerge(self, name: str) -> None:
        self.merged_adapters.remove(name)
        still = torch.zeros_like(self.removed_index, dtype=torch.bool)
        for other in self.merged_adapters:
            still |= self.dropped(other).view(-1)[self.removed_index]
        flat = self.inner[0].weight.data.view(-1)
        flat[self.removed_index[~still]] += self.removed_values[~still]
        self.removed_index, self.removed_values = self.removed_index[still], self.removed_values[still]


def _param_groups(model: Any, name: str, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """The scores take no weight decay (the reference's setting): decay would drive them below tau."""
    scores = [m.scores[name] for _, m in model._delta_modules() if isinstance(m, ThresholdMaskLayer) and name in m.scores]
    return [{"params": scores, "lr": lr, "weight_decay": 0.0}]


def attach(model: nn.Module, name: str, config: ThresholdMaskConfig, host: Any = None) -> None:
    for path in resolve_targets(model, config.targets):
        if not isinstance(base_of(model.get_submodule(path)), LINEAR_TYPES):
            raise PeftlabError(f"Threshold-Mask target {path!r} is a {type(base_of(model.get_submodule(path))).__name__}, "
                               "not a linear layer; target linear layers (e.g. '@query', '@ffn_out')")
        wrap(model, path, ThresholdMaskLayer).add(name, config)


SPEC = register(MethodSpec(
    name="threshold_mask", title="Threshold-based masking", family="partial", subcategory="pretrained weight masking", config_cls=ThresholdMaskConfig,
    trains="a binary mask over the pretrained weights (real scores thresholded, straight-through gradient)",
    attach=attach, paper="Zhao et al. 2020, Masking as an Efficient Alternative to Finetuning for Pretrained "
                         "Language Models",
    mergeable=True, default_lr=1e-3, needs_weight_gradients=True, identity_at_init=True,
    hooks=TrainingHooks(param_groups=_param_groups),
))
