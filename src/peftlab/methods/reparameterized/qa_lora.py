"""QA-LoRA (Xu, Xie, Gu, Chen, Chang, Zhang, Chen, Zhang and Tian, 2023, "QA-LoRA: Quantization-Aware
Low-Rank Adaptation of Large Language Models", ICLR 2024).

The frozen base weights are quantized group-wise: each output row of ``W`` (out x in) is split into
``in / L`` groups of ``L = group_size`` consecutive input columns, and each (row, group) keeps a float
scale ``alpha`` and a float offset ``beta``::

    W~[o, j] = alpha[o, g(j)] * q[o, j] + beta[o, g(j)]        q in {0 .. 2^bits - 1}, g(j) = j // L

LoRA's input is average-pooled per group, so ``A`` is r x (in / L)::

    h = W~ x + s B A pool(x)        pool(x)[g] = mean of x[g L : (g + 1) L],   s = alpha / r

The update ``dW[o, j] = s (B A)[o, g(j)] / L`` is constant within each group, so merging only moves
the offsets, ``beta' = beta + s (B A) / L``: the merged model stays quantized, with the same codes
and scales, and computes what the unmerged one did (up to float rounding of the offsets) — the
point of the method, against QLoRA, whose merged weight is no longer 4-bit.

Placement, initialisation and defaults, from the paper and its reference code (yuhuixu1993/qa-lora):
every linear layer except the output head (``targets="all-linear"``; GPT-2's ``Conv1D`` layers are
quantized into the same linear form), INT4 with ``group_size = 32`` (the reference's "bits=4,
group-size=32"), ``B = 0`` (identity at init), ``A`` Xavier-uniform as the reference draws it
(plain LoRA draws Kaiming-uniform), and dropout, when set, on the pooled input, as the reference
applies it. ``bits=3`` and ``bits=2`` (the paper's INT3/INT2 rows) store 3- and 2-bit codes the
same way. T5's ``wo``, which transformers keeps in fp32 when it loads a model in 4 bits, is
quantized too: its ``weight`` reads as float32, so T5 still feeds it float32 inputs. Rank and
scale stay LoRA's (``r = 8``, ``alpha = 16``): the reference's ``r = 64``, ``alpha = 16``, lr 2e-4
are LLaMA settings; peftlab's learning rates were measured at LoRA's.

Deviations, and why:
- Quantizer: round-to-nearest min-max per group (``alpha = (max - min) / (2^bits - 1)``,
  ``beta = min``), not GPTQ. A saved adapter holds only A and B and is rebuilt on a fresh
  full-precision model by quantizing it again, which must give the very same codes: RTN is
  deterministic and needs no calibration data, GPTQ needs both data and per-layer Hessians.
- Offsets are floats, not GPTQ's integer zero points (``W = scale (q - zero)``): the merge writes
  ``beta + s B A / L`` exactly, where an integer zero point would have to round it (the reference's
  merge script writes ``s B A / (L scale)`` into GPTQ's zero points).
- Storage is real: two 4-bit codes per byte (``bits`` bytes per 8 codes in general), plus a float32
  scale and offset per group (2 bits per weight at L = 32; GPTQ keeps fp16 scales and packed zeros).
  There is no INT4 matrix-multiply kernel on CPU here, so the forward dequantizes the layer into
  the input's dtype on every call and runs a float GEMM.
- The checkpoint is peftlab's own form (A, B and ``modules_to_save``; no base weights): HF peft's
  QA-LoRA (``LoraConfig(use_qalora=True)``) runs only on GPTQ layers, which peftlab does not
  produce, and multiplies the pooled mean by the number of groups, ``in / L`` (the paper averages),
  so its A and B would compute another update. peft cannot read this file (no ``peft_type``), and
  peftlab's LoRA refuses a peft checkpoint that sets ``use_qalora``.
- The group quantizer is peftlab's own (below) rather than a library's. Checked for this
  (torch 2.13, CPU): torchao 0.18's int4 weight-only config has no CPU layout without an extra
  kernel package; optimum-quanto 0.2.7 (last release 2025-03) and hqq 0.2.8 both store group-wise
  4-bit codes with float offsets on CPU, but the exact merge would write into quanto's private
  ``_shift`` (a field of its weight tensor subclass, in its own group layout) or into hqq's zero
  point, which lives in the code domain (``W = (q - zero) scale``), so moving the weight by ``dW``
  means dividing by the scale (a rounding the float offset avoids); either would also be a new
  required dependency for what they would add here, the packing.

Quantizing happens when the adapter is attached, in place: the targeted layers become
:class:`GroupIntLinear` and stay so when the adapter is disabled, deleted or merged and unloaded
(the full-precision weights are not kept: that is the memory saved). A second adapter, or a load,
reuses layers already quantized with the same group size and bits.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core import quant
from ...core.config import peft_names
from ...core.errors import PeftlabError
from ...core.inject import set_submodule, wrap
from ...core.layer import DeltaModule, base_of, linear_io
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, resolve_targets
from .lora import LoraConfig, LoraLayer, LoraVariant

BITS = (2, 3, 4)


@peft_names(lora_alpha="alpha", target_modules="targets", lora_dropout="dropout", use_rslora="rslora",
            qalora_group_size="group_size")
@dataclasses.dataclass(frozen=True)
class QALoraConfig(LoraConfig):
    """LoRA's r, alpha, dropout, rslora, plus group_size: consecutive input columns that share one
    scale and offset of the quantized base (and one column of A); bits: code width (4; 3 or 2).
    targets default to every linear layer but the output head."""

    targets: tuple[str, ...] | str | None = "all-linear"
    group_size: int = 32
    bits: int = 4

    def validate(self) -> None:
        super().validate()
        self._require(isinstance(self.group_size, int) and self.group_size >= 2, "group_size",
                      "an integer >= 2 that divides every target's input width (the paper's default: 32)")
        self._require(self.bits in BITS, "bits", f"one of {list(BITS)} (INT4 is the paper's main setting)")
        if self.use_dora:
            raise PeftlabError("QALoraConfig.use_dora=True is not supported: DoRA rescales every row of the "
                               "weight, which breaks the group-constant update that keeps the merged model "
                               "quantized; use use_dora=False")

    def variant(self) -> "LoraVariant | None":
        return QALORA

    def peft_fields(self) -> dict[str, Any]:
        return {}  # peftlab's own form only (see the module docstring)


# -- the quantized base layer -------------------------------------------------------------------

def packed_bytes(numel: int, bits: int) -> int:
    """Bytes holding ``numel`` codes of ``bits`` bits: ``bits`` bytes per 8 codes."""
    return -(-numel // 8) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2^bits) as a flat uint8 tensor of ``packed_bytes(numel, bits)`` bytes.

    Widths that divide 8 (4, 2) put ``8 // bits`` codes in each byte, the first in the low bits;
    3-bit codes go 8 to a 24-bit word kept as 3 bytes, little-endian."""
    flat = codes.reshape(-1).to(torch.int64)
    flat = F.pad(flat, (0, (-flat.numel()) % 8))
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, device=flat.device) * bits
        return (flat.view(-1, per_byte) << shifts).sum(1).to(torch.uint8)
    words = (flat.view(-1, 8) << (torch.arange(8, device=flat.device) * bits)).sum(1)
    return ((words[:, None] >> (torch.arange(bits, device=flat.device) * 8)) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The first ``numel`` codes of ``pack_codes``'s output, as uint8."""
    # (One scalar shift per code position: several times faster on CPU than a broadcast shift.)
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        parts = [(packed >> (bits * i)) & mask for i in range(8 // bits)]
    else:
        column = packed.view(-1, bits).to(torch.int32)
        word = column[:, 0]
        for j in range(1, bits):
            word = word | (column[:, j] << (8 * j))
        parts = [((word >> (bits * i)) & mask).to(torch.uint8) for i in range(8)]
    return torch.stack(parts, 1).reshape(-1)[:numel]


def quantize_groups(weight: torch.Tensor, group_size: int,
                    bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest min-max quantization of ``weight`` (out x in) per row and group of
    ``group_size`` consecutive columns: (codes (out x in, uint8), scales, offsets (out x groups,
    float32)) with ``weight ~ scales * codes + offsets``. A constant group keeps its value exactly
    (scale 1, codes 0)."""
    out_features, in_features = weight.shape
    w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    low, high = w.amin(-1), w.amax(-1)
    levels = (1 << bits) - 1
    scales = (high - low) / levels
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round((w - low[..., None]) / scales[..., None]).clamp_(0, levels).to(torch.uint8)
    return codes.reshape(out_features, in_features), scales, low


class GroupIntLinear(nn.Linear):
    """A linear layer whose weight is stored group-wise quantized: ``bits``-bit codes packed into
    ``qweight`` (uint8, ``bits`` bytes per 8 codes: ``out * in / 2`` bytes at INT4), and per output
    row and group of ``group_size`` consecutive inputs a float ``scales`` and ``offsets`` entry
    (out x in/group_size), ``W = scales * q + offsets``. The bias, if any, stays in full precision
    and frozen.

    It is an ``nn.Linear`` (``in_features``, ``out_features``, ``bias``) without a ``weight``
    parameter: ``weight`` reads a dequantized copy, made in inference mode so that code writing
    into it in place (a merge meant for a float weight) fails loudly instead of being lost (it
    cannot enter autograd either: compute with ``dequantized_weight()``, as ``forward`` does). It
    implements peftlab's quantized-layer protocol (:mod:`peftlab.core.quant`): ``dequantized_weight``,
    ``merge_delta_`` (group-constant updates only, moved into the offsets exactly), ``restore_`` and
    ``describe``. Its state dict holds plain tensors. No INT4 kernel runs on CPU here: ``forward``
    dequantizes into the input's dtype per call and runs a float GEMM."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 32, bits: int = 4, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a full-precision weight
        if bits not in BITS:
            raise PeftlabError(f"GroupIntLinear stores {list(BITS)}-bit codes; got bits={bits!r}")
        if group_size < 1 or in_features % group_size:
            raise PeftlabError(f"group_size={group_size} does not divide in_features={in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.bits = group_size, bits
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(packed_bytes(in_features * out_features, bits), dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("offsets", torch.zeros(out_features, groups, dtype=dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_module(cls, module: nn.Module, group_size: int, bits: int) -> "GroupIntLinear":
        """The quantized form of a full-precision ``nn.Linear`` or GPT-2 ``Conv1D`` (whose weight is
        stored in x out); computes the same function up to the rounding of the weight."""
        in_features, out_features, transposed = linear_io(module)
        weight = module.weight.T if transposed else module.weight
        bias = getattr(module, "bias", None)
        layer = cls(in_features, out_features, group_size, bits, bias=bias is not None, device=weight.device)
        with torch.no_grad():
            codes, scales, offsets = quantize_groups(weight, group_size, bits)
            layer.qweight.copy_(pack_codes(codes, bits))
            layer.scales.copy_(scales)
            layer.offsets.copy_(offsets)
            if bias is not None:
                layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        layer.train(module.training)
        return layer

    def codes(self) -> torch.Tensor:
        """The integer codes, out x in (uint8)."""
        return unpack_codes(self.qweight, self.bits, self.in_features * self.out_features).view(
            self.out_features, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scales * q + offsets``, out x in, computed in the scales' dtype, returned in ``dtype``."""
        groups = self.in_features // self.group_size
        codes = self.codes().view(self.out_features, groups, self.group_size).to(self.scales.dtype)
        # In place on the fresh float codes: a broadcast addcmul is ~20x slower on CPU.
        weight = codes.mul_(self.scales[..., None]).add_(self.offsets[..., None]).view(self.out_features,
                                                                                     self.in_features)
        return weight if dtype is None else weight.to(dtype)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        # Model code reads ``.weight`` for its dtype or device (T5's FFN): a dequantized copy,
        # read-only (an inference tensor: in-place writes raise).
        with torch.inference_mode():
            return self.dequantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def describe(self) -> str:
        return (f"int{self.bits}, groups of {self.group_size} inputs (round-to-nearest min-max, float scales and "
                "offsets)")

    def merge_delta_(self, delta: torch.Tensor) -> torch.Tensor:
        """Add ``delta`` (out x in) to the weight by moving the offsets, exactly; returns the old
        offsets (for :meth:`restore_`). Only an update constant within every group can be written
        this way (QA-LoRA's): any other is refused, and the layer is left as it was."""
        shape = (self.out_features, self.in_features)
        if tuple(delta.shape) != shape:
            raise PeftlabError(f"cannot merge an update of shape {tuple(delta.shape)} into a {shape[0]} x {shape[1]} "
                               "quantized layer")
        groups = delta.detach().to(self.offsets.device, torch.float32).view(
            self.out_features, self.in_features // self.group_size, self.group_size)
        per_group = groups[..., 0]
        spread = float((groups - per_group[..., None]).abs().amax())
        if spread > 1e-6 * float(groups.abs().amax()):
            raise PeftlabError(f"QA-LoRA only merges group-constant updates into a group-wise quantized layer, which "
                               f"stays quantized by moving its per-group offsets; this update varies by up to "
                               f"{spread:.3g} within a group of {self.group_size} inputs (plain LoRA on a QA-LoRA "
                               "base, say). Keep that adapter unmerged")
        undo = self.offsets.clone()
        self.offsets.add_(per_group.to(self.offsets.dtype))
        return undo

    def restore_(self, undo: torch.Tensor) -> None:
        """Put back the offsets ``merge_delta_`` replaced (codes and scales never change)."""
        self.offsets.copy_(undo)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}")


# -- the LoRA variant ------------------------------------------------------------------------------

def _group_size(layer: LoraLayer) -> int:
    return base_of(layer.base_layer).group_size


class QALora(LoraVariant):
    """QA-LoRA's adapter on a :class:`GroupIntLinear`: A takes the group means of the input."""

    def add(self, layer: LoraLayer, name: str, config: LoraConfig) -> None:
        base = base_of(layer.base_layer)
        group_size, bits = getattr(config, "group_size", None), getattr(config, "bits", None)
        if not isinstance(base, GroupIntLinear) or (base.group_size, base.bits) != (group_size, bits):
            found = base.describe() if isinstance(base, GroupIntLinear) else type(base).__name__
            raise PeftlabError(f"QA-LoRA adapts layers quantized to int{bits} in groups of {group_size} inputs; this "
                               f"layer is {found}. Add the adapter with QALoraConfig through get_peft_model or "
                               "add_adapter, which quantizes its targets")
        old = layer.lora_A[name].weight
        a = nn.Linear(layer.in_features // group_size, config.r, bias=False, device=old.device, dtype=old.dtype)
        nn.init.xavier_uniform_(a.weight)  # as the reference code (plain LoRA: Kaiming-uniform)
        layer.lora_A[name] = a

    def forward(self, layer: LoraLayer, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        a, b, scale = layer._factors(name)
        pooled = x.to(a.dtype).unflatten(-1, (a.shape[1], _group_size(layer))).mean(-1)
        if name in layer.lora_dropout:
            pooled = layer.lora_dropout[name](pooled)
        return out + (F.linear(F.linear(pooled, a), b) * scale).to(out.dtype)

    def delta_weight(self, layer: LoraLayer, name: str) -> torch.Tensor:
        a, b, scale = layer._factors(name)
        group_size = _group_size(layer)
        return ((b @ a) * (scale / group_size)).repeat_interleave(group_size, dim=1)


QALORA = QALora()


# -- attaching -------------------------------------------------------------------------------------

def _quantize_targets(model: nn.Module, config: QALoraConfig) -> list[str]:
    """Quantize, in place, the full-precision layers ``config.targets`` selects; return every
    target's path. Everything is checked, and every new layer built, before the first is swapped
    in: a refused model is left exactly as it was."""
    paths = resolve_targets(model, config.targets, allowed_types=LINEAR_TYPES)
    todo: list[tuple[str, nn.Module]] = []
    narrow: list[tuple[str, int]] = []
    for path in paths:
        module = model.get_submodule(path)
        base = base_of(module)
        if isinstance(base, GroupIntLinear):
            if (base.group_size, base.bits) != (config.group_size, config.bits):
                raise PeftlabError(f"layer {path!r} is already quantized as {base.describe()}, but this QA-LoRA "
                                   f"adapter asks for int{config.bits} in groups of {config.group_size}; QA-LoRA "
                                   "adapters of one layer share its quantization: use "
                                   f"group_size={base.group_size}, bits={base.bits}")
            continue
        if quant.is_quantized(base):
            raise PeftlabError(f"layer {path!r} is already quantized ({quant.quant_description(base)}); QA-LoRA "
                               "quantizes full-precision weights itself (quantizing twice would compound the "
                               "rounding). Load the full-precision model")
        if isinstance(module, DeltaModule):
            raise PeftlabError(f"layer {path!r} carries adapters {module.adapter_names()} of its full-precision "
                               "weight; QA-LoRA would quantize the weight under them. Add QA-LoRA before them, or "
                               "narrow its targets")
        in_features = linear_io(module)[0]
        if in_features % config.group_size:
            narrow.append((path, in_features))
        todo.append((path, module))
    if narrow:
        widths = sorted({w for _, w in narrow} | {linear_io(m)[0] for _, m in todo})
        common = math.gcd(*widths)
        hint = f" (e.g. {common}, which divides all of {widths})" if common >= 2 else ""
        shown = ", ".join(f"{p!r} (in_features={w})" for p, w in narrow[:3]) + (" ..." if len(narrow) > 3 else "")
        raise PeftlabError(f"QA-LoRA group_size={config.group_size} does not divide the input width of {shown}: each "
                           f"row is split into groups of {config.group_size} consecutive inputs. Pick a group size "
                           f"that divides every target's width{hint}, or narrow the targets")
    for path, module in todo:
        weight = module.weight
        if not bool(torch.isfinite(weight).all()):
            raise PeftlabError(f"layer {path!r} has non-finite weights (NaN or inf), which cannot be quantized")
    built = {path: GroupIntLinear.from_module(module, config.group_size, config.bits) for path, module in todo}
    for path, layer in built.items():
        set_submodule(model, path, layer)
    return paths


def quantize_base(model: nn.Module, config: QALoraConfig) -> None:
    """Quantize a bare model as attaching a QA-LoRA adapter with ``config`` does (its targets become
    :class:`GroupIntLinear`): what the model computes with the adapter disabled or deleted."""
    _quantize_targets(model, config)


def attach(model: nn.Module, name: str, config: QALoraConfig, host: Any = None) -> None:
    for path in _quantize_targets(model, config):
        wrap(model, path, LoraLayer).add(name, config)


# merge_tolerance: merged vs unmerged outputs differ by float rounding of the offsets only; measured at
# most 1.5e-7 on the conformance suite's tiny models and 2e-5 on all-MiniLM-L6-v2 after a few steps of
# training (hidden states up to ~5.6).
SPEC = register(MethodSpec(
    name="qa_lora", title="QA-LoRA", family="reparameterized", subcategory="quantization adaptation", config_cls=QALoraConfig,
    trains="low-rank update B A on group-pooled inputs over a group-wise INT4 base", attach=attach,
    paper="Xu et al. 2023, QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language Models",
    mergeable=True, merge_tolerance=5e-5, default_lr=5e-4, quantize_base=quantize_base,
))
