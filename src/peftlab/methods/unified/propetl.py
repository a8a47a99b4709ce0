"""ProPETL (Zeng, Zhang and Lu, 2023, "One Network, Many Masks: Towards More Parameter-Efficient
Transfer Learning", ACL).

ONE small PETL module, the *prototype*, is shared by every layer; each layer uses its own sub-network
of it, chosen by a learned binary mask. With ``P`` a masked prototype tensor and ``S_l`` layer l's
real-valued scores (same shape as ``P``)::

    M_l = 1[|S_l| among the top ``density`` fraction of |S_l|]       (per tensor, exactly k entries kept)
    layer l uses  P (.) M_l                                           ((.) elementwise)
    dL/dS_l := dL/dM_l * sign(S_l)  with  dL/dM_l = dL/d(P (.) M_l) (.) P      (straight-through estimator)

Prototype and scores train together (the scores at ``mask_lr_ratio`` times the learning rate).

Forms (``form``):
- ``"adapter"`` (ProAdapter, the paper's headline): the prototype is a bottleneck adapter
  ``h <- h + (W_up (.) M_up) f((W_down (.) M_down) h + b_down) + b_up`` after the FFN output projection
  (Pfeiffer placement, ``@ffn_out``). The two weight matrices are masked; the two biases are shared as
  they are (the reference's ``forward_with_mask``).
- ``"lora"`` (ProLoRA): the prototype is a LoRA pair,
  ``h <- W0 x + (alpha / r) (B (.) M_B)(A (.) M_A) x``, on the query and value projections.
- ``"prefix"`` (ProPrefix): the prototype is ONE prefix ``P = MLP(P')`` of shape (p, 2 * kv_heads * d_h),
  ``MLP(x) = W2 tanh(W1 x + b1) + b2`` (prefix tuning's reparameterisation, P' (p, d) trained); layer l
  attends over ``P (.) M_l`` (its first half the p prefix keys, the second the p values), placed in
  front of its keys/values by peftlab's prefix tuning (``prefix_tuning.PrefixKV``: its attention hook,
  sites, masks, eager/sdpa, KV cache). The mask sits on the prefix key/value vectors (the MLP's
  output), not on the MLP's weights: the reference's ``SharePrefixTuning.extend_prefix``, whose
  ``PrefixSubnet`` holds one (L, p, 2d) score tensor, top-k per layer.

One prototype per entry of ``targets``: every module that entry selects (one per layer) shares it, so
the default adapter has one prototype for all layers and the LoRA form one for all queries and one
for all values (as the reference). All modules an entry selects must have the same shape. The prefix
form has one prototype for every attention module its targets (and, on encoder-decoder models with
``cross_attention``, the cross-attentions) select, as ``prefix_tuning.prefixed_modules`` orders them.

Storage (the paper's accounting): the prototype in floats plus one BIT per masked prototype entry per
layer. The checkpoint holds exactly that: the prototype (``propetl_prototype.<i>.<tensor>``, top level)
and each layer's masks as packed bits (``propetl_mask.<tensor>.bits``, uint8, ``ceil(n/8)`` bytes,
entry ``8k+i`` in bit ``i`` of byte ``k``). The real-valued scores are training state and are not
saved: loading sets each kept entry's score to the init bound ``b`` and each dropped one to ``b / 2``,
which reproduces the mask exactly (a mask whose number of kept entries is not this adapter's ``k``
is refused) and lets resumed training move them again. The parameter report's "trainable" counts the
scores too (they are what trains); the stored size is the smaller number below. The prefix form
stores the prototype the layers read, the MLP's output ``propetl_prototype.0.prefix`` (p, W), and
layer l's mask as ``propetl_mask.prefix.<l>.bits`` (l in ``prefixed_modules`` order); P' and the MLP
are a training device and are folded away (loading, or ``fold()``, leaves the prototype as one
parameter), as ``prefix_tuning`` stores its prefix.

On a MiniLM-size BERT (hidden 384, FFN 1536, 6 layers), defaults (adapter, m = 384 // 12 = 32):
prototype 2*384*32 + 32 + 384 = 24,992 floats; masks 6 * 2*384*32 = 147,456 bits (18,432 bytes);
stored 24,992 + 147,456 / 32 = 29,600 float-equivalents (118,400 bytes); trained (prototype + scores)
172,448. A plain Pfeiffer adapter of the same width stores 6 * 24,992 = 149,952 floats.
Prefix form (p = 64, W = 2 * 384 = 768, MLP width 512): prototype 64 * 768 = 49,152 floats; masks
6 * 49,152 = 294,912 bits (36,864 bytes); stored 49,152 + 294,912 / 32 = 58,368 float-equivalents
(233,472 bytes); trained P' 24,576 + MLP 197,120 + 393,984 + scores 294,912 = 910,592. Plain prefix
tuning's stored prefix at p = 64 is 6 * 49,152 = 294,912 floats.

Defaults (source: the authors' code, github.com/ChaosCodes/ProPETL, ``propetl-roberta``:
``scripts/run_adapter.sh``, ``scripts/run_lora.sh``, ``adapters/modeling.py``, ``adapters/trainer.py``):
- adapter: Pfeiffer placement, reduction factor 12, ReLU, weights ~ N(0, 0.02^2) ("bert" init),
  biases zero; density 0.5; learning rate 1e-4 and mask learning rate 3e-3 (ratio 30); weight decay
  0.1 on prototype and scores alike (the optimizer's weight_decay is used for the scores).
- lora: r = 32, alpha = 48, A Kaiming-uniform (a = sqrt 5), B zero; density 0.1; learning rate 1e-4,
  mask learning rate 3e-2 (ratio 300).
- prefix (``scripts/run_prefix.sh``, ``adapters/prefix_tuning.py``, ``adapters/configuration.py``):
  on every self-attention; prefix length 64; density 0.1 (``--sparsity 0.1``); learning rate 1e-4
  and mask learning rate 1e-4 (ratio 1); weight decay 0.1; MLP width 512 (``bottleneck_size``) with
  tanh, no dropout; P' ~ N(0, 1) (an ``nn.Embedding``), the MLP's Linear layers PyTorch's default init.
- scores ~ U(-1/sqrt(f), 1/sqrt(f)), the reference's ``kaiming_uniform_(a=sqrt(5))`` of its mask
  tensors: f = the weight's output width for the adapter (the reference keeps those masks transposed),
  f = dim 1 for LoRA's A (in) and B (r), f = p * W for the prefix (the fan-in of its (L, p, W) tensor).
- ``default_lr`` is 1e-4, the reference's (and paper's) prototype learning rate on RoBERTa-base.

Deviations, each with its reason:
- ``density`` is the fraction of entries each mask KEEPS. The reference's flag is called ``sparsity``
  but its top-k keeps that fraction (``GetSubnet``: the lowest ``int((1 - k) n)`` scores are zeroed), so
  the reference's ``--sparsity 0.5`` / ``0.1`` are ``density`` 0.5 / 0.1 here; the name says what it does.
- The adapter sits on the FFN output projection's output, before the block's residual add and
  LayerNorm (peftlab's Pfeiffer placement, as ``residual_adapter`` ``ffn_out``); the reference's
  Pfeiffer adapter reads ``LN(h + x)`` and re-applies the block's LayerNorm, which a wrapper of one
  projection cannot do.
- Several ``targets`` entries with the adapter form get one prototype each; the reference's Houlsby
  variant would share one between the attention and FFN sites.
- Sharing one prototype across several tasks (each task its own masks, the paper's multi-task T5
  setting) is not offered: here each adapter name has its own prototype.
- Prefix form, GQA models: W = 2 * kv_heads * d_h (the reference assumes W = 2 * hidden, the same on
  models without GQA). Positions follow the reference (adapter-transformers, which leaves them as they
  are: [CLS] stays at 0), not peftlab's ``prefix_tuning``, which starts the real tokens at position p
  (Li & Liang's and peft's convention); the attention hook and masks are prefix tuning's either way.
- Prefix form on encoder-decoder models: one prototype for the encoder self-, decoder self- and
  cross-attentions together (``cross_attention=False`` leaves the last out); adapter-transformers
  would build one per location (encoder / decoder / cross), a case the reference (RoBERTa only)
  never runs. Only one prefix method per model: a prefix-tuning adapter and a ProPrefix one would
  hook the same attention modules, so the second is refused.
- Not mergeable (the adapter form is nonlinear; the spec declares one capability for both forms).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import PeftConfig, is_positive_int
from ...core.errors import CheckpointError, PeftlabError
from ...core.hooks import TrainingHooks
from ...core.inject import wrap
from ...core.layer import DeltaModule, built_once_without_grad, linear_io
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, resolve_targets
from ..additive.prefix_tuning import PrefixKV, PrefixTuningConfig, prefixed_modules
from ..additive.prompt_tuning import bind_arguments, given_cache
from ..additive.sequential_adapter import ACTIVATIONS, factory_kwargs
from ..partial.threshold_mask import pack_bits, read_mask

_KEY = "propetl"  # this method's entry in PeftModel.model_adapters
_PREFIX_KEY = "propetl_prefix"  # the prefix form's model-level module (it hooks attention)
FORMS = ("adapter", "lora", "prefix")
# Per form: default targets, density, mask learning-rate ratio (the reference's scripts).
_FORM_DEFAULTS = {
    "adapter": (("@ffn_out",), 0.5, 30.0),   # mask lr 3e-3 / lr 1e-4
    "lora": (("@query", "@value"), 0.1, 300.0),  # mask lr 3e-2 / lr 1e-4
    "prefix": (("@self_attention",), 0.1, 1.0),  # mask lr 1e-4 / lr 1e-4
}
PREFIX_MLP_HIDDEN = 512  # the reference's PrefixTuningConfig.bottleneck_size
# The masked prototype tensors of each form, and the dim whose size sets their scores' init bound.
MASKED = {"adapter": {"down_weight": 0, "up_weight": 0}, "lora": {"lora_A": 1, "lora_B": 1}}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class ProPETLConfig(PeftConfig):
    """form: ``"adapter"`` (ProAdapter), ``"lora"`` (ProLoRA) or ``"prefix"`` (ProPrefix); targets: one
    prototype per entry, shared by every module the entry selects (None: the form's, ``@ffn_out`` /
    ``@query``, ``@value`` / ``@self_attention``; the prefix form has one prototype for all its sites);
    density: fraction of each prototype tensor a layer's mask keeps (None: 0.5 adapter, 0.1 LoRA and
    prefix); mask_lr_ratio: the scores' learning rate over the prototype's (None: 30 adapter, 300 LoRA,
    1 prefix); reduction_factor / bottleneck, activation, init_scale: the adapter prototype (m = hidden //
    reduction_factor, or ``bottleneck``); r, alpha: the LoRA prototype (scaling alpha / r);
    num_virtual_tokens, encoder_hidden_size, cross_attention: the prefix prototype (prefix length p, the
    width of its reparameterisation MLP, and on encoder-decoder models whether the decoder's
    cross-attentions get the prefix too, as ``prefix_tuning``)."""

    form: str = "adapter"
    targets: tuple[str, ...] | str | None = None
    density: float | None = None
    mask_lr_ratio: float | None = None
    reduction_factor: float = 12
    bottleneck: int | None = None
    activation: str = "relu"
    init_scale: float = 0.02
    r: int = 32
    alpha: float = 48
    num_virtual_tokens: int = 64
    encoder_hidden_size: int = PREFIX_MLP_HIDDEN
    cross_attention: bool = True

    def validate(self) -> None:
        self._require(self.form in FORMS, "form", f"one of {FORMS}")
        self._require(self.density is None or (_number(self.density) and 0 < self.density <= 1), "density",
                      "the fraction of prototype entries each layer keeps, in (0, 1], such as 0.5; or None")
        self._require(self.mask_lr_ratio is None or (_number(self.mask_lr_ratio) and self.mask_lr_ratio > 0),
                      "mask_lr_ratio", "a positive number such as 30 (scores at 30x the learning rate), or None")
        self._require(_number(self.reduction_factor) and self.reduction_factor >= 1, "reduction_factor",
                      "a number >= 1 such as 12 (m = hidden // reduction_factor)")
        self._require(self.bottleneck is None or (isinstance(self.bottleneck, int) and not isinstance(self.bottleneck, bool)
                                                  and self.bottleneck > 0),
                      "bottleneck", "a positive integer width m, or None (m from reduction_factor)")
        self._require(self.activation in ACTIVATIONS, "activation", f"one of {sorted(ACTIVATIONS)}")
        self._require(_number(self.init_scale) and self.init_scale > 0, "init_scale",
                      "a positive std for the adapter prototype's weights such as 0.02")
        self._require(is_positive_int(self.r), "r",
                      "a positive integer LoRA rank such as 32")
        self._require(_number(self.alpha) and self.alpha > 0, "alpha", "a positive LoRA alpha such as 48")
        self._require(is_positive_int(self.num_virtual_tokens), "num_virtual_tokens",
                      "a positive integer prefix length such as 64")
        self._require(is_positive_int(self.encoder_hidden_size), "encoder_hidden_size",
                      f"a positive integer width of the prefix MLP such as {PREFIX_MLP_HIDDEN}")
        self._require(isinstance(self.cross_attention, bool), "cross_attention", "True or False")

    def resolved(self) -> tuple[tuple[str, ...], float, float]:
        """(targets, density, mask_lr_ratio) with the form's defaults filled in."""
        targets, density, ratio = _FORM_DEFAULTS[self.form]
        given = (self.targets,) if isinstance(self.targets, str) else self.targets
        return (tuple(given) if given is not None else targets,
                self.density if self.density is not None else density,
                self.mask_lr_ratio if self.mask_lr_ratio is not None else ratio)


def kept_count(numel: int, density: float) -> int:
    """How many of ``numel`` entries a mask keeps: all but the reference's ``int((1 - density) n)``."""
    return numel - int((1 - density) * numel)


def binary_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """1 on the top ``density`` fraction of ``|scores|``, 0 elsewhere, with the straight-through
    gradient: ``|s| - |s|.detach()`` is 0 in the forward pass and passes ``g * sign(s)`` to ``s``."""
    magnitude = scores.abs()
    flat = torch.zeros(scores.numel(), dtype=scores.dtype, device=scores.device)
    flat[magnitude.detach().reshape(-1).topk(kept_count(scores.numel(), density)).indices] = 1
    return flat.view_as(scores) + (magnitude - magnitude.detach())


def score_bound(shape: torch.Size, fan_dim: int) -> float:
    return 1.0 / math.sqrt(shape[fan_dim])


def layer_masks(scores: torch.Tensor, density: float) -> torch.Tensor:
    """:func:`binary_mask` of every ``scores[l]`` at once: (L, ...) scores -> (L, ...) masks, each
    layer keeping its own top ``density`` fraction (straight-through as there)."""
    magnitude = scores.abs()
    flat = magnitude.detach().reshape(scores.shape[0], -1)
    keep = flat.topk(kept_count(flat.shape[1], density), dim=1).indices
    hard = torch.zeros_like(flat).scatter_(1, keep, 1.0)
    return hard.view_as(scores) + (magnitude - magnitude.detach())


class Prototype(nn.Module):
    """One prototype: the adapter's ``down_weight`` (m x d), ``down_bias``, ``up_weight`` (d x m),
    ``up_bias``, or LoRA's ``lora_A`` (r x in), ``lora_B`` (out x r)."""

    def __init__(self, form: str, d_in: int, d_out: int, config: ProPETLConfig, **kw: Any) -> None:
        super().__init__()
        if form == "adapter":
            m = config.bottleneck if config.bottleneck is not None else max(1, int(d_out // config.reduction_factor))
            self.down_weight = nn.Parameter(torch.empty(m, d_out, **kw))
            self.down_bias = nn.Parameter(torch.zeros(m, **kw))
            self.up_weight = nn.Parameter(torch.empty(d_out, m, **kw))
            self.up_bias = nn.Parameter(torch.zeros(d_out, **kw))
            with torch.no_grad():  # the reference's "bert" init
                nn.init.normal_(self.down_weight, std=config.init_scale)
                nn.init.normal_(self.up_weight, std=config.init_scale)
        else:
            self.lora_A = nn.Parameter(torch.empty(config.r, d_in, **kw))
            self.lora_B = nn.Parameter(torch.zeros(d_out, config.r, **kw))
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))


class ProPETLPrototypes(DeltaModule):
    """Model-level: each adapter's prototypes (one per ``targets`` entry), trained and shared by its layers."""

    adapter_attrs = ("propetl_prototype",)

    def __init__(self) -> None:
        super().__init__()
        self.propetl_prototype = nn.ModuleDict()


class ProPETLLayer(DeltaModule):
    """Wraps a Linear/Conv1D; for each live adapter, applies its prototype under this layer's masks."""

    adapter_attrs = ("propetl_scores",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.propetl_scores = nn.ModuleDict()
        self.prototypes: list[ProPETLPrototypes] = []  # a list: the model-level module is not our child

    def add(self, name: str, config: ProPETLConfig, prototypes: ProPETLPrototypes, group: int) -> None:
        _, density, _ = config.resolved()
        self.prototypes[:] = [prototypes]
        prototype = prototypes.propetl_prototype[name][group]
        scores = nn.ParameterDict()
        for key, fan_dim in MASKED[config.form].items():
            tensor = getattr(prototype, key)
            bound = score_bound(tensor.shape, fan_dim)
            scores[key] = nn.Parameter(torch.empty(tensor.shape, device=tensor.device, dtype=torch.float32)
                                       .uniform_(-bound, bound))
        self.propetl_scores[name] = scores
        scaling = config.alpha / config.r
        self.settings[name] = (config.form, group, density, scaling, ACTIVATIONS[config.activation])

    def prototype(self, name: str) -> Prototype:
        return self.prototypes[0].propetl_prototype[name][self.settings[name][1]]

    def masked(self, name: str, key: str) -> torch.Tensor:
        """The prototype tensor ``key`` under this layer's mask (straight-through to the scores)."""
        tensor, scores = getattr(self.prototype(name), key), self.propetl_scores[name][key]
        # At inference the top-k and the product are redone only when the prototype or scores change.
        return built_once_without_grad(self, (name, key), (tensor, scores), lambda: tensor * binary_mask(
            scores, self.settings[name][2]).to(tensor.dtype))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        for name in self.live_adapters():
            form, _, _, scaling, act = self.settings[name]
            prototype = self.prototype(name)
            dtype = next(prototype.parameters()).dtype
            if form == "adapter":
                hidden = act(F.linear(out.to(dtype), self.masked(name, "down_weight"), prototype.down_bias))
                out = out + F.linear(hidden, self.masked(name, "up_weight"), prototype.up_bias).to(out.dtype)
            else:
                low = F.linear(x.to(dtype), self.masked(name, "lora_A"))
                out = out + (scaling * F.linear(low, self.masked(name, "lora_B"))).to(out.dtype)
        return out

    # -- checkpoint: the masks as bits ------------------------------------------------------
    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.propetl_scores:
            return {}
        density = self.settings[name][2]
        return {f"propetl_mask.{key}.bits": pack_bits(binary_mask(scores.detach(), density).bool())
                for key, scores in self.propetl_scores[name].items()}

    def load_adapter_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        form, _, density = self.settings[name][:3]
        for key, scores in self.propetl_scores[name].items():
            label, keep = f"propetl_mask.{key}.bits", kept_count(scores.numel(), density)
            kept = read_mask(tensors[label].to(scores.device), scores.shape, label,
                             f"a mask over the prototype's {key}", "The mask does not match the prototype: was it "
                             "saved with another width, rank or model?")
            if int(kept.sum()) != keep:
                raise CheckpointError(f"{label}: the mask keeps {int(kept.sum())} of {scores.numel()} entries, but "
                                      f"density={density} keeps {keep}; load it with the density it was saved with")
            bound = score_bound(scores.shape, MASKED[form][key])
            with torch.no_grad():  # kept above dropped: the top-k of these scores is this mask
                scores.copy_(torch.where(kept, bound, bound / 2))


class ProPrefixKV(PrefixKV):
    """Model-level module of the prefix form (ProPrefix). Per adapter: the prototype prefix
    (p, W = 2 * kv_heads * d_h), trained through prefix tuning's MLP (``prefix_embedding`` P' (p, d),
    ``prefix_mlp``) or, once folded or loaded, held as ``prompt_embeddings``; and ``propetl_scores``
    (L, p, W), layer l's real scores. Layer l attends over ``prototype (.) M_l``; prefix tuning's
    attention hook (:class:`PrefixKV`) puts it in front of the keys/values: columns ``[0, W/2)`` of a
    layer's (p, W) block are its keys, ``[W/2, W)`` its values (the reference's layout)."""

    adapter_attrs = PrefixKV.adapter_attrs + ("propetl_scores",)

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, hidden: int) -> None:
        super().__init__(num_layers, kv_heads, head_dim, hidden)
        self.propetl_scores = nn.ParameterDict()

    @property
    def prototype_width(self) -> int:
        return 2 * self.kv_heads * self.head_dim

    def score_bound(self, name: str) -> float:
        # The reference's kaiming_uniform_(a=sqrt 5) of its (L, p, 2d) mask tensor: fan_in = p * 2d.
        return 1.0 / math.sqrt(self.propetl_scores[name][0].numel())

    def add(self, name: str, config: ProPETLConfig, like: torch.Tensor) -> None:  # type: ignore[override]
        kw = {"device": like.device, "dtype": like.dtype if like.is_floating_point() else torch.float32}
        p, width = config.num_virtual_tokens, self.prototype_width
        self.prefix_embedding[name] = nn.Parameter(torch.randn(p, self.hidden, **kw))  # nn.Embedding's N(0, 1)
        self.prefix_mlp[name] = nn.Sequential(nn.Linear(self.hidden, config.encoder_hidden_size, **kw), nn.Tanh(),
                                              nn.Linear(config.encoder_hidden_size, width, **kw))
        bound = 1.0 / math.sqrt(p * width)
        self.propetl_scores[name] = nn.Parameter(
            torch.empty(self.num_layers, p, width, device=like.device, dtype=torch.float32).uniform_(-bound, bound))
        self.settings[name] = config.resolved()[1]  # density
        self._cache.clear()

    def prototype(self, name: str) -> torch.Tensor:
        """(p, W): the shared prefix, the MLP's output (or the folded parameter)."""
        if name in self.prompt_embeddings:
            return self.prompt_embeddings[name]
        return self.prefix_mlp[name](self.prefix_embedding[name])

    def masks(self, name: str) -> torch.Tensor:
        """(L, p, W): every layer's binary mask (straight-through to its scores)."""
        return layer_masks(self.propetl_scores[name], self.settings[name])

    def flat_prefix(self, name: str) -> torch.Tensor:
        """(p, L*W): layer l's block is ``prototype (.) M_l``, laid out as :class:`PrefixKV` reads it."""
        proto = self.prototype(name)
        masked = proto.unsqueeze(0) * self.masks(name).to(proto.dtype)
        return masked.permute(1, 0, 2).reshape(proto.shape[0], -1)

    def fold(self, name: str | None = None) -> None:
        """Replace the MLP by its output, the prototype (p, W); the scores stay."""
        for key in [name] if name is not None else self.adapter_names():
            if key in self.prompt_embeddings:
                continue
            trainable = self.prefix_embedding[key].requires_grad
            with torch.no_grad():
                folded = self.prototype(key).detach().clone()
            self._to_direct(key, folded, trainable)

    # -- checkpoint: the prototype in floats, each layer's mask as bits ---------------------------
    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.propetl_scores:
            return {}
        with torch.no_grad():
            state = {"propetl_prototype.0.prefix": self.prototype(name).detach()}
            masks = layer_masks(self.propetl_scores[name].detach(), self.settings[name]).bool()
        state.update({f"propetl_mask.prefix.{layer}.bits": pack_bits(mask) for layer, mask in enumerate(masks)})
        return state

    def load_adapter_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        scores, density = self.propetl_scores[name], self.settings[name]
        shape, keep = scores.shape[1:], kept_count(scores[0].numel(), density)
        value = tensors["propetl_prototype.0.prefix"]
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(f"propetl_prototype.0.prefix: the prototype prefix has shape {tuple(value.shape)}, "
                                  f"expected {tuple(shape)} (num_virtual_tokens x 2 * kv_heads * head_dim); was it "
                                  "saved with another num_virtual_tokens or model?")
        kept = []
        for layer in range(scores.shape[0]):  # every check before anything changes
            label = f"propetl_mask.prefix.{layer}.bits"
            mask = read_mask(tensors[label].to(scores.device), shape, label, f"layer {layer}'s mask over the prototype "
                             "prefix", "The mask does not match the prototype: was it saved with another "
                             "num_virtual_tokens or model?")
            if int(mask.sum()) != keep:
                raise CheckpointError(f"{label}: the mask keeps {int(mask.sum())} of {mask.numel()} entries, but "
                                      f"density={density} keeps {keep}; load it with the density it was saved with")
            kept.append(mask)
        bound = self.score_bound(name)
        with torch.no_grad():  # kept above dropped: each layer's top-k of these scores is its mask
            scores.copy_(torch.where(torch.stack(kept), bound, bound / 2))
            if name in self.prompt_embeddings:
                target = self.prompt_embeddings[name]
                target.copy_(value.to(dtype=target.dtype, device=target.device))
            else:
                like = self.prefix_embedding[name]
                self._to_direct(name, value.to(dtype=like.dtype, device=like.device).clone(), like.requires_grad)
        self._cache.clear()

    # -- PeftModel hooks: the real tokens keep their positions, as in the reference -----------------
    def transform_inputs(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        self._cache.clear()  # a new forward pass: rebuild the prefix (fresh autograd graph)
        kwargs = bind_arguments(model, "forward", args, kwargs)
        if (model.training and torch.is_grad_enabled() and "use_cache" not in kwargs and given_cache(kwargs) is None
                and "use_cache" in inspect.signature(type(model).forward).parameters):
            kwargs["use_cache"] = False  # a training step reads no cache; one returned would only hold memory
        return (), kwargs

    def generate(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], call: Any) -> Any:
        self._cache.clear()
        return call(*args, **kwargs)


def _param_groups(model: Any, name: str, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """The scores train at ``mask_lr_ratio`` times the learning rate (the reference's mask learning rate)."""
    _, _, ratio = model.peft_configs[name].resolved()
    scores: list[nn.Parameter] = []
    for _, module in model._delta_modules():
        if isinstance(module, ProPETLLayer) and name in module.propetl_scores:
            scores.extend(module.propetl_scores[name].values())
        elif isinstance(module, ProPrefixKV) and name in module.propetl_scores:
            scores.append(module.propetl_scores[name])
    return [{"params": scores, "lr": lr * ratio, "weight_decay": weight_decay}]


def _attach_prefix(model: nn.Module, name: str, config: ProPETLConfig, host: Any) -> None:
    """The prefix form: prefix tuning's sites and attention hook, one prototype for all of them."""
    targets, _, _ = config.resolved()
    sites_config = PrefixTuningConfig(targets=targets, num_virtual_tokens=config.num_virtual_tokens,
                                      cross_attention=config.cross_attention)
    sites = prefixed_modules(model, sites_config)
    owner = host.model_adapters[_PREFIX_KEY] if _PREFIX_KEY in host.model_adapters else None
    if owner is None:
        if any(isinstance(m, PrefixKV) for m in host.model_adapters.values()):
            raise PeftlabError("ProPETLConfig(form='prefix'): this model already carries a prefix-tuning adapter, and "
                               "the two would hook the same attention modules; use one prefix method per model")
        # Public route to prefix tuning's reading of the model's key/value heads and head size.
        fields = sites_config.peft_fields_for(model, name)
        kv_heads = int(fields["num_attention_heads"])
        owner = ProPrefixKV(len(sites), kv_heads, int(fields["token_dim"]) // kv_heads,
                            int(model.config.get_text_config().hidden_size))
        owner.install(model, sites)
        host.model_adapters[_PREFIX_KEY] = owner
    elif sites != owner.targets:
        raise PeftlabError(f"ProPETL prefix adapters on one model share their attention modules; adapter {name!r} "
                           f"targets {sites[:3]}..., the existing ones {owner.targets[:3]}... Use the same targets "
                           "and cross_attention.")
    like = next((w for w in model.parameters() if w.is_floating_point()), torch.empty(0))
    owner.add(name, config, like)


def attach(model: nn.Module, name: str, config: ProPETLConfig, host: Any = None) -> None:
    if host is None:
        raise PeftlabError("propetl keeps one shared prototype per adapter at model level: apply it with "
                           "get_peft_model(model, config) or PeftModel.add_adapter")
    if config.form == "prefix":
        _attach_prefix(model, name, config, host)
        return
    targets, _, _ = config.resolved()
    groups: list[list[str]] = []
    shapes: list[tuple[int, int]] = []
    seen: dict[str, str] = {}
    for entry in targets:
        paths = resolve_targets(model, (entry,), allowed_types=LINEAR_TYPES)
        io = {path: linear_io(model.get_submodule(path))[:2] for path in paths}
        if len(set(io.values())) > 1:
            found = ", ".join(f"{p} {i[0]}->{i[1]}" for p, i in list(io.items())[:4])
            raise PeftlabError(f"ProPETLConfig.targets entry {entry!r} selects modules of different shapes ({found}); "
                               "one prototype is shared by every module an entry selects, so they must have one "
                               "shape: split the entry into one per shape")
        for path in paths:
            if path in seen:
                raise PeftlabError(f"ProPETLConfig.targets entries {seen[path]!r} and {entry!r} both select {path}; "
                                   "each module may use one prototype: make the entries select disjoint modules")
            seen[path] = entry
        groups.append(paths)
        shapes.append(next(iter(io.values())))
    kw = factory_kwargs(model.get_submodule(groups[0][0]))
    if _KEY not in host.model_adapters:
        host.model_adapters[_KEY] = ProPETLPrototypes()
    prototypes = host.model_adapters[_KEY]
    prototypes.propetl_prototype[name] = nn.ModuleList(Prototype(config.form, d_in, d_out, config, **kw)
                                                       for d_in, d_out in shapes)
    for group, paths in enumerate(groups):
        for path in paths:
            wrap(model, path, ProPETLLayer).add(name, config, prototypes, group)


SPEC = register(MethodSpec(
    name="propetl", title="ProPETL", family="unified", subcategory="shared prototype with per-layer masks", config_cls=ProPETLConfig,
    trains="one prototype adapter (or LoRA pair, or prefix) shared by all layers, and per-layer binary masks over it "
           "(real scores, top-k, straight-through gradient); stored as the prototype plus mask bits",
    attach=attach, paper="Zeng, Zhang and Lu 2023, One Network, Many Masks: Towards More Parameter-Efficient "
                         "Transfer Learning",
    # The adapter prototype's "bert" init moves the output at once (as does a prefix); its f is nonlinear.
    mergeable=False, identity_at_init=False, default_lr=1e-4,
    hooks=TrainingHooks(param_groups=_param_groups),
))
