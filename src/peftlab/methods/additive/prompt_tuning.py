"""Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

``p`` trainable vectors ``P`` (p x d) are prepended to the frozen model's input embeddings; nothing
inside the model changes::

    X = E[input_ids]                    (n x d, the frozen input embedding)
    h = f([P; X])                       (the frozen model on p + n positions)

Only ``P`` trains. Initialisation (Lester et al. section 3.2): ``init="vocab"`` copies the embeddings
of ``p`` vocabulary tokens (sampled uniformly, or the tokens of ``init_text`` repeated/truncated to
``p``); ``init="random"`` draws from U(-0.5, 0.5).

How the inputs change (:meth:`SoftPrompt.transform_inputs`): ``attention_mask`` gets ``p`` ones in
front, ``token_type_ids`` ``p`` zeros, ``position_ids`` ``0..p-1`` followed by the given ids shifted
by ``p``, and labels with one entry per input token (causal LM, token classification) ``p`` times
-100. For an encoder-decoder model the prompt goes in front of the encoder input only.

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
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any, ClassVar

import torch
from torch import nn

from ...core.config import PeftConfig
from ...core.errors import PeftlabError
from ...core.layer import DeltaModule, base_of
from ...core.registry import MethodSpec, register

INITS = ("vocab", "random")
_KEY = "prompt_tuning"  # this method's entry in PeftModel.model_adapters


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig(PeftConfig):
    """num_virtual_tokens: prompt length ``p``; init: ``"vocab"`` (embeddings of vocabulary tokens)
    or ``"random"`` (U(-0.5, 0.5)); init_text: with ``init="vocab"``, start from the tokens of this
    text instead of random ones (needs a tokenizer: ``tokenizer_path``, else the base model's own
    ``name_or_path``). Soft prompts touch no module, so ``targets`` must stay ``None``."""

    checkpoint_model_prefix: ClassVar[str] = "base_model."

    num_virtual_tokens: int = 20
    init: str = "vocab"
    init_text: str | None = None
    tokenizer_path: str | None = None

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
                      "None or a tokenizer folder/name for init_text")

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
        init = {"RANDOM": "random"}.get(str(data.get("prompt_tuning_init", "RANDOM")).upper(), "vocab")
        text = data.get("prompt_tuning_init_text") if str(data.get("prompt_tuning_init")).upper() == "TEXT" else None
        if data.get("inference_mode", True):
            # A saved prompt is loaded over the initial one; do not ask for the tokenizer just to initialise.
            text = None
        return cls(num_virtual_tokens=int(data["num_virtual_tokens"]), init=init, init_text=text,
                   tokenizer_path=data.get("tokenizer_name_or_path") if text else None,
                   modules_to_save=tuple(data.get("modules_to_save") or ()))


class SoftPrompt(DeltaModule):
    """Model-level module holding one prompt ``P`` (p x d) per adapter; it sits in
    ``PeftModel.model_adapters`` and rewrites the inputs of every forward/generate call."""

    adapter_attrs = ("prompt_embeddings",)

    def __init__(self, encoder_decoder: bool) -> None:
        super().__init__()
        self.prompt_embeddings = nn.ParameterDict()
        self.encoder_decoder = encoder_decoder

    def add(self, name: str, config: PromptTuningConfig, model: nn.Module) -> None:
        weight = _input_embedding_weight(model)
        p, (vocab, _) = config.num_virtual_tokens, weight.shape
        with torch.no_grad():
            if config.init == "random":
                prompt = torch.empty(p, weight.shape[1], device=weight.device, dtype=weight.dtype).uniform_(-0.5, 0.5)
            else:
                ids = (_text_ids(config, model, p) if config.init_text else torch.randint(0, vocab, (p,))).to(weight.device)
                prompt = weight[ids].detach().clone()
        self.prompt_embeddings[name] = nn.Parameter(prompt)

    def prompt(self) -> torch.Tensor:
        """The live prompt (p x d); several live adapters are concatenated in order."""
        live = self.live_adapters()
        if len(live) == 1:
            return self.prompt_embeddings[live[0]]
        return torch.cat([self.prompt_embeddings[n] for n in live], dim=0)

    # -- the input rewrite -------------------------------------------------------------------
    def transform_inputs(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        kwargs = bind_arguments(model, "forward", args, kwargs)
        if self.encoder_decoder and kwargs.get("encoder_outputs") is not None:
            return (), kwargs  # the encoder already ran (with the prompt, inside generate)
        prompt = self.prompt()
        cache = kwargs.get("past_key_values")
        if not self.encoder_decoder and cache is not None and _cached_length(cache) > 0:
            # Incremental decoding: the prompt is already in the cache; only the mask must count it.
            if kwargs.get("attention_mask") is not None:
                kwargs["attention_mask"] = _pad_front(kwargs["attention_mask"], prompt.shape[0], 1)
            return (), kwargs
        return (), self._prepend(model, prompt, kwargs, labels=not self.encoder_decoder)

    def generate(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        kwargs = bind_arguments(model, "generate", args, kwargs)
        ids = kwargs.pop("input_ids", None)
        inputs = kwargs.pop("inputs", None)
        ids = inputs if ids is None else ids
        if ids is not None and ids.is_floating_point():
            raise PeftlabError("generate(inputs=...) got a float tensor; pass input_ids=... or inputs_embeds=...")
        kwargs["input_ids"] = ids
        kwargs = self._prepend(model, self.prompt(), kwargs, labels=False)
        out = model.generate(**kwargs)
        if self.encoder_decoder or ids is None:
            return out  # decoder tokens only / only new tokens, as the base model returns them
        # A decoder-only model given inputs_embeds returns the new tokens only; put the ids back in front.
        if isinstance(out, torch.Tensor):
            return torch.cat([ids, out.to(ids.device)], dim=1)
        out.sequences = torch.cat([ids, out.sequences.to(ids.device)], dim=1)
        return out

    def _prepend(self, model: nn.Module, prompt: torch.Tensor, kwargs: dict[str, Any], labels: bool) -> dict[str, Any]:
        ids = kwargs.pop("input_ids", None)
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            if ids is None:
                raise PeftlabError("prompt tuning needs input_ids or inputs_embeds to put the prompt in front of")
            embeds = model.get_input_embeddings()(ids)
        batch, n, p = embeds.shape[0], embeds.shape[1], prompt.shape[0]
        kwargs["inputs_embeds"] = torch.cat([prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)
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


def _pad_front(x: torch.Tensor, p: int, value: int) -> torch.Tensor:
    return torch.cat([torch.full((x.shape[0], p, *x.shape[2:]), value, dtype=x.dtype, device=x.device), x], dim=1)


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


def _text_ids(config: PromptTuningConfig, model: nn.Module, p: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    path = config.tokenizer_path or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        raise PeftlabError("init_text needs a tokenizer: set tokenizer_path (the base model has no name_or_path)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - any loading failure means the same thing to the user
        raise PeftlabError(f"init_text: could not load a tokenizer from {path!r} ({err}); set tokenizer_path "
                           "to a local tokenizer folder") from err
    ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PeftlabError(f"init_text={config.init_text!r} tokenizes to nothing; give a longer text")
    # Repeat the text's tokens until there are p of them (a shorter prompt than the text truncates it).
    return torch.tensor((ids * math.ceil(p / len(ids)))[:p], dtype=torch.long)


def attach(model: nn.Module, name: str, config: PromptTuningConfig, host: Any) -> None:
    if host is None:
        raise PeftlabError("prompt tuning keeps its prompt on the PeftModel; use get_peft_model(model, config)")
    if _KEY not in host.model_adapters:
        host.model_adapters[_KEY] = SoftPrompt(bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False)))
    host.model_adapters[_KEY].add(name, config, model)


SPEC = register(MethodSpec(
    name="prompt_tuning", family="additive", subcategory="soft prompt", config_cls=PromptTuningConfig,
    trains="p virtual token embeddings prepended to the input", attach=attach,
    paper="Lester et al. 2021, The Power of Scale for Parameter-Efficient Prompt Tuning",
    mergeable=False, identity_at_init=False, changes_sequence_length=True, peft_type="PROMPT_TUNING",
    default_lr=3e-2,
))
