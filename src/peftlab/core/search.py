"""Searches over adapter configurations: the hybrid family's automatic combinations.

A search (AutoPEFT, S3Delta-M, S4) proposes configurations, has a :class:`SearchContext` train and
score each, and returns the one it chose as an ordinary config of its method, which then trains,
saves and loads like any other. The context owns the task, the data and the training loop, so a
search never knows which task it serves; it scores candidates on examples held out of the training
split, never on the dev set that reports the final score. A method declares its search on its spec
(``MethodSpec.search``); the study and ``peftlab search`` run it from there.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from .config import PeftConfig, is_positive_int
from .errors import PeftlabError
from .state import atomic_write_bytes


@dataclasses.dataclass(frozen=True)
class SearchBudget:
    """trials: candidate configurations trained and scored (each one training run);
    steps: optimizer steps per candidate (``None``: the context's own run length);
    minutes: no new candidate starts after this much wall time (``None``: no limit)."""

    trials: int = 8
    steps: int | None = None
    minutes: float | None = None

    def __post_init__(self) -> None:
        if not is_positive_int(self.trials):
            raise PeftlabError(f"SearchBudget.trials={self.trials!r}: expected a positive whole number of candidate "
                               "configurations to train (a search of 0 trials finds nothing)")
        if self.steps is not None and not is_positive_int(self.steps):
            raise PeftlabError(f"SearchBudget.steps={self.steps!r}: expected a positive whole number of optimizer "
                               "steps per candidate, or None for the context's own run length")
        if self.minutes is not None and (isinstance(self.minutes, bool) or not isinstance(self.minutes, (int, float))
                                         or not math.isfinite(self.minutes) or self.minutes <= 0):
            raise PeftlabError(f"SearchBudget.minutes={self.minutes!r}: expected a positive number of minutes, or "
                               "None for no time limit")

    def time_left(self, started: float) -> bool:
        """Whether a new candidate may start (``started``: the search's ``time.perf_counter()``)."""
        return self.minutes is None or time.perf_counter() - started < 60.0 * self.minutes


@dataclasses.dataclass(frozen=True)
class Trial:
    """One scored candidate. score: the context's held-out score (higher is better); trainable:
    entries that train (the review's count, head included); info: what the search records about it."""

    config: PeftConfig
    score: float
    trainable: int
    seconds: float
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "score": self.score, "trainable": self.trainable,
                "seconds": round(self.seconds, 2), "info": self.info}


class SearchContext(Protocol):
    """What a search may ask of the task it serves."""

    seed: int

    def new_model(self) -> nn.Module:
        """A fresh base model of the task (head included), e.g. to read its depth and width."""

    def fit(self, config: PeftConfig, steps: int | None = None, keep_model: bool = False) -> tuple[Trial, Any]:
        """Train ``config`` on a fresh model for ``steps`` optimizer steps (``None``: the context's run
        length) and score it on the held-out examples; returns the trial and, with ``keep_model``, the
        trained model (a PeftModel), else ``None``."""


@dataclasses.dataclass
class SearchResult:
    """config: the chosen configuration (the search's method); trials: every scored candidate, in
    the order they ran; front: indices into ``trials`` of the Pareto front of score against
    trainable entries, where the search reports one; notes: what the reader should know."""

    method: str
    config: PeftConfig
    trials: list[Trial]
    budget: SearchBudget
    seconds: float
    front: list[int] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "config": self.config.to_dict(), "budget": dataclasses.asdict(self.budget),
                "seconds": round(self.seconds, 1), "front": self.front, "notes": self.notes,
                "trials": [t.to_dict() for t in self.trials]}

    def save(self, folder: str | Path) -> Path:
        """Write ``search.json`` (everything above) and ``config.json`` (the chosen config, which
        ``peftlab train --config`` and ``load_config`` read) into ``folder``, atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / "config.json", json.dumps(self.config.to_dict(), indent=2, sort_keys=True).encode())
        atomic_write_bytes(folder / "search.json", json.dumps(self.to_dict(), indent=2).encode())
        return folder / "search.json"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (score, cost) no other point dominates (score at least as high and
    cost at least as low, one of them strictly), ordered by cost."""
    front = [i for i, (s, c) in enumerate(points)
             if not any(s2 >= s and c2 <= c and (s2 > s or c2 < c) for s2, c2 in points)]
    return sorted(front, key=lambda i: (points[i][1], -points[i][0]))
