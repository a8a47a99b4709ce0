"""AdaLoRA: adaptive budget allocation (Zhang, Chen, Bukharin, Karampatziakis, He, Cheng, Chen, Zhao, 2023,
"Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR).

Each adapted weight ``W0`` (out x in) gets an update in SVD form::

    h = W0 x + (alpha / init_r) * P Λ Q x      P: out x r, Λ: r (a vector, the diagonal), Q: r x in
                                               Λ = 0, P and Q ~ N(0, 0.02²) -> identity at init

Checkpoints use HF peft's names: ``lora_B`` is P, ``lora_E`` is Λ (stored r x 1), ``lora_A`` is Q.
``r`` starts at ``init_r`` for every matrix; during training the method prunes singular values so
that the model-wide number of non-zero Λ entries (the rank budget) follows a cubic schedule from
``init_r * n`` down to ``target_r * n`` (``n`` adapted matrices). Three parts make it AdaLoRA:

- An orthogonality regulariser keeps P and Q close to orthogonal, so Λ can be pruned like singular
  values; ``orth_reg_weight * R`` is added to the training loss (the ``loss`` hook), with
  ``R(P, Q) = ||PᵀP − I||²_F + ||QQᵀ − I||²_F`` in the paper (see the deviations for the form used).
- Importance of every entry w of P, Λ, Q: sensitivity ``I = |w · ∂L/∂w|``, smoothed by an EMA
  ``Ī ← β1 Ī + (1 − β1) I`` and given an uncertainty ``Ū ← β2 Ū + (1 − β2) |I − Ī|``; the entry's
  score is ``s = Ī · Ū``. Triplet i of a matrix scores ``S_i = s(Λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)``.
  Updated after backward, before the optimizer step (the ``before_step`` hook): it needs the
  gradients, and the paper takes the sensitivity of the weights the gradient was computed at.
- Budget: ``b(t) = init_r·n`` for ``t <= tinit``; ``b(t) = target_r·n + (init_r·n − target_r·n)
  (1 − (t − tinit) / (T − tfinal − tinit))³`` (rounded down) until ``T − tfinal``; ``target_r·n`` after.
  Every ``deltaT`` steps of that middle phase, after the optimizer step (the ``after_step`` hook),
  the Λ entries of the triplets scoring at or below the ``(init_r·n − b(t))``-th lowest score are set
  to 0. At step ``T − tfinal`` the target budget is allocated once more and frozen: the chosen
  triplets are written to the config as ``rank_pattern`` (peft's form: ``"<module>.lora_E"`` -> one bool
  per initial triplet), pruned Λ entries are held at 0 for the remaining steps, and checkpoints keep
  only the chosen triplets (``lora_A``: kept x in, ...), as peft saves them. Loading such a checkpoint
  (peftlab's or peft's) builds each matrix at its allocated rank; its ranks are then fixed.

``T`` is ``total_step``, or, when that is None, the ``total_steps`` given to ``begin_training``
(written into the adapter's config then, so the saved config names it: peft requires it).
Steps are counted from 0, as ``TrainingState.step`` and peft's ``global_step`` in its examples.

Deviations from the paper or HF peft, and why:
- The regulariser is the one of the authors' released code and of peft: the mean, over all adapted
  matrices P and Q of the adapter, of the Frobenius norm (not squared) of ``PᵀP − I`` / ``QQᵀ − I``.
  The paper writes the squared sum; its published numbers and ``orth_reg_weight``'s defaults come from
  the code, and peft parity of training needs the same term.
- Sensitivity is computed before the optimizer step, from the weights the gradient belongs to (the
  paper's Algorithm 1); peft's documented loop calls ``update_and_allocate`` after ``optimizer.step()``
  and so multiplies the old gradient with the updated weights. Masking runs after the step in both
  (otherwise the step itself would revive the pruned Λ entries at once).
- Scale ``alpha / init_r``; peft divides by ``init_r + 1e-5`` (a guard against ``r = 0`` that cannot
  occur here): outputs agree to ~1e-6 relative.
- With ``tfinal = 0`` the final allocation (step ``T``) is never reached in ``T`` steps: the last
  step's budget is the cubic curve at ``T − 1``, just above the target, and no ``rank_pattern`` is
  written (pruned Λ entries are still zero in the checkpoint). This is peft's and the paper's
  schedule; use ``tfinal >= 1`` to end at exactly the target.
- Several AdaLoRA adapters may train at once (each keeps its own scores and budget); peft allows one.
- An adapter whose config has a ``rank_pattern`` (loaded after allocation) keeps its ranks: further
  training fine-tunes those triplets without reallocating (peft would compute patterns over the
  already-pruned sizes, which its own loader cannot read back).
- Linear and GPT-2 Conv1D layers only (peft also adapts Conv2d); no mixed batches.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import PeftConfig, peft_names, refuse_peft_features
from ...core.errors import PeftlabError
from ...core.hooks import TrainingHooks, TrainingState
from ...core.inject import wrap
from ...core.layer import DeltaModule, base_of, linear_io
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, logical_name, resolve_targets

_BASE = "base_model."  # where a PeftModel keeps the wrapped model
_FACTORS = ("lora_A", "lora_E", "lora_B")


@peft_names(lora_alpha="alpha", target_modules="targets", lora_dropout="dropout")
@dataclasses.dataclass(frozen=True)
class AdaLoraConfig(PeftConfig):
    """init_r: starting rank of every adapted matrix; target_r: average rank at the end of the budget
    schedule; tinit: warm-up steps before pruning starts; tfinal: final steps at the target budget;
    deltaT: steps between two allocations; beta1, beta2: EMA factors of sensitivity and uncertainty;
    orth_reg_weight: weight of the orthogonality regulariser; alpha: scale numerator (scale
    alpha/init_r); dropout: on the input of the update; total_step: length of the schedule (None:
    the ``total_steps`` given to ``begin_training``); rank_pattern: the allocated triplets, written at
    the final allocation (``"<module path>.lora_E"`` -> one bool per initial triplet)."""

    targets: tuple[str, ...] | str | None = ("@query", "@value")
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    alpha: float = 8
    dropout: float = 0.0
    total_step: int | None = None
    rank_pattern: dict[str, tuple[bool, ...]] | None = None

    def __post_init__(self) -> None:
        # JSON gives lists; keep tuples so the config stays comparable and read-only.
        if isinstance(self.rank_pattern, dict):
            object.__setattr__(self, "rank_pattern", {k: tuple(v) if isinstance(v, (list, tuple)) else v
                                                      for k, v in self.rank_pattern.items()})
        super().__post_init__()

    def validate(self) -> None:
        self._require(self.init_r > 0, "init_r", "a positive integer starting rank such as 12")
        self._require(0 < self.target_r <= self.init_r, "target_r",
                      f"a positive integer average final rank, at most init_r={self.init_r}")
        self._require(self.tinit >= 0, "tinit", "a number of warm-up steps >= 0")
        self._require(self.tfinal >= 0, "tfinal", "a number of final steps >= 0")
        self._require(self.deltaT >= 1, "deltaT", "a step interval >= 1")
        self._require(0 < self.beta1 < 1, "beta1", "an EMA factor in (0, 1) such as 0.85")
        self._require(0 < self.beta2 < 1, "beta2", "an EMA factor in (0, 1) such as 0.85")
        self._require(self.orth_reg_weight >= 0, "orth_reg_weight", "a weight >= 0 such as 0.5 (0 turns it off)")
        self._require(self.alpha > 0, "alpha", "a positive number such as 8")
        self._require(0.0 <= self.dropout < 1.0, "dropout", "a probability in [0, 1)")
        self._require(self.total_step is None or self.total_step > 0, "total_step",
                      "a positive number of training steps, or None to take begin_training's total_steps")
        if self.total_step is not None:
            self.check_schedule(self.total_step)
        if self.rank_pattern is not None:
            self._require(isinstance(self.rank_pattern, dict) and all(
                isinstance(k, str) and isinstance(v, tuple) and len(v) == self.init_r
                and all(isinstance(b, bool) for b in v) for k, v in self.rank_pattern.items()),
                "rank_pattern", f"None, or a dict '<module path>.lora_E' -> {self.init_r} (init_r) booleans, "
                                "as written at the final allocation")

    def check_schedule(self, total: int) -> None:
        """The budget phase must have at least one step: ``tinit < total - tfinal``."""
        if self.tinit >= total - self.tfinal:
            raise PeftlabError(f"AdaLoraConfig: tinit={self.tinit}, tfinal={self.tfinal} and {total} total steps "
                               "leave no step to prune ranks in: expected tinit < total_step - tfinal; lower "
                               "tinit/tfinal or train longer")

    @property
    def scaling(self) -> float:
        return self.alpha / self.init_r

    def peft_fields(self) -> dict[str, Any]:
        return {"peft_type": "ADALORA", "init_r": self.init_r, "target_r": self.target_r, "tinit": self.tinit,
                "tfinal": self.tfinal, "deltaT": self.deltaT, "beta1": self.beta1, "beta2": self.beta2,
                "orth_reg_weight": self.orth_reg_weight, "total_step": self.total_step,
                "rank_pattern": None if self.rank_pattern is None
                else {k: list(v) for k, v in self.rank_pattern.items()},
                "lora_alpha": self.alpha, "lora_dropout": self.dropout, "target_modules": self.targets,
                # peft's AdaLoRA ignores r (it warns unless r is its default, 8): write what peft writes.
                "r": 8, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_dora": False,
                "inference_mode": True, "modules_to_save": list(self.modules_to_save) or None}

    def peft_fields_for(self, model: Any, adapter_name: str) -> dict[str, Any]:
        # peft merges a GPT-2 Conv1D update transposed only when told so.
        modules = [base_of(model.get_submodule(p)) for p in resolve_targets(model, self.targets)]
        return {"fan_in_fan_out": any(not isinstance(m, nn.Linear) for m in modules)}

    @classmethod
    def from_peft(cls, data: dict[str, Any]) -> "AdaLoraConfig":
        refuse_peft_features(data, _PEFT_FEATURES_NOT_READ, "AdaLoRA")
        pattern = data.get("rank_pattern")
        if pattern:
            # peft keeps the adapter name in the keys in memory ('...query.lora_E.default') and drops
            # it when saving; either way the module path comes first.
            pattern = {key.split(".lora_E")[0] + ".lora_E": list(value) for key, value in pattern.items()}
        return cls(init_r=data.get("init_r", 12), target_r=data.get("target_r", 8), tinit=data.get("tinit", 0),
                   tfinal=data.get("tfinal", 0), deltaT=data.get("deltaT", 1), beta1=data.get("beta1", 0.85),
                   beta2=data.get("beta2", 0.85), orth_reg_weight=data.get("orth_reg_weight", 0.5),
                   alpha=data.get("lora_alpha", 8), dropout=data.get("lora_dropout", 0.0),
                   total_step=data.get("total_step"), rank_pattern=pattern or None, targets=data["target_modules"],
                   modules_to_save=tuple(data.get("modules_to_save") or ()))


# peft fields (with their "off" value) that would change what the adapter computes or where it sits,
# and that peftlab's AdaLoRA does not implement: a checkpoint that turns one on is refused by name.
_PEFT_FEATURES_NOT_READ = {
    "bias": "none", "use_dora": False, "layers_to_transform": None, "exclude_modules": None, "lora_bias": False,
    "layer_replication": None, "trainable_token_indices": None, "target_parameters": None,
}


@dataclasses.dataclass
class _Adapter:
    """One adapter's settings in one layer, and its training-time state (never saved)."""

    scale: float
    dropout: float
    # Once the final allocation chose them: the triplets kept (bool, r). Checkpoints keep only these
    # rows, and the pruned Λ entries are held at zero. None: every stored triplet counts.
    kept: torch.Tensor | None = None
    # factor name -> (EMA of sensitivity Ī, EMA of uncertainty Ū), shaped like the factor.
    importance: dict[str, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)


class AdaLoraLayer(DeltaModule):
    """Wraps a Linear or Conv1D with named SVD-form updates ``scale * P diag(Λ) Q``.

    Per adapter: ``lora_A`` (Q, r x in), ``lora_E`` (Λ, r x 1), ``lora_B`` (P, out x r)."""

    adapter_attrs = _FACTORS

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.in_features, self.out_features, self.transposed = linear_io(base_layer)

    def add(self, name: str, config: AdaLoraConfig, rank: int) -> None:
        weight = base_of(self.base_layer).weight
        kw = {"device": weight.device, "dtype": weight.dtype}
        # The paper's initialisation (peft's too): Gaussian singular vectors, zero singular values.
        self.lora_A[name] = nn.Parameter(torch.randn(rank, self.in_features, **kw) * 0.02)
        self.lora_E[name] = nn.Parameter(torch.zeros(rank, 1, **kw))
        self.lora_B[name] = nn.Parameter(torch.randn(self.out_features, rank, **kw) * 0.02)
        self.settings[name] = _Adapter(scale=config.scaling, dropout=config.dropout)

    def rank(self, name: str) -> int:
        return self.lora_E[name].shape[0]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        for name in self.live_adapters():
            a, e, b = self.lora_A[name], self.lora_E[name], self.lora_B[name]
            setting: _Adapter = self.settings[name]
            h = x if x.dtype == a.dtype else x.to(a.dtype)
            if self.training and setting.dropout > 0:
                h = F.dropout(h, setting.dropout, training=True)
            out = out + (F.linear(F.linear(h, a * e), b) * setting.scale).to(out.dtype)
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale * P diag(Λ) Q`` laid out like the base weight."""
        delta = self.lora_B[name] @ (self.lora_A[name] * self.lora_E[name]) * self.settings[name].scale
        return delta.T if self.transposed else delta


    # -- checkpoint form: only the kept triplets once the final allocation chose them ---------
    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        state = super().adapter_state(name)
        kept = self.settings[name].kept if name in self.settings else None
        if kept is None:
            return state
        rows = kept.nonzero().view(-1).to(self.lora_E[name].device)
        return {"lora_A": state["lora_A"][rows], "lora_E": state["lora_E"][rows], "lora_B": state["lora_B"][:, rows]}

    def load_adapter_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        kept = self.settings[name].kept
        if kept is None:
            return super().load_adapter_state(name, tensors)
        rows = kept.nonzero().view(-1).to(self.lora_E[name].device)
        with torch.no_grad():
            for attr, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
                param = getattr(self, attr)[name]
                param.zero_()  # pruned triplets stay empty
                param.index_copy_(dim, rows, tensors[attr].to(param.dtype).to(param.device))

    # -- importance (training only) ------------------------------------------------------------
    def update_importance(self, name: str, beta1: float, beta2: float) -> None:
        """Fold this step's sensitivity ``|w · grad|`` into the EMAs of every factor entry."""
        importance = self.settings[name].importance
        with torch.no_grad():
            for attr in _FACTORS:
                param = getattr(self, attr)[name]
                if param.grad is None:
                    continue
                sensitivity = (param * param.grad).abs()
                ema, unc = importance.get(attr, (torch.zeros_like(param), torch.zeros_like(param)))
                ema = beta1 * ema + (1 - beta1) * sensitivity
                # peft and the authors' code take the deviation from the EMA just updated.
                unc = beta2 * unc + (1 - beta2) * (sensitivity - ema).abs()
                importance[attr] = (ema, unc)

    def triplet_scores(self, name: str) -> torch.Tensor:
        """``S_i = s(Λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)`` with ``s = Ī Ū``; shape (r,)."""
        importance = self.settings[name].importance
        r = self.rank(name)
        zeros = torch.zeros(r, device=self.lora_E[name].device)

        def score(attr: str, dim: int) -> torch.Tensor:
            if attr not in importance:
                return zeros
            ema, unc = importance[attr]
            return (ema * unc).float().mean(dim=dim).view(r) if ema.numel() else zeros

        return score("lora_E", 1) + score("lora_A", 1) + score("lora_B", 0)

    def prune(self, name: str, keep: torch.Tensor) -> None:
        """Set Λ of the triplets not in ``keep`` (bool, r) to zero."""
        with torch.no_grad():
            self.lora_E[name].masked_fill_(~keep.to(self.lora_E[name].device).view(-1, 1), 0.0)


# -- the mechanism, run by the core's training hooks -------------------------------------------
def _layers(model: Any, name: str) -> list[tuple[str, AdaLoraLayer]]:
    """(module path in the wrapped model, layer) of every layer holding adapter ``name``."""
    return [(logical_name(path[len(_BASE):]), m) for path, m in model._delta_modules()
            if isinstance(m, AdaLoraLayer) and name in m.lora_E and path.startswith(_BASE)]


def budget_schedule(step: int, config: AdaLoraConfig, total: int, n_matrices: int) -> tuple[int, bool]:
    """(rank budget at ``step``, whether to allocate at this step) for the budget phase and before;
    the final phase (``step >= total - tfinal``) is handled by the caller."""
    start, target = config.init_r * n_matrices, config.target_r * n_matrices
    if step <= config.tinit:
        return start, False
    if step >= total - config.tfinal:
        return target, True
    remaining = 1 - (step - config.tinit) / (total - config.tfinal - config.tinit)
    return int((start - target) * remaining ** 3 + target), step % config.deltaT == 0


def _allocate(layers: list[tuple[str, AdaLoraLayer]], name: str, budget: int) -> dict[str, torch.Tensor]:
    """Keep the ``budget`` best-scoring triplets across all layers (ties at the threshold are pruned
    together, as peft does); prune the rest. Returns path -> kept (bool, r)."""
    scores = [layer.triplet_scores(name) for _, layer in layers]
    flat = torch.cat([s.to(scores[0].device) for s in scores])
    pruned = flat.numel() - budget
    if pruned <= 0:
        return {path: torch.ones_like(s, dtype=torch.bool) for (path, _), s in zip(layers, scores)}
    threshold = torch.kthvalue(flat, pruned).values.to(scores[0].device)
    kept = {}
    for (path, layer), s in zip(layers, scores):
        kept[path] = s > threshold.to(s.device)
        layer.prune(name, kept[path])
    return kept


def _total_steps(model: Any, name: str, state: TrainingState) -> int:
    config: AdaLoraConfig = model.peft_configs[name]
    total = config.total_step or state.total_steps
    if not total:
        raise PeftlabError("AdaLoRA's rank budget schedule needs the number of training steps: set "
                           "AdaLoraConfig(total_step=...) or call model.begin_training(loader, total_steps=...)")
    return total


def _begin(model: Any, name: str, data: Iterable[Any] | None) -> None:
    """Check the schedule fits the run, record its length in the config, start the scores afresh."""
    config: AdaLoraConfig = model.peft_configs[name]
    if config.rank_pattern is not None:
        return  # ranks already allocated (loaded, or an earlier run): nothing to schedule
    total = _total_steps(model, name, model.training_state)
    config.check_schedule(total)
    if config.total_step is None:  # the saved config must name it (peft refuses a config without it)
        model.peft_configs[name] = config.replace(total_step=total)
    for _, layer in _layers(model, name):
        layer.settings[name].importance.clear()


def _orthogonality(model: Any, name: str) -> torch.Tensor | None:
    """``orth_reg_weight`` times the mean, over the adapter's P and Q, of ``||PᵀP − I||_F`` and
    ``||QQᵀ − I||_F`` (a scalar; None when the weight is 0)."""
    weight = model.peft_configs[name].orth_reg_weight
    if weight == 0:
        return None
    terms = []
    for _, layer in _layers(model, name):
        q, p = layer.lora_A[name], layer.lora_B[name]
        eye = torch.eye(q.shape[0], device=q.device, dtype=q.dtype)
        terms.append(torch.linalg.matrix_norm(q @ q.T - eye))
        terms.append(torch.linalg.matrix_norm(p.T @ p - eye))
    return weight * torch.stack(terms).mean() if terms else None


def _update_importance(model: Any, name: str, state: TrainingState) -> None:
    config: AdaLoraConfig = model.peft_configs[name]
    if config.rank_pattern is not None or state.step >= _total_steps(model, name, state) - config.tfinal:
        return  # ranks are final: no more scores needed
    for _, layer in _layers(model, name):
        layer.update_importance(name, config.beta1, config.beta2)


def _allocate_ranks(model: Any, name: str, state: TrainingState) -> None:
    config: AdaLoraConfig = model.peft_configs[name]
    layers = _layers(model, name)
    if config.rank_pattern is not None:  # final: hold pruned Λ at zero (the optimizer step revives them)
        for _, layer in layers:
            if layer.settings[name].kept is not None:
                layer.prune(name, layer.settings[name].kept)
        return
    total = _total_steps(model, name, state)
    budget, allocate = budget_schedule(state.step, config, total, len(layers))
    if not allocate:
        return
    kept = _allocate(layers, name, budget)
    if state.step >= total - config.tfinal:
        # The final allocation: fix the ranks, record them as peft does, drop the scores.
        for path, layer in layers:
            layer.settings[name].kept = kept[path].cpu()
            layer.settings[name].importance.clear()
        pattern = {f"{path}.lora_E": tuple(bool(b) for b in kept[path].tolist()) for path, _ in layers}
        model.peft_configs[name] = config.replace(rank_pattern=pattern)


def attach(model: nn.Module, name: str, config: AdaLoraConfig, host: Any = None) -> None:
    paths = resolve_targets(model, config.targets, allowed_types=LINEAR_TYPES)
    pattern = dict(config.rank_pattern or {})
    for path in paths:
        kept = pattern.pop(f"{logical_name(path)}.lora_E", None)
        # A loaded allocation: the matrix holds only its kept triplets (peft's checkpoint layout).
        wrap(model, path, AdaLoraLayer).add(name, config, sum(kept) if kept is not None else config.init_r)
    if pattern:
        raise PeftlabError(f"AdaLoraConfig.rank_pattern names {sorted(pattern)[:3]}, which are not among the adapted "
                           f"modules {[logical_name(p) + '.lora_E' for p in paths][:3]}...; was it saved for another "
                           "model or other targets?")


# default_lr: AdaLoRA starts from Λ = 0 with P and Q at std 0.02, so its update grows slowly and
# wants a larger rate than LoRA's. Measured on MiniLM, SST-2 (5,000 examples, one epoch, the quick
# suite's x4): dev accuracy 0.606 at 4e-3, 0.812 at 1.6e-2, 0.795 at 4e-2 (the study's x4 of 4e-3).
SPEC = register(MethodSpec(
    name="adalora", title="AdaLoRA", family="reparameterized", subcategory="rank adjustment", config_cls=AdaLoraConfig,
    trains="SVD-form low-rank update P Λ Q whose rank budget is reallocated by importance during training",
    attach=attach, paper="Zhang et al. 2023, Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
    mergeable=True, merge_tolerance=1e-4, peft_type="ADALORA", default_lr=4e-3,
    hooks=TrainingHooks(before_training=_begin, loss=_orthogonality, before_step=_update_importance,
                        after_step=_allocate_ranks),
))
