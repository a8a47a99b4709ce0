"""WARP (Hambardzumyan, Khachatrian & May, 2021, "WARP: Word-level Adversarial ReProgramming", ACL 2021).

A frozen masked language model is reprogrammed to classify: ``p`` trainable prompt embeddings and
the frozen ``[MASK]`` embedding go around the input, and the class is read at the ``[MASK]``
position by scoring it against ``c`` trainable class ("verbalizer") embeddings::

    X = E[input_ids]                                  (n x d, the frozen input embedding)
    Z = [P_1 .. P_a ; E[MASK] ; P_a+1 .. P_p ; X]     (p + 1 + n positions, a = p - p // 2)
    h = g(f(Z)[a])                                    (d: the [MASK] position's output)
    logits = V h + b                                  (c: one score per class)
    loss = cross_entropy(logits, label)               (one class: mean squared error, as HF heads)

``f`` is the frozen encoder; ``g`` is the frozen MLM head's transform up to its decoder (BERT's
dense + GELU + LayerNorm, the reference code's ``on_logits="pre_decoder_layer_norm"``): the decoder's
vocabulary rows are replaced by ``V`` (c x d) and its bias by ``b`` (c). Only ``P`` (p x d), ``V``
and ``b`` train; the base model, its own classification head included, stays frozen and unused (a
head named in ``modules_to_save`` gets a trainable copy that receives no gradient: it is not read).

On an encoder without an MLM head (a ``...ForSequenceClassification`` model such as the MiniLM the
study uses: sentence-transformers ships no MLM head for it) ``g`` is the identity: the ``[MASK]``
position's last hidden state is scored against ``V`` directly. The MLM head, where the model has one,
is found as the module its ``get_output_embeddings()`` returns (the decoder): its input is ``g(.)``.

Placement, initialisation, defaults (the paper; YerevaNN/WARP ``configs/warp.jsonnet`` and README):

- ``num_virtual_tokens=8``: WARP_8 in the paper's notation (WARP_k: k prompt tokens; the README's
  example pair template, SuperGLUE RTE, has 20).
- Prompts: the reference's ``prompt_better_init="<mask>"``: every prompt starts as the ``[MASK]``
  embedding (``prompt_init="mask"``); ``prompt_init="vocab"`` copies the embeddings of random tokens.
- Verbalizers: with ``label_words`` (WARP_init, the reference's ``classifier_init``), row ``i`` is the
  embedding of word ``i`` (several tokens averaged) and ``b = 0``; without, a fresh linear layer's
  init (PyTorch's, as allennlp's default: U(-1/sqrt(d), 1/sqrt(d)) for ``V`` and ``b``). The
  reference keeps the bias (``classifier_bias: true``).
- ``[MASK]``: ``mask_token_id``, else the model config's ``mask_token_id``, else the tokenizer's
  (``tokenizer_path``, else the model's ``name_or_path``).

How the inputs change: :meth:`~peftlab.methods.additive.prompt_tuning.SoftPrompt.prepend` (prompt
tuning's input rewrite: the mask gets ``p + 1`` ones in front, token types zeros, positions shift).
The output is a ``SequenceClassifierOutput`` whose ``logits`` are (batch x c) and whose ``loss`` is
computed from ``labels`` when they are given, so a classification training loop runs unchanged.

Checkpoints hold ``prompt_embeddings`` (p x d), ``verbalizer`` (c x d), ``verbalizer_bias`` (c) and the
frozen ``mask_embedding`` (d) under ``model_adapters.warp.``. Not identity at init (the model's own
head is replaced), not mergeable (it adds positions); encoder models only (``encoder_only``).

Deviations, and why:

- Template: all prompt tokens and ``[MASK]`` go in front of the input (``[P_1..P_a] [MASK]
  [P_a+1..P_p] [CLS] sentence(s) [SEP]``), not between and after the sentences as in the paper's
  templates (e.g. ``P*5 s1 P*5 [MASK] P*5 s2 P*5`` for pairs). The input rewrite then needs no
  sentence boundaries, works on any tokenized batch (single sentences and pairs alike) and is prompt
  tuning's own; the [MASK] sits between two groups of prompts, as in the paper's templates.
- Encoders without an MLM head score the last hidden state (see above): the paper always has one.
- ``[MASK]`` unknown: a model that names no mask token and has no tokenizer to ask (no
  ``name_or_path``, e.g. a randomly initialised test model) uses the mean of its token embeddings
  as the ``[MASK]`` row; the paper's models all have a ``[MASK]`` token.
- Verbalizer init from ``label_words`` reads the input embedding (the MLM decoder's rows in the tied
  BERT/RoBERTa models the paper uses: the same vectors).
- One WARP adapter is live at a time (its verbalizer defines the output); the paper trains one task.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ...core.config import PeftConfig, is_positive_int
from ...core.errors import PeftlabError
from ...core.layer import BufferDict, DeltaModule
from ...core.registry import MethodSpec, register
from .prompt_tuning import SoftPrompt, _input_embedding_weight, _load_tokenizer, _token_ids, bind_arguments

PROMPT_INITS = ("mask", "vocab")
_KEY = "warp"  # this method's entry in PeftModel.model_adapters


@dataclasses.dataclass(frozen=True)
class WarpConfig(PeftConfig):
    """num_virtual_tokens: prompt length ``p`` (8: WARP_8); num_labels: classes ``c`` (``None``: the
    model config's ``num_labels``); label_words: one word per class whose embedding starts its
    verbalizer (WARP_init; empty: random); prompt_init: ``"mask"`` (every prompt starts as the
    ``[MASK]`` embedding, the reference code's) or ``"vocab"`` (random token embeddings);
    mask_token_id: the ``[MASK]`` id (``None``: the model config's, else the tokenizer's);
    tokenizer_path: the tokenizer for ``label_words`` and the ``[MASK]`` id (``None``: the model's
    ``name_or_path``). WARP touches no module, so ``targets`` must stay ``None``."""

    num_virtual_tokens: int = 8
    num_labels: int | None = None
    label_words: tuple[str, ...] = ()
    prompt_init: str = "mask"
    mask_token_id: int | None = None
    tokenizer_path: str | None = None

    def validate(self) -> None:
        self._require(self.targets is None, "targets",
                      "None: WARP puts its prompts around the input and touches no module")
        self._require(is_positive_int(self.num_virtual_tokens), "num_virtual_tokens", "a positive integer such as 8")
        self._require(self.num_labels is None or is_positive_int(self.num_labels), "num_labels",
                      "None (the model config's num_labels) or a positive integer (the number of classes)")
        words = self.label_words
        self._require(isinstance(words, tuple) and all(isinstance(w, str) and w.strip() for w in words), "label_words",
                      "a tuple of non-empty words, one per class, such as ('terrible', 'great'), or () for random "
                      "verbalizers")
        self._require(not words or self.num_labels is None or len(words) == self.num_labels, "label_words",
                      f"one word per class: num_labels={self.num_labels}, so {self.num_labels} words (or leave "
                      "num_labels=None)")
        self._require(self.prompt_init in PROMPT_INITS, "prompt_init", f"one of {PROMPT_INITS}")
        self._require(self.mask_token_id is None or (isinstance(self.mask_token_id, int)
                                                     and not isinstance(self.mask_token_id, bool)
                                                     and self.mask_token_id >= 0),
                      "mask_token_id", "None (the model's or tokenizer's [MASK] id) or a non-negative token id")
        self._require(self.tokenizer_path is None or (isinstance(self.tokenizer_path, str) and self.tokenizer_path),
                      "tokenizer_path", "None or a tokenizer folder/name for label_words and the [MASK] id")


class WarpPrompt(DeltaModule):
    """Model-level module holding, per adapter, the prompts ``P`` (p x d), the verbalizer ``V``
    (c x d) and ``b`` (c), and the frozen ``[MASK]`` row (d). It rewrites the inputs
    (:meth:`transform_inputs`) and scores the ``[MASK]`` position (:meth:`scores`)."""

    adapter_attrs = ("prompt_embeddings", "verbalizer", "verbalizer_bias")
    frozen_attrs = ("mask_embedding",)

    def __init__(self) -> None:
        super().__init__()
        self.prompt_embeddings = nn.ParameterDict()
        self.verbalizer = nn.ParameterDict()
        self.verbalizer_bias = nn.ParameterDict()
        self.mask_embedding = BufferDict()
        # Where the [MASK] row sits, counted from the end of the sequence the base model sees: set by
        # transform_inputs, read by around_forward in the same call (later soft prompts only prepend).
        self.mask_from_end = 0

    def add(self, name: str, config: WarpConfig, model: nn.Module) -> None:
        weight = _input_embedding_weight(model)
        classes = config.num_labels or getattr(getattr(model, "config", None), "num_labels", None)
        if not is_positive_int(classes):
            raise PeftlabError(f"WARP needs the number of classes; {type(model).__name__}'s config gives "
                               f"num_labels={classes!r}. Set WarpConfig(num_labels=...)")
        if config.label_words and len(config.label_words) != classes:
            raise PeftlabError(f"WarpConfig.label_words has {len(config.label_words)} words but the task has {classes} "
                               f"classes; give one word per class (or num_labels={len(config.label_words)})")
        tokenizer = None
        mask_named = config.mask_token_id is not None or _model_mask_id(model) is not None
        if config.label_words or (not mask_named and _tokenizer_known(config, model)):
            tokenizer = _load_tokenizer(config, model)
        d = weight.shape[1]
        with torch.no_grad():
            mask = _mask_row(config, model, weight, tokenizer)
            p = config.num_virtual_tokens
            if config.prompt_init == "mask":
                prompts = mask.unsqueeze(0).expand(p, d)
            else:
                prompts = weight[torch.randint(0, weight.shape[0], (p,)).to(weight.device)]
            if config.label_words:
                rows = torch.stack([weight[_token_ids(tokenizer, w, "label_words").to(weight.device)].mean(dim=0)
                                    for w in config.label_words])
                bias = torch.zeros(classes, device=weight.device, dtype=weight.dtype)
            else:
                bound = 1.0 / math.sqrt(d)  # nn.Linear's default init
                rows = torch.empty(classes, d, device=weight.device, dtype=weight.dtype).uniform_(-bound, bound)
                bias = torch.empty(classes, device=weight.device, dtype=weight.dtype).uniform_(-bound, bound)
        self.prompt_embeddings[name] = nn.Parameter(prompts.detach().clone())
        self.verbalizer[name] = nn.Parameter(rows.detach().clone())
        self.verbalizer_bias[name] = nn.Parameter(bias.detach().clone())
        self.mask_embedding[name] = mask.detach().clone()

    def live(self) -> str:
        live = self.live_adapters()
        if len(live) != 1:
            raise PeftlabError(f"WARP adapters {live} are active together; each one's verbalizer defines the output, "
                               "so activate one of them (set_adapter)")
        return live[0]

    def transform_inputs(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        name = self.live()
        kwargs = bind_arguments(model, "forward", args, kwargs)
        prompts = self.prompt_embeddings[name]
        before = prompts.shape[0] - prompts.shape[0] // 2
        mask = self.mask_embedding[name].to(prompts.dtype).unsqueeze(0)
        rows = torch.cat([prompts[:before], mask, prompts[before:]], dim=0)  # (p + 1, d)
        given = kwargs.get("input_ids") if kwargs.get("inputs_embeds") is None else kwargs["inputs_embeds"]
        if given is None:
            raise PeftlabError("WARP needs input_ids or inputs_embeds to put its prompts in front of")
        self.mask_from_end = given.shape[1] + prompts.shape[0] - before + 1
        return (), SoftPrompt.prepend(model, rows, kwargs, labels=False)

    def scores(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """(batch x c) class scores of the [MASK] outputs ``h`` (batch x d): ``h V^T + b``."""
        verbalizer = self.verbalizer[name]
        return h.to(verbalizer.dtype) @ verbalizer.t() + self.verbalizer_bias[name]


def _model_mask_id(model: nn.Module) -> int | None:
    value = getattr(getattr(model, "config", None), "mask_token_id", None)
    return value if isinstance(value, int) else None


def _tokenizer_known(config: WarpConfig, model: nn.Module) -> bool:
    return bool(config.tokenizer_path or getattr(getattr(model, "config", None), "_name_or_path", None))


def _mask_row(config: WarpConfig, model: nn.Module, weight: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """The [MASK] token's input embedding (d); the mean embedding where no mask token can be named."""
    index = config.mask_token_id if config.mask_token_id is not None else _model_mask_id(model)
    if index is None and tokenizer is not None:
        index = getattr(tokenizer, "mask_token_id", None)
        if index is None:
            raise PeftlabError(f"WARP reads the class at a [MASK] token; the tokenizer of {type(model).__name__} has "
                               "none. Set WarpConfig(mask_token_id=...) to a token id of this vocabulary")
    if index is None:
        return weight.mean(dim=0)  # no tokenizer to ask (see the module docstring)
    if index >= weight.shape[0]:
        raise PeftlabError(f"WarpConfig.mask_token_id={index} is outside {type(model).__name__}'s vocabulary of "
                           f"{weight.shape[0]} tokens; give the [MASK] id of this model's tokenizer")
    return weight[index]


def _mlm_decoder(model: nn.Module) -> nn.Module | None:
    """The MLM head's decoder (vocabulary projection), whose input is the transformed [MASK] state."""
    get = getattr(model, "get_output_embeddings", None)
    decoder = get() if callable(get) else None
    return decoder if isinstance(decoder, nn.Module) else None


def around_forward(host: Any, name: str, forward: Any, args: tuple, kwargs: dict[str, Any],
                   extra: dict[str, Any]) -> Any:
    """Run the model, then replace its head's output by the verbalizer scores of the [MASK] position."""
    from transformers.modeling_outputs import SequenceClassifierOutput

    module: WarpPrompt = host.model_adapters[_KEY]
    kwargs = dict(kwargs)
    labels = kwargs.pop("labels", None)  # the loss is over the verbalizer's classes, not the model's head
    keep_hidden = bool(kwargs.get("output_hidden_states"))
    decoder = _mlm_decoder(host.base_model)
    seen: list[torch.Tensor] = []
    handle = None
    if decoder is not None:
        handle = decoder.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
    else:
        kwargs["output_hidden_states"] = True
    try:
        out = forward(*args, **kwargs)
    finally:
        if handle is not None:
            handle.remove()
    states = seen[-1] if seen else out.hidden_states[-1]  # (batch, length, d)
    h = states[:, states.shape[1] - module.mask_from_end]
    logits = module.scores(name, h)
    loss = None
    if labels is not None:
        labels = labels.to(logits.device)
        if logits.shape[-1] == 1:  # one class: regression (STS-B), as transformers' heads do
            loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).reshape(-1))
        else:
            loss = F.cross_entropy(logits, labels.long().reshape(-1))
    return SequenceClassifierOutput(loss=loss, logits=logits,
                                    hidden_states=getattr(out, "hidden_states", None) if keep_hidden else None,
                                    attentions=getattr(out, "attentions", None))


def attach(model: nn.Module, name: str, config: WarpConfig, host: Any) -> None:
    if host is None:
        raise PeftlabError("WARP keeps its prompts and verbalizers on the PeftModel; use get_peft_model(model, config)")
    model_config = getattr(model, "config", None)
    if getattr(model_config, "is_encoder_decoder", False) or getattr(model_config, "is_decoder", False) \
            or not _is_masked_lm_family(model_config):
        raise PeftlabError(f"WARP reprograms masked (bidirectional) language models read at a [MASK] token; "
                           f"{type(model).__name__} is a decoder or encoder-decoder model. Use an encoder such as "
                           "BERT or RoBERTa, or prompt tuning for this model.")
    if _KEY not in host.model_adapters:
        host.model_adapters[_KEY] = WarpPrompt()
    # A failed add leaves an empty module, which PeftModel.add_adapter releases and removes.
    host.model_adapters[_KEY].add(name, config, model)


def _is_masked_lm_family(model_config: Any) -> bool:
    """Whether the architecture is one transformers offers a masked-LM head for (BERT, RoBERTa, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return getattr(model_config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES


# default_lr: measured on MiniLM, SST-2 (2,000 examples, one epoch = 63 steps, batch 32, max length 64,
# WARP_8, random verbalizers, the GLUE job's defaults): dev accuracy 0.531 at lr 3e-3, 0.724 at 1e-2,
# 0.713 at 3e-2 (1 run each). The quick suite runs default_lr x 4: 1e-2, the best of these. The paper's
# runs (20-30 epochs) use 1e-3.
SPEC = register(MethodSpec(
    name="warp", title="WARP", family="additive", subcategory="soft prompt", config_cls=WarpConfig,
    trains="p prompt embeddings around a [MASK] token and one verbalizer embedding (and bias) per class, "
           "scored against the [MASK] output", attach=attach,
    paper="Hambardzumyan, Khachatrian & May 2021, WARP: Word-level Adversarial ReProgramming",
    mergeable=False, identity_at_init=False, changes_sequence_length=True, default_lr=2.5e-3,
    around_forward=around_forward, encoder_only=True, replaces_head=True,
))
