"""Base class for method configs: frozen dataclasses, validated on construction, JSON round trip.

A config file carries the method name (``"method"``) so it can be read back without knowing the
method in advance. Methods that HF ``peft`` also has add ``peft``'s own keys (``peft_fields``) so
that ``peft`` reads the same file, and read ``peft``'s files through ``from_peft``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, ClassVar

from .errors import PeftlabError


def is_positive_int(value: Any) -> bool:
    """An int above 0 (``True`` is not a width): for ``validate()`` checks and model config fields."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


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
    # HF peft's task_type (SEQ_CLS, CAUSAL_LM, ...); None: read from the model's head when saving.
    task_type: str | None = None
    # As HF peft: True adds the adapter frozen (for inference only).
    inference_mode: bool = False
    # The base model the adapter was saved from (written by save_pretrained, as peft does).
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        # Accept lists from users and JSON, store tuples so configs stay hashable and frozen.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        # peft's spellings of "none" and "one": modules_to_save=None, modules_to_save="classifier".
        if self.modules_to_save is None:
            object.__setattr__(self, "modules_to_save", ())
        elif isinstance(self.modules_to_save, str):
            object.__setattr__(self, "modules_to_save", (self.modules_to_save,))
        if not isinstance(self.modules_to_save, tuple) or not all(isinstance(m, str) and m for m in self.modules_to_save):
            raise PeftlabError(f"{type(self).__name__}.modules_to_save={self.modules_to_save!r}: expected module "
                               "names, e.g. ['classifier']")
        _check_field_types(self)
        if self.targets is None:  # documented as "the method's default"
            object.__setattr__(self, "targets", type(self).__dataclass_fields__["targets"].default)
        if self.targets is not None and not isinstance(self.targets, (str, tuple)):
            raise PeftlabError(f"targets={self.targets!r}: expected a list of module names/patterns, "
                               "a regex string, 'all-linear' or None for the method's default")
        if isinstance(self.targets, tuple) and (not self.targets or not all(isinstance(t, str) and t for t in self.targets)):
            raise PeftlabError(f"{type(self).__name__}.targets={list(self.targets)!r}: expected at least one module "
                               "name, pattern or '@' site (None for the method's default)")
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

    def peft_form_refusal(self, model: Any) -> str | None:
        """Why this adapter on ``model`` cannot be written in peft's form although peft has the
        method (peft would fail or compute something else), or None. A refused adapter is saved in
        peftlab's own form, which peftlab reads and peft refuses for want of a ``peft_type``."""
        return None

    def peftlab_form(self) -> dict[str, Any]:
        """``to_dict`` without the keys only peft reads: the form peftlab alone loads."""
        names = {f.name for f in dataclasses.fields(self)} | {"method"}
        return {k: v for k, v in self.to_dict().items() if k in names}

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

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "PeftConfig":
        """The config of a saved adapter (its folder, or its ``adapter_config.json``), as HF peft's
        ``PeftConfig.from_pretrained``; on a method's class, it must be that method's config."""
        file = Path(path) / "adapter_config.json" if Path(path).is_dir() else Path(path)
        if not file.is_file():
            raise PeftlabError(f"no adapter config at {file}; expected a folder written by save_pretrained")
        config = load_config(file)
        if cls is not PeftConfig and not isinstance(config, cls):
            raise PeftlabError(f"{file} holds a {type(config).__name__}, not a {cls.__name__}")
        return config


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:  # resolving annotations is slow; a class's never change
    return typing.get_type_hints(cls)


def _check_field_types(config: PeftConfig) -> None:
    """Every field against its annotation, for every method at once: a bool is not a number, a
    number is not a flag, a string is not a number, numbers are finite. Ranges stay in validate()."""
    hints = _type_hints(type(config))
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints.get(f.name)
        allowed = [a for a in (typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType)
                               else (hint,))]
        if value is None and type(None) in allowed:
            continue
        simple = [a for a in allowed if a in (bool, int, float, str)]
        if not simple or len(simple) != len([a for a in allowed if a is not type(None)]):
            continue  # tuples, nested configs, dicts: checked by their own code
        ok = any((a is bool and isinstance(value, bool))
                 or (a is int and isinstance(value, int) and not isinstance(value, bool))
                 or (a is float and isinstance(value, (int, float)) and not isinstance(value, bool)
                     and math.isfinite(value))
                 or (a is str and isinstance(value, str)) for a in simple)
        if not ok:
            names = " or ".join(a.__name__ for a in allowed if a is not type(None))
            none = " (or None)" if type(None) in allowed else ""
            raise PeftlabError(f"{type(config).__name__}.{f.name}={value!r} ({type(value).__name__}): expected "
                               f"{'a finite ' if float in simple else 'a '}{names}{none}")


def peft_names(**aliases: str) -> Any:
    """Class decorator, above ``@dataclass``: the config also takes HF peft's names for its fields
    (``@peft_names(lora_alpha="alpha")``), so a peft script's ``LoraConfig(lora_alpha=16, ...)``
    runs unchanged. peftlab's names stay primary; giving both names of one field is refused."""

    def decorate(cls: type) -> type:
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            for theirs, ours in aliases.items():
                if theirs in kwargs:
                    if ours in kwargs:
                        raise PeftlabError(f"{cls.__name__} got {theirs}= (HF peft's name) and {ours}= for the same "
                                           "field; give one of them")
                    kwargs[ours] = kwargs.pop(theirs)
            init(self, *args, **kwargs)

        cls.__init__ = __init__  # type: ignore[method-assign]
        cls.peft_aliases = dict(aliases)  # type: ignore[attr-defined]
        return cls

    return decorate


PEFTLAB_KEY = "peftlab"  # in a peft-form config: the peftlab method derived from peft's, and its own fields


def config_from_dict(data: dict[str, Any]) -> PeftConfig:
    """Rebuild a config from its JSON form (peftlab's, or a peft ``adapter_config.json``)."""
    from .registry import get_method, spec_for_peft_type

    if "method" in data:
        cls = get_method(data["method"]).config_cls
        names = {f.name for f in dataclasses.fields(cls)}
        # Keys peftlab itself writes beside the fields: the method, and peft's keys for its methods.
        written = {"method"} | set(cls().peft_fields())
        unknown = sorted(set(data) - names - written)
        if unknown:
            raise PeftlabError(f"{cls.__name__} has no field {unknown[0]!r}" + (f" (nor {unknown[1:]})" if len(unknown) > 1
                               else "") + f"; its fields are {sorted(names)}")
        values = {k: v for k, v in data.items() if k in names}
        for key, value in values.items():
            if isinstance(value, dict) and "method" in value:  # a hybrid's part
                try:
                    values[key] = config_from_dict(value)
                except PeftlabError as err:
                    raise PeftlabError(f"{cls.__name__}.{key}: {err}") from None
        return cls(**values)
    if "peft_type" in data:
        # A method derived from one peft has (QLoRA from LoRA) is saved in that method's peft form plus
        # one key peft ignores, ``"peftlab": {"method": ..., <its own fields>}``; its config reads both.
        marker = data.get(PEFTLAB_KEY)
        if marker is not None and not (isinstance(marker, dict) and isinstance(marker.get("method"), str)):
            raise PeftlabError(f"the {PEFTLAB_KEY!r} entry of this peft config is {marker!r}; expected an object "
                               "naming the peftlab method, e.g. {\"method\": \"qlora\", ...}")
        cls = get_method(marker["method"]).config_cls if marker else spec_for_peft_type(data["peft_type"]).config_cls
        config = cls.from_peft(data)
        # peft's own fields every config has (inference_mode stays False: peft writes True on every save).
        return config.replace(task_type=data.get("task_type"), base_model_name_or_path=data.get("base_model_name_or_path"))
    raise PeftlabError(f"config {sorted(data)} names no method: expected a 'method' key "
                       "(peftlab) or a 'peft_type' key (HF peft)")


def refuse_peft_features(data: dict[str, Any], plain: dict[str, Any], method: str) -> None:
    """Refuse a peft config that turns on a feature peftlab's method does not implement, naming it:
    ``plain`` maps each such peft field to the value meaning "off" (a missing field is off too)."""
    for field, off in plain.items():
        value = data.get(field)
        if value is not None and value != off and not (not value and not off):  # [], {}, False: off too
            raise PeftlabError(f"this peft {method} checkpoint sets {field}={value!r}, which peftlab's {method} does not "
                               f"implement (loading it would compute something else); re-train without {field}")


def config_from_options(method: str, options: dict[str, str]) -> PeftConfig:
    """Build a config from command-line ``key=value`` strings (JSON values, or comma lists)."""
    from .registry import get_method

    cls = get_method(method).config_cls
    names = {f.name for f in dataclasses.fields(cls)}
    aliases = getattr(cls, "peft_aliases", {})  # HF peft's names for the same fields
    options = {aliases.get(k, k): v for k, v in options.items()}
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
