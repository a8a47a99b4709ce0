"""peftlab in the HF ``Trainer``: a Trainer that saves adapters, and a callback that runs training hooks.

``peftlab.train.hf.Trainer(model=peft_model, ...)`` is ``transformers.Trainer`` with its model I/O
pointed at the adapter: checkpoints and ``save_model`` write ``adapter_config.json`` +
``adapter_model.safetensors`` (HF peft's layout, via ``PeftModel.save_pretrained``) instead of the
full model, ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end`` load them back
strictly, and the :class:`PeftlabCallback` is added for you.

Why a subclass: ``transformers.Trainer`` special-cases only HF peft's own classes.
``_save`` writes ``model.save_pretrained`` for ``PreTrainedModel`` / ``peft.PeftModel`` instances
and the full ``state_dict()`` as ``model.safetensors`` for anything else; ``_load_from_checkpoint``
and ``_load_best_model`` load adapters only when ``trainer_utils._is_peft_model`` holds, which is an
``isinstance`` check against ``peft.PeftModel`` / ``PeftMixedModel`` (and False when peft is not
installed). There is no hook or protocol a foreign class can implement, and a callback runs only
after the full model is written, so a plain ``transformers.Trainer`` cannot save or resume a peftlab
adapter; this subclass overrides exactly those three methods (plus the checkpoint push, which copies
only root-level adapter files, and only when peft is installed).

``PeftlabCallback`` alone (``transformers.Trainer(..., callbacks=[PeftlabCallback()])``) runs the
adapters' hooks: it starts training on the Trainer's data loader (data passes such as Fisher
information) and brackets each optimizer step with the methods' hooks. Loss terms need nothing:
``PeftModel.forward`` adds them to the output's ``loss``, which the Trainer uses.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import HubStrategy

from ..core.errors import CheckpointError, PeftlabError
from ..core.model import PeftModel
from ..core.state import CONFIG_NAME, WEIGHTS_NAME, read_tensors


def _peft_model(model: nn.Module | None) -> PeftModel:
    # The Trainer may hand over its accelerate/DDP wrapper; the PeftModel is inside it.
    while model is not None and not isinstance(model, PeftModel):
        model = getattr(model, "module", None)
    if model is None:
        raise PeftlabError("the Trainer's model must be a peftlab PeftModel "
                           "(peftlab.get_peft_model(model, config)), or a DDP/accelerate wrapper around one")
    return model


class PeftlabCallback(TrainerCallback):
    """Runs ``begin_training``, ``before_optimizer_step``, ``after_optimizer_step`` and
    ``end_training`` of the Trainer's PeftModel at the matching Trainer events."""

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        peft_model = _peft_model(model)
        peft_model.begin_training(train_dataloader, state.max_steps or None, args.learning_rate)
        # A resumed run continues the step count (schedules such as AdaLoRA's read it).
        peft_model.training_state.step = state.global_step

    def on_train_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                     train_dataloader: Any = None, **kwargs: Any) -> None:
        _peft_model(model).end_training(train_dataloader)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                              **kwargs: Any) -> None:
        _peft_model(model).before_optimizer_step()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                          **kwargs: Any) -> None:
        _peft_model(model).after_optimizer_step()


def adapter_folder(path: str | Path, adapter_name: str) -> Path:
    """Where ``PeftModel.save_pretrained(path)`` writes ``adapter_name`` (peft's layout)."""
    return Path(path) if adapter_name == "default" else Path(path) / adapter_name


def load_adapters(model: PeftModel, path: str | Path) -> None:
    """Load every adapter of ``model`` from a folder written by ``model.save_pretrained(path)``,
    strictly: an adapter missing from the folder, or a key or shape that differs, is an error."""
    for name in model.peft_configs:
        folder = adapter_folder(path, name)
        if not (folder / WEIGHTS_NAME).is_file():
            found = sorted(p.name for p in Path(path).iterdir()) if Path(path).is_dir() else []
            hint = (" It holds a full model (a plain transformers.Trainer checkpoint): resume it with "
                    "transformers.Trainer, or start again with peftlab.train.hf.Trainer."
                    if "model.safetensors" in found else "")
            raise CheckpointError(f"checkpoint {path} has no weights for adapter {name!r}: expected "
                                  f"{folder / WEIGHTS_NAME} (written by peftlab.train.hf.Trainer / "
                                  f"PeftModel.save_pretrained); the folder holds {found}.{hint}")
        model.load_adapter_state_dict(name, read_tensors(folder / WEIGHTS_NAME), str(folder))


class Trainer(transformers.Trainer):
    """``transformers.Trainer`` for a peftlab ``PeftModel``: checkpoints hold the adapters only.

    Same arguments as ``transformers.Trainer``. Checkpoints and ``save_model`` write each adapter
    as ``PeftModel.save_pretrained`` does (``default`` in the folder, others in ``<folder>/<name>``)
    beside the tokenizer, training arguments and, in checkpoints, the optimizer, scheduler and RNG
    state; resuming and ``load_best_model_at_end`` load them back strictly. A
    :class:`PeftlabCallback` is added unless one is given. FSDP and DeepSpeed shard the tensors
    the adapter is saved from, so they are refused; DDP (torchrun) works.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _peft_model(self.model)  # refuse anything else now, not at the first save
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise PeftlabError("peftlab.train.hf.Trainer saves adapters from the model's own tensors, which FSDP and "
                               "DeepSpeed shard; got fsdp/deepspeed in TrainingArguments. Use DDP (torchrun) or "
                               "peftlab's own train loop")
        if not any(isinstance(cb, PeftlabCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(PeftlabCallback())

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # state_dict comes only from sharded engines (refused in __init__): the adapter is read from the model.
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        _peft_model(self.accelerator.unwrap_model(self.model)).save_pretrained(output_dir)
        # What transformers.Trainer._save writes besides the model.
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif getattr(self.data_collator, "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load_adapters(_peft_model(model if model is not None else self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_adapters(_peft_model(self.model), self.state.best_model_checkpoint)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # The Trainer copies the checkpoint's model files to output_dir and pushes that; it knows
        # the adapter files only when HF peft is installed, and never those in subfolders.
        if self.is_world_process_zero() and self.args.hub_strategy != HubStrategy.END:
            for name in _peft_model(self.model).peft_configs:
                source, target = adapter_folder(checkpoint_folder, name), adapter_folder(self.args.output_dir, name)
                target.mkdir(parents=True, exist_ok=True)
                for file in (CONFIG_NAME, WEIGHTS_NAME):
                    shutil.copy(source / file, target / file)
        super()._push_from_checkpoint(checkpoint_folder)
