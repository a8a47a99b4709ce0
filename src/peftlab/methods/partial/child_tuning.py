"""Child-Tuning (Xu et al., 2021, "Raise a Child in Large Language Model: Towards Effective and
Generalizable Fine-tuning", EMNLP): update only a "child network" of the pretrained weights, by
masking the gradient before the optimizer step::

    W_{t+1} = W_t - lr * AdamW(g_t * M_t)

- Child-Tuning_F (``mode="F"``, task-free): ``M_t ~ Bernoulli(p)`` drawn afresh at every step, the
  kept gradient scaled by ``1/p`` so its expectation is the full gradient.
- Child-Tuning_D (``mode="D"``, task-driven, the default): ``M`` is fixed before training. A pass
  over the training data estimates each weight's Fisher information
  ``F(w) = 1/|B| sum_batches (dL/dw)^2``, and the top ``p`` share of all targeted weights together
  (one ranking across the model, as the reference code) forms the child network.

peftlab holds the update as a sparse difference beside the frozen weight, ``W = W0 + d`` (``d`` = 0
at start: identity at init), so several adapters share one model, ``disable``/``delete`` return to
``W0``, and the checkpoint keeps only the entries of ``d`` that changed, as index/value pairs; merging
adds ``d`` into ``W0`` (exact). ``d`` receives exactly the gradient ``W`` would, so training ``d`` with
the masked gradient is training ``W`` as the paper does. The parameter report counts the child
network (D) as the trainable entries.

Defaults and deviations:
- ``p = 0.3``: the paper tunes ``p`` per task; 0.3 lies in the range it reports for both forms.
- Fisher pass over the whole training set (one epoch, as the reference); ``fisher_batches`` caps it.
- Targets: the linear layers and layer norms of the model (attach points ``@query`` ... ``@ffn_out``,
  ``@layernorm``), which is what the reference masks ("layer" parameters), plus the embeddings'
  LayerNorm that BERT's ``@layernorm`` also matches. The reference trains embeddings, pooler and
  head unmasked; here they stay frozen unless named in ``modules_to_save`` (a head trains unmasked,
  as in the reference). Word embeddings are not targeted: a dense delta of the vocabulary matrix
  would cost more memory than the child network saves.
- As in the reference, the mask multiplies the gradient before AdamW's moment updates, so in mode F
  an entry that was kept at an earlier step keeps moving on its momentum; and as its optimizer
  groups, biases and normalisation weights take no weight decay (the ``param_groups`` hook).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import torch
from torch import nn

from ...core.config import PeftConfig
from ...core.errors import PeftlabError
from ...core.hooks import TrainingHooks, TrainingState
from ...core.inject import wrap
from ...core.layer import BufferDict, DeltaModule
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, resolve_targets

PARTS = ("weight", "bias")


@dataclasses.dataclass(frozen=True)
class ChildTuningConfig(PeftConfig):
    """mode: ``"D"`` (Fisher-chosen fixed child network) or ``"F"`` (fresh Bernoulli mask each step);
    reserve_p: share of the targeted entries in the child network (D) or kept per step (F);
    fisher_batches: batches of the Fisher pass (D), ``None`` for the whole training set."""

    targets: tuple[str, ...] | str | None = ("@query", "@key", "@value", "@attn_out", "@ffn_in", "@ffn_out",
                                             "@layernorm")
    mode: str = "D"
    reserve_p: float = 0.3
    fisher_batches: int | None = None

    def validate(self) -> None:
        self._require(self.mode in ("D", "F"), "mode", "'D' (task-driven, Fisher mask) or 'F' (task-free)")
        self._require(isinstance(self.reserve_p, (int, float)) and 0 < self.reserve_p <= 1, "reserve_p",
                      "a share in (0, 1] such as 0.3")
        self._require(self.fisher_batches is None or (isinstance(self.fisher_batches, int) and self.fisher_batches > 0),
                      "fisher_batches", "a positive number of batches, or None for the whole training set")


class ChildTuningLayer(DeltaModule):
    """Wraps any module with a weight (and bias): Linear, Conv1D, LayerNorm, RMSNorm. Runs the
    module with ``W0 + d`` per part; in mode D keeps the child-network mask per part."""

    adapter_attrs = ("delta_weight", "delta_bias")
    frozen_attrs = ("mask_weight", "mask_bias")
    sparse_attrs = ("delta_weight", "delta_bias", "mask_weight", "mask_bias")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.delta_weight, self.delta_bias = nn.ParameterDict(), nn.ParameterDict()
        self.mask_weight, self.mask_bias = BufferDict(), BufferDict()
        # The wrapped module's own tensors by part, and their names relative to base_layer (another
        # wrapper may sit in between), for functional_call.
        inner, prefix = base_layer, ""
        while isinstance(inner, DeltaModule) and "base_layer" in inner._modules:
            inner, prefix = inner.base_layer, prefix + "base_layer."
        self.paths = {part: prefix + part for part in PARTS if isinstance(getattr(inner, part, None), nn.Parameter)}
        self.inner = [inner]  # a list: not registered twice as a submodule

    def add(self, name: str, config: ChildTuningConfig) -> None:
        for part in self.paths:
            base = getattr(self.inner[0], part)
            getattr(self, f"delta_{part}")[name] = nn.Parameter(torch.zeros_like(base))
            if config.mode == "D":  # filled by the Fisher pass, or by loading a checkpoint
                getattr(self, f"mask_{part}")[name] = torch.zeros_like(base, dtype=torch.bool)

    def deltas(self, name: str) -> list[tuple[nn.Parameter, torch.Tensor | None]]:
        """(delta, mask or None) per part of adapter ``name``."""
        masks = {part: getattr(self, f"mask_{part}") for part in self.paths}
        return [(getattr(self, f"delta_{part}")[name], masks[part][name] if name in masks[part] else None)
                for part in self.paths]

    def trainable_entries(self, name: str) -> int:
        return sum(int(mask.sum()) if mask is not None else delta.numel() for delta, mask in self.deltas(name))

    def dense_entries(self, name: str) -> int:
        return sum(delta.numel() for delta, mask in self.deltas(name) if mask is not None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        live = self.live_adapters()
        if not live:
            return self.base_layer(*args, **kwargs)
        weights = {}
        for part, path in self.paths.items():
            tensor = getattr(self.inner[0], part)
            for name in live:
                tensor = tensor + getattr(self, f"delta_{part}")[name]
            weights[path] = tensor
        return torch.func.functional_call(self.base_layer, weights, args, kwargs)

    def merge(self, name: str) -> None:
        with torch.no_grad():
            for part, (delta, _) in zip(self.paths, self.deltas(name)):
                getattr(self.inner[0], part).add_(delta)
        self.merged_adapters.append(name)

    def unmerge(self, name: str) -> None:
        with torch.no_grad():
            for part, (delta, _) in zip(self.paths, self.deltas(name)):
                getattr(self.inner[0], part).sub_(delta)
        self.merged_adapters.remove(name)


def _layers(model: Any, name: str) -> list[ChildTuningLayer]:
    return [m for _, m in model._delta_modules() if isinstance(m, ChildTuningLayer) and name in m.adapter_names()]


def fisher_information(model: Any, name: str, data: Iterable[Any], max_batches: int | None) -> list[torch.Tensor]:
    """Mean squared gradient of the training loss per delta entry, over the batches of ``data``
    (order of ``ChildTuningLayer.deltas``, layer by layer). Only the deltas' gradients are taken,
    so no ``.grad`` of any parameter is touched."""
    deltas = [delta for layer in _layers(model, name) for delta, _ in layer.deltas(name)]
    fisher = [torch.zeros_like(d) for d in deltas]
    model.train()
    batches = 0
    for batch in data:
        if max_batches is not None and batches >= max_batches:
            break
        loss = getattr(model(**batch), "loss", None)
        if loss is None:
            raise PeftlabError("Child-Tuning_D's Fisher pass needs the training loss: the batches must carry labels")
        for f, g in zip(fisher, torch.autograd.grad(loss, deltas, allow_unused=True)):
            if g is not None:
                f.addcmul_(g, g)
        batches += 1
    if batches == 0:
        raise PeftlabError("Child-Tuning_D's Fisher pass got no batches: the training data is empty")
    return [f / batches for f in fisher]


def _choose_child(model: Any, name: str, data: Iterable[Any]) -> None:
    config: ChildTuningConfig = model.peft_configs[name]
    layers = _layers(model, name)
    masks = [mask for layer in layers for _, mask in layer.deltas(name)]
    if config.mode != "D" or any(bool(m.any()) for m in masks):
        return  # task-free, or a child network loaded with the adapter: keep it
    if data is None:
        raise PeftlabError("Child-Tuning_D chooses its child network by a pass over training data: call "
                           "model.begin_training(data=<training DataLoader>, total_steps=...)")
    fisher = fisher_information(model, name, data, config.fisher_batches)
    flat = torch.cat([f.reshape(-1) for f in fisher])
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[flat.topk(max(1, math.ceil(config.reserve_p * flat.numel()))).indices] = True
    offset = 0
    for mask in masks:
        mask.copy_(keep[offset:offset + mask.numel()].view_as(mask))
        offset += mask.numel()


def _mask_gradients(model: Any, name: str, state: TrainingState) -> None:
    p = model.peft_configs[name].reserve_p
    for layer in _layers(model, name):
        for delta, mask in layer.deltas(name):
            if delta.grad is None:
                continue
            if mask is not None:
                delta.grad.mul_(mask)
            elif p < 1:
                delta.grad.mul_(torch.empty_like(delta.grad).bernoulli_(p)).div_(p)


def _param_groups(model: Any, name: str, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """The reference code's optimizer groups: no weight decay on biases and normalisation weights."""
    decayed, plain = [], []
    for layer in _layers(model, name):
        is_norm = not isinstance(layer.inner[0], LINEAR_TYPES)
        for part, (delta, _) in zip(layer.paths, layer.deltas(name)):
            (plain if part == "bias" or is_norm else decayed).append(delta)
    return [{"params": decayed, "lr": lr, "weight_decay": weight_decay},
            {"params": plain, "lr": lr, "weight_decay": 0.0}]


def attach(model: nn.Module, name: str, config: ChildTuningConfig, host: Any = None) -> None:
    for path in resolve_targets(model, config.targets):
        if not isinstance(getattr(model.get_submodule(path), "weight", None), (nn.Parameter, torch.Tensor)):
            raise PeftlabError(f"Child-Tuning target {path!r} has no weight to tune; target linear layers or norms")
        wrap(model, path, ChildTuningLayer).add(name, config)


SPEC = register(MethodSpec(
    name="child_tuning", title="Child-Tuning", family="partial", subcategory="delta weight masking", config_cls=ChildTuningConfig,
    trains="a masked subset of the pretrained weights (Fisher-chosen child network, or a fresh random one per step)",
    attach=attach, paper="Xu et al. 2021, Raise a Child in Large Language Model: Towards Effective and "
                         "Generalizable Fine-tuning",
    mergeable=True, merge_tolerance=1e-5, default_lr=2.5e-5, needs_weight_gradients=True,
    hooks=TrainingHooks(before_training=_choose_child, before_step=_mask_gradients, param_groups=_param_groups),
))
