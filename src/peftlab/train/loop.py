"""The training loop, on HF ``accelerate``.

The same code runs in one process, or under ``accelerate launch`` / ``torchrun`` (DDP): the
``Accelerator`` shards the data, wraps the model and averages gradients; we do not reimplement
any of it. Only parameters with ``requires_grad`` go to the optimizer, so a PEFT model's optimizer
state is as small as its adapter.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..core.errors import PeftlabError
from ..core.model import PeftModel

# ``probe(step, model, optimizer)`` may return a context manager to run one training step inside
# (forward, backward, optimizer step), e.g. to measure its memory; ``None`` leaves the step alone.
# Probed steps are left out of the step-time and throughput figures, since a probe costs time.
StepProbe = Callable[[int, nn.Module, Any], "ContextManager[Any] | None"]


@dataclass(frozen=True)
class TrainArgs:
    epochs: float = 1.0
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    max_steps: int | None = None
    seed: int = 0
    progress: bool = True


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0
    step_tokens: list[int] = field(default_factory=list)
    probed_steps: list[int] = field(default_factory=list)

    @property
    def median_step_s(self) -> float:
        # Skip the first steps (allocator and kernel warm-up) and probed ones (the probe's cost).
        probed = set(self.probed_steps)
        times = [t for i, t in enumerate(self.step_times) if i not in probed]
        times = times[3:] or times
        return float(np.median(times)) if times else float("nan")

    @property
    def tokens_per_s(self) -> float:
        probed = [i for i in self.probed_steps if i < len(self.step_times)]
        seconds = self.wall_s - sum(self.step_times[i] for i in probed)
        tokens = self.tokens - sum(self.step_tokens[i] for i in probed if i < len(self.step_tokens))
        return tokens / seconds if seconds > 0 else float("nan")


def _accelerator() -> Any:
    from accelerate import Accelerator

    # Under torchrun on a machine without a GPU, accelerate sets up DDP (gloo) only when told to
    # use the CPU; without it every process would silently train alone on its own shard.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=launched and not torch.cuda.is_available())


def train(model: nn.Module, loader: DataLoader, args: TrainArgs, accelerator: Any = None,
          on_step: Callable[[int, float], None] | None = None, probe: StepProbe | None = None) -> TrainResult:
    """Train ``model`` (any module whose forward returns ``.loss`` given the batch) on ``loader``.

    ``probe`` (see :data:`StepProbe`) wraps chosen steps, e.g. the assessment's memory measurement.
    """
    accelerator = accelerator or _accelerator()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PeftlabError("the model has no trainable parameters: nothing to train. "
                         "Wrap it with peftlab.get_peft_model(model, config) first, or unfreeze it.")
    # A PeftModel runs its methods' training hooks (data pass, step hooks, parameter groups).
    peft = model if isinstance(model, PeftModel) else None
    groups = peft.param_groups(args.lr, args.weight_decay) if peft else params
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    total = args.max_steps or max(1, math.ceil(len(loader) * args.epochs))
    if peft:
        peft.begin_training(loader, total, args.lr)
    warmup = int(total * args.warmup_ratio)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / max(warmup, 1), max(0.0, (total - s) / max(total - warmup, 1))))
    model.train()
    sync_device = accelerator.device.type == "cuda"
    result = TrainResult(steps=0, final_loss=float("nan"))
    bar = tqdm(total=total, desc="train", disable=not (args.progress and accelerator.is_local_main_process))
    start = time.perf_counter()
    while result.steps < total:
        for batch in loader:
            context = probe(result.steps, model, optimizer) if probe else None
            if context is not None:
                result.probed_steps.append(result.steps)
            t0 = time.perf_counter()
            with context or contextlib.nullcontext():
                loss = model(**batch).loss
                accelerator.backward(loss)
                if args.max_grad_norm:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                if peft:
                    peft.optimizer_step(optimizer)
                else:
                    optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                if sync_device:  # GPU kernels run asynchronously: wait, so the step time is the step's
                    torch.cuda.synchronize(accelerator.device)
            result.step_times.append(time.perf_counter() - t0)
            result.losses.append(loss.item())
            result.step_tokens.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0)
            result.tokens += result.step_tokens[-1]
            result.steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(result.losses[-20:]):.4f}")
            if on_step:
                on_step(result.steps, result.losses[-1])
            if result.steps >= total:
                break
    bar.close()
    result.wall_s = time.perf_counter() - start
    result.final_loss = float(np.mean(result.losses[-20:]))
    return result


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels over a loader, in order."""
    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    for batch in tqdm(loader, desc="eval", disable=not progress):
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        logits.append(out.logits.float().cpu())
        labels.append(batch["labels"].cpu())
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()
