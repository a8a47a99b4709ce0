"""Delta-only state dicts and their safetensors files.

Checkpoint keys follow HF peft's layout: the module path under ``base_model.model.`` followed by
the module's own key with the adapter name removed (``...query.lora_A.weight``). Loading is
strict: every missing, unexpected or misshapen key is reported by name.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CheckpointError

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def _file_mode() -> int:
    # What a plain open() would give under the umask; mkstemp (and safetensors' writer) leave 0600.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    # safetensors needs contiguous, unshared tensors; adapters are small, so a copy is cheap.
    clean = {k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(clean, tmp, metadata={"format": "pt", **(metadata or {})})
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_adapter(folder: str | Path, config_dict: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write one adapter: weights first, then the config, each by atomic rename.

    A crash while either file is being written leaves the previous file in place. (Between the two
    renames — microseconds — a crash would pair new weights with the old config; the strict loader
    then refuses the pair by key or shape instead of loading it silently.)
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / WEIGHTS_NAME, tensors)
    atomic_write_bytes(folder / CONFIG_NAME, json.dumps(config_dict, indent=2, sort_keys=True).encode())


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        found = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
        raise CheckpointError(f"no adapter weights at {path}; the folder holds {found}. "
                              f"Expected {WEIGHTS_NAME} written by save_pretrained (peftlab or HF peft).")
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


def check_state(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str,
                variable_length: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Raise naming every key that is missing, unexpected or of the wrong shape (keys in
    ``variable_length``, sparse entries, only need the same number of dimensions)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshapen = sorted(k for k in set(expected) & set(found) if (
        expected[k].dim() != found[k].dim() if k in variable_length else tuple(expected[k].shape) != tuple(found[k].shape)))
    if not (missing or unexpected or misshapen):
        return
    lines = [f"checkpoint {source} does not match the adapter it is loaded into:"]
    for key in missing[:10]:
        lines.append(f"  missing key {key!r} (expected shape {tuple(expected[key].shape)})")
    for key in unexpected[:10]:
        lines.append(f"  unexpected key {key!r} (shape {tuple(found[key].shape)})")
    for key in misshapen[:10]:
        lines.append(f"  key {key!r} has shape {tuple(found[key].shape)}, expected {tuple(expected[key].shape)}")
    hidden = len(missing) + len(unexpected) + len(misshapen) - sum(min(10, len(x)) for x in (missing, unexpected, misshapen))
    if hidden > 0:
        lines.append(f"  ... and {hidden} more")
    lines.append("Was it saved for another base model, method or config (rank, targets, number of tokens)?")
    raise CheckpointError("\n".join(lines))
