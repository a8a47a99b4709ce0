"""peftlab: the parameter-efficient fine-tuning taxonomy, applied to any PyTorch model, measured side by side."""
from .core.auto import (AutoPeftModel, AutoPeftModelForCausalLM, AutoPeftModelForFeatureExtraction,
                        AutoPeftModelForQuestionAnswering, AutoPeftModelForSeq2SeqLM,
                        AutoPeftModelForSequenceClassification, AutoPeftModelForTokenClassification)
from .core.config import PeftConfig, config_from_dict, load_config
from .core.errors import CheckpointError, PeftlabError
from .core.hooks import TrainingHookError, TrainingHooks
from .core.compat import TaskType, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from .core.model import (ParameterReport, PeftModel, PeftModelForCausalLM, PeftModelForFeatureExtraction,
                         PeftModelForQuestionAnswering, PeftModelForSeq2SeqLM, PeftModelForSequenceClassification,
                         PeftModelForTokenClassification, get_peft_model)
from .core.registry import MethodSpec, get_method, list_methods, register
from .methods.reparameterized.lora import LoraConfig
from .methods.additive.parallel_adapter import ParallelAdapterConfig
from .methods.additive.residual_adapter import ResidualAdapterConfig
from .methods.additive.sequential_adapter import SequentialAdapterConfig
from .methods.additive.ia3 import IA3Config
from .methods.additive.adapter_fusion import AdapterFusionConfig
from .methods.partial.bitfit import BitFitConfig
from .methods.partial.child_tuning import ChildTuningConfig
from .methods.additive.prompt_tuning import PromptTuningConfig
from .methods.additive.prefix_tuning import PrefixTuningConfig
from .methods.hybrid.mam_adapter import MAMAdapterConfig
from .methods.reparameterized.vera import VeraConfig
from .methods.reparameterized.qlora import QLoraConfig
from .methods.reparameterized.qa_lora import QALoraConfig
from .methods.reparameterized.loftq import LoftQConfig
from .methods.reparameterized.lora_fa import LoraFAConfig
from .methods.reparameterized.dylora import DyLoraConfig
from .methods.reparameterized.delta_lora import DeltaLoraConfig
from .methods.reparameterized.krona import KronAConfig
from .methods.reparameterized.increlora import IncreLoraConfig
from .methods.reparameterized.intrinsic_said import IntrinsicSaidConfig
from .methods.reparameterized.loraprune import LoraPruneConfig
from .methods.reparameterized.kernel_mix import KernelMixConfig
from .methods.reparameterized.moelora import MoELoraConfig
from .methods.reparameterized.l_lora import LLoraConfig
from .methods.additive.hadamard_adapter import HadamardAdapterConfig
from .methods.reparameterized.laplace_lora import LaplaceLoraConfig
from .methods.additive.p_tuning import PTuningConfig
from .methods.additive.p_tuning_v2 import PTuningV2Config
from .methods.additive.pasta import PastaConfig
from .methods.additive.adapter_drop import AdapterDropConfig
from .methods.additive.warp import WarpConfig
from .methods.additive.tiny_attention import TinyAttentionConfig
from .methods.additive.coda import CodaConfig
from .methods.additive.ciat import CiatConfig
from .methods.additive.lst import LstConfig
from .methods.additive.attention_fusion import AttentionFusionConfig
from .methods.hybrid.compacter import CompacterConfig, CompacterPlusPlusConfig
from .methods.hybrid.unipelt import UniPELTConfig
from .methods.unified.adamix import AdaMixConfig
from .methods.unified.sparse_adapter import SparseAdapterConfig
from .methods.unified.propetl import ProPETLConfig
from .methods.partial.ln_tuning import LNTuningConfig
from .methods.hybrid.autopeft import AutoPeftConfig
from .methods.hybrid.s3delta import S3DeltaConfig
from .methods.hybrid.s4 import S4Config
from .core.search import SearchBudget, SearchResult
from .core.quant import dequantize_model, quantize_model

__all__ = [
    "AdapterDropConfig", "AdapterFusionConfig", "AttentionFusionConfig", "CiatConfig", "CodaConfig", "CompacterConfig",
    "CompacterPlusPlusConfig", "LstConfig", "UniPELTConfig", "AdaMixConfig", "SparseAdapterConfig", "ProPETLConfig",
    "LNTuningConfig", "AutoPeftConfig", "S3DeltaConfig", "S4Config", "SearchBudget", "SearchResult", "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification", "BitFitConfig", "CheckpointError", "ChildTuningConfig", "DeltaLoraConfig", "DyLoraConfig", "HadamardAdapterConfig", "IA3Config", "IncreLoraConfig", "IntrinsicSaidConfig", "KernelMixConfig", "KronAConfig", "LaplaceLoraConfig",
    "LLoraConfig", "LoftQConfig", "LoraConfig", "LoraFAConfig", "LoraPruneConfig", "MAMAdapterConfig", "MethodSpec", "MoELoraConfig", "ParallelAdapterConfig", "PastaConfig", "ParameterReport", "PeftConfig",
    "PeftModel", "PeftModelForCausalLM", "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
    "PTuningConfig", "PTuningV2Config", "PeftlabError", "PrefixTuningConfig", "PromptTuningConfig", "QALoraConfig", "QLoraConfig", "ResidualAdapterConfig",
    "SequentialAdapterConfig", "TaskType", "TinyAttentionConfig", "TrainingHookError", "TrainingHooks", "VeraConfig", "WarpConfig", "config_from_dict", "dequantize_model", "get_method",
    "get_peft_model", "get_peft_model_state_dict", "inject_adapter_in_model", "list_methods", "load_config",
    "quantize_model", "register", "set_peft_model_state_dict",
]
__version__ = "0.1.0"
