"""Errors raised by the task loaders."""

from __future__ import annotations

from pathlib import Path


class TaskDataError(ValueError):
    """A data set is missing, malformed or holds a value the task does not allow.

    Subclasses ``ValueError`` so callers that already guard against bad input with
    ``except ValueError`` keep working; the message always names the offending path
    (and line, where there is one) and says how to fix it.
    """


def describe_folder(folder: Path, limit: int = 30) -> str:
    """List what a folder holds, for error messages ("Found: a, b/, c").

    Why: the most common data error is a wrong path one level off, and showing
    the folder's contents makes that obvious without a second command.
    """
    if not folder.exists():
        return f"{folder} does not exist"
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return f"{folder} is empty"
    shown = ", ".join(names[:limit])
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return f"found in {folder}: {shown}{more}"
