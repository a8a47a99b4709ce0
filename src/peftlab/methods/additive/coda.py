"""CoDA, Conditional Adapters (Lei, Bai, Brahma, Ainslie, Lee, Zhou, Du, Zhao, Wu, Li, Zhang and Chang, 2023,
"Conditional Adapters: Parameter-efficient Transfer Learning with Fast Inference", NeurIPS 2023; arXiv 2304.04947).

Each frozen Transformer layer ``L`` (attention + FFN) becomes a CoDA layer with two branches. A light
parallel bottleneck adapter runs on all ``n`` tokens; a learned router picks ``k = ceil(n / r)`` tokens
(``r``: the reduction factor) and only those go through the frozen heavy layer, whose update is weighted
by the router's soft top-k score so the router trains. With ``X`` the layer input (n x d)::

    s      = X w                                      router scores (w: d, trained)
    lambda = SoftTopK_k(s)                            in [0, 1]^n, sum k (entropy-regularised top-k)
    I      = the k tokens of largest s (never padding ahead of a real token), in sequence order
    Y      = X + A(X) + Scatter_I( lambda_I * (L(X_I) - X_I) )
    A(X)   = W_up relu(W_down X + b_down) + b_up      (W_up, b_up zero at init)

``L(X_I)`` is the wrapped layer run on the gathered k x d tensor with the attention mask restricted to
the selected tokens (queries and keys), so attention costs k^2 instead of n^2 and the FFN k instead of
n: that is the inference speed-up. Unselected tokens get only the adapter's update.

Soft top-k: ``lambda = argmax_l  s.l + eps H(l)  s.t.  sum l = k, 0 <= l <= 1`` (H: entropy), solved
by coordinate descent on its dual for ``iterations`` steps::

    a   <- eps (log k - logsumexp((s + b) / eps))
    b   <- -relu(s + a)
    lambda = exp((s + a + b) / eps)

with eps-scaling: eps starts at ``epsilon_init`` and is multiplied by ``epsilon_decay`` each step down
to ``epsilon``. Padding positions (no query of the layer's attention mask may attend to them) get score -inf and
lambda 0; they are selected only when a sequence has fewer than k real tokens (then every real token
gets lambda 1, the exact solution). Twenty steps do not fully converge: near the end the sum constraint
closes at rate (k-1)/k per step, so with a small eps the last few of the top k get weights below 1
and the weights sum to somewhat less than k (about 0.9 k for n = 128, k = 43, eps = 0.1); training
and inference use the same operator, so the router learns with it.

Placement: every layer of a bidirectional BERT encoder (``encoder.layer.<i>``; ``targets`` may
name a subset). Initialisation: W_down ~ N(0, init_scale^2) truncated at two std, W_up, b_down, b_up
zero (the adapter starts at 0); w ~ N(0, 1/d), so scores start O(1) on LayerNorm'd states. A layer
trains ``d + 2 d m + m + d`` parameters (19,224 for d = 384, m = 24). Not identity at init (the heavy
layer updates only k tokens), not mergeable (routing is input-dependent).

Defaults: ``reduction_factor=3`` (the paper's headline text result is a 3.2x speed-up on MNLI; that r = 3
gave it could not be checked), ``iterations=20``, ``epsilon_init=4``, ``epsilon_decay=0.7`` (reported for
CoDA, see below), ``epsilon=0.1`` (chosen inside the reported task range 0.02-1), ``bottleneck = d // 16``.

What could and could not be checked: the paper's full text was not readable here (only its abstract,
Figure 2's caption — "k tokens are selected and processed by the frozen pretrained Transformer layer,
and all tokens are processed by the fast adapter layer" — and summaries). The soft top-k updates above
follow a public re-implementation of the paper's Appendix C and the CoLT5-attention package's notes,
which state that CoDA cut the iterations from 50 to 20 with eps_init 4 and decay 0.7, and that eps was
task-dependent between 0.02 and 1. Not checked: the router's exact form, normalisation and
initialisation, the adapter's width and scaling, eps for text tasks, the paper's learning rate
(``default_lr`` is the library's adapter default, 1e-3), and whether the heavy branch's attention lets
the k selected queries read all n keys (here the k tokens attend among themselves, as Figure 2 draws).

Deviations, and why:
- BERT is post-LN, the paper's T5 pre-LN: the heavy layer's update is taken as ``L(X_I) - X_I`` (its
  output minus its input), which for a pre-LN residual layer is exactly the residual branch.
- ``k = ceil(n / r)`` of the padded length ``n`` (one k per batch, so the heavy branch runs as one
  dense k-token batch); sequences with fewer than k real tokens fill the rest with padding (lambda 0,
  masked as keys).
- Encoders only (``encoder_only``): top-k over the whole sequence does not fit causal decoding (a
  token's selection would depend on later tokens, and a KV cache would hold states of unselected
  tokens). GPT-2, Llama, T5 and BERT-as-decoder are refused; so are the other BERT-family encoders
  (RoBERTa, MPNet, ...) until their layer calls are tested (MPNet hands its layers an n x n position
  bias that would need gathering too).
- One CoDA adapter per layer at a time (one router decides what the heavy layer computes); two live
  CoDA adapters at one layer are refused.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import re
from typing import Any

import torch
from torch import nn

from ...core.config import PeftConfig, is_positive_int
from ...core.errors import PeftlabError
from ...core.inject import wrap
from ...core.layer import DeltaModule, base_of
from ...core.registry import MethodSpec, register
from ...core.targets import logical_name, resolve_targets
from .sequential_adapter import ACTIVATIONS, Bottleneck, factory_kwargs

_LAYER_PATH = re.compile(r"(^|\.)encoder\.layer\.\d+$")
# The encoders whose layer call (hidden states, 4-D mask; no relative-position bias over the n tokens)
# is tested here; other BERT-family layers (MPNet passes an n x n position bias) would need their own.
SUPPORTED = ("bert",)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class CodaConfig(PeftConfig):
    """reduction_factor: r, the heavy layer runs on k = ceil(n / r) of the n tokens (the paper's 3x
    setting: 3); bottleneck: m, the parallel adapter's width (None: hidden // 16); activation: its
    nonlinearity; init_scale: the std of W_down (W_up starts at zero); epsilon: the soft top-k's final
    entropy weight (smaller: closer to a hard 0/1 selection; the paper's range 0.02-1);
    epsilon_init, epsilon_decay: the eps-scaling schedule (eps starts at epsilon_init, times
    epsilon_decay per step, floored at epsilon); iterations: coordinate-descent steps of the soft top-k;
    targets: ``None`` for every encoder layer, or a subset of the encoder layers (``encoder.layer.<i>``)."""

    targets: tuple[str, ...] | str | None = None
    reduction_factor: float = 3.0
    bottleneck: int | None = None
    activation: str = "relu"
    init_scale: float = 1e-2
    epsilon: float = 0.1
    epsilon_init: float = 4.0
    epsilon_decay: float = 0.7
    iterations: int = 20

    def validate(self) -> None:
        self._require(_number(self.reduction_factor) and self.reduction_factor >= 1, "reduction_factor",
                      "a number r >= 1 (the heavy layer runs on ceil(n / r) tokens; the paper uses 3)")
        self._require(self.bottleneck is None or is_positive_int(self.bottleneck), "bottleneck",
                      "a positive integer adapter width m, or None (hidden // 16)")
        self._require(self.activation in ACTIVATIONS, "activation", f"one of {sorted(ACTIVATIONS)}")
        self._require(_number(self.init_scale) and self.init_scale > 0, "init_scale",
                      "a small positive std for W_down such as 1e-2")
        self._require(_number(self.epsilon) and self.epsilon > 0, "epsilon",
                      "a positive entropy weight for the soft top-k, such as 0.1 (the paper's range: 0.02-1)")
        self._require(_number(self.epsilon_init) and self.epsilon_init > 0, "epsilon_init",
                      "a positive starting eps for eps-scaling, such as 4.0")
        self._require(_number(self.epsilon_decay) and 0 < self.epsilon_decay <= 1, "epsilon_decay",
                      "a factor in (0, 1] applied to eps each step, such as 0.7 (1: no eps-scaling)")
        self._require(is_positive_int(self.iterations), "iterations",
                      "a positive number of soft top-k coordinate-descent steps, such as 20")

    def selected(self, length: int) -> int:
        """k for a sequence of ``length`` tokens."""
        return max(1, min(length, math.ceil(length / self.reduction_factor)))


def soft_top_k(scores: torch.Tensor, k: int, valid: torch.Tensor, config: CodaConfig) -> torch.Tensor:
    """lambda (B x n, in [0, 1], rows summing to k where k real tokens exist): the entropy-regularised
    top-k of ``scores`` over the ``valid`` positions, by coordinate descent with eps-scaling."""
    valid = valid | ~valid.any(dim=-1, keepdim=True)  # a row of padding only: spread over it, no NaN
    s = scores.float().masked_fill(~valid, float("-inf"))
    b = torch.zeros_like(s)
    log_k = math.log(k)
    eps = max(config.epsilon_init, config.epsilon)
    for _ in range(config.iterations):
        a = eps * (log_k - torch.logsumexp((s + b) / eps, dim=-1, keepdim=True))
        b = -torch.relu(s + a).masked_fill(~valid, 0.0)
        eps = max(eps * config.epsilon_decay, config.epsilon)
    lam = torch.exp((s + a + b) / eps).masked_fill(~valid, 0.0)
    # At most k real tokens: every one is selected in full (the exact solution; descent only nears it).
    return torch.where(valid.sum(dim=-1, keepdim=True) <= k, valid.to(lam.dtype), lam)


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """The attention mask as booleans, True = attend (bool masks as they are, additive: not -inf-ish)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def real_tokens(mask: Any, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """B x n booleans, True where a token is real: some query may attend to it. ``mask``: None, a 2-D
    padding mask, or the 4-D (B x heads x queries x keys) mask an encoder layer receives."""
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if mask.dim() == 2:
        return mask.to(device).bool()[:, -length:].expand(batch, length)
    if mask.dim() == 4:
        return _allowed(mask).any(dim=1).any(dim=1)[:, -length:].expand(batch, length)
    raise PeftlabError(f"coda reads the encoder layer's attention mask, but got one of shape {tuple(mask.shape)}; "
                       "expected a 2-D padding mask or a 4-D attention mask")


def _gather_mask(mask: Any, index: torch.Tensor) -> Any:
    """The attention mask restricted to the selected tokens (as queries and as keys)."""
    if mask is None:
        return None
    batch, k = index.shape
    if mask.dim() == 2:
        return mask.expand(batch, -1).gather(1, index)
    mask = mask.expand(batch, -1, -1, -1)
    heads, queries = mask.shape[1], mask.shape[2]
    if queries > 1:
        mask = mask.gather(2, index[:, None, :, None].expand(batch, heads, k, mask.shape[3]))
    return mask.gather(3, index[:, None, None, :].expand(batch, heads, mask.shape[2], k))


class CodaRouter(nn.Module):
    """The router's score vector w (d): s = X w."""

    def __init__(self, hidden: int, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(hidden, device=device, dtype=dtype) / math.sqrt(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.weight.dtype) @ self.weight


class CodaLayer(DeltaModule):
    """Wraps one encoder layer: the adapter on all tokens, the layer itself on the k routed tokens."""

    adapter_attrs = ("coda_router", "coda_adapter")

    def __init__(self, base_layer: nn.Module, hidden: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.coda_router = nn.ModuleDict()
        self.coda_adapter = nn.ModuleDict()
        self.hidden = hidden
        self.arg_names = list(inspect.signature(base_of(base_layer).forward).parameters)

    def add(self, name: str, config: CodaConfig) -> None:
        kw = factory_kwargs(self.base_layer)
        width = config.bottleneck if config.bottleneck is not None else max(1, self.hidden // 16)
        self.coda_router[name] = CodaRouter(self.hidden, **kw)
        self.coda_adapter[name] = Bottleneck(self.hidden, width, self.hidden, config.activation,
                                             config.init_scale, **kw)
        self.settings[name] = config

    def route(self, name: str, x: torch.Tensor, mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(index B x k of the selected tokens in sequence order, their soft top-k weights B x k)."""
        config = self.settings[name]
        batch, length = x.shape[:2]
        k = config.selected(length)
        valid = real_tokens(mask, batch, length, x.device)
        scores = self.coda_router[name](x)
        lam = soft_top_k(scores, k, valid, config)
        # Real tokens first, by score; padding only where a sequence has fewer than k real tokens.
        ranked = scores.detach().float().masked_fill(~valid, float("-inf"))
        index = ranked.topk(k, dim=-1).indices.sort(dim=-1).values
        return index, lam.gather(1, index)

    def _mask_argument(self, args: tuple, kwargs: dict) -> tuple[Any, bool]:
        """(the attention mask, whether it came positionally)."""
        if "attention_mask" in kwargs:
            return kwargs["attention_mask"], False
        index = self.arg_names.index("attention_mask") if "attention_mask" in self.arg_names else 1
        return (args[index], True) if len(args) > index else (None, False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        live = self.live_adapters()
        if not live:
            return self.base_layer(*args, **kwargs)
        if len(live) > 1:
            raise PeftlabError(f"coda adapters {live} are all active at one layer, but CoDA routes each layer's "
                               "tokens with one router; activate one coda adapter at a time (set_adapter(name))")
        name = live[0]
        x = args[0] if args else kwargs["hidden_states"]
        if x.dim() != 3 or x.shape[-1] != self.hidden:
            raise PeftlabError(f"coda wraps an encoder layer of hidden size {self.hidden}, but its input has shape "
                               f"{tuple(x.shape)}; expected batch x tokens x {self.hidden}")
        for value in (*args, *kwargs.values()):
            length = getattr(value, "get_seq_length", None)
            if callable(length) and length() > 0:
                raise PeftlabError("coda got a KV cache holding earlier tokens; CoDA routes over the whole "
                                   "sequence and applies to encoders only: run without a cache (use_cache=False)")
        mask, positional = self._mask_argument(args, kwargs)
        index, lam = self.route(name, x, mask)
        batch, k = index.shape
        rows = index[..., None].expand(batch, k, x.shape[-1])
        chosen = x.gather(1, rows)

        # The heavy layer on the k selected tokens only, with the mask restricted to them.
        sub_mask = _gather_mask(mask, index)
        sub_kwargs = {key: (value.expand(batch, -1).gather(1, index)
                            if key == "position_ids" and isinstance(value, torch.Tensor) else value)
                      for key, value in kwargs.items()}
        if positional:
            where = self.arg_names.index("attention_mask") if "attention_mask" in self.arg_names else 1
            sub_args = (chosen, *args[1:where], sub_mask, *args[where + 1:])
        else:
            sub_args = (chosen, *args[1:])
            sub_kwargs.pop("hidden_states", None)
            if "attention_mask" in kwargs or mask is not None:
                sub_kwargs["attention_mask"] = sub_mask
        out = self.base_layer(*sub_args, **sub_kwargs)
        heavy = out[0] if isinstance(out, tuple) else out

        update = (lam[..., None] * (heavy.float() - chosen.float())).to(x.dtype)
        y = x + self.coda_adapter[name](x)
        y = y.scatter_add(1, rows, update)
        return (y, *out[1:]) if isinstance(out, tuple) else y


def _encoder_layers(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED or getattr(model.config, "is_decoder", False):
        raise PeftlabError(
            f"coda applies to bidirectional encoders (model_type one of {list(SUPPORTED)}, is_decoder=False), "
            f"but got model_type {model_type!r}"
            f"{' as a decoder' if getattr(getattr(model, 'config', None), 'is_decoder', False) else ''}. CoDA picks "
            "the top k tokens of the whole sequence, which does not fit causal decoding; use an encoder model")
    paths = [n for n, _ in model.named_modules()
             if _LAYER_PATH.search(logical_name(n)) and not n.endswith(".base_layer")]
    if not paths:
        raise PeftlabError(f"coda found no encoder layers (modules named encoder.layer.<i>) in {type(model).__name__}")
    return paths


def _hidden_size(model: nn.Module) -> int:
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not is_positive_int(hidden):
        raise PeftlabError(f"coda needs the model's hidden size, but {type(model).__name__}.config has no positive "
                           f"integer hidden_size (got {hidden!r}); use a transformers encoder model")
    return int(hidden)


def attach(model: nn.Module, name: str, config: CodaConfig, host: Any = None) -> None:
    layers = _encoder_layers(model)
    if config.targets is not None:
        chosen = resolve_targets(model, config.targets)
        wrong = [logical_name(p) for p in chosen if p not in layers]
        if wrong:
            raise PeftlabError(f"CodaConfig.targets={config.targets!r} selects {wrong[:3]}, which are not encoder "
                               "layers; CoDA wraps whole layers: name them as 'encoder.layer.<i>' or leave targets=None")
        layers = chosen
    hidden = _hidden_size(model)
    for path in layers:
        # A new wrapper starts in training mode; it takes the wrapped layer's.
        layer = wrap(model, path, CodaLayer, lambda m: CodaLayer(m, hidden).train(m.training))
        layer.add(name, config)


SPEC = register(MethodSpec(
    name="coda", title="CoDA", family="additive", subcategory="adapter", config_cls=CodaConfig,
    trains="a parallel bottleneck adapter on all tokens and a token router per encoder layer; the frozen layer "
           "runs on the top k = n / r routed tokens only",
    attach=attach,
    paper="Lei et al. 2023, Conditional Adapters: Parameter-efficient Transfer Learning with Fast Inference",
    mergeable=False, identity_at_init=False, default_lr=1e-3, encoder_only=True,
))
