"""Tiny-attention adapter (Zhao, Tan and Mei, 2022, "Tiny-Attention Adapter: Contexts Are More Important
Than the Number of Parameters", EMNLP 2022; arXiv 2211.01979; reference code cindermond/tiny-attn).

A feed-forward adapter changes each position's hidden state from that state alone. The tiny-attention
adapter is an attention module with a tiny per-head width ``e`` (1 by default) that runs beside each
self-attention sublayer, reads the sublayer's input ``X`` (T x d: all positions) and adds its output to
the sublayer's output, so the change at a position depends on the states at the other positions::

    SUB'(X) = SUB(X) + (1/H) sum_h A_h(X)

    A_h(X) = W_out,h C_h + b_out,h                                  W_out,h: d x e
    C_h    = M_h softmax(Q_h K_h^T / sqrt(e) + mask) V_h + m_h       M_h: e x e  (the attention's own
                                                                              output projection)
    Q_h = P_q,h (U_q,h N_h(X) + c_q,h) + p_q,h   (K_h, V_h alike)    U_.,h: e x d, P_.,h: e x e
    N_h(X) = LayerNorm_h(X)                                          (own scale and shift per head)

This is the reference code's ``TinyAttention`` module (LayerNorm, ``linear1`` d -> 3e, a one-head
``nn.MultiheadAttention`` of width e with its e x e input and output projections, ``linear2`` e -> d),
written with a leading head dimension so that the ``H`` of them run as one batched computation.

Heads and parameter averaging. The paper views the ``H`` tiny-attention heads as a mixture of experts
with equal weights ``1/H`` (the mean above) and, for deployment, averages their *parameters* into one
head, ``theta = (1/H) sum_h theta_h``, which costs one head's computation at inference
(:func:`average_heads`, or :meth:`TinyAttentionLayer.average_heads`). This is exact when the heads are
equal and close (second order in the heads' spread) when they stay near a common point, which is why
the heads start from one shared draw plus a small perturbation (the reference code's
``RobertaLayerAda`` starts its four heads from one trained head plus ``N(0, 1e-6)`` noise on
``linear1``). Averaged heads are written back into every head slot, so a checkpoint keeps its shapes
and loads as before; the averaged layer then computes only the first slot.

Placement: beside each self-attention sublayer (the ``@self_attention`` attach point; the reference's
"parallel" structure ``s0``): the adapter's input is the sublayer's input (after the pre-LN norm in
GPT-2 and Llama, the layer input in post-LN BERT) and its output is added to the sublayer's output (the
first element of the returned tuple). On post-LN BERT the ``@self_attention`` module
(``attention.self``) stops before the output projection and LayerNorm, so the adapter wraps its parent
``BertAttention``, whose output is ``LN(dense(context) + X)``: the reference adds its adapter there, to
``RobertaAttention``'s output. T5's cross-attention sublayers get no adapter (a tiny *self*-attention).

Masking: the adapter's attention obeys the sublayer's attention mask (the 2-D padding mask, or the
4-D additive or boolean mask the model hands its attention modules) and, on causal sublayers (GPT-2,
Llama, T5's decoder: the wrapped module's ``is_causal`` / ``is_decoder``), causality — also when the
model hands down no mask at all (SDPA's causal fast path). Every position may always attend to itself,
so fully padded rows give no NaN.

Initialisation: LayerNorm scale 1, shift 0; ``U`` and ``c`` as ``nn.Linear``'s default; ``P`` Xavier
uniform with zero ``p``; ``M`` as ``nn.Linear``'s default with zero ``m``; ``W_out`` and ``b_out`` as
``nn.Linear``'s default times ``init_scale``. Defaults: ``num_heads=4`` (the reference's four averaged
heads), ``head_dim=1``, attention dropout 0.1, ``head_init_noise=1e-6``. One head at one site trains
``2d + 3(e d + e) + 3(e^2 + e) + (e^2 + e) + (d e + d)`` parameters (7,179 for d = 1024, e = 1: one head
at each of RoBERTa-large's 24 layers is the paper's 0.05%, which is also what an averaged adapter
deploys). Not mergeable: softmax is nonlinear.

Deviations, and why:
- ``init_scale`` defaults to 0 (the output projection starts at zero: identity at init, as the library
  promises for adapters); the reference scales ``linear2``'s default initialisation by 0.01. Pass
  ``init_scale=0.01`` for the reference's start. The other weights still get gradients after one step.
- Heads read the same input and their outputs are averaged, as the paper's mixture of experts; the
  reference's ``RobertaLayerAda`` applies its four heads one after another (each reads the state the
  previous one changed).
- The reference's default run script places the adapter after the attention sublayer, reading its
  output (structure ``m0``); the paper presents the parallel structure (its Figure 3), used here.
- The reference averages heads to evaluate a checkpoint while training continues with four; here
  averaging is a deliberate, in-place step (:func:`average_heads`) that one undoes by reloading.
- Incremental decoding with a KV cache is refused (an error, naming ``use_cache=False``; the spec
  declares ``needs_full_sequence``, so ``PeftModel.generate`` decodes without the cache): the adapter
  keeps no cache of its own, so with earlier tokens only in the cache it would attend to the new tokens
  alone and silently compute something else. (The reference's GPT-2/BART variants carry their own cache.)
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
from ...core.errors import PeftlabError
from ...core.inject import wrap
from ...core.layer import DeltaModule, base_of
from ...core.registry import MethodSpec, register
from ...core.targets import architecture_of, resolve_targets
from .sequential_adapter import factory_kwargs

_LN_EPS = 1e-5  # nn.LayerNorm's default, as the reference's LayerNorm


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class TinyAttentionConfig(PeftConfig):
    """num_heads: H, the tiny-attention heads per site, averaged in the output (and averaged into one
    head for deployment by :func:`average_heads`); head_dim: e, each head's query/key/value width (1 in
    the paper); dropout: dropout on the attention probabilities in training (0.1, as the reference);
    init_scale: factor on the output projection's default initialisation (0: identity at init; the
    reference uses 0.01); head_init_noise: standard deviation of the noise that sets the heads apart
    from their shared starting draw, on the input projection (the reference's 1e-6); targets: ``None``
    for each self-attention sublayer, or attention modules to run beside (their first argument is the
    hidden states, their output the sublayer output or a tuple starting with it)."""

    targets: tuple[str, ...] | str | None = None
    num_heads: int = 4
    head_dim: int = 1
    dropout: float = 0.1
    init_scale: float = 0.0
    head_init_noise: float = 1e-6

    def validate(self) -> None:
        self._require(is_positive_int(self.num_heads), "num_heads",
                      "a positive integer H, the tiny-attention heads per site (the reference averages 4)")
        self._require(is_positive_int(self.head_dim), "head_dim",
                      "a positive integer e, each head's query/key/value width (the paper's tiny attention uses 1)")
        self._require(_finite_number(self.dropout) and 0 <= self.dropout < 1, "dropout",
                      "a probability in [0, 1) for the attention-probability dropout (the reference uses 0.1)")
        self._require(_finite_number(self.init_scale) and self.init_scale >= 0, "init_scale",
                      "a finite number >= 0 scaling the output projection's initialisation (0: identity at "
                      "init; the reference uses 0.01)")
        self._require(_finite_number(self.head_init_noise) and self.head_init_noise >= 0, "head_init_noise",
                      "a finite number >= 0, the std of the noise that sets the heads apart (the reference "
                      "uses 1e-6)")


class TinyHeads(nn.Module):
    """The ``H`` tiny-attention heads of one adapter at one site, as stacked tensors (head first).

    norm_weight, norm_bias: H x d (LayerNorm); qkv_weight: H x 3e x d, qkv_bias: H x 3e (``linear1``);
    proj_weight: H x 3 x e x e, proj_bias: H x 3 x e (the attention's q/k/v input projections);
    mix_weight: H x e x e, mix_bias: H x e (the attention's output projection); out_weight: H x d x e,
    out_bias: H x d (``linear2``).
    """

    def __init__(self, hidden: int, config: TinyAttentionConfig, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        h, e, d = config.num_heads, config.head_dim, hidden
        kw = {"device": device, "dtype": dtype}

        def one(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, **kw)

        # One head is drawn; every head starts from it (so their parameters can be averaged later).
        qkv_weight = nn.init.uniform_(one(3 * e, d), -1 / math.sqrt(d), 1 / math.sqrt(d))
        qkv_bias = nn.init.uniform_(one(3 * e), -1 / math.sqrt(d), 1 / math.sqrt(d))
        proj_weight = nn.init.xavier_uniform_(one(3 * e, e)).reshape(3, e, e)
        mix_weight = nn.init.uniform_(one(e, e), -1 / math.sqrt(e), 1 / math.sqrt(e))
        out_weight = nn.init.uniform_(one(d, e), -1 / math.sqrt(e), 1 / math.sqrt(e)) * config.init_scale
        out_bias = nn.init.uniform_(one(d), -1 / math.sqrt(e), 1 / math.sqrt(e)) * config.init_scale

        def heads(t: torch.Tensor, noise: float = 0.0) -> nn.Parameter:
            stacked = t.unsqueeze(0).repeat(h, *([1] * t.dim()))
            if noise:
                stacked = stacked + torch.randn_like(stacked) * noise
            return nn.Parameter(stacked)

        self.norm_weight = heads(torch.ones(d, **kw))
        self.norm_bias = heads(torch.zeros(d, **kw))
        self.qkv_weight = heads(qkv_weight, config.head_init_noise)
        self.qkv_bias = heads(qkv_bias, config.head_init_noise)
        self.proj_weight = heads(proj_weight)
        self.proj_bias = heads(torch.zeros(3, e, **kw))
        self.mix_weight = heads(mix_weight)
        self.mix_bias = heads(torch.zeros(e, **kw))
        self.out_weight = heads(out_weight)
        self.out_bias = heads(out_bias)

    @property
    def num_heads(self) -> int:
        return self.norm_weight.shape[0]

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, dropout: float = 0.0,
                used: int | None = None) -> torch.Tensor:
        """x: B x T x d; allowed: B x T x T (query, key) booleans; the first ``used`` heads (all by
        default) -> B x T x d, the mean of their outputs."""
        n = self.num_heads if used is None else used
        e = self.mix_weight.shape[-1]
        dtype = self.qkv_weight.dtype
        z = F.layer_norm(x.to(dtype), (x.shape[-1],), eps=_LN_EPS)
        # linear1(LN_h(x)) = (U_h * g_h) z + (U_h beta_h + c_h): the per-head LayerNorm affine folded in.
        w = self.qkv_weight[:n] * self.norm_weight[:n, None, :]
        b = self.qkv_bias[:n] + torch.einsum("hkd,hd->hk", self.qkv_weight[:n], self.norm_bias[:n])
        qkv = torch.einsum("btd,hkd->bhtk", z, w) + b[None, :, None, :]
        qkv = qkv.unflatten(-1, (3, e))  # B x H x T x 3 x e
        qkv = torch.einsum("bhtie,hife->bhtif", qkv, self.proj_weight[:n]) + self.proj_bias[:n, None]
        q, k, v = qkv.unbind(3)
        scores = q @ k.transpose(-1, -2) / math.sqrt(e)  # B x H x T x T
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        probs = F.dropout(scores.softmax(dim=-1), p=dropout, training=dropout > 0)
        ctx = torch.einsum("bhte,hfe->bhtf", probs @ v, self.mix_weight[:n]) + self.mix_bias[:n, None]
        out = torch.einsum("bhte,hde->btd", ctx, self.out_weight[:n]) / n + self.out_bias[:n].mean(0)
        return out.to(x.dtype)

    @torch.no_grad()
    def average(self) -> None:
        """Replace every head by the parameter average of all heads (the paper's deployment step)."""
        for p in self.parameters():
            p.copy_(p.mean(dim=0, keepdim=True).expand_as(p))


def allowed_positions(mask: Any, batch: int, length: int, causal: bool, device: torch.device) -> torch.Tensor:
    """B x T x T booleans, True where query position i may attend to key position j.

    mask: ``None``; a 2-D padding mask (B x T, nonzero = token); or a 3-D/4-D mask over (query, key)
    (B x [heads x] Q x K) — boolean (True = attend) or additive (0 = attend, large negative = masked).
    """
    allowed = torch.ones(batch, length, length, dtype=torch.bool, device=device)
    if isinstance(mask, torch.Tensor):
        if mask.dim() == 2:
            allowed = allowed & mask[:, None, :length].to(device).bool()
        elif mask.dim() in (3, 4):
            m = mask[:, 0] if mask.dim() == 4 else mask
            m = m[:, -length:, :length].to(device)
            keep = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
            allowed = allowed & keep
        else:
            raise PeftlabError(f"tiny_attention reads the attention module's mask, but got one of shape "
                               f"{tuple(mask.shape)}; expected a 2-D padding mask or a 3-/4-D attention mask")
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=device).tril()
    # Every position sees itself: a fully masked (padding) row gets no NaN, and no real row changes.
    return allowed | torch.eye(length, dtype=torch.bool, device=device)


_MASK_NAMES = ("attention_mask", "mask")


class TinyAttentionLayer(DeltaModule):
    """Wraps an attention sublayer; adds the tiny-attention adapters' mean output to its output.

    causal: the sublayer attends causally (the adapter then does too, with or without a mask passed).
    """

    adapter_attrs = ("tiny_attn",)

    def __init__(self, base_layer: nn.Module, hidden: int, causal: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.tiny_attn = nn.ModuleDict()
        self.hidden = hidden
        self.causal = causal
        self.arg_names = list(inspect.signature(base_of(base_layer).forward).parameters)
        self.layer_idx = next((m.layer_idx for m in base_of(base_layer).modules()
                               if isinstance(getattr(m, "layer_idx", None), int)), 0)

    def add(self, name: str, config: TinyAttentionConfig) -> None:
        self.tiny_attn[name] = TinyHeads(self.hidden, config, **factory_kwargs(self.base_layer))
        self.settings[name] = {"dropout": float(config.dropout), "averaged": False}

    def average_heads(self, name: str) -> None:
        """Average adapter ``name``'s heads into one (written to every head slot); later forwards
        compute that one head only."""
        self.tiny_attn[name].average()
        self.settings[name]["averaged"] = True

    def _argument(self, names: tuple[str, ...], args: tuple, kwargs: dict) -> Any:
        for key in names:
            if key in kwargs:
                return kwargs[key]
            if key in self.arg_names and self.arg_names.index(key) < len(args):
                return args[self.arg_names.index(key)]
        return None

    def _refuse_cached_past(self, args: tuple, kwargs: dict) -> None:
        for value in (*args, *kwargs.values()):
            length = getattr(value, "get_seq_length", None)
            if callable(length) and length(self.layer_idx) > 0:
                raise PeftlabError(
                    "tiny_attention got a KV cache holding earlier tokens (incremental decoding); its tiny "
                    "attention keeps no cache, so it would see the new tokens only. Run the full sequence "
                    "each step: generate(..., use_cache=False) or model(..., use_cache=False)")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        live = self.live_adapters()
        if not live:
            return self.base_layer(*args, **kwargs)
        self._refuse_cached_past(args, kwargs)
        x = args[0] if args else kwargs["hidden_states"]
        if x.shape[-1] != self.hidden:
            raise PeftlabError(f"tiny_attention at this sublayer was built for hidden size {self.hidden} but "
                               f"its input has {x.shape[-1]}; target attention modules whose first argument is "
                               "the hidden states")
        allowed = allowed_positions(self._argument(_MASK_NAMES, args, kwargs), x.shape[0], x.shape[1],
                                    self.causal, x.device)
        delta = None
        for name in live:
            heads, settings = self.tiny_attn[name], self.settings[name]
            part = heads(x, allowed, settings["dropout"] if self.training else 0.0,
                         used=1 if settings["averaged"] else None)
            delta = part if delta is None else delta + part
        out = self.base_layer(*args, **kwargs)
        # Attention modules return (output, weights, ...): the sublayer output is the first element.
        return (out[0] + delta, *out[1:]) if isinstance(out, tuple) else out + delta


def _is_causal(module: nn.Module) -> bool:
    flags = [m.is_causal for m in base_of(module).modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if flags:
        return any(flags)
    return any(getattr(m, "is_decoder", False) is True for m in base_of(module).modules())


def _sites(model: nn.Module, config: TinyAttentionConfig) -> list[str]:
    if config.targets is not None:
        return resolve_targets(model, config.targets)
    paths = resolve_targets(model, ("@self_attention",))
    if architecture_of(model).ffn_input_arg is not None:
        # Post-LN (BERT): the self-attention core stops before its output projection and LayerNorm;
        # the sublayer whose output the adapter joins is its parent.
        paths = list(dict.fromkeys(path.rpartition(".")[0] for path in paths))
    return paths


def _hidden_size(model: nn.Module) -> int:
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not is_positive_int(hidden):
        raise PeftlabError(f"tiny_attention needs the model's hidden size, but {type(model).__name__}.config has "
                           f"no positive integer hidden_size (got {hidden!r}); use a transformers model")
    return int(hidden)


def attach(model: nn.Module, name: str, config: TinyAttentionConfig, host: Any = None) -> None:
    hidden = _hidden_size(model)
    for path in _sites(model, config):
        # A new wrapper starts in training mode; it takes the wrapped sublayer's (dropout must not run
        # in a model that was put in eval mode before the adapter came).
        layer = wrap(model, path, TinyAttentionLayer,
                     lambda m: TinyAttentionLayer(m, hidden, _is_causal(m)).train(m.training))
        layer.add(name, config)


def average_heads(model: nn.Module, adapter_name: str = "default") -> int:
    """The paper's deployment step: average adapter ``adapter_name``'s heads into one at every site
    (in place; reload the checkpoint to undo). Returns the number of sites averaged."""
    layers = [m for m in model.modules() if isinstance(m, TinyAttentionLayer) and adapter_name in m.tiny_attn]
    if not layers:
        raise PeftlabError(f"no tiny_attention adapter named {adapter_name!r} in this model; pass the name given "
                           "to get_peft_model/add_adapter")
    for layer in layers:
        layer.average_heads(adapter_name)
    return len(layers)


SPEC = register(MethodSpec(
    name="tiny_attention", title="Tiny-Attention adapter", family="additive", subcategory="adapter", config_cls=TinyAttentionConfig,
    trains="tiny multi-head attention (per-head width 1) beside each self-attention sublayer, reading its input",
    attach=attach,
    paper="Zhao, Tan and Mei 2022, Tiny-Attention Adapter: Contexts Are More Important Than the Number of Parameters",
    mergeable=False, identity_at_init=True, default_lr=1e-3, needs_full_sequence=True,
))
