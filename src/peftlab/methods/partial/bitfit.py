"""BitFit: only the bias terms train (Ben Zaken et al., 2022, "BitFit: Simple Parameter-efficient
Fine-tuning for Transformer-based Masked Language-models").

Each targeted module keeps its frozen bias ``b0`` and gets a per-adapter delta ``db`` (zero at init)::

    Linear / Conv1D:  h = W x + (b0 + db)
    LayerNorm:        h = gamma * (x - mean) / sqrt(var + eps) + (b0 + db)

Training ``db`` from zero is training ``b`` directly: ``b = b0 + db`` gives ``dL/d(db) = dL/db``,
so every optimizer step moves ``db`` exactly as it would move ``b`` (one difference: weight decay
pulls ``db`` toward 0, i.e. ``b`` toward ``b0``, not toward 0). Holding the delta instead of
unfreezing ``b`` lets several named adapters share one model, lets ``disable``/``delete`` return to
``b0``, and keeps only ``db`` in the checkpoint. Merging writes ``b0 + db`` into the bias: the same
sum the forward pass uses, so the merged model computes the same numbers; unmerging restores the
saved ``b0`` bit for bit.

Default targets (``"all-biases"``): every ``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.LayerNorm`` that
has a bias, outside the output head and ``modules_to_save`` (the paper trains all biases, LayerNorm's
included). Models without biases (Llama, T5) cannot use BitFit; they get an error suggesting LoRA
or (IA)^3.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import PeftConfig
from ...core.errors import PeftlabError
from ...core.inject import wrap
from ...core.layer import DeltaModule, base_of
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, resolve_modules_to_save, resolve_targets

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None  # type: ignore[assignment,misc]

ALL_BIASES = "all-biases"
# Modules whose bias is added last, along the last axis, so b0 + db can stand in for b0.
BIAS_TYPES: tuple[type, ...] = LINEAR_TYPES + (nn.LayerNorm,)


@dataclasses.dataclass(frozen=True)
class BitFitConfig(PeftConfig):
    """targets: ``"all-biases"`` (every Linear/Conv1D/LayerNorm bias outside the output head), or
    module names/'@' sites/regex as for any method, each of which must have a bias; an
    ``"all-biases"`` entry may be combined with names (``("all-biases", "classifier.dense")``)."""

    targets: tuple[str, ...] | str | None = ALL_BIASES

    def validate(self) -> None:
        self._require(self.targets is None or len(self.targets) > 0, "targets",
                      f"{ALL_BIASES!r}, or module names/'@' sites whose modules have biases")


class BitFitLayer(DeltaModule):
    """Wraps a Linear, Conv1D or LayerNorm; each adapter holds a bias delta ``bias_delta[name]``."""

    adapter_attrs = ("bias_delta",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.bias_delta = nn.ParameterDict()
        # The original bias while adapters are merged into it (not saved: the base model's own).
        self.register_buffer("unmerged_bias", None, persistent=False)

    def add(self, name: str, config: Any = None) -> None:
        self.bias_delta[name] = nn.Parameter(torch.zeros_like(base_of(self.base_layer).bias))

    def effective_bias(self, names: list[str], start: torch.Tensor | None = None) -> torch.Tensor:
        """``b0 + sum(db)`` over ``names``, summed in the same order wherever it is computed."""
        bias = base_of(self.base_layer).bias if start is None else start
        for name in names:
            bias = bias + self.bias_delta[name]
        return bias

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        live = self.live_adapters()
        if not live:
            return self.base_layer(x, *args, **kwargs)
        layer = self.base_layer
        kind = type(layer)
        # Unwrapped standard layers: pass b0 + db straight to the kernel, so the delta costs one
        # vector add instead of another pass over the activations.
        if not args and not kwargs:
            if kind is nn.Linear:
                return F.linear(x, layer.weight, self.effective_bias(live))
            if kind is nn.LayerNorm:
                return F.layer_norm(x, layer.normalized_shape, layer.weight, self.effective_bias(live), layer.eps)
            if Conv1D is not None and kind is Conv1D:
                out = torch.addmm(self.effective_bias(live), x.reshape(-1, x.shape[-1]), layer.weight)
                return out.view(*x.shape[:-1], layer.nf)
        # Anything else (another method's wrapper inside, a subclass): the bias is added last.
        out = layer(x, *args, **kwargs)
        for name in live:
            out = out + self.bias_delta[name]
        return out

    # Merged biases are recomputed from the saved b0, so merge/unmerge in any order is exact.
    def merge(self, name: str) -> None:
        bias = base_of(self.base_layer).bias
        with torch.no_grad():
            if self.unmerged_bias is None:
                self.unmerged_bias = bias.detach().clone()
            bias.copy_(self.effective_bias(self.merged_adapters + [name], self.unmerged_bias))
        self.merged_adapters.append(name)

    def unmerge(self, name: str) -> None:
        self.merged_adapters.remove(name)
        bias = base_of(self.base_layer).bias
        with torch.no_grad():
            bias.copy_(self.effective_bias(self.merged_adapters, self.unmerged_bias))
        if not self.merged_adapters:
            self.unmerged_bias = None


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(base_of(module), "bias", None), nn.Parameter)


def _all_biases(model: nn.Module, everything: list[str], modules_to_save: tuple[str, ...]) -> list[str]:
    """Every Linear/Conv1D/LayerNorm with a bias, except output heads and modules trained in full."""
    try:
        non_head_linear = set(resolve_targets(model, "all-linear"))
    except PeftlabError:  # no linear layer outside the head at all
        non_head_linear = set()
    saved = resolve_modules_to_save(model, modules_to_save) if modules_to_save else []
    chosen = []
    for path in everything:
        module = base_of(model.get_submodule(path))
        if any(path == s or path.startswith(s + ".") for s in saved) or not _has_bias(module):
            continue
        if isinstance(module, nn.LayerNorm) or path in non_head_linear:
            chosen.append(path)
    return chosen


def _targets(model: nn.Module, config: BitFitConfig) -> list[str]:
    everything = resolve_targets(model, ("re:.+",))  # module paths in model order; wrappers count as what they wrap
    targets = ALL_BIASES if config.targets is None else config.targets
    entries = (targets,) if targets == ALL_BIASES else targets
    if isinstance(entries, str):  # a whole-config regex
        named = resolve_targets(model, entries, allowed_types=BIAS_TYPES)
    else:
        named = resolve_targets(model, tuple(e for e in entries if e != ALL_BIASES), allowed_types=BIAS_TYPES)
    no_bias = [p for p in named if not _has_bias(model.get_submodule(p))]
    if no_bias:
        raise PeftlabError(f"BitFit targets {no_bias[:3]}{'...' if len(no_bias) > 3 else ''} have no bias "
                           "(bias=None); BitFit trains bias terms only. Target modules that have biases.")
    found = set(named)
    if isinstance(entries, tuple) and ALL_BIASES in entries:
        found |= set(_all_biases(model, everything, tuple(config.modules_to_save)))
    if not found:
        raise PeftlabError(
            f"{type(model).__name__} has no bias terms in its Linear/Conv1D/LayerNorm modules (e.g. Llama-style "
            "models: attention_bias=False, mlp_bias=False, RMSNorm without bias), and BitFit trains only biases. "
            "Use a method that does not need biases, such as LoRA (LoraConfig) or (IA)^3 (IA3Config).")
    return [p for p in everything if p in found]


def attach(model: nn.Module, name: str, config: BitFitConfig, host: Any = None) -> None:
    for path in _targets(model, config):
        wrap(model, path, BitFitLayer).add(name, config)


SPEC = register(MethodSpec(
    name="bitfit", title="BitFit", family="partial", subcategory="bias update", config_cls=BitFitConfig,
    trains="bias terms (as per-adapter deltas)", attach=attach,
    paper="Ben Zaken et al. 2022, BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based "
          "Masked Language-models",
    mergeable=True, merge_tolerance=1e-6, default_lr=1e-3,
))
