"""S3Delta-M (Hu, Ding, Liu, Zhang, Wang, Liu, Sun, Zheng, Liu, Sun et al., 2022, "Sparse Structure
Search for Delta Tuning", NeurIPS; reference code thunlp/S3Delta, ``NAS_global``): a differentiable
search over where to put which delta module under a parameter budget, then retraining of the chosen
structure.

Search space (S3Delta-M, "mix"): candidates ``c = (kind, site, layer)``, each with its own structure
logit ``alpha_c`` and size ``n_c`` (parameters it trains), in every layer of every layer stack:

    lora      rank-1 LoRA (scale alpha/r = 16)   at @query @key @value @attn_out @ffn_in @ffn_out
    bitfit    a bias delta                        at the same projections and @layernorm (where biases exist)
    ln_tuning the norm's gain and bias (LNFit)    at @layernorm
    adapter   a sequential bottleneck adapter     after @attn_out and @ffn_out

Supernet (``s3delta_supernet``, the method :func:`search` trains): every candidate is attached, its
output multiplied by a gate ``z_c``. Following the reference's default ("shift" strategy, soft gates)::

    b      such that  sum_c sigmoid((alpha_c - b) / beta) n_c = B         (shift, solved by bisection, no grad)
    p_c  = sigmoid((alpha_c - b) / beta),  then  p <- p / sum(p) * stop_grad(sum(p))   (shift_detach)
    training step: z_c = sigmoid(logit p_c + logit u_c),  u_c ~ U(0, 1)  (binary-concrete sample, temperature 1)
    otherwise:     z_c = p_c            (eval mode, or a forward without gradients)

so the expected size ``sum p_c n_c`` equals the budget ``B = param_budget * (model parameters)`` at
every step by construction (the reference's "shift" has no extra loss term; the shift is the budget
constraint), and the gradient that reaches ``alpha`` moves probability between candidates. A gate of 0
removes its candidate exactly (the candidate adds ``z * delta``); a gate of 1 is the candidate's
method's own output. alpha starts at 0 (every candidate equally likely) and trains in its own
optimizer group at ``alpha_lr`` = 0.1 without weight decay, under the run's schedule (the reference:
AdamW at 0.1, no weight decay, linear decay). Selection (reference
``hard_forward_structure``): candidates by ``p_c`` from the largest, each taken if it still fits in
``B`` (a larger one that does not fit is skipped, smaller ones after it may still be taken).

Found architecture (:class:`S3DeltaConfig`, this method): a hybrid of LoRA, sequential adapter, BitFit
and LN tuning part configs whose targets list the chosen layers per site (``"@query[3,5]"``); unused
parts are ``None``. Its parts attach in field order, the order the supernet computes in at a module:
``h = W x + z_l s B A x``; ``h += z_a A(h)``; ``h += z_b db``; norms run with ``gamma + z_n dgamma``.

Default config (no search): rank-1 LoRA on every @query and LN tuning on every @layernorm. The
structure the reference ships for SST-2 at its larger S3Delta-M budget
(``structure_config/avg/tranfer_sst2_1389.json``) spends its budget on the layer norms (BitFit and
LNFit) and on rank-1 LoRA at the attention query (and FFN input in upper decoder layers); LN tuning
holds both the norms' bias (BitFit's share there) and gain, and applies to models without biases.

:func:`search` (``MethodSpec.search``) — how trials map to the budget: trial 1 trains the supernet for
``budget.steps`` x (``budget.trials`` - 1) steps (the steps of every trial but the retrain's: one
supernet run is the search; the context's run length when ``budget.steps`` is ``None``; the reference
trains the supernet as long as the retraining), trial 2 retrains the selected structure from scratch for
``budget.steps`` and scores it; a budget of 1 trial trains the supernet for ``budget.steps`` and returns
the selected structure unscored. No trial starts after ``budget.minutes``. Search-space fields of :class:`S3DeltaConfig` (read by :func:`search`, not by
attaching): ``param_budget`` (share of the model's parameters; default 1.389e-4, the paper's larger
S3Delta-M budget), ``candidates``, ``lora_rank``, ``adapter_bottleneck``, ``beta``, ``alpha_lr``.

Deviations from the paper and its code, with reasons:
- Single-level optimisation: ``alpha`` and the delta weights train on the same training batches, each
  with its own optimizer group (the reference's ``using_darts=False`` path), not the paper's bi-level
  (second-order DARTS) on a half of the training set held out for ``alpha``: peftlab's loop
  (``context.fit``) trains on one stream of batches and hands training hooks no held-out batches, and
  the unrolled step costs three more forward/backward passes per step.
- The adapter candidate is peftlab's sequential bottleneck adapter of width 1 (``adapter_bottleneck``),
  initialised with ``W_up = 0``; the reference's is a low-rank (rank-1 factors) adapter of width d/32
  (``LowRankAdapter``), which peftlab has only inside Compacter. Both train about ``3 d`` parameters.
- A candidate groups the modules one site matches in one layer (BERT's two LayerNorms of a layer;
  Llama's gate and up projections; T5's encoder and decoder layer of that index), because the found
  structure is written as ``"@site[layer]"``; the reference has one candidate per module. Norms outside
  the layer stacks (embedding LayerNorm, final norm) are no candidates for the same reason.
- BitFit candidates exist only where the module has a bias (peftlab's BitFit trains existing biases;
  the reference's ``BitFitParallel`` adds a new bias to T5's bias-free layers).
- Soft prompts (in the reference's candidate list, unused by its S3Delta-M configuration) are left out.
- The structure is read from the supernet's final logits; the reference evaluates the supernet on the
  dev set every ``valid_steps`` and derives the structure from the best checkpoint (a context trains and
  scores once). Gradients are clipped by the loop's one global norm, not per group at 2.0.
- Not in the reference's defaults either: hard-concrete stretching (its ``l = 0, r = 1``) and
  ``hard_forward`` are not implemented.

Not mergeable as a method (an adapter part is not; a found LoRA/BitFit/LN-only structure could be, but
mergeability is declared once per method). Encoder, decoder and encoder-decoder models.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.compose import attach_parts, part_capabilities, validate_parts
from ...core.config import PeftConfig, is_positive_int
from ...core.errors import PeftlabError
from ...core.hooks import TrainingHooks
from ...core.inject import wrap
from ...core.layer import BufferDict, DeltaModule, base_of, linear_io
from ...core.registry import MethodSpec, register
from ...core.search import SearchBudget, SearchResult, Trial
from ...core.targets import LINEAR_TYPES, layer_of, resolve_targets, site_in_layers
from ..additive import sequential_adapter
from ..additive.sequential_adapter import Bottleneck, SequentialAdapterConfig, factory_kwargs
from ..partial import bitfit, ln_tuning
from ..partial.bitfit import BitFitConfig
from ..partial.ln_tuning import LNTuningConfig
from ..reparameterized import lora as lora_method
from ..reparameterized.lora import LoraConfig

KINDS = ("lora", "adapter", "bitfit", "ln_tuning")  # the found config's part fields, in attach order
PROJECTIONS = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
SITES: dict[str, tuple[str, ...]] = {
    "lora": PROJECTIONS,
    "adapter": ("attn_out", "ffn_out"),
    "bitfit": PROJECTIONS + ("layernorm",),
    "ln_tuning": ("layernorm",),
}
LORA_ALPHA = 16.0  # the reference's (OpenDelta's) lora_alpha: scale 16 at rank 1
PAPER_BUDGET = 1.389e-4  # S3PET-M's larger budget (scripts/S3PET-M/1.39), a share of the backbone's parameters
_KEY = "s3delta_supernet"  # the supernet's entry in PeftModel.model_adapters
_EPS = 1e-6


def _check_search_fields(config: Any) -> None:
    budget = config.param_budget
    if budget is None and isinstance(config, S3DeltaSupernetConfig):
        pass  # the supernet's standalone default: half of its candidates' size
    elif isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget < 1.0:
        raise PeftlabError(f"{type(config).__name__}.param_budget={budget!r}: expected the share of the model's "
                           f"parameters the found structure may train, strictly between 0 and 1 (the paper: "
                           f"{PAPER_BUDGET})")
    kinds = config.candidates
    if not isinstance(kinds, tuple) or not kinds or any(k not in KINDS for k in kinds) or len(set(kinds)) != len(kinds):
        raise PeftlabError(f"{type(config).__name__}.candidates={kinds!r}: expected a non-empty list of distinct "
                           f"delta module kinds from {KINDS}")
    config._require(is_positive_int(config.lora_rank), "lora_rank", "a positive whole rank such as 1 (the paper)")
    config._require(is_positive_int(config.adapter_bottleneck), "adapter_bottleneck",
                    "a positive whole bottleneck width such as 1")
    config._require(config.beta > 0, "beta", "a positive temperature of the shifted sigmoid, e.g. 1.0")
    config._require(config.alpha_lr > 0, "alpha_lr", "a positive learning rate for the structure logits, e.g. 0.1")


# -- the supernet ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class S3DeltaSupernetConfig(PeftConfig):
    """Every candidate of the search space behind a gate (see the module docstring).

    param_budget: B as a share of the model's parameters (what :func:`search` passes from
    :class:`S3DeltaConfig`); ``None`` (the default, for the supernet used on its own): half the size
    of all its candidates, which any model can hold;
    candidates: the kinds in the space; lora_rank, adapter_bottleneck: the candidates' sizes;
    beta: the shifted sigmoid's temperature; alpha_lr: the structure logits' learning rate.
    targets: unused (the space is every site of every layer); leave it None."""

    param_budget: float | None = None
    candidates: tuple[str, ...] = KINDS
    lora_rank: int = 1
    adapter_bottleneck: int = 1
    beta: float = 1.0
    alpha_lr: float = 0.1

    def validate(self) -> None:
        self._require(self.targets is None, "targets", "None: the supernet spans every site of every layer "
                      "(restrict it with candidates)")
        _check_search_fields(self)


class StructureLogits(DeltaModule):
    """Model-level: per adapter, the structure logits ``s3_alpha`` (K,) (trained) and the candidates'
    sizes ``s3_size`` (K,) (frozen); ``settings[name]`` holds the budget B, beta and the candidates."""

    adapter_attrs = ("s3_alpha",)
    frozen_attrs = ("s3_size",)

    def __init__(self) -> None:
        super().__init__()
        self.s3_alpha = nn.ParameterDict()
        self.s3_size = BufferDict()

    def add(self, name: str, sizes: list[int], budget: float, beta: float, candidates: list[tuple[str, str, int]],
            like: torch.Tensor) -> None:
        self.s3_alpha[name] = nn.Parameter(torch.zeros(len(sizes), device=like.device))
        self.s3_size[name] = torch.tensor(sizes, dtype=torch.float32, device=like.device)
        self.settings[name] = {"budget": budget, "beta": beta, "candidates": candidates}

    def probabilities(self, name: str) -> torch.Tensor:
        """p (K,): the shifted sigmoid whose expected size ``sum p n`` is the budget."""
        alpha, sizes = self.s3_alpha[name], self.s3_size[name]
        budget, beta = self.settings[name]["budget"], self.settings[name]["beta"]
        shift = solve_shift(alpha.detach(), sizes, budget, beta)
        p = torch.sigmoid((alpha - shift) / beta).clamp(_EPS, 1 - _EPS)
        total = p.sum()
        return p / total * total.detach()  # the reference's shift_detach: value unchanged, gradient re-balanced

    def gates(self, name: str, training: bool) -> torch.Tensor:
        """z (K,): a binary-concrete sample around p in training, p itself otherwise."""
        p = self.probabilities(name)
        if not training:
            return p
        u = torch.rand_like(p).clamp(_EPS, 1 - _EPS)
        return torch.sigmoid(torch.log(p) - torch.log1p(-p) + torch.log(u) - torch.log1p(-u))

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - holds parameters only
        raise PeftlabError("StructureLogits is not called; the supernet's sites read its gates")


def solve_shift(alpha: torch.Tensor, sizes: torch.Tensor, budget: float, beta: float, steps: int = 60) -> torch.Tensor:
    """b with ``sum sigmoid((alpha - b) / beta) * sizes = budget`` (decreasing in b), by a fixed number of
    bisection steps (tensor ops only: no data-dependent Python branch, so it traces under torch.compile)."""
    with torch.no_grad():
        low = alpha.min() - 40.0 * beta
        high = alpha.max() + 40.0 * beta
        for _ in range(steps):
            mid = (low + high) / 2
            over = (torch.sigmoid((alpha - mid) / beta) * sizes).sum() > budget
            low, high = torch.where(over, mid, low), torch.where(over, high, mid)
        return (low + high) / 2


class SupernetSite(DeltaModule):
    """Wraps one projection or norm; per adapter, the candidates placed here (``settings[name]``:
    kind -> index into the gate vector), each adding ``z * delta`` in the found hybrid's order."""

    adapter_attrs = ("s3_lora_A", "s3_lora_B", "s3_adapter", "s3_bias", "s3_ln_weight", "s3_ln_bias")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.s3_lora_A = nn.ParameterDict()
        self.s3_lora_B = nn.ParameterDict()
        self.s3_adapter = nn.ModuleDict()
        self.s3_bias = nn.ParameterDict()
        self.s3_ln_weight = nn.ParameterDict()
        self.s3_ln_bias = nn.ParameterDict()
        self.current: dict[str, torch.Tensor] = {}  # adapter -> z (K,), set for one forward pass
        self.scale: dict[str, float] = {}
        self.prefix, inner = "", base_layer  # the norm's tensor names from base_layer down (functional_call)
        while isinstance(inner, DeltaModule) and hasattr(inner, "base_layer"):
            self.prefix, inner = self.prefix + "base_layer.", inner.base_layer

    def add(self, name: str, kind: str, index: int, config: S3DeltaSupernetConfig) -> int:
        """Place candidate ``kind`` (gate ``index``) here; returns the parameters it trains."""
        base = base_of(self.base_layer)
        kw = factory_kwargs(self.base_layer)
        if kind == "lora":
            d_in, d_out, _ = linear_io(self.base_layer)
            self.s3_lora_A[name] = nn.Parameter(torch.empty(config.lora_rank, d_in, **kw))
            nn.init.kaiming_uniform_(self.s3_lora_A[name], a=math.sqrt(5))  # LoRA's init: A random, B zero
            self.s3_lora_B[name] = nn.Parameter(torch.zeros(d_out, config.lora_rank, **kw))
            self.scale[name] = LORA_ALPHA / config.lora_rank
        elif kind == "adapter":
            d = linear_io(self.base_layer)[1]
            self.s3_adapter[name] = Bottleneck(d, config.adapter_bottleneck, d, "relu", 1e-2, 0.0, **kw)
        elif kind == "bitfit":
            self.s3_bias[name] = nn.Parameter(torch.zeros_like(base.bias))
        else:
            self.s3_ln_weight[name] = nn.Parameter(torch.zeros_like(base.weight))
            if isinstance(getattr(base, "bias", None), torch.Tensor):
                self.s3_ln_bias[name] = nn.Parameter(torch.zeros_like(base.bias))
        self.settings.setdefault(name, {})[kind] = index
        return sum(p.numel() for p in self._kind_params(name, kind))

    def _kind_params(self, name: str, kind: str) -> list[torch.Tensor]:
        attrs = {"lora": ("s3_lora_A", "s3_lora_B"), "adapter": ("s3_adapter",), "bitfit": ("s3_bias",),
                 "ln_tuning": ("s3_ln_weight", "s3_ln_bias")}[kind]
        out: list[torch.Tensor] = []
        for attr in attrs:
            item = getattr(self, attr)[name] if name in getattr(self, attr) else None
            if item is not None:
                out += list(item.parameters()) if isinstance(item, nn.Module) else [item]
        return out

    def gate(self, name: str, kind: str) -> torch.Tensor:
        if name not in self.current:
            raise PeftlabError(f"S3Delta supernet adapter {name!r}: its gates are set by the PeftModel's forward; "
                               "call the model (model(**batch)), not its modules directly")
        return self.current[name][self.settings[name][kind]]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        live = [n for n in self.live_adapters() if n in self.settings]
        norms = [n for n in live if "ln_tuning" in self.settings[n]]
        if norms:  # LN tuning: the norm runs with gamma + z dgamma (and beta + z dbeta)
            norm = base_of(self.base_layer)
            tensors = {"weight": norm.weight + sum(self.gate(n, "ln_tuning") * self.s3_ln_weight[n] for n in norms)}
            with_bias = [n for n in norms if n in self.s3_ln_bias]
            if with_bias:
                tensors["bias"] = norm.bias + sum(self.gate(n, "ln_tuning") * self.s3_ln_bias[n] for n in with_bias)
            out = torch.func.functional_call(self.base_layer, {self.prefix + k: v for k, v in tensors.items()},
                                             args, kwargs)
        else:
            out = self.base_layer(*args, **kwargs)
        x = args[0] if args else None
        for name in live:
            kinds = self.settings[name]
            if "lora" in kinds:
                a, b = self.s3_lora_A[name], self.s3_lora_B[name]
                update = F.linear(F.linear(x.to(a.dtype), a), b) * self.scale[name]
                out = out + (self.gate(name, "lora") * update).to(out.dtype)
            if "adapter" in kinds:
                out = out + (self.gate(name, "adapter") * self.s3_adapter[name](out)).to(out.dtype)
            if "bitfit" in kinds:
                out = out + (self.gate(name, "bitfit") * self.s3_bias[name]).to(out.dtype)
        return out


def _model_parameters(model: nn.Module) -> int:
    """Parameters of the model itself (other adapters' tensors not counted)."""
    adapters = {id(p) for m in model.modules() if isinstance(m, DeltaModule)
                for n in m.adapter_names() for p in m.adapter_parameters(n)}
    return sum(p.numel() for p in model.parameters() if id(p) not in adapters)


def candidate_space(model: nn.Module, kinds: tuple[str, ...]) -> list[tuple[str, str, int, list[str]]]:
    """(kind, site, layer, module paths) of every candidate, in kind, site, layer order. Sites the model
    lacks are skipped; so are sites matching the same modules as an earlier one (GPT-2's fused q/k/v)."""
    out: list[tuple[str, str, int, list[str]]] = []
    for kind in kinds:
        seen: set[tuple[str, ...]] = set()
        for site in SITES[kind]:
            try:
                paths = resolve_targets(model, (f"@{site}",))
            except PeftlabError:  # the model has no such site
                continue
            by_layer: dict[int, list[str]] = {}
            for path in paths:
                where = layer_of(model, path)
                if where is not None:
                    by_layer.setdefault(where[1], []).append(path)
            for layer in sorted(by_layer):
                group = by_layer[layer]
                if tuple(group) in seen or not all(_fits(base_of(model.get_submodule(p)), kind) for p in group):
                    continue
                seen.add(tuple(group))
                out.append((kind, site, layer, group))
    return out


def _fits(module: nn.Module, kind: str) -> bool:
    """Whether candidate ``kind`` can sit on (unwrapped) ``module``."""
    if kind in ("lora", "adapter"):
        return isinstance(module, LINEAR_TYPES)
    if kind == "bitfit":  # peftlab's BitFit trains existing biases only
        return isinstance(getattr(module, "bias", None), nn.Parameter)
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.dim() == 1  # a norm's gain


def attach_supernet(model: nn.Module, name: str, config: S3DeltaSupernetConfig, host: Any = None) -> None:
    if host is None:
        raise PeftlabError("the S3Delta supernet keeps model-level structure logits: apply it with get_peft_model")
    space = candidate_space(model, config.candidates)
    if not space:
        raise PeftlabError(f"S3DeltaSupernetConfig.candidates={config.candidates!r}: {type(model).__name__} offers no "
                           "place for any of these kinds (e.g. BitFit on a model without biases); add other kinds")
    sizes = [sum(_size_at(model.get_submodule(p), kind, config) for p in paths) for kind, _, _, paths in space]
    total = _model_parameters(model)
    budget = config.param_budget * total if config.param_budget is not None else 0.5 * sum(sizes)
    if budget < min(sizes):
        raise PeftlabError(f"S3Delta param_budget={config.param_budget!r} gives {budget:.0f} parameters of "
                           f"{type(model).__name__}'s {total}, less than the smallest candidate "
                           f"({min(sizes)}); raise param_budget to at least {min(sizes) / total:.2e}")
    if budget >= sum(sizes):
        raise PeftlabError(f"S3Delta param_budget={config.param_budget!r} gives {budget:.0f} parameters, enough for "
                           f"every candidate ({sum(sizes)} in all): there is nothing to choose; lower param_budget")
    like = next(p for p in model.parameters() if p.is_floating_point())
    for index, (kind, _, _, paths) in enumerate(space):
        for path in paths:
            wrap(model, path, SupernetSite).add(name, kind, index, config)
    structure = host.model_adapters[_KEY] if _KEY in host.model_adapters else StructureLogits()
    host.model_adapters[_KEY] = structure
    structure.add(name, sizes, budget, config.beta, [(k, s, layer) for k, s, layer, _ in space], like)


def _size_at(module: nn.Module, kind: str, config: S3DeltaSupernetConfig) -> int:
    base = base_of(module)
    if kind == "lora":
        d_in, d_out, _ = linear_io(module)
        return config.lora_rank * (d_in + d_out)
    if kind == "adapter":
        d, m = linear_io(module)[1], config.adapter_bottleneck
        return 2 * d * m + m + d
    if kind == "bitfit":
        return base.bias.numel()
    return base.weight.numel() + (base.bias.numel() if isinstance(getattr(base, "bias", None), torch.Tensor) else 0)


def _sites(host: Any, name: str) -> list[SupernetSite]:
    return [m for m in host.base_model.modules() if isinstance(m, SupernetSite) and name in m.settings]


def _around_forward(host: Any, name: str, forward: Any, args: tuple, kwargs: dict, extra: dict) -> Any:
    # One gate vector per forward pass, shared by every site (a candidate may span several modules).
    # Sampled only in a training step (train mode with gradients), as the reference samples in its
    # train_step and uses p when it evaluates.
    z = host.model_adapters[_KEY].gates(name, training=host.training and torch.is_grad_enabled())
    sites = _sites(host, name)
    for site in sites:
        site.current[name] = z
    try:
        return forward(*args, **kwargs)
    finally:
        for site in sites:
            site.current.pop(name, None)


def _param_groups(model: Any, name: str, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    # The structure logits train at their own rate without weight decay (the reference's alpha optimizer).
    config = model.peft_configs[name]
    return [{"params": [model.model_adapters[_KEY].s3_alpha[name]], "lr": config.alpha_lr, "weight_decay": 0.0}]


SUPERNET_SPEC = register(MethodSpec(
    name="s3delta_supernet", title="S3Delta-M supernet", family="hybrid", subcategory="automatic combination", config_cls=S3DeltaSupernetConfig,
    trains="every S3Delta-M candidate (rank-1 LoRA, bottleneck adapter, BitFit, LN tuning at every site of every "
           "layer) behind a gate, and one structure logit per candidate",
    attach=attach_supernet, paper="Hu et al. 2022, Sparse Structure Search for Delta Tuning (the search's supernet)",
    mergeable=False, identity_at_init=True, default_lr=3e-4, around_forward=_around_forward,
    hooks=TrainingHooks(param_groups=_param_groups), internal=True,
    draws_per_forward=True,  # a binary-concrete gate sample per forward pass
))


# -- the found architecture ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class S3DeltaConfig(PeftConfig):
    """The structure S3Delta-M found: lora (:class:`LoraConfig`), adapter
    (:class:`SequentialAdapterConfig`), bitfit (:class:`BitFitConfig`), ln_tuning
    (:class:`LNTuningConfig`), each with per-layer targets, or ``None`` where unused (at least one).

    Search-space fields, read by :func:`search` only: param_budget (share of the model's parameters the
    found structure may train; the paper's 1.389e-4 by default), candidates (kinds searched over),
    lora_rank, adapter_bottleneck (candidate sizes), beta (shifted sigmoid temperature), alpha_lr
    (structure logits' learning rate). modules_to_save applies to the whole adapter."""

    lora: LoraConfig | None = LoraConfig(targets=("@query",), r=1, alpha=LORA_ALPHA)
    adapter: SequentialAdapterConfig | None = None
    bitfit: BitFitConfig | None = None
    ln_tuning: LNTuningConfig | None = LNTuningConfig(targets=("@layernorm",))
    param_budget: float = PAPER_BUDGET
    candidates: tuple[str, ...] = KINDS
    lora_rank: int = 1
    adapter_bottleneck: int = 1
    beta: float = 1.0
    alpha_lr: float = 0.1

    def validate(self) -> None:
        for field, cls in (("lora", LoraConfig), ("adapter", SequentialAdapterConfig), ("bitfit", BitFitConfig),
                           ("ln_tuning", LNTuningConfig)):
            value = getattr(self, field)
            self._require(value is None or type(value) is cls, field, f"a {cls.__name__}(...) or None (unused)")
        _check_search_fields(self)
        validate_parts(self, min_parts=1)

    def supernet(self) -> S3DeltaSupernetConfig:
        """The supernet of this config's search space (what :func:`search` trains)."""
        return S3DeltaSupernetConfig(param_budget=self.param_budget, candidates=self.candidates,
                                     lora_rank=self.lora_rank, adapter_bottleneck=self.adapter_bottleneck,
                                     beta=self.beta, alpha_lr=self.alpha_lr)


def select(probabilities: list[float], sizes: list[int], budget: float) -> list[int]:
    """Indices taken greedily by probability (largest first), each if it still fits in ``budget``."""
    chosen, used = [], 0.0
    for i in sorted(range(len(sizes)), key=lambda i: -probabilities[i]):
        if used + sizes[i] <= budget:
            chosen.append(i)
            used += sizes[i]
    return sorted(chosen)


def found_config(config: S3DeltaConfig, candidates: list[tuple[str, str, int]], chosen: list[int]) -> S3DeltaConfig:
    """``config`` with its parts replaced by the chosen candidates, written as ``"@site[layers]"``."""
    layers: dict[str, dict[str, list[int]]] = {}
    for i in chosen:
        kind, site, layer = candidates[i]
        layers.setdefault(kind, {}).setdefault(site, []).append(layer)
    targets = {kind: tuple(site_in_layers(site, ls) for site, ls in sites.items())
               for kind, sites in layers.items()}
    parts: dict[str, PeftConfig | None] = {
        "lora": (LoraConfig(targets=targets["lora"], r=config.lora_rank, alpha=LORA_ALPHA)
                 if "lora" in targets else None),
        "adapter": (SequentialAdapterConfig(targets=targets["adapter"], bottleneck=config.adapter_bottleneck,
                                            init="identity") if "adapter" in targets else None),
        "bitfit": BitFitConfig(targets=targets["bitfit"]) if "bitfit" in targets else None,
        "ln_tuning": LNTuningConfig(targets=targets["ln_tuning"]) if "ln_tuning" in targets else None,
    }
    return dataclasses.replace(config, **parts)


def search(context: Any, budget: SearchBudget, config: S3DeltaConfig | None = None) -> SearchResult:
    """Train the supernet of ``config``'s search space (trial 1), select candidates by their gate
    probabilities within ``config.param_budget``, and retrain the selection from scratch (trial 2, when
    ``budget.trials >= 2`` and time is left). Returns the selection as an :class:`S3DeltaConfig`."""
    config = config if config is not None else S3DeltaConfig()
    if not isinstance(config, S3DeltaConfig):
        raise PeftlabError(f"S3Delta search: config is a {type(config).__name__}; expected an S3DeltaConfig")
    started = time.perf_counter()
    trials: list[Trial] = []
    supernet = config.supernet()
    if config.modules_to_save:
        supernet = supernet.replace(modules_to_save=config.modules_to_save)
    # One supernet run is the search: it takes the steps of every trial but the retrain's.
    supernet_steps = budget.steps * max(1, budget.trials - 1) if budget.steps else None
    trial, model = context.fit(supernet, steps=supernet_steps, keep_model=True)
    structure = model.model_adapters[_KEY]
    name = next(iter(model.peft_configs))
    with torch.no_grad():
        p = structure.probabilities(name).tolist()
    sizes = [int(s) for s in structure.s3_size[name].tolist()]
    candidates = structure.settings[name]["candidates"]
    limit = structure.settings[name]["budget"]
    chosen = select(p, sizes, limit)
    if not chosen:
        raise PeftlabError(f"S3Delta search: no candidate fits param_budget={config.param_budget} "
                           f"({limit:.0f} parameters); raise param_budget")
    found = found_config(config, candidates, chosen)
    used = sum(sizes[i] for i in chosen)
    trials.append(dataclasses.replace(trial, info={
        "role": "supernet", "candidates": len(sizes), "budget_parameters": round(limit, 1),
        "probabilities": {f"{k}@{s}[{layer}]": round(v, 4) for (k, s, layer), v in zip(candidates, p)}}))
    del model
    notes = [f"supernet: {len(sizes)} candidates, budget {limit:.0f} parameters "
             f"({config.param_budget:.3g} of the model); selected {len(chosen)} ({used} parameters)"]
    if budget.trials >= 2 and budget.time_left(started):
        retrained, _ = context.fit(found, steps=budget.steps)
        trials.append(dataclasses.replace(retrained, info={"role": "retrain", "structure_parameters": used}))
    else:
        notes.append("the selected structure was not retrained (budget.trials < 2 or no time left)")
    return SearchResult(method=SPEC.name, config=found, trials=trials, budget=budget,
                        seconds=time.perf_counter() - started, notes=notes)


# default_lr 3e-4: the reference scripts' LEARNING_RATE for search and retraining (scripts/S3PET-M/*).
SPEC = register(MethodSpec(
    name="s3delta", title="S3Delta-M", family="hybrid", subcategory="automatic combination", config_cls=S3DeltaConfig,
    trains="the delta modules S3Delta-M's search chose (rank-1 LoRA, bottleneck adapter, BitFit, LN tuning) at "
           "the layers it chose",
    attach=attach_parts, paper="Hu et al. 2022, Sparse Structure Search for Delta Tuning",
    default_lr=3e-4, search=search,
    **part_capabilities(lora_method.SPEC, sequential_adapter.SPEC, bitfit.SPEC, ln_tuning.SPEC),
))
