"""Parallel adapter (He et al., 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning").

A bottleneck network reads a sublayer's input ``x`` and runs beside the sublayer, its output scaled
by ``s``, added to the sublayer's output before the block's residual add::

    SUB'(x) = SUB(x) + s * (W_up f(W_down x + b_down) + b_up)     W_down: m x d, W_up: d x m (zero at init)

``placement="ffn"`` (default): SUB is the FFN. He et al. find this placement, with ``s = 4``, the
best adapter variant; it is the adapter half of their MAM adapter. The adapter wraps the ``@ffn``
attach point. For most models that module maps ``x`` to ``FFN(x)`` and the sum above is taken
directly. In post-LN BERT the module there is ``BertOutput(hidden, input_tensor) =
LN(dense(hidden) + input_tensor)``, whose second argument is the FFN input ``x`` (the architecture
map's ``ffn_input_arg``); since the residual add is linear, ``LN(dense(hidden) + x + s A(x)) =
LN(FFN(x) + s A(x) + x)``, so the adapter adds ``s A(x)`` to that argument.

``placement="attention"``: SUB is each attention sublayer (He et al.'s parallel adapter at the
attention, their Table 4), reading the attention's input hidden state (after the pre-LN norm where
the model has one). The adapter wraps the whole attention module of the ``@attention`` attach point
(GPT-2 ``attn``, Llama ``self_attn``, T5 ``SelfAttention`` and ``EncDecAttention``, whose first
argument is the query-side hidden state) and adds to the first element of its output tuple. BERT's
``@attention`` (``attention.self``) stops before the output projection, so on post-LN models
(``ffn_input_arg`` set) it wraps ``attention.output`` — ``BertSelfOutput(context, input_tensor) =
LN(dense(context) + input_tensor)``, the parent of ``@attn_out`` — and adds ``s A(x)`` to
``input_tensor``, the attention input, by the same linearity as ``BertOutput``.

W_up and b_up start at zero (identity at init); a site trains ``2 d m + m + d`` parameters. Not
mergeable: ``f`` is nonlinear.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import re
from typing import Any

import torch
from torch import nn

from ...core.config import PeftConfig
from ...core.errors import PeftlabError
from ...core.inject import wrap
from ...core.layer import DeltaModule, base_of
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, architecture_of, logical_name, resolve_targets
from .sequential_adapter import (Bottleneck, bottleneck_width, factory_kwargs, linear_features,
                                 validate_bottleneck_fields)

PLACEMENTS = ("ffn", "attention")


@dataclasses.dataclass(frozen=True)
class ParallelAdapterConfig(PeftConfig):
    """scaling: s, the factor on the adapter's output (4 in He et al.); placement: ``"ffn"`` (beside
    each FFN block) or ``"attention"`` (beside each attention sublayer); targets: ``None`` for the
    placement's sites (``"ffn"``: ``@ffn``), or, with ``placement="ffn"``, the modules to run beside
    (the adapter reads their first argument); other fields as
    :class:`~peftlab.methods.additive.sequential_adapter.SequentialAdapterConfig`."""

    targets: tuple[str, ...] | str | None = None
    bottleneck: int | None = None
    reduction_factor: float | None = None
    activation: str = "relu"
    init_scale: float = 1e-2
    scaling: float = 4.0
    placement: str = "ffn"

    def validate(self) -> None:
        validate_bottleneck_fields(self)
        self._require(self.placement in PLACEMENTS, "placement",
                      f"one of {PLACEMENTS} (beside the FFN, or beside each attention sublayer)")
        # The attention sublayer is a different module per architecture; the placement picks it.
        self._require(self.placement == "ffn" or self.targets is None, "targets",
                      "None with placement='attention' (it picks each attention sublayer); to name modules "
                      "yourself use placement='ffn' with targets")
        self._require(isinstance(self.scaling, (int, float)) and not isinstance(self.scaling, bool)
                      and math.isfinite(self.scaling) and self.scaling > 0,
                      "scaling", "a positive number s (He et al. use 4.0)")


class ParallelAdapterLayer(DeltaModule):
    """Wraps a sublayer (FFN or attention); adds ``s * A(x)`` beside it, ``x`` being its input.

    input_arg: ``None`` when the module's first argument is ``x`` and its output is ``SUB(x)`` (or a
        tuple starting with it, as attention modules return); otherwise the index of the positional
        argument that carries ``x`` into a residual add inside the module (BERT's ``BertOutput`` and
        ``BertSelfOutput``), to which ``s * A(x)`` is added instead.
    """

    adapter_attrs = ("bottleneck",)

    def __init__(self, base_layer: nn.Module, input_arg: int | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.bottleneck = nn.ModuleDict()
        self.input_arg = input_arg
        self.index = 0 if input_arg is None else input_arg
        # The same argument by keyword, for callers that pass it so.
        params = list(inspect.signature(base_of(base_layer).forward).parameters)
        self.input_name = params[self.index] if self.index < len(params) else None
        linears = [m for m in base_of(base_layer).modules() if isinstance(m, LINEAR_TYPES)]
        if not linears:
            raise PeftlabError(f"the parallel adapter wraps an FFN or attention block, but "
                               f"{type(base_of(base_layer)).__name__} holds no linear layer; target the FFN module "
                               "(default '@ffn') or use placement='attention'")
        # Sublayers register their input projection(s) first and their output projection last.
        self.out_features = linear_features(linears[-1])[1]
        self.in_features = linear_features(linears[0])[0] if input_arg is None else self.out_features

    def add(self, name: str, config: ParallelAdapterConfig) -> None:
        width = bottleneck_width(config, self.in_features)
        self.bottleneck[name] = Bottleneck(self.in_features, width, self.out_features, config.activation,
                                           config.init_scale, **factory_kwargs(self.base_layer))
        self.settings[name] = float(config.scaling)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        live = self.live_adapters()
        if not live:
            return self.base_layer(*args, **kwargs)
        positional = len(args) > self.index
        x = args[self.index] if positional else kwargs[self.input_name]
        delta = self.bottleneck[live[0]](x, self.settings[live[0]])
        for name in live[1:]:
            delta = delta + self.bottleneck[name](x, self.settings[name])
        if self.input_arg is None:
            out = self.base_layer(*args, **kwargs)
            # Attention modules return (output, weights, ...): the sublayer output is the first element.
            return (out[0] + delta, *out[1:]) if isinstance(out, tuple) else out + delta
        # The residual add inside the module is linear: adding s*A(x) to x adds it to FFN(x).
        if positional:
            args = args[:self.index] + (x + delta,) + args[self.index + 1:]
        else:
            kwargs = {**kwargs, self.input_name: x + delta}
        return self.base_layer(*args, **kwargs)


def _ffn_input_arg(model: nn.Module, path: str) -> int | None:
    """The architecture's ``ffn_input_arg`` when ``path`` is its ``@ffn`` module, else ``None``."""
    try:
        arch = architecture_of(model)
    except PeftlabError:  # explicit module names on a model outside the map
        return None
    return arch.ffn_input_arg if re.search(arch.sites["ffn"], logical_name(path)) else None


def _attention_sites(model: nn.Module) -> list[tuple[str, int | None]]:
    """(path, input_arg) of each attention sublayer. Post-LN models whose FFN output module takes the
    residual (BERT) have an attention output module of the same form: the parent of ``@attn_out``."""
    arch = architecture_of(model)
    if arch.ffn_input_arg is None:
        return [(path, None) for path in resolve_targets(model, ("@attention",))]
    parents = dict.fromkeys(path.rpartition(".")[0] for path in resolve_targets(model, ("@attn_out",)))
    return [(path, arch.ffn_input_arg) for path in parents]


def attach(model: nn.Module, name: str, config: ParallelAdapterConfig, host: Any = None) -> None:
    if config.placement == "attention":
        sites = _attention_sites(model)
    else:
        paths = resolve_targets(model, config.targets if config.targets is not None else ("@ffn",))
        sites = [(path, _ffn_input_arg(model, path)) for path in paths]
    for path, input_arg in sites:
        layer = wrap(model, path, ParallelAdapterLayer, lambda m, arg=input_arg: ParallelAdapterLayer(m, arg))
        layer.add(name, config)


SPEC = register(MethodSpec(
    name="parallel_adapter", title="Parallel adapter", family="additive", subcategory="adapter", config_cls=ParallelAdapterConfig,
    trains="a scaled bottleneck network beside each FFN block (or attention sublayer), reading its input",
    attach=attach,
    paper="He et al. 2022, Towards a Unified View of Parameter-Efficient Transfer Learning",
    mergeable=False, identity_at_init=True, default_lr=1e-3,
))
