"""One JSON file per run, written atomically, so an interrupted suite resumes where it stopped.

Layout: ``<out>/runs/<model>/<task>/<method>/seed<k>.json``. A file is written (to a temporary
name, then renamed over the target) only when its run has finished, successfully or not. Each
record carries a fingerprint of everything that decides its result (model, data, task budget,
method config, learning rate, training arguments, seed); a stored run is reused only when its
fingerprint matches the one the suite would run now, so changing the budget re-runs it.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from ..core.state import atomic_write_bytes


def slug(text: str) -> str:
    """A file-name-safe form of a model path or hub id (its last two path parts)."""
    parts = [p for p in re.split(r"[\\/]", str(text)) if p and p not in (".", "..")]
    short = "_".join(parts[-2:]) if parts else "model"
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", short).strip("-") or "model"


def fingerprint(settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=_default))


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode())


def _default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


class RunStore:
    """Finished runs of one suite under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, model: str, task: str, method: str, seed: int) -> Path:
        return self.root / "runs" / slug(model) / slug(task) / method / f"seed{seed}.json"

    def load(self, model: str, task: str, method: str, seed: int) -> dict[str, Any] | None:
        path = self.path(model, task, method, seed)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            return None  # a damaged file is treated as absent: the run is done again

    def finished(self, model: str, task: str, method: str, seed: int, print_: str) -> dict[str, Any] | None:
        """The stored record if the run succeeded with fingerprint ``print_``, else None."""
        record = self.load(model, task, method, seed)
        if record and record.get("status") == "ok" and record.get("fingerprint") == print_:
            return record
        return None

    def save(self, record: dict[str, Any]) -> Path:
        path = self.path(record["model"], record["task"], record["method"], record["seed"])
        write_json_atomic(path, record)
        return path
