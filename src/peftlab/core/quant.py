"""Quantized base weights: the boundary to bitsandbytes, and the protocol LoRA-family layers use to
read, merge into and restore a quantized base layer.

Two kinds of quantized base layer exist here:

- ``bitsandbytes.nn.Linear4bit`` (NF4 or FP4, 64-value blocks, optional double quantization of the
  block scales): what ``transformers`` builds from ``BitsAndBytesConfig(load_in_4bit=True)`` and what
  :func:`quantize_model` builds in place. The weight is stored packed, two 4-bit codes per byte.
- peftlab's own quantized layers (QA-LoRA's group-wise INT4), which implement the protocol as
  methods: ``dequantized_weight()``, ``merge_delta_(delta) -> undo`` and ``restore_(undo)``.

Merging into a 4-bit layer re-quantizes ``dequant(W) + delta`` (the model stays 4-bit, as peft does)
and records the relative re-quantization error; :func:`dequantize_model` first turns 4-bit layers
back into full-precision ``nn.Linear`` when an exact merge is wanted. Unmerging restores the exact
4-bit state saved by the merge (it keeps the packed codes, 1/8 of fp32), so it must undo the most
recent merge first.

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

log = logging.getLogger(__name__)

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZE = 64  # bitsandbytes' 4-bit block (the QLoRA paper's)


def require_bitsandbytes() -> Any:
    """The bitsandbytes module, or a PeftlabError saying how to install it."""
    # On CPUs with AVX512-BF16, bitsandbytes >= 0.49 looks for an optional Hub kernel at import and
    # logs a warning when the `kernels` package is absent; its own CPU kernels serve without it.
    bnb_log = logging.getLogger("bitsandbytes")
    level = bnb_log.level
    bnb_log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as err:
        raise PeftlabError("4-bit base weights need bitsandbytes, which is not installed; install the extra: "
                           "pip install 'peftlab[quant]'") from err
    finally:
        bnb_log.setLevel(level)
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
        return f"{state.quant_type}{' (double quantization)' if state.nested else ''}"
    if hasattr(base, "describe"):
        return base.describe()
    return type(base).__name__


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


def _params4bit(weight: torch.Tensor, quant_type: str, double_quant: bool, like: Any = None) -> Any:
    bnb = require_bitsandbytes()
    param = bnb.nn.Params4bit(weight.detach().float().contiguous().cpu(), requires_grad=False,
                              compress_statistics=double_quant, quant_type=quant_type, blocksize=BLOCKSIZE)
    return param.to(weight.device)  # quantizes (bitsandbytes quantizes on the move to a device)


def quantize_linear(linear: nn.Linear, quant_type: str = "nf4", compute_dtype: torch.dtype = torch.float32,
                    double_quant: bool = True, weight: torch.Tensor | None = None) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` computing as ``linear`` with its weight (or ``weight``, out x in)
    quantized; the bias stays in full precision and frozen, as transformers' 4-bit loading keeps it."""
    bnb = require_bitsandbytes()
    if quant_type not in QUANT_TYPES:
        raise PeftlabError(f"quant_type={quant_type!r}: bitsandbytes 4-bit offers {list(QUANT_TYPES)}")
    if is_quantized(linear):
        raise PeftlabError(f"{type(base_of(linear)).__name__} is already quantized ({quant_description(linear)}); "
                           "quantize a full-precision model, or use the quantized one as it is")
    if type(linear) is not nn.Linear:
        raise PeftlabError(f"4-bit quantization replaces nn.Linear layers; got {type(linear).__name__}. Narrow the "
                           "targets to linear layers")
    source = linear.weight if weight is None else weight
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type,
                              device="meta")
    layer.weight = _params4bit(source, quant_type, double_quant)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    layer.train(linear.training)
    return layer


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: nn.Module, quant_type: str = "nf4", compute_dtype: torch.dtype = torch.float32,
                   double_quant: bool = True, skip: tuple[str, ...] = ()) -> list[str]:
    """Replace, in place, every ``nn.Linear`` of ``model`` except the output head and the modules named
    in ``skip`` (name suffixes, e.g. a classifier trained in full) by a bitsandbytes 4-bit layer, as
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
    skipped = tuple(s for s in skip if s)
    paths = [p for p in resolve_targets(model, "all-linear")
             if type(model.get_submodule(p)) is nn.Linear
             and not any(p == s or p.endswith("." + s) or f".{s}." in f".{p}." for s in skipped)]
    if not paths:
        raise PeftlabError("the model has no nn.Linear layer to quantize (besides its output head and skip="
                           f"{list(skipped)})")
    built = {p: quantize_linear(model.get_submodule(p), quant_type, compute_dtype, double_quant) for p in paths}
    for path, layer in built.items():  # all built first: a failure leaves the model as it was
        _set_module(model, path, layer)
    return paths


def dequantize_model(model: nn.Module) -> list[str]:
    """Replace every bitsandbytes 4-bit layer of ``model`` (also under adapter wrappers) by a
    full-precision ``nn.Linear`` holding its dequantized weight, so that a following merge is exact.
    Returns the replaced module names."""
    done = []
    for path, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if is_bnb_4bit(child):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   device=child.bias.device if child.bias is not None else None)
                with torch.no_grad():
                    linear.weight.copy_(dequantized_weight(child))
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                linear.requires_grad_(False)
                setattr(module, child_name, linear)
                done.append(f"{path}.{child_name}" if path else child_name)
    return done


def merge_delta(module: nn.Module, delta: torch.Tensor) -> Any:
    """Add ``delta`` (out x in) into a quantized layer's weight; returns what :func:`restore` needs to
    put the layer back exactly. A 4-bit bitsandbytes layer is re-quantized (logged with its relative
    error); peftlab's own layers merge as they define (QA-LoRA: exactly, in INT4)."""
    base = base_of(module)
    if hasattr(base, "merge_delta_"):
        return base.merge_delta_(delta)
    if not is_bnb_4bit(base):
        raise PeftlabError(f"cannot merge into {type(base).__name__}: peftlab merges into bitsandbytes 4-bit layers "
                           "and its own quantized layers; call peftlab.dequantize_model(model) first to merge in "
                           "full precision")
    old = base.weight
    state = old.quant_state
    target = dequantized_weight(base) + delta.float()
    base.weight = _params4bit(target, state.quant_type, bool(state.nested))
    error = (dequantized_weight(base) - target).norm() / target.norm().clamp_min(1e-12)
    base.requantization_error = float(error)
    log.info("merged into a %s layer by re-quantizing: relative error %.3g of the merged weight (call "
             "peftlab.dequantize_model first for an exact full-precision merge)", state.quant_type, error)
    return old


def restore(module: nn.Module, undo: Any) -> None:
    """Put back the quantized weight :func:`merge_delta` replaced."""
    base = base_of(module)
    if hasattr(base, "restore_"):
        base.restore_(undo)
    else:
        base.weight = undo
