"""AdaMix (Wang, Agarwal, Mukherjee, Liu, Gao, Awadallah and Gao, 2022, "AdaMix: Mixture-of-Adaptations
for Parameter-efficient Model Tuning", EMNLP; reference code: microsoft/AdaMix, ``models/expert_soup.py``,
``BertOutput``/``RobertaOutput`` and ``RobertaForSequenceClassification`` of its transformers fork, and
``bert_base_mnli_expert_soup.sh``).

A mixture of Houlsby-style bottleneck adapters at each site: ``M`` down-projection experts
``(W_down^i, b_down^i)`` and ``M`` up-projection experts ``(W_up^j, b_up^j)``. With ``h`` the output of
the adapted projection (the FFN output projection, before dropout, residual add and LayerNorm, as the
reference places its ``ExpertSoup``)::

    training:  i, j ~ U{1..M} drawn per site and per forward pass (stochastic routing)
               h <- h + W_up^j f(W_down^i h + b_down^i) + b_up^j
    inference: h <- h + W_up^avg f(W_down^avg h + b_down^avg) + b_up^avg,   X^avg = (1/M) sum_i X^i

so an AdaMix adapter at inference is one sequential adapter (adaptation merging, the paper's 3.3) and
costs what one adapter costs: the mean is computed once and kept until an expert changes (their
version counters), so an eval forward runs one bottleneck's two matmuls per site.
:func:`to_sequential_adapter` writes the merged adapter out as a plain ``sequential_adapter``.

Consistency regularisation (the paper's 3.2): each training forward pass runs the model twice, with
independent routes (and dropout draws); with ``p``, ``q`` the two passes' logits the loss gains::

    consistency_weight * 1/2 [ KL(softmax(q) || softmax(p)) + KL(softmax(p) || softmax(q)) ]

each KL with its target distribution detached (as the reference's ``symmetric_KL_loss``), averaged
over the examples (``batchmean``; over every position for per-token logits). The first pass is the
output: its loss (labels given) is the task loss; the second pass contributes only through the KL term.
The term reaches the loss through peftlab's ``TrainingHooks(loss=...)``: added to ``out.loss`` when
labels are given, otherwise ``model.extra_loss()`` returns it for a loop that computes its own loss.

Adaptation module sharing (the paper's 3.4): ``share_up=True`` (default, the reference script's
``--sharing_up 1 --sharing_down 0``) keeps one up-projection shared by the experts, so only the
down-projections are mixed; ``share_down`` shares the down-projection instead.

Defaults follow the reference's BERT-base script: M = 4, m = d / 16 (48 at BERT-base, 24 on MiniLM),
GELU, sites ``@ffn_out``, every projection ``N(0, 0.02^2)`` with zero bias, drawn independently per
expert (BERT's ``_init_weights`` re-initialises each expert's Linear), so the adapter is not the
identity at init. Learning rate 4e-4 (the reference's BERT-base script). Each site trains
``M (d m + m) + (m d + d)`` parameters with ``share_up`` (a sequential adapter's ``2 d m + m + d`` plus
``M - 1`` more down-projections).

Only the routed experts change in an optimizer step (the reference leaves the others without a
gradient, so Adam neither moves nor decays them): each expert bank marks the experts a training pass
routed to, and a ``before_step`` hook clears the gradients of the rest before the optimizer steps.
Like every method with step hooks, a training forward pass therefore needs ``model.begin_training``
first (peftlab's loop and ``PeftlabCallback`` call it; a plain loop calls it and ``model.optimizer_step``).

Deviations, and why:
- Routing happens only in training mode *with* gradients enabled; a pass under ``torch.no_grad()``
  uses the averaged experts even in training mode (a pass that cannot train has no use for a random
  route, and a no-grad evaluation inside training is then deterministic). The reference routes
  whenever the module is in training mode.
- The reference applies its consistency term only in its RoBERTa classifier (its BERT scripts set the
  flag, which its BERT model ignores); here it applies on any model whose output has ``logits``, to
  every position of per-token logits (padding included). Outputs without logits get no term. A
  single-logit output (regression) gets a zero term, as in the reference (softmax over one class).
- The routed experts' weights are gathered from a stacked copy (``torch.stack``), so the unrouted
  experts receive zero gradients in backward; the ``before_step`` hook turns those into ``None``, as
  the reference's graph leaves them. A loop that steps the optimizer without ``model.optimizer_step``
  would give them Adam's momentum and weight-decay updates.
- One site per layer (the FFN output, as the reference's ``ExpertSoup``), not Houlsby's two (after
  attention too); ``targets=("@attn_out", "@ffn_out")`` gives both.
- Only the adapter variant (not the paper's AdaMix-LoRA) is implemented here.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import PeftConfig
from ...core.errors import PeftlabError
from ...core.hooks import TrainingHooks
from ...core.inject import wrap
from ...core.layer import DeltaModule, TrainableCopy, base_of
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, resolve_targets
from ..additive.sequential_adapter import (ACTIVATIONS, SequentialAdapterConfig, SequentialAdapterLayer,
                                           bottleneck_width, factory_kwargs, linear_features,
                                           validate_bottleneck_fields)


@dataclasses.dataclass(frozen=True)
class AdaMixConfig(PeftConfig):
    """num_experts: M, adapters mixed per site; bottleneck / reduction_factor: m, each expert's inner
    width (set one; with neither, m = hidden // 16); activation: f (the reference's GELU);
    init_scale: std of the normal init of every projection (BERT's 0.02); share_up / share_down: one
    up- (down-) projection shared by the experts (the reference: share_up); consistency_weight: weight
    of the symmetric KL between two routed passes (0 turns it off and trains with one pass).
    targets default to the FFN output projection (the reference's placement)."""

    targets: tuple[str, ...] | str | None = ("@ffn_out",)
    num_experts: int = 4
    bottleneck: int | None = None
    reduction_factor: float | None = None
    activation: str = "gelu"
    init_scale: float = 0.02
    share_up: bool = True
    share_down: bool = False
    consistency_weight: float = 1.0

    def validate(self) -> None:
        validate_bottleneck_fields(self)
        self._require(isinstance(self.num_experts, int) and not isinstance(self.num_experts, bool)
                      and self.num_experts >= 1, "num_experts",
                      "a positive number of experts M per site, such as 4 (the paper's)")
        self._require(isinstance(self.share_up, bool), "share_up",
                      "True (one up-projection shared by the experts, the reference's default) or False")
        self._require(isinstance(self.share_down, bool), "share_down",
                      "True (one down-projection shared by the experts) or False (the reference's default)")
        if self.share_up and self.share_down and self.num_experts > 1:
            raise PeftlabError("AdaMixConfig got share_up=True and share_down=True: nothing would be mixed; "
                               "share at most one projection (the reference shares the up-projection)")
        w = self.consistency_weight
        self._require(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0,
                      "consistency_weight", "a weight >= 0 for the symmetric-KL consistency term, such as 1.0 "
                      "(the reference's; 0 trains with one pass and no term)")


class ExpertBank(nn.Module):
    """``n`` linear experts of one projection. ``weights(route=True)`` returns one expert drawn at random
    (and marks it routed); ``route=False`` returns the experts' mean (the merged projection)."""

    def __init__(self, n: int, d_in: int, d_out: int, init_scale: float, **kw: Any) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(d_in, d_out, **kw) for _ in range(n))
        with torch.no_grad():
            for expert in self.experts:  # independent draws, as BERT's init gives each expert
                nn.init.normal_(expert.weight, std=init_scale)
                nn.init.zeros_(expert.bias)
        # Which experts a training pass used since the last optimizer step (not saved).
        self.register_buffer("routed", torch.zeros(n, dtype=torch.bool, device=kw.get("device")), persistent=False)
        self._mean: tuple[Any, torch.Tensor, torch.Tensor] | None = None

    def weights(self, route: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.experts) == 1:  # a shared projection: nothing to route or average
            if route:
                self.routed.fill_(True)
            return self.experts[0].weight, self.experts[0].bias
        if route:
            weight, bias = self._stacked()
            pick = torch.randint(len(self.experts), (1,), device=weight.device)
            self.routed.index_fill_(0, pick, True)
            return weight.index_select(0, pick)[0], bias.index_select(0, pick)[0]
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.averaged()
        # Inference: keep the mean until an expert changes (an optimizer step or a load bumps _version).
        key = tuple((p._version, p.data_ptr()) for e in self.experts for p in (e.weight, e.bias))
        if self._mean is None or self._mean[0] != key:
            self._mean = (key, *self.averaged())
        return self._mean[1], self._mean[2]

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([e.weight for e in self.experts]), torch.stack([e.bias for e in self.experts])

    def averaged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts' mean weight and bias: the merged projection (differentiable)."""
        weight, bias = self._stacked()
        return weight.mean(0), bias.mean(0)

    def drop_unrouted_grads(self) -> None:
        """Leave experts no training pass routed to without a gradient (the optimizer skips them)."""
        for expert, used in zip(self.experts, self.routed.tolist()):
            if not used:
                expert.weight.grad = None
                expert.bias.grad = None
        self.routed.zero_()


class AdaMixLayer(DeltaModule):
    """Wraps a Linear/Conv1D ``h = base(x)`` and adds each live adapter's mixture of bottlenecks to ``h``."""

    adapter_attrs = ("adamix_down", "adamix_up")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adamix_down = nn.ModuleDict()
        self.adamix_up = nn.ModuleDict()
        self.features = linear_features(base_layer)[1]
        # Consistency terms of the last training pass, until the loss hook reads them (see around_forward).
        self.pending_consistency: dict[str, torch.Tensor] = {}

    def add(self, name: str, config: AdaMixConfig) -> None:
        d, m, kw = self.features, bottleneck_width(config, self.features), factory_kwargs(self.base_layer)
        downs = 1 if config.share_down else config.num_experts
        ups = 1 if config.share_up else config.num_experts
        self.adamix_down[name] = ExpertBank(downs, d, m, config.init_scale, **kw)
        self.adamix_up[name] = ExpertBank(ups, m, d, config.init_scale, **kw)
        self.settings[name] = config.activation

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.pending_consistency.pop(name, None)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(*args, **kwargs)
        route = self.training and torch.is_grad_enabled()
        for name in self.live_adapters():
            down_w, down_b = self.adamix_down[name].weights(route)
            up_w, up_b = self.adamix_up[name].weights(route)
            hidden = ACTIVATIONS[self.settings[name]](F.linear(out.to(down_w.dtype), down_w, down_b))
            out = out + F.linear(hidden, up_w, up_b).to(out.dtype)
        return out


def _layers(model: nn.Module, name: str) -> list[AdaMixLayer]:
    return [m for m in model.modules() if isinstance(m, AdaMixLayer) and name in m.adamix_down]


def attach(model: nn.Module, name: str, config: AdaMixConfig, host: Any = None) -> None:
    for path in resolve_targets(model, config.targets, allowed_types=LINEAR_TYPES):
        wrap(model, path, AdaMixLayer).add(name, config)


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``1/2 [KL(q || p) + KL(p || q)]`` of the softmax distributions over the last dimension, each
    target detached, averaged over all other positions (the reference's ``symmetric_KL_loss``)."""
    p, q = p_logits.float().flatten(0, -2), q_logits.float().flatten(0, -2)
    p_given_q = F.kl_div(F.log_softmax(p, dim=-1), F.softmax(q.detach(), dim=-1), reduction="batchmean")
    q_given_p = F.kl_div(F.log_softmax(q, dim=-1), F.softmax(p.detach(), dim=-1), reduction="batchmean")
    return 0.5 * (p_given_q + q_given_p)


def around_forward(host: Any, adapter_name: str, forward: Any, args: tuple, kwargs: dict[str, Any],
                   extra: dict[str, Any]) -> Any:
    """In training (with gradients, the adapter trainable, ``consistency_weight > 0``): a second pass
    with fresh routes, and the consistency term between the two passes' logits kept for the loss hook."""
    out = forward(*args, **kwargs)
    if not (host.base_model.training and torch.is_grad_enabled()):
        return out  # inference: one pass, no module walk
    layers = _layers(host.base_model, adapter_name)
    if not layers:
        return out
    layers[0].pending_consistency.pop(adapter_name, None)  # never leave a stale term from an earlier pass
    weight = host.peft_configs[adapter_name].consistency_weight
    logits = getattr(out, "logits", None)
    # No term for a frozen adapter, with weight 0, or without predictions to compare (a bare encoder).
    if not weight or adapter_name not in host.trainable_adapters() or not isinstance(logits, torch.Tensor):
        return out
    second = forward(*args, **kwargs)
    layers[0].pending_consistency[adapter_name] = weight * symmetric_kl(logits, second.logits)
    return out


def _consistency_term(model: Any, adapter_name: str) -> torch.Tensor | None:
    layers = _layers(model.base_model, adapter_name)
    return layers[0].pending_consistency.pop(adapter_name, None) if layers else None


def _drop_unrouted_grads(model: Any, adapter_name: str, state: Any) -> None:
    for layer in _layers(model.base_model, adapter_name):
        layer.adamix_down[adapter_name].drop_unrouted_grads()
        layer.adamix_up[adapter_name].drop_unrouted_grads()


def to_sequential_adapter(model: Any, adapter_name: str, new_name: str) -> SequentialAdapterConfig:
    """Add ``sequential_adapter`` ``new_name`` to ``model`` (a PeftModel) equal to AdaMix adapter
    ``adapter_name`` at inference: at every site its bottleneck holds the experts' averaged down- and
    up-projections (same sites, width and activation). Added inactive; returns its config."""
    config = model.peft_configs.get(adapter_name)
    if not isinstance(config, AdaMixConfig):
        raise PeftlabError(f"to_sequential_adapter: adapter {adapter_name!r} is "
                           f"{type(config).__name__ if config else 'not on this model'}; expected an AdaMix adapter "
                           f"(the model has {sorted(model.peft_configs)})")
    plain = SequentialAdapterConfig(targets=config.targets, bottleneck=config.bottleneck,
                                    reduction_factor=config.reduction_factor, activation=config.activation,
                                    modules_to_save=config.modules_to_save)
    model.add_adapter(new_name, plain)
    mixtures = {id(base_of(m)): m for m in _layers(model.base_model, adapter_name)}
    with torch.no_grad():
        for module in model.base_model.modules():
            if isinstance(module, SequentialAdapterLayer) and new_name in module.bottleneck:
                mixture, block = mixtures[id(base_of(module))], module.bottleneck[new_name]
                for linear, bank in ((block.down, mixture.adamix_down[adapter_name]),
                                     (block.up, mixture.adamix_up[adapter_name])):
                    weight, bias = bank.averaged()
                    linear.weight.copy_(weight)
                    linear.bias.copy_(bias)
            elif isinstance(module, TrainableCopy) and new_name in module.copies:  # the trained head
                module.copies[new_name].load_state_dict(module.copies[adapter_name].state_dict())
    return plain


SPEC = register(MethodSpec(
    name="adamix", title="AdaMix", family="unified", subcategory="mixture of adaptations", config_cls=AdaMixConfig,
    trains="a mixture of bottleneck adapters per FFN output (random routing in training, averaged at inference)",
    attach=attach,
    paper="Wang et al. 2022, AdaMix: Mixture-of-Adaptations for Parameter-efficient Model Tuning",
    # N(0, 0.02) projections: not the identity at init; GELU: not foldable into the base weight.
    mergeable=False, identity_at_init=False, default_lr=4e-4, around_forward=around_forward,
    hooks=TrainingHooks(loss=_consistency_term, before_step=_drop_unrouted_grads),
    draws_per_forward=True,  # one expert route per forward pass
))
