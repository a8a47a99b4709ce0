"""Built-in methods. One import line per method file registers it."""
from .reparameterized import lora  # noqa: F401
from .additive import sequential_adapter  # noqa: F401
from .additive import residual_adapter  # noqa: F401
from .additive import parallel_adapter  # noqa: F401
from .additive import ia3  # noqa: F401
from .partial import bitfit  # noqa: F401
from .additive import prompt_tuning  # noqa: F401
from .additive import prefix_tuning  # noqa: F401
from .partial import child_tuning  # noqa: F401
from .hybrid import mam_adapter  # noqa: F401
from .additive import adapter_fusion  # noqa: F401
from .reparameterized import vera  # noqa: F401
from .reparameterized import adalora  # noqa: F401
from .reparameterized import lorahub  # noqa: F401
from .partial import fish_mask  # noqa: F401
from .partial import lt_sft  # noqa: F401
