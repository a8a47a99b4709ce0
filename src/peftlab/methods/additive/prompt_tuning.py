"""Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

``p`` trainable vectors ``P`` (p x d) are prepended to the frozen model's input embeddings; nothing
inside the model changes::

    X = E[input_ids]                    (n x d, the frozen input embedding)
    h = f([P; X])                       (the frozen model on p + n positions)

Only ``P`` trains. Initialisation (Lester et al. section 3.2):

- ``init="vocab"``: copies the embeddings of ``p`` tokens sampled (distinct while there are enough)
  from the ``vocab_top_k`` (5,000) most frequent tokens, as the paper; ``vocab_top_k=None`` samples
  the whole vocabulary (HF peft's ``SAMPLE_VOCAB``). Where the frequencies come from: with
  ``frequency_file`` (a UTF-8 text file), the model's tokenizer counts the tokens of that text and
  the most frequent ``vocab_top_k`` that occur in it are the pool. Without it the token id is taken
  as the frequency rank, i.e. the pool is ids ``0 .. vocab_top_k-1``. That is an assumption, not a
  measurement: it holds roughly for SentencePiece vocabularies (T5's, the paper's, are sorted by
  piece score; Llama's by merge order) and byte-level BPE (GPT-2: merge order, after the 256 byte
  tokens), and it does not hold for WordPiece (BERT's first ~2,000 ids are ``[unused]`` slots and
  single characters): give ``frequency_file`` there.
- ``init_text``: the tokens of this text, repeated/truncated to ``p`` (a kind of ``init="vocab"``).
- ``init="random"``: U(-0.5, 0.5).
- ``init_labels`` (class-label init, combined with any of the above): the first ``len(init_labels)``
  rows are the embeddings of the class label words, a label of several tokens averaged, as the
  paper; the remaining rows follow ``init``/``init_text``. Labels are tokenized as given, without
  special tokens (for byte-level BPE, write ``" positive"`` to get the word-initial token).

``init_text``, ``init_labels`` and ``frequency_file`` use the model's tokenizer (``tokenizer_path``,
else the base model's ``name_or_path``).

How the inputs change (:meth:`SoftPrompt.transform_inputs`): ``attention_mask`` gets ``p`` ones in
front, ``token_type_ids`` ``p`` zeros, ``position_ids`` ``0..p-1`` followed by the given ids shifted
by ``p``, and labels with one entry per input token (causal LM, token classification) ``p`` times
-100. For an encoder-decoder model the prompt goes in front of the encoder input only. An input the
prompt pushes past the model's ``max_position_embeddings`` is refused before the model runs.

Like HF peft, the output keeps the ``p`` prompt positions: a causal LM returns ``p + n`` logits per
sequence (peft returns the same; parity checked to 1e-5 on a pretrained Llama). ``generate`` returns
``[input_ids, new tokens]``, the same form as the base model's ``generate``; its positions follow
generate's padding-aware rule over [prompt; tokens] (peft drops position ids in generate, so with left
padding its positions count the pads; without padding both agree).

Not identity at init (the prompt is attended to from the first step) and not mergeable (it adds
positions, not weights); it changes the sequence length of token-level outputs.

Checkpoints hold one tensor, ``prompt_embeddings`` (p x d), at the top level as peft writes it; peft
reads peftlab's file and peftlab reads peft's (encoder-decoder: peft also prompts the decoder and
saves 2p rows; peftlab writes ``num_transformer_submodules=1`` so peft prompts the encoder only).
The initialisation only matters before training: peft has no top-k or class-label init, so the
config tells peft ``SAMPLE_VOCAB``/``TEXT``/``RANDOM`` for the rows after the labels (saved configs
are in inference mode, where peft does not initialise), and a peft ``SAMPLE_VOCAB`` config reads
back as ``vocab_top_k=None`` (peft samples the whole vocabulary).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ...core.config import PeftConfig
from ...core.errors import PeftlabError
from ...core.layer import DeltaModule, base_of
from ...core.registry import MethodSpec, register

INITS = ("vocab", "random")
TOP_K = 5000  # Lester et al.: "the 5,000 most common tokens"
_KEY = "prompt_tuning"  # this method's entry in PeftModel.model_adapters


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig(PeftConfig):
    """num_virtual_tokens: prompt length ``p``; init: ``"vocab"`` (embeddings of tokens sampled from the
    ``vocab_top_k`` most frequent; ``None``: the whole vocabulary) or ``"random"`` (U(-0.5, 0.5));
    frequency_file: a text file whose token counts rank the vocabulary for ``init="vocab"`` (without
    it the token id is the rank, see the module docstring); init_text: with ``init="vocab"``, start
    from the tokens of this text instead of sampled ones; init_labels: class label words whose
    (averaged) token embeddings fill the first positions. The tokenizer is ``tokenizer_path``, else
    the base model's own ``name_or_path``. Soft prompts touch no module, so ``targets`` must stay
    ``None``."""

    checkpoint_model_prefix: ClassVar[str] = "base_model."

    num_virtual_tokens: int = 20
    init: str = "vocab"
    init_text: str | None = None
    tokenizer_path: str | None = None
    vocab_top_k: int | None = TOP_K
    frequency_file: str | None = None
    init_labels: tuple[str, ...] = ()

    def validate(self) -> None:
        self._require(self.targets is None, "targets",
                      "None: a soft prompt is prepended to the input and touches no module")
        self._require(isinstance(self.num_virtual_tokens, int) and not isinstance(self.num_virtual_tokens, bool)
                      and self.num_virtual_tokens > 0, "num_virtual_tokens", "a positive integer such as 20")
        self._require(self.init in INITS, "init", f"one of {INITS}")
        self._require(self.init_text is None or (isinstance(self.init_text, str) and self.init_text.strip() != ""),
                      "init_text", "None or a non-empty text whose tokens start the prompt")
        self._require(self.init_text is None or self.init == "vocab", "init_text",
                      "None when init='random' (text initialisation is a kind of init='vocab')")
        self._require(self.tokenizer_path is None or isinstance(self.tokenizer_path, str), "tokenizer_path",
                      "None or a tokenizer folder/name for init_text, init_labels or frequency_file")
        k = self.vocab_top_k
        self._require(k is None or (isinstance(k, int) and not isinstance(k, bool) and k > 0), "vocab_top_k",
                      f"a positive integer such as {TOP_K} (sample among that many most frequent tokens), or None "
                      "(the whole vocabulary)")
        path = self.frequency_file
        self._require(path is None or (isinstance(path, str) and path != ""), "frequency_file",
                      "None or the path of a text file whose token counts rank the vocabulary")
        # Ranking the vocabulary only matters when tokens are sampled: refuse it where it would be ignored.
        self._require(self.frequency_file is None or (self.init == "vocab" and self.init_text is None),
                      "frequency_file", "None unless init='vocab' without init_text (it ranks the tokens to sample)")
        labels = self.init_labels
        self._require(isinstance(labels, tuple) and all(isinstance(w, str) and w.strip() for w in labels)
                      and len(labels) <= self.num_virtual_tokens, "init_labels",
                      "a tuple of non-empty label words such as ('negative', 'positive'), at most "
                      "num_virtual_tokens of them (one prompt position each)")

    @property
    def needs_tokenizer(self) -> bool:
        return bool(self.init_text or self.init_labels or self.frequency_file)

    def peft_fields(self) -> dict[str, Any]:
        init = "RANDOM" if self.init == "random" else ("TEXT" if self.init_text else "SAMPLE_VOCAB")
        return {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": self.num_virtual_tokens,
                "prompt_tuning_init": init, "prompt_tuning_init_text": self.init_text,
                "tokenizer_name_or_path": self.tokenizer_path, "num_transformer_submodules": 1,
                "inference_mode": True, "modules_to_save": list(self.modules_to_save) or None}

    @classmethod
    def from_peft(cls, data: dict[str, Any]) -> "PromptTuningConfig":
        if (data.get("num_transformer_submodules") or 1) != 1:
            raise PeftlabError("this peft prompt-tuning checkpoint prompts both encoder and decoder "
                               f"(num_transformer_submodules={data['num_transformer_submodules']}); peftlab "
                               "prompts the encoder only. Retrain it with num_transformer_submodules=1.")
        peft_init = str(data.get("prompt_tuning_init", "RANDOM")).upper()
        init = {"RANDOM": "random"}.get(peft_init, "vocab")
        text = data.get("prompt_tuning_init_text") if peft_init == "TEXT" else None
        if data.get("inference_mode", True):
            # A saved prompt is loaded over the initial one; do not ask for the tokenizer just to initialise.
            text = None
        return cls(num_virtual_tokens=int(data["num_virtual_tokens"]), init=init, init_text=text,
                   tokenizer_path=data.get("tokenizer_name_or_path") if text else None,
                   vocab_top_k=None if peft_init == "SAMPLE_VOCAB" else TOP_K,  # peft samples the whole vocabulary
                   modules_to_save=tuple(data.get("modules_to_save") or ()))


class SoftPrompt(DeltaModule):
    """Model-level module holding one prompt ``P`` (p x d) per adapter; it sits in
    ``PeftModel.model_adapters`` and rewrites the inputs of every forward/generate call.

    An adapter's rows are a parameter (``prompt_embeddings``) or the output of a module called
    without arguments (``prompt_encoder``: a reparameterisation such as P-tuning's encoder). Either
    way the checkpoint holds the rows, ``prompt_embeddings`` (p x d); loading one into a module
    adapter replaces the module by the loaded rows."""

    adapter_attrs = ("prompt_embeddings", "prompt_encoder")

    def __init__(self, encoder_decoder: bool) -> None:
        super().__init__()
        self.prompt_embeddings = nn.ParameterDict()
        self.prompt_encoder = nn.ModuleDict()
        self.encoder_decoder = encoder_decoder

    def add(self, name: str, config: PromptTuningConfig, model: nn.Module) -> None:
        weight = _input_embedding_weight(model)
        tokenizer = _load_tokenizer(config, model) if config.needs_tokenizer else None
        with torch.no_grad():
            labels = [weight[_token_ids(tokenizer, word, "init_labels").to(weight.device)].mean(dim=0)
                      for word in config.init_labels]  # a multi-token label is averaged, as the paper
            rest = config.num_virtual_tokens - len(labels)
            if config.init == "random":
                rows = torch.empty(rest, weight.shape[1], device=weight.device, dtype=weight.dtype).uniform_(-0.5, 0.5)
            elif config.init_text:
                ids = _token_ids(tokenizer, config.init_text, "init_text")
                # Repeat the text's tokens until there are enough of them (a shorter prompt truncates it).
                rows = weight[(ids.repeat(math.ceil(rest / len(ids)))[:rest]).to(weight.device)]
            else:
                rows = weight[_sampled_ids(config, tokenizer, weight.shape[0], rest).to(weight.device)]
            prompt = torch.cat([torch.stack(labels), rows]) if labels else rows
        self.prompt_embeddings[name] = nn.Parameter(prompt.detach().clone())

    def rows(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s prompt (p x d): its parameter, or its encoder's output."""
        if name in self.prompt_encoder:
            return self.prompt_encoder[name]()
        return self.prompt_embeddings[name]

    def prompt(self) -> torch.Tensor:
        """The live prompt (p x d); several live adapters are concatenated in order."""
        live = self.live_adapters()
        if len(live) == 1:
            return self.rows(live[0])
        return torch.cat([self.rows(n) for n in live], dim=0)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.prompt_encoder:
            return super().adapter_state(name)
        with torch.no_grad():  # the checkpoint form: the encoder's output
            return {"prompt_embeddings": self.rows(name).detach()}

    def load_adapter_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        if name not in self.prompt_encoder:
            super().load_adapter_state(name, tensors)
            return
        like = next(self.prompt_encoder[name].parameters())
        value = tensors["prompt_embeddings"].to(dtype=like.dtype, device=like.device).clone()
        del self.prompt_encoder[name]
        self.prompt_embeddings[name] = nn.Parameter(value, requires_grad=like.requires_grad)

    # -- the input rewrite -------------------------------------------------------------------
    def transform_inputs(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        kwargs = bind_arguments(model, "forward", args, kwargs)
        if self.encoder_decoder and kwargs.get("encoder_outputs") is not None:
            return (), kwargs  # the encoder already ran (with the prompt, inside generate)
        cache = given_cache(kwargs)
        if not self.encoder_decoder and cache is not None and _cached_length(cache) > 0:
            # Incremental decoding: the prompt is already in the cache; only the mask must count it.
            if kwargs.get("attention_mask") is not None:
                kwargs["attention_mask"] = _pad_front(kwargs["attention_mask"], self.prompt_length(), 1)
            return (), kwargs
        return (), self.prepend(model, self.prompt_for(model, kwargs), kwargs, labels=not self.encoder_decoder)

    def prompt_for(self, model: nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
        """The prompt put in front of this call's inputs: (p x d), or (batch x p x d) for a method whose
        prompt depends on the input (it may replace ``input_ids`` in ``kwargs`` by ``inputs_embeds``)."""
        return self.prompt()

    def prompt_length(self) -> int:
        return int(self.prompt().shape[0])

    def generate(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], call: Any) -> Any:
        """``call`` (the next input-level adapter's generate, or the model's) with the prompt in front."""
        kwargs = bind_arguments(model, "generate", args, kwargs)
        ids = kwargs.pop("input_ids", None)
        inputs = kwargs.pop("inputs", None)
        ids = inputs if ids is None else ids
        if ids is not None and ids.is_floating_point():
            raise PeftlabError("generate(inputs=...) got a float tensor; pass input_ids=... or inputs_embeds=...")
        kwargs["input_ids"] = ids
        kwargs = self.prepend(model, self.prompt_for(model, kwargs), kwargs, labels=False)
        out = call(**kwargs)
        if self.encoder_decoder or ids is None:
            return out  # decoder tokens only / only new tokens, as the base model returns them
        # A decoder-only model given inputs_embeds returns the new tokens only; put the ids back in front.
        if isinstance(out, torch.Tensor):
            return torch.cat([ids, out.to(ids.device)], dim=1)
        out.sequences = torch.cat([ids, out.sequences.to(ids.device)], dim=1)
        return out

    @staticmethod
    def prepend(model: nn.Module, prompt: torch.Tensor, kwargs: dict[str, Any], labels: bool) -> dict[str, Any]:
        """``kwargs`` (by name) with ``prompt`` (p x d, or one per example: batch x p x d) in front of the input
        embeddings and the mask, token types, positions and (``labels=True``) per-token labels extended to
        match; also used by WARP."""
        ids = kwargs.pop("input_ids", None)
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            if ids is None:
                raise PeftlabError("prompt tuning needs input_ids or inputs_embeds to put the prompt in front of")
            embeds = model.get_input_embeddings()(ids)
        batch, n, p = embeds.shape[0], embeds.shape[1], prompt.shape[-2]
        _check_positions(model, p, n, kwargs.get("position_ids"))
        rows = prompt if prompt.dim() == 3 else prompt.unsqueeze(0).expand(batch, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([rows.to(embeds.dtype), embeds], dim=1)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise PeftlabError(f"prompt tuning extends a 2D attention_mask (batch, length); got shape "
                                   f"{tuple(mask.shape)}. Pass the 2D padding mask and let the model build the rest.")
            kwargs["attention_mask"] = _pad_front(mask, p, 1)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = _pad_front(kwargs["token_type_ids"], p, 0)
        positions = kwargs.get("position_ids")
        if positions is not None:
            front = torch.arange(p, device=positions.device, dtype=positions.dtype).expand(positions.shape[0], p)
            kwargs["position_ids"] = torch.cat([front, positions + p], dim=1)
        target = kwargs.get("labels")
        if labels and target is not None and target.dim() >= 2 and tuple(target.shape[:2]) == (batch, n):
            kwargs["labels"] = _pad_front(target, p, -100)
        return kwargs


def bind_arguments(model: nn.Module, method: str, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``model.<method>(*args, **kwargs)`` as keyword arguments only (``model(ids, mask)`` names both),
    so the inputs can be rewritten by name."""
    if not args:
        return dict(kwargs)
    names = _positional_names(type(model), method)
    if len(args) > len(names):
        raise PeftlabError(f"{method}() got {len(args)} positional arguments; {type(model).__name__} takes {len(names)}")
    clash = [n for n in names[:len(args)] if n in kwargs]
    if clash:
        raise PeftlabError(f"{method}() got {clash} both by position and by name")
    return {**dict(zip(names, args)), **kwargs}


@functools.lru_cache(maxsize=None)
def _positional_names(cls: type, method: str) -> list[str]:
    params = list(inspect.signature(getattr(cls, method)).parameters.values())[1:]  # drop self
    return [prm.name for prm in params if prm.kind in (prm.POSITIONAL_ONLY, prm.POSITIONAL_OR_KEYWORD)]


def _check_positions(model: nn.Module, p: int, n: int, positions: torch.Tensor | None) -> None:
    """Refuse, before the model runs, an input that the prompt pushes past the model's position limit
    (``max_position_embeddings`` / ``n_positions``; models without one, T5, are not limited)."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(limit, int) or (positions is not None and torch.compiler.is_compiling()):
        return  # reading given positions under torch.compile would break the traced graph
    last = p + (int(positions.max()) + 1 if positions is not None and positions.numel() else n)
    if last > limit:
        raise PeftlabError(f"the soft prompt's {p} positions plus this input ({n} tokens) need {last} positions; "
                           f"{type(model).__name__} has {limit} (max_position_embeddings). Truncate inputs to at "
                           f"most {max(limit - p, 0)} tokens, or use fewer virtual tokens.")


def _pad_front(x: torch.Tensor, p: int, value: int) -> torch.Tensor:
    return torch.cat([torch.full((x.shape[0], p, *x.shape[2:]), value, dtype=x.dtype, device=x.device), x], dim=1)


def cache_argument(model: nn.Module) -> str:
    """The name ``model.forward`` takes a KV cache by: transformers 5.24 renamed ``past_key_values``
    to ``cache`` (the old name warns, and goes in 5.40); earlier releases know only the old one."""
    for module in (model, getattr(model, "base_model", None)):  # heads may pass it on through **kwargs
        if module is not None and "cache" in inspect.signature(type(module).forward).parameters:
            return "cache"
    return "past_key_values"


def given_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache a call passed, under either name."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def _cached_length(cache: Any) -> int:
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0  # legacy tuple cache


def _input_embedding_weight(model: nn.Module) -> torch.Tensor:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    weight = getattr(base_of(embedding), "weight", None) if embedding is not None else None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise PeftlabError(f"prompt tuning needs the model's input embedding; {type(model).__name__}."
                           "get_input_embeddings() gave none. Use a model with a token embedding.")
    return weight


def _load_tokenizer(config: PromptTuningConfig, model: nn.Module) -> Any:
    from transformers import AutoTokenizer

    path = config.tokenizer_path or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        raise PeftlabError("init_text, init_labels and frequency_file need a tokenizer: set tokenizer_path (the "
                           "base model has no name_or_path)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - any loading failure means the same thing to the user
        raise PeftlabError(f"prompt tuning init: could not load a tokenizer from {path!r} ({err}); set "
                           "tokenizer_path to a local tokenizer folder") from err


def _token_ids(tokenizer: Any, text: str, field: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PeftlabError(f"{field}: {text!r} tokenizes to nothing; give a longer text")
    return torch.tensor(ids, dtype=torch.long)


def _sampled_ids(config: PromptTuningConfig, tokenizer: Any, vocab: int, n: int) -> torch.Tensor:
    """``n`` ids sampled from the ``vocab_top_k`` most frequent tokens, distinct while there are enough."""
    if config.frequency_file is None:
        ranked = torch.arange(vocab)  # the id is taken as the frequency rank (see the module docstring)
    else:
        try:
            lines = Path(config.frequency_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise PeftlabError(f"frequency_file={config.frequency_file!r} cannot be read ({err}); give a UTF-8 "
                               "text file in the model's language") from err
        encoded = tokenizer(lines, add_special_tokens=False)["input_ids"] if lines else []
        ids = [i for line in encoded for i in line if i < vocab]
        counts = torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=vocab)
        if not counts.any():
            raise PeftlabError(f"frequency_file={config.frequency_file!r} holds no tokens of this vocabulary; "
                               "give a text file in the model's language")
        order = torch.sort(counts, descending=True, stable=True).indices  # ties: lower id first
        ranked = order[:int((counts > 0).sum())]  # only tokens the text has
    pool = ranked[:config.vocab_top_k] if config.vocab_top_k is not None else ranked
    if n <= len(pool):
        return pool[torch.randperm(len(pool))[:n]]
    return pool[torch.randint(0, len(pool), (n,))]


def attach(model: nn.Module, name: str, config: PromptTuningConfig, host: Any) -> None:
    if host is None:
        raise PeftlabError("prompt tuning keeps its prompt on the PeftModel; use get_peft_model(model, config)")
    if _KEY not in host.model_adapters:
        host.model_adapters[_KEY] = SoftPrompt(bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False)))
    host.model_adapters[_KEY].add(name, config, model)


SPEC = register(MethodSpec(
    name="prompt_tuning", title="Prompt tuning", family="additive", subcategory="soft prompt", config_cls=PromptTuningConfig,
    trains="p virtual token embeddings prepended to the input", attach=attach,
    paper="Lester et al. 2021, The Power of Scale for Parameter-Efficient Prompt Tuning",
    mergeable=False, identity_at_init=False, changes_sequence_length=True, peft_type="PROMPT_TUNING",
    default_lr=3e-2,
))
