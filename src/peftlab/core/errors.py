"""Errors peftlab raises on bad input. Each message says what was given, what was expected, how to fix it."""


class PeftlabError(ValueError):
    """Base class: bad configuration, target, adapter name or checkpoint."""


class CheckpointError(PeftlabError):
    """A checkpoint does not match the adapter it is loaded into (missing, unexpected or misshapen keys)."""
