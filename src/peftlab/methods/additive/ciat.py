"""CIAT, the counter-interference adapter (Zhu, Feng, Zhao, Wang and Li, 2021, "Counter-Interference Adapter
for Multilingual Machine Translation", Findings of EMNLP 2021; arXiv 2104.08154, whose first version was
titled "Serial or Parallel? Plug-able Adapter for multilingual machine translation").

A multilingual translation model is trained on all language pairs, frozen, and then given small
adapters per language pair that move its representations back towards language-specific ones. Two
kinds of adapter, both bottleneck networks with a ReLU:

Embedding adapter, on the token embedding ``e`` of the encoder and (separately) of the decoder, with
a LayerNorm of its own (trained) at its input::

    e <- e + W_up drop(relu(W_down LN(e) + b_down)) + b_up

Intra-layer (parallel) adapter, beside every self-attention and every FFN sublayer of the encoder and
the decoder. It reads the sublayer's input ``u`` (in a pre-LN block: ``u = LN(x)``, the same normed
input the sublayer reads) and its output joins the sublayer's output before the residual add::

    x <- x + SUB(u) + W_up drop(relu(W_down u + b_down)) + b_up

Where this comes from. The paper's PDF was not available to me (only its abstract); what follows was
read in the authors' reference code (github.com/Yaoming95/CIAT, NeurST/TensorFlow):
``layers/adapters/adapterEmb.py`` and ``adapterLayer.py`` (LN -> Dense(relu) -> dropout -> Dense; the
layer adapter is built with ``use_norm=False``), ``layers/common_layers.py``
``PrePostProcessingWrapperWithadapter`` (``y = SUB(LN x) + A(LN x)``, return ``x + y``),
``layers/encoders/transformer_encoder_CIAT.py`` and ``layers/decoders/transformer_decoder_CIAT.py``
(``x = x + emb_adapter(x)`` on each side; adapters on self-attention and FFN; the decoder's
encoder-decoder attention is built *without* an adapter), ``models/transformer_CIAT.py`` (widths
``d // 2`` for both kinds; in the tuning stage the base model, its embeddings and norms are frozen)
and ``configs/tune-on-en2de.yml``. There are no cross-layer adapters in that code.

Placement per architecture (peftlab's ``@`` sites): encoder-decoder models (T5) get an embedding
adapter on ``encoder.embed_tokens`` and one on ``decoder.embed_tokens`` (T5's ``@embeddings``: the modules
the two stacks call, which share their weight), two separate
networks as the paper's encoder and decoder ones, and layer adapters beside every ``SelfAttention``
and ``DenseReluDense``.
Decoder-only models (GPT-2, Llama) get one embedding adapter on the token lookup (``@embeddings``),
encoders (BERT) one on the whole embedding module (see the deviations), and all get layer adapters
beside self-attention and FFN. The layer adapter reuses the parallel adapter's
wrapper (:class:`~peftlab.methods.additive.parallel_adapter.ParallelAdapterLayer`), which also
handles post-LN BERT, where ``BertSelfOutput``/``BertOutput`` take the residual as an argument: the
adapter output is added to that argument, which equals adding it to ``SUB(x)`` before the LN.

Per-language adapters: the paper keeps one set of adapters per language pair over a shared model;
in peftlab one language pair is one adapter name (``add_adapter("en-de", CiatConfig())``,
``set_adapter("en-de")``). Several live adapters add their outputs (both kinds read the same input).

Initialisation: Glorot-uniform ``W_down``, zero ``W_up`` and biases, LayerNorm weight 1, bias 0
(``init="identity"``, the default): exactly the identity at init. The reference code's Keras ``Dense``
defaults, Glorot-uniform ``W_up`` too, are ``init="glorot"`` (see the deviations for why they are not the
default).

Trains per layer-adapter site ``2 d m + m + d`` and per embedding adapter ``2 d m + m + 3 d`` (its
LayerNorm adds ``2 d``), ``m = d // 2`` by default. Not mergeable: the ReLU makes it nonlinear.

default_lr 1.25e-4: the reference tuning config trains with Adam (0.9, 0.98, eps 1e-9) under the Noam
schedule at d = 1024, warmup 4000, whose peak is ``1024^-0.5 * 4000^-0.5 ~= 4.9e-4``; no rate is given
for BERT-size classification. Measured on the SST-2 quick set-up (MiniLM, 5,000 examples, 1 epoch, seed 0,
the default init): dev accuracy 81.3 at 2.5e-4, 81.1 at 5e-4, 50.9 (the majority class) at 2e-3; the
suites train at 4x the default, so 1.25e-4 puts them at the reference's peak rate, 5e-4.

Deviations, each with its reason:

- ``init="identity"`` (``W_up = 0``) by default, not the reference code's Glorot ``W_up``: on a pretrained
  encoder, Glorot up-projections beside every sublayer (width d/2) add an update as large as the states
  and the model does not recover in a short run: SST-2 quick set-up 50.9 (majority class) at 5e-4 and at
  2e-3, where the zero start gives 81.1 at 5e-4. The reference tunes translation models for many steps.
- ``cross_attention=False`` by default, as in the reference code (no adapter at the decoder's
  encoder-decoder attention). ``cross_attention=True`` adds one there too, placed like the others
  (reads the query-side normed input); an option, not the paper's.
- The embedding adapter reads what the first layer reads where a module computes it: in the reference
  code the embedded input after ``* sqrt(d)`` with the sinusoidal positions added. T5 and Llama add no
  absolute positions, so their token lookup is that input; BERT's ``embeddings`` module (LayerNorm of
  word + position + type embeddings) is wrapped whole. On the raw BERT lookup (entries ~0.05) the
  adapter's LayerNorm'd, unit-scale update swamped the embeddings: SST-2 stayed at the majority class
  at every rate tried. On GPT-2 the absolute positions come after the adapter: GPT-2 has no module whose
  output is the sum, and one site for all models keeps the method simple.
- Dropout: the adapter's hidden activation gets ``dropout`` (the reference uses the model's residual
  dropout rate, 0.1 in its base and 0.3 in its big setting; default 0.1). The reference also skips
  the sublayer's own residual dropout in the tuning stage; the HF models apply theirs to
  ``SUB(u) + A(u)``, which peftlab cannot change without editing model code (eval is unaffected).
- Post-LN models (BERT) have no norm in front of the sublayer: the layer adapter reads the sublayer
  input ``x`` itself (already the previous block's normed output).
"""
from __future__ import annotations

import dataclasses
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
from .parallel_adapter import ParallelAdapterLayer
from .sequential_adapter import factory_kwargs

INITS = ("glorot", "identity")


@dataclasses.dataclass(frozen=True)
class CiatConfig(PeftConfig):
    """bottleneck: m, the inner width of every CIAT adapter (``None``: ``hidden // reduction_factor``);
    reduction_factor: m = hidden // reduction_factor when bottleneck is None (2: the paper's ``d // 2``);
    dropout: on the adapters' hidden activation in training; init: ``"identity"`` (``W_up = 0``, an exact
    identity at init; the default) or ``"glorot"`` (the reference code: both projections Glorot-uniform);
    cross_attention: also put a layer adapter beside the decoder's cross-attention (not in the paper)."""

    bottleneck: int | None = None
    reduction_factor: float = 2.0
    dropout: float = 0.1
    init: str = "identity"
    cross_attention: bool = False

    def validate(self) -> None:
        self._require(self.bottleneck is None or is_positive_int(self.bottleneck),
                      "bottleneck", "a positive integer width m such as 64, or None (m = hidden // reduction_factor)")
        rf = self.reduction_factor
        self._require(isinstance(rf, (int, float)) and not isinstance(rf, bool) and math.isfinite(rf) and rf >= 1,
                      "reduction_factor", "a number >= 1 (the paper uses 2: m = hidden // 2)")
        self._require(isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool)
                      and 0 <= self.dropout < 1, "dropout", "a probability in [0, 1) such as 0.1")
        self._require(self.init in INITS, "init",
                      f"one of {INITS} ('glorot': the paper's code; 'identity': W_up = 0, the identity at init)")
        self._require(isinstance(self.cross_attention, bool), "cross_attention",
                      "True (also adapt the decoder's cross-attention) or False (the paper's placement)")

    def width(self, hidden: int) -> int:
        return self.bottleneck if self.bottleneck is not None else max(1, int(hidden // self.reduction_factor))


class CiatBottleneck(nn.Module):
    """``x -> W_up drop(relu(W_down N(x) + b_down)) + b_up``, N a LayerNorm (embedding adapter) or nothing
    (layer adapter); computed in its own dtype. Called as ``(x, scale)`` by ParallelAdapterLayer."""

    def __init__(self, d_in: int, width: int, d_out: int, norm: bool, dropout: float, init: str, **kw: Any) -> None:
        super().__init__()
        # The reference code's LayerNorm epsilon.
        self.norm = nn.LayerNorm(d_in, eps=1e-6, **kw) if norm else None
        self.down = nn.Linear(d_in, width, **kw)
        self.up = nn.Linear(width, d_out, **kw)
        self.dropout = nn.Dropout(dropout)
        with torch.no_grad():
            # Keras Dense defaults (the reference code): Glorot-uniform kernels, zero biases.
            nn.init.xavier_uniform_(self.down.weight)
            nn.init.zeros_(self.down.bias)
            if init == "glorot":
                nn.init.xavier_uniform_(self.up.weight)
            else:
                nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        z = x.to(self.down.weight.dtype)
        if self.norm is not None:
            z = self.norm(z)
        out = self.up(self.dropout(F.relu(self.down(z))))
        return (out if scale == 1.0 else out * scale).to(x.dtype)


class CiatEmbeddingAdapter(DeltaModule):
    """Wraps a token-embedding table: ``e + sum over live adapters of A(e)``, ``e`` its lookup."""

    adapter_attrs = ("embedding_adapter",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.embedding_adapter = nn.ModuleDict()
        # The token table itself, or a module that combines it with positions (BERT's embeddings).
        table = base_of(base_layer)
        table = table if isinstance(table, nn.Embedding) else next(
            (m for m in table.modules() if isinstance(m, nn.Embedding)), None)
        if table is None:
            raise PeftlabError(f"CIAT's embedding adapter wraps a token-embedding module; "
                               f"{type(base_of(base_layer)).__name__} holds no nn.Embedding")
        self.features = table.embedding_dim

    def add(self, name: str, config: CiatConfig) -> None:
        d = self.features
        net = CiatBottleneck(d, config.width(d), d, True, config.dropout, config.init,
                             **factory_kwargs(self.base_layer))
        # A new module starts in training mode; it takes the model's (dropout only acts when training).
        self.embedding_adapter[name] = net.train(base_of(self.base_layer).training)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        e = self.base_layer(*args, **kwargs)
        live = self.live_adapters()
        if not live:
            return e
        return e + sum(self.embedding_adapter[name](e) for name in live)


def _embedding_sites(model: nn.Module) -> list[str]:
    """The token-embedding module each stack calls (``@embeddings``: T5's ``encoder.embed_tokens`` and
    ``decoder.embed_tokens``); where its parent combines the lookup with positions and no layer stack
    (BERT: LN(word + position + type)), that parent: its output is what the first layer reads, the
    reference's adapter input."""
    paths = []
    for path in resolve_targets(model, ("@embeddings",)):
        parent = path.rpartition(".")[0]
        combines = parent and not any(isinstance(m, nn.ModuleList) for m in model.get_submodule(parent).modules())
        paths.append(parent if combines else path)
    return paths


def _layer_sites(model: nn.Module, cross_attention: bool) -> list[tuple[str, int | None]]:
    """(path, input_arg for ParallelAdapterLayer) of every self-attention and FFN sublayer (and the
    cross-attention ones when asked), in model order."""
    arch = architecture_of(model)
    if arch.ffn_input_arg is not None:
        # Post-LN (BERT): the attention output module (parent of @attn_out) and the FFN output module
        # take the sublayer input as their residual argument.
        attention = dict.fromkeys(p.rpartition(".")[0] for p in resolve_targets(model, ("@attn_out",)))
        sites = [(p, arch.ffn_input_arg) for p in attention]
        sites += [(p, arch.ffn_input_arg) for p in resolve_targets(model, ("@ffn",))]
        cross: list[str] = []
    else:
        self_attention = resolve_targets(model, ("@self_attention",))
        cross = [p for p in resolve_targets(model, ("@attention",)) if p not in self_attention]
        sites = [(p, None) for p in self_attention + resolve_targets(model, ("@ffn",))]
    if cross_attention:
        if not cross:
            raise PeftlabError(f"CiatConfig.cross_attention=True, but {type(model).__name__} has no cross-attention "
                               "(only encoder-decoder models such as T5 do); set cross_attention=False")
        sites += [(p, None) for p in cross]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(sites, key=lambda site: order[site[0]])


def attach(model: nn.Module, name: str, config: CiatConfig, host: Any = None) -> None:
    for path in _embedding_sites(model):
        wrap(model, path, CiatEmbeddingAdapter).add(name, config)
    for path, input_arg in _layer_sites(model, config.cross_attention):
        # The parallel adapter's wrapper places a network beside a sublayer; CIAT's network goes in it.
        layer = wrap(model, path, ParallelAdapterLayer, lambda m, arg=input_arg: ParallelAdapterLayer(m, arg))
        net = CiatBottleneck(layer.in_features, config.width(layer.in_features), layer.out_features, False,
                             config.dropout, config.init, **factory_kwargs(layer.base_layer))
        layer.bottleneck[name] = net.train(base_of(layer).training)
        layer.settings[name] = 1.0  # no output scaling in CIAT


SPEC = register(MethodSpec(
    name="ciat", title="CIAT", family="additive", subcategory="adapter", config_cls=CiatConfig,
    trains="a bottleneck adapter on the token embeddings (encoder and decoder) and one beside every "
           "self-attention and FFN sublayer, reading its input",
    attach=attach,
    paper="Zhu et al. 2021, Counter-Interference Adapter for Multilingual Machine Translation",
    # W_up starts at zero (init="identity", the default); init="glorot" is the reference code's start.
    mergeable=False, identity_at_init=True, default_lr=1.25e-4,
))
