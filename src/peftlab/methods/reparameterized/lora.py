"""LoRA: Low-Rank Adaptation (Hu et al., 2022, "LoRA: Low-Rank Adaptation of Large Language Models").

The frozen weight ``W0`` (out x in) gets a trainable low-rank update::

    h = W0 x + (alpha / r) * B A x          A: r x in (random), B: out x r (zero) -> identity at init

Placement and initialisation follow the paper: the attention query and value projections
(``@query``, ``@value``), ``B = 0``, and ``A`` drawn as the reference code (loralib) draws it,
Kaiming-uniform (``bound = 1/sqrt(in)``) — the paper's text says Gaussian. Deviation: ``alpha``
defaults to 16 with ``r = 8`` (scale 2); the paper sets alpha to the first r it tries (scale 1) and
peft defaults to 8. The study's learning rates were measured at 16; pass ``alpha=r`` for the
paper's scale. GPT-2 fuses query, key and value in one ``c_attn``: LoRA adapts that whole matrix
there (the paper adapts query and value only).

rsLoRA (Kalajdzievski, 2023) scales by ``alpha / sqrt(r)`` instead, which keeps the update's
magnitude stable as ``r`` grows. DoRA (``use_dora=True``) is a variant (:class:`DoRA`): a
:class:`LoraVariant` changes how one adapter's update is formed and merged, and the fast paths
below serve only plain adapters, falling back to the variant's own forward. Dropout, when set, is applied to ``x`` on the low-rank path only.
Supports ``nn.Linear``, GPT-2's ``Conv1D`` (weight stored in x out) and ``nn.Embedding``
(``A``: r x vocab, looked up by token id). Merging adds ``(alpha/r) B A`` into ``W0``.

How the forward runs (same numbers, less work than the formula read literally):
- training: ``low = x A^T`` (one GEMM for sibling layers fed the same ``x``, e.g. query/key/value),
  then ``low (scale B^T)`` is added into the base output by the GEMM itself (in place on a plain
  layer's fresh output), so no out-sized temporary, add or scale pass; dropout is one 0/1 mask on
  ``x`` whose ``1/(1-p)`` is folded into ``scale``;
- inference (no gradient wanted for A or B): the update is folded into a temporary weight,
  ``x (W0 + scale B A)^T``, one GEMM like the base layer's, once a batch has enough tokens;
- mixed batches (``PeftModel.forward(..., adapter_names=[...])``, one adapter per example):
  every adapter's A and B stacked, gathered per example, one batched GEMM per factor.
"""
from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core import quant
from ...core.config import PeftConfig, peft_names, refuse_peft_features
from ...core.errors import PeftlabError
from ...core.inject import delta_modules, wrap
from ...core.layer import DeltaModule, base_of
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, logical_name, resolve_targets


@peft_names(lora_alpha="alpha", target_modules="targets", lora_dropout="dropout", use_rslora="rslora")
@dataclasses.dataclass(frozen=True)
class LoraConfig(PeftConfig):
    """r: rank of the update; alpha: scale numerator; dropout: on the low-rank input;
    rslora: scale by alpha/sqrt(r). targets default to the attention query and value."""

    targets: tuple[str, ...] | str | None = ("@query", "@value")
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    rslora: bool = False
    use_dora: bool = False

    def validate(self) -> None:
        self._require(isinstance(self.r, int) and self.r > 0, "r", "a positive integer rank such as 8")
        self._require(isinstance(self.use_dora, bool), "use_dora", "True (DoRA) or False")
        self._require(self.alpha > 0, "alpha", "a positive number (often 2*r)")
        self._require(0.0 <= self.dropout < 1.0, "dropout", "a probability in [0, 1)")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def variant(self) -> "LoraVariant | None":
        """How this adapter's update is formed when it is not plain ``scale * B A`` (a derived
        method's config returns its own variant)."""
        return DORA if self.use_dora else None

    def peft_fields(self) -> dict[str, Any]:
        return {"peft_type": "LORA", "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "use_rslora": self.rslora, "use_dora": self.use_dora, "target_modules": self.targets, "bias": "none",
                "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
                "modules_to_save": list(self.modules_to_save) or None}

    @classmethod
    def from_peft(cls, data: dict[str, Any]) -> "LoraConfig":
        refuse_peft_features(data, _PEFT_FEATURES_NOT_READ, "LoRA")
        return cls(r=data["r"], alpha=data["lora_alpha"], dropout=data.get("lora_dropout", 0.0),
                   rslora=bool(data.get("use_rslora", False)), use_dora=bool(data.get("use_dora", False)),
                   targets=data["target_modules"],
                   modules_to_save=tuple(data.get("modules_to_save") or ()))


# peft LoRA fields (with their "off" value) that change what the adapter computes and that
# peftlab does not implement: a checkpoint that turns one on is refused by name.
_PEFT_FEATURES_NOT_READ = {
    "bias": "none", "rank_pattern": {}, "alpha_pattern": {}, "alora_invocation_tokens": None,
    "layers_to_transform": None, "exclude_modules": None, "lora_bias": False, "trainable_token_indices": None,
    "layer_replication": None, "target_parameters": None, "use_qalora": False,
}

# Base layers whose forward LoRA replays itself (they keep nothing of their output for backward).
_PLAIN: tuple[type, ...] = tuple(LINEAR_TYPES) + (nn.Embedding,)


class LoraLayer(DeltaModule):
    """Wraps a Linear, Conv1D or Embedding with any number of named LoRA updates."""

    adapter_attrs = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_dropout", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA's m, per output feature
        # Adapters whose update is not scale * B A added to the output (DoRA): computed by their variant.
        self.variants: dict[str, LoraVariant] = {}
        self._merged: dict[str, torch.Tensor] = {}  # the exact delta each merge added, for unmerge
        self._quant_undo: dict[str, Any] = {}  # merges into a quantized base: how to undo each
        self._share: _SharedInput | None = None  # siblings fed the same input (set by attach)
        base = base_of(base_layer)
        self.is_embedding = isinstance(base, nn.Embedding)
        self.transposed = not isinstance(base, (nn.Linear, nn.Embedding))  # Conv1D keeps W as in x out
        if self.is_embedding:
            self.in_features, self.out_features = base.num_embeddings, base.embedding_dim
        elif self.transposed:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features

    def add(self, name: str, config: LoraConfig) -> None:
        weight = base_of(self.base_layer).weight
        kw = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        if self.is_embedding:
            # peft's convention for embeddings: A zero, B random (still identity at init).
            self.lora_embedding_A[name] = nn.Parameter(torch.zeros(config.r, self.in_features, **kw))
            self.lora_embedding_B[name] = nn.Parameter(torch.randn(self.out_features, config.r, **kw))
        else:
            self.lora_A[name] = nn.Linear(self.in_features, config.r, bias=False, **kw)
            self.lora_B[name] = nn.Linear(config.r, self.out_features, bias=False, **kw)
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)
            if config.dropout > 0:
                self.lora_dropout[name] = nn.Dropout(config.dropout)
        self.settings[name] = config.scaling
        variant = config.variant()
        if variant is not None:
            self.variants[name] = variant
            variant.add(self, name, config)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.variants.pop(name, None)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        state = super().adapter_state(name)
        return {k: v for k, v in state.items() if not k.startswith("lora_dropout")}

    def delta_weight(self, name: str) -> torch.Tensor:
        """``(alpha/r) B A`` laid out like the base weight (a variant's own change of the weight)."""
        if name in self.variants:
            return self.variants[name].delta_weight(self, name)
        if self.is_embedding:
            delta = (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T  # vocab x dim
        else:
            delta = self.lora_B[name].weight @ self.lora_A[name].weight  # out x in
            if self.transposed:
                delta = delta.T
        return delta * self.settings[name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        live = self.live_adapters()
        if any(name in self.variants for name in live):  # the fast paths below assume scale * B A
            return self._variant_forward(x, live, *args, **kwargs)
        plain = not args and not kwargs and self._is_plain()
        if live and plain and self._fold_into_weight(x, live):
            return self._folded_forward(x, live)
        if not live:
            return self.base_layer(x, *args, **kwargs)
        if self.mixed_batch is not None:
            return self._mixed_forward(x, self.base_layer(x, *args, **kwargs), live)
        # 2-D throughout: the base output is then a fresh tensor (not a view) that the low-rank
        # GEMM can add into in place without autograd having to copy slices in backward.
        x2 = x.reshape(-1) if self.is_embedding else x.reshape(-1, self.in_features)
        if plain:
            out = self._base_forward_2d(x2)
        else:  # another wrapper inside: it may keep its output, so add out of place
            out = self.base_layer(x, *args, **kwargs).reshape(-1, self.out_features)
        for name in live:
            a, b, scale = self._factors(name)
            if self.is_embedding:
                low = F.embedding(x2, a)
            else:
                h = x2 if x2.dtype == a.dtype else x2.to(a.dtype)
                p = self._dropout_p(name)
                if p > 0:
                    # One 0/1 mask (uniform draws compared in place: half the cost of bernoulli_ on
                    # CPU) and one multiply; the 1/(1-p) rescale is folded into B below.
                    h = h * torch.rand_like(h).ge_(p)
                    scale = scale / (1 - p)
                share = self._share if p == 0 and len(live) == 1 and not torch.compiler.is_compiling() else None
                low = share.low(self, x, h) if share is not None else None
                if low is None:
                    low = F.linear(h, a)
            if plain and out.dtype == low.dtype and not torch.compiler.is_compiling():
                out = _AddUp.apply(out, low, b, scale)
            else:
                out = torch.addmm(out.to(low.dtype), low, _scaled_bt(b, scale)).to(out.dtype)
        return out.view(*x.shape, self.out_features) if self.is_embedding else out.view(*x.shape[:-1], self.out_features)

    def _variant_forward(self, x: torch.Tensor, live: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The general path: the base output, then each live adapter's update in turn."""
        if self.mixed_batch is not None:
            raise PeftlabError(f"adapters {[n for n in live if n in self.variants]} use a LoRA variant (DoRA), which "
                               "does not serve mixed batches; run their examples in a separate call")
        out = self.base_layer(x, *args, **kwargs)
        for name in live:
            if name in self.variants:
                out = self.variants[name].forward(self, name, x, out)
            else:
                a, b, scale = self._factors(name)
                h = self.lora_dropout[name](x) if name in self.lora_dropout else x
                out = out + F.linear(F.linear(h.to(a.dtype), a), b).to(out.dtype) * scale
        return out

    def base_weight_out_in(self) -> torch.Tensor:
        """The wrapped layer's weight as out x in (Conv1D keeps in x out); a quantized layer's
        dequantized (a new float32 tensor)."""
        base = base_of(self.base_layer)
        if quant.is_quantized(base):
            return quant.dequantized_weight(base)
        return base.weight.T if self.transposed else base.weight

    def _can_share(self, x: torch.Tensor) -> bool:
        """Whether this layer, called on ``x`` now, takes the plain low-rank path with one adapter
        and no dropout, so its ``x A^T`` can be computed together with its siblings'."""
        live = self.live_adapters()
        return (len(live) == 1 and live[0] not in self.variants and not self.is_embedding and self.mixed_batch is None
                and self._is_plain()
                and x.shape[-1] == self.in_features and self._dropout_p(live[0]) == 0
                and self.lora_A[live[0]].weight.dtype == x.dtype and not self._fold_into_weight(x, live))

    def _is_plain(self) -> bool:
        # A plain Linear/Conv1D/Embedding (no wrapper inside, no hook that might hold its output):
        # LoRA may replay its forward and add into that output in place.
        base = self.base_layer
        return type(base) in _PLAIN and not base._forward_hooks and not base._forward_pre_hooks

    def _base_forward_2d(self, x2: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The base layer's own forward on flattened input (optionally with another weight)."""
        base = self.base_layer
        w = base.weight if weight is None else weight
        if self.is_embedding:
            return F.embedding(x2, w, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                               base.sparse)
        if self.transposed:  # Conv1D keeps W as in x out
            return torch.addmm(base.bias, x2, w)
        return F.linear(x2, w, base.bias)

    def _fold_into_weight(self, x: torch.Tensor, live: list[str]) -> bool:
        """Whether ``x (W0 + scale B A)^T`` beats ``x W0^T + scale (x A^T) B^T`` here.

        Only when no gradient of A or B is wanted (inference): otherwise the folded weight would
        need a full-size weight gradient. It then pays when the tokens' traffic through the
        low-rank path, ``N (in + 2 out)``, exceeds building the folded weight, ``2 in out`` —
        true for any prompt-sized batch — and it touches no activation beyond the base GEMM.
        """
        base = self.base_layer
        if self.mixed_batch is not None or self.is_embedding or any(n in self.variants for n in live):
            return False
        if torch.is_grad_enabled() and any(self.lora_A[n].weight.requires_grad or self.lora_B[n].weight.requires_grad
                                           for n in live):
            return False
        if any(self._dropout_p(n) > 0 or self.lora_A[n].weight.dtype != base.weight.dtype for n in live):
            return False
        tokens = x.numel() // self.in_features
        return tokens * (self.in_features + 2 * self.out_features) >= 2 * self.in_features * self.out_features

    def _folded_forward(self, x: torch.Tensor, live: list[str]) -> torch.Tensor:
        weight = self.base_layer.weight
        for name in live:
            a, b, scale = self._factors(name)
            # Linear keeps W as out x in (add B A); Conv1D as in x out (add A^T B^T).
            args = (a.T, b.T) if self.transposed else (b, a)
            weight = torch.addmm(weight, *args, alpha=scale) if weight is self.base_layer.weight \
                else weight.addmm_(*args, alpha=scale)
        out = self._base_forward_2d(x.reshape(-1, self.in_features), weight)
        return out.view(*x.shape[:-1], self.out_features)

    def _dropout_p(self, name: str) -> float:
        return self.lora_dropout[name].p if self.training and name in self.lora_dropout else 0.0

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(a, B, scale) with ``low = x a^T`` (embeddings: ``a = A^T``, vocab x r, looked up by id)
        and ``delta = scale * low B^T``."""
        if self.is_embedding:
            return self.lora_embedding_A[name].T, self.lora_embedding_B[name], self.settings[name]
        return self.lora_A[name].weight, self.lora_B[name].weight, self.settings[name]

    def _mixed_forward(self, x: torch.Tensor, out: torch.Tensor, live: list[str]) -> torch.Tensor:
        """Example i gets adapter ``mixed_batch[i]``: all adapters' factors stacked (ranks zero-padded
        to the largest, scale folded into B), gathered per example, one batched GEMM per factor.
        Examples whose adapter this layer does not hold index a zero slot."""
        names = self.mixed_batch or []
        n = x.shape[0]
        if n != len(names):
            raise PeftlabError(f"adapter_names has {len(names)} entries but the batch has {n} examples")
        slot = {name: i for i, name in enumerate(live)}
        idx = torch.tensor([slot.get(name, len(live)) for name in names], device=x.device)
        factors = [self._factors(name) for name in live]
        a0, b0, _ = factors[0]
        r = max(b.shape[1] for _, b, _ in factors)
        keep = [1 - self._dropout_p(name) for name in live] + [1.0]
        scale = torch.tensor([s for *_, s in factors] + [0.0], dtype=b0.dtype, device=b0.device)
        scale = scale / torch.tensor(keep, dtype=b0.dtype, device=b0.device)
        b_all = torch.stack([F.pad(b, (0, r - b.shape[1])) for _, b, _ in factors] + [b0.new_zeros(self.out_features, r)])
        b_sel = (b_all * scale[:, None, None])[idx]  # (n, out, r)
        if self.is_embedding:  # a: (vocab, r) per adapter
            a_all = torch.stack([F.pad(a, (0, r - a.shape[1])) for a, _, _ in factors] + [a0.new_zeros(self.in_features, r)])
            low = a_all[idx.view(-1, *[1] * (x.dim() - 1)), x].reshape(n, -1, r)
        else:  # a: (r, in) per adapter
            a_all = torch.stack([F.pad(a, (0, 0, 0, r - a.shape[0])) for a, _, _ in factors] + [a0.new_zeros(r, self.in_features)])
            h = (x if x.dtype == a0.dtype else x.to(a0.dtype)).reshape(n, -1, self.in_features)
            if min(keep) < 1:
                keep_row = torch.tensor(keep, dtype=h.dtype, device=h.device)[idx][:, None, None]
                h = h * (torch.rand_like(h) < keep_row).to(h.dtype)
            low = torch.bmm(h, a_all[idx].transpose(1, 2))  # (n, T, r)
        recorded = torch.is_grad_enabled() and (low.requires_grad or b_sel.requires_grad or out.requires_grad)
        if self._is_plain() and not recorded and out.is_contiguous() and out.dtype == low.dtype:
            # Nothing records this for backward and a plain layer's output is ours: add in place.
            out.view(n, -1, self.out_features).baddbmm_(low, b_sel.transpose(1, 2))
            return out
        return out + torch.bmm(low, b_sel.transpose(1, 2)).view(out.shape).to(out.dtype)

    def merge(self, name: str) -> None:
        base = base_of(self.base_layer)
        if quant.is_quantized(base):  # see core.quant.merge_delta: exact, undone from the saved state
            with torch.no_grad():
                self._quant_undo[name] = quant.merge_delta(self, self.delta_weight(name))
            self.merged_adapters.append(name)
            return
        weight = base.weight
        with torch.no_grad():
            delta = self.delta_weight(name).to(weight.dtype)
            weight.add_(delta)
        if name in self.variants:  # its delta depends on W0 itself: keep the one added
            self._merged[name] = delta
        self.merged_adapters.append(name)

    def unmerge(self, name: str) -> None:
        if name in self._quant_undo:
            if self.merged_adapters[-1] != name:
                raise PeftlabError(f"the base layer is quantized: merged adapters {self.merged_adapters} unmerge in "
                                   f"reverse order, so unmerge {self.merged_adapters[-1]!r} before {name!r}")
            quant.restore(self, self._quant_undo.pop(name))
            self.merged_adapters.remove(name)
            return
        base = base_of(self.base_layer)
        weight = base.weight
        with torch.no_grad():
            weight.sub_(self._merged.pop(name) if name in self._merged else self.delta_weight(name).to(weight.dtype))
        self.merged_adapters.remove(name)


class LoraVariant:
    """How one adapter's update is formed and merged when it is not ``scale * B A`` added to the
    output. A variant keeps its extra tensors in containers the layer declares (``adapter_attrs``)
    under peft's names; the layer's fast paths (joint down-projection, fold-into-weight, in-place
    add, mixed batches) serve only plain adapters and fall back to ``forward`` for a variant."""

    def add(self, layer: LoraLayer, name: str, config: LoraConfig) -> None:
        """Create the variant's tensors for adapter ``name`` (A and B already exist)."""

    def forward(self, layer: LoraLayer, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, layer: LoraLayer, name: str) -> torch.Tensor:
        """``W_merged - W0``, laid out like the base weight: what merging adds."""
        raise NotImplementedError


class DoRA(LoraVariant):
    """DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"): the adapted weight is
    split into a trained magnitude ``m`` (one per output feature) and a direction updated by LoRA::

        W' = m * (W0 + s B A) / ||W0 + s B A||_row        m starts at ||W0||_row: identity at init

    As the paper (section 4.3) and peft, the norm is treated as a constant in backward (detached),
    and with dropout the base product is recomputed on the dropped input, as peft does. Merging
    writes ``W'`` into the weight (exact); unmerging subtracts the very delta that merge added.
    Linear and Conv1D layers (not embeddings)."""

    def add(self, layer: LoraLayer, name: str, config: LoraConfig) -> None:
        if layer.is_embedding:
            raise PeftlabError("DoRA (use_dora=True) applies to Linear/Conv1D layers; a target is an Embedding. "
                               "Narrow the targets or use plain LoRA there")
        with torch.no_grad():
            norm = self._norm(layer, name)
        layer.lora_magnitude_vector[name] = nn.Parameter(norm.clone())

    def _direction(self, layer: LoraLayer, name: str) -> torch.Tensor:
        a, b, scale = layer._factors(name)
        return layer.base_weight_out_in() + (b @ a) * scale

    def _norm(self, layer: LoraLayer, name: str) -> torch.Tensor:
        return torch.linalg.vector_norm(self._direction(layer, name).detach(), dim=1)

    def forward(self, layer: LoraLayer, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        a, b, scale = layer._factors(name)
        weight = layer.base_weight_out_in()
        mag_scale = layer.lora_magnitude_vector[name] / self._norm(layer, name)
        h = layer.lora_dropout[name](x) if name in layer.lora_dropout else x
        h = h.to(a.dtype)
        if h is x and layer._is_plain():  # no dropout: the base product is the base output less its bias
            bias = getattr(base_of(layer.base_layer), "bias", None)
            base = out if bias is None else out - bias
        else:
            base = F.linear(h, weight)
        update = (mag_scale - 1) * base + mag_scale * F.linear(F.linear(h, a), b) * scale
        return out + update.to(out.dtype)

    def delta_weight(self, layer: LoraLayer, name: str) -> torch.Tensor:
        direction = self._direction(layer, name)
        merged = (layer.lora_magnitude_vector[name] / torch.linalg.vector_norm(direction, dim=1))[:, None] * direction
        delta = merged - layer.base_weight_out_in()
        return delta.T if layer.transposed else delta


DORA = DoRA()


def _scaled_bt(b: torch.Tensor, scale: float) -> torch.Tensor:
    # scale * B^T as its own contiguous r x out tensor (tiny): the GEMM then needs no alpha (no
    # extra out-sized multiply in backward), and grad_low is formed from a transposed operand,
    # which CPU BLAS runs ~2.5x faster for small r than from B itself.
    return b.T.contiguous() * scale


class _AddUp(torch.autograd.Function):
    """``out += low (scale B^T)`` in place. Backward rebuilds the small ``scale B^T`` instead of
    keeping it from the forward, so training holds no tensor beyond what separate ``A``/``B``
    layers hold (12 KB per layer for r 8 on a 384-wide layer, for the whole backward)."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, low: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.mark_dirty(out)
        ctx.save_for_backward(low, b)
        ctx.scale = scale
        # (under autocast the activations are bf16/fp16 while B stays fp32: compute in theirs)
        return out.addmm_(low, _scaled_bt(b, scale).to(low.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        low, b = ctx.saved_tensors
        grad_low = grad @ _scaled_bt(b, ctx.scale).to(grad.dtype).T if ctx.needs_input_grad[1] else None
        grad_b = (low.T @ grad).T.mul_(ctx.scale).to(b.dtype) if ctx.needs_input_grad[2] else None
        return grad, grad_low, grad_b, None


class _SharedInput:
    """Sibling LoRA layers (query/key/value, gate/up) that normally receive the very same input.

    The first of them to run on an input ``x`` computes ``x [A_1; A_2; ...]^T`` for all of them
    in one GEMM: one pass over ``x`` instead of one per layer, and in backward one GEMM each for
    the A gradients and for the gradient of ``x``. The others take their columns. The identity
    and version of ``x`` guard it: a sibling fed another tensor (cross-attention) computes its own.
    The pending columns are per thread, so models run from several threads do not mix them.
    """

    def __init__(self, members: list[LoraLayer]) -> None:
        self.members = members
        self.state = threading.local()

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles carry the group, not the pending columns
        return {"members": self.members}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["members"])

    def low(self, layer: LoraLayer, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor | None:
        st = self.state
        pending: dict[int, torch.Tensor] = getattr(st, "pending", {})
        # An inference tensor (torch.inference_mode) keeps no version counter; it cannot be changed in
        # place outside inference mode, and the siblings read it one after the other in one forward.
        version = None if x.is_inference() else x._version
        if getattr(st, "x", None) is not x or st.version != version or id(layer) not in pending:
            ready = [m for m in self.members if m._can_share(x)]
            if len(ready) < 2 or layer not in ready:
                return None
            lows = _JointDown.apply(x2, *(m.lora_A[m.live_adapters()[0]].weight for m in ready))
            st.x, st.version = x, version
            pending = st.pending = {id(m): low for m, low in zip(ready, lows)}
        low = pending.pop(id(layer))
        if not pending:
            st.x = None  # hold no activation past the last sibling
        return low


class _JointDown(torch.autograd.Function):
    """``x A_i^T`` for every ``A_i`` in one GEMM. Backward takes the siblings' gradients one by one
    (``grad_x = sum_i g_i A_i``, accumulated in place) instead of first concatenating them into one
    (tokens x sum r) tensor, as autograd's backward of ``split`` would: that copy would be the one
    thing at the backward's peak that separate layers do not hold."""

    @staticmethod
    def forward(ctx: Any, x2: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # x is needed only for the gradients of the A_i: with every A_i frozen it is not kept.
        ctx.save_for_backward(x2 if any(ctx.needs_input_grad[1:]) else None, *weights)
        ctx.x_dtype = x2.dtype
        ctx.set_materialize_grads(False)
        return F.linear(x2, torch.cat(weights)).split([w.shape[0] for w in weights], dim=1)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        x2, *weights = ctx.saved_tensors
        grad_x = None
        grad_weights = []
        for i, (g, w) in enumerate(zip(grads, weights)):
            if g is None:
                grad_weights.append(None)
                continue
            # (autocast: g is in the forward's compute dtype, the saved x2 and A_i may not be)
            w_g = w.to(g.dtype)
            if ctx.needs_input_grad[0]:
                grad_x = g @ w_g if grad_x is None else grad_x.addmm_(g, w_g)
            grad_weights.append((g.T @ x2.to(g.dtype)).to(w.dtype) if ctx.needs_input_grad[i + 1] else None)
        return (None if grad_x is None else grad_x.to(ctx.x_dtype), *grad_weights)


def _group_siblings(model: nn.Module) -> None:
    groups: dict[tuple[str, int], list[LoraLayer]] = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and not module.is_embedding:
            groups.setdefault((path.rpartition(".")[0], module.in_features), []).append(module)
    for members in groups.values():
        share = _SharedInput(members) if len(members) > 1 else None
        for module in members:
            module._share = share


def attach(model: nn.Module, name: str, config: LoraConfig, host: Any = None) -> None:
    for path in resolve_targets(model, config.targets, allowed_types=LINEAR_TYPES + (nn.Embedding,)):
        wrap(model, path, LoraLayer).add(name, config)
    _group_siblings(model)


# -- adapter arithmetic ---------------------------------------------------------------------------
# ``PeftModel.add_weighted_adapter`` (HF peft's call) validates the request and delegates here.

# peft's names for the same computations ("svd" first: peft's default).
_PEFT_NAMES = {"ties_svd": "ties", "dare_linear_svd": "dare_linear", "dare_ties_svd": "dare_ties"}
COMBINATION_TYPES = ("svd", "linear", "cat", "ties", "dare_linear", "dare_ties", *_PEFT_NAMES)
# The options each combination type reads; any other option given is refused rather than ignored.
# (``None`` counts as not given, so a peft script's ``svd_rank=None, density=None`` passes.)
_OPTIONS: dict[str, tuple[str, ...]] = {
    "linear": (), "cat": (), "svd": ("svd_rank",),
    "ties": ("svd_rank", "density", "majority_sign_method"),
    "dare_linear": ("svd_rank", "density", "seed"),
    "dare_ties": ("svd_rank", "density", "seed", "majority_sign_method"),
}


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a combination writes: the new adapter's config, the layers that hold it, the options."""

    kind: str
    config: LoraConfig
    layers: list[LoraLayer]
    options: dict[str, Any]


def combine(model: Any, adapters: list[str], weights: list[float], new_name: str, combination_type: str,
            **options: Any) -> None:
    """Add LoRA adapter ``new_name`` to ``model`` (a PeftModel) as a weighted combination of the LoRA
    ``adapters``, with ``w_i = weights[i]``, ``s_i`` adapter i's scale and ``dW_i = s_i B_i A_i``:

    - ``"linear"``: ``A = sum_i w_i A_i``, ``B = sum_i w_i (s_i / s) B_i`` with ``s`` the first adapter's
      scale (the new adapter keeps its r, alpha, rslora; equal scales: plain weighted sums of A and B,
      the form LoRAHub searches over). Needs equal ranks. The new update ``s B A`` is NOT
      ``sum_i w_i dW_i``: it has cross terms ``w_i w_j B_i A_j`` and one adapter with weight ``w``
      gives ``w^2 dW``. (Deviation from peft, whose "linear" puts ``sign(w) sqrt(|w| s_i)`` on A and
      ``sqrt(|w| s_i)`` on B; the two agree when every weight is 1 and the scales are equal.)
    - ``"cat"``: the ranks side by side, ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``, ``B = [B_1, B_2, ...]``,
      rank ``sum r_i``, scale 1: exactly ``sum_i w_i dW_i``.
    - ``"svd"``: ``sum_i w_i dW_i`` re-factorised by ``torch.linalg.svd`` into rank ``svd_rank``
      (default: the largest rank): ``B = U_k S_k``, ``A = V_k^T``, scale 1. Exact when ``svd_rank``
      reaches the rank of the sum (``sum r_i`` always does), the best rank-k approximation otherwise.
    - ``"ties"`` (Yadav et al., 2023, "TIES-Merging"): each task vector ``t_i = w_i dW_i`` keeps its
      top ``density`` fraction of entries by magnitude (trim); each entry's sign is elected as the
      sign of ``sum_i t_i`` (``majority_sign_method="total"``) or of the count of signs
      (``"frequency"``); each entry is the mean of the kept ``t_i`` that agree with it (disjoint
      mean). Then re-factorised as "svd".
    - ``"dare_linear"`` / ``"dare_ties"`` (Yu et al., 2024, "Language Models are Super Mario", DARE):
      each entry of ``t_i`` is dropped with probability ``1 - density`` and the kept ones are
      rescaled by ``1 / density``; then summed ("dare_linear") or elected and disjoint-averaged as
      TIES ("dare_ties"); then re-factorised as "svd". ``seed`` fixes the drops: one CPU generator
      draws ``rand(shape) < density`` per layer (model order), per adapter (the order given).

    ties/dare work on the full ``dW`` as peft's ``*_svd`` types do, and take those names too
    ("ties_svd" is "ties" here; peft's plain "ties"/"dare_*" trim A and B separately). Deviation
    from peft: signs are elected on the weighted task vectors, so a negative weight (task negation)
    flips its vote; with equal positive weights this is peft's election. DoRA adapters combine by "svd"/"ties"/"dare_*" (their whole change of the weight).
    The new adapter is plain LoRA, added inactive; dropout, task_type and inference_mode are the
    first adapter's.

    Raises PeftlabError, before anything is added, when the adapters adapt different layers, ranks
    differ for "linear", an option does not apply or is out of range, or an adapter carries trained
    module copies (``modules_to_save``), which LoRA arithmetic cannot combine.
    """
    plan = _plan(model, adapters, combination_type, options)
    model.add_adapter(new_name, plan.config)
    _write(plan, adapters, [float(w) for w in weights], new_name)


def write_combination(model: Any, adapters: list[str], weights: list[float], name: str,
                      combination_type: str = "linear", **options: Any) -> None:
    """Overwrite, in place, the A and B of adapter ``name`` — made earlier by ``combine`` from the same
    ``adapters`` and ``combination_type`` — with another weighting. A weight search (LoRAHub) calls
    this for every candidate instead of adding and deleting an adapter each time."""
    if len(weights) != len(adapters):
        raise PeftlabError(f"{len(adapters)} adapters and {len(weights)} weights; give one weight per adapter")
    plan = _plan(model, adapters, combination_type, options)
    config = model.peft_configs.get(name)
    if not isinstance(config, LoraConfig) or config.r != plan.config.r or config.scaling != plan.config.scaling:
        raise PeftlabError(f"adapter {name!r} was not made by combining {adapters} by {combination_type!r} "
                           f"(expected a LoRA adapter of rank {plan.config.r}); create it with add_weighted_adapter")
    _write(plan, adapters, [float(w) for w in weights], name)


def _plan(model: Any, adapters: list[str], combination_type: str, options: dict[str, Any]) -> _Plan:
    """Check that ``adapters`` can be combined by ``combination_type``; the new adapter's config."""
    if combination_type not in COMBINATION_TYPES:
        raise PeftlabError(f"unknown combination_type {combination_type!r}; LoRA offers {list(COMBINATION_TYPES)}")
    combination_type = _PEFT_NAMES.get(combination_type, combination_type)
    configs = [model.peft_configs[n] for n in adapters]
    if not adapters or not all(isinstance(c, LoraConfig) for c in configs):
        raise PeftlabError(f"LoRA combines LoRA adapters; got {[type(c).__name__ for c in configs] or 'none'}")
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(_OPTIONS[combination_type]))
    if unknown:
        raise PeftlabError(f"option(s) {unknown} do not apply to combination_type {combination_type!r}, which reads "
                           f"{list(_OPTIONS[combination_type]) or 'no options'}; remove them")
    heads = {n: list(c.modules_to_save) for n, c in zip(adapters, configs) if c.modules_to_save}
    if heads:
        raise PeftlabError(f"adapters {heads} train full copies of modules (modules_to_save), which LoRA arithmetic "
                           "cannot combine; combine adapters without them (target the head with LoRA instead)")
    dora = [n for n, c in zip(adapters, configs) if c.use_dora]
    if dora and combination_type in ("linear", "cat"):
        raise PeftlabError(f"adapters {dora} are DoRA, whose update is not s B A; combine them by 'svd', 'ties' "
                           f"or 'dare_*' (their full weight change), not {combination_type!r}")
    layers = _same_layers(model, adapters)
    ranks = {n: c.r for n, c in zip(adapters, configs)}
    if combination_type == "linear" and len(set(ranks.values())) > 1:
        raise PeftlabError(f"combination_type 'linear' sums A and B, so it needs equal ranks; got r={ranks}. "
                           "Use 'cat' (exact, rank = sum) or 'svd' (rank = svd_rank)")
    svd_rank = options.get("svd_rank", max(ranks.values()))
    if isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1:
        raise PeftlabError(f"svd_rank={svd_rank!r}: expected a positive integer rank (default: the largest rank, "
                           f"{max(ranks.values())})")
    if combination_type in ("ties", "dare_linear", "dare_ties"):
        density = options.get("density")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise PeftlabError(f"{combination_type!r} needs density, the fraction of entries each adapter keeps, "
                               f"in (0, 1] (e.g. density=0.5); got {density!r}")
    if options.get("majority_sign_method", "total") not in ("total", "frequency"):
        raise PeftlabError(f"majority_sign_method={options['majority_sign_method']!r}: expected 'total' or 'frequency'")
    if "seed" in options and (isinstance(options["seed"], bool) or not isinstance(options["seed"], int)):
        raise PeftlabError(f"seed={options['seed']!r}: expected an integer")
    first = configs[0]
    if combination_type == "linear":
        config = dataclasses.replace(first, use_dora=False)
    else:  # the scales are folded into the factors: scale 1
        rank = sum(ranks.values()) if combination_type == "cat" else svd_rank
        config = dataclasses.replace(first, r=rank, alpha=rank, rslora=False, use_dora=False)
    return _Plan(combination_type, config, layers, options)


def _same_layers(model: Any, adapters: list[str]) -> list[LoraLayer]:
    """The LoRA layers of the first adapter; every other adapter must adapt exactly those layers."""
    sites: dict[str, dict[str, LoraLayer]] = {name: {} for name in adapters}
    for path, module in delta_modules(model):
        if isinstance(module, LoraLayer):
            for name in adapters:
                if name in module.settings:
                    sites[name][logical_name(path).removeprefix("base_model.")] = module
    first = adapters[0]
    for name in adapters[1:]:
        extra, missing = sorted(set(sites[name]) - set(sites[first])), sorted(set(sites[first]) - set(sites[name]))
        if extra or missing:
            raise PeftlabError(f"adapters {first!r} and {name!r} adapt different layers ({name!r} has "
                               f"{extra[:4] or 'no others'} in addition, lacks {missing[:4] or 'none'}); only "
                               "adapters with the same targets can be combined")
    return list(sites[first].values())


def _factor_tensors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A: r x in, B: out x r) of adapter ``name``, the tensors themselves (embeddings: in = vocab)."""
    if layer.is_embedding:
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def _update(layer: LoraLayer, name: str) -> torch.Tensor:
    """``dW = s B A`` as out x in (embeddings: dim x vocab), float32, whatever the base layout."""
    delta = layer.delta_weight(name).float()
    return delta.T if layer.transposed or layer.is_embedding else delta


def _write(plan: _Plan, adapters: list[str], weights: list[float], new_name: str) -> None:
    seed = plan.options.get("seed")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for layer in plan.layers:
            a, b = _combined_factors(layer, adapters, weights, plan, generator)
            new_a, new_b = _factor_tensors(layer, new_name)
            new_a.copy_(a)
            new_b.copy_(b)


def _combined_factors(layer: LoraLayer, adapters: list[str], weights: list[float], plan: _Plan,
                      generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The new (A: r x in, B: out x r) of one layer."""
    combination_type = plan.kind
    factors = [[t.float() for t in _factor_tensors(layer, n)] for n in adapters]
    scales = [layer.settings[n] for n in adapters]
    if combination_type == "linear":
        s = plan.config.scaling
        a = sum(w * fa for w, (fa, _) in zip(weights, factors))
        b = sum(w * (si / s) * fb for w, si, (_, fb) in zip(weights, scales, factors))
        return a, b
    if combination_type == "cat":
        a = torch.cat([w * si * fa for w, si, (fa, _) in zip(weights, scales, factors)])
        return a, torch.cat([fb for _, fb in factors], dim=1)
    tasks = [w * _update(layer, n) for w, n in zip(weights, adapters)]
    density = plan.options.get("density", 1.0)
    sign_method = plan.options.get("majority_sign_method", "total")
    if combination_type == "ties":
        merged = _disjoint_merge([_trim(t, density) for t in tasks], sign_method)
    elif combination_type == "dare_linear":
        merged = torch.stack([_drop_and_rescale(t, density, generator) for t in tasks]).sum(0)
    elif combination_type == "dare_ties":
        merged = _disjoint_merge([_drop_and_rescale(t, density, generator) for t in tasks], sign_method)
    else:  # svd
        merged = torch.stack(tasks).sum(0)
    return _low_rank(merged, plan.config.r)


def _trim(task: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim: keep the ``int(density * numel)`` largest-magnitude entries, zero the rest."""
    k = int(density * task.numel())
    keep = torch.zeros(task.numel(), dtype=torch.bool, device=task.device)
    keep[task.abs().reshape(-1).topk(k).indices] = True
    return task * keep.view_as(task)


def _drop_and_rescale(task: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale the kept ones by 1/density, so
    the expected task vector is unchanged."""
    keep = torch.rand(task.shape, generator=generator) < density  # drawn on CPU: one generator, any device
    return task * keep.to(task.device) / density


def _disjoint_merge(tasks: list[torch.Tensor], sign_method: str) -> torch.Tensor:
    """TIES's elect + disjoint mean: per entry, the mean of the task values whose sign is the elected
    one (zeros never vote or count; an entry no task keeps stays 0)."""
    stacked = torch.stack(tasks)  # (n_tasks, out, in)
    votes = stacked.sum(0) if sign_method == "total" else stacked.sign().sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0)
    agree = stacked.sign() == elected
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


def _low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``delta`` (out x in) as ``B A`` with B: out x rank, A: rank x in: the top singular triplets,
    ``B = U S``, ``A = V^T`` (as peft); zero-padded where ``rank`` exceeds ``min(out, in)``."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    b = delta.new_zeros(delta.shape[0], rank)
    a = delta.new_zeros(rank, delta.shape[1])
    b[:, :k] = u[:, :k] * s[:k]
    a[:k] = vh[:k]
    return a, b


SPEC = register(MethodSpec(
    name="lora", title="LoRA", family="reparameterized", subcategory="LoRA", config_cls=LoraConfig,
    trains="low-rank update B A of chosen weight matrices", attach=attach,
    paper="Hu et al. 2022, LoRA: Low-Rank Adaptation of Large Language Models",
    mergeable=True, merge_tolerance=1e-4, peft_type="LORA", default_lr=5e-4, supports_mixed_batch=True,
    combine=combine, combination_types=COMBINATION_TYPES,
))
