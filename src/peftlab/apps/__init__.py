"""Applications of PEFT built on the core, each an assessment suite of its own
(``peftlab assess --suite NAME``): backdoor attack and defence (:mod:`.backdoor`), multi-task
learning (:mod:`.multitask`) and cross-lingual transfer (:mod:`.crosslingual`).

An application module offers ``default_suite()`` (a frozen dataclass of settings, every field
settable from the suite YAML) and ``run(suite, out, echo)``, which writes ``report.md`` there.
"""
from __future__ import annotations

import dataclasses
import importlib
import typing
from typing import Any

from ..core.errors import PeftlabError

APPS = {"backdoor": "peftlab.apps.backdoor", "multitask": "peftlab.apps.multitask",
        "crosslingual": "peftlab.apps.crosslingual"}


def is_app(name: str | None) -> bool:
    return name in APPS


def app_module(name: str) -> Any:
    if name not in APPS:
        raise PeftlabError(f"unknown application suite {name!r}; applications: {', '.join(APPS)}")
    return importlib.import_module(APPS[name])


def app_suite(name: str, changes: dict[str, Any], source: str) -> Any:
    """The application's default settings with ``changes`` (from a YAML file or flags) applied; an
    unknown field is an error listing the known ones. Lists become tuples (the settings are frozen)."""
    suite = app_module(name).default_suite()
    fields = {f.name: f for f in dataclasses.fields(suite)}
    unknown = sorted(set(changes) - set(fields))
    if unknown:
        raise PeftlabError(f"{source}: {unknown} are not settings of the {name} suite; its settings: "
                           f"{', '.join(sorted(fields))}")
    hints = typing.get_type_hints(type(suite))
    fixed = {k: tuple(v) if isinstance(v, list) and str(hints[k]).startswith("tuple") else v for k, v in changes.items()}
    try:
        return dataclasses.replace(suite, **fixed)
    except TypeError as err:
        raise PeftlabError(f"{source}: {err}") from None
