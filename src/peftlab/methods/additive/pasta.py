"""PASTA: Parameter-efficient tuning with Special Token Adaptation (Xiaocong Yang, James Y. Huang,
Wenxuan Zhou, Muhao Chen, 2023, "Parameter-Efficient Tuning with Special Token Adaptation",
EACL 2023; arXiv 2210.04382; reference code github.com/luka-group/PASTA, ``PASTA_modeling.py``).

Only the hidden states of the special tokens change: before the self-attention of every layer
``l``, the ``p``-th special token of the input gets a trainable vector ``e_p^l`` added::

    H^l <- H^l + M^l                                  H^l: (n, d), the input of layer l
    M^l[i] = dropout(e_p^l)   if token i is the p-th special token of its sequence (p = 0, 1, ...)
             0                otherwise               e^l: (P, d) trained, P = num_special_tokens

The vector is added to the layer *input*, so it reaches the attention's queries, keys and values and
the residual stream alike (the reference code adds it to ``hidden_states`` before calling
``BertLayer.forward``); the embeddings output is layer 0's input. Ordinary tokens are never touched
directly; they change only through attending to the special tokens in later layers. Trainable
parameters: ``L * P * d`` (BERT-base, P = 3: 27,648, 0.025%).

Which tokens are special: the ids in ``special_token_ids``; else the ``cls_token_id``,
``sep_token_id``, ``bos_token_id`` and ``eos_token_id`` that are set (minus the pad id) in the
tokenizer at ``tokenizer_path`` when one is given, else in the model config, else in the tokenizer
at the base model's ``name_or_path`` (BERT checkpoints' configs usually name only the pad id, so
all-MiniLM-L6-v2's come from its tokenizer): the paper's [CLS] and [SEP] for BERT (the reference
code hard-codes BERT's 101 and 102), ``<s>`` and ``</s>`` for RoBERTa. A model for which none of
these names one is refused, not run as the unchanged base model. Ids found this way are not
written to the checkpoint; loading finds them again the same way. Vectors go by *occurrence*, as in the
reference code: in ``[CLS] a [SEP] b [SEP]`` [CLS] gets ``e_0``, the first [SEP] ``e_1``, the second
``e_2`` (the reference uses P = 2 for single-sentence GLUE tasks, 3 for pairs; the default 3 covers
both; RoBERTa pairs, ``<s> a </s></s> b </s>``, need 4). An input with more than P special tokens
is refused (under ``torch.compile``, which cannot read the count, the extra ones get no vector).

Initialisation and defaults, as the reference code: ``e ~ N(0, initializer_range)`` (the vectors
are an ``nn.Embedding`` of the BERT model, initialised by BERT's ``_init_weights``: std 0.02), so the
model is *not* the base model at init (``init="zeros"`` gives identity at init); dropout on the added
vectors with the model's ``hidden_dropout_prob`` (0.1 for BERT). The paper trains the classification
head too: pass ``modules_to_save=("classifier",)``.

How the ids reach the layers: attaching puts one model-level module in ``PeftModel.model_adapters``
holding every PASTA adapter's vectors (checkpoint key ``pasta_vectors``: (L, P, d)). It registers a
forward pre-hook on the model (a call starts: forget the last ids), one on the input embedding
(which is handed the ``input_ids``: remember them) and one on each layer block (add ``M^l`` to the
hidden states); ``delete_adapter`` / ``unload`` remove them all. Layer blocks are the enclosing
``nn.ModuleList`` entries of the modules ``targets`` selects (default '@self_attention': every layer;
name fewer self-attention modules to adapt fewer layers).

Models: bidirectional encoders only, as in the paper (BERT, RoBERTa and the other '@' map encoders).
Refused, with the reason: encoder-decoder models (T5: the decoder's inputs are not the ids the
encoder saw, and the paper defines no decoder side) and causal decoders (GPT-2, Llama: with a KV
cache a step sees only its new tokens, so "the p-th special token" cannot be counted, and the
paper's premise, special tokens that every token attends to in both directions, does not hold).
Calls with ``inputs_embeds`` instead of ``input_ids`` are refused (the special tokens are found by id).

Deviations, and why:
- The reference counts special tokens in example 0 and assumes every example of the batch has as
  many; here each example is counted on its own (same result where the reference works).
- Special token ids come from ``special_token_ids``, the model config or its tokenizer instead of
  BERT's hard-coded 101/102, so other vocabularies work; the pad id is left out even when a config
  or tokenizer names it as bos/eos.
- ``init="zeros"`` is offered (identity at init); the default is the reference's normal init.
- Not mergeable: the vectors depend on which tokens are special, not on a weight.
- ``default_lr`` (1e-2) is peftlab's, for short runs; the reference trains BERT-large for 150 epochs
  at 2.5e-4. Measured on all-MiniLM-L6-v2, SST-2 (600 dev sentences to train, the other 272 to
  test, 150 steps of 16, classifier trained too, P = 2): accuracy 0.772 at 1e-2, 0.746 at 3e-3;
  the classifier alone reaches 0.610.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import PeftConfig
from ...core.errors import PeftlabError
from ...core.layer import DeltaModule, base_of
from ...core.registry import MethodSpec, register
from ...core.targets import layer_block, resolve_targets

_KEY = "pasta"
INITS = ("normal", "zeros")
_ID_FIELDS = ("cls_token_id", "sep_token_id", "bos_token_id", "eos_token_id")


@dataclasses.dataclass(frozen=True)
class PastaConfig(PeftConfig):
    """targets: modules inside the layer blocks to adapt (default '@self_attention': every layer);
    num_special_tokens: P, vectors per layer, one per special-token occurrence (3: [CLS] and two
    [SEP]); special_token_ids: token ids that are special (None: the model config's cls/sep/bos/eos
    ids, else its tokenizer's); tokenizer_path: the tokenizer those ids are read from when
    special_token_ids is None (None: the model config first, then the base model's name_or_path);
    init: "normal" (N(0, init_std), the reference) or "zeros" (identity at init); init_std:
    None for the model's ``initializer_range`` (0.02 if it has none); dropout: on the added vectors,
    None for the model's ``hidden_dropout_prob`` (0 if it has none)."""

    targets: tuple[str, ...] | str | None = ("@self_attention",)
    num_special_tokens: int = 3
    special_token_ids: tuple[int, ...] | None = None
    tokenizer_path: str | None = None
    init: str = "normal"
    init_std: float | None = None
    dropout: float | None = None

    def validate(self) -> None:
        self._require(self.num_special_tokens >= 1, "num_special_tokens",
                      "a positive integer: how many special tokens an input holds at most (BERT: 2 for one "
                      "sentence, 3 for a pair)")
        ids = self.special_token_ids
        self._require(ids is None or (isinstance(ids, tuple) and len(ids) > 0 and len(set(ids)) == len(ids) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)), "special_token_ids",
            "None (read cls/sep/bos/eos_token_id from the model config) or distinct non-negative token ids, "
            "e.g. (tokenizer.cls_token_id, tokenizer.sep_token_id)")
        self._require(self.tokenizer_path is None or (isinstance(self.tokenizer_path, str) and self.tokenizer_path != ""),
                      "tokenizer_path", "None or a tokenizer folder/name to read the cls/sep (bos/eos) ids from")
        self._require(self.init in INITS, "init", f"one of {INITS}")
        self._require(self.init_std is None or self.init_std > 0, "init_std", "None or a positive number")
        self._require(self.dropout is None or 0 <= self.dropout < 1, "dropout", "None or a number in [0, 1)")


@dataclasses.dataclass(frozen=True)
class _Setting:
    layers: tuple[str, ...]      # paths of the layer blocks this adapter adds to, row order of its vectors
    special_ids: tuple[int, ...]
    dropout: float


class SpecialTokenVectors(DeltaModule):
    """Model-level module in ``PeftModel.model_adapters``: each adapter's vectors (L, P, d) and the
    hooks that find the special tokens and add the vectors to the layer inputs."""

    adapter_attrs = ("pasta_vectors",)

    def __init__(self) -> None:
        super().__init__()
        self.pasta_vectors = nn.ParameterDict()
        self._handles: list[Any] = []
        self._hooked: set[str] = set()
        self._ids: torch.Tensor | None = None          # input_ids of the call under way
        self._slots: dict[str, torch.Tensor] = {}       # per adapter: one-hot occurrence (B, T, P)

    def add(self, name: str, config: PastaConfig, model: nn.Module) -> None:
        layers = _layer_blocks(model, config)
        special = _special_ids(model, config)
        hidden = _hidden_size(model)
        weight = model.get_input_embeddings().weight
        vectors = torch.zeros(len(layers), config.num_special_tokens, hidden, dtype=weight.dtype, device=weight.device)
        if config.init == "normal":
            std = config.init_std or float(getattr(getattr(model, "config", None), "initializer_range", 0.02))
            with torch.no_grad():
                vectors.normal_(0.0, std)
        model_dropout = getattr(getattr(model, "config", None), "hidden_dropout_prob", 0.0)
        dropout = config.dropout if config.dropout is not None else float(model_dropout)
        self.pasta_vectors[name] = nn.Parameter(vectors)
        self.settings[name] = _Setting(tuple(layers), special, dropout)
        self._install(model, layers)

    # -- hooks -----------------------------------------------------------------------------------
    def _install(self, model: nn.Module, layers: list[str]) -> None:
        if not self._handles:
            self._handles.append(model.register_forward_pre_hook(self._call_starts))
            self._handles.append(model.get_input_embeddings().register_forward_pre_hook(self._read_ids,
                                                                                        with_kwargs=True))
        for path in layers:
            if path not in self._hooked:
                module = model.get_submodule(path)
                self._handles.append(module.register_forward_pre_hook(functools.partial(self._add_vectors, path),
                                                                      with_kwargs=True))
                self._hooked.add(path)

    def release(self, model: nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooked.clear()
        self._ids, self._slots = None, {}

    def _call_starts(self, module: nn.Module, args: tuple) -> None:
        self._ids, self._slots = None, {}

    def _read_ids(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = args[0] if args else kwargs.get("input")
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point():
            self._ids, self._slots = ids, {}

    def _add_vectors(self, path: str, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        live = [n for n in self.live_adapters() if path in self.settings[n].layers]
        if not live:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        delta = None
        for name in live:
            setting = self.settings[name]
            slots = self._occurrences(name, hidden)
            vectors = self.pasta_vectors[name][setting.layers.index(path)].to(hidden.dtype)  # (P, d)
            added = F.dropout(slots.to(hidden.dtype) @ vectors, setting.dropout, training=module.training)
            delta = added if delta is None else delta + added
        hidden = hidden + delta
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _occurrences(self, name: str, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, P) one-hot: row (b, t) picks e_p when token t of example b is its p-th special token."""
        if name in self._slots:
            return self._slots[name]
        ids = self._ids
        if ids is None:
            raise PeftlabError("PASTA finds the special tokens by their ids, but this call passed no input_ids (or "
                               "called a submodule, not the model): call the model with input_ids=..., not inputs_embeds")
        if ids.shape[:2] != hidden.shape[:2]:
            raise PeftlabError(f"PASTA: the layer sees hidden states of {tuple(hidden.shape[:2])} (batch, length) but "
                               f"the model was given input_ids of {tuple(ids.shape)}; call the model itself with the ids")
        setting, count = self.settings[name], self.pasta_vectors[name].shape[1]
        special = torch.isin(ids, torch.tensor(setting.special_ids, device=ids.device))
        occurrence = special.long().cumsum(dim=1) - 1
        if not torch.compiler.is_compiling() and special.numel():  # the check reads the values: a traced graph cannot
            counts = special.sum(dim=1)
            most = int(counts.max())
            if most > count:
                raise PeftlabError(f"PASTA adapter {name!r}: example {int(counts.argmax())} holds {most} special "
                                   f"tokens (ids {list(setting.special_ids)}) but num_special_tokens={count}; give "
                                   f"num_special_tokens >= {most} (BERT: 2 for one sentence, 3 for a pair)")
        # (B, T, P): occurrence p of a special token picks row p (shape-static, so it traces)
        slots = (occurrence.unsqueeze(-1) == torch.arange(count, device=ids.device)) & special.unsqueeze(-1)
        self._slots[name] = slots.long().to(hidden.device)
        return self._slots[name]


def _layer_blocks(model: nn.Module, config: PastaConfig) -> list[str]:
    """The ``nn.ModuleList`` entries (transformer layers) enclosing the modules ``targets`` selects."""
    config_ = getattr(model, "config", None)
    if getattr(config_, "is_encoder_decoder", False):
        raise PeftlabError(f"PASTA adapts bidirectional encoders (the paper: BERT, RoBERTa); {type(model).__name__} "
                           "is an encoder-decoder model, whose decoder inputs are not the ids the encoder saw. Use "
                           "another method (e.g. prompt or prefix tuning) for it.")
    if getattr(config_, "is_decoder", False):
        raise PeftlabError(f"PASTA adapts bidirectional encoders; {type(model).__name__} is configured as a decoder "
                           "(config.is_decoder=True). Load it as an encoder.")
    paths = resolve_targets(model, config.targets)
    blocks: list[str] = []
    for path in paths:
        module = base_of(model.get_submodule(path))
        if getattr(module, "is_causal", False):
            raise PeftlabError(f"PASTA adapts bidirectional encoders (the paper: BERT, RoBERTa); {path!r} "
                               f"({type(module).__name__}) is causal attention, as in GPT-2 or Llama, where a KV "
                               "cache hides earlier special tokens and only later tokens see a special one. Use "
                               "an encoder model, or another method for decoders.")
        block = layer_block(model, path)
        if block is None:
            raise PeftlabError(f"PASTA target {path!r} sits in no layer list (nn.ModuleList) of "
                               f"{type(model).__name__}; name modules inside transformer layers, e.g. '@self_attention'")
        if block not in blocks:
            blocks.append(block)
    return blocks




def _special_ids(model: nn.Module, config: PastaConfig) -> tuple[int, ...]:
    """``special_token_ids``; else a given tokenizer's ids; else the model config's; else the
    tokenizer at the model's ``name_or_path``; else a refusal."""
    model_config = getattr(model, "config", None)
    vocab = model.get_input_embeddings().weight.shape[0]
    pad = getattr(model_config, "pad_token_id", None)
    if config.special_token_ids is not None:
        ids, source = config.special_token_ids, "special_token_ids"
    elif config.tokenizer_path is not None:
        ids, source = _ids_of(_load_tokenizer(config.tokenizer_path, required=True), pad), \
            f"the tokenizer at {config.tokenizer_path!r}"
        if not ids:
            raise PeftlabError(f"PASTA adds vectors to special tokens, but the tokenizer at tokenizer_path="
                               f"{config.tokenizer_path!r} names none ({', '.join(_ID_FIELDS)} are unset): pass "
                               "PastaConfig(special_token_ids=(...)) with the ids of the tokens to adapt")
    else:
        ids, source = _ids_of(model_config, pad), "the model config"
        path = getattr(model_config, "_name_or_path", None) or None
        if not ids and path:
            ids, source = _ids_of(_load_tokenizer(path, required=False), pad), f"the tokenizer at {path!r}"
        if not ids:
            tried = f" nor its tokenizer ({path!r})" if path else " and it has no name_or_path to find a tokenizer by"
            raise PeftlabError(f"PASTA adds vectors to special tokens, but neither {type(model).__name__}'s config "
                               f"({', '.join(_ID_FIELDS)} are unset, as in most BERT configs){tried} names a "
                               "special token id: pass PastaConfig(special_token_ids=(tokenizer.cls_token_id, "
                               "tokenizer.sep_token_id)) or tokenizer_path='<tokenizer folder>'")
    outside = [i for i in ids if i >= vocab]
    if outside:
        raise PeftlabError(f"PASTA special token ids {outside} (from {source}) are outside the model's vocabulary of "
                           f"{vocab} tokens; pass the model's own tokenizer as tokenizer_path, or its ids as "
                           "special_token_ids")
    return tuple(ids)


def _ids_of(holder: Any, pad: Any) -> tuple[int, ...]:
    """The cls/sep/bos/eos ids a model config or tokenizer sets, in that order, without repeats or a
    pad id (the model's, or the tokenizer's own)."""
    if holder is None:
        return ()
    pads = {pad, getattr(holder, "pad_token_id", None)}
    found = [getattr(holder, f, None) for f in _ID_FIELDS]
    return tuple(dict.fromkeys(i for i in found if isinstance(i, int) and not isinstance(i, bool) and i not in pads))


def _load_tokenizer(path: str, required: bool) -> Any:
    """The tokenizer at ``path``; one that cannot be loaded is an error when the user named it
    (``tokenizer_path``), and None when it was only the model's ``name_or_path``."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - any loading failure means the same thing to the user
        if required:
            raise PeftlabError(f"PASTA: could not load a tokenizer from tokenizer_path={path!r} ({err}); give a "
                               "local tokenizer folder, or the ids as special_token_ids") from err
        return None


def _hidden_size(model: nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[1])


def attach(model: nn.Module, name: str, config: PastaConfig, host: Any) -> None:
    if host is None:
        raise PeftlabError("PASTA keeps its vectors on the PeftModel; use get_peft_model(model, config)")
    get = getattr(model, "get_input_embeddings", None)
    if not callable(get) or not isinstance(getattr(get(), "weight", None), torch.Tensor):
        raise PeftlabError(f"PASTA reads token ids at the model's input embedding; {type(model).__name__} has none "
                           "(get_input_embeddings()). Use a transformers encoder such as BERT or RoBERTa.")
    if _KEY not in host.model_adapters:
        host.model_adapters[_KEY] = SpecialTokenVectors()
    # A failed add leaves an empty module, which PeftModel.add_adapter releases and removes.
    host.model_adapters[_KEY].add(name, config, model)


SPEC = register(MethodSpec(
    name="pasta", title="PASTA", family="additive", subcategory="special token adaptation", config_cls=PastaConfig,
    trains="one vector per layer and special-token occurrence, added to the special tokens' hidden states",
    attach=attach,
    paper="Yang et al. 2023, Parameter-Efficient Tuning with Special Token Adaptation",
    mergeable=False, identity_at_init=False, default_lr=1e-2, encoder_only=True,
))
