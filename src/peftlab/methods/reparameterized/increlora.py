"""IncreLoRA: incremental rank allocation (Zhang, Wang, Zhao, Wang, Zhang, 2023, "IncreLoRA: Incremental
Parameter Allocation Method for Parameter-Efficient Fine-tuning").

Each adapted weight ``W0`` (out x in) gets an update in AdaLoRA's SVD form, but its rank GROWS::

    h = W0 x + (alpha / r_k) * P Λ Q x      P: out x r_k, Λ: r_k (diagonal), Q: r_k x in

Every module starts at ``init_r`` active components (Λ = 0, P and Q ~ N(0, 0.02²): identity at init).
Importance: AdaLoRA's entry scores ``s = Ī · Ū`` (sensitivity ``|w · ∂L/∂w|``, its EMA Ī with ``beta1``
and uncertainty EMA Ū with ``beta2``), triplet score ``S_i = s(Λ_i) + mean s(Q_i·) + mean s(P_·i)``,
and the module's score is the mean of ``S_i`` over its active components. After ``tinit`` warm-up
steps, every ``deltaT`` steps the ``top_h`` best-scoring modules gain ``incre_rank_num`` components
each, until the model-wide active rank reaches the budget ``target_r * n`` (n adapted modules);
then growth and scoring stop.

Advance learning (the paper's, on by default): every module also holds ``incre_rank_num`` reserved
components whose Λ is fixed at 1e-5 (not trained) while their P and Q train through it; when the
module grows, its reserved components become active (Λ trainable from 1e-5, P and Q as learnt) and
fresh reserved components (N(0, 0.02²) P, Q) are set up. When the budget is reached the reserved
components are dropped. Without advance learning a growth adds fresh components with Λ = 0.

Implementation: every module preallocates ``max_r`` components; a frozen buffer ``increlora_state``
(one entry per component: 0 unused, 1 reserved, 2 active) says which count. Parameter shapes never
change, so the optimizer needs no rebuild. Unused components are held at exactly zero (after every
optimizer step, so weight decay cannot move them) and their Λ is masked out of the forward pass, so
they contribute nothing and get no gradient; reserved Λ is replaced by the constant 1e-5 in the
forward pass, so it gets no gradient either. The trainable count reports active components (P, Q,
Λ) plus the P, Q of reserved ones, not the preallocated rows. The state buffer is saved with the
adapter (peftlab's own checkpoint form: HF peft has no IncreLoRA), so a loaded adapter has the
final ranks. Orthogonality regulariser: AdaLoRA's (``orth_reg_weight`` times the mean Frobenius
norm of ``QQᵀ − I`` and ``PᵀP − I``), over the active and reserved components.

Deviations from the paper / reference code (FeiyuZhang98/IncreLoRA), and why:
- The reference scores a module by ``sum |ΔW ⊙ ∂L/∂ΔW| / sqrt(numel)`` on the whole update matrix;
  the paper describes the score as the average of AdaLoRA's triplet scores, which is what is used.
- The reference picks every module scoring at or above the top_h-th score (ties can add more) and
  may overshoot the budget by up to ``incre_rank_num - 1``; here exactly the top_h best eligible
  modules grow and the last growth is cut so that the budget is never exceeded.
- The reference's regulariser normalises each component on its own (its P, Q are lists of rank-1
  tensors); the paper states AdaLoRA's orthogonality regulariser, used here on the whole P and Q.
- Preallocation caps a module at ``max_r`` components (the reference grows without a cap): a full
  module is no longer a candidate, and near the cap it reserves fewer (or no) components ahead. The
  budget must fit: ``init_r <= target_r <= max_r``, checked by the config.
- Scale ``alpha / r_k`` with ``r_k`` the module's current active rank, as the reference (its
  ``ranknum``); the reference adds 1e-5 to the divisor, which cannot be 0 here.
- Importance is computed before the optimizer step (from the weights the gradient belongs to, as
  AdaLoRA here); growth runs after the step. Linear and GPT-2 Conv1D layers only.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import PeftConfig, peft_names
from ...core.hooks import TrainingHooks, TrainingState
from ...core.inject import wrap
from ...core.layer import BufferDict, DeltaModule, base_of
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, resolve_targets
from .adalora import AdaLoraLayer

_BASE = "base_model."
UNUSED, RESERVED, ACTIVE = 0, 1, 2
RESERVED_LAMBDA = 1e-5  # the reference's Λ of a reserved component under advance learning


@peft_names(lora_alpha="alpha", target_modules="targets", lora_dropout="dropout")
@dataclasses.dataclass(frozen=True)
class IncreLoraConfig(PeftConfig):
    """init_r: starting rank of every module; target_r: average rank at the end (budget target_r * n);
    max_r: components preallocated per module; incre_rank_num: components added per growth; top_h:
    modules grown per growth step; tinit: warm-up steps; deltaT: steps between growths; advance_learn:
    train reserved components ahead of their activation; beta1, beta2: EMA factors; orth_reg_weight:
    weight of the orthogonality regulariser; alpha: scale numerator (scale alpha / current rank).

    Defaults follow the authors' GLUE scripts for an average rank of 2 (lora_r 1, target_rank 2,
    incre_rank_num 1 from their table {2: 1, 4: 2, 6: 3, 8: 4}, init_warmup = incre_interval = 100 as
    for RTE, top_h 3 as for QQP, beta 0.85, reg_orth_coef 0.1, advance learning on); max_r = 8 is
    peftlab's preallocation cap (the reference has none). alpha 16 as their QQP script."""

    targets: tuple[str, ...] | str | None = ("@query", "@value")
    init_r: int = 1
    target_r: int = 2
    max_r: int = 8
    incre_rank_num: int = 1
    top_h: int = 3
    tinit: int = 100
    deltaT: int = 100
    advance_learn: bool = True
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    alpha: float = 16
    dropout: float = 0.0

    def validate(self) -> None:
        self._require(isinstance(self.init_r, int) and self.init_r > 0, "init_r", "a positive integer such as 1")
        self._require(isinstance(self.incre_rank_num, int) and self.incre_rank_num > 0, "incre_rank_num",
                      "a positive integer number of components added per growth, such as 1")
        reserve = self.incre_rank_num if self.advance_learn else 0
        self._require(isinstance(self.max_r, int) and self.max_r >= self.init_r + reserve, "max_r",
                      f"an integer >= init_r + reserved components = {self.init_r + reserve}")
        self._require(isinstance(self.target_r, int) and self.init_r <= self.target_r <= self.max_r,
                      "target_r", f"an average final rank in [init_r={self.init_r}, max_r={self.max_r}] (the "
                                  "budget target_r * n cannot exceed the preallocated max_r * n); raise max_r")
        self._require(isinstance(self.top_h, int) and self.top_h >= 1, "top_h", "a number of modules >= 1")
        self._require(self.tinit >= 0, "tinit", "a number of warm-up steps >= 0")
        self._require(self.deltaT >= 1, "deltaT", "a step interval >= 1")
        self._require(0 < self.beta1 < 1, "beta1", "an EMA factor in (0, 1) such as 0.85")
        self._require(0 < self.beta2 < 1, "beta2", "an EMA factor in (0, 1) such as 0.85")
        self._require(self.orth_reg_weight >= 0, "orth_reg_weight", "a weight >= 0 such as 0.1 (0 turns it off)")
        self._require(self.alpha > 0, "alpha", "a positive number such as 16")
        self._require(0.0 <= self.dropout < 1.0, "dropout", "a probability in [0, 1)")

    def peft_fields(self) -> dict[str, Any]:
        return {}  # HF peft has no IncreLoRA: peftlab's own checkpoint form


@dataclasses.dataclass
class _Adapter:
    alpha: float
    dropout: float
    advance_learn: bool
    kept: None = None  # AdaLoraLayer's checkpoint code reads it: no AdaLoRA-style pruning here
    importance: dict[str, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)


class IncreLoraLayer(AdaLoraLayer):
    """AdaLoRA's SVD-form layer with ``max_r`` preallocated components per adapter, of which the
    ``increlora_state`` buffer marks the active and reserved ones."""

    frozen_attrs = ("increlora_state",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.increlora_state = BufferDict()

    def add(self, name: str, config: IncreLoraConfig, rank: int | None = None) -> None:
        weight = base_of(self.base_layer).weight
        kw = {"device": weight.device, "dtype": weight.dtype}
        r = config.max_r
        self.lora_A[name] = nn.Parameter(torch.zeros(r, self.in_features, **kw))
        self.lora_E[name] = nn.Parameter(torch.zeros(r, 1, **kw))
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        state = torch.zeros(r, dtype=torch.int8, device=weight.device)
        self.increlora_state[name] = state
        self.settings[name] = _Adapter(alpha=config.alpha, dropout=config.dropout, advance_learn=config.advance_learn)
        self._set(name, torch.arange(config.init_r), ACTIVE)
        if config.advance_learn:
            self._set(name, torch.arange(config.init_r, config.init_r + config.incre_rank_num), RESERVED)

    def _set(self, name: str, rows: torch.Tensor, new_state: int) -> None:
        """Turn unused ``rows`` into fresh components (Gaussian P, Q; Λ = 0) in ``new_state``."""
        with torch.no_grad():
            for attr, dim in (("lora_A", 0), ("lora_B", 1)):
                param = getattr(self, attr)[name]
                fresh = torch.randn(param.shape[0] if dim == 1 else len(rows),
                                    len(rows) if dim == 1 else param.shape[1]) * 0.02
                param.index_copy_(dim, rows.to(param.device), fresh.to(param.dtype).to(param.device))
            self.lora_E[name][rows.to(self.lora_E[name].device)] = 0.0
            self.increlora_state[name][rows.to(self.increlora_state[name].device)] = new_state

    def ranks(self, name: str) -> tuple[int, int]:
        """(active, reserved) components."""
        state = self.increlora_state[name]
        return int((state == ACTIVE).sum()), int((state == RESERVED).sum())

    def _effective(self, name: str) -> tuple[torch.Tensor, float]:
        """(Λ as used: active Λ, reserved at 1e-5, unused 0 — shape (max_r, 1); scale alpha / active)."""
        state = self.increlora_state[name].view(-1, 1)
        e = self.lora_E[name]
        reserved = torch.where(state == RESERVED, torch.full_like(e, RESERVED_LAMBDA), torch.zeros_like(e))
        effective = torch.where(state == ACTIVE, e, reserved.detach())
        return effective, self.settings[name].alpha / max(self.ranks(name)[0], 1)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        for name in self.live_adapters():
            a, b = self.lora_A[name], self.lora_B[name]
            e, scale = self._effective(name)
            setting: _Adapter = self.settings[name]
            h = x if x.dtype == a.dtype else x.to(a.dtype)
            if self.training and setting.dropout > 0:
                h = F.dropout(h, setting.dropout, training=True)
            out = out + (F.linear(F.linear(h, a * e), b) * scale).to(out.dtype)
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        e, scale = self._effective(name)
        delta = self.lora_B[name] @ (self.lora_A[name] * e) * scale
        return delta.T if self.transposed else delta

    def trainable_entries(self, name: str) -> int:
        active, reserved = self.ranks(name)
        trained_reserve = reserved if self.settings[name].advance_learn else 0
        return active * (self.in_features + self.out_features + 1) + trained_reserve * (
            self.in_features + self.out_features)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return DeltaModule.adapter_state(self, name)

    def load_adapter_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        DeltaModule.load_adapter_state(self, name, tensors)

    def module_score(self, name: str) -> float:
        """Mean AdaLoRA triplet score over the active components."""
        active = (self.increlora_state[name] == ACTIVE).to(self.lora_E[name].device)
        return float(self.triplet_scores(name)[active].mean())

    def hold_unused_at_zero(self, name: str) -> None:
        unused = (self.increlora_state[name] == UNUSED).to(self.lora_E[name].device)
        with torch.no_grad():
            self.lora_A[name][unused] = 0.0
            self.lora_E[name][unused] = 0.0
            self.lora_B[name][:, unused] = 0.0

    def grow(self, name: str, count: int, advance_learn: bool) -> None:
        """Activate ``count`` components: the reserved ones first (their Λ starts at 1e-5, as the
        reference keeps it), then fresh ones; with advance learning, reserve ``count`` new ones."""
        state = self.increlora_state[name]
        reserved = (state == RESERVED).nonzero().view(-1)[:count]
        with torch.no_grad():
            self.lora_E[name][reserved.to(self.lora_E[name].device)] = RESERVED_LAMBDA
            state[reserved] = ACTIVE
            missing = count - len(reserved)
            if missing:
                self._set(name, (state == UNUSED).nonzero().view(-1)[:missing], ACTIVE)
            if advance_learn:
                self._set(name, (state == UNUSED).nonzero().view(-1)[:count], RESERVED)

    def drop_reserved(self, name: str) -> None:
        state = self.increlora_state[name]
        with torch.no_grad():
            state[state == RESERVED] = UNUSED
        self.hold_unused_at_zero(name)

    def room(self, name: str, step_size: int) -> int:
        """How many components this module can still activate in one growth (0: full)."""
        active, reserved = self.ranks(name)
        return min(step_size, self.lora_E[name].shape[0] - active)

def _layers(model: Any, name: str) -> list[IncreLoraLayer]:
    return [m for path, m in model._delta_modules()
            if isinstance(m, IncreLoraLayer) and name in m.increlora_state and path.startswith(_BASE)]


def _budget(model: Any, name: str) -> tuple[int, int]:
    """(active total rank, budget target_r * n)."""
    layers = _layers(model, name)
    return sum(layer.ranks(name)[0] for layer in layers), model.peft_configs[name].target_r * len(layers)


def _begin(model: Any, name: str, data: Iterable[Any] | None) -> None:
    for layer in _layers(model, name):
        layer.settings[name].importance.clear()


def _orthogonality(model: Any, name: str) -> torch.Tensor | None:
    weight = model.peft_configs[name].orth_reg_weight
    if weight == 0:
        return None
    terms = []
    for layer in _layers(model, name):
        live = (layer.increlora_state[name] != UNUSED).to(layer.lora_A[name].device)
        q, p = layer.lora_A[name][live], layer.lora_B[name][:, live]
        eye = torch.eye(q.shape[0], device=q.device, dtype=q.dtype)
        terms.append(torch.linalg.matrix_norm(q @ q.T - eye))
        terms.append(torch.linalg.matrix_norm(p.T @ p - eye))
    return weight * torch.stack(terms).mean() if terms else None


def _update_importance(model: Any, name: str, state: TrainingState) -> None:
    active, budget = _budget(model, name)
    if active >= budget:
        return  # growth is over: no more scores needed
    config: IncreLoraConfig = model.peft_configs[name]
    for layer in _layers(model, name):
        layer.update_importance(name, config.beta1, config.beta2)


def growth_due(step: int, config: IncreLoraConfig) -> bool:
    """Whether the modules grow after optimizer step ``step`` (counted from 0)."""
    return step > config.tinit and step % config.deltaT == 0


def _grow(model: Any, name: str, state: TrainingState) -> None:
    config: IncreLoraConfig = model.peft_configs[name]
    layers = _layers(model, name)
    for layer in layers:
        layer.hold_unused_at_zero(name)
    active, budget = _budget(model, name)
    if active >= budget or not growth_due(state.step, config):
        return
    remaining = budget - active
    scored = sorted(((layer.module_score(name), i) for i, layer in enumerate(layers)
                     if layer.room(name, config.incre_rank_num) > 0), key=lambda t: -t[0])
    for _, i in scored[:config.top_h]:
        if remaining <= 0:
            break
        count = min(layers[i].room(name, config.incre_rank_num), remaining)
        layers[i].grow(name, count, config.advance_learn)
        remaining -= count
    if remaining <= 0:  # budget reached: the reference drops the reserved components and stops scoring
        for layer in layers:
            layer.drop_reserved(name)
            layer.settings[name].importance.clear()


def attach(model: nn.Module, name: str, config: IncreLoraConfig, host: Any = None) -> None:
    paths = resolve_targets(model, config.targets, allowed_types=LINEAR_TYPES)
    for path in paths:
        wrap(model, path, IncreLoraLayer).add(name, config)


# default_lr: not measured for IncreLoRA; AdaLoRA's measured rate here (same SVD-form
# parametrisation, Λ starting at 0). The authors use 4e-4 to 1.2e-3 on DeBERTa-v3-base.
SPEC = register(MethodSpec(
    name="increlora", title="IncreLoRA", family="reparameterized", subcategory="rank adjustment", config_cls=IncreLoraConfig,
    trains="SVD-form low-rank update P Λ Q whose rank grows by importance during training",
    attach=attach, paper="Zhang et al. 2023, IncreLoRA: Incremental Parameter Allocation Method for "
                         "Parameter-Efficient Fine-tuning",
    mergeable=True, merge_tolerance=1e-4, default_lr=4e-3,
    hooks=TrainingHooks(before_training=_begin, loss=_orthogonality, before_step=_update_importance,
                        after_step=_grow),
))
