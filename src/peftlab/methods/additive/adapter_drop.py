"""AdapterDrop (Rücklé, Geigle, Glockner, Beck, Pfeiffer, Reimers and Gurevych, 2021, "AdapterDrop: On the
Efficiency of Adapters in Transformers", EMNLP; reference code: AdapterHub ``adapter-transformers``, its
``skip_layers`` argument and the ``AdapterDropTrainerCallback`` of its AdapterDrop notebook).

The sequential bottleneck adapter (Houlsby et al., 2019; :mod:`.sequential_adapter`, whose layer and
config this method runs unchanged) is removed from the lowest ``n`` of the ``L`` transformer layers,
during training and at inference. With ``h_i`` the output of a projection the adapter config targets
(default: attention and FFN output projections) in layer ``i``::

    i <  n:  h_i unchanged                                       (the plain base layer)
    i >= n:  h_i <- h_i + W_up f(W_down h_i + b_down) + b_up      (the sequential adapter)

What this buys (the paper's point): the lowest trainable tensor sits in layer ``n``, so the hidden
states entering layer ``n`` do not require grad and autograd neither records nor runs a backward
pass through layers ``0..n-1``; at inference, several tasks' adapters with the same ``n`` share the
lower layers' outputs, which equal the base model's (compute them once, then branch per task:
:func:`multi_task_forward`).

Config: ``adapter`` is a :class:`SequentialAdapterConfig` (its width, activation, init, targets and
``train_layernorm``); ``drop_layers`` is ``n``; when it is ``None``, ``n = round(drop_fraction * L)``,
at most ``L - 1``. The default ``drop_fraction = 5/12`` is the paper's speed setting (the first 5 of
12 layers of BERT/RoBERTa-base dropped) as a share of the depth, so it fits any model: 5 of 12, 10
of 24, 1 of 2. In an encoder-decoder model each stack (encoder, decoder) drops its own lowest ``n``.

``drop_sampling=True`` is the paper's robust AdapterDrop: adapters sit in every layer, and each
training forward pass draws ``n`` uniformly from ``{0, ..., L-1}`` (every count that leaves the top
layer adapted) and skips the adapters of layers below it; in eval mode
the adapters of the lowest ``drop_layers`` (or ``drop_fraction``) layers are skipped, so one trained
adapter can be run with any ``n``: ``AdapterDropConfig`` is frozen, so pick it when adding/loading
(the checkpoint is the same for every ``n``).

Initialisation, width, activation: those of the sequential adapter (near-identity, m = d / 16).

Deviations, and why:
- ``n`` defaults to a share of the depth (5/12) rather than the fixed 5 of the paper's 12-layer models,
  so the default applies to models of any depth.
- With ``train_layernorm=True`` the norms inside the dropped layers and the embedding norm (below every
  adapter) are not trained: a trained tensor below layer ``n`` would bring back the backward pass
  through the lower layers that AdapterDrop removes. The final norms (after the last layer) train.
- Encoder-decoder models are outside the paper (encoders only); each stack drops its own lowest ``n``.
  There, the decoder's lower layers still run backward (their cross-attention reads the encoder).
- Robust sampling draws from ``{0, ..., L-1}``; the reference notebook's callback draws
  ``numpy.random.randint(0, 11)``, i.e. ``{0, ..., 10}`` for 12 layers (its comment says "TO CHANGE").
  The paper's own statement of the range could not be checked here.
- Robust sampling draws ``n`` per forward pass (one per step without gradient accumulation) with
  torch's generator, so ``torch.manual_seed`` makes it reproducible.
- Where the paper also drops AdapterFusion layers, this module covers single adapters; fusing
  AdapterDrop adapters (AdapterFusion finds their sites) fuses only in layers ``>= n``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from ...core.config import PeftConfig
from ...core.errors import PeftlabError
from ...core.inject import wrap
from ...core.layer import DeltaModule
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, layer_of, logical_name, resolve_targets
from .sequential_adapter import LayerNormDelta, SequentialAdapterConfig, SequentialAdapterLayer

PAPER_FRACTION = 5 / 12  # the paper drops the first 5 of 12 layers for its speed measurements


@dataclasses.dataclass(frozen=True)
class AdapterDropConfig(PeftConfig):
    """adapter: the sequential adapter placed in layers ``n..L-1`` (a :class:`SequentialAdapterConfig`;
    its ``targets`` choose the projections); drop_layers: ``n``, how many of the lowest layers of each
    stack carry no adapter (``None``: from ``drop_fraction``); drop_fraction: ``n = round(f * L)``, at
    most ``L - 1`` (default 5/12, the paper's 5 of 12); drop_sampling: the robust variant (adapters in
    every layer, ``n`` drawn per training forward from ``{0..L-1}``, the configured ``n`` in eval mode).
    targets: leave ``None`` (the adapter's targets apply)."""

    adapter: SequentialAdapterConfig = SequentialAdapterConfig()
    drop_layers: int | None = None
    drop_fraction: float = PAPER_FRACTION
    drop_sampling: bool = False

    def validate(self) -> None:
        self._require(isinstance(self.adapter, SequentialAdapterConfig), "adapter",
                      "a SequentialAdapterConfig(...) (the adapter placed in the layers that keep one)")
        self._require(self.targets is None, "targets",
                      "None: choose the projections with adapter=SequentialAdapterConfig(targets=...)")
        if self.adapter.modules_to_save:
            raise PeftlabError(f"AdapterDropConfig.adapter.modules_to_save={self.adapter.modules_to_save!r}: set "
                               "modules_to_save on the AdapterDropConfig itself")
        self._require(self.drop_layers is None or self.drop_layers >= 0, "drop_layers",
                      "a number of lowest layers n >= 0 without an adapter (0 keeps every layer's), or None "
                      "(n from drop_fraction)")
        self._require(0 <= self.drop_fraction < 1, "drop_fraction",
                      "a share of the layers in [0, 1), such as 5/12 (the paper's 5 of 12)")
        self._require(isinstance(self.drop_sampling, bool), "drop_sampling",
                      "True (robust AdapterDrop: n drawn per training step) or False")

    def dropped(self, depth: int, where: str = "the model") -> int:
        """``n`` for a stack of ``depth`` layers; ``n >= depth`` is refused (no layer would adapt)."""
        if self.drop_layers is None:
            return min(int(math.floor(self.drop_fraction * depth + 0.5)), depth - 1)
        if self.drop_layers >= depth:
            raise PeftlabError(f"AdapterDropConfig.drop_layers={self.drop_layers} but {where} has {depth} layers: "
                               f"expected n < {depth} so that at least the top layer keeps its adapter; lower "
                               "drop_layers or give drop_fraction instead (drop_layers=None)")
        return self.drop_layers




def _kept_sites(model: nn.Module, config: AdapterDropConfig, paths: list[str], strict: bool) -> list[tuple[str, int]]:
    """(path, layer index) of the ``paths`` an adapter goes to: those in layers ``>= n`` of their stack
    (every layer with ``drop_sampling``). Outside the stacks: with ``strict`` refused, else kept when
    the module comes after the start of a stack (final norms), left out before (the embedding norm)."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    stack_starts = [order[n] for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    kept = []
    for path in paths:
        where = layer_of(model, path)
        if where is None:
            if strict:
                raise PeftlabError(f"AdapterDrop drops adapters by layer, but target {logical_name(path)!r} is in no "
                                   "layer stack (nn.ModuleList of blocks); target projections inside the layers, e.g. "
                                   "adapter=SequentialAdapterConfig(targets=('@attn_out', '@ffn_out'))")
            if any(start < order[path] for start in stack_starts):
                kept.append((path, -1))
            continue
        stack, index, depth = where
        n = config.dropped(depth, f"stack {stack!r}")
        if config.drop_sampling or index >= n:
            kept.append((path, index))
    return kept


def attach(model: nn.Module, name: str, config: AdapterDropConfig, host: Any = None) -> None:
    projections = resolve_targets(model, config.adapter.targets, allowed_types=LINEAR_TYPES)
    for path, _ in _kept_sites(model, config, projections, strict=True):
        wrap(model, path, SequentialAdapterLayer).add(name, config.adapter)
    if config.adapter.train_layernorm:
        for path, _ in _kept_sites(model, config, resolve_targets(model, ("@layernorm",)), strict=False):
            wrap(model, path, LayerNormDelta).add(name, config.adapter)


def _skipped_modules(model: nn.Module, name: str, config: AdapterDropConfig, training: bool) -> list[DeltaModule]:
    """Robust variant: the modules of adapter ``name`` in the layers skipped by this forward pass."""
    skipped = []
    draws: dict[int, int] = {}  # one n per stack depth, drawn once per forward pass
    for path, module in model.named_modules():
        if not isinstance(module, (SequentialAdapterLayer, LayerNormDelta)) or name not in module.adapter_names():
            continue
        where = layer_of(model, path)
        if where is None:
            continue
        _, index, depth = where
        if depth not in draws:
            draws[depth] = int(torch.randint(depth, ())) if training else config.dropped(depth)
        if index < draws[depth]:
            skipped.append(module)
    return skipped


def around_forward(host: Any, adapter_name: str, forward: Any, args: tuple, kwargs: dict[str, Any],
                   extra: dict[str, Any]) -> Any:
    """Robust AdapterDrop: run the forward with adapter ``adapter_name`` skipped in the layers below
    ``n`` (drawn in training, configured in eval). The plain variant has no adapter there to skip."""
    config = host.peft_configs[adapter_name]
    if not config.drop_sampling:
        return forward(*args, **kwargs)
    skipped = _skipped_modules(host.base_model, adapter_name, config, host.base_model.training)
    saved = [list(m.active_adapters) for m in skipped]
    for module in skipped:
        module.active_adapters = [a for a in module.active_adapters if a != adapter_name]
    try:
        return forward(*args, **kwargs)
    finally:
        for module, active in zip(skipped, saved):
            module.active_adapters = active


class _Replay(nn.Module):
    """Stands in for a lower layer during a branch pass: returns what the last shared layer returned
    (whatever it is given), so ``n`` replays in a row hand layer ``n`` the shared hidden states."""

    def __init__(self, output: Any):
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


def multi_task_forward(model: Any, adapter_names: list[str], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run one input through several tasks' AdapterDrop adapters, computing the lowest ``n`` layers once.

    The paper's multi-task inference: the lower layers carry no adapter, so their output is the same
    for every task. The first adapter's pass runs the whole model and keeps layer ``n - 1``'s output;
    each further pass replays it in place of layers ``0..n-1`` (embeddings and upper layers run again).
    Returns ``{adapter name: output}``, equal to ``set_adapter(name); model(...)`` for each name.
    Inference only (eval mode: dropout in the lower layers would differ per task); the adapters must
    all be AdapterDrop adapters with the same ``n`` in a model with one layer stack; the active
    adapters are restored afterwards."""
    names = list(adapter_names)
    if not names or len(set(names)) != len(names):
        raise PeftlabError(f"multi_task_forward: adapter_names={adapter_names!r}; expected distinct adapter names")
    if model.base_model.training:
        raise PeftlabError("multi_task_forward shares the lower layers' output between tasks, which dropout in "
                           "training mode would make differ per task; call model.eval() first")
    stacks, drops = set(), set()
    for name in names:
        config = model.peft_configs.get(name)
        if not isinstance(config, AdapterDropConfig):
            raise PeftlabError(f"multi_task_forward: adapter {name!r} is "
                               f"{type(config).__name__ if config else 'not on this model'}; expected AdapterDrop "
                               f"adapters (the model has {sorted(model.peft_configs)})")
        for path, module in model.base_model.named_modules():
            if isinstance(module, SequentialAdapterLayer) and name in module.adapter_names():
                if (where := layer_of(model.base_model, path)) is not None:
                    stacks.add(where[0])
                    drops.add(config.dropped(where[2]))
    if len(stacks) != 1 or len(drops) != 1:
        raise PeftlabError(f"multi_task_forward needs adapters in one layer stack with one n; adapters {names} "
                           f"sit in stacks {sorted(stacks)} with n in {sorted(drops)}. Give adapters with the same "
                           "drop_layers (or drop_fraction) on a model with a single stack (an encoder or a decoder)")
    stack, n = model.base_model.get_submodule(stacks.pop()), drops.pop()
    active, trainable = model.active_adapters, model._trainable
    shared: list[Any] = []
    outputs = {}
    try:
        model.set_adapter(names[0])
        handle = stack[n - 1].register_forward_hook(lambda module, a, out: shared.append(out)) if n else None
        try:
            outputs[names[0]] = model(*args, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
        lower = list(stack[:n])
        for name in names[1:]:
            model.set_adapter(name)
            for i in range(n):
                stack[i] = _Replay(shared[0])
            try:
                outputs[name] = model(*args, **kwargs)
            finally:
                for i, layer in enumerate(lower):
                    stack[i] = layer
    finally:
        if active:
            model.set_adapter(active, trainable)
    return outputs


SPEC = register(MethodSpec(
    name="adapter_drop", title="AdapterDrop", family="additive", subcategory="adapter", config_cls=AdapterDropConfig,
    trains="sequential bottleneck adapters in the upper layers only (none in the lowest n)", attach=attach,
    paper="Rücklé et al. 2021, AdapterDrop: On the Efficiency of Adapters in Transformers",
    # The sequential adapter's near-identity init is not exactly the identity.
    mergeable=False, identity_at_init=False, default_lr=1e-3, around_forward=around_forward,
    draws_per_forward=True,  # the dropped layers are drawn per forward pass
))
