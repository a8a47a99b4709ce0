"""Quantized base weights: the boundary to bitsandbytes, and the protocol LoRA-family layers use to
read, merge into and restore a quantized base layer.

Two kinds of quantized base layer exist here:

- ``bitsandbytes.nn.Linear4bit`` (NF4 or FP4, 64-value blocks, optional double quantization of the
  block scales): what ``transformers`` builds from ``BitsAndBytesConfig(load_in_4bit=True)`` and what
  :func:`quantize_model` builds in place. The weight is stored packed, two 4-bit codes per byte.
- peftlab's own quantized layers (QA-LoRA's group-wise INT4), which implement the protocol as
  methods: ``dequantized_weight()``, ``merge_delta_(delta) -> undo`` and ``restore_(undo)``.

Merging into a bitsandbytes 4-bit layer is exact: the layer becomes a full-precision ``nn.Linear``
holding ``dequant(W) + delta`` (unmerging puts the 4-bit layer back); quantize the merged model
again with :func:`quantize_model` to deploy it in 4 bits. peftlab's own quantized layers merge in
place (QA-LoRA stays INT4, exactly).

bitsandbytes is optional (``pip install 'peftlab[quant]'``): nothing here imports it before a 4-bit
path is asked for.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .errors import PeftlabError
from .layer import base_of


# On CPUs with AVX512-BF16, bitsandbytes >= 0.49 looks for an optional Hub kernel when it is imported
# and logs a warning when the `kernels` package is absent; its own CPU kernels serve without it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZE = 64  # bitsandbytes' 4-bit block (the QLoRA paper's)


def require_bitsandbytes() -> Any:
    """The bitsandbytes module, or a PeftlabError saying how to install it."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise PeftlabError("4-bit base weights need bitsandbytes, which is not installed; install the extra: "
                           "pip install 'peftlab[quant]'") from err
    return bitsandbytes


def is_bnb_4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear layer (checked by class name, so no import is needed)."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def is_quantized(module: nn.Module) -> bool:
    """Whether the layer under any wrappers stores its weight quantized (bitsandbytes or peftlab's own);
    8-bit bitsandbytes layers count too, so that they are refused rather than treated as fp weights."""
    base = base_of(module)
    return is_bnb_4bit(base) or hasattr(base, "merge_delta_") or type(base).__module__.startswith("bitsandbytes")


def quant_description(module: nn.Module) -> str:
    """How a quantized layer stores its weight, e.g. ``nf4 (double quantization)``."""
    base = base_of(module)
    if is_bnb_4bit(base):
        state = base.weight.quant_state
        return quant_description_for(state.quant_type, bool(state.nested))
    if hasattr(base, "describe"):
        return base.describe()
    return type(base).__name__


def quant_description_for(quant_type: str, double_quant: bool) -> str:
    """What :func:`quant_description` says of a bitsandbytes 4-bit layer made with these settings."""
    return f"{quant_type}{' (double quantization)' if double_quant else ''}"


def weight_numel(param: torch.Tensor) -> int:
    """The number of weights a parameter stands for: a bitsandbytes 4-bit weight packs two in a byte."""
    state = getattr(param, "quant_state", None)
    shape = getattr(state, "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else param.numel()


def buffered_weights(model: nn.Module) -> int:
    """Weights that peftlab's own quantized layers keep as buffers (codes, not parameters): out x in each."""
    return sum(m.in_features * m.out_features for m in model.modules() if hasattr(m, "merge_delta_"))


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight a quantized layer computes with, ``out x in``, in full precision (float32)."""
    base = base_of(module)
    if is_bnb_4bit(base):
        bnb = require_bitsandbytes()
        return bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
    if hasattr(base, "dequantized_weight"):
        return base.dequantized_weight().float()
    raise PeftlabError(f"{type(base).__name__} is not a quantized layer peftlab can read; supported: bitsandbytes "
                       "Linear4bit and peftlab's own quantized layers")


def _params4bit(weight: torch.Tensor, quant_type: str, double_quant: bool) -> Any:
    bnb = require_bitsandbytes()
    param = bnb.nn.Params4bit(weight.detach().float().contiguous().cpu(), requires_grad=False,
                              compress_statistics=double_quant, quant_type=quant_type, blocksize=BLOCKSIZE)
    return param.to(weight.device)  # quantizes (bitsandbytes quantizes on the move to a device)


def quantize_linear(linear: nn.Module, quant_type: str = "nf4", compute_dtype: torch.dtype = torch.float32,
                    double_quant: bool = True) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` computing as ``linear`` (an ``nn.Linear``, or GPT-2's ``Conv1D``,
    whose weight is stored transposed) with its weight quantized. The bias
    stays in full precision and frozen, as transformers' 4-bit loading keeps it."""
    from .targets import Conv1D

    bnb = require_bitsandbytes()
    if quant_type not in QUANT_TYPES:
        raise PeftlabError(f"quant_type={quant_type!r}: bitsandbytes 4-bit offers {list(QUANT_TYPES)}")
    if is_quantized(linear):
        raise PeftlabError(f"{type(base_of(linear)).__name__} is already quantized ({quant_description(linear)}); "
                           "quantize a full-precision model, or use the quantized one as it is")
    if type(linear) is nn.Linear:
        in_features, out_features, source = linear.in_features, linear.out_features, linear.weight
    elif Conv1D and type(linear) is Conv1D:
        (in_features, out_features), source = linear.weight.shape, linear.weight.T
    else:
        raise PeftlabError(f"4-bit quantization replaces nn.Linear (and GPT-2 Conv1D) layers; got "
                           f"{type(linear).__name__}. Narrow the targets to linear layers")
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=linear.bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type=quant_type, device="meta")
    layer.weight = _params4bit(source, quant_type, double_quant)
    keep_format(layer)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    layer.train(linear.training)
    return layer


def keep_format(layer: nn.Module) -> None:
    """Stop bitsandbytes from repacking a 4-bit layer's weight in place for its bfloat16 CPU kernel at
    the first no-grad forward in eval mode (CPUs with AVX512-BF16): the repacking changes the
    layer's numbers between training and evaluation (bfloat16 compute), breaks on layers narrower
    than a 64-value block, and leaves a format the dequantization and merge paths do not read."""
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: nn.Module, quant_type: str = "nf4", compute_dtype: torch.dtype = torch.float32,
                   double_quant: bool = True, skip: tuple[str, ...] = ()) -> list[str]:
    """Replace, in place, every linear layer (``nn.Linear``, GPT-2 ``Conv1D``) of ``model`` except the
    output head, the modules the model keeps in fp32 (``_keep_in_fp32_modules``) and those named in
    ``skip`` (name suffixes, e.g. a classifier trained in full) by a bitsandbytes 4-bit layer, as
    ``transformers`` does when it loads with ``BitsAndBytesConfig(load_in_4bit=True)``. Returns the
    replaced module names. A model that already holds quantized layers is refused, before anything
    changes."""
    from .targets import resolve_targets

    require_bitsandbytes()
    quantized = [n for n, m in model.named_modules() if n and is_quantized(m) and not any(
        is_quantized(c) for c in m.children())]
    if quantized:
        raise PeftlabError(f"the model is already quantized ({len(quantized)} layers, e.g. {quantized[0]!r}: "
                           f"{quant_description(model.get_submodule(quantized[0]))}); quantizing twice would compound "
                           "the rounding. Load the full-precision model to quantize it, or use it as it is")
    # As transformers' 4-bit loading: modules the model keeps in fp32 (T5's ``wo``) stay unquantized.
    keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or ()
    skipped = tuple(s for s in (*skip, *keep_fp32) if s)
    paths = [p for p in resolve_targets(model, "all-linear")
             if not any(p == s or p.endswith("." + s) or f".{s}." in f".{p}." for s in skipped)]
    if not paths:
        raise PeftlabError("the model has no linear layer to quantize (besides its output head and skip="
                           f"{list(skipped)})")
    built = {p: quantize_linear(model.get_submodule(p), quant_type, compute_dtype, double_quant) for p in paths}
    for path, layer in built.items():  # all built first: a failure leaves the model as it was
        _set_module(model, path, layer)
    return paths


def dequantize_model(model: nn.Module) -> list[str]:
    """Replace every bitsandbytes 4-bit layer of ``model`` (also under adapter wrappers) by a
    full-precision ``nn.Linear`` holding its dequantized weight. Returns the replaced module names."""
    done = []
    for path, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if is_bnb_4bit(child):
                setattr(module, child_name, _full_precision(child, dequantized_weight(child)))
                done.append(f"{path}.{child_name}" if path else child_name)
    return done


def merge_delta(wrapper: nn.Module, delta: torch.Tensor) -> Any:
    """Add ``delta`` (out x in) to the weight of the quantized layer under ``wrapper`` (an adapter
    layer whose ``base_layer`` chain ends at it); returns what :func:`restore` needs to put it back.

    peftlab's own quantized layers merge as they define (QA-LoRA: exactly, staying INT4). A
    bitsandbytes 4-bit layer is replaced by a full-precision ``nn.Linear`` holding
    ``dequant(W) + delta``: the merge is exact, and the 4-bit layer is kept for unmerging. (Re-quantizing
    at once, as peft does, would round away updates smaller than the 4-bit step; to deploy the merged
    model in 4 bits, quantize it afterwards with :func:`quantize_model`, which reports nothing silently:
    compare its outputs.)"""
    base = base_of(wrapper)
    if hasattr(base, "merge_delta_"):
        return base.merge_delta_(delta)
    if not is_bnb_4bit(base):
        raise PeftlabError(f"cannot merge into {type(base).__name__}: peftlab merges into bitsandbytes 4-bit layers "
                           "and its own quantized layers; call peftlab.dequantize_model(model) first")
    full = _full_precision(base, dequantized_weight(base) + delta.float())
    _swap_base(wrapper, base, full)
    return _Swapped(base)


class _Swapped:
    """The 4-bit layer a merge replaced by a full-precision one."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer


def restore(wrapper: nn.Module, undo: Any) -> None:
    """Put back the quantized layer (or weight) :func:`merge_delta` changed."""
    base = base_of(wrapper)
    if isinstance(undo, _Swapped):
        _swap_base(wrapper, base, undo.layer)
    else:
        base.restore_(undo)


def _full_precision(layer: nn.Module, weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
    linear.requires_grad_(False)
    linear.train(layer.training)
    return linear


def _swap_base(wrapper: nn.Module, old: nn.Module, new: nn.Module) -> None:
    holder = wrapper
    while holder.base_layer is not old:
        holder = holder.base_layer
    holder.base_layer = new
