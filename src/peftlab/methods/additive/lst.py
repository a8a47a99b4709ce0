"""LST: Ladder Side-Tuning (Yi-Lin Sung, Jaemin Cho, Mohit Bansal, 2022, "LST: Ladder Side-Tuning for
Parameter and Memory Efficient Transfer Learning", NeurIPS 2022; arXiv 2206.06522; reference code
github.com/ylsung/Ladder-Side-Tuning, ``seq2seq/third_party/models/t5/modeling_side_t5.py`` and
``seq2seq/pruning/pruning_methods.py``).

The backbone is frozen and runs *without building an autograd graph*; a small side network, the
backbone's own layer design shrunk by a reduction factor ``r``, reads the backbone's intermediate
states through gated "ladder" connections and produces what the model's head reads. No gradient
flows into the backbone, so nothing computed inside its layers is kept for a backward pass; autograd
keeps only the ``L + 1`` states the ladders read (their weight gradients need them) and the side
network's activations, at width ``d / r`` (the paper: 69% less memory than full fine-tuning on
T5-base). With ``h_0`` the embedding output and ``h_i`` the output of backbone layer
``i`` (computed under ``torch.no_grad()``)::

    s_0 = D_0 h_0                                       D_*: linear d -> d/r (with bias), trained
    for each side layer i (all layers unless side_layers says otherwise), in order:
        mu_i = sigmoid(alpha_i / T)                     alpha_i: one trained scalar, T = 0.1
        s   <- f_i( mu_i * D_i h_i + (1 - mu_i) * s )   f_i: side transformer layer of width d/r
    encoder output := U s                               U: linear d/r -> d (with bias), trained

The model's head then runs as usual, with gradients, on ``U s`` (BERT: pooler and classifier; train
the classifier too, as the paper trains its side head: ``modules_to_save=("classifier",)``).

Side layers are the backbone's layer class (``BertLayer``) built from a copy of the model config with
``hidden_size = d // r`` and ``intermediate_size = I // r`` and the same number of heads (head width
divided by ``r``), as the reference builds its side ``T5Block`` from ``d_model, d_ff, d_kv`` divided by
``r``. Initialisation (``init="pruned"``, the paper's): side layer ``i`` starts from backbone layer ``i``
structurally pruned, as the reference's ``pruning_v2``: along one chain through the network each weight
matrix keeps the input columns its predecessor kept and the ``1/r`` share of its output rows with the
largest L1 importance; query/key/value share one row choice, ranked by the L1 norm of the rows of
``|W_q * W_k * W_v|``; biases and LayerNorms follow their matrix's rows; the chain starts at the
word-embedding matrix (its hidden dimensions ranked by their L1 norm over the vocabulary) and runs
q/k/v -> attention output -> intermediate -> output -> the next layer's q/k/v. Like the reference, the
chain ignores the residual stream (each matrix picks its own rows), which a fresh side network permits.
Ladder and up-projections use ``nn.Linear``'s default initialisation and ``alpha_i = 0`` (``mu = 0.5``),
as the reference (``gate_alpha=0``, ``gate_T=0.1``, ``add_bias_sampling=True``); ``init="random"``
(the reference's ``load_side_pretrained_weights=""``) draws side-layer weights N(0, initializer_range).

Trainable parameters (all-MiniLM-L6-v2, d = 384, I = 1536, 6 layers, r = 8): 317,814 (1.40% of the
22.7M model), plus 770 for a trained 2-class classifier. Not mergeable (a separate network); not the
base model at init (the head reads the side network), so ``identity_at_init=False``; disabling or
deleting the adapter gives the base model back exactly.

Placement: the encoder module (``bert.encoder``) is wrapped; the wrapper runs the backbone layers
itself, as the encoder does, under ``torch.no_grad()``, then the side network with gradients, and
returns ``U s`` as the encoder's ``last_hidden_state``. Backbone layers after the last side layer are
not run at all (their output is not read). ``side_layers`` keeps a side layer (with its ladder and
gate) only beside the backbone layers it names: the reference's layer dropping
(``encoder_side_layers``; its T5-base script keeps ``[1, 2, 3, 5, 6, 7, 9, 10, 11]``).

Models: BERT-family encoders (bert, roberta, xlm-roberta, electra, camembert, mpnet: an ``encoder``
holding a ``layer`` list of post-LN blocks with the BERT weight names). Refused, naming what is
supported: decoders (GPT-2, Llama) and encoder-decoders (T5): the paper's T5 version also needs a side
decoder with side cross-attention and its own KV cache, which is not implemented here; BERT configured
as a decoder. One LST adapter can be live at a time (each replaces the encoder output). With LST live,
``output_hidden_states`` lists whatever transformers' recorder finds (backbone and side ``BertLayer``
outputs alike); read the states of the base model with the adapter disabled.

Deviations, and why:
- Importance is the weights' own magnitude (the reference's data-free ``t5-base-v2`` path), not the
  Fisher information from training batches that the paper and its GLUE scripts use (``fisher-v2``):
  Fisher needs a backward pass through the whole backbone with weight gradients (full fine-tuning's
  memory) before training; attaching here needs no data. The checkpoint holds the side weights either
  way, so loading does not depend on the choice.
- The gate is written as in the paper, ``mu * D h + (1 - mu) * s``; the reference code weights the side
  state by the gate instead (``gate * s + (1 - gate) * D h``), the same family with ``alpha -> -alpha``
  (and identical at the initial ``alpha = 0``).
- BERT has no final LayerNorm after its last layer (post-LN), so there is no final side LayerNorm;
  T5's side network has one because T5's encoder does.
- The embedding output ``h_0`` reaches the side network detached, so even when something makes the
  input embeddings require a gradient (HF's ``enable_input_require_grads`` for gradient checkpointing),
  no graph is built below the side network. Adapters of other methods inside the backbone therefore
  do not train while LST is live.
- ``side_layers`` defaults to every layer. The reference's T5-base GLUE script drops every fourth side
  layer from the first (keeps ``[1, 2, 3, 5, 6, 7, 9, 10, 11]`` of 12); that list depends on the depth,
  which a config does not know: for a 6-layer MiniLM the analogue is ``side_layers=(1, 2, 3, 5)``.
- ``default_lr`` is the reference's GLUE rate for LST on T5-base, 3e-3 (``ladder_side_tuning_base.sh``).

Memory, ad hoc (one AdamW step, random MiniLM-size BERT: d 384, 6 layers, 12 heads, I 1536, batch
8 x 128, CPU, fp32; saved activations + gradients + Adam state + weights): full fine-tuning 621 MB
(275 MB activations), LoRA r 8 on query/value 303 MB (215 MB), LST r 8 233 MB (141 MB): 63% below full
fine-tuning (LoRA: 51%). Most of LST's remaining activations are the side layers' attention maps,
which keep the backbone's 12 heads (as the reference's side T5 blocks do), so they do not shrink with r.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from ...core.config import PeftConfig
from ...core.errors import PeftlabError
from ...core.inject import wrap
from ...core.layer import DeltaModule, base_of
from ...core.registry import MethodSpec, register
from ...core.targets import ARCHITECTURES

INITS = ("pruned", "random")
_BERT_TYPES = tuple(sorted(a for a, arch in ARCHITECTURES.items() if arch is ARCHITECTURES["bert"]))
# Encoder arguments that the side layers must not see (cross-attention, caches) or that are the encoder's own.
_ENCODER_ONLY_ARGS = ("hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
                      "cache", "past_key_values", "use_cache")


@dataclasses.dataclass(frozen=True)
class LstConfig(PeftConfig):
    """reduction_factor: r, side width d // r and FFN width I // r (the paper's 8); side_layers: the
    backbone layers (0-based) that get a side layer with its ladder and gate (None: every layer; fewer
    is the reference's layer dropping); gate_temperature: T in mu = sigmoid(alpha / T) (0.1);
    gate_init: alpha at init (0: mu = 0.5); init: "pruned" (side layers from the structurally pruned
    backbone layers, the paper's) or "random" (N(0, initializer_range)). ``targets`` is not used: the
    side network runs beside the whole encoder."""

    reduction_factor: int = 8
    side_layers: tuple[int, ...] | None = None
    gate_temperature: float = 0.1
    gate_init: float = 0.0
    init: str = "pruned"

    def validate(self) -> None:
        self._require(self.targets is None, "targets",
                      "None: LST runs a side network beside the whole encoder; choose layers with side_layers")
        self._require(self.reduction_factor >= 1, "reduction_factor",
                      "a positive integer r; the side network has width hidden_size // r (the paper uses 8)")
        layers = self.side_layers
        self._require(layers is None or (isinstance(layers, tuple) and len(layers) > 0 and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
            and list(layers) == sorted(set(layers))), "side_layers",
            "None (every layer) or increasing, distinct 0-based backbone layer indices, e.g. (1, 2, 3, 5)")
        self._require(self.gate_temperature > 0, "gate_temperature", "a positive number T (the paper uses 0.1)")
        self._require(self.init in INITS, "init", f"one of {INITS}")


class SideNetwork(nn.Module):
    """One adapter's side network: ladders ``downs`` (D_1..D_n), the first ladder ``first_down``
    (D_0, on the embedding output), gate logits ``gates`` (alpha, one per side layer), the side
    ``layers`` and the up-projection ``up``."""

    def __init__(self, first_down: nn.Linear, downs: list[nn.Linear], gates: torch.Tensor,
                 layers: list[nn.Module], up: nn.Linear) -> None:
        super().__init__()
        self.first_down = first_down
        self.downs = nn.ModuleList(downs)
        self.gates = nn.Parameter(gates)
        self.layers = nn.ModuleList(layers)
        self.up = up


@dataclasses.dataclass(frozen=True)
class _Setting:
    layers: tuple[int, ...]  # backbone layer index beside each side layer
    temperature: float


class LadderSideEncoder(DeltaModule):
    """Wraps the encoder: with an LST adapter live, runs the backbone layers without a graph and
    returns the side network's up-projected output as the encoder's ``last_hidden_state``."""

    adapter_attrs = ("lst_side",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lst_side = nn.ModuleDict()

    def backbone_layers(self) -> nn.ModuleList:
        return base_of(self.base_layer).layer

    def add(self, name: str, config: LstConfig, model: nn.Module) -> None:
        blocks = self.backbone_layers()
        count = len(blocks)
        chosen = tuple(range(count)) if config.side_layers is None else config.side_layers
        if chosen[-1] >= count:
            raise PeftlabError(f"LstConfig.side_layers={list(chosen)} names layer {chosen[-1]}, but "
                               f"{type(model).__name__} has {count} layers (0 to {count - 1}); name layers in "
                               "that range")
        # New modules start in train mode; the side network follows the model's mode (dropout).
        self.lst_side[name] = _build_side_network(model, blocks, chosen, config).train(self.base_layer.training)
        self.settings[name] = _Setting(chosen, float(config.gate_temperature))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        live = self.live_adapters()
        if not live:
            return self.base_layer(*args, **kwargs)
        if len(live) > 1:
            raise PeftlabError(f"LST adapters {live} are live at once, but each replaces the encoder output with "
                               "its own side network; activate one of them (set_adapter)")
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if len(args) > 2 or kwargs.get("encoder_hidden_states") is not None or kwargs.get("cache") is not None \
                or kwargs.get("past_key_values") is not None:
            raise PeftlabError("LST runs BERT-family encoders without cross-attention or a cache; the encoder was "
                               "called with encoder_hidden_states or a cache (is the model configured as a decoder?)")
        rest = {k: v for k, v in kwargs.items() if k not in _ENCODER_ONLY_ARGS}
        side, setting = self.lst_side[live[0]], self.settings[live[0]]
        # The backbone: no graph, so nothing of it is kept for backward and no gradient reaches it.
        states = [hidden.detach()]
        with torch.no_grad():
            state = hidden
            for block in self.backbone_layers()[: setting.layers[-1] + 1]:
                state = _main(block(state, mask, **rest))
                states.append(state)
        s = side.first_down(states[0])
        for j, i in enumerate(setting.layers):
            mu = torch.sigmoid(side.gates[j] / setting.temperature)
            s = mu * side.downs[j](states[i + 1]) + (1 - mu) * s
            s = _main(side.layers[j](s, mask, **rest))
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=side.up(s))


def _main(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


# -- building the side network ------------------------------------------------------------------------
def _build_side_network(model: nn.Module, blocks: nn.ModuleList, chosen: tuple[int, ...],
                        config: LstConfig) -> SideNetwork:
    model_config = model.config
    r = config.reduction_factor
    d, inner, heads = model_config.hidden_size, model_config.intermediate_size, model_config.num_attention_heads
    side_d, side_inner = d // r, inner // r
    if side_d < heads or side_d % heads or side_inner < 1:
        fits = [k for k in range(1, d + 1) if (d // k) >= heads and (d // k) % heads == 0 and inner // k >= 1]
        raise PeftlabError(f"LstConfig.reduction_factor={r} gives side width {d} // {r} = {side_d}, which "
                           f"{type(model).__name__}'s {heads} attention heads do not divide (the side layers keep the "
                           f"backbone's head count); pick a reduction_factor from {fits[-8:]}")
    side_config = copy.deepcopy(model_config)
    side_config.hidden_size, side_config.intermediate_size = side_d, side_inner
    weight = model.get_input_embeddings().weight
    kw = {"device": weight.device, "dtype": weight.dtype}
    layer_cls = type(base_of(blocks[0]))
    pruned = _pruned_layer_states(model, blocks, side_d, side_inner) if config.init == "pruned" else None
    layers = []
    for i in chosen:
        try:
            layer = layer_cls(side_config, layer_idx=i)
        except TypeError:  # layer classes without a layer index
            layer = layer_cls(side_config)
        layer.to(**kw)
        if pruned is None:
            _init_random(layer, float(getattr(model_config, "initializer_range", 0.02)))
        else:
            try:
                layer.load_state_dict(pruned[i], strict=True)
            except RuntimeError as err:
                raise PeftlabError(f"LST builds its side layers as {layer_cls.__name__} with the BERT layer's weight "
                                   f"names; this one differs ({str(err).splitlines()[0]}). Use init='random', or a "
                                   "standard BERT-family model") from None
        layers.append(layer)
    return SideNetwork(
        first_down=nn.Linear(d, side_d, **kw),
        downs=[nn.Linear(d, side_d, **kw) for _ in chosen],
        gates=torch.full((len(chosen),), float(config.gate_init), **kw),
        layers=layers,
        up=nn.Linear(side_d, d, **kw),
    )


def _init_random(layer: nn.Module, std: float) -> None:
    with torch.no_grad():
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()


def top_rows(importance: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices, ascending, of the ``keep`` rows of ``importance`` with the largest L1 norm."""
    return importance.abs().sum(dim=1).topk(keep).indices.sort().values


def _linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    base = base_of(module)
    return base.weight.detach(), base.bias.detach()


@torch.no_grad()
def _pruned_layer_states(model: nn.Module, blocks: nn.ModuleList, side_d: int,
                         side_inner: int) -> list[dict[str, torch.Tensor]]:
    """The state dict of every backbone layer, structurally pruned to the side widths along the
    reference's chain (see the module docstring)."""
    embeddings = model.get_input_embeddings().weight.detach()
    columns = top_rows(embeddings.T, side_d)  # the hidden dimensions the first layer's q/k/v read
    states = []
    for block in blocks:
        block = base_of(block)
        state: dict[str, torch.Tensor] = {}
        attention = block.attention
        qkv = {n: _linear(getattr(attention.self, n)) for n in ("query", "key", "value")}
        product = torch.ones_like(qkv["query"][0][:, columns])
        for w, _ in qkv.values():
            product = product * w[:, columns]
        rows = top_rows(product, side_d)
        for n, (w, b) in qkv.items():
            state[f"attention.self.{n}.weight"] = w[rows][:, columns].clone()
            state[f"attention.self.{n}.bias"] = b[rows].clone()
        columns = rows
        for prefix, linear, norm, width in (
                ("attention.output", attention.output.dense, attention.output.LayerNorm, side_d),
                ("intermediate", block.intermediate.dense, None, side_inner),
                ("output", block.output.dense, block.output.LayerNorm, side_d)):
            w, b = _linear(linear)
            rows = top_rows(w[:, columns], width)
            state[f"{prefix}.dense.weight"] = w[rows][:, columns].clone()
            state[f"{prefix}.dense.bias"] = b[rows].clone()
            if norm is not None:
                state[f"{prefix}.LayerNorm.weight"] = norm.weight.detach()[rows].clone()
                state[f"{prefix}.LayerNorm.bias"] = norm.bias.detach()[rows].clone()
            columns = rows
        states.append(state)
    return states


# -- attaching ----------------------------------------------------------------------------------------
def _encoder_path(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    supported = f"BERT-family encoders ({', '.join(_BERT_TYPES)})"
    if getattr(config, "is_encoder_decoder", False):
        raise PeftlabError(f"LST is implemented for {supported}; {type(model).__name__} is an encoder-decoder model "
                           f"(model_type {model_type!r}), whose side network would also need a side decoder with "
                           "cross-attention and its own cache. Use another method for it.")
    if model_type not in _BERT_TYPES:
        raise PeftlabError(f"LST is implemented for {supported}; {type(model).__name__} has model_type "
                           f"{model_type!r} (decoders such as GPT-2 and Llama are not supported). Use a BERT-family "
                           "encoder, or another method for this model.")
    if getattr(config, "is_decoder", False):
        raise PeftlabError(f"LST is implemented for {supported} used as encoders; {type(model).__name__} is "
                           "configured as a decoder (config.is_decoder=True). Load it as an encoder.")
    paths = [n for n, m in model.named_modules() if n.rpartition(".")[2] == "encoder"
             and isinstance(getattr(base_of(m), "layer", None), nn.ModuleList)]
    if len(paths) != 1:
        raise PeftlabError(f"LST looks for one 'encoder' module holding the layer list ('layer') in "
                           f"{type(model).__name__}, and found {paths or 'none'}")
    return paths[0]


def attach(model: nn.Module, name: str, config: LstConfig, host: Any) -> None:
    path = _encoder_path(model)
    wrap(model, path, LadderSideEncoder).add(name, config, model)


SPEC = register(MethodSpec(
    name="lst", title="LST", family="additive", subcategory="others", config_cls=LstConfig,
    trains="a side network of width d/r (backbone layers pruned by r) fed by gated ladders from the "
           "frozen backbone, which runs without a graph; its up-projected output feeds the head",
    attach=attach,
    paper="Sung, Cho, Bansal 2022, LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer Learning",
    mergeable=False, identity_at_init=False, default_lr=3e-3, encoder_only=True,
))
