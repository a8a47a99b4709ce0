"""Built-in methods. One import line per method file registers it."""
from .reparameterized import lora  # noqa: F401
