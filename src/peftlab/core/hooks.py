"""Training-time behaviour a method declares on its spec, run by whatever loop trains the model.

Half the taxonomy acts during training: Fisher masks need a pass over data first, AdaLoRA adds
an orthogonality loss and reallocates ranks between backward and the optimizer step, Delta-LoRA
updates frozen weights after it. A method declares these as :class:`TrainingHooks` on its
:class:`~peftlab.core.registry.MethodSpec`; :class:`~peftlab.core.model.PeftModel` runs them for
its trainable adapters. Three ways to drive them, all ending in the same calls:

- peftlab's own loop (:func:`peftlab.train.loop.train`) calls them itself;
- the HF ``Trainer``: ``peftlab.train.hf.Trainer`` adds ``PeftlabCallback()`` (a plain ``Trainer``
  takes it in its callbacks);
- a plain PyTorch loop::

      model.begin_training(loader, total_steps, lr)  # data passes (Fisher, ...), step schedule
      for batch in loader:
          loss = model(**batch).loss                 # declared loss terms are already added
          loss.backward()
          model.optimizer_step(optimizer)            # before-step hooks, optimizer.step(), after-step hooks
          optimizer.zero_grad()
      model.end_training(loader)                     # post-hoc fits (Laplace)

A model whose adapter has step hooks refuses a training forward pass before ``begin_training``:
forgetting the call would otherwise train a different method without a word.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch

from .errors import PeftlabError

if TYPE_CHECKING:
    from .model import PeftModel

# Every hook gets the PeftModel and the adapter name first.
DataPass = Callable[["PeftModel", str, Iterable[Any]], None]
LossTerm = Callable[["PeftModel", str], "torch.Tensor | None"]
StepHook = Callable[["PeftModel", str, "TrainingState"], None]
ParamGroups = Callable[["PeftModel", str, float, float], "list[dict[str, Any]]"]


@dataclass(frozen=True)
class TrainingHooks:
    """What a method does during training; every field is optional.

    before_training(model, adapter, data): a pass over training batches before the first step
        (Fisher information, importance scores). ``data`` yields the same batches as training.
    after_training(model, adapter, data): a pass over training batches after the last step
        (post-hoc fits such as a Laplace approximation); run by ``PeftModel.end_training(data)``.
    loss(model, adapter): a term added to the task loss of every training forward pass.
    before_step(model, adapter, state): after backward (gradients present), before the optimizer
        step: gradient masks, rank allocation.
    after_step(model, adapter, state): after the optimizer step: updates of frozen weights.
    param_groups(model, adapter, lr, weight_decay): optimizer parameter groups for the adapter's
        trainable tensors (other learning rates or weight decay for some of them).
    resumable: the step hooks carry no state of their own across steps (see below).
    """

    before_training: DataPass | None = None
    after_training: DataPass | None = None
    loss: LossTerm | None = None
    before_step: StepHook | None = None
    after_step: StepHook | None = None
    param_groups: ParamGroups | None = None
    # The step hooks keep nothing between optimizer steps that the model's own state (the adapter's
    # tensors, the step count) does not hold, so a run resumed from a checkpoint continues exactly.
    resumable: bool = False

    @property
    def has_step_hooks(self) -> bool:
        return self.before_training is not None or self.before_step is not None or self.after_step is not None


@dataclass
class TrainingState:
    """Where training stands: optimizer steps taken so far and, when known, the total."""

    step: int = 0
    total_steps: int | None = None
    started: bool = False
    # The run's peak learning rate, when the driver knows it: a method whose data pass trains
    # (LT-SFT's dense phase, diff pruning's L0 phase) trains at it unless its config names another.
    learning_rate: float | None = None


class TrainingHookError(RuntimeError):
    """A method's training hook failed; the message names the method, the hook and the step."""


def run_hook(method: str, hook_name: str, state: TrainingState, hook: Callable[..., Any], *args: Any) -> Any:
    try:
        return hook(*args)
    except PeftlabError:  # the method's own message about the user's input: already clear
        raise
    except Exception as err:
        raise TrainingHookError(f"{method}: training hook {hook_name!r} failed at step {state.step}"
                                f"{f' of {state.total_steps}' if state.total_steps else ''}: "
                                f"{type(err).__name__}: {err}") from err
