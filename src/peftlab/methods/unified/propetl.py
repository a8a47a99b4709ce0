"""ProPETL (Zeng, Zhang and Lu, 2023, "One Network, Many Masks: Towards More Parameter-Efficient
Transfer Learning", ACL).

ONE small PETL module, the *prototype*, is shared by every layer; each layer uses its own sub-network
of it, chosen by a learned binary mask. With ``P`` a masked prototype tensor and ``S_l`` layer l's
real-valued scores (same shape as ``P``)::

    M_l = 1[|S_l| among the top ``density`` fraction of |S_l|]       (per tensor, exactly k entries kept)
    layer l uses  P (.) M_l                                           ((.) elementwise)
    dL/dS_l := dL/dM_l * sign(S_l)  with  dL/dM_l = dL/d(P (.) M_l) (.) P      (straight-through estimator)

Prototype and scores train together (the scores at ``mask_lr_ratio`` times the learning rate).

Forms (``form``):
- ``"adapter"`` (ProAdapter, the paper's headline): the prototype is a bottleneck adapter
  ``h <- h + (W_up (.) M_up) f((W_down (.) M_down) h + b_down) + b_up`` after the FFN output projection
  (Pfeiffer placement, ``@ffn_out``). The two weight matrices are masked; the two biases are shared as
  they are (the reference's ``forward_with_mask``).
- ``"lora"`` (ProLoRA): the prototype is a LoRA pair,
  ``h <- W0 x + (alpha / r) (B (.) M_B)(A (.) M_A) x``, on the query and value projections.

One prototype per entry of ``targets``: every module that entry selects (one per layer) shares it, so
the default adapter has one prototype for all layers and the LoRA form one for all queries and one
for all values (as the reference). All modules an entry selects must have the same shape.

Storage (the paper's accounting): the prototype in floats plus one BIT per masked prototype entry per
layer. The checkpoint holds exactly that: the prototype (``propetl_prototype.<i>.<tensor>``, top level)
and each layer's masks as packed bits (``propetl_mask.<tensor>.bits``, uint8, ``ceil(n/8)`` bytes,
entry ``8k+i`` in bit ``i`` of byte ``k``). The real-valued scores are training state and are not
saved: loading sets each kept entry's score to the init bound ``b`` and each dropped one to ``b / 2``,
which reproduces the mask exactly (a mask whose number of kept entries is not this adapter's ``k``
is refused) and lets resumed training move them again. The parameter report's "trainable" counts the
scores too (they are what trains); the stored size is the smaller number below.

On a MiniLM-size BERT (hidden 384, FFN 1536, 6 layers), defaults (adapter, m = 384 // 12 = 32):
prototype 2*384*32 + 32 + 384 = 24,992 floats; masks 6 * 2*384*32 = 147,456 bits (18,432 bytes);
stored 24,992 + 147,456 / 32 = 29,600 float-equivalents (118,400 bytes); trained (prototype + scores)
172,448. A plain Pfeiffer adapter of the same width stores 6 * 24,992 = 149,952 floats.

Defaults (source: the authors' code, github.com/ChaosCodes/ProPETL, ``propetl-roberta``:
``scripts/run_adapter.sh``, ``scripts/run_lora.sh``, ``adapters/modeling.py``, ``adapters/trainer.py``):
- adapter: Pfeiffer placement, reduction factor 12, ReLU, weights ~ N(0, 0.02^2) ("bert" init),
  biases zero; density 0.5; learning rate 1e-4 and mask learning rate 3e-3 (ratio 30); weight decay
  0.1 on prototype and scores alike (the optimizer's weight_decay is used for the scores).
- lora: r = 32, alpha = 48, A Kaiming-uniform (a = sqrt 5), B zero; density 0.1; learning rate 1e-4,
  mask learning rate 3e-2 (ratio 300).
- scores ~ U(-1/sqrt(f), 1/sqrt(f)), the reference's ``kaiming_uniform_(a=sqrt(5))`` of its mask
  tensors: f = the weight's output width for the adapter (the reference keeps those masks transposed),
  f = dim 1 for LoRA's A (in) and B (r).
- ``default_lr`` is 1e-4, the reference's (and paper's) prototype learning rate on RoBERTa-base.

Deviations, each with its reason:
- ``density`` is the fraction of entries each mask KEEPS. The reference's flag is called ``sparsity``
  but its top-k keeps that fraction (``GetSubnet``: the lowest ``int((1 - k) n)`` scores are zeroed), so
  the reference's ``--sparsity 0.5`` / ``0.1`` are ``density`` 0.5 / 0.1 here; the name says what it does.
- The adapter sits on the FFN output projection's output, before the block's residual add and
  LayerNorm (peftlab's Pfeiffer placement, as ``residual_adapter`` ``ffn_out``); the reference's
  Pfeiffer adapter reads ``LN(h + x)`` and re-applies the block's LayerNorm, which a wrapper of one
  projection cannot do.
- Several ``targets`` entries with the adapter form get one prototype each; the reference's Houlsby
  variant would share one between the attention and FFN sites.
- The prefix form (ProPrefix) and sharing one prototype across several tasks (each task its own masks,
  the paper's multi-task T5 setting) are not offered: here each adapter name has its own prototype.
- Not mergeable (the adapter form is nonlinear; the spec declares one capability for both forms).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import PeftConfig, is_positive_int
from ...core.errors import CheckpointError, PeftlabError
from ...core.hooks import TrainingHooks
from ...core.inject import wrap
from ...core.layer import DeltaModule, built_once_without_grad, linear_io
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, resolve_targets
from ..additive.sequential_adapter import ACTIVATIONS, factory_kwargs
from ..partial.threshold_mask import pack_bits, read_mask

_KEY = "propetl"  # this method's entry in PeftModel.model_adapters
FORMS = ("adapter", "lora")
# Per form: default targets, density, mask learning-rate ratio (the reference's scripts).
_FORM_DEFAULTS = {
    "adapter": (("@ffn_out",), 0.5, 30.0),   # mask lr 3e-3 / lr 1e-4
    "lora": (("@query", "@value"), 0.1, 300.0),  # mask lr 3e-2 / lr 1e-4
}
# The masked prototype tensors of each form, and the dim whose size sets their scores' init bound.
MASKED = {"adapter": {"down_weight": 0, "up_weight": 0}, "lora": {"lora_A": 1, "lora_B": 1}}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class ProPETLConfig(PeftConfig):
    """form: ``"adapter"`` (ProAdapter) or ``"lora"`` (ProLoRA); targets: one prototype per entry, shared
    by every module the entry selects (None: the form's, ``@ffn_out`` / ``@query``, ``@value``);
    density: fraction of each prototype tensor a layer's mask keeps (None: 0.5 adapter, 0.1 LoRA);
    mask_lr_ratio: the scores' learning rate over the prototype's (None: 30 adapter, 300 LoRA);
    reduction_factor / bottleneck, activation, init_scale: the adapter prototype (m = hidden //
    reduction_factor, or ``bottleneck``); r, alpha: the LoRA prototype (scaling alpha / r)."""

    form: str = "adapter"
    targets: tuple[str, ...] | str | None = None
    density: float | None = None
    mask_lr_ratio: float | None = None
    reduction_factor: float = 12
    bottleneck: int | None = None
    activation: str = "relu"
    init_scale: float = 0.02
    r: int = 32
    alpha: float = 48

    def validate(self) -> None:
        self._require(self.form in FORMS, "form", f"one of {FORMS} (the prefix form is not offered)")
        self._require(self.density is None or (_number(self.density) and 0 < self.density <= 1), "density",
                      "the fraction of prototype entries each layer keeps, in (0, 1], such as 0.5; or None")
        self._require(self.mask_lr_ratio is None or (_number(self.mask_lr_ratio) and self.mask_lr_ratio > 0),
                      "mask_lr_ratio", "a positive number such as 30 (scores at 30x the learning rate), or None")
        self._require(_number(self.reduction_factor) and self.reduction_factor >= 1, "reduction_factor",
                      "a number >= 1 such as 12 (m = hidden // reduction_factor)")
        self._require(self.bottleneck is None or (isinstance(self.bottleneck, int) and not isinstance(self.bottleneck, bool)
                                                  and self.bottleneck > 0),
                      "bottleneck", "a positive integer width m, or None (m from reduction_factor)")
        self._require(self.activation in ACTIVATIONS, "activation", f"one of {sorted(ACTIVATIONS)}")
        self._require(_number(self.init_scale) and self.init_scale > 0, "init_scale",
                      "a positive std for the adapter prototype's weights such as 0.02")
        self._require(is_positive_int(self.r), "r",
                      "a positive integer LoRA rank such as 32")
        self._require(_number(self.alpha) and self.alpha > 0, "alpha", "a positive LoRA alpha such as 48")

    def resolved(self) -> tuple[tuple[str, ...], float, float]:
        """(targets, density, mask_lr_ratio) with the form's defaults filled in."""
        targets, density, ratio = _FORM_DEFAULTS[self.form]
        given = (self.targets,) if isinstance(self.targets, str) else self.targets
        return (tuple(given) if given is not None else targets,
                self.density if self.density is not None else density,
                self.mask_lr_ratio if self.mask_lr_ratio is not None else ratio)


def kept_count(numel: int, density: float) -> int:
    """How many of ``numel`` entries a mask keeps: all but the reference's ``int((1 - density) n)``."""
    return numel - int((1 - density) * numel)


def binary_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """1 on the top ``density`` fraction of ``|scores|``, 0 elsewhere, with the straight-through
    gradient: ``|s| - |s|.detach()`` is 0 in the forward pass and passes ``g * sign(s)`` to ``s``."""
    magnitude = scores.abs()
    flat = torch.zeros(scores.numel(), dtype=scores.dtype, device=scores.device)
    flat[magnitude.detach().reshape(-1).topk(kept_count(scores.numel(), density)).indices] = 1
    return flat.view_as(scores) + (magnitude - magnitude.detach())


def score_bound(shape: torch.Size, fan_dim: int) -> float:
    return 1.0 / math.sqrt(shape[fan_dim])


class Prototype(nn.Module):
    """One prototype: the adapter's ``down_weight`` (m x d), ``down_bias``, ``up_weight`` (d x m),
    ``up_bias``, or LoRA's ``lora_A`` (r x in), ``lora_B`` (out x r)."""

    def __init__(self, form: str, d_in: int, d_out: int, config: ProPETLConfig, **kw: Any) -> None:
        super().__init__()
        if form == "adapter":
            m = config.bottleneck if config.bottleneck is not None else max(1, int(d_out // config.reduction_factor))
            self.down_weight = nn.Parameter(torch.empty(m, d_out, **kw))
            self.down_bias = nn.Parameter(torch.zeros(m, **kw))
            self.up_weight = nn.Parameter(torch.empty(d_out, m, **kw))
            self.up_bias = nn.Parameter(torch.zeros(d_out, **kw))
            with torch.no_grad():  # the reference's "bert" init
                nn.init.normal_(self.down_weight, std=config.init_scale)
                nn.init.normal_(self.up_weight, std=config.init_scale)
        else:
            self.lora_A = nn.Parameter(torch.empty(config.r, d_in, **kw))
            self.lora_B = nn.Parameter(torch.zeros(d_out, config.r, **kw))
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))


class ProPETLPrototypes(DeltaModule):
    """Model-level: each adapter's prototypes (one per ``targets`` entry), trained and shared by its layers."""

    adapter_attrs = ("propetl_prototype",)

    def __init__(self) -> None:
        super().__init__()
        self.propetl_prototype = nn.ModuleDict()


class ProPETLLayer(DeltaModule):
    """Wraps a Linear/Conv1D; for each live adapter, applies its prototype under this layer's masks."""

    adapter_attrs = ("propetl_scores",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.propetl_scores = nn.ModuleDict()
        self.prototypes: list[ProPETLPrototypes] = []  # a list: the model-level module is not our child

    def add(self, name: str, config: ProPETLConfig, prototypes: ProPETLPrototypes, group: int) -> None:
        _, density, _ = config.resolved()
        self.prototypes[:] = [prototypes]
        prototype = prototypes.propetl_prototype[name][group]
        scores = nn.ParameterDict()
        for key, fan_dim in MASKED[config.form].items():
            tensor = getattr(prototype, key)
            bound = score_bound(tensor.shape, fan_dim)
            scores[key] = nn.Parameter(torch.empty(tensor.shape, device=tensor.device, dtype=torch.float32)
                                       .uniform_(-bound, bound))
        self.propetl_scores[name] = scores
        scaling = config.alpha / config.r
        self.settings[name] = (config.form, group, density, scaling, ACTIVATIONS[config.activation])

    def prototype(self, name: str) -> Prototype:
        return self.prototypes[0].propetl_prototype[name][self.settings[name][1]]

    def masked(self, name: str, key: str) -> torch.Tensor:
        """The prototype tensor ``key`` under this layer's mask (straight-through to the scores)."""
        tensor, scores = getattr(self.prototype(name), key), self.propetl_scores[name][key]
        # At inference the top-k and the product are redone only when the prototype or scores change.
        return built_once_without_grad(self, (name, key), (tensor, scores), lambda: tensor * binary_mask(
            scores, self.settings[name][2]).to(tensor.dtype))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        for name in self.live_adapters():
            form, _, _, scaling, act = self.settings[name]
            prototype = self.prototype(name)
            dtype = next(prototype.parameters()).dtype
            if form == "adapter":
                hidden = act(F.linear(out.to(dtype), self.masked(name, "down_weight"), prototype.down_bias))
                out = out + F.linear(hidden, self.masked(name, "up_weight"), prototype.up_bias).to(out.dtype)
            else:
                low = F.linear(x.to(dtype), self.masked(name, "lora_A"))
                out = out + (scaling * F.linear(low, self.masked(name, "lora_B"))).to(out.dtype)
        return out

    # -- checkpoint: the masks as bits ------------------------------------------------------
    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.propetl_scores:
            return {}
        density = self.settings[name][2]
        return {f"propetl_mask.{key}.bits": pack_bits(binary_mask(scores.detach(), density).bool())
                for key, scores in self.propetl_scores[name].items()}

    def load_adapter_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        form, _, density = self.settings[name][:3]
        for key, scores in self.propetl_scores[name].items():
            label, keep = f"propetl_mask.{key}.bits", kept_count(scores.numel(), density)
            kept = read_mask(tensors[label].to(scores.device), scores.shape, label,
                             f"a mask over the prototype's {key}", "The mask does not match the prototype: was it "
                             "saved with another width, rank or model?")
            if int(kept.sum()) != keep:
                raise CheckpointError(f"{label}: the mask keeps {int(kept.sum())} of {scores.numel()} entries, but "
                                      f"density={density} keeps {keep}; load it with the density it was saved with")
            bound = score_bound(scores.shape, MASKED[form][key])
            with torch.no_grad():  # kept above dropped: the top-k of these scores is this mask
                scores.copy_(torch.where(kept, bound, bound / 2))


def _param_groups(model: Any, name: str, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """The scores train at ``mask_lr_ratio`` times the learning rate (the reference's mask learning rate)."""
    _, _, ratio = model.peft_configs[name].resolved()
    scores = [p for _, m in model._delta_modules() if isinstance(m, ProPETLLayer) and name in m.propetl_scores
              for p in m.propetl_scores[name].values()]
    return [{"params": scores, "lr": lr * ratio, "weight_decay": weight_decay}]


def attach(model: nn.Module, name: str, config: ProPETLConfig, host: Any = None) -> None:
    if host is None:
        raise PeftlabError("propetl keeps one shared prototype per adapter at model level: apply it with "
                           "get_peft_model(model, config) or PeftModel.add_adapter")
    targets, _, _ = config.resolved()
    groups: list[list[str]] = []
    shapes: list[tuple[int, int]] = []
    seen: dict[str, str] = {}
    for entry in targets:
        paths = resolve_targets(model, (entry,), allowed_types=LINEAR_TYPES)
        io = {path: linear_io(model.get_submodule(path))[:2] for path in paths}
        if len(set(io.values())) > 1:
            found = ", ".join(f"{p} {i[0]}->{i[1]}" for p, i in list(io.items())[:4])
            raise PeftlabError(f"ProPETLConfig.targets entry {entry!r} selects modules of different shapes ({found}); "
                               "one prototype is shared by every module an entry selects, so they must have one "
                               "shape: split the entry into one per shape")
        for path in paths:
            if path in seen:
                raise PeftlabError(f"ProPETLConfig.targets entries {seen[path]!r} and {entry!r} both select {path}; "
                                   "each module may use one prototype: make the entries select disjoint modules")
            seen[path] = entry
        groups.append(paths)
        shapes.append(next(iter(io.values())))
    kw = factory_kwargs(model.get_submodule(groups[0][0]))
    if _KEY not in host.model_adapters:
        host.model_adapters[_KEY] = ProPETLPrototypes()
    prototypes = host.model_adapters[_KEY]
    prototypes.propetl_prototype[name] = nn.ModuleList(Prototype(config.form, d_in, d_out, config, **kw)
                                                       for d_in, d_out in shapes)
    for group, paths in enumerate(groups):
        for path in paths:
            wrap(model, path, ProPETLLayer).add(name, config, prototypes, group)


SPEC = register(MethodSpec(
    name="propetl", family="unified", subcategory="shared prototype with per-layer masks", config_cls=ProPETLConfig,
    trains="one prototype adapter (or LoRA pair) shared by all layers, and per-layer binary masks over it "
           "(real scores, top-k, straight-through gradient); stored as the prototype plus mask bits",
    attach=attach, paper="Zeng, Zhang and Lu 2023, One Network, Many Masks: Towards More Parameter-Efficient "
                         "Transfer Learning",
    # The adapter prototype's "bert" init moves the output at once; its f is nonlinear.
    mergeable=False, identity_at_init=False, default_lr=1e-4,
    hooks=TrainingHooks(param_groups=_param_groups),
))
