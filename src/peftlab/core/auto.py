"""HF peft's ``AutoPeftModel*``: load the base model named in an adapter folder, then the adapter.

``AutoPeftModelForSequenceClassification.from_pretrained("runs/my-adapter")`` reads
``base_model_name_or_path`` from the folder's ``adapter_config.json`` (written by ``save_pretrained``,
by peftlab or peft), loads that model with the matching ``transformers`` auto class, and loads the
adapter onto it. Keyword arguments other than the adapter's go to the base model's loader.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from .errors import PeftlabError
from .model import PeftModel
from .state import CONFIG_NAME

# peft's task_type -> the transformers auto class that loads such a model.
AUTO_CLASSES = {"SEQ_CLS": "AutoModelForSequenceClassification", "CAUSAL_LM": "AutoModelForCausalLM",
                "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification",
                "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}


class AutoPeftModel:
    """Picks the auto class from the adapter's ``task_type``; subclasses fix it."""

    task_type: ClassVar[str | None] = None

    @classmethod
    def from_pretrained(cls, path: str | Path, adapter_name: str = "default", is_trainable: bool = False,
                        **model_kwargs: Any) -> PeftModel:
        import transformers

        file = Path(path) / CONFIG_NAME
        if not file.is_file():
            raise PeftlabError(f"no {CONFIG_NAME} in {path}; expected an adapter folder written by save_pretrained")
        data = json.loads(file.read_text())
        base = data.get("base_model_name_or_path")
        if not base:
            raise PeftlabError(f"{file} names no base model (base_model_name_or_path is empty); load the base "
                               "model yourself and call PeftModel.from_pretrained(model, path)")
        task = cls.task_type or data.get("task_type") or "FEATURE_EXTRACTION"
        if task not in AUTO_CLASSES:
            raise PeftlabError(f"{file}: task_type {task!r} is not one of {sorted(AUTO_CLASSES)}")
        try:
            model = getattr(transformers, AUTO_CLASSES[task]).from_pretrained(base, **model_kwargs)
        except OSError as err:
            raise PeftlabError(f"the adapter in {path} was made for base model {base!r}, which could not be "
                               f"loaded ({err}); load it yourself and call PeftModel.from_pretrained") from err
        return PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable)


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    task_type = "SEQ_CLS"


class AutoPeftModelForCausalLM(AutoPeftModel):
    task_type = "CAUSAL_LM"


class AutoPeftModelForSeq2SeqLM(AutoPeftModel):
    task_type = "SEQ_2_SEQ_LM"


class AutoPeftModelForTokenClassification(AutoPeftModel):
    task_type = "TOKEN_CLS"


class AutoPeftModelForQuestionAnswering(AutoPeftModel):
    task_type = "QUESTION_ANS"


class AutoPeftModelForFeatureExtraction(AutoPeftModel):
    task_type = "FEATURE_EXTRACTION"
