"""Attention Fusion (Jin Cao, Chandana Satya Prakash, Wael Hamza, 2022, "Attention Fusion: a light yet
efficient late fusion mechanism for task adaptation in NLU", Findings of NAACL 2022, pp. 857-866;
doi 10.18653/v1/2022.findings-naacl.64). Not AdapterFusion (Pfeiffer et al.; ``adapter_fusion.py``),
which mixes trained task adapters inside every layer.

The backbone is frozen and left as it is; a *late* fusion module reads the hidden states that the
frozen encoder produces at every layer and, for every token, mixes them with an attention whose only
trained tensor is one task query vector ``q`` (d entries)::

    H_i = [h_i^0, h_i^1, ..., h_i^L]        token i's states: the embedding output and each layer's output
    a_i^l = softmax_l(q . h_i^l / s_i)       attention over the layers, one distribution per token
    c_i = sum_l a_i^l h_i^l                  the task-attuned representation of token i
    s_i = RMS over l and d of (h_i^l - mean_l h_i^l)     (s_i = 1 with standardize=False: Eq. (1) as cited)

The fused states ``c`` replace the encoder's output, so the model's own task head reads them (BERT: the
pooler takes ``c`` at [CLS], then the classifier). Train that head beside the fusion, as the paper
trains its task head: ``modules_to_save=("classifier",)``. Trainable fusion parameters: ``d`` (384 on
all-MiniLM-L6-v2, 768 on BERT-base: 0.0009% of BERT-base's encoder, the paper's reported share).

What could be verified and what is reconstructed. The paper's text was not available here; its abstract
was (ACL Anthology): "an attention based fusion module which computes task-attuned token representations
by aggregating intermediate layer representations from a pre-trained network", training "only 0.0009% of
total parameters", "decoupled from the pre-trained network" so that errors are not back-propagated
through the encoder. A per-token attention over layers with one d-sized query fits that count (768
parameters out of BERT-base's ~85M encoder weights). The equations above follow a
public re-implementation that cites the paper's Eq. (1) (``a = softmax(H^T q)`` over layers) and
Eq. (2) (``c = sum_l a^l h^l``), fusing the embedding output and all L layer outputs (L + 1 states).

Deviations and choices, and why:
- ``q`` starts at zero (``init="zeros"``): uniform attention, the mean of the layer states, so no layer
  is favoured before training (the re-implementation starts from ones, offered as ``init="ones"``,
  which on real checkpoints weights layers by the sum of their features). Either way the model is not
  the base model at init (``identity_at_init=False``): the head reads a mix of layers, not the last.
- The re-implementation also puts a LayerNorm (over states and layers), dropout 0.15 and a GELU around
  the fusion, saying the paper recommends them; they could not be checked against the paper and its
  LayerNorm alone would train 2 d (L + 1) parameters, far above the reported 0.0009%, so they are left
  out: the fusion is the two equations above.
- No gradient reaches the backbone, as in the paper, without any special step: its weights are frozen
  and nothing below the fusion requires a gradient, so autograd records no graph for the encoder (its
  activations are not kept for a backward pass). Adapters of other methods stacked inside the encoder
  and trained together with this one would still get their gradients.
- The scores are divided by ``s_i``, the token's spread across layers (``standardize=True``, the default).
  Softmax ignores what all layers share, so this only sets each token's temperature: the attention
  depends on how the layers differ, at a scale that does not depend on how much they differ. Without
  it, a backbone whose layers barely change the residual stream (randomly initialised models: ~2% of
  the state's norm) keeps near-uniform attention whatever ``q`` is, and ``q`` has only a second-order
  effect on the output (peftlab's conformance suite, which checks on tiny random models that a changed
  adapter changes the output, could not see ``q`` at all). On trained checkpoints the layers differ at
  the scale of the states (on all-MiniLM-L6-v2 ``s_i`` is 0.13-0.32 for entries of RMS 0.45-0.65), so
  the two forms differ by a factor of about 3 in the scores' scale. ``standardize=False`` is the re-implementation's ``q . h^l``.
- ``targets`` may name a subset of the layers (their blocks' outputs are fused, with the embedding
  output when ``include_embeddings``); the paper fuses every layer (the default).
- ``default_lr`` 1e-3 is peftlab's default: the paper's learning rate could not be read. One run on
  all-MiniLM-L6-v2, SST-2 (600 dev sentences to train, the other 272 to test, 150 steps of 16,
  classifier trained too) reached 0.588 at 1e-3; higher rates were not measured.

Placement: a model-level module (``PeftModel.model_adapters['attention_fusion']``, checkpoint key
``fusion_query``) hooks the encoder (the module holding the ``nn.ModuleList`` of layer blocks that
``targets`` selects): a pre-hook records its input (the embedding output), a hook on each selected block
records its output, and a hook on the encoder replaces its output's ``last_hidden_state`` with ``c``.
``output_hidden_states=True`` still reports the backbone's own per-layer states. Bidirectional encoders
only (``encoder_only``): decoders and encoder-decoders are refused (a causal decoder's next-token head
and a KV cache hold no per-layer states of earlier tokens to fuse; the paper is about NLU encoders).
One attention-fusion adapter can be active at a time: each one replaces the encoder output. Not
mergeable: the attention over layers depends on the input.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from torch import nn

from ...core.config import PeftConfig
from ...core.errors import PeftlabError
from ...core.layer import DeltaModule, base_of
from ...core.registry import MethodSpec, register
from ...core.targets import layer_block, resolve_targets

_KEY = "attention_fusion"
INITS = ("zeros", "ones")
_MIN_SPREAD = 1e-6  # layers that agree exactly: scores 0, uniform attention (no division by zero)


@dataclasses.dataclass(frozen=True)
class AttentionFusionConfig(PeftConfig):
    """targets: modules inside the encoder's layer blocks; every block enclosing one has its output fused
    (default '@self_attention': every layer, as the paper); include_embeddings: fuse the encoder's input
    (the embedding output) too, as the re-implementation's L + 1 states; init: the query's start, "zeros"
    (uniform attention: the mean of the states) or "ones" (the re-implementation's); standardize: divide
    each token's scores by the spread of its states across layers (a per-token temperature; False: the
    plain q . h^l of the re-implementation's Eq. (1))."""

    targets: tuple[str, ...] | str | None = ("@self_attention",)
    include_embeddings: bool = True
    init: str = "zeros"
    standardize: bool = True

    def validate(self) -> None:
        self._require(self.init in INITS, "init", f"one of {INITS} (zeros: uniform attention over the layers)")


@dataclasses.dataclass(frozen=True)
class _Setting:
    encoder: str                 # path of the module whose output is replaced
    layers: tuple[str, ...]      # paths of the layer blocks whose outputs are fused, in model order
    include_embeddings: bool
    standardize: bool


class LayerAttentionFusion(DeltaModule):
    """Model-level module: each adapter's query ``q`` (d,) and the hooks that collect the encoder's
    per-layer states and put the fused states in place of its output."""

    adapter_attrs = ("fusion_query",)

    def __init__(self) -> None:
        super().__init__()
        self.fusion_query = nn.ParameterDict()
        self._handles: list[Any] = []
        self._hooked: set[str] = set()
        self._states: dict[str, torch.Tensor] = {}   # of the call under way: "" (encoder input), block paths

    def add(self, name: str, config: AttentionFusionConfig, model: nn.Module) -> None:
        encoder, layers = _encoder_and_layers(model, config)
        for other, setting in self.settings.items():
            if setting.encoder != encoder:
                raise PeftlabError(f"attention_fusion adapter {name!r} would fuse the layers of {encoder!r}, but "
                                   f"adapter {other!r} fuses those of {setting.encoder!r}; one model has one encoder "
                                   "to fuse: name layers of the same encoder in targets")
        weight = model.get_input_embeddings().weight
        fill = 0.0 if config.init == "zeros" else 1.0
        self.fusion_query[name] = nn.Parameter(torch.full((weight.shape[1],), fill, dtype=weight.dtype,
                                                          device=weight.device))
        self.settings[name] = _Setting(encoder, tuple(layers), config.include_embeddings, config.standardize)
        self._install(model, encoder, layers)

    # -- hooks -----------------------------------------------------------------------------------
    def _install(self, model: nn.Module, encoder: str, layers: list[str]) -> None:
        if encoder not in self._hooked:
            module = model.get_submodule(encoder)
            self._handles.append(module.register_forward_pre_hook(self._encoder_starts, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._encoder_ends))
            self._hooked.add(encoder)
        for path in layers:
            if path not in self._hooked:
                hook = functools.partial(self._record_layer, path)
                self._handles.append(model.get_submodule(path).register_forward_hook(hook))
                self._hooked.add(path)

    def release(self, model: nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooked.clear()
        self._states = {}

    def _encoder_starts(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._states = {}
        if self.live_adapters():
            self._states[""] = args[0] if args else kwargs["hidden_states"]

    def _record_layer(self, path: str, module: nn.Module, args: tuple, output: Any) -> None:
        if self.live_adapters():
            self._states[path] = output[0] if isinstance(output, tuple) else output

    def _encoder_ends(self, module: nn.Module, args: tuple, output: Any) -> Any:
        live = self.live_adapters()
        if not live:
            return None
        if len(live) > 1:
            raise PeftlabError(f"attention_fusion adapters {live} are active together, but each replaces the "
                               "encoder's output with its own fusion; activate one of them (set_adapter(name))")
        name = live[0]
        setting = self.settings[name]
        keys = ([""] if setting.include_embeddings else []) + list(setting.layers)
        missing = [k or "the encoder input" for k in keys if k not in self._states]
        if missing:
            raise PeftlabError(f"attention_fusion adapter {name!r} fuses the outputs of {list(setting.layers)}, but "
                               f"this call produced no state for {missing} (a layer skipped, or a submodule called "
                               "directly); call the model itself with every layer running")
        fused = fuse_layers([self._states[k] for k in keys], self.fusion_query[name], setting.standardize)
        self._states = {}
        if isinstance(output, torch.Tensor):
            return fused
        if isinstance(output, tuple):
            return (fused, *output[1:])
        output["last_hidden_state"] = fused  # a ModelOutput: the head reads last_hidden_state
        return output


def fuse_layers(states: list[torch.Tensor], query: torch.Tensor, standardize: bool = True) -> torch.Tensor:
    """c_i = sum_l a_i^l h_i^l, a_i = softmax_l(q . h_i^l), for each token i; with ``standardize`` the
    scores are divided by the token's spread across layers (see the module docstring).
    states: K tensors (B, T, d); query: (d,) -> (B, T, d)."""
    stacked = torch.stack(states, dim=-2).to(query.dtype)                   # (B, T, K, d)
    if standardize:
        # softmax ignores what all layers share, so q . (h^l - mean) gives the same attention as q . h^l;
        # dividing by the RMS spread makes the scores' scale independent of how much the layers differ.
        deviation = stacked - stacked.mean(dim=-2, keepdim=True)
        spread = deviation.pow(2).mean(dim=(-2, -1), keepdim=True).sqrt().clamp_min(_MIN_SPREAD)
        scores = (deviation / spread) @ query                              # (B, T, K)
    else:
        scores = stacked @ query
    weights = scores.float().softmax(dim=-1).to(query.dtype)
    fused = (weights.unsqueeze(-1) * stacked).sum(dim=-2)
    return fused.to(states[0].dtype)


def _encoder_and_layers(model: nn.Module, config: AttentionFusionConfig) -> tuple[str, list[str]]:
    """The layer blocks (``nn.ModuleList`` entries) enclosing the modules ``targets`` selects, and the
    module holding that list: the encoder whose output is replaced."""
    model_config = getattr(model, "config", None)
    if getattr(model_config, "is_encoder_decoder", False):
        raise PeftlabError(f"attention_fusion fuses the layers of a bidirectional encoder for an NLU task head; "
                           f"{type(model).__name__} is an encoder-decoder model, whose decoder would read the "
                           "fused states in place of the encoder output it was trained on. Use an encoder model "
                           "(BERT, RoBERTa) or another method.")
    if getattr(model_config, "is_decoder", False):
        raise PeftlabError(f"attention_fusion fuses the layers of a bidirectional encoder; {type(model).__name__} "
                           "is configured as a decoder (config.is_decoder=True). Load it as an encoder.")
    blocks: list[str] = []
    for path in resolve_targets(model, config.targets):
        module = base_of(model.get_submodule(path))
        if getattr(module, "is_causal", False):
            raise PeftlabError(f"attention_fusion fuses the layers of a bidirectional encoder (the paper: BERT-style "
                               f"NLU models); {path!r} ({type(module).__name__}) is causal attention, as in GPT-2 "
                               "or Llama, whose cached decoding keeps no per-layer states of earlier tokens. Use "
                               "an encoder model, or another method for decoders.")
        block = layer_block(model, path)
        if block is None:
            raise PeftlabError(f"attention_fusion target {path!r} sits in no layer list (nn.ModuleList) of "
                               f"{type(model).__name__}; name modules inside transformer layers, e.g. "
                               "'@self_attention'")
        if block not in blocks:
            blocks.append(block)
    lists = {block.rpartition(".")[0] for block in blocks}
    if len(lists) != 1:
        raise PeftlabError(f"attention_fusion targets select layers of several layer lists {sorted(lists)}; it fuses "
                           "the layers of one encoder: name modules of one encoder's layers in targets")
    layer_list = lists.pop()
    encoder = layer_list.rpartition(".")[0]
    if "." not in layer_list or not encoder:
        raise PeftlabError(f"attention_fusion needs the module that runs the layer list {layer_list!r} (an encoder "
                           f"such as BERT's 'bert.encoder'), but {type(model).__name__} holds the list itself")
    order = [name for name, _ in model.get_submodule(layer_list).named_children()]
    blocks.sort(key=lambda b: order.index(b.rpartition(".")[2]))
    return encoder, blocks




def attach(model: nn.Module, name: str, config: AttentionFusionConfig, host: Any) -> None:
    if host is None:
        raise PeftlabError("attention_fusion keeps its query on the PeftModel; use get_peft_model(model, config)")
    get = getattr(model, "get_input_embeddings", None)
    if not callable(get) or not isinstance(getattr(get(), "weight", None), torch.Tensor):
        raise PeftlabError(f"attention_fusion sizes its query by the model's input embedding; {type(model).__name__} "
                           "has none (get_input_embeddings()). Use a transformers encoder such as BERT or RoBERTa.")
    if _KEY not in host.model_adapters:
        host.model_adapters[_KEY] = LayerAttentionFusion()
    # A failed add leaves an empty module, which PeftModel.add_adapter releases and removes.
    host.model_adapters[_KEY].add(name, config, model)


SPEC = register(MethodSpec(
    name="attention_fusion", title="Attention Fusion", family="additive", subcategory="others", config_cls=AttentionFusionConfig,
    trains="one query vector: per token, a softmax attention over the frozen encoder's layer states, "
           "whose weighted sum replaces the encoder output read by the task head",
    attach=attach,
    paper="Cao, Satya Prakash and Hamza 2022, Attention Fusion: a light yet efficient late fusion mechanism "
          "for task adaptation in NLU",
    mergeable=False, identity_at_init=False, default_lr=1e-3, encoder_only=True,
))
