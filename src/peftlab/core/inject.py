"""Putting wrappers into a model and taking them out again."""
from __future__ import annotations

from typing import Callable, Iterator, TypeVar

from torch import nn

from .layer import DeltaModule

W = TypeVar("W", bound=DeltaModule)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


def wrap(root: nn.Module, path: str, wrapper_cls: type[W], make: Callable[[nn.Module], W] | None = None) -> W:
    """The ``wrapper_cls`` around module ``path``, created (outermost) if the module has none yet.

    A module already wrapped by another method keeps that wrapper inside the new one, so methods
    stack (LoRA inside (IA)^3, say) without knowing about each other.
    """
    module = root.get_submodule(path)
    inner = module
    while isinstance(inner, DeltaModule) and hasattr(inner, "base_layer"):
        if isinstance(inner, wrapper_cls):
            return inner
        inner = inner.base_layer
    wrapper = make(module) if make is not None else wrapper_cls(module)  # type: ignore[call-arg]
    set_submodule(root, path, wrapper)
    return wrapper


def delta_modules(root: nn.Module) -> Iterator[tuple[str, DeltaModule]]:
    for name, module in root.named_modules():
        if isinstance(module, DeltaModule):
            yield name, module


def remove_empty_wrappers(root: nn.Module) -> None:
    """Replace every wrapper that holds no adapter any more by the module it wraps."""
    while True:
        empty = [(n, m) for n, m in delta_modules(root) if hasattr(m, "base_layer") and not m.adapter_names()]
        if not empty:
            return
        name, module = empty[0]
        set_submodule(root, name, module.base_layer)


def unwrap_all(root: nn.Module) -> None:
    """Replace every wrapper by the module it wraps (after merging, or to unload)."""
    while True:
        wrappers = [(n, m) for n, m in delta_modules(root) if hasattr(m, "base_layer")]
        if not wrappers:
            return
        name, module = wrappers[0]
        set_submodule(root, name, module.base_layer)
