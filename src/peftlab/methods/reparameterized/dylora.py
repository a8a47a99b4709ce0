"""DyLoRA (Valipour, Rezagholizadeh, Kobyzev and Ghodsi, 2023, "DyLoRA: Parameter-Efficient Tuning of
Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation", EACL 2023).

LoRA's factors ``A`` (r x in) and ``B`` (out x r) are trained so that every prefix of them is a good
adapter on its own. At each training step one rank ``b`` is drawn uniformly from ``{r_min, ..., r_max}``
(one draw per step, shared by all layers) and the forward uses only the first ``b`` rows of A and
first ``b`` columns of B::

    h = W0 x + (alpha / b) B[:, :b] A[:b] x

Only those components get a gradient (the others get zeros). In "frozen" mode (``frozen=True``, the
paper's frozen variant) the first ``b - 1`` components are detached too, so only the ``b``-th row of A
and column of B learn at that step. After training the adapter is used at any rank ``b <= r_max``
(``inference_rank``, default ``r_max``) with the same rule, and merging adds
``(alpha / b) B[:, :b] A[:b]`` into ``W0``, exactly.

Scale: ``alpha / b``, the paper's. The reference code (huawei-noah/KD-NLP, DyLoRA: loralib's
``dynamic`` module, read in public copies that keep its header; the stored KD-NLP snapshot predates
the DyLoRA folder) keeps LoRA's ``alpha / r`` and multiplies each truncated factor by ``sqrt(r / b)``,
which is the same product. With ``rslora=True`` the scale is ``alpha / sqrt(b)``. A consequence of
the rule: no rank-1 components can make every prefix the best rank-b fit at once (with ``1 / b``
the b-th component must also undo the rescaling of the first ``b - 1``), so the full-rank fit is
a little worse than plain LoRA's, the price of usable low ranks (measured in the tests' regression).

Placement, initialisation and defaults follow LoRA's (the paper builds on LoRA's RoBERTa setup):
the attention query and value projections, ``B = 0`` (identity at init), ``A`` Kaiming-uniform as
loralib draws it, ``r = r_max = 8``, ``r_min = 1`` (the paper's GLUE setting, ranks 1 to 8), non-frozen
(the default of the reference layer's ``set_rank(rank, frozen=False)``).

When the drawn rank applies: a forward in training mode with gradients enabled (a training step)
uses the step's ``b``; every other forward (evaluation, ``no_grad``, a model that has not begun
training) uses ``inference_rank``. Change the inference rank of a live model with
:func:`set_rank` (it also rewrites the adapter's config, so saving records it), or pass
``inference_rank`` in the config before loading.

Reproducibility: the draws come from a private ``torch.Generator`` seeded at ``begin_training`` with
``seed`` when the config sets one, else with ``torch.initial_seed()`` — the seed the run gave
``torch.manual_seed`` (peftlab's jobs and HF's ``set_seed`` both do). The global random stream is
not consumed, so dropout and data order are those of the same run with plain LoRA. ``b`` for step
0 is drawn by the ``before_training`` hook, the next one after each optimizer step (``after_step``).

Deviations, and why:
- Scale default ``alpha = 16`` (LoRA's here, scale 2 at b = 8); the learning rates peftlab uses were
  measured at LoRA's scale. The paper's ``alpha / b`` rule itself is kept.
- The draw is one private generator per run and adapter, not a global random state shared with
  everything else (as the reference's scripts draw): same distribution, reproducible from the seed
  alone, and it leaves the run's other random numbers as they would be without DyLoRA.
- Components beyond ``b`` get zero gradients (not ``None``), as slicing gives in the reference
  too: an optimizer with momentum (Adam) still moves them by their running averages and weight
  decay, exactly as in the reference.
- ``inference_rank`` must lie in ``[1, r_max]``: components beyond ``r_max`` are never trained.
- Linear and GPT-2 Conv1D layers only (LoRA also adapts embeddings); no mixed batches.
- Not in HF peft: saved in peftlab's own form (the full r-rank A and B, the config with ``r_min``,
  ``r_max``, ``frozen``, ``inference_rank``), so one checkpoint serves every rank.
"""
from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from ...core.config import peft_names
from ...core.errors import PeftlabError
from ...core.hooks import TrainingHooks, TrainingState
from ...core.inject import wrap
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, resolve_targets
from .lora import LoraConfig, LoraLayer, LoraVariant


@peft_names(lora_alpha="alpha", target_modules="targets", lora_dropout="dropout", use_rslora="rslora")
@dataclasses.dataclass(frozen=True)
class DyLoraConfig(LoraConfig):
    """LoRA's r (the largest rank), alpha, dropout, rslora, plus: r_min / r_max: the range the
    training rank is drawn from each step (r_max None: r); frozen: train only the drawn b-th
    component each step; inference_rank: the rank used outside training steps and by merging (None:
    r_max); seed: seeds the draws (None: the run's ``torch.initial_seed()``)."""

    r_min: int = 1
    r_max: int | None = None
    frozen: bool = False
    inference_rank: int | None = None
    seed: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.use_dora:
            raise PeftlabError("DyLoraConfig.use_dora=True is not supported: DyLoRA truncates the plain update "
                               "B A to its first b components; use use_dora=False")
        self._require(self.r_min >= 1, "r_min", f"an integer in [1, r={self.r}] (the paper's default: 1)")
        top = self.top_rank
        if not 1 <= top <= self.r:
            raise PeftlabError(f"DyLoraConfig.r_max={self.r_max!r} is invalid: expected an integer in [r_min, r] = "
                               f"[{self.r_min}, {self.r}] (None: r). The factors hold only r={self.r} components; "
                               "raise r or lower r_max")
        if self.r_min > top:
            raise PeftlabError(f"DyLoraConfig.r_min={self.r_min} is larger than r_max={top}: expected "
                               f"r_min <= r_max (ranks are drawn from [r_min, r_max]); lower r_min or raise r_max")
        if self.inference_rank is not None and not 1 <= self.inference_rank <= top:
            raise PeftlabError(f"DyLoraConfig.inference_rank={self.inference_rank} is invalid: expected an integer "
                               f"in [1, r_max={top}] (components beyond r_max are never trained; the factors hold "
                               f"r={self.r}), or None for r_max")

    @property
    def top_rank(self) -> int:
        """``r_max``, or ``r`` where it is None."""
        return self.r if self.r_max is None else self.r_max

    @property
    def rank_now(self) -> int:
        """The rank used outside training steps: ``inference_rank``, or ``r_max`` where it is None."""
        return self.top_rank if self.inference_rank is None else self.inference_rank

    def variant(self) -> "LoraVariant | None":
        return DyLora(self)

    def peft_fields(self) -> dict[str, Any]:
        return {}  # peftlab's own form only: HF peft has no DyLoRA


class DyLora(LoraVariant):
    """One adapter's DyLoRA update in one layer: ``(alpha / b) B[:, :b] A[:b]`` with ``b`` the step's
    drawn rank during a training step and ``rank`` otherwise."""

    def __init__(self, config: DyLoraConfig) -> None:
        self.alpha = config.alpha
        self.rslora = config.rslora
        self.frozen = config.frozen
        self.rank = config.rank_now
        self.step_rank: int | None = None  # set by the training hooks

    def scale(self, b: int) -> float:
        return self.alpha / (math.sqrt(b) if self.rslora else b)

    def add(self, layer: LoraLayer, name: str, config: LoraConfig) -> None:
        if layer.is_embedding:  # attach only selects Linear/Conv1D; a direct add gets this
            raise PeftlabError("DyLoRA adapts Linear/Conv1D layers; a target is an Embedding. Narrow the targets")

    def rank_for(self, layer: LoraLayer) -> tuple[int, bool]:
        """(rank, whether it is a training step's draw) for a forward of ``layer`` now."""
        if layer.training and torch.is_grad_enabled() and self.step_rank is not None:
            return self.step_rank, True
        return self.rank, False

    def factors(self, layer: LoraLayer, name: str, b: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(A[:b], B[:, :b]); in frozen mode during a training step, the first b - 1 detached."""
        a, b_full = layer.lora_A[name].weight, layer.lora_B[name].weight
        if train and self.frozen:
            return (torch.cat([a[: b - 1].detach(), a[b - 1: b]]),
                    torch.cat([b_full[:, : b - 1].detach(), b_full[:, b - 1: b]], dim=1))
        return a[:b], b_full[:, :b]

    def forward(self, layer: LoraLayer, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        b, train = self.rank_for(layer)
        a, up = self.factors(layer, name, b, train)
        h = layer.lora_dropout[name](x) if name in layer.lora_dropout else x
        return out + (F.linear(F.linear(h.to(a.dtype), a), up) * self.scale(b)).to(out.dtype)

    def delta_weight(self, layer: LoraLayer, name: str) -> torch.Tensor:
        b = self.rank
        a, up = layer.lora_A[name].weight, layer.lora_B[name].weight
        delta = (up[:, :b] @ a[:b]) * self.scale(b)
        return delta.T if layer.transposed else delta


# -- the per-step draw, run by the core's training hooks --------------------------------------------

# PeftModel -> {adapter: generator of its rank draws}; weak, so a dropped model takes its draws along.
_DRAWS: "weakref.WeakKeyDictionary[Any, dict[str, torch.Generator]]" = weakref.WeakKeyDictionary()


def _layers(model: Any, name: str) -> list[tuple[LoraLayer, DyLora]]:
    return [(m, m.variants[name]) for _, m in model._delta_modules()
            if isinstance(m, LoraLayer) and isinstance(m.variants.get(name), DyLora)]


def _draw(model: Any, name: str) -> int:
    config: DyLoraConfig = model.peft_configs[name]
    generator = _DRAWS.get(model, {}).get(name)
    if generator is None:
        raise PeftlabError(f"DyLoRA adapter {name!r} draws its training rank from a generator made by "
                           "begin_training(), which this model has not run (was it copied after?); call "
                           "model.begin_training(...) first")
    b = int(torch.randint(config.r_min, config.top_rank + 1, (1,), generator=generator))
    for _, variant in _layers(model, name):
        variant.step_rank = b
    return b


def _begin(model: Any, name: str, data: Iterable[Any] | None) -> None:
    """Seed the draws (config.seed, else the run's torch seed) and draw the rank of step 0."""
    config: DyLoraConfig = model.peft_configs[name]
    seed = config.seed if config.seed is not None else torch.initial_seed()
    _DRAWS.setdefault(model, {})[name] = torch.Generator().manual_seed(seed)
    _draw(model, name)


def _next_rank(model: Any, name: str, state: TrainingState) -> None:
    """After the optimizer step: the rank of the next step."""
    _draw(model, name)


def training_rank(model: Any, adapter: str = "default") -> int | None:
    """The rank the current (or next) training step of ``adapter`` uses; None before begin_training."""
    layers = _layers(model, adapter)
    return layers[0][1].step_rank if layers else None


def set_rank(model: Any, adapter: str, rank: int) -> None:
    """Use DyLoRA adapter ``adapter`` of ``model`` (a PeftModel) at ``rank`` (1..r_max) outside training
    steps: evaluation, merging, saving (the adapter's config is rewritten with ``inference_rank=rank``).
    Refused, with nothing changed, for a rank out of range, an adapter that is not DyLoRA, or while the
    adapter is merged (its weights hold the update at the old rank: unmerge first)."""
    config = model.peft_configs.get(adapter)
    if not isinstance(config, DyLoraConfig):
        found = type(config).__name__ if config is not None else "no such adapter"
        raise PeftlabError(f"set_rank: adapter {adapter!r} is not a DyLoRA adapter ({found}); adapters: "
                           f"{sorted(model.peft_configs)}")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise PeftlabError(f"set_rank: rank={rank!r} is invalid: expected an integer in [1, r_max={config.top_rank}]")
    new = config.replace(inference_rank=rank)  # validates the range, naming the value
    layers = _layers(model, adapter)
    merged = [layer for layer, _ in layers if adapter in layer.merged_adapters]
    if merged:
        raise PeftlabError(f"set_rank: adapter {adapter!r} is merged into the base weights at rank "
                           f"{config.rank_now}; unmerge_adapter() before changing its rank to {rank}")
    model.peft_configs[adapter] = new
    for _, variant in layers:
        variant.rank = rank


def attach(model: Any, name: str, config: DyLoraConfig, host: Any = None) -> None:
    for path in resolve_targets(model, config.targets, allowed_types=LINEAR_TYPES):
        wrap(model, path, LoraLayer).add(name, config)


SPEC = register(MethodSpec(
    name="dylora", title="DyLoRA", family="reparameterized", subcategory="rank adjustment", config_cls=DyLoraConfig,
    trains="low-rank update B A trained at a rank b drawn each step, usable at any rank <= r_max",
    attach=attach,
    paper="Valipour et al. 2023, DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic "
          "Search-Free Low-Rank Adaptation",
    mergeable=True, merge_tolerance=1e-4, default_lr=5e-4,
    hooks=TrainingHooks(before_training=_begin, after_step=_next_rank),
))
