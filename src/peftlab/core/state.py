"""Delta-only state dicts and their safetensors files.

Checkpoint keys follow HF peft's layout: the module path under ``base_model.model.`` followed by
the module's own key with the adapter name removed (``...query.lora_A.weight``). Loading is
strict: every missing, unexpected or misshapen key is reported by name.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

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


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[str]:
    """A temporary file beside ``path`` for the caller to write; on success it is flushed to disk
    and renamed over ``path``, on any failure removed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    # safetensors needs contiguous, unshared tensors; adapters are small, so a copy is cheap.
    clean = {k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, tmp, metadata={"format": "pt", **(metadata or {})})


# Safetensors metadata key: the SHA-256 of the adapter_config.json written with these weights.
CONFIG_HASH_KEY = "peftlab_config_sha256"


def save_adapter(folder: str | Path, config_dict: dict[str, Any], tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """Write one adapter: weights first, then the config, each by atomic rename.

    A crash while either file is being written leaves the previous file in place. The weights carry
    the hash of the config they were saved with (safetensors metadata, which peft ignores), so a
    crash between the two renames — new weights beside the old config — is refused on load instead
    of loading silently. Temporaries left by an earlier interrupted save are removed first.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        for stale in folder.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    config_bytes = json.dumps(config_dict, indent=2, sort_keys=True).encode()
    save_tensors(folder / WEIGHTS_NAME, tensors,
                 {**(metadata or {}), CONFIG_HASH_KEY: hashlib.sha256(config_bytes).hexdigest()})
    atomic_write_bytes(folder / CONFIG_NAME, config_bytes)


def read_config_dict(folder: str | Path) -> dict[str, Any]:
    """The JSON of ``folder/adapter_config.json``; a missing or damaged file is a CheckpointError
    naming it."""
    file = Path(folder) / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in {folder}; expected a folder written by save_pretrained")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}); the file is damaged: save the adapter again") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} holds a JSON {type(data).__name__}, expected an object of config fields")
    return data


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of a weights file (empty when unreadable: read_tensors says why)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception:
        return {}


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        found = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
        raise CheckpointError(f"no adapter weights at {path}; the folder holds {found}. "
                              f"Expected {WEIGHTS_NAME} written by save_pretrained (peftlab or HF peft).")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
            metadata = handle.metadata() or {}
    except Exception as err:  # safetensors' own error types name neither the file nor the cause plainly
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); "
                              "the file is damaged or truncated: save the adapter again") from None
    config = path.parent / CONFIG_NAME
    expected = metadata.get(CONFIG_HASH_KEY)
    if expected and config.is_file() and hashlib.sha256(config.read_bytes()).hexdigest() != expected:
        raise CheckpointError(f"{path} was saved with another {CONFIG_NAME} than the one beside it (a save was "
                              "interrupted between the two files?): save the adapter again")
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{path}: tensor {bad[0]!r} holds NaN or Inf values" +
                              (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "") + "; the adapter diverged or "
                              "the file is damaged")
    return tensors


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
