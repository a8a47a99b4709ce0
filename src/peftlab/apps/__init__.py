"""Applications of PEFT built on the core, each an assessment suite of its own
(``peftlab assess --suite NAME``): backdoor attack and defence (:mod:`.backdoor`), multi-task
learning (:mod:`.multitask`) and cross-lingual transfer (:mod:`.crosslingual`).

An application module offers ``default_suite()`` (a frozen dataclass of settings, every field
settable from the suite YAML) and ``run(suite, out, echo)``, which writes ``report.md`` there. Its
runner has ``out``, ``echo``, ``results``, ``preflight()`` (every check before anything trains; what it
returns goes to ``stages``), ``stages(prepared)`` and ``write()``; :func:`run_app` drives it.
"""
from __future__ import annotations

import dataclasses
import importlib
import time
import typing
from pathlib import Path
from typing import Any, Callable

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


def run_app(name: str, runner: Any, write_plots: Callable[[dict[str, Any], Path], list[str]]) -> dict[str, Any]:
    """Check, run every stage, then record the wall time and threads, draw the plots and write the
    report; returns the results. Nothing is written when a check fails."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per run is the progress here
    started = time.perf_counter()
    prepared = runner.preflight()
    runner.out.mkdir(parents=True, exist_ok=True)
    runner.stages(prepared)
    runner.results["wall_s"] = time.perf_counter() - started
    runner.results["threads"] = torch.get_num_threads()
    runner.results["plots"] = write_plots(runner.results, runner.out)
    runner.write()
    runner.echo(f"{name} suite: {runner.results['wall_s'] / 60:.1f} min; report {runner.out / 'report.md'}")
    return runner.results


def report_tail(notes: list[str], plots: list[str]) -> list[str]:
    """The Markdown lines that end every application's report: its notes, then its plots."""
    out = ["## Notes", ""] + [f"- {note}" for note in notes] + [""] if notes else []
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return out
