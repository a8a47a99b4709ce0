"""Sequential bottleneck adapter (Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP").

A small bottleneck network is inserted after the output projection of each attention and each
feed-forward sublayer — before that sublayer's residual add (and, in post-LN BERT, its LayerNorm),
which is where Houlsby et al. place it. With ``h`` the projection's output (d wide)::

    h <- h + W_up f(W_down h + b_down) + b_up        W_down: m x d, W_up: d x m, m << d

Initialisation (``init``): ``"near_identity"`` (default, the paper's section 3.6) draws ``W_down``
and ``W_up`` from a zero-mean normal with std ``init_scale`` (1e-2) truncated at two std, biases
zero, so the adapter starts as an approximate identity: it moves ``h`` by roughly
``init_scale^2 sqrt(d m / 2)`` of its size (5e-3 on MiniLM, 1e-2 at BERT-base width), not 0, so the
spec says ``identity_at_init=False``. ``"identity"`` starts ``W_up`` and ``b_up`` at zero, so the
adapter is exactly the identity at init and only ``W_up``/``b_up`` get a gradient on the first step
(the zero-up init of He et al. and LoRA). Each site trains ``2 d m + m + d`` parameters.

Houlsby et al. also train the layer normalization parameters of the model. ``train_layernorm=True``
does so per adapter: every ``@layernorm`` module (each block's norms, and the embedding / final
norm where the model has one) is wrapped in a :class:`LayerNormDelta` that adds a trainable, zero-
initialised delta to its weight (and bias), so several adapters keep their own norms and the base
model's stay untouched. It is off by default so that the adapter is its bottlenecks alone (what
AdapterFusion fuses) and its size is the usual ``2 d m + m + d`` per site.

Several live adapters in one module apply one after the other (a stack); their LayerNorm deltas add
up. Not mergeable: ``f`` is nonlinear.

The :class:`Bottleneck` network and the :class:`SequentialAdapterLayer` wrapper are shared with the
residual adapter (``placement="ffn_out"``), the parallel adapter and AdapterFusion.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import PeftConfig
from ...core.errors import PeftlabError
from ...core.inject import wrap
from ...core.layer import DeltaModule, base_of, linear_io
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, resolve_targets

INITS = ("near_identity", "identity")

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}
# Used when neither bottleneck nor reduction_factor is given (AdapterHub's and Pfeiffer et al.'s
# default): scales with the model, m = 24 on MiniLM (d = 384), 48 on BERT-base (d = 768).
DEFAULT_REDUCTION_FACTOR = 16


# -- config helpers shared by every bottleneck-adapter config (free functions, not a base class) ----
def validate_bottleneck_fields(config: Any) -> None:
    """Check ``bottleneck``, ``reduction_factor``, ``activation`` and ``init_scale`` of ``config``."""
    config._require(config.bottleneck is None or (isinstance(config.bottleneck, int)
                                                   and not isinstance(config.bottleneck, bool)
                                                   and config.bottleneck > 0),
                    "bottleneck", "a positive integer width m such as 64, or None (m from reduction_factor)")
    rf = config.reduction_factor
    config._require(rf is None or (isinstance(rf, (int, float)) and not isinstance(rf, bool)
                                   and math.isfinite(rf) and rf >= 1),
                    "reduction_factor", "a number >= 1 such as 16 (m = hidden // reduction_factor), or None")
    if config.bottleneck is not None and rf is not None:
        raise PeftlabError(f"{type(config).__name__} got bottleneck={config.bottleneck!r} and "
                           f"reduction_factor={rf!r}: expected one of them; set the other to None")
    config._require(config.activation in ACTIVATIONS, "activation", f"one of {sorted(ACTIVATIONS)}")
    config._require(isinstance(config.init_scale, (int, float)) and math.isfinite(config.init_scale)
                    and config.init_scale > 0, "init_scale",
                    "a small positive std for W_down such as 1e-2 (0 would leave the adapter dead)")


def bottleneck_width(config: Any, hidden: int) -> int:
    """m for a site of width ``hidden``: ``bottleneck``, else ``hidden // reduction_factor`` (16 when
    neither is set), at least 1."""
    if config.bottleneck is not None:
        return config.bottleneck
    factor = config.reduction_factor if config.reduction_factor is not None else DEFAULT_REDUCTION_FACTOR
    return max(1, int(hidden // factor))


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of an ``nn.Linear`` or GPT-2 ``Conv1D``."""
    return linear_io(module)[:2]


def factory_kwargs(module: nn.Module) -> dict[str, Any]:
    """Device and float dtype for new adapter tensors beside ``module``'s (first) weight."""
    weight = next(base_of(module).parameters())
    return {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}


@dataclasses.dataclass(frozen=True)
class SequentialAdapterConfig(PeftConfig):
    """bottleneck: m, the adapter's inner width; reduction_factor: m = hidden // reduction_factor
    instead (set one of the two; with neither, reduction_factor 16); activation: f, one of
    :data:`ACTIVATIONS`; init: ``"near_identity"`` (W_down and W_up ~ N(0, init_scale^2) truncated at
    two std, as the paper) or ``"identity"`` (W_up and b_up zero); init_scale: that std;
    train_layernorm: also train a per-adapter delta of every ``@layernorm`` weight/bias (as the paper).
    targets default to the attention and FFN output projections (Houlsby placement)."""

    targets: tuple[str, ...] | str | None = ("@attn_out", "@ffn_out")
    bottleneck: int | None = None
    reduction_factor: float | None = None
    activation: str = "relu"
    init_scale: float = 1e-2
    init: str = "near_identity"
    train_layernorm: bool = False

    def validate(self) -> None:
        validate_bottleneck_fields(self)
        self._require(self.init in INITS, "init",
                      f"one of {INITS} ('near_identity': the paper's small random W_up; 'identity': W_up = 0)")
        self._require(isinstance(self.train_layernorm, bool), "train_layernorm",
                      "True (train a per-adapter delta of every LayerNorm, as Houlsby et al.) or False")


class Bottleneck(nn.Module):
    """``x (..., d_in) -> W_up f(W_down x + b_down) + b_up  (..., d_out)``; computed in its own dtype.

    W_down ~ N(0, init_scale^2) truncated at two std; W_up likewise with ``up_scale`` (0: exactly zero,
    so the network outputs 0 at init); biases zero."""

    def __init__(self, d_in: int, width: int, d_out: int, activation: str, init_scale: float,
                 up_scale: float = 0.0, **kw: Any) -> None:
        super().__init__()
        self.down = nn.Linear(d_in, width, **kw)
        self.up = nn.Linear(width, d_out, **kw)
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        with torch.no_grad():
            nn.init.trunc_normal_(self.down.weight, std=init_scale, a=-2 * init_scale, b=2 * init_scale)
            nn.init.zeros_(self.down.bias)
            if up_scale > 0:
                nn.init.trunc_normal_(self.up.weight, std=up_scale, a=-2 * up_scale, b=2 * up_scale)
            else:
                nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        hidden = self.act(self.down(x.to(self.down.weight.dtype)))
        if scale == 1.0:
            out = self.up(hidden)
        else:  # fold the scale into the small d x m factor instead of the (..., d) output
            out = F.linear(hidden, self.up.weight * scale, self.up.bias * scale)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


class SequentialAdapterLayer(DeltaModule):
    """Wraps a Linear/Conv1D and adds ``A(h)`` to its output ``h`` for each live adapter, in order."""

    adapter_attrs = ("bottleneck",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.bottleneck = nn.ModuleDict()
        self.features = linear_features(base_layer)[1]

    def add(self, name: str, config: Any) -> None:
        d = self.features
        # Configs without an ``init`` field (the residual adapter's) keep W_up at zero.
        up_scale = config.init_scale if getattr(config, "init", "identity") == "near_identity" else 0.0
        self.bottleneck[name] = Bottleneck(d, bottleneck_width(config, d), d, config.activation,
                                           config.init_scale, up_scale, **factory_kwargs(self.base_layer))

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(*args, **kwargs)
        for name in self.live_adapters():
            out = out + self.bottleneck[name](out)
        return out


class LayerNormDelta(DeltaModule):
    """Wraps a norm module (LayerNorm, RMSNorm, T5LayerNorm) and runs it with ``weight + dw`` (and
    ``bias + db`` where it has a bias), ``dw``/``db`` zero at init and one pair per adapter: the
    paper's trained LayerNorm, kept per adapter so the base norm is never changed."""

    adapter_attrs = ("ln_weight", "ln_bias")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ln_weight = nn.ParameterDict()
        self.ln_bias = nn.ParameterDict()
        norm = base_of(base_layer)
        if not isinstance(getattr(norm, "weight", None), torch.Tensor):
            raise PeftlabError(f"train_layernorm wraps norm modules with a weight; {type(norm).__name__} has none")
        # functional_call names the norm's tensors from this wrapper's base_layer down.
        self.prefix = ""
        inner = base_layer
        while inner is not norm:
            self.prefix, inner = self.prefix + "base_layer.", inner.base_layer

    def add(self, name: str, config: Any = None) -> None:
        norm = base_of(self.base_layer)
        self.ln_weight[name] = nn.Parameter(torch.zeros_like(norm.weight))
        if isinstance(getattr(norm, "bias", None), torch.Tensor):
            self.ln_bias[name] = nn.Parameter(torch.zeros_like(norm.bias))

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        live = self.live_adapters()
        if not live:
            return self.base_layer(*args, **kwargs)
        norm = base_of(self.base_layer)
        tensors = {"weight": norm.weight + sum(self.ln_weight[n] for n in live)}
        if live[0] in self.ln_bias:
            tensors["bias"] = norm.bias + sum(self.ln_bias[n] for n in live)
        tensors = {self.prefix + k: v for k, v in tensors.items()}
        return torch.func.functional_call(self.base_layer, tensors, args, kwargs)


def add_bottlenecks(model: nn.Module, name: str, config: Any, targets: tuple[str, ...] | str) -> None:
    """Wrap every projection ``targets`` select in a :class:`SequentialAdapterLayer` and add adapter
    ``name`` there (shared with the residual adapter's ``ffn_out`` placement)."""
    for path in resolve_targets(model, targets, allowed_types=LINEAR_TYPES):
        wrap(model, path, SequentialAdapterLayer).add(name, config)


def attach(model: nn.Module, name: str, config: SequentialAdapterConfig, host: Any = None) -> None:
    add_bottlenecks(model, name, config, config.targets)
    if config.train_layernorm:
        for path in resolve_targets(model, ("@layernorm",)):
            wrap(model, path, LayerNormDelta).add(name, config)


SPEC = register(MethodSpec(
    name="sequential_adapter", title="Sequential adapter", family="additive", subcategory="adapter", config_cls=SequentialAdapterConfig,
    trains="bottleneck networks after the attention and FFN output projections", attach=attach,
    paper="Houlsby et al. 2019, Parameter-Efficient Transfer Learning for NLP",
    # The paper's near-identity init is not exactly the identity (init="identity" is).
    mergeable=False, identity_at_init=False, default_lr=1e-3,
))
