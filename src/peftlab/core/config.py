"""Base class for method configs: frozen dataclasses, validated on construction, JSON round trip.

A config file carries the method name (``"method"``) so it can be read back without knowing the
method in advance. Methods that HF ``peft`` also has add ``peft``'s own keys (``peft_fields``) so
that ``peft`` reads the same file, and read ``peft``'s files through ``from_peft``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

from .errors import PeftlabError


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """Fields every method has.

    targets: which modules the method touches (see :mod:`peftlab.core.targets`); ``None`` means the
        method's per-architecture default.
    modules_to_save: modules trained in full beside the method (a new classification head).
    """

    method: ClassVar[str] = ""
    # Where the base model's tensors sit in a checkpoint; peft uses a different root for soft prompts.
    checkpoint_model_prefix: ClassVar[str] = "base_model.model."

    targets: tuple[str, ...] | str | None = None
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Accept lists from users and JSON, store tuples so configs stay hashable and frozen.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        if self.targets is not None and not isinstance(self.targets, (str, tuple)):
            raise PeftlabError(f"targets={self.targets!r}: expected a list of module names/patterns, "
                               "a regex string, 'all-linear' or None for the method's default")
        self.validate()

    def validate(self) -> None:
        """Override to check method-specific fields; raise PeftlabError with what/expected/fix."""

    # -- helpers for validate() -------------------------------------------------------------
    def _require(self, ok: bool, field: str, expected: str) -> None:
        if not ok:
            raise PeftlabError(f"{type(self).__name__}.{field}={getattr(self, field)!r} is invalid: "
                               f"expected {expected}.")

    # -- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = self.peft_fields()
        out.update({f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)})
        out["method"] = self.method
        return out

    def peft_fields(self) -> dict[str, Any]:
        """Keys HF peft needs to read this file (only for methods peft also has)."""
        return {}

    def peft_fields_for(self, model: Any, adapter_name: str) -> dict[str, Any]:
        """peft keys that only the model can tell (module paths resolved from '@' sites), written
        over ``peft_fields`` when adapter ``adapter_name`` of ``model`` is saved; most methods need none."""
        return {}

    def required_adapters(self) -> tuple[str, ...]:
        """Other adapters of the same model this one builds on (AdapterFusion's fused adapters):
        they must exist when it is added or loaded, and cannot be deleted while it exists."""
        return ()

    @classmethod
    def from_peft(cls, data: dict[str, Any]) -> "PeftConfig":
        raise PeftlabError(f"{cls.__name__} cannot read a peft config")

    def replace(self, **changes: Any) -> "PeftConfig":
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))


def config_from_dict(data: dict[str, Any]) -> PeftConfig:
    """Rebuild a config from its JSON form (peftlab's, or a peft ``adapter_config.json``)."""
    from .registry import get_method, spec_for_peft_type

    if "method" in data:
        cls = get_method(data["method"]).config_cls
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for key, value in values.items():
            if isinstance(value, dict) and "method" in value:  # a hybrid's part
                try:
                    values[key] = config_from_dict(value)
                except PeftlabError as err:
                    raise PeftlabError(f"{cls.__name__}.{key}: {err}") from None
        return cls(**values)
    if "peft_type" in data:
        return spec_for_peft_type(data["peft_type"]).config_cls.from_peft(data)
    raise PeftlabError(f"config {sorted(data)} names no method: expected a 'method' key "
                       "(peftlab) or a 'peft_type' key (HF peft)")


def config_from_options(method: str, options: dict[str, str]) -> PeftConfig:
    """Build a config from command-line ``key=value`` strings (JSON values, or comma lists)."""
    from .registry import get_method

    cls = get_method(method).config_cls
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise PeftlabError(f"{cls.__name__} has no option {unknown}; its options are {sorted(names)}")
    values: dict[str, Any] = {}
    for key, raw in options.items():
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = tuple(raw.split(",")) if "," in raw else raw
        if key in ("targets", "modules_to_save") and isinstance(values[key], str) and not raw.startswith(("re:", "all-")):
            values[key] = (values[key],)
    return cls(**values)


def load_config(path: str | Path) -> PeftConfig:
    return config_from_dict(json.loads(Path(path).read_text()))


def _jsonable(value: Any) -> Any:
    if isinstance(value, PeftConfig):  # a hybrid's part: nested, with its own method name
        return value.to_dict()
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
