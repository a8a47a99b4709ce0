"""Hadamard adapter (Yuyan Chen, Qiang Fu, Ge Fan, Lun Du, Jian-Guang Lou, Shi Han, Dongmei Zhang,
Zhixu Li, Yanghua Xiao, 2023, "Hadamard Adapter: An Extreme Parameter-Efficient Adapter Tuning Method
for Pre-trained Language Models", CIKM 2023; arXiv 2407.11033).

Each layer's self-attention output ``A`` (the concatenated heads, batch x n x d) goes through an
element-wise affine map before the rest of the attention block (output projection, residual,
LayerNorm)::

    A' = w * A + b                        w, b: (d,)   one pair per layer, * is the Hadamard product
    o  = W_O A' + b_O                     the frozen attention output projection, then as before

``w`` starts at ones and ``b`` at zeros, so the model is unchanged at init. 2d parameters per
layer: 18,432 on BERT-base, half of the paper's 0.033% (the other half is the LayerNorm it unfreezes,
below).

Placement. The paper's ``A`` is ``Concat_h(softmax(Q_h K_h^T / sqrt(d_k)) V_h)``, the output of the
multi-head self-attention, and the adapter sits between it and the attention block's LayerNorm.
peftlab wraps the attention output projection (the ``'@attn_out'`` attach point: BERT
``attention.output.dense``, GPT-2 ``attn.c_proj``, Llama ``self_attn.o_proj``, T5 ``SelfAttention.o``)
and transforms its *input*, which is exactly ``A`` (``position="input"``, default).
``position="output"`` transforms the projection's output instead, ``w * (W_O A + b_O) + b`` (still
before the residual and LayerNorm), for comparison. Cross-attention outputs (T5's
``EncDecAttention.o``, which '@attn_out' also names) are left out, as the paper adapts
self-attention only; ``cross_attention=True`` adds them.

Merging. An element-wise affine map next to a linear layer folds into that layer exactly:

    input:  W_O (w * A + b) + b_O = (W_O diag(w)) A + (W_O b + b_O)    columns of W_O scaled
    output: w * (W_O A + b_O) + b = (diag(w) W_O) A + (w * b_O + b)     rows of W_O scaled

so ``merge_adapter`` folds every adapter into the wrapped ``nn.Linear`` / GPT-2 ``Conv1D``. A
projection without a bias (Llama, T5) gets a frozen bias parameter on merge, holding ``W_O b``
(resp. ``b``); ``unmerge`` divides by ``w``, so it needs every entry of ``w`` non-zero, and removes a
bias it created. Exact up to float rounding.

Compared with (IA)^3 (``ia3.py``): (IA)^3 only *scales* (no bias), and scales keys, values and the
FFN's inner activation. Scaling the values by ``l_v`` does scale ``A`` the same way (attention mixes
rows of V, so ``softmax(.) (V diag(l)) = A diag(l)``), so the Hadamard weight ``w`` alone is (IA)^3's
value vector moved one step; what (IA)^3 cannot express is the bias ``b`` on ``A``, a shift of every
token's attention output by ``W_O b`` (its key scaling and FFN scaling the Hadamard adapter does not
have). The mechanism test checks the bias path by hand.

Deviations, and why:
- The paper's tuning *method* also trains the LayerNorm after each attention block ("unfreeze the
  normalization module") and trains the classifier first, in a separate stage, then freezes it.
  This file is the adapter alone: trainable parameters are exactly ``w`` and ``b``. The paper's
  setup is ``modules_to_save=("attention.output.LayerNorm", "classifier")`` (BERT names: a full,
  saved copy of each LayerNorm and of the head), in one stage rather than two.
- The paper's "removing redundant layers" (0.022%) is a post-hoc analysis, not a default; pass
  targets naming the layers to keep (e.g. ``re:`` patterns) to reproduce it.
- Defaults beyond the adapter (learning rate, epochs) are not the paper's; ``default_lr`` is the
  (IA)^3 rate, a method of the same kind and size. Measured at that rate on all-MiniLM-L6-v2, SST-2
  (600 dev sentences to train, the other 272 to test, 150 steps of 16): adapter + classifier 0.768,
  adapter + LayerNorms + classifier (the paper's set) 0.827, the classifier alone 0.610.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ...core.config import PeftConfig
from ...core.errors import PeftlabError
from ...core.inject import wrap
from ...core.layer import DeltaModule, base_of, linear_io
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, resolve_targets

POSITIONS = ("input", "output")


@dataclasses.dataclass(frozen=True)
class HadamardAdapterConfig(PeftConfig):
    """targets: the attention output projections whose input (the self-attention output ``A``) is
    transformed (default every layer's, '@attn_out'); position: "input" (the paper's: ``w * A + b``
    before the output projection) or "output" (``w * o + b`` after it); cross_attention: also adapt
    cross-attention output projections that the targets name (default False, as the paper)."""

    targets: tuple[str, ...] | str | None = ("@attn_out",)
    position: str = "input"
    cross_attention: bool = False

    def validate(self) -> None:
        self._require(self.position in POSITIONS, "position",
                      f"one of {POSITIONS}: 'input' transforms the self-attention output before the output "
                      "projection (the paper), 'output' after it")


class HadamardLayer(DeltaModule):
    """Wraps a Linear or Conv1D; adapter ``name`` holds ``hadamard_weight[name]`` and
    ``hadamard_bias[name]``, both of the width the chosen side (input or output) has."""

    adapter_attrs = ("hadamard_weight", "hadamard_bias")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.hadamard_weight = nn.ParameterDict()
        self.hadamard_bias = nn.ParameterDict()
        self.in_features, self.out_features, self.transposed = linear_io(base_layer)
        self._created_bias = False  # merge gave a bias-less projection a bias: unmerge removes it

    def add(self, name: str, position: str) -> None:
        weight = base_of(self.base_layer).weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        width = self.in_features if position == "input" else self.out_features
        self.hadamard_weight[name] = nn.Parameter(torch.ones(width, dtype=dtype, device=weight.device))
        self.hadamard_bias[name] = nn.Parameter(torch.zeros(width, dtype=dtype, device=weight.device))
        self.settings[name] = position

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        live = self.live_adapters()
        for name in live:
            if self.settings[name] == "input":
                x = x * self.hadamard_weight[name].to(x.dtype) + self.hadamard_bias[name].to(x.dtype)
        out = self.base_layer(x, *args, **kwargs)
        for name in live:
            if self.settings[name] == "output":
                out = out * self.hadamard_weight[name].to(out.dtype) + self.hadamard_bias[name].to(out.dtype)
        return out

    # -- merging: fold the affine map into the projection (see the module docstring) -------------
    def merge(self, name: str) -> None:
        base = base_of(self.base_layer)
        w, b = self.hadamard_weight[name].detach().float(), self.hadamard_bias[name].detach().float()
        weight = self._weight_out_in(base)  # (out, in), float32
        with torch.no_grad():
            if base.bias is None:
                base.bias = nn.Parameter(torch.zeros(self.out_features, dtype=base.weight.dtype,
                                                     device=base.weight.device), requires_grad=False)
                self._created_bias = True
            bias = base.bias.float()
            if self.settings[name] == "input":
                new_bias, new_weight = bias + weight @ b, weight * w[None, :]
            else:
                new_bias, new_weight = w * bias + b, weight * w[:, None]
            self._store(base, new_weight, new_bias)
        self.merged_adapters.append(name)

    def unmerge(self, name: str) -> None:
        base = base_of(self.base_layer)
        w, b = self.hadamard_weight[name].detach().float(), self.hadamard_bias[name].detach().float()
        if bool((w == 0).any()):
            raise PeftlabError(f"Hadamard adapter {name!r} has zero weights, so merging erased those columns/rows "
                               "of the projection; it cannot be unmerged. Reload the base model instead.")
        weight, bias = self._weight_out_in(base), base.bias.float()
        with torch.no_grad():
            if self.settings[name] == "input":
                old_weight = weight / w[None, :]
                old_bias = bias - old_weight @ b
            else:
                old_weight, old_bias = weight / w[:, None], (bias - b) / w
            self._store(base, old_weight, old_bias)
        self.merged_adapters.remove(name)
        if self._created_bias and not self.merged_adapters:
            base.bias = None
            self._created_bias = False

    def _weight_out_in(self, base: nn.Module) -> torch.Tensor:
        weight = base.weight.detach().float()
        return weight.t() if self.transposed else weight

    def _store(self, base: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
        base.weight.copy_((weight.t() if self.transposed else weight).to(base.weight.dtype))
        base.bias.copy_(bias.to(base.bias.dtype))


def _plan(model: nn.Module, config: HadamardAdapterConfig) -> list[str]:
    """Paths of the projections to wrap, in model order; cross-attention ones only when asked."""
    paths = resolve_targets(model, config.targets, allowed_types=LINEAR_TYPES)
    if config.cross_attention:
        return paths
    try:
        attention = resolve_targets(model, ("@attention",))
        self_attention = set(resolve_targets(model, ("@self_attention",)))
    except PeftlabError:  # no attach-point map (explicit module names): nothing is known to be cross-attention
        return paths
    cross = [a for a in attention if a not in self_attention]
    kept = [p for p in paths if not any(p.startswith(c + ".") for c in cross)]
    if not kept:
        raise PeftlabError(f"HadamardAdapterConfig.targets={config.targets!r} selects only cross-attention "
                           f"projections ({paths[:3]}); the adapter acts on self-attention outputs. Target "
                           "self-attention output projections, or pass cross_attention=True.")
    return kept


def attach(model: nn.Module, name: str, config: HadamardAdapterConfig, host: Any = None) -> None:
    for path in _plan(model, config):
        wrap(model, path, HadamardLayer).add(name, config.position)


SPEC = register(MethodSpec(
    name="hadamard_adapter", title="Hadamard adapter", family="additive", subcategory="rescaling", config_cls=HadamardAdapterConfig,
    trains="an element-wise weight and bias on each self-attention output", attach=attach,
    paper="Chen et al. 2023, Hadamard Adapter: An Extreme Parameter-Efficient Adapter Tuning Method for "
          "Pre-trained Language Models",
    mergeable=True, merge_tolerance=1e-5, default_lr=3e-3,
))
