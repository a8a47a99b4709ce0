"""ATTEMPT (Asai, Salehi, Peters and Hajishirzi, 2022, "ATTEMPT: Parameter-Efficient Multi-task Tuning
via Attentional Mixtures of Soft Prompts", EMNLP): a soft prompt for a target task made, per input,
of source prompts trained before on other tasks (frozen) and a new target prompt. With ``X`` the
input's token embeddings (n x d), source prompts ``P_1 .. P_t`` and the target prompt ``P_{t+1}``
(each p x d)::

    x = max_i X_i                                  (max-pool over the input's tokens)
    q = LayerNorm(W_up SiLU(W_down x))             W_down: r x d, W_up: d x r (no biases)
    a_j = softmax_j( (max_k P_j[k]) . q / T )      j = 1 .. t+1 (max-pool over each prompt's rows)
    P(x) = P_{t+1} + sum_j a_j P_j
    h = f([P(x); X])

Only the target prompt and the attention (``W_down``, ``W_up``, the LayerNorm) train. The source
prompts are prompt-tuning adapters of the same model (``sources``: their names; trained first, e.g.
one per source task, then loaded), read live and never changed, so the ATTEMPT adapter saves only
its own tensors: ``prompt_embeddings`` (the target prompt, p x d) and ``attention.*``.

Defaults from the paper and its reference code (AkariAsai/ATTEMPT, ``attn_method="sub"``):
``r = 100``; ``W_down``, ``W_up`` ~ N(0, 0.01^2), the LayerNorm at (1, 0); ``T = d * e`` (the code's
temperature when learned starts there; its fixed default, 2000, is that value for T5-base's
d = 768); the target prompt starts as prompt tuning's (sampled vocabulary embeddings; the
``PromptTuningConfig`` fields set it) and has the sources' length. peft has no ATTEMPT: checkpoints
are peftlab's own form.

Deviations:
- The input is max-pooled over its real tokens only (the reference pools padding positions too),
  so an example's prompt does not depend on how its batch was padded.
- One target task per adapter (the paper's single-task ATTEMPT); its multi-task variant shares one
  attention across targets trained together, which here is one ATTEMPT adapter per target.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from ...core.config import PeftConfig
from ...core.errors import PeftlabError
from ...core.registry import MethodSpec, register
from .prompt_tuning import _KEY as PROMPT_KEY
from .prompt_tuning import PromptTuningConfig, SoftPrompt

_KEY = "attempt"  # this method's entry in PeftModel.model_adapters


@dataclasses.dataclass(frozen=True)
class AttemptConfig(PromptTuningConfig):
    """sources: names of the trained prompt-tuning adapters to mix (at least one); attention_dim: r,
    the attention's inner width; temperature: T of the softmax (None: d * e). The other fields are
    prompt tuning's and set the target prompt's initialisation; num_virtual_tokens must equal the
    sources' length."""

    sources: tuple[str, ...] = ()
    attention_dim: int = 100
    temperature: float | None = None

    def validate(self) -> None:
        super().validate()
        # () is allowed here (a config before the sources are chosen); attaching it is refused.
        self._require(isinstance(self.sources, tuple) and all(isinstance(s, str) and s for s in self.sources)
                      and len(set(self.sources)) == len(self.sources), "sources",
                      "the names of distinct trained prompt-tuning adapters, e.g. ('mnli', 'sst2')")
        self._require(isinstance(self.attention_dim, int) and not isinstance(self.attention_dim, bool)
                      and self.attention_dim > 0, "attention_dim", "a positive integer such as 100")
        self._require(self.temperature is None or (isinstance(self.temperature, (int, float))
                                                   and not isinstance(self.temperature, bool)
                                                   and math.isfinite(self.temperature) and self.temperature > 0),
                      "temperature", "None (d * e) or a positive number")

    def required_adapters(self) -> tuple[str, ...]:
        return self.sources

    def peft_fields(self) -> dict[str, Any]:
        return {}  # peft has no ATTEMPT: the prompt-tuning keys would make peft load it as a plain prompt

    @classmethod
    def from_peft(cls, data: dict[str, Any]) -> "AttemptConfig":
        raise PeftlabError("AttemptConfig cannot read a peft config: peft has no ATTEMPT")


class _Attention(nn.Module):
    """q = LayerNorm(W_up SiLU(W_down x)): the pooled input's query over the prompts."""

    def __init__(self, d: int, r: int, like: torch.Tensor) -> None:
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        self.down = nn.Linear(d, r, bias=False, **kw)
        self.up = nn.Linear(r, d, bias=False, **kw)
        self.norm = nn.LayerNorm(d, **kw)
        with torch.no_grad():
            self.down.weight.normal_(0.0, 0.01)
            self.up.weight.normal_(0.0, 0.01)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.norm(self.up(nn.functional.silu(self.down(pooled))))


class AttemptPrompt(SoftPrompt):
    """Model-level module: per adapter a target prompt and an attention; the prompt of each example
    is mixed from the source prompts (read from the model's prompt-tuning module) and the target's."""

    adapter_attrs = ("prompt_embeddings", "attention")

    def __init__(self, encoder_decoder: bool, host: Any) -> None:
        super().__init__(encoder_decoder)
        self.attention = nn.ModuleDict()
        # The host's module-level adapters, in a plain list: not a submodule of this one (the source
        # prompts are another adapter's tensors), and a deep copy of the model copies it along.
        self._host_adapters = [host.model_adapters]

    def add(self, name: str, config: AttemptConfig, model: nn.Module) -> None:
        super().add(name, config, model)
        rows = self.prompt_embeddings[name]
        self.attention[name] = _Attention(rows.shape[1], config.attention_dim, rows)
        self.settings[name] = config

    def _sources(self, name: str) -> torch.Tensor:
        prompts = self._host_adapters[0][PROMPT_KEY]
        return torch.stack([prompts.rows(s).detach() for s in self.settings[name].sources])

    def prompt_length(self) -> int:
        return sum(int(self.prompt_embeddings[n].shape[0]) for n in self.live_adapters())

    def prompt_for(self, model: nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            ids = kwargs.pop("input_ids", None)
            if ids is None:
                raise PeftlabError("ATTEMPT needs input_ids or inputs_embeds: its prompt is chosen from the input")
            embeds = kwargs["inputs_embeds"] = model.get_input_embeddings()(ids)
        mask = kwargs.get("attention_mask")
        pooled = embeds.max(dim=1).values
        if mask is not None and mask.dim() == 2:
            real = mask.bool().unsqueeze(-1)
            masked = embeds.masked_fill(~real, float("-inf")).max(dim=1).values
            pooled = torch.where(real.any(dim=1), masked, pooled)  # an all-padding row: every position
        return torch.cat([self._mixed(name, pooled) for name in self.live_adapters()], dim=1)

    def _mixed(self, name: str, pooled: torch.Tensor) -> torch.Tensor:
        """(batch x p x d): the target prompt plus the attention-weighted mixture of all prompts."""
        prompts = self._prompts(name)
        weights = self.attention_weights(name, pooled, prompts)
        return self.prompt_embeddings[name].unsqueeze(0) + torch.einsum("bj,jpd->bpd", weights, prompts)

    def _prompts(self, name: str) -> torch.Tensor:
        """The sources' prompts then the target's: (t+1) x p x d."""
        target = self.prompt_embeddings[name]
        return torch.cat([self._sources(name).to(target.dtype), target.unsqueeze(0)])

    def attention_weights(self, name: str, pooled: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """The mixture weights a (batch x (t+1); the sources first, the target last) for pooled inputs."""
        prompts = self._prompts(name) if prompts is None else prompts
        temperature = self.settings[name].temperature or prompts.shape[-1] * math.e
        query = self.attention[name](pooled.to(prompts.dtype))
        return (query @ prompts.max(dim=1).values.T / temperature).softmax(dim=-1)


def attach(model: nn.Module, name: str, config: AttemptConfig, host: Any = None) -> None:
    if host is None:
        raise PeftlabError("ATTEMPT keeps its prompt on the PeftModel; use get_peft_model(model, config)")
    if not config.sources:
        raise PeftlabError("AttemptConfig.sources is empty: name the trained prompt-tuning adapters to mix, "
                           "e.g. AttemptConfig(sources=('mnli', 'sst2'))")
    prompts = host.model_adapters[PROMPT_KEY] if PROMPT_KEY in host.model_adapters else None
    missing = [s for s in config.sources if prompts is None or s not in prompts.adapter_names()]
    if missing:
        raise PeftlabError(f"ATTEMPT sources {missing} are not prompt-tuning adapters of this model; add or load "
                           "them first (PromptTuningConfig), under those names")
    lengths = {s: int(prompts.rows(s).shape[0]) for s in config.sources}
    if set(lengths.values()) != {config.num_virtual_tokens}:
        raise PeftlabError(f"ATTEMPT mixes prompts of one length: the sources have {lengths} rows and "
                           f"num_virtual_tokens={config.num_virtual_tokens}; set num_virtual_tokens to theirs")
    if _KEY not in host.model_adapters:
        encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        host.model_adapters[_KEY] = AttemptPrompt(encoder_decoder, host)
    host.model_adapters[_KEY].add(name, config, model)


def _example() -> tuple[dict[str, PeftConfig], AttemptConfig]:
    source = PromptTuningConfig(num_virtual_tokens=4, init="random")
    return ({"task_a": source, "task_b": source},
            AttemptConfig(sources=("task_a", "task_b"), num_virtual_tokens=4, init="random"))


SPEC = register(MethodSpec(
    name="attempt", title="ATTEMPT", family="additive", subcategory="soft prompt", config_cls=AttemptConfig,
    trains="a target prompt and an attention that mixes it per input with frozen source prompts", attach=attach,
    paper="Asai et al. 2022, ATTEMPT: Parameter-Efficient Multi-task Tuning via Attentional Mixtures of Soft Prompts",
    mergeable=False, identity_at_init=False, changes_sequence_length=True, default_lr=3e-2, example=_example,
))
