"""DeltaModule: the one base class for modules that hold adapter weights.

A delta module keeps each adapter's tensors in ``nn.ModuleDict``/``nn.ParameterDict`` attributes
keyed by adapter name, and declares those attributes in ``adapter_attrs``. Freezing, saving,
loading and deleting read that declaration — never a substring of a parameter name. Wrappers
keep the module they wrap as ``base_layer``.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import nn

from .errors import PeftlabError


class DeltaModule(nn.Module):
    # Containers (keyed by adapter name) of an adapter's trained tensors.
    adapter_attrs: ClassVar[tuple[str, ...]] = ()
    # Containers of tensors that belong to an adapter but never train (masks, shared random
    # projections, statistics): saved, loaded strictly and deleted with it, never given to an optimizer.
    frozen_attrs: ClassVar[tuple[str, ...]] = ()
    # Attributes (of the two above) holding a sparse difference to a base tensor: the checkpoint
    # keeps only its non-zero entries, as ``<attr>.indices`` (flat, int64) and ``<attr>.values``.
    sparse_attrs: ClassVar[tuple[str, ...]] = ()
    # During ``PeftModel.forward(..., adapter_names=...)``: the adapter of each example (dim 0);
    # modules of methods that declare ``supports_mixed_batch`` read it. ``None`` otherwise.
    mixed_batch: list[str] | None = None

    def __init__(self) -> None:
        super().__init__()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # Per-adapter settings that are not tensors (scaling, dropout probability, ...).
        self.settings: dict[str, Any] = {}

    @property
    def weight(self) -> torch.Tensor:
        # Model code reads the weight of a module it calls (T5's FFN checks ``self.wo.weight.dtype``);
        # a wrapper answers with the weight of the module it wraps.
        if "base_layer" not in self._modules:
            raise AttributeError(f"{type(self).__name__} wraps no module, so it has no weight")
        return base_of(self).weight

    # -- which adapters this module holds ------------------------------------------------
    def adapter_names(self) -> list[str]:
        names: dict[str, None] = {}
        for attr in self.adapter_attrs + self.frozen_attrs:
            for key in getattr(self, attr).keys():
                names[key] = None
        return list(names)

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapter_names()]

    def live_adapters(self) -> list[str]:
        """Adapters whose delta must be computed in this forward pass (active, not merged)."""
        if self.disabled:
            return []
        return [n for n in self.active_adapters if n not in self.merged_adapters]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if name not in container:
                continue
            item = container[name]
            params.extend(item.parameters() if isinstance(item, nn.Module) else [item])
        return params

    def trainable_entries(self, name: str) -> int:
        """How many scalars of adapter ``name`` can change in training (a masked method counts its
        mask, not the dense tensor that holds the masked entries)."""
        return sum(p.numel() for p in self.adapter_parameters(name))

    def dense_entries(self, name: str) -> int:
        """For a method that trains a chosen subset of dense tensors: how many entries it chooses
        from (reported beside ``trainable_entries``); 0 for the others."""
        return 0

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge(name)
        for attr in self.adapter_attrs + self.frozen_attrs:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        self.settings.pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    # -- checkpoint form -----------------------------------------------------------------
    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """Tensors of adapter ``name``, keyed relative to this module, without the adapter name
        (the layout HF peft writes: ``lora_A.weight``, ``ia3_l``)."""
        state: dict[str, torch.Tensor] = {}
        for attr in self.adapter_attrs + self.frozen_attrs:
            container = getattr(self, attr)
            if name not in container:
                continue
            item = container[name]
            if isinstance(item, nn.Module):
                state.update({f"{attr}.{k}": v for k, v in item.state_dict().items()})
            elif attr in self.sparse_attrs:
                flat = item.detach().reshape(-1)
                indices = flat.nonzero().reshape(-1)
                state[f"{attr}.indices"], state[f"{attr}.values"] = indices, flat[indices]
            else:
                state[attr] = item
        return state

    def variable_length_keys(self, name: str) -> set[str]:
        """Keys of ``adapter_state`` whose length depends on the trained values (sparse entries)."""
        return {f"{attr}.{part}" for attr in self.sparse_attrs if name in getattr(self, attr)
                for part in ("indices", "values")}

    def load_adapter_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy checkpoint tensors in; the caller has already checked keys and (fixed) shapes."""
        current = self.adapter_state(name)
        with torch.no_grad():
            for attr in self.sparse_attrs:
                if name in getattr(self, attr):
                    _scatter(getattr(self, attr)[name], tensors[f"{attr}.indices"], tensors[f"{attr}.values"], attr)
            for key, value in tensors.items():
                if key not in self.variable_length_keys(name):
                    current[key].copy_(value.to(dtype=current[key].dtype, device=current[key].device))

    def release(self, model: nn.Module) -> None:
        """Undo anything this module hooked outside its own tree (model-level modules override)."""

    # -- merging: a wrapper whose update is a change of the wrapped weight defines
    # ``delta_weight(name)`` (laid out like that weight) and merges by adding it ------------
    def merge(self, name: str) -> None:
        self._add_delta(name, 1)
        self.merged_adapters.append(name)

    def unmerge(self, name: str) -> None:
        self._add_delta(name, -1)
        self.merged_adapters.remove(name)

    def _add_delta(self, name: str, sign: int) -> None:
        delta_weight = getattr(self, "delta_weight", None)
        if delta_weight is None or "base_layer" not in self._modules:
            raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights")
        weight = base_of(self.base_layer).weight
        with torch.no_grad():
            weight.add_(delta_weight(name).to(weight.dtype), alpha=sign)


class TrainableCopy(DeltaModule):
    """``modules_to_save``: a full trainable copy of a module (a new task head) per adapter."""

    adapter_attrs = ("copies",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.copies = nn.ModuleDict()

    def add(self, name: str, config: Any = None) -> None:
        import copy

        # The copy starts from the base module, so a head keeps its initialisation.
        self.copies[name] = copy.deepcopy(self.base_layer)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        live = self.live_adapters()
        if self.mixed_batch is not None and live:
            return self._mixed_forward(live, *args, **kwargs)
        module = self.copies[live[-1]] if live else self.base_layer
        return module(*args, **kwargs)

    def _mixed_forward(self, live: list[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Each example goes through its own adapter's copy (or the base module), then back in order.
        names = self.mixed_batch or []
        if x.shape[0] != len(names):
            raise PeftlabError(f"adapter_names has {len(names)} entries but the batch has {x.shape[0]} examples")
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name if name in live else "", []).append(i)
        outs, order = [], []
        for name, rows in groups.items():
            module = self.copies[name] if name else self.base_layer
            outs.append(module(x[rows], *args, **kwargs))
            order += rows
        return torch.cat(outs)[torch.tensor(order, device=x.device).argsort()]

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.copies[name].state_dict()) if name in self.copies else {}

    def merge(self, name: str) -> None:
        # Merging a full copy means the base module takes the copy's weights; keep the originals.
        self._originals = {k: v.detach().clone() for k, v in self.base_layer.state_dict().items()}
        self.base_layer.load_state_dict(self.copies[name].state_dict())
        self.merged_adapters.append(name)

    def unmerge(self, name: str) -> None:
        self.base_layer.load_state_dict(self._originals)
        self.merged_adapters.remove(name)


class BufferDict(nn.Module):
    """Frozen per-adapter tensors keyed by adapter name, as buffers: they follow ``.to()`` and
    dtype casts of floating tensors like parameters do, but are never parameters."""

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        self.register_buffer(name, tensor)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]  # type: ignore[return-value]

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]

    def __contains__(self, name: object) -> bool:
        return name in self._buffers

    def keys(self) -> Any:
        return self._buffers.keys()


def _scatter(dense: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, attr: str) -> None:
    """Write a checkpoint's sparse entries into ``dense`` (zero elsewhere), checking them first."""
    from .errors import CheckpointError

    if indices.dim() != 1 or values.shape != indices.shape:
        raise CheckpointError(f"{attr}: indices {tuple(indices.shape)} and values {tuple(values.shape)} must be "
                              "1-D and of equal length")
    if indices.is_floating_point() or (indices.numel() and (indices.min() < 0 or indices.max() >= dense.numel())):
        raise CheckpointError(f"{attr}: indices must be integers in [0, {dense.numel()}) for a tensor of shape "
                              f"{tuple(dense.shape)}; was it saved for another model?")
    dense.zero_()
    dense.view(-1)[indices.to(dense.device, torch.long)] = values.to(dense.dtype)


def linear_io(module: nn.Module) -> tuple[int, int, bool]:
    """(in, out, transposed) of the ``nn.Linear`` or GPT-2 ``Conv1D`` under any wrappers; Conv1D
    keeps its weight as in x out (``transposed``), Linear as out x in."""
    base = base_of(module)
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, False
    in_features, out_features = base.weight.shape
    return int(in_features), int(out_features), True


def base_of(module: nn.Module) -> nn.Module:
    """The original module under any stack of wrappers."""
    while isinstance(module, DeltaModule) and hasattr(module, "base_layer"):
        module = module.base_layer
    return module



def built_once_without_grad(owner: nn.Module, key: Any, sources: tuple[torch.Tensor, ...],
                            build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``build()``, kept on ``owner`` and reused while no gradient is wanted and ``sources`` are unchanged
    (same storage, same in-place version). For a weight a method rebuilds from its parameters on every
    call (masked, scattered): at inference it then costs what a stored weight costs. With gradients on
    (training) or under ``torch.compile`` it is built every call, as before."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return build()
    cache = owner.__dict__.setdefault("_built_without_grad", {})
    stamp = tuple((t.data_ptr(), t._version) for t in sources)
    hit = cache.get(key)
    if hit is None or hit[0] != stamp:
        hit = cache[key] = (stamp, build())
    return hit[1]
