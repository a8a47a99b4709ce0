"""Hybrid methods: one adapter made of several methods' parts.

A hybrid's config holds its parts' configs as fields (nested configs, saved as nested JSON objects
that carry their own ``"method"``). Attaching it attaches every part under the one adapter name, so
the parts' tensors train, save, load, disable and delete together as one adapter, and each part
stays the code of its own method. The hybrid's capabilities follow from its parts'.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from .config import PeftConfig
from .errors import PeftlabError
from .hooks import TrainingHooks
from .registry import MethodSpec, spec_for_config


def parts_of(config: PeftConfig) -> list[PeftConfig]:
    """The part configs of a hybrid config, in field order."""
    return [getattr(config, f.name) for f in dataclasses.fields(config) if isinstance(getattr(config, f.name), PeftConfig)]


def validate_parts(config: PeftConfig, min_parts: int = 2) -> None:
    """A hybrid holds at least ``min_parts`` parts of different methods (a searched combination may
    keep one: its unused parts are ``None``); parts keep no head of their own (the hybrid's
    ``modules_to_save`` does) and declare no training hooks (their hooks read the adapter's config,
    which is the hybrid's)."""
    name = type(config).__name__
    fields = [f.name for f in dataclasses.fields(config) if isinstance(getattr(config, f.name), PeftConfig)]
    methods = [spec_for_config(getattr(config, f)).name for f in fields]
    if len(fields) < min_parts or len(set(methods)) != len(methods):
        need = "one part" if min_parts == 1 else f"parts of at least {min_parts} different methods"
        raise PeftlabError(f"{name}: expected {need}, got {methods or 'none'}")
    for field in fields:
        part = getattr(config, field)
        if part.modules_to_save:
            raise PeftlabError(f"{name}.{field}.modules_to_save={part.modules_to_save!r}: set modules_to_save on "
                               f"the {name} itself, once for the whole adapter")
        if spec_for_config(part).hooks != TrainingHooks():
            raise PeftlabError(f"{name}.{field}: {spec_for_config(part).name} acts during training (hooks), "
                               "which hybrids do not support yet")


def attach_parts(model: nn.Module, name: str, config: PeftConfig, host: Any = None) -> None:
    """Attach each part's method under adapter ``name`` (the ``attach`` of a hybrid's spec)."""
    for part in parts_of(config):
        spec_for_config(part).attach(model, name, part, host)


def part_capabilities(*specs: MethodSpec) -> dict[str, Any]:
    """MethodSpec fields a hybrid of ``specs`` has: what all parts can do, and what any part changes."""
    return {
        "mergeable": all(s.mergeable for s in specs),
        "identity_at_init": all(s.identity_at_init for s in specs),
        "merge_tolerance": max(s.merge_tolerance for s in specs),
        "changes_sequence_length": any(s.changes_sequence_length for s in specs),
        "supports_mixed_batch": all(s.supports_mixed_batch for s in specs),
    }
