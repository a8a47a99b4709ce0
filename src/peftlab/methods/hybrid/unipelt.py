"""UniPELT (Mao, Mathias, Hou, Almahairi, Ma, Han, Yih & Khabsa, 2022, "UniPELT: A Unified Framework
for Parameter-Efficient Language Model Tuning", ACL): LoRA, prefix tuning and a bottleneck adapter in
every layer, each behind a learned gate computed from the hidden state it acts on::

    G(x) = mean_t sigmoid(W_G x_t + b_G)       one value per example, W_G: 1 x d (a gate per part per layer)

    LoRA (query, value):   h = W0 x + G_L(x) * (alpha/r) B A x                          x: the projection's input
    prefix (attention):    head = Attn(q, [G_P(x) P_k; K], [G_P(x) P_v; V])             x: the attention's input
    adapter (FFN output):  h <- h + G_A(h) * (W_up f(W_down h + b_down) + b_up)       h: the FFN output projection's

Built from the three methods' configs (:class:`LoraConfig`, :class:`PrefixTuningConfig`,
:class:`SequentialAdapterConfig`) as one adapter, like the MAM adapter: each part attaches with its
own method's code, then this file adds the gates (each a :class:`Gate`, a ``d -> 1`` linear layer):

- LoRA: each adapted projection is wrapped in a :class:`LoraGates` holding ``G_L``, and the LoRA
  layer computes that adapter's update through :class:`GatedLora`, a :class:`LoraVariant` (the LoRA
  layer's extension point) that multiplies it by ``G_L`` of the layer's input;
- prefix: each prefixed attention module is wrapped in a :class:`PrefixGates` holding ``G_P``, which
  hands the gate values to the attention function with the call; the model's attention implementation
  becomes ``peftlab_prefix_unipelt_<original>``, which puts the prefix in front of the keys and values
  as prefix tuning's does, with each example's prefix keys and values multiplied by its ``G_P``;
- adapter: each bottleneck becomes a :class:`GatedBottleneck` (the same ``W_down``/``W_up`` plus
  ``G_A``), so its output is multiplied by ``G_A`` of its input.

As the paper and its code (morningmoni/UniPELT): gates on LoRA's query and value (one gate each), on the
prefix keys and values of every self-attention, and on the adapter after the FFN; each gate's input is
the hidden state its part reads; a gate is the sigmoid of a linear map averaged over the sequence
(one scalar per example and gate); gate weights ~ N(0, 0.02^2) with zero bias (BERT's initialisation,
which the reference's gates get), so every gate starts near 0.5. Defaults are the paper's: LoRA r = 8
on query and value, prefix length 10 through the reparameterisation MLP of width 512 (the reference's
``mid_dim``), an adapter of bottleneck d/16 (48 on BERT-base, 24 on MiniLM) with ReLU, after the FFN.

A gate of 0 removes LoRA's update and the adapter's output exactly. The prefix gate scales the prefix
keys and values, as the paper does, so at 0 the prefix positions remain with zero keys and values:
each still takes softmax weight exp(0) and contributes nothing, which shrinks the attention over the
real tokens rather than removing the prefix.

Deviations, with reasons:

- LoRA's scale: the reference replaces ``alpha/r`` by the gate; here the update is ``G_L * (alpha/r)``
  and the default LoRA part has ``alpha = r`` (scale 1), which is the reference's computation while a
  user's ``alpha`` still means what it means in LoRA.
- Adapter placement: the reference uses AdapterHub's Pfeiffer adapter, whose input is the block's
  post-LayerNorm ``LN(h + r)`` and whose output is added to ``h`` before that LayerNorm is applied a
  second time; peftlab's sequential adapter part sits on the FFN output projection (input ``h``, added
  before the residual and LayerNorm), the placement peftlab's AdapterFusion also uses for Pfeiffer et
  al.'s adapter. The gate reads the adapter's input, as the reference's does.
- Adapter initialisation: the reference draws ``W_down``/``W_up`` from N(0, 0.02^2); the sequential
  adapter's ``near_identity`` init with ``init_scale = 0.02`` draws them truncated at two std.

Padding: the reference's gates average over every position, padding included, and so do these (the
delta modules do not see the attention mask), so an example's output depends a little on how much
padding its batch has. The reference pads every batch to 128 tokens (its run_glue default).

Models: bidirectional encoders (BERT family, the paper's BERT-base); the sequence-averaged gate reads
every position, so decoders (GPT-2, Llama: causal attention, KV cache) and encoder-decoder models are
refused. Attention implementations ``eager`` and ``sdpa``, as prefix tuning. Not mergeable (the gates
depend on the input, and the prefix adds positions), not the identity at init (the prefix).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.compose import attach_parts, part_capabilities, validate_parts
from ...core.config import PeftConfig
from ...core.errors import PeftlabError
from ...core.inject import wrap
from ...core.layer import DeltaModule, base_of
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, resolve_targets
from ..additive import prefix_tuning, sequential_adapter
from ..additive.prefix_tuning import PAPER_HIDDEN, PrefixTuningConfig, prefixed_modules
from ..additive.sequential_adapter import Bottleneck, SequentialAdapterConfig, SequentialAdapterLayer
from ..reparameterized import lora as lora_method
from ..reparameterized.lora import LoraConfig, LoraLayer, LoraVariant

GATE_STD = 0.02  # BERT's initializer_range: the init the reference's gates get
_GATED = prefix_tuning._PREFIX + "unipelt_"  # attention implementation name = _GATED + original
_GATES_KWARG = "unipelt_prefix_gates"  # {adapter: (batch,) gate values}, passed with the attention call


@dataclasses.dataclass(frozen=True)
class UniPELTConfig(PeftConfig):
    """lora: the LoRA part (a :class:`LoraConfig`); prefix: the prefix-tuning part (a
    :class:`PrefixTuningConfig`); adapter: the bottleneck-adapter part (a
    :class:`SequentialAdapterConfig`). Each part is gated; modules_to_save applies to the whole adapter."""

    lora: LoraConfig = LoraConfig(r=8, alpha=8)
    prefix: PrefixTuningConfig = PrefixTuningConfig(num_virtual_tokens=10, encoder_hidden_size=PAPER_HIDDEN)
    adapter: SequentialAdapterConfig = SequentialAdapterConfig(targets=("@ffn_out",), reduction_factor=16,
                                                               init_scale=GATE_STD)

    def validate(self) -> None:
        self._require(isinstance(self.lora, LoraConfig) and type(self.lora).variant is LoraConfig.variant,
                      "lora", "a LoraConfig(...) (plain LoRA: its update is what the gate scales)")
        self._require(isinstance(self.prefix, PrefixTuningConfig), "prefix", "a PrefixTuningConfig(...)")
        self._require(isinstance(self.adapter, SequentialAdapterConfig), "adapter", "a SequentialAdapterConfig(...)")
        if self.lora.use_dora:
            raise PeftlabError("UniPELTConfig.lora.use_dora=True: expected plain LoRA (use_dora=False); the gate "
                               "scales LoRA's low-rank update, which DoRA replaces")
        if self.adapter.train_layernorm:
            raise PeftlabError("UniPELTConfig.adapter.train_layernorm=True: expected False; UniPELT gates the "
                               "bottleneck, and the LayerNorm deltas would act ungated")
        validate_parts(self)


class Gate(nn.Linear):
    """``G(x) = mean_t sigmoid(W_G x_t + b_G)``: x (batch, tokens, d) -> (batch,), in (0, 1)."""

    def __init__(self, features: int, **kw: Any) -> None:
        super().__init__(features, 1, **kw)
        with torch.no_grad():
            nn.init.normal_(self.weight, std=GATE_STD)
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.sigmoid(F.linear(x.to(self.weight.dtype), self.weight, self.bias))
        return scores.reshape(x.shape[0], -1).mean(dim=1)


def per_example(gate: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(batch,) gate values shaped to multiply ``like`` (batch, ...) example by example."""
    return gate.view(-1, *[1] * (like.dim() - 1)).to(like.dtype)


class _Gates(DeltaModule):
    """A wrapper holding one :class:`Gate` per adapter (``unipelt_gate``)."""

    adapter_attrs = ("unipelt_gate",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.unipelt_gate = nn.ModuleDict()

    def add(self, name: str, features: int, like: torch.Tensor) -> Gate:
        kw = {"device": like.device, "dtype": like.dtype if like.is_floating_point() else torch.float32}
        self.unipelt_gate[name] = Gate(features, **kw)
        return self.unipelt_gate[name]


class LoraGates(_Gates):
    """Around a LoRA layer: holds ``G_L``; the LoRA layer's :class:`GatedLora` variant evaluates it."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_layer(*args, **kwargs)


class GatedLora(LoraVariant):
    """LoRA's update times ``G_L`` of the layer's input: ``out + G_L(x) * (alpha/r) B A x``."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def forward(self, layer: LoraLayer, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        a, b, scale = layer._factors(name)
        h = layer.lora_dropout[name](x) if name in layer.lora_dropout else x
        update = F.linear(F.linear(h.to(a.dtype), a), b) * scale
        return out + (per_example(self.gate(x), update) * update).to(out.dtype)

    def delta_weight(self, layer: LoraLayer, name: str) -> torch.Tensor:
        raise PeftlabError(f"UniPELT adapter {name!r}: its LoRA update is scaled by a gate computed from the input, "
                           "so it cannot be merged into the weight")


class PrefixGates(_Gates):
    """Around a prefixed attention module: computes ``G_P`` of the attention's input for each live
    adapter and passes the values with the call, down to the attention function."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        live = self.live_adapters()
        if not live:
            return self.base_layer(*args, **kwargs)
        x = args[0] if args else kwargs["hidden_states"]
        kwargs[_GATES_KWARG] = {name: self.unipelt_gate[name](x) for name in live}
        return self.base_layer(*args, **kwargs)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A copy (pickle) of a model whose configs name the gated attention, maybe in a fresh process.
        super().__setstate__(state)
        for original in prefix_tuning.SUPPORTED:
            _register(original)


class GatedBottleneck(Bottleneck):
    """The adapter part's bottleneck (its own ``down``/``up``) with ``G_A``: ``G_A(h) * A(h)``."""

    def __init__(self, plain: Bottleneck) -> None:
        nn.Module.__init__(self)  # keeps the part's trained layers instead of drawing new ones
        self.down, self.up, self.activation, self.act = plain.down, plain.up, plain.activation, plain.act
        self.gate = Gate(plain.down.in_features, device=plain.down.weight.device, dtype=plain.down.weight.dtype)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        out = super().forward(x, scale)
        return per_example(self.gate(x), out) * out


# -- the gated prefix attention ------------------------------------------------------------------
def _register(original: str) -> str:
    """Register ``peftlab_prefix_unipelt_<original>`` with transformers (attention and mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = _GATED + original
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_attention(original))
    if name not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def _make_attention(original: str) -> Any:
    ungated = prefix_tuning._make_attention(original)  # prefix tuning's own: no UniPELT adapter live here

    def gated_prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> Any:
        gates = kwargs.pop(_GATES_KWARG, None)
        site = module.__dict__.get(prefix_tuning._SITE_ATTR)
        if not gates or site is None:
            return ungated(module, query, key, value, attention_mask, *args, **kwargs)
        owner, layer = site
        batch = key.shape[0]
        keys, values = [], []
        for name in owner.live_adapters():  # every live prefix, in order; a UniPELT adapter's is gated
            kv = owner._arranged(name)
            pk = kv[2 * layer].to(key.dtype).unsqueeze(0).expand(batch, -1, -1, -1)
            pv = kv[2 * layer + 1].to(value.dtype).unsqueeze(0).expand(batch, -1, -1, -1)
            if name in gates:
                pk, pv = per_example(gates[name], pk) * pk, per_example(gates[name], pv) * pv
            keys.append(pk)
            values.append(pv)
        p = sum(k.shape[2] for k in keys)
        key, value = torch.cat([*keys, key], dim=2), torch.cat([*values, value], dim=2)
        if attention_mask is not None:  # every query sees the prefix (encoders only: no causal mask to build)
            fill = attention_mask.new_ones if attention_mask.dtype == torch.bool else attention_mask.new_zeros
            attention_mask = torch.cat([fill(*attention_mask.shape[:-1], p), attention_mask], dim=-1)
        if original == "eager":
            fn = prefix_tuning._eager_function(module)
        else:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            fn = ALL_ATTENTION_FUNCTIONS[original]
        return fn(module, query, key, value, attention_mask, *args, **kwargs)

    return gated_prefix_attention


def _use_gated_attention(model: nn.Module) -> None:
    """Point every config that prefix tuning switched to ``peftlab_prefix_<original>`` at the gated
    version (prefix tuning gives the original back when its last adapter goes)."""
    for config in prefix_tuning._model_configs(model):
        current = config._attn_implementation or ""
        if current.startswith(prefix_tuning._PREFIX) and not current.startswith(_GATED):
            config._attn_implementation_internal = _register(current[len(prefix_tuning._PREFIX):])


# -- attaching -----------------------------------------------------------------------------------
def _refuse_non_encoders(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    kind = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise PeftlabError(f"UniPELT applies to bidirectional encoders (the paper: BERT); {kind} is an encoder-decoder "
                           "model. Use an encoder such as BERT or RoBERTa, or another method (e.g. mam_adapter).")
    if getattr(config, "is_decoder", False):
        raise PeftlabError(f"UniPELT applies to bidirectional encoders; {kind} is configured as a decoder "
                           "(config.is_decoder=True). Load it as an encoder.")
    for path in resolve_targets(model, ("@self_attention",)):
        if getattr(base_of(model.get_submodule(path)), "is_causal", False):
            raise PeftlabError(f"UniPELT applies to bidirectional encoders (the paper: BERT); {path!r} of {kind} is "
                               "causal attention (GPT-2, Llama), where its sequence-averaged gates would let each "
                               "token see later ones. Use an encoder model, or another method for decoders.")


def _inner(module: nn.Module, cls: type) -> Any:
    while not isinstance(module, cls):
        module = module.base_layer
    return module


def attach(model: nn.Module, name: str, config: UniPELTConfig, host: Any = None) -> None:
    _refuse_non_encoders(model)
    attach_parts(model, name, config, host)
    like = next(p for p in model.parameters() if p.is_floating_point())
    for path in resolve_targets(model, config.lora.targets, allowed_types=LINEAR_TYPES):
        layer = _inner(model.get_submodule(path), LoraLayer)
        gate = wrap(model, path, LoraGates).add(name, layer.in_features, like)
        layer.variants[name] = GatedLora(gate)
    for path in resolve_targets(model, config.adapter.targets, allowed_types=LINEAR_TYPES):
        layer = _inner(model.get_submodule(path), SequentialAdapterLayer)
        layer.bottleneck[name] = GatedBottleneck(layer.bottleneck[name])
    hidden = int(model.config.get_text_config().hidden_size)
    for path in prefixed_modules(model, config.prefix):
        wrap(model, path, PrefixGates).add(name, hidden, like)
    _use_gated_attention(model)


# default_lr: 5e-4, the paper's rate for UniPELT on BERT-base (GLUE); the reference repository fixes none in
# code, and a replication that follows the paper's setup uses 5e-4 for UniPELT as well.
SPEC = register(MethodSpec(
    name="unipelt", title="UniPELT", family="hybrid", subcategory="manual combination", config_cls=UniPELTConfig,
    trains="gated LoRA on query/value, a gated prefix at every attention and a gated adapter after every FFN",
    attach=attach, paper="Mao et al. 2022, UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning",
    default_lr=5e-4, encoder_only=True,
    **part_capabilities(lora_method.SPEC, prefix_tuning.SPEC, sequential_adapter.SPEC),
))
