"""peftlab: the parameter-efficient fine-tuning taxonomy, applied to any PyTorch model, measured side by side."""
from .core.config import PeftConfig, config_from_dict, load_config
from .core.errors import CheckpointError, PeftlabError
from .core.model import ParameterReport, PeftModel, get_peft_model
from .core.registry import MethodSpec, get_method, list_methods, register
from .methods.reparameterized.lora import LoraConfig
from .methods.additive.parallel_adapter import ParallelAdapterConfig
from .methods.additive.residual_adapter import ResidualAdapterConfig
from .methods.additive.sequential_adapter import SequentialAdapterConfig
from .methods.additive.ia3 import IA3Config
from .methods.partial.bitfit import BitFitConfig
from .methods.additive.prompt_tuning import PromptTuningConfig
from .methods.additive.prefix_tuning import PrefixTuningConfig

__all__ = [
    "BitFitConfig", "IA3Config",
    "CheckpointError", "LoraConfig", "MethodSpec", "ParameterReport", "PeftConfig", "PeftModel",
    "PeftlabError", "ParallelAdapterConfig", "ResidualAdapterConfig",
    "PrefixTuningConfig", "PromptTuningConfig", "SequentialAdapterConfig", "config_from_dict", "get_method", "get_peft_model", "list_methods", "load_config", "register",
]
__version__ = "0.1.0"
