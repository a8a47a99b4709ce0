"""Prefix tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

Every self-attention layer ``i`` (and, in an encoder-decoder model, every cross-attention) attends
over ``p`` trainable key/value vectors in front of the keys and values of the real tokens; the model's
weights stay frozen::

    head = softmax(q [P_k^i; K]^T / sqrt(d_h) + mask) [P_v^i; V]      P_k^i, P_v^i: (kv_heads, p, d_h)

Training goes through the paper's reparameterisation (``prefix_projection=True``, section 4.3), which
the authors found necessary for stable optimisation::

    [P_k^0, P_v^0, ..., P_k^{L-1}, P_v^{L-1}] = MLP(P') = W2 tanh(W1 P' + b1) + b2     P': (p, d)

and is folded away afterwards: the checkpoint holds the MLP's output only, ``prompt_embeddings``
(p, L*2*kv_heads*d_h), laid out as HF peft writes it (row view (p, L*2, kv_heads, d_h); entry 2i
holds the keys of layer i, 2i+1 its values). Loading a checkpoint, or :meth:`PrefixKV.fold`, puts an
adapter in direct mode: one parameter holding that tensor, no MLP.

MLP width (``encoder_hidden_size``, peft's field): W1 is (d, h). The paper's code uses h = 512
(``PAPER_HIDDEN``) for every model; peft defaults to h = d. peftlab's default is peft's (``None``: h = d)
because the MLP then scales with the model (an absolute 512 makes it larger than a small model: 83k
parameters at p = 20 on the 24k-parameter test BERT; on MiniLM, d = 384, 2.6M instead of 1.9M),
because ``default_lr`` was measured with it, and because a peft script's ``PrefixTuningConfig`` then
builds the same MLP in both libraries. ``encoder_hidden_size=512`` gives the paper's. Checkpoints hold
the folded prefix, so the width never changes what loads: a peft adapter keeps the width its file
names, and peftlab writes its own back for peft.

Mechanism: transformers routes attention through ``ALL_ATTENTION_FUNCTIONS`` with keys/values of shape
(batch, kv_heads, kv_len, d_h) after RoPE and after the KV cache. Attaching registers an attention
function ``peftlab_prefix_<original>`` (with the original's mask function) and switches every config
of the model to it; it prepends the prefix to the keys/values of the chosen attention modules,
pads the mask (True / 0 for the prefix columns; T5's position bias with 0; a causal module without a
mask gets an explicit bottom-right-aligned one) and calls the original. The KV cache holds the real
tokens only and the prefix is added at every step, so the cache needs nothing special. Deleting the
last prefix adapter or ``unload()`` gives every config back its attention implementation exactly,
and the last model using a registered name takes it out of transformers' registries again
(``merge_and_unload()`` is refused: nothing to merge). A model dropped without unloading keeps its
name registered until it is garbage-collected and another prefix model is released.

Positions: as in the paper (the prefix activations occupy positions 0..p-1, GPT-2 run with ``past``)
and in peft, the real tokens sit at positions p, p+1, ...: ``forward`` and ``generate`` pass
``position_ids`` shifted by p to models that take them. This is not cosmetic with RoPE: real keys and
queries are rotated but the prefix keys are not, so a query's score against the prefix depends on
its absolute position. With the shift, peftlab and peft give the same outputs from the same
checkpoint (Llama, BERT: checked to 1e-5). Models with learned absolute positions then take at most
``max_position_embeddings - p`` tokens, as in peft (a longer input is refused before the model runs,
naming the limit); calling ``base_model`` directly skips the shift.
Encoder-decoder models (T5: relative position bias) keep their positions, and the prefix columns
get no position bias. As in the paper (BART: encoder, decoder and cross-attention prefixes), they get
a prefix in every encoder self-attention, decoder self-attention and decoder cross-attention (layers
numbered in model order: T5's encoder blocks, then per decoder block its self- then cross-attention);
``cross_attention=False`` leaves the cross-attention out (peftlab's layout before this option).
T5 checkpoints do not carry over to or from peft either way: peft (0.21.2, SEQ_2_SEQ_LM) writes
``num_transformer_submodules=2`` and ``num_layers`` = the encoder's depth, prefixes no encoder layer,
gives decoder block j's self-attention rows (4j, 4j+1) mod 2L (every block the same rows when L = 2),
replaces the cross-attention cache by an empty one so its cross rows are never used, and puts the
prefix in the self-attention cache, where T5's relative position bias covers it. peftlab refuses such
files rather than compute something else; peft cannot run peftlab's T5 layout.

Supports the ``eager`` and ``sdpa`` attention implementations. Not identity at init (the prefix is
attended to from the first step) and not mergeable (it adds attention positions, not weights).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import weakref
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ...core.config import PeftConfig
from ...core.errors import PeftlabError
from ...core.layer import DeltaModule, base_of
from ...core.registry import MethodSpec, register
from ...core.targets import resolve_targets
from .prompt_tuning import _cached_length, _check_positions, bind_arguments, given_cache

_KEY = "prefix_tuning"          # this method's entry in PeftModel.model_adapters
_PREFIX = "peftlab_prefix_"     # attention implementation name = _PREFIX + original name
_SITE_ATTR = "_peftlab_prefix_site"  # (owner, layer index), kept in the attention module's __dict__
SUPPORTED = ("eager", "sdpa")
_DEFAULT_TARGETS = ("@self_attention",)
PAPER_HIDDEN = 512  # the reparameterisation MLP's hidden width in Li & Liang's code (mid_dim)


@dataclasses.dataclass(frozen=True)
class PrefixTuningConfig(PeftConfig):
    """num_virtual_tokens: prefix length ``p`` per layer; prefix_projection: train through the MLP
    reparameterisation (folded away in checkpoints); encoder_hidden_size: the MLP's hidden width
    (HF peft's name; default ``None``: the model's hidden size, as peft; the paper's is
    ``PAPER_HIDDEN`` = 512, see the module docstring);
    cross_attention: on encoder-decoder models, also prefix every decoder cross-attention (the paper's
    BART setup); no effect on other models. targets default to every self-attention module."""

    checkpoint_model_prefix: ClassVar[str] = "base_model."

    targets: tuple[str, ...] | str | None = _DEFAULT_TARGETS
    num_virtual_tokens: int = 20
    prefix_projection: bool = True
    encoder_hidden_size: int | None = None
    cross_attention: bool = True

    def validate(self) -> None:
        self._require(self.targets is not None, "targets",
                      "the self-attention modules to prefix, e.g. ('@self_attention',)")
        self._require(isinstance(self.num_virtual_tokens, int) and not isinstance(self.num_virtual_tokens, bool)
                      and self.num_virtual_tokens > 0, "num_virtual_tokens", "a positive integer such as 20")
        self._require(isinstance(self.prefix_projection, bool), "prefix_projection", "True or False")
        self._require(self.encoder_hidden_size is None or (isinstance(self.encoder_hidden_size, int)
                      and not isinstance(self.encoder_hidden_size, bool) and self.encoder_hidden_size > 0),
                      "encoder_hidden_size", f"None (the model's hidden size) or a positive integer such as "
                      f"{PAPER_HIDDEN} (the paper's)")
        self._require(isinstance(self.cross_attention, bool), "cross_attention", "True or False")

    def peft_fields(self) -> dict[str, Any]:
        fields = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": self.num_virtual_tokens,
                  "prefix_projection": self.prefix_projection, "encoder_hidden_size": self.encoder_hidden_size,
                  "num_transformer_submodules": 1, "inference_mode": True,
                  "modules_to_save": list(self.modules_to_save) or None}
        if self.targets != _DEFAULT_TARGETS:  # peft has no such choice; keep it for peftlab's reader
            fields["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
        if not self.cross_attention:
            fields["cross_attention"] = False
        return fields

    def peft_fields_for(self, model: Any, adapter_name: str) -> dict[str, Any]:
        # peft sizes its prefix from these; write the numbers peftlab used.
        kv_heads, head_dim = _kv_shape(model)
        return {"num_layers": len(prefixed_modules(model, self)), "token_dim": kv_heads * head_dim,
                "num_attention_heads": kv_heads}

    def peft_form_refusal(self, model: Any) -> str | None:
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            return ("peft lays out encoder-decoder prefixes differently (see the prefix_tuning module docstring) "
                    "and would compute something else")
        chosen = prefixed_modules(model, self)
        every = resolve_targets(model, ("@self_attention",))
        if len(chosen) != len(every):
            return (f"the prefix covers {len(chosen)} of the model's {len(every)} self-attention layers (targets="
                    f"{self.targets!r}); peft's prefix has one row per layer and fails on such a file")
        return None

    @classmethod
    def from_peft(cls, data: dict[str, Any]) -> "PrefixTuningConfig":
        if (data.get("num_transformer_submodules") or 1) != 1:
            raise PeftlabError("this peft prefix-tuning checkpoint is laid out for an encoder-decoder model "
                               "(num_transformer_submodules=2: peft prefixes only the decoder's self-attention, "
                               "rows repeated across layers, with T5's position bias on the prefix); peftlab "
                               "cannot read it. Train the adapter with peftlab, or keep it in peft.")
        # peft's own default width is the model's (None here); a number it wrote stays that number.
        return cls(num_virtual_tokens=int(data["num_virtual_tokens"]),
                   prefix_projection=bool(data.get("prefix_projection", False)),
                   encoder_hidden_size=data.get("encoder_hidden_size"),
                   cross_attention=bool(data.get("cross_attention", True)),
                   targets=data.get("targets") or _DEFAULT_TARGETS,
                   modules_to_save=tuple(data.get("modules_to_save") or ()))


def prefixed_modules(model: nn.Module, config: PrefixTuningConfig) -> list[str]:
    """The attention modules that get a prefix, in model order (T5: encoder self-attention, then per
    decoder block its self- and, with ``cross_attention``, its cross-attention); prefix layer i is
    entry i of this list."""
    chosen = set(resolve_targets(model, config.targets))
    if config.cross_attention and getattr(model.config, "is_encoder_decoder", False):
        try:
            every = resolve_targets(model, ("@attention",))
            own = set(resolve_targets(model, ("@self_attention",)))
        except PeftlabError as err:
            raise PeftlabError(f"cross_attention=True: cannot find the cross-attention modules of this model "
                               f"({err}). Pass cross_attention=False, and name the modules to prefix in "
                               "targets.") from None
        cross = [n for n in every if n not in own]
        if not cross:
            raise PeftlabError(f"cross_attention=True, but peftlab's attach-point map for model_type "
                               f"{model.config.model_type!r} names no cross-attention modules; pass "
                               "cross_attention=False, and name the modules to prefix in targets.")
        chosen.update(cross)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(chosen, key=order.__getitem__)


class PrefixKV(DeltaModule):
    """Model-level module: per adapter, either the reparameterisation (``prefix_embedding`` P' and
    ``prefix_mlp``) or the folded prefix (``prompt_embeddings``), plus the attention hook's state."""

    adapter_attrs = ("prefix_embedding", "prefix_mlp", "prompt_embeddings")

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, hidden: int) -> None:
        super().__init__()
        self.prefix_embedding = nn.ParameterDict()
        self.prefix_mlp = nn.ModuleDict()
        self.prompt_embeddings = nn.ParameterDict()
        self.num_layers, self.kv_heads, self.head_dim, self.hidden = num_layers, kv_heads, head_dim, hidden
        self.targets: list[str] = []
        self._configs: list[tuple[Any, str | None]] = []  # (model config, its original attention implementation)
        # Per forward pass: the arranged prefix of each live adapter (the MLP runs once, not once per
        # layer) and causal masks; emptied at every PeftModel forward/generate.
        self._cache: dict[Any, Any] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A copy (deepcopy, pickle) of an installed model uses the attention name too, maybe in a
        # process where it was never registered.
        super().__setstate__(state)
        for _, original in self._configs:
            _register(original or "eager")
        if self._configs:
            _INSTALLED.add(self)

    @property
    def width(self) -> int:
        return self.num_layers * 2 * self.kv_heads * self.head_dim

    def add(self, name: str, config: PrefixTuningConfig, like: torch.Tensor) -> None:
        kw = {"device": like.device, "dtype": like.dtype if like.is_floating_point() else torch.float32}
        p = config.num_virtual_tokens
        if config.prefix_projection:
            inner = self.hidden if config.encoder_hidden_size is None else config.encoder_hidden_size
            self.prefix_embedding[name] = nn.Parameter(torch.randn(p, self.hidden, **kw))
            self.prefix_mlp[name] = nn.Sequential(nn.Linear(self.hidden, inner, **kw), nn.Tanh(),
                                                  nn.Linear(inner, self.width, **kw))
        else:
            self.prompt_embeddings[name] = nn.Parameter(torch.randn(p, self.width, **kw))
        self._cache.clear()

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self._cache.clear()

    # -- the prefix ----------------------------------------------------------------------------
    def flat_prefix(self, name: str) -> torch.Tensor:
        """(p, L*2*kv_heads*d_h): the MLP output, or the folded parameter."""
        if name in self.prompt_embeddings:
            return self.prompt_embeddings[name]
        return self.prefix_mlp[name](self.prefix_embedding[name])

    def fold(self, name: str | None = None) -> None:
        """Replace the MLP of adapter ``name`` (default: every adapter) by its output (direct mode).

        Outputs do not change; the adapter's parameters do (one new parameter instead of P' and the
        MLP), so build any optimizer after folding."""
        for key in [name] if name is not None else self.adapter_names():
            if key in self.prompt_embeddings:
                continue
            trainable = self.prefix_embedding[key].requires_grad
            with torch.no_grad():
                folded = self.flat_prefix(key).detach().clone()
            self._to_direct(key, folded, trainable)

    def _to_direct(self, name: str, folded: torch.Tensor, trainable: bool) -> None:
        del self.prefix_embedding[name]
        del self.prefix_mlp[name]
        self.prompt_embeddings[name] = nn.Parameter(folded, requires_grad=trainable)
        self._cache.clear()

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.adapter_names():
            return {}
        with torch.no_grad():  # the checkpoint form: the MLP's output, folded
            return {"prompt_embeddings": self.flat_prefix(name).detach()}

    def load_adapter_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        value = tensors["prompt_embeddings"]
        if name in self.prompt_embeddings:
            with torch.no_grad():
                target = self.prompt_embeddings[name]
                target.copy_(value.to(dtype=target.dtype, device=target.device))
            self._cache.clear()
            return
        like = self.prefix_embedding[name]
        self._to_direct(name, value.to(dtype=like.dtype, device=like.device).clone(), like.requires_grad)

    def layer_prefix(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values (kv_heads, p, d_h) of the live adapters for self-attention layer ``layer``."""
        live = self.live_adapters()
        if not live:
            return None
        parts = [self._arranged(name) for name in live]
        kv = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        return kv[2 * layer], kv[2 * layer + 1]

    def _kv_view(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.view(flat.shape[0], 2 * self.num_layers, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)

    def _arranged(self, name: str) -> torch.Tensor:
        """(L*2, kv_heads, p, d_h), computed once per forward pass (and again if the weights change)."""
        if torch.compiler.is_compiling():  # a traced graph computes it once per call anyway
            return self._kv_view(self.flat_prefix(name))
        hit = self._cache.get(name)
        params = hit[0] if hit is not None else self.adapter_parameters(name)
        stamp = (torch.is_grad_enabled(), *(p._version for p in params))
        if hit is not None and hit[1] == stamp:
            return hit[2]
        kv = self._kv_view(self.flat_prefix(name))
        self._cache[name] = (params, stamp, kv)
        return kv

    def causal_mask(self, q: int, kv: int, p: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Additive (1, 1, q, p + kv) mask: every query sees the prefix; query i sees real keys up to
        position kv - q + i (bottom-right aligned, as with a KV cache)."""
        key = ("mask", q, kv, p, dtype, device)
        if key not in self._cache:
            rows = torch.arange(q, device=device)[:, None] + (kv - q)
            blocked = torch.arange(kv, device=device)[None, :] > rows
            mask = torch.zeros(q, p + kv, dtype=dtype, device=device)
            mask[:, p:].masked_fill_(blocked, torch.finfo(dtype).min)
            self._cache[key] = mask.view(1, 1, q, p + kv)
        return self._cache[key]

    # -- PeftModel hooks -------------------------------------------------------------------------
    def transform_inputs(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        self._cache.clear()  # a new forward pass: recompute the prefix (fresh autograd graph)
        kwargs = bind_arguments(model, "forward", args, kwargs)
        if (model.training and torch.is_grad_enabled() and "use_cache" not in kwargs
                and given_cache(kwargs) is None and _forward_takes(type(model), "use_cache")):
            # A training step reads no KV cache, and a returned one would keep every layer's keys and
            # values without the prefix alive through backward, beside the concatenated ones attention
            # saved (+1.4 MB per GPT-2-small layer at batch 4 x 128; peft's cache holds the latter).
            kwargs["use_cache"] = False
        if not _takes_positions(model):
            return (), kwargs
        tokens = kwargs.get("input_ids")
        tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
        if tokens is None:
            return (), kwargs  # the model reports the missing input
        positions = kwargs.get("position_ids")
        if positions is None:  # the model's own default: past length + 0..n-1
            cache = given_cache(kwargs)
            past = _cached_length(cache) if cache is not None else 0
            positions = torch.arange(past, past + tokens.shape[1], device=tokens.device).unsqueeze(0)
        _check_positions(model, self.live_length(), tokens.shape[1], positions)  # not an index error inside
        kwargs["position_ids"] = positions + self.live_length()
        return (), kwargs

    def generate(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], call: Any) -> Any:
        """``call`` (the next input-level adapter's generate, or the model's) with positions after the prefix."""
        self._cache.clear()
        if not _takes_positions(model):
            return call(*args, **kwargs)
        kwargs = bind_arguments(model, "generate", args, kwargs)
        if kwargs.get("position_ids") is None:
            tokens = kwargs.get("input_ids")
            tokens = kwargs.get("inputs") if tokens is None else tokens
            tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
            if tokens is None:
                raise PeftlabError("prefix tuning generate() needs input_ids (or inputs_embeds) to place positions")
            mask = kwargs.get("attention_mask")
            if mask is not None:  # generate's own rule: count real tokens, padding at 0
                positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            else:
                positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
            kwargs["position_ids"] = positions
        _check_positions(model, self.live_length(), kwargs["position_ids"].shape[-1], kwargs["position_ids"])
        # generate extends position_ids by one per new token; the shift carries over.
        kwargs["position_ids"] = kwargs["position_ids"] + self.live_length()
        return call(**kwargs)

    def live_length(self) -> int:
        """Number of prefix positions in front of the real tokens (p of the live adapter)."""
        return sum(self._length(name) for name in self.live_adapters())

    def _length(self, name: str) -> int:
        table = self.prompt_embeddings if name in self.prompt_embeddings else self.prefix_embedding
        return int(table[name].shape[0])

    # -- installing the attention hook -----------------------------------------------------------
    def install(self, model: nn.Module, targets: list[str]) -> None:
        configs = _model_configs(model)
        for config in configs:
            original = config._attn_implementation
            if original is not None and original.startswith(_PREFIX):
                raise PeftlabError("this model already carries prefix tuning from another PeftModel; "
                                   "add the adapter to that PeftModel, or load a fresh base model")
            if (original or "eager") not in SUPPORTED:
                raise PeftlabError(f"prefix tuning supports the attention implementations {SUPPORTED}; the model "
                                   f"uses {original!r}. Load it with attn_implementation='sdpa' (or 'eager').")
        sites = [base_of(model.get_submodule(path)) for path in targets]
        for layer, module in enumerate(sites):
            if "is_causal" not in vars(module) and not hasattr(type(module), "is_causal"):
                raise PeftlabError(f"target {targets[layer]!r} ({type(module).__name__}) is not an attention "
                                   "module of a transformers model; prefix tuning targets self-attention modules")
        for layer, module in enumerate(sites):
            module.__dict__[_SITE_ATTR] = (self, layer)
        for config in configs:
            original = config._attn_implementation
            self._configs.append((config, original))
            config._attn_implementation_internal = _register(original or "eager")
        _INSTALLED.add(self)
        self.targets = targets

    def release(self, model: nn.Module) -> None:
        for module in model.modules():
            site = module.__dict__.get(_SITE_ATTR)
            if site is not None and site[0] is self:
                del module.__dict__[_SITE_ATTR]
        for config, original in self._configs:
            config._attn_implementation_internal = original
        names = {_PREFIX + (original or "eager") for _, original in self._configs}
        self._configs.clear()
        _INSTALLED.discard(self)
        for name in names:  # the last model using a name takes it out of transformers' registries
            if not any(name == _PREFIX + (o or "eager") for owner in _INSTALLED for _, o in owner._configs):
                _unregister(name)
        self._cache.clear()


# -- the attention function ----------------------------------------------------------------------
# Installed PrefixKV modules (weakly: a model dropped without unload does not keep a name registered
# once it is collected). A registered name is removed when the last installed one using it is released.
_INSTALLED: "weakref.WeakSet[PrefixKV]" = weakref.WeakSet()


def _register(original: str) -> str:
    """Register ``peftlab_prefix_<original>`` in transformers' attention and mask registries."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = _PREFIX + original
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_attention(original))
    if name not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def _unregister(name: str) -> None:
    # transformers has register() but no unregister(): both registries are class-level dicts.
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)


_EAGER: dict[type, Callable[..., Any]] = {}


def _eager_function(module: nn.Module) -> Callable[..., Any]:
    """The ``eager_attention_forward`` of the module's own modeling file (what 'eager' means there)."""
    cls = type(module)
    if cls not in _EAGER:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is None:
            raise PeftlabError(f"{cls.__name__}: its modeling file has no eager_attention_forward; load the "
                               "model with attn_implementation='sdpa' to use prefix tuning")
        _EAGER[cls] = fn
    return _EAGER[cls]


def _make_attention(original: str) -> Callable[..., Any]:
    def prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> Any:
        if original == "eager":
            fn, unmasked_causal = _eager_function(module), False
        else:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            fn = ALL_ATTENTION_FUNCTIONS[original]
            # sdpa treats a missing mask as causal for causal modules (top-left aligned: wrong with a prefix).
            flag = kwargs.get("is_causal")
            unmasked_causal = flag if flag is not None else getattr(module, "is_causal", True)
        site = module.__dict__.get(_SITE_ATTR)
        prefix = site[0].layer_prefix(site[1]) if site is not None else None
        if prefix is not None:
            owner = site[0]
            pk, pv = prefix
            if key.shape[1] != pk.shape[0] or key.shape[-1] != pk.shape[-1]:
                raise PeftlabError(f"{type(module).__name__} has {key.shape[1]} key/value heads of size "
                                   f"{key.shape[-1]}; the prefix was sized for {pk.shape[0]} of size {pk.shape[-1]}")
            batch, p, q, kv = key.shape[0], pk.shape[1], query.shape[2], key.shape[2]
            key = torch.cat([pk.to(key.dtype).unsqueeze(0).expand(batch, -1, -1, -1), key], dim=2)
            value = torch.cat([pv.to(value.dtype).unsqueeze(0).expand(batch, -1, -1, -1), value], dim=2)
            if attention_mask is None:
                if unmasked_causal and q > 1:
                    attention_mask = owner.causal_mask(q, kv, p, query.dtype, query.device)
                    kwargs["is_causal"] = False
            else:
                fill = attention_mask.new_ones if attention_mask.dtype == torch.bool else attention_mask.new_zeros
                attention_mask = torch.cat([fill(*attention_mask.shape[:-1], p), attention_mask], dim=-1)
            bias = kwargs.get("position_bias")
            if bias is not None:  # T5: relative position bias, added like a mask; no bias on the prefix
                kwargs["position_bias"] = torch.cat([bias.new_zeros(*bias.shape[:-1], p), bias], dim=-1)
        return fn(module, query, key, value, attention_mask, *args, **kwargs)

    return prefix_attention


# -- model facts -----------------------------------------------------------------------------------
def _model_configs(model: nn.Module) -> list[Any]:
    """Every distinct transformers config used by the model's modules (T5's encoder and decoder
    stacks each keep their own copy)."""
    from transformers import PretrainedConfig

    seen: dict[int, Any] = {}
    for module in [model, *model.modules()]:
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            seen.setdefault(id(config), config)
    if not seen:
        raise PeftlabError(f"prefix tuning needs a transformers model (with a .config); got {type(model).__name__}")
    return list(seen.values())


@functools.lru_cache(maxsize=None)
def _forward_takes(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.forward).parameters


def _takes_positions(model: nn.Module) -> bool:
    """Real tokens sit after the prefix (positions start at p) in models that take position ids;
    encoder-decoder models (T5: relative positions) keep theirs."""
    return _forward_takes(type(model), "position_ids") and not getattr(model.config, "is_encoder_decoder", False)


def _kv_shape(model: nn.Module) -> tuple[int, int]:
    """(key/value heads, head size) of the model's self-attention, from its config."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not heads or not hidden:
        raise PeftlabError(f"prefix tuning reads num_attention_heads and hidden_size from the model config; "
                           f"{type(config).__name__} lacks them")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or hidden // heads
    return int(kv_heads), int(head_dim)


def attach(model: nn.Module, name: str, config: PrefixTuningConfig, host: Any) -> None:
    if host is None:
        raise PeftlabError("prefix tuning keeps its prefix on the PeftModel; use get_peft_model(model, config)")
    targets = prefixed_modules(model, config)
    owner = host.model_adapters[_KEY] if _KEY in host.model_adapters else None
    if owner is None:
        # A method built on prefix tuning's hook (ProPETL's prefix form) already hooks this attention.
        other = next((key for key, m in host.model_adapters.items() if isinstance(m, PrefixKV)), None)
        if other is not None:
            raise PeftlabError(f"prefix tuning: this model already carries another prefix method's adapters "
                               f"({other!r}), and the two would hook the same attention modules; use one prefix "
                               "method per model")
        kv_heads, head_dim = _kv_shape(model)
        owner = PrefixKV(len(targets), kv_heads, head_dim, int(model.config.get_text_config().hidden_size))
        owner.install(model, targets)
        host.model_adapters[_KEY] = owner
    elif targets != owner.targets:
        raise PeftlabError(f"prefix tuning adapters on one model share their attention modules; adapter {name!r} "
                           f"targets {targets[:3]}..., the existing ones {owner.targets[:3]}... Use the same targets "
                           "and cross_attention.")
    like = next((w for w in model.parameters() if w.is_floating_point()), torch.empty(0))
    owner.add(name, config, like)


# default_lr: training goes through the MLP, which diverges at the rates bare soft prompts take.
# Measured on MiniLM, SST-2 (5,000 examples, one epoch, the MLP on): dev accuracy 0.729 at lr 1e-3,
# 0.722 at 5e-4, 0.712 at 2e-3, and the majority class (0.509) at 5e-3 and above. The quick suite
# runs default_lr x 4, i.e. the best of these.
SPEC = register(MethodSpec(
    name="prefix_tuning", title="Prefix tuning", family="additive", subcategory="soft prompt", config_cls=PrefixTuningConfig,
    trains="p key/value vectors per self-attention layer (through an MLP, folded after training)",
    attach=attach, paper="Li & Liang 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation",
    mergeable=False, identity_at_init=False, peft_type="PREFIX_TUNING", default_lr=2.5e-4,
))
