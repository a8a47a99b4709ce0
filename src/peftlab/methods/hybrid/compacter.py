"""Compacter and Compacter++ (Karimi Mahabadi, Henderson and Ruder, 2021, "Compacter: Efficient
Low-Rank Hypercomplex Adapter Layers", NeurIPS).

A bottleneck adapter (Houlsby placement: after the attention output and after the FFN output
projection, with its own residual) whose two projections are parameterised hypercomplex
multiplication (PHM) layers. With ``h`` the projection's output (k wide) and m the bottleneck::

    h <- h + PHM_up(f(PHM_down(h)))          PHM(x) = x W + b
    W = sum_{i=1..n} A_i (x) B_i             A_i: n x n, B_i = s_i t_i^T, s_i: (in/n) x r, t_i: (out/n) x r

``(x)`` is the Kronecker product, so ``W`` is in x out. The "slow" rule matrices ``A_1..A_n`` (one
n x n x n tensor) are shared by every PHM layer of the adapter — down and up, every site, every
block — and the "fast" low-rank factors ``s_i, t_i`` (and the biases) belong to each layer. The
shared tensor is ONE ``nn.Parameter`` per adapter name, held by a model-level module
(``PeftModel.model_adapters['compacter']``, checkpoint key ``shared_phm_rule``); the layers hold a
reference to that module, not the tensor, so it is trained, saved, loaded and deleted once.
Compacter++ (``compacter_pp``) is the same adapter after the FFN output only.

Each PHM layer forms its ``W`` per forward pass (``einsum`` of the n x n x n rule with the
n x (in/n) x (out/n) fast products; it is only in x out, e.g. 384 x 12 on MiniLM) and applies it
with one matrix product. Per adapter site (k = hidden width, m = bottleneck) the layer trains
``2 r (k + m)`` fast weights plus ``k + m`` biases; over ``S`` sites the adapter trains
``n^3 + S (2 r (k + m) + k + m)``: the paper's ``n^3 + 4L(k + d)`` for Compacter (S = 2L, r = 1)
and ``n^3 + 2L(k + d)`` for Compacter++, plus the biases the paper's formula leaves out.

Defaults are the reference implementation's Compacter/Compacter++ configurations (rabeehk/compacter,
``compacter.json`` / ``compacter++.json``, T5-base GLUE): n = ``phm_dim`` = 4, rank ``r`` = 1,
reduction factor 32 (m = k / 32), ``f`` = GELU (tanh approximation, ``gelu_new``), fast factors
``s_i``, ``t_i`` Glorot-uniform with gain sqrt(2) (each i separately), biases zero, the shared rule
``A ~ N(0, 1e-4^2)`` (``phm_init_range``), the model's layer norms trained (``train_layernorm``;
the paper's reported sizes, 0.073% / 0.047% of T5-base, count them — unlike the sequential adapter,
whose default leaves them off), learning rate 3e-3. With a rule that small the adapter starts as an
approximate identity (its output moves ``h`` by the order of ``phm_init_range^2``), not the exact
one, so the spec says ``identity_at_init=False``. On a MiniLM-size BERT (k = 384, 6 blocks) the
adapter trains 24,304 numbers (Compacter) / 17,176 (Compacter++), 14,320 / 7,192 without norms.

Deviations, each with its reason:
- The bottleneck is rounded down to a multiple of n (at least n), because PHM needs ``m % n == 0``
  (the reference asserts it); m = k / 32 is already a multiple of 4 on MiniLM (12) and BERT/T5-base
  (24). An explicit ``bottleneck`` that is not a multiple of n is refused.
- The trained layer norms are per-adapter zero-initialised deltas of every ``@layernorm`` weight and
  bias (the sequential adapter's :class:`LayerNormDelta`), not the base model's own norms, so that
  several adapters keep their own and the base model stays untouched; same function at init.
- On T5 the ``@attn_out`` site also covers the decoder's cross-attention output (the reference adapts
  self-attention and FFN only); pass ``targets`` naming ``SelfAttention.o`` to leave it out.
- The reference's other switches (unshared or factorised rules, shared fast weights, learn_phm=False)
  are not offered: they are its ablations, not Compacter.

Built on the sequential adapter: the wrapper (:class:`SequentialAdapterLayer`: placement, residual,
stacking with other bottleneck adapters at the same site, state and deletion) is that method's; this
file supplies the PHM bottleneck that goes into it. Not mergeable: ``f`` is nonlinear.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import PeftConfig, is_positive_int
from ...core.errors import PeftlabError
from ...core.inject import wrap
from ...core.layer import DeltaModule
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, resolve_targets
from ..additive.sequential_adapter import (ACTIVATIONS, LayerNormDelta, SequentialAdapterLayer, factory_kwargs,
                                           linear_features)

_KEY = "compacter"  # this method's entry in PeftModel.model_adapters (Compacter and Compacter++ share it)
DEFAULT_REDUCTION_FACTOR = 32  # the paper's (m = 24 on T5-base, 12 on MiniLM)


@dataclasses.dataclass(frozen=True)
class CompacterConfig(PeftConfig):
    """phm_dim: n, the number of Kronecker summands (and the size of each shared A_i); phm_rank: r,
    the rank of each fast matrix B_i = s_i t_i^T; reduction_factor: m = hidden // reduction_factor,
    rounded down to a multiple of n; bottleneck: m itself instead (a multiple of n; set at most one
    of the two; with neither, reduction factor 32, the paper's); activation: f, one of the
    sequential adapter's activations; phm_init_range: std of the shared rule A at init;
    train_layernorm: also train a per-adapter delta of every ``@layernorm`` (as the paper).
    targets default to the attention and FFN output projections."""

    targets: tuple[str, ...] | str | None = ("@attn_out", "@ffn_out")
    phm_dim: int = 4
    phm_rank: int = 1
    reduction_factor: float | None = None
    bottleneck: int | None = None
    activation: str = "gelu_new"
    phm_init_range: float = 1e-4
    train_layernorm: bool = True

    def validate(self) -> None:
        self._require(is_positive_int(self.phm_dim), "phm_dim", "a positive integer n such as 4 (the paper's)")
        self._require(is_positive_int(self.phm_rank), "phm_rank", "a positive integer rank r such as 1 (the paper's)")
        multiple = is_positive_int(self.bottleneck) and self.bottleneck % self.phm_dim == 0
        self._require(self.bottleneck is None or multiple,
                      "bottleneck", f"a positive multiple of phm_dim={self.phm_dim} such as {8 * self.phm_dim}, "
                      "or None (m from reduction_factor)")
        rf = self.reduction_factor
        self._require(rf is None or (isinstance(rf, (int, float)) and not isinstance(rf, bool)
                                     and math.isfinite(rf) and rf >= 1),
                      "reduction_factor", "a number >= 1 such as 32 (m = hidden // reduction_factor), or None")
        if self.bottleneck is not None and rf is not None:
            raise PeftlabError(f"{type(self).__name__} got bottleneck={self.bottleneck!r} and reduction_factor={rf!r}: "
                               "expected one of them; set the other to None")
        self._require(self.activation in ACTIVATIONS, "activation", f"one of {sorted(ACTIVATIONS)}")
        self._require(isinstance(self.phm_init_range, (int, float)) and not isinstance(self.phm_init_range, bool)
                      and math.isfinite(self.phm_init_range) and self.phm_init_range > 0, "phm_init_range",
                      "a small positive std for the shared rule such as 1e-4 (0 would leave the adapter dead)")
        self._require(isinstance(self.train_layernorm, bool), "train_layernorm",
                      "True (train a per-adapter delta of every LayerNorm, as the paper) or False")

    def width(self, hidden: int) -> int:
        """m for a site of width ``hidden``: ``bottleneck``, else ``hidden // reduction_factor`` rounded
        down to a multiple of ``phm_dim`` (at least ``phm_dim``)."""
        if self.bottleneck is not None:
            return self.bottleneck
        n = self.phm_dim
        factor = self.reduction_factor if self.reduction_factor is not None else DEFAULT_REDUCTION_FACTOR
        return max(n, int(hidden // factor) // n * n)


@dataclasses.dataclass(frozen=True)
class CompacterPlusPlusConfig(CompacterConfig):
    """Compacter++: the same adapter after the FFN output projection only."""

    targets: tuple[str, ...] | str | None = ("@ffn_out",)


class SharedPHMRule(DeltaModule):
    """Model-level: each adapter's rule tensor ``A`` (n x n x n), trained and shared by all its PHM layers."""

    adapter_attrs = ("shared_phm_rule",)

    def __init__(self) -> None:
        super().__init__()
        self.shared_phm_rule = nn.ParameterDict()

    def add(self, name: str, config: CompacterConfig, **kw: Any) -> None:
        n = config.phm_dim
        rule = torch.empty(n, n, n, **kw)
        nn.init.normal_(rule, mean=0.0, std=config.phm_init_range)
        self.shared_phm_rule[name] = nn.Parameter(rule)


class PHMLinear(nn.Module):
    """``x (..., in) -> x W + b`` with ``W = sum_i A_i (x) (s_i t_i^T)``; ``A`` read from the model-level
    :class:`SharedPHMRule` (not a child of this module, so it is stored once)."""

    def __init__(self, d_in: int, d_out: int, n: int, rank: int, rules: SharedPHMRule, adapter: str,
                 **kw: Any) -> None:
        super().__init__()
        self.phm_left = nn.Parameter(torch.empty(n, d_in // n, rank, **kw))     # s_i
        self.phm_right = nn.Parameter(torch.empty(n, rank, d_out // n, **kw))   # t_i^T
        self.bias = nn.Parameter(torch.zeros(d_out, **kw))
        self.rules = [rules]  # a list: the model-level module is not our child
        self.adapter = adapter
        with torch.no_grad():
            for i in range(n):  # the reference's "glorot-uniform": each summand's factor on its own
                nn.init.xavier_uniform_(self.phm_left[i], gain=math.sqrt(2))
                nn.init.xavier_uniform_(self.phm_right[i], gain=math.sqrt(2))

    def kronecker_weight(self) -> torch.Tensor:
        """``W`` (in x out): ``W[a*p + c, b*q + d] = sum_i A_i[a, b] B_i[c, d]``."""
        rule = self.rules[0].shared_phm_rule[self.adapter]
        fast = torch.bmm(self.phm_left, self.phm_right)  # B_i: n x (in/n) x (out/n)
        n, p, q = fast.shape
        return torch.einsum("iab,icd->acbd", rule.to(fast.dtype), fast).reshape(n * p, n * q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.kronecker_weight().T, self.bias)

    def extra_repr(self) -> str:
        n, p, r = self.phm_left.shape
        return f"in={n * p}, out={self.bias.numel()}, phm_dim={n}, rank={r}"


class PHMBottleneck(nn.Module):
    """``x (..., k) -> PHM_up(f(PHM_down x))  (..., k)``, computed in its own dtype; what a
    :class:`SequentialAdapterLayer` adds to its projection's output."""

    def __init__(self, hidden: int, width: int, config: CompacterConfig, rules: SharedPHMRule, adapter: str,
                 **kw: Any) -> None:
        super().__init__()
        self.down = PHMLinear(hidden, width, config.phm_dim, config.phm_rank, rules, adapter, **kw)
        self.up = PHMLinear(width, hidden, config.phm_dim, config.phm_rank, rules, adapter, **kw)
        self.activation = config.activation
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x.to(self.down.bias.dtype)))).to(x.dtype)

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


def attach(model: nn.Module, name: str, config: CompacterConfig, host: Any = None) -> None:
    if host is None:
        raise PeftlabError(f"{type(config).method} keeps one shared rule tensor per adapter at model level: "
                           "apply it with get_peft_model(model, config) or PeftModel.add_adapter")
    n = config.phm_dim
    paths = resolve_targets(model, config.targets, allowed_types=LINEAR_TYPES)
    hidden = {path: linear_features(model.get_submodule(path))[1] for path in paths}
    uneven = {path: k for path, k in hidden.items() if k % n}
    if uneven:
        path, k = next(iter(uneven.items()))
        raise PeftlabError(f"{type(config).__name__}.phm_dim={n}: the PHM layers split each width into n equal "
                           f"parts, but {path} is {k} wide; expected a phm_dim that divides it (such as 4 or 2)")
    kw = factory_kwargs(model.get_submodule(paths[0]))
    if _KEY not in host.model_adapters:
        host.model_adapters[_KEY] = SharedPHMRule()
    rules = host.model_adapters[_KEY]
    rules.add(name, config, **kw)
    for path in paths:
        layer = wrap(model, path, SequentialAdapterLayer)
        layer.bottleneck[name] = PHMBottleneck(hidden[path], config.width(hidden[path]), config, rules, name,
                                               **factory_kwargs(layer.base_layer))
    if config.train_layernorm:
        for path in resolve_targets(model, ("@layernorm",)):
            wrap(model, path, LayerNormDelta).add(name, config)


_PAPER = "Karimi Mahabadi et al. 2021, Compacter: Efficient Low-Rank Hypercomplex Adapter Layers"
# The reference's Compacter and Compacter++ configurations train T5-base at 3e-3.
_COMMON = dict(family="hybrid", subcategory="manual combination", attach=attach, paper=_PAPER,
               mergeable=False, identity_at_init=False, default_lr=3e-3)

SPEC = register(MethodSpec(
    name="compacter", title="Compacter", config_cls=CompacterConfig,
    trains="PHM bottleneck adapters after the attention and FFN outputs (low-rank fast weights per layer, "
           "one shared rule tensor) and layer-norm deltas", **_COMMON))
SPEC_PP = register(MethodSpec(
    name="compacter_pp", title="Compacter++", config_cls=CompacterPlusPlusConfig,
    trains="PHM bottleneck adapters after the FFN outputs (low-rank fast weights per layer, one shared rule "
           "tensor) and layer-norm deltas", **_COMMON))
