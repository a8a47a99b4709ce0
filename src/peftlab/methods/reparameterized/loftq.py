"""LoftQ (Li, Yu, Liang, He, Karampatziakis, Chen and Zhao, 2023, "LoftQ: LoRA-Fine-Tuning-aware
Quantization for Large Language Models", ICLR 2024).

QLoRA quantizes ``W`` and starts LoRA at ``B = 0``, so fine-tuning starts from ``dequant(Q) != W``.
LoftQ picks the 4-bit ``Q`` and the LoRA start ``(A, B)`` together, so that ``Q + s B A`` is close to
``W`` (``s`` = alpha / r, or alpha / sqrt(r) with rslora), by ``T`` alternating steps from
``A_0 B_0 = 0``::

    Q_t        = quant(W - s B_{t-1} A_{t-1})                       NF4, blocks of 64 values
    U S V^T    = svd(W - dequant(Q_t)),  kept to rank r
    B_t = U sqrt(S / s),  A_t = sqrt(S / s) V^T                     so that  s B_t A_t = U_r S_r V_r^T

then trains LoRA over the frozen 4-bit base: ``h = dequant(Q_T) x + s B A x``, with ``A = A_T`` and
``B = B_T`` (both trained). ``Q_T`` is held in real 4 bits: bitsandbytes' packed NF4 codes (two per
byte) and one float32 absmax per 64 values, multiplied by bitsandbytes' 4-bit matmul (float32
compute). LoftQ is not the identity at init: ``Q + s B A`` approaches ``W`` but does not equal it
(:func:`loftq_init` gives the factors; its relative error falls with ``T``, below QLoRA's
``||W - dequant(NF4(W))||``).

Placement and defaults follow the paper: every linear layer but the output head
(``targets="all-linear"``; GPT-2's ``Conv1D`` too, its weight read transposed), NF4 with blocks of 64
and no double quantization (the reference code's ``bnb_4bit_use_double_quant=False``, and peft's
LoftQ), ``T = 5`` alternating steps (the reference repository's example; peft's ``LoftQConfig``
defaults to ``loftq_iter=1``: pass ``iterations=1`` for it), no dropout. ``default_lr`` is LoRA's
5e-4 (the paper tunes it per task).

Deviations, and why:

- ``r = 8, alpha = 16`` (scale 2), as peftlab's LoRA and QLoRA: the study's learning rates were
  measured there, and at equal rank and scale LoftQ and QLoRA differ only in ``Q`` and the start of
  ``A``, ``B``. The paper uses ``alpha = r`` (scale 1) at rank 16 or 32 on DeBERTa-base and 8 or 16 on
  BART; pass ``r=16, alpha=16`` for its NLU setting.
- The LoRA scale. The paper's code and peft split the residual as ``B = U sqrt(S)``, ``A = sqrt(S) V^T``
  without the scale, so ``Q + B A ~ W`` holds for the product the layer computes only at
  ``alpha = r`` (the reference code's ``quantize_save.py`` sets it so except for causal LMs, which get
  alpha 16 at any rank: at its released rank 64 the start is off by a factor 4). peftlab divides
  both factors by ``sqrt(s)``: ``Q + s B A ~ W`` at any alpha/r (the default scale is 2), and at
  scale 1 it is the paper's split exactly.
- ``bits`` is 4 only. The paper also runs 2-bit (NF2) and mixed 2/4-bit, but bitsandbytes has no
  2-bit kernel (the reference code "fake-quantizes" 2 bits, keeping the weight in full precision,
  which saves nothing); peft also offers 8-bit (int8 ``Linear8bitLt``), which peftlab's quantized-layer
  protocol (``peftlab.core.quant``) does not read. Both are refused by name. ``quant_type="fp4"``
  (bitsandbytes' other 4-bit grid) is offered beside NF4; the paper's uniform grid is not (no kernel).
- Where ``W`` goes (``keep_full_precision``). By default (False) the paper's and peft's arrangement,
  the memory saving: each targeted layer is replaced at attach by a bitsandbytes ``Linear4bit``
  holding ``Q`` and the full-precision weight is dropped; the 4-bit layer stays when the adapter is
  disabled or deleted (``MethodSpec.quantize_base`` builds that same model from a bare one), and a
  failed load puts the full-precision layers back (the core keeps them until the load succeeds). More
  LoftQ adapters over such a layer must have the same settings (r, scale, T, grid): they share its
  ``Q`` and start from the same ``A``, ``B`` (kept per layer, r (in + out) numbers), which is what
  LoftQ would compute for them from the dropped weight; other settings would need ``W`` and are
  refused, as is a ``Q`` that differs from the layer's when loading. Plain LoRA adapters go on top
  (QLoRA-style). Layers the model keeps in fp32 (T5's ``wo``, left unquantized by transformers' 4-bit
  loading too: T5 casts their input to their weight's dtype) keep their full-precision weight, as
  below, and still compute with ``Q`` while a LoftQ adapter is active. ``keep_full_precision=True``
  keeps the full-precision layer as the base everywhere and holds each LoftQ adapter's own ``Q``
  beside it: an active LoftQ adapter computes with its ``Q`` only, while disabling, deleting or
  unloading it gives the original model back exactly, and LoftQ adapters of any settings share a
  layer (one active at a time). The price: ``W`` stays in memory beside ``Q``, so nothing is saved.
- The checkpoint holds ``Q``. peft keeps LoftQ's ``Q`` in the base model (its users save the
  quantized base separately); an adapter here must load back onto the fresh full-precision model with
  exactly the same outputs, and recomputing ``Q`` from ``W`` at load is deterministic only on one BLAS
  build (the SVD decides the next quantization). So each layer's entry holds ``Q`` packed as it is in
  memory: ``<layer>.loftq_qweight`` (uint8 codes, two per byte) and ``<layer>.loftq_absmax`` (float32,
  one per 64 values), beside ``<layer>.lora_A.weight`` / ``<layer>.lora_B.weight`` in peft's LoRA
  layout. Loading is strict (keys, shapes and dtypes): attaching recomputes a ``Q`` (the core does not
  tell an attach that a load follows, so a load pays one decomposition: 6 s for MiniLM at T = 5 on
  two CPU cores, up to a minute when they are busy), then the saved one replaces it. On MiniLM (r 8, all 37 linear layers) the
  file is 7.4 MB against 1.4 MB for the plain LoRA adapter (5.5x): ``Q`` costs 9/16 byte per base
  weight, 1/7 of the 43 MB of full-precision weights it stands for. The file is written in peftlab's own form
  (``"method": "loftq"``, no ``peft_type``): read as a peft LORA adapter, peft would put ``A`` and
  ``B`` on the full-precision ``W`` and compute ``W + s B A``, not ``Q + s B A``.
- Merging is exact and gives a full-precision model, as peftlab's QLoRA: over the 4-bit base it is
  LoRA's merge into a 4-bit layer (``peftlab.core.quant.merge_delta``: the layer becomes a
  full-precision one holding ``dequant(Q) + s B A``; unmerging puts the 4-bit layer back);
  ``peftlab.quantize_model(merged)`` takes it back to 4 bits, rounding the update to the grid. With
  the full-precision layer kept, merging writes ``dequant(Q) + s B A`` into it and unmerging puts
  ``W`` back bit for bit (a LoftQ adapter merges first in its layer).
- Where it runs. peft's ``loftq_init`` moves every weight to CUDA; here the decomposition runs on the
  weight's own device, so on the CPU too (bitsandbytes 0.50 has CPU NF4 kernels). The 4-bit matmul
  computes in float32 (as peftlab's QLoRA by default), and bitsandbytes' in-place repacking of 4-bit
  weights for its bfloat16 CPU kernel is turned off (it would change the numbers between training and
  evaluation).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ...core import quant
from ...core.config import peft_names
from ...core.errors import CheckpointError, PeftlabError
from ...core.inject import set_submodule, wrap
from ...core.layer import BufferDict, DeltaModule, linear_io
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, logical_name, resolve_targets
from .lora import LoraConfig, LoraLayer

BITS = 4  # what bitsandbytes stores (NF4/FP4); the paper's 2-bit has no kernel there


@peft_names(lora_alpha="alpha", target_modules="targets", lora_dropout="dropout", use_rslora="rslora")
@dataclasses.dataclass(frozen=True)
class LoftQConfig(LoraConfig):
    """LoRA's fields (r, alpha, dropout, rslora; targets default to every linear layer) and LoftQ's:
    bits: 4 (the only width bitsandbytes stores); iterations: the alternating steps T; quant_type: the
    4-bit grid ("nf4", the paper's; or "fp4"); keep_full_precision: False (default) replaces the
    targeted layers by the 4-bit Q (the paper's memory saving), True keeps the full-precision layers
    as the base beside each adapter's Q (exact disable/delete/unload, nothing saved)."""

    targets: tuple[str, ...] | str | None = "all-linear"
    bits: int = 4
    iterations: int = 5
    quant_type: str = "nf4"
    keep_full_precision: bool = False

    def validate(self) -> None:
        super().validate()
        self._require(self.use_dora is False, "use_dora", "False: LoftQ starts plain LoRA factors from the "
                      "quantization residual; DoRA's magnitude and direction have no LoftQ start")
        if self.bits != BITS:
            why = ("bitsandbytes has no 2-bit kernel (the paper's NF2 would have to be simulated in full "
                   "precision, which saves nothing)" if self.bits == 2 else
                   "8-bit bitsandbytes layers (int8) are not read by peftlab's quantized-layer protocol"
                   if self.bits == 8 else "bitsandbytes stores 4-bit weights")
            raise PeftlabError(f"LoftQConfig.bits={self.bits!r} is invalid: expected 4 (NF4/FP4 through "
                               f"bitsandbytes); {why}. Use bits=4")
        self._require(self.iterations >= 1, "iterations",
                      "a positive number of alternating steps T (5 by default; 1 is peft's default)")
        self._require(self.quant_type in quant.QUANT_TYPES, "quant_type",
                      f"one of {list(quant.QUANT_TYPES)} (bitsandbytes' 4-bit grids; the paper's is 'nf4')")

    def peft_fields(self) -> dict[str, Any]:
        # No peft form: peft keeps LoftQ's Q in the base model, so a peft LORA file of A and B alone
        # would load onto the full-precision W and compute W + s B A (see the module docstring).
        return {}


class LoftQInit(NamedTuple):
    """What LoftQ starts a layer from: ``Q`` (packed 4-bit codes and block scales) and ``A``, ``B``."""

    qweight: torch.Tensor  # uint8, ((out * in + 1) // 2, 1): two 4-bit codes per byte
    absmax: torch.Tensor   # float32, one scale per 64-value block
    lora_A: torch.Tensor   # r x in, float32
    lora_B: torch.Tensor   # out x r, float32


_CODES: dict[tuple[str, str], torch.Tensor] = {}


def _quant_state(absmax: torch.Tensor, shape: tuple[int, int], quant_type: str) -> Any:
    """bitsandbytes' description of a 4-bit weight of ``shape`` (out x in) with block scales ``absmax``."""
    bnb = quant.require_bitsandbytes()
    key = (quant_type, str(absmax.device))
    if key not in _CODES:
        _CODES[key] = bnb.functional.get_4bit_type(quant_type, device=absmax.device)
    return bnb.functional.QuantState(absmax=absmax, shape=torch.Size(shape), code=_CODES[key],
                                     blocksize=quant.BLOCKSIZE, quant_type=quant_type, dtype=torch.float32)


def dequantize(qweight: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int],
               quant_type: str = "nf4") -> torch.Tensor:
    """The float32 weight (out x in) that packed 4-bit codes and their block scales stand for."""
    return quant.require_bitsandbytes().functional.dequantize_4bit(qweight, _quant_state(absmax, shape, quant_type))


@torch.no_grad()
def loftq_init(weight: torch.Tensor, r: int, iterations: int, scale: float = 1.0, quant_type: str = "nf4") -> LoftQInit:
    """LoftQ's alternating quantization and rank-r SVD of ``weight`` (out x in), in float32 on the
    weight's device; ``scale`` is the LoRA scale the layer multiplies ``B A`` by, so that
    ``dequant(Q) + scale * B A`` approximates ``weight``. Ranks beyond ``min(out, in)`` are zero."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise PeftlabError(f"iterations={iterations!r}: LoftQ needs at least one alternating step")
    if not scale > 0:
        raise PeftlabError(f"scale={scale!r}: the LoRA scale must be positive")
    functional = quant.require_bitsandbytes().functional
    w = weight.detach().float()
    low = torch.zeros_like(w)  # s B_{t-1} A_{t-1}
    for _ in range(iterations):
        qweight, state = functional.quantize_4bit(w - low, blocksize=quant.BLOCKSIZE, compress_statistics=False,
                                                  quant_type=quant_type)
        u, s, vh = torch.linalg.svd(w - functional.dequantize_4bit(qweight, state), full_matrices=False)
        k = min(r, s.numel())
        low = (u[:, :k] * s[:k]) @ vh[:k]
    root = (s[:k] / scale).sqrt()
    lora_b = w.new_zeros(w.shape[0], r)
    lora_a = w.new_zeros(r, w.shape[1])
    lora_b[:, :k] = u[:, :k] * root
    lora_a[:k] = root[:, None] * vh[:k]
    return LoftQInit(qweight, state.absmax.float(), lora_a, lora_b)


def _weight_out_in(module: nn.Module) -> torch.Tensor:
    _, _, transposed = linear_io(module)
    return module.weight.T if transposed else module.weight


def four_bit_layer(original: nn.Module, init: LoftQInit, quant_type: str) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` computing ``dequant(Q) x + bias`` for the full-precision layer
    ``original`` (Linear or Conv1D), holding ``init``'s very codes and scales (no copy)."""
    bnb = quant.require_bitsandbytes()
    in_features, out_features, _ = linear_io(original)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=original.bias is not None, compute_dtype=torch.float32,
                              compress_statistics=False, quant_type=quant_type, device="meta")
    _set_codes(layer, init.qweight, init.absmax, quant_type)
    if original.bias is not None:
        layer.bias = nn.Parameter(original.bias.detach().clone(), requires_grad=False)
    quant.keep_format(layer)
    layer.train(original.training)
    return layer


def _set_codes(layer: nn.Module, qweight: torch.Tensor, absmax: torch.Tensor, quant_type: str) -> None:
    bnb = quant.require_bitsandbytes()
    state = _quant_state(absmax, (layer.out_features, layer.in_features), quant_type)
    layer.weight = bnb.nn.Params4bit(qweight, requires_grad=False, quant_state=state, blocksize=quant.BLOCKSIZE,
                                     compress_statistics=False, quant_type=quant_type, bnb_quantized=True, module=layer)


class _ScaleDict(BufferDict):
    """Block scales: they follow the module's device moves but stay float32 through dtype casts
    (``model.half()``), as bitsandbytes keeps a 4-bit layer's scales."""

    def _apply(self, fn: Any, recurse: bool = True) -> "_ScaleDict":
        for key, tensor in list(self._buffers.items()):
            if tensor is not None:
                device = fn(torch.empty(0, device=tensor.device)).device
                self._buffers[key] = tensor.to(device)
        return self


class LoftQLayer(LoraLayer):
    """A Linear/Conv1D layer with LoftQ adapters (and any plain LoRA adapters added over them).

    Each LoftQ adapter holds a frozen 4-bit ``Q`` (``loftq_qweight``, ``loftq_absmax``) and trained
    ``lora_A``/``lora_B``. Released (``keep_full_precision=False``, the default), ``base_layer`` is the
    bitsandbytes ``Linear4bit`` holding ``Q``, and the LoftQ adapters of the layer share it (their
    buffers are its very tensors). Kept, ``base_layer`` is the full-precision layer, each LoftQ adapter
    has its own ``Q``, and the active one computes ``dequant(Q) x + bias + s B A x`` instead of it.
    """

    frozen_attrs = ("loftq_qweight", "loftq_absmax")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.loftq_qweight = BufferDict()
        self.loftq_absmax = _ScaleDict()
        self.quant_types: dict[str, str] = {}
        self.released = False  # the base is LoftQ's Linear4bit: the full-precision layer is gone
        # A released layer's LoftQ start: (settings, A, B) that came with its Q, for a second LoftQ
        # adapter of the same settings; None once a checkpoint's Q replaced the one computed here.
        self.start: tuple[tuple[Any, ...], torch.Tensor, torch.Tensor] | None = None
        self._overwritten: dict[str, torch.Tensor] = {}  # full-precision weights a merge overwrote

    def add_loftq(self, name: str, config: LoftQConfig, init: LoftQInit, four_bit: nn.Module | None = None) -> None:
        """Add LoftQ adapter ``name`` starting from ``init``; ``four_bit`` (built from ``init`` by
        :func:`four_bit_layer`) replaces the full-precision layer (``keep_full_precision=False``)."""
        # Factors built on the meta device (no random draws), then given LoftQ's start, in float32.
        a = nn.Linear(self.in_features, config.r, bias=False, device="meta")
        b = nn.Linear(config.r, self.out_features, bias=False, device="meta")
        a.weight = nn.Parameter(init.lora_A.detach().clone().float())
        b.weight = nn.Parameter(init.lora_B.detach().clone().float())
        self.lora_A[name], self.lora_B[name] = a, b
        if config.dropout > 0:
            self.lora_dropout[name] = nn.Dropout(config.dropout)
        self.settings[name] = config.scaling
        self.loftq_qweight[name] = init.qweight
        self.loftq_absmax[name] = init.absmax
        self.quant_types[name] = config.quant_type
        if four_bit is not None:
            self.base_layer = four_bit
            self.transposed = False  # a Linear4bit holds out x in whatever the layer it replaced held
            self.released = True
            self.start = (start_settings(config), init.lora_A.detach().clone(), init.lora_B.detach().clone())

    def shared_init(self, config: LoftQConfig) -> LoftQInit:
        """A released layer's ``Q`` (the same tensors) and the LoftQ start that came with it, for one
        more LoftQ adapter of the same settings: what LoftQ computes from the weights it replaced."""
        first = next(iter(self.loftq_qweight.keys()), None)
        qweight = self.loftq_qweight[first] if first is not None else self.base_layer.weight.data
        absmax = self.loftq_absmax[first] if first is not None else self.base_layer.weight.quant_state.absmax
        _, a, b = self.start
        return LoftQInit(qweight, absmax, a.clone(), b.clone())

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)  # unmerges it first if merged
        self.quant_types.pop(name, None)
        # A released layer stays 4-bit: the full-precision weights are gone (the memory saved).

    def _can_share(self, x: torch.Tensor) -> bool:
        return False  # LoRA's joint down-projection across siblings assumes plain LoRA layers

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        own = [n for n in self.live_adapters() if n in self.loftq_qweight]
        if self.released or not own:  # the base computes as the adapters' Q, or no Q is live
            return super().forward(x, *args, **kwargs)
        if len(own) > 1:
            raise PeftlabError(f"adapters {own} are LoftQ adapters of one layer, each with its own quantized "
                               "weight; activate one of them at a time")
        live = self.live_adapters()
        if self.mixed_batch is not None or any(n in self.variants for n in live):
            raise PeftlabError(f"LoftQ adapter {own[0]!r} replaces this layer's weight: it serves neither mixed "
                               "batches nor LoRA variants (DoRA) active beside it")
        out = self._quantized_forward(own[0], x)
        for name in live:
            a, b, scale = self._factors(name)
            h = self.lora_dropout[name](x) if name in self.lora_dropout else x
            out = out + (F.linear(F.linear(h.to(a.dtype), a), b) * scale).to(out.dtype)
        return out

    def _quantized_forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``dequant(Q) x + bias`` by bitsandbytes' 4-bit matmul, computed in float32 as the
        ``Linear4bit`` of a released layer computes it."""
        bias = self.base_layer.bias
        state = _quant_state(self.loftq_absmax[name], (self.out_features, self.in_features), self.quant_types[name])
        out = quant.require_bitsandbytes().matmul_4bit(x.float(), self.loftq_qweight[name], quant_state=state,
                                          bias=None if bias is None else bias.float())
        return out.to(x.dtype)

    def dequantized(self, name: str) -> torch.Tensor:
        """LoftQ adapter ``name``'s ``dequant(Q)``, out x in, float32."""
        return dequantize(self.loftq_qweight[name], self.loftq_absmax[name], (self.out_features, self.in_features),
                          self.quant_types[name])

    # -- merging ------------------------------------------------------------------------
    def merge(self, name: str) -> None:
        if name not in self.loftq_qweight or self.released:
            super().merge(name)  # plain LoRA, or the 4-bit base of a released layer: LoRA's merge
            return
        if self.merged_adapters:
            raise PeftlabError(f"LoftQ adapter {name!r} replaces the layer's weight, so it merges first; "
                               f"unmerge {self.merged_adapters} before merging it")
        weight = self.base_layer.weight
        with torch.no_grad():
            a, b, scale = self._factors(name)
            merged = self.dequantized(name) + scale * (b.float() @ a.float())
            self._overwritten[name] = weight.detach().clone()
            weight.copy_((merged.T if self.transposed else merged).to(weight.dtype))
        self.merged_adapters.append(name)

    def unmerge(self, name: str) -> None:
        if name not in self._overwritten:
            super().unmerge(name)
            return
        if self.merged_adapters[-1] != name:
            raise PeftlabError(f"merged adapters {self.merged_adapters} unmerge in reverse order: unmerge "
                               f"{self.merged_adapters[-1]!r} before LoftQ adapter {name!r}")
        with torch.no_grad():
            self.base_layer.weight.copy_(self._overwritten.pop(name))
        self.merged_adapters.remove(name)

    # -- checkpoint ---------------------------------------------------------------------
    def load_adapter_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        if name in self.loftq_qweight:
            for key, dtype, what in (("loftq_qweight", torch.uint8, "packed 4-bit codes"),
                                     ("loftq_absmax", torch.float32, "float32 block scales")):
                if tensors[key].dtype != dtype:
                    raise CheckpointError(f"{key} holds {tensors[key].dtype}, expected {dtype} ({what}); the file is "
                                          "damaged or was not written by peftlab's LoftQ")
            if bool((tensors["loftq_absmax"] < 0).any()):
                raise CheckpointError("loftq_absmax holds a negative block scale (absolute maxima are >= 0); the "
                                      "file is damaged")
            if self.released:
                same = all(torch.equal(tensors[key].to(getattr(self, key)[name].device), getattr(self, key)[name])
                           for key in self.frozen_attrs)
                others = [n for n in self.loftq_qweight.keys() if n != name]
                if not same and others:
                    raise CheckpointError(f"loftq_qweight differs from the 4-bit weight this layer holds, which LoftQ "
                                          f"adapters {others} share: the adapter was trained over another Q. Load it "
                                          "onto a fresh full-precision model (or with keep_full_precision=True)")
                if not same:  # the checkpoint's Q replaces the one computed here, and with it its start
                    self.start = None
        super().load_adapter_state(name, tensors)
        if self.released:
            self._share_codes()

    def _share_codes(self) -> None:
        """Point a released layer's ``Linear4bit`` and its LoftQ adapters at one set of codes and
        scales again (a device move copies each of them separately)."""
        names = list(self.loftq_qweight.keys())
        if not names or not quant.is_bnb_4bit(self.base_layer):
            return
        first = names[0]
        for name in names[1:]:
            self.loftq_qweight[name], self.loftq_absmax[name] = self.loftq_qweight[first], self.loftq_absmax[first]
        _set_codes(self.base_layer, self.loftq_qweight[first], self.loftq_absmax[first], self.quant_types[first])

    def _apply(self, fn: Any, recurse: bool = True) -> "LoftQLayer":
        super()._apply(fn, recurse)
        if self.released:
            self._share_codes()
            if self.start is not None:
                settings, a, b = self.start
                device = self.base_layer.weight.device
                self.start = (settings, a.to(device), b.to(device))
        return self


def start_settings(config: LoftQConfig) -> tuple[Any, ...]:
    """What decides LoftQ's Q and start for a given weight."""
    return (config.r, config.scaling, config.iterations, config.quant_type)


# -- attaching ----------------------------------------------------------------------------
def _loftq_layer(module: nn.Module) -> LoftQLayer | None:
    """The LoftQ layer at or under ``module`` (inside other methods' wrappers), if any."""
    while isinstance(module, DeltaModule) and hasattr(module, "base_layer"):
        if isinstance(module, LoftQLayer):
            return module
        module = module.base_layer
    return None


def _describe(config: LoftQConfig) -> str:
    return (f"r={config.r}, scale {config.scaling:g}, iterations={config.iterations}, "
            f"quant_type={config.quant_type!r}")


def _kept_in_fp32(model: nn.Module, path: str) -> bool:
    """Whether the model keeps this module in fp32 (T5's ``wo``: its FFN casts its input to the
    dtype of ``wo.weight``, which a 4-bit layer would make uint8); transformers' 4-bit loading leaves
    such modules unquantized, and so does ``quantize_model``."""
    name = logical_name(path)
    return any(name == s or name.endswith("." + s) or f".{s}." in f".{name}."
               for s in getattr(model, "_keep_in_fp32_modules", None) or () if s)


def _plan(model: nn.Module, config: LoftQConfig) -> list[tuple[str, nn.Module | None, LoftQInit, bool]]:
    """Every targeted layer checked, then its LoftQ start computed (or, on a released layer, taken
    from the ``Q`` it holds): (path, full-precision layer or None, init, whether to release it).
    Nothing in the model changes here, so a refusal leaves it as it was."""
    quant.require_bitsandbytes()
    paths = resolve_targets(model, config.targets, allowed_types=LINEAR_TYPES)
    holders: list[tuple[str, nn.Module | None, LoftQLayer | None, bool]] = []
    for path in paths:
        module = model.get_submodule(path)
        layer = _loftq_layer(module)
        release = not config.keep_full_precision and not _kept_in_fp32(model, path)
        if layer is not None and layer.released:
            if layer.merged_adapters:
                raise PeftlabError(f"{path!r} has merged adapters {layer.merged_adapters}; unmerge_adapter() before "
                                   "adding a LoftQ adapter")
            if config.keep_full_precision:
                raise PeftlabError(f"{path!r} holds LoftQ's 4-bit weight; its full-precision weight was released, "
                                   "so keep_full_precision=True cannot apply. Load the full-precision model")
            if layer.start is None or layer.start[0] != start_settings(config):
                made = ("a checkpoint's Q" if layer.start is None else
                        "LoftQ with r={}, scale {:g}, iterations={}, quant_type={!r}".format(*layer.start[0]))
                raise PeftlabError(f"{path!r} holds a 4-bit weight made by {made}; another LoftQ adapter over it "
                                   f"must have the same settings (got {_describe(config)}) since the full-precision "
                                   "weight a new Q would need is gone. Match them, add plain LoRA over it, or load "
                                   "the full-precision model")
            holders.append((path, None, layer, False))
            continue
        if quant.is_quantized(module):
            raise PeftlabError(f"{path!r} is already quantized ({quant.quant_description(module)}); LoftQ quantizes "
                               "full-precision weights itself (its Q depends on the LoRA start, and quantizing twice "
                               "compounds the rounding). Load the full-precision model; on a 4-bit model use QLoRA")
        holder = layer.base_layer if layer is not None else module
        if isinstance(holder, DeltaModule):
            raise PeftlabError(f"{path!r} is wrapped by another adapter ({type(holder).__name__}); LoftQ replaces the "
                               "weight the layer computes with, so it must sit directly on the linear layer: add "
                               "LoftQ adapters before other methods' adapters on the same layers")
        if layer is not None and layer.merged_adapters:
            raise PeftlabError(f"{path!r} has merged adapters {layer.merged_adapters}, so its weight is not the "
                               "pretrained one; unmerge_adapter() before adding a LoftQ adapter")
        if layer is not None and release and layer.adapter_names():
            raise PeftlabError(f"{path!r} holds adapters {layer.adapter_names()} that compute with its full-precision "
                               "weight, which keep_full_precision=False would drop. Add this adapter with "
                               "keep_full_precision=True, or to a fresh model")
        holders.append((path, holder, None, release))
    return [(path, holder, layer.shared_init(config) if layer is not None else
             loftq_init(_weight_out_in(holder), config.r, config.iterations, config.scaling, config.quant_type),
             release) for path, holder, layer, release in holders]


def attach(model: nn.Module, name: str, config: LoftQConfig, host: Any = None) -> None:
    plan = _plan(model, config)
    # Everything that can fail is done: build the 4-bit layers, then install (no half-changed model).
    four_bit = [four_bit_layer(holder, init, config.quant_type) if release else None
                for _, holder, init, release in plan]
    for (path, _, init, _), layer in zip(plan, four_bit):
        wrap(model, path, LoftQLayer).add_loftq(name, config, init, layer)


def quantize_base(model: nn.Module, config: LoftQConfig) -> None:
    """Make a bare model what a disabled or deleted LoftQ adapter of ``config`` computes as: each
    targeted layer replaced by the ``Linear4bit`` holding the ``Q`` attaching computes (deterministic
    for the same weights); unchanged when the full-precision layers are kept."""
    if config.keep_full_precision:
        return
    plan = _plan(model, config)
    built = [(path, four_bit_layer(holder, init, config.quant_type)) for path, holder, init, release in plan if release]
    for path, layer in built:
        set_submodule(model, path, layer)


SPEC = register(MethodSpec(
    name="loftq", title="LoftQ", family="reparameterized", subcategory="quantization adaptation", config_cls=LoftQConfig,
    trains="low-rank update B A of every linear layer, started by LoftQ from the residual of its 4-bit (NF4) weight",
    attach=attach,
    paper="Li et al. 2023, LoftQ: LoRA-Fine-Tuning-aware Quantization for Large Language Models",
    mergeable=True, merge_tolerance=1e-5, identity_at_init=False, default_lr=5e-4, quantize_base=quantize_base,
    requires=("bitsandbytes", "quant"),
))
