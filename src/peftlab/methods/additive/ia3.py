"""(IA)^3: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al., 2022,
"Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning").

Learned vectors rescale activations element-wise; nothing else changes::

    k = l_k * (W_k x + b_k)                  l_k: (d_k,)   keys
    v = l_v * (W_v x + b_v)                  l_v: (d_v,)   values
    y = W_out (l_ff * act(W_in x)) + b_out    l_ff: (d_ff,) FFN inner activations

Every vector starts at ones, so the model is unchanged at init. A targeted module is scaled at its
output (``k``, ``v``) unless it is also selected by ``feedforward``, in which case its *input* is
scaled (the FFN output projection, whose input is the FFN's inner activation).

Merging folds the vector into the weight: output scaling multiplies the rows of ``W`` (out x in)
and the bias; input scaling multiplies the columns of ``W`` and leaves the bias alone. Unmerging
divides again, so it needs every entry of the vector non-zero.

Fused projections: GPT-2's ``c_attn`` computes ``[q | k | v]`` in one ``Conv1D``. With
``split_fused_qkv=True`` (default) the '@key'/'@value' sites scale only their third of that output,
so the learned vector holds exactly ``d_k + d_v`` entries, as in the paper. HF peft can only scale
the whole ``c_attn`` output (queries too); such a checkpoint (vector of ``3 d``) loads into
peftlab with ``split_fused_qkv=False`` or targets naming ``c_attn``, and a split peftlab checkpoint
is refused by peft with a shape error rather than loaded wrongly.

Checkpoint layout (HF peft's): ``<module path>.ia3_l`` of shape (out, 1) for output scaling and
(1, in) for input scaling. Supports ``nn.Linear`` and GPT-2 ``Conv1D`` (weight stored in x out).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
from torch import nn

from ...core.config import PeftConfig, peft_names
from ...core.errors import PeftlabError
from ...core.inject import wrap
from ...core.layer import DeltaModule, base_of, linear_io
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, architecture_of, resolve_targets

_DEFAULT_TARGETS = ("@key", "@value", "@ffn_out")
# Order of the three blocks in a fused q/k/v projection's output (GPT-2: q, k, v, equal widths).
_QKV_ROLES = ("query", "key", "value")


@peft_names(target_modules="targets", feedforward_modules="feedforward")
@dataclasses.dataclass(frozen=True)
class IA3Config(PeftConfig):
    """targets: modules whose activations are rescaled (default keys, values and the FFN output
    projection); feedforward: which of the targets are rescaled at their input instead of their
    output (default the FFN output projection), a subset of targets; split_fused_qkv: on a fused
    q/k/v projection (GPT-2 ``c_attn``) scale only the blocks the '@query'/'@key'/'@value' sites
    name, not the whole output (False reproduces HF peft's whole-output scaling)."""

    targets: tuple[str, ...] | str | None = _DEFAULT_TARGETS
    feedforward: tuple[str, ...] | str = ("@ffn_out",)
    split_fused_qkv: bool = True

    def validate(self) -> None:
        self._require(self.targets is None or len(self.targets) > 0, "targets",
                      "at least one module name or '@' site, e.g. ('@key', '@value', '@ffn_out')")
        self._require(isinstance(self.feedforward, (str, tuple)), "feedforward",
                      "a list of module names/'@' sites (a subset of targets), a regex string, or ()")
        self._require(isinstance(self.split_fused_qkv, bool), "split_fused_qkv", "True or False")

    def peft_fields(self) -> dict[str, Any]:
        # target_modules and feedforward_modules are rewritten with resolved paths when saving.
        listed = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
        return {"peft_type": "IA3", "target_modules": listed(self.targets),
                "feedforward_modules": listed(self.feedforward), "fan_in_fan_out": False,
                "init_ia3_weights": True, "inference_mode": True, "exclude_modules": None,
                "modules_to_save": list(self.modules_to_save) or None}

    def peft_fields_for(self, model: nn.Module, adapter_name: str) -> dict[str, Any]:
        # peft requires feedforward_modules to be a subset of target_modules, which the saver
        # writes as resolved module paths: write the feedforward ones the same way.
        feedforward, transposed, split = [], False, False
        for path, module in model.named_modules():
            if isinstance(module, IA3Layer) and adapter_name in module.ia3_l:
                role = module.settings[adapter_name]
                if role.feedforward:
                    feedforward.append(path)
                transposed |= module.transposed
                split |= role.segments is not None
        fields: dict[str, Any] = {"feedforward_modules": feedforward, "fan_in_fan_out": transposed}
        if split:
            # peft has no vector over part of a fused projection (it refuses these shapes), so keep
            # peftlab's own fields too: the file then reads back with the same q/k/v blocks.
            data = self.to_dict()
            fields.update({k: data[k] for k in [f.name for f in dataclasses.fields(self)] + ["method"]})
        return fields

    @classmethod
    def from_peft(cls, data: dict[str, Any]) -> "IA3Config":
        if data.get("exclude_modules"):
            raise PeftlabError("this peft (IA)^3 config uses exclude_modules, which peftlab's IA3Config does "
                               "not read; list the wanted modules in target_modules instead")
        tupled = lambda v: tuple(v) if isinstance(v, (list, tuple, set)) else v  # noqa: E731
        targets = data.get("target_modules")
        return cls(targets=_DEFAULT_TARGETS if targets is None else tupled(targets),
                   feedforward=tupled(data.get("feedforward_modules") or ()),
                   split_fused_qkv=False,  # peft scales a fused projection's whole output
                   modules_to_save=tuple(data.get("modules_to_save") or ()))


class _Role(NamedTuple):
    """How one adapter scales one module: at its input (feedforward) or output; ``segments`` are
    the [start, stop) output ranges scaled on a fused projection (None: all of it)."""

    feedforward: bool
    segments: tuple[tuple[int, int], ...] | None


class IA3Layer(DeltaModule):
    """Wraps a Linear or Conv1D; each adapter holds one scaling vector ``ia3_l[name]``."""

    adapter_attrs = ("ia3_l",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ia3_l = nn.ParameterDict()
        self.in_features, self.out_features, self.transposed = linear_io(base_layer)

    def add(self, name: str, role: _Role) -> None:
        weight = base_of(self.base_layer).weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        if role.feedforward:
            shape: tuple[int, int] = (1, self.in_features)
        else:
            rows = self.out_features if role.segments is None else sum(b - a for a, b in role.segments)
            shape = (rows, 1)
        self.ia3_l[name] = nn.Parameter(torch.ones(shape, dtype=dtype, device=weight.device))
        self.settings[name] = role

    def scale_vector(self, name: str) -> torch.Tensor:
        """The full-length scale of adapter ``name`` (in_features or out_features,), ones where a
        fused projection's unscaled blocks sit."""
        vec = self.ia3_l[name].view(-1)
        segments = self.settings[name].segments
        if segments is None:
            return vec
        parts, cursor, used = [], 0, 0
        for start, stop in segments:
            if start > cursor:
                parts.append(vec.new_ones(start - cursor))
            parts.append(vec[used:used + stop - start])
            used, cursor = used + stop - start, stop
        if cursor < self.out_features:
            parts.append(vec.new_ones(self.out_features - cursor))
        return torch.cat(parts)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        live = self.live_adapters()
        if not live:
            return self.base_layer(x, *args, **kwargs)
        in_scale: torch.Tensor | None = None
        out_scale: torch.Tensor | None = None
        for name in live:
            vec = self.scale_vector(name)
            if self.settings[name].feedforward:
                in_scale = vec if in_scale is None else in_scale * vec
            else:
                out_scale = vec if out_scale is None else out_scale * vec
        if in_scale is not None:
            x = x * in_scale.to(x.dtype)
        out = self.base_layer(x, *args, **kwargs)
        if out_scale is not None:
            out = out * out_scale.to(out.dtype)
        return out

    # -- merging -------------------------------------------------------------------------
    def _fold(self, name: str, inverse: bool) -> None:
        base = base_of(self.base_layer)
        vec = self.scale_vector(name).detach()
        feedforward = self.settings[name].feedforward
        if inverse and bool((vec == 0).any()):
            raise PeftlabError(f"(IA)^3 adapter {name!r} has zero scales, so merging erased those weights; "
                               "it cannot be unmerged. Reload the base model instead.")
        # Output scaling touches W's output axis: rows of a Linear weight, columns of a Conv1D one.
        along_rows = feedforward == self.transposed
        factor = vec[:, None] if along_rows else vec[None, :]
        with torch.no_grad():
            if inverse:
                base.weight.div_(factor.to(base.weight.dtype))
            else:
                base.weight.mul_(factor.to(base.weight.dtype))
            if not feedforward and base.bias is not None:
                bias_factor = vec.to(base.bias.dtype)
                base.bias.div_(bias_factor) if inverse else base.bias.mul_(bias_factor)

    def merge(self, name: str) -> None:
        self._fold(name, inverse=False)
        self.merged_adapters.append(name)

    def unmerge(self, name: str) -> None:
        self._fold(name, inverse=True)
        self.merged_adapters.remove(name)


def _plan(model: nn.Module, config: IA3Config) -> dict[str, _Role]:
    """Module path -> how the adapter scales it, in model order."""
    targets = _DEFAULT_TARGETS if config.targets is None else config.targets
    paths = resolve_targets(model, targets, allowed_types=LINEAR_TYPES)
    # Paths reached only through '@query'/'@key'/'@value' on a fused projection get those blocks.
    roles: dict[str, set[str]] = {}
    whole: set[str] = set(paths)
    entries = targets if isinstance(targets, tuple) else ()
    role_entries = [e for e in entries if e.startswith("@") and e[1:] in _QKV_ROLES]
    if config.split_fused_qkv and role_entries and architecture_of(model).fused_qkv:
        whole = set()
        for entry in targets:
            for path in resolve_targets(model, (entry,)):
                if entry in role_entries:
                    roles.setdefault(path, set()).add(entry[1:])
                else:
                    whole.add(path)
    try:
        feedforward = set(resolve_targets(model, config.feedforward)) if config.feedforward else set()
    except PeftlabError as err:
        raise PeftlabError(f"IA3Config.feedforward={config.feedforward!r}: {err} (pass feedforward=() when no "
                           "target is scaled at its input)") from None
    stray = [p for p in feedforward if p not in paths]
    if stray:
        raise PeftlabError(f"IA3Config.feedforward={config.feedforward!r} selects {sorted(stray)[:3]}, which targets "
                           f"{targets!r} does not: feedforward names which targets are scaled at their input, "
                           "so it must be a subset. Add those modules to targets or drop them from feedforward.")
    plan: dict[str, _Role] = {}
    for path in paths:
        if path in whole or roles.get(path, set()) == set(_QKV_ROLES):
            plan[path] = _Role(path in feedforward, None)
            continue
        if path in feedforward:
            raise PeftlabError(f"feedforward selects {path!r}, a fused q/k/v projection targeted by role "
                               f"({sorted(roles[path])}); its input feeds all three, so input scaling cannot "
                               "be limited to one role. Drop it from feedforward.")
        plan[path] = _Role(False, _fused_segments(model, path, roles[path]))
    return plan


def _fused_segments(model: nn.Module, path: str, chosen: set[str]) -> tuple[tuple[int, int], ...]:
    base = base_of(model.get_submodule(path))
    out = base.weight.shape[1] if not isinstance(base, nn.Linear) else base.out_features
    if out % len(_QKV_ROLES):
        raise PeftlabError(f"{path!r} is a fused q/k/v projection with {out} outputs, not divisible into "
                           "three equal blocks; pass split_fused_qkv=False to scale its whole output")
    width = out // len(_QKV_ROLES)
    segments: list[tuple[int, int]] = []
    for i, role in enumerate(_QKV_ROLES):
        if role not in chosen:
            continue
        if segments and segments[-1][1] == i * width:  # adjacent blocks form one range
            segments[-1] = (segments[-1][0], (i + 1) * width)
        else:
            segments.append((i * width, (i + 1) * width))
    return tuple(segments)


def attach(model: nn.Module, name: str, config: IA3Config, host: Any = None) -> None:
    for path, role in _plan(model, config).items():
        wrap(model, path, IA3Layer).add(name, role)


SPEC = register(MethodSpec(
    name="ia3", title="(IA)³", family="additive", subcategory="rescaling", config_cls=IA3Config,
    trains="vectors rescaling keys, values and FFN inner activations", attach=attach,
    paper="Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning",
    mergeable=True, merge_tolerance=1e-5, peft_type="IA3", default_lr=3e-3,
))
