"""QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs").

LoRA on a base model whose linear weights are stored in 4 bits and dequantized on the fly::

    h = dequant(W0_nf4) x + (alpha / r) B A x        A, B trained in full precision; W0 frozen, 4-bit

``W0`` is quantized block-wise (64 values share one absmax) to the 4-bit NormalFloat grid (NF4,
quantiles of a normal distribution), and with double quantization the block absmax values are
themselves quantized to 8 bits (blocks of 256). Everything 4-bit is bitsandbytes' (``Linear4bit``,
the layer ``transformers``' ``BitsAndBytesConfig(load_in_4bit=True)`` builds and HF peft's QLoRA
uses): peftlab's in-place quantization gives the very same packed codes as ``transformers``'
4-bit loading, so an adapter moves between the two in either direction.

Placement and defaults follow the paper: every linear layer of the model except the output head
(``targets="all-linear"``), NF4 with double quantization. Deviation: ``r = 8, alpha = 16`` and no
dropout, as peftlab's LoRA (the study's learning rates were measured there); the paper's Guanaco
runs use ``r = 64, alpha = 16, dropout = 0.1`` (pass them for its setting).
The classification head and other ``modules_to_save`` stay in full precision, as transformers keeps
them when told (``llm_int8_skip_modules``).

Two ways in: ``get_peft_model(model, QLoraConfig())`` quantizes a full-precision model in place
(the targets are resolved first, so a bad config changes nothing), or the model comes already
quantized by ``transformers`` and is used as it is (its 4-bit format must match the config's).
The checkpoint is a plain LoRA adapter in peft's layout (the base is re-quantized from the
pretrained weights on load, deterministically): peft loads it on a bitsandbytes-quantized model,
and peft's QLoRA adapters load here as LoRA on a 4-bit model.

Merging is exact: each 4-bit layer becomes a full-precision layer holding ``dequant(W0) + s B A``
(see :func:`peftlab.core.quant.merge_delta`); ``peftlab.quantize_model(merged)`` takes the merged
model back to 4 bits, at the cost of rounding the update to the NF4 grid (peft re-quantizes on
merge, silently; peftlab leaves that choice visible).

Deviations from the paper, and why:
- ``compute_dtype`` defaults to float32, not bfloat16: on the CPU here bitsandbytes' 4-bit matmul
  is no faster in bfloat16 and loses precision; pass ``compute_dtype="bfloat16"`` for the paper's
  setting (on a GPU, do).
- paged optimizers (the paper's third component) exist only on CUDA in bitsandbytes; pass one
  (``bitsandbytes.optim.PagedAdamW``) to your own loop on a GPU. peftlab's loop uses torch AdamW.
- double quantization: bitsandbytes 0.50 runs it on the CPU too, so it is on by default as in
  the paper.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ...core import quant
from ...core.config import PEFTLAB_KEY, peft_names
from ...core.errors import PeftlabError
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, resolve_targets
from . import lora

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@peft_names(**lora.LoraConfig.peft_aliases)
@dataclasses.dataclass(frozen=True)
class QLoraConfig(lora.LoraConfig):
    """LoRA's fields, on every linear layer by default; quant_type: the 4-bit grid ("nf4" or "fp4");
    double_quant: quantize the block scales too; compute_dtype: what the 4-bit layers dequantize to
    for their matmul ("float32", "bfloat16", "float16")."""

    targets: tuple[str, ...] | str | None = "all-linear"
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "float32"

    def validate(self) -> None:
        super().validate()
        self._require(self.quant_type in quant.QUANT_TYPES, "quant_type",
                      f"one of {list(quant.QUANT_TYPES)} (bitsandbytes' 4-bit grids)")
        self._require(isinstance(self.double_quant, bool), "double_quant", "True or False")
        self._require(self.compute_dtype in COMPUTE_DTYPES, "compute_dtype", f"one of {list(COMPUTE_DTYPES)}")

    def quant_fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _QUANT_FIELDS}

    def peft_fields_for(self, model: Any, adapter_name: str) -> dict[str, Any]:
        # peft's LoRA form (peft loads it on a 4-bit model) plus what re-quantizes the base here.
        return {PEFTLAB_KEY: {"method": self.method, **self.quant_fields()}}

    @classmethod
    def from_peft(cls, data: dict[str, Any]) -> "QLoraConfig":
        extras = {k: v for k, v in (data.get(PEFTLAB_KEY) or {}).items() if k != "method"}
        unknown = sorted(set(extras) - set(_QUANT_FIELDS))
        if unknown:
            raise PeftlabError(f"the {PEFTLAB_KEY!r} entry of this QLoRA config has {unknown}; QLoRA reads "
                               f"{list(_QUANT_FIELDS)}")
        return dataclasses.replace(super().from_peft(data), **extras)


_QUANT_FIELDS = ("quant_type", "double_quant", "compute_dtype")


def _four_bit_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if quant.is_bnb_4bit(module)}


def quantize_base(model: nn.Module, config: QLoraConfig) -> None:
    """Quantize ``model`` in place as attaching QLoRA does: every linear layer but the output head and
    the ``modules_to_save``, to ``config.quant_type``."""
    quant.quantize_model(model, config.quant_type, COMPUTE_DTYPES[config.compute_dtype], config.double_quant,
                         skip=tuple(config.modules_to_save))


def attach(model: nn.Module, name: str, config: QLoraConfig, host: Any = None) -> None:
    quant.require_bitsandbytes()
    four_bit = _four_bit_layers(model)
    others = [n for n, m in model.named_modules() if n and quant.is_quantized(m) and not quant.is_bnb_4bit(m)
              and not any(True for _ in m.children())]
    if others:
        raise PeftlabError(f"QLoRA needs bitsandbytes 4-bit base layers, but {others[0]!r} is quantized otherwise "
                           f"({quant.quant_description(model.get_submodule(others[0]))}); load the full-precision "
                           "model and let QLoRA quantize it")
    for layer in four_bit.values():
        quant.keep_format(layer)
    if four_bit:  # quantized already (transformers' BitsAndBytesConfig, or an earlier QLoRA adapter)
        formats = {quant.quant_description(m) for m in four_bit.values()}
        wanted = quant.quant_description_for(config.quant_type, config.double_quant)
        if formats != {wanted}:
            raise PeftlabError(f"the model's 4-bit layers are {sorted(formats)}, but this QLoRA adapter was made for "
                               f"{wanted}; load the full-precision model (QLoRA quantizes it as the adapter expects) or "
                               "set quant_type/double_quant to the model's")
    else:
        # Resolve the targets on the full-precision model first: a bad config changes nothing.
        resolve_targets(model, config.targets, allowed_types=LINEAR_TYPES + (nn.Embedding,))
        quantize_base(model, config)
    lora.attach(model, name, config, host)


SPEC = register(MethodSpec(
    name="qlora", title="QLoRA", family="reparameterized", subcategory="quantization adaptation", config_cls=QLoraConfig,
    trains="low-rank update B A of every linear layer, over 4-bit (NF4) frozen weights", attach=attach,
    paper="Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs",
    mergeable=True, merge_tolerance=1e-4, default_lr=5e-4, quantize_base=quantize_base,
    requires=("bitsandbytes", "quant"),
))
