"""HF peft's free functions and names, over peftlab's PeftModel (so peft scripts run unchanged)."""
from __future__ import annotations

import enum

import torch
from torch import nn

from .config import PeftConfig
from .errors import PeftlabError
from .inject import delta_modules, remove_empty_wrappers
from .model import PeftModel
from .registry import spec_for_config


class TaskType(str, enum.Enum):
    """HF peft's task types; ``config.task_type`` takes either these or their strings."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


def get_peft_model_state_dict(model: PeftModel, state_dict: dict[str, torch.Tensor] | None = None,
                              adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under its checkpoint keys (HF peft's function; ``state_dict`` unused)."""
    return model.adapter_state_dict(adapter_name)


def set_peft_model_state_dict(model: PeftModel, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default") -> None:
    """Load checkpoint tensors into adapter ``adapter_name``, strictly (peft's returns unmatched keys;
    peftlab refuses any mismatch, naming each key)."""
    model.load_adapter_state_dict(adapter_name, peft_model_state_dict)


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default") -> nn.Module:
    """Put the adapter's layers into ``model`` itself, without a PeftModel around it (HF peft's
    low-level call): the adapter is active, its tensors train and every other parameter is frozen.
    Methods that keep model-level state (soft prompts) need a PeftModel: use get_peft_model."""
    spec = spec_for_config(peft_config)
    try:
        spec.attach(model, adapter_name, peft_config, None)
    except Exception as err:
        for _, module in list(delta_modules(model)):  # leave the model as it was
            module.delete_adapter(adapter_name)
        remove_empty_wrappers(model)
        if isinstance(err, PeftlabError):
            raise
        raise PeftlabError(f"{spec.name} cannot be injected without a PeftModel ({type(err).__name__}: {err}); "
                           "use get_peft_model") from err
    for param in model.parameters():
        param.requires_grad_(False)
    for _, module in delta_modules(model):
        module.set_active([adapter_name])
        for param in module.adapter_parameters(adapter_name):
            param.requires_grad_(True)
    return model
