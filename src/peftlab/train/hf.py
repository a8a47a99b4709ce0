"""peftlab in the HF ``Trainer``: a callback that runs the adapters' training hooks.

``Trainer(model=peft_model, ..., callbacks=[PeftlabCallback()])``. The Trainer's own optimizer
and loop stay as they are; the callback starts training on the Trainer's data loader (data passes
such as Fisher information), and brackets each optimizer step with the methods' hooks. Loss terms
need nothing: ``PeftModel.forward`` adds them to the output's ``loss``, which the Trainer uses.
"""
from __future__ import annotations

from typing import Any

from torch import nn
from transformers import TrainerCallback

from ..core.errors import PeftlabError
from ..core.model import PeftModel


def _peft_model(model: nn.Module | None) -> PeftModel:
    # The Trainer may hand over its accelerate/DDP wrapper; the PeftModel is inside it.
    while model is not None and not isinstance(model, PeftModel):
        model = getattr(model, "module", None)
    if model is None:
        raise PeftlabError("PeftlabCallback needs a Trainer whose model is a peftlab PeftModel "
                           "(peftlab.get_peft_model(model, config))")
    return model


class PeftlabCallback(TrainerCallback):
    """Runs ``begin_training``, ``before_optimizer_step`` and ``after_optimizer_step`` of the
    Trainer's PeftModel at the matching Trainer events."""

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        _peft_model(model).begin_training(train_dataloader, state.max_steps or None)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                              **kwargs: Any) -> None:
        _peft_model(model).before_optimizer_step()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                          **kwargs: Any) -> None:
        _peft_model(model).after_optimizer_step()
