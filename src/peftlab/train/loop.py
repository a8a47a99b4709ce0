"""The training loop, on HF ``accelerate``.

The same code runs in one process, or under ``accelerate launch`` / ``torchrun`` (DDP): the
``Accelerator`` shards the data, wraps the model, averages gradients, accumulates them over
micro-batches, runs mixed precision and writes checkpoints; we do not reimplement any of it. Only
parameters with ``requires_grad`` go to the optimizer, so a PEFT model's optimizer state is as
small as its adapter.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..core.errors import PeftlabError
from ..core.model import PeftModel
from ..core.registry import get_method, spec_for_config
from ..core.state import atomic_write_bytes, read_tensors, save_tensors

# ``probe(step, model, optimizer)`` may return a context manager to run one training step inside
# (forward, backward, optimizer step), e.g. to measure its memory; ``None`` leaves the step alone.
# Probed steps are left out of the step-time and throughput figures, since a probe costs time.
StepProbe = Callable[[int, nn.Module, Any], "ContextManager[Any] | None"]

PRECISIONS = ("no", "bf16", "fp16")
CHECKPOINT_PREFIX = "step-"  # checkpoint folders are step-<optimizer steps done>
LOOP_STATE = "loop.json"


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class TrainArgs:
    """``max_steps``, ``save_every`` and the schedule count optimizer steps; with
    ``grad_accum_steps`` = k, one step takes k batches of the loader (its gradients averaged).
    ``split_by_length``: see :func:`~peftlab.train.data.split_by_length`.
    ``checkpoint_dir``: where ``save_every`` writes checkpoints and ``resume`` reads the newest."""

    epochs: float = 1.0
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    max_steps: int | None = None
    seed: int = 0
    progress: bool = True
    grad_accum_steps: int = 1
    mixed_precision: str = "no"
    # Each batch run as parts of similar length, its gradient unchanged (peftlab.train.data.split_by_length):
    # less padding computed on text of varied length, and the same batches as plain shuffling.
    split_by_length: bool = False
    save_every: int | None = None
    checkpoint_dir: str | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        if not _whole(self.grad_accum_steps):
            raise PeftlabError(f"TrainArgs.grad_accum_steps={self.grad_accum_steps!r}: expected a positive whole "
                               "number of batches per optimizer step (1: no accumulation)")
        if self.mixed_precision not in PRECISIONS:
            raise PeftlabError(f"TrainArgs.mixed_precision={self.mixed_precision!r}: expected 'no', 'bf16' (CPU or "
                               "GPU) or 'fp16' (GPU only)")
        if self.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise PeftlabError("TrainArgs.mixed_precision='fp16' needs a CUDA GPU, and none is available; use "
                               "'bf16' (runs on CPU too) or 'no'")
        if self.save_every is not None and not _whole(self.save_every):
            raise PeftlabError(f"TrainArgs.save_every={self.save_every!r}: expected a positive whole number of "
                               "optimizer steps, or None for no checkpoints")
        if (self.save_every or self.resume) and not self.checkpoint_dir:
            raise PeftlabError("TrainArgs.save_every and resume need checkpoint_dir, the folder checkpoints go to")


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
    start_step: int = 0  # steps done before this call (a resumed run); timings cover the rest
    split_by_length: bool = False  # batches ran as parts of similar length (TrainArgs.split_by_length applied)
    kept_batches: list[Any] = field(default_factory=list, repr=False)  # see train(keep_batches=)

    @property
    def median_step_s(self) -> float:
        return self.median_step_s_over(len(self.step_times))

    def median_step_s_over(self, steps: int) -> float:
        """Median time of the first ``steps`` steps, skipping the first three (allocator and kernel
        warm-up) and the probed ones (the probe's cost)."""
        times = self.timed_steps_over(steps)
        return float(np.median(times)) if times else float("nan")

    def timed_steps_over(self, steps: int) -> list[float]:
        """The times :meth:`median_step_s_over` takes its median of."""
        probed = set(self.probed_steps)
        times = [t for i, t in enumerate(self.step_times[:steps]) if i not in probed]
        return times[3:] or times

    @property
    def tokens_per_s(self) -> float:
        probed = [i for i in self.probed_steps if i < len(self.step_times)]
        seconds = self.wall_s - sum(self.step_times[i] for i in probed)
        tokens = self.tokens - sum(self.step_tokens[i] for i in probed if i < len(self.step_tokens))
        return tokens / seconds if seconds > 0 else float("nan")


def _accelerator(args: TrainArgs) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Under torchrun on a machine without a GPU, accelerate sets up DDP (gloo) only when told to
    # use the CPU; without it every process would silently train alone on its own shard.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # accelerate keeps one state per process and refuses a second run's other mixed precision;
    # transformers' TrainingArguments resets it the same way. The process group is kept.
    AcceleratorState._reset_state()
    # mixed_precision=None for "no": a setting of `accelerate launch` stays in force.
    return Accelerator(cpu=launched and not torch.cuda.is_available(), gradient_accumulation_steps=args.grad_accum_steps,
                       mixed_precision=None if args.mixed_precision == "no" else args.mixed_precision)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest checkpoint in ``folder``; one being written has a temporary name until complete."""
    found = [p for p in Path(folder).glob(CHECKPOINT_PREFIX + "*")
             if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return max(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


class _Shuffle:
    """The loader's shuffling generator, saved with checkpoints (accelerate's custom-object state):
    its state when the epoch in progress began (to draw that epoch's order again) and now."""

    def __init__(self, loader: Any) -> None:
        self.generator = getattr(loader, "generator", None)
        self.epoch_start = self.saved = None

    def mark(self) -> None:
        if self.generator is not None:
            self.epoch_start = self.generator.get_state()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.generator is None else {"epoch_start": self.epoch_start, "now": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved = state

    def restore(self, key: str) -> None:
        """Set the generator to its saved ``"epoch_start"`` or ``"now"`` state (of a loaded checkpoint)."""
        if self.generator is not None and self.saved:
            self.generator.set_state(self.saved[key])


def _adapter_checkpoints(accelerator: Any, peft: PeftModel) -> None:
    """Checkpoint a PeftModel's trainable adapters, not the whole model: accelerate would save the
    frozen base too and load strictly, while sparse methods' tensors change size when chosen."""
    def save(models: list, weights: list, folder: str) -> None:
        if accelerator.is_main_process:
            for name in peft.trainable_adapters():
                save_tensors(Path(folder) / f"adapter-{name}.safetensors", peft.adapter_state_dict(name))
        weights.clear()

    def load(models: list, folder: str) -> None:
        for name in peft.trainable_adapters():
            path = Path(folder) / f"adapter-{name}.safetensors"
            peft.load_adapter_state_dict(name, read_tensors(path), str(path))
        models.clear()

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def _save_checkpoint(accelerator: Any, folder: Path, loop: dict[str, Any]) -> None:
    """Write a checkpoint under a temporary name and rename it when complete (so a run killed while
    saving leaves the previous one intact), then delete the older ones."""
    final = folder / f"{CHECKPOINT_PREFIX}{loop['step']:08d}"
    tmp = folder / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        atomic_write_bytes(tmp / LOOP_STATE, json.dumps(loop).encode())
        for path in tmp.iterdir():  # on disk before the rename makes the checkpoint count
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in folder.glob(CHECKPOINT_PREFIX + "*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _resume(accelerator: Any, args: TrainArgs, expected: dict[str, int]) -> dict[str, Any]:
    """Load the newest checkpoint into the prepared objects; returns its loop state."""
    found = latest_checkpoint(args.checkpoint_dir)
    if found is None:
        raise PeftlabError(f"resume: no checkpoint in {args.checkpoint_dir} (expected {CHECKPOINT_PREFIX}N folders "
                           "written with save_every); start without resume, or point checkpoint_dir at the "
                           "interrupted run's checkpoints")
    loop = json.loads((found / LOOP_STATE).read_text())
    differ = [f"{k}={loop.get(k)} there, {v} here" for k, v in expected.items() if loop.get(k) != v]
    if differ:
        raise PeftlabError(f"resume: the checkpoint {found} is from a run with other settings ({'; '.join(differ)}); "
                           "resume with the interrupted run's data, batch size, steps and accumulation")
    accelerator.load_state(str(found))
    return loop


def train(model: nn.Module, loader: DataLoader, args: TrainArgs, accelerator: Any = None,
          on_step: Callable[[int, float], None] | None = None, probe: StepProbe | None = None,
          keep_batches: int = 0) -> TrainResult:
    """Train ``model`` (any module whose forward returns ``.loss`` given the batch) on ``loader``.

    ``probe`` (see :data:`StepProbe`) wraps chosen optimizer steps, e.g. the assessment's memory
    measurement. ``on_step(step, loss)`` runs after each optimizer step. ``keep_batches`` = k keeps
    the first k training batches in ``result.kept_batches`` (the assessment times its frozen floor on
    exactly those; a method's data pass before them is not among them).

    With ``args.save_every`` a checkpoint goes to ``args.checkpoint_dir`` every that many steps:
    accelerate's ``save_state`` (optimizer, schedule, RNG, the shuffling generator), a PeftModel's
    trainable adapters, and the position in the data. ``args.resume`` continues from the newest one
    to the weights of a run never stopped (same seed, data and settings).
    """
    from transformers import get_scheduler

    if accelerator is None:
        accelerator = _accelerator(args)
    elif (args.grad_accum_steps, args.mixed_precision) not in {
            (1, "no"), (accelerator.gradient_accumulation_steps, accelerator.mixed_precision)}:
        raise PeftlabError(f"TrainArgs asks for grad_accum_steps={args.grad_accum_steps} and mixed_precision="
                           f"{args.mixed_precision!r}, but the accelerator given has {accelerator.gradient_accumulation_steps} "
                           f"and {accelerator.mixed_precision!r}; make them agree, or let train() build the accelerator")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PeftlabError("the model has no trainable parameters: nothing to train. "
                         "Wrap it with peftlab.get_peft_model(model, config) first, or unfreeze it.")
    # A PeftModel runs its methods' training hooks (data pass, step hooks, parameter groups).
    peft = model if isinstance(model, PeftModel) else None
    if peft and (args.save_every or args.resume):
        # A step hook that keeps its own state between steps (AdaLoRA's importance scores and rank
        # budget) would restart it on resume, training a different method: refused.
        stateful = sorted({method for method, _, _ in peft._hooks("after_step")
                           if not get_method(method).hooks.resumable})
        if stateful:
            raise PeftlabError(f"{', '.join(stateful)} keeps state between optimizer steps that a checkpoint does not "
                               "hold, so its training cannot be resumed; train it without save_every/resume")
    if args.save_every and not args.resume and latest_checkpoint(args.checkpoint_dir):
        raise PeftlabError(f"{args.checkpoint_dir} holds a checkpoint of an earlier run "
                           f"({latest_checkpoint(args.checkpoint_dir).name}); continue it with resume, or delete "
                           "the folder to start afresh")
    groups = peft.param_groups(args.lr, args.weight_decay) if peft else params
    optimizer = _adamw(groups, args)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accum = accelerator.gradient_accumulation_steps
    per_epoch = math.ceil(len(loader) / accum)  # the last batches of an epoch make a step
    total = args.max_steps or max(1, math.ceil(per_epoch * args.epochs))
    # Linear warm-up then linear decay to 0. Not prepared: accelerate would step it once per
    # process, for a length counted on the unsharded data; ours is counted on this process's shard.
    schedule = get_scheduler("linear", optimizer, num_warmup_steps=int(total * args.warmup_ratio),
                             num_training_steps=total)
    shuffle = _Shuffle(loader)
    loop: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "losses": [], "tokens": 0}
    settings = {"total": total, "batches_per_epoch": len(loader), "grad_accum_steps": accum}
    if args.save_every or args.resume:
        accelerator.register_for_checkpointing(schedule, shuffle)
        if peft:
            _adapter_checkpoints(accelerator, peft)
    if args.resume:
        loop = _resume(accelerator, args, settings)
    if peft:
        # Resumed: the adapters are loaded, so data passes keep the entries they chose then.
        peft.begin_training(loader, total, args.lr)
        peft.training_state.step = loop["step"]
    if loop["batch"] >= len(loader):  # stopped at an epoch's end: the next one draws a new order
        loop["epoch"], loop["batch"] = loop["epoch"] + 1, 0
        shuffle.restore("now")
    elif loop["batch"]:
        shuffle.restore("epoch_start")
    splitter = _splitter(args, peft, accelerator)
    model.train()
    sync_device = accelerator.device.type == "cuda"
    result = TrainResult(steps=loop["step"], final_loss=float("nan"), losses=list(loop["losses"]),
                         tokens=loop["tokens"], start_step=loop["step"], split_by_length=splitter is not None)
    bar = tqdm(total=total, initial=result.steps, desc="train",
               disable=not (args.progress and accelerator.is_local_main_process))
    start = time.perf_counter()
    micro = 0  # batches of the step in progress
    # ``steps`` holds the probe of the step in progress, which spans its micro-batches.
    with contextlib.ExitStack() as steps:
        while result.steps < total:
            skip = loop["batch"]
            shuffle.mark()  # the epoch starts here (or, resumed, the generator was set to its start)
            batches = iter(_skip(loader, skip))
            if skip:
                # The uninterrupted run drew this epoch's iterator seed before its first step, so the
                # global RNG (dropout) restored from the checkpoint must not move for it now.
                with torch.random.fork_rng(devices=[]):
                    first = next(batches, None)
                batches = itertools.chain([first] if first is not None else [], batches)
            for batch in batches:
                loop["batch"] += 1
                if len(result.kept_batches) < keep_batches:
                    result.kept_batches.append(batch)
                if micro == 0:
                    context = probe(result.steps, model, optimizer) if probe else None
                    if context is not None:
                        result.probed_steps.append(result.steps - result.start_step)
                        steps.enter_context(context)
                    t0, step_losses, step_tokens = time.perf_counter(), [], 0
                with accelerator.accumulate(model):
                    loss = _forward_backward(model, batch, accelerator, splitter)
                    if accelerator.sync_gradients:
                        if args.max_grad_norm:
                            accelerator.clip_grad_norm_(params, args.max_grad_norm)
                        if peft:  # the methods' step hooks run once per optimizer step
                            peft.optimizer_step(optimizer)
                        else:
                            optimizer.step()
                        if not optimizer.step_was_skipped:  # fp16: a step with inf gradients is skipped
                            schedule.step()
                        optimizer.zero_grad(set_to_none=True)
                micro += 1
                step_losses.append(loss.item())
                step_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
                if not accelerator.sync_gradients:
                    continue
                if sync_device:  # GPU kernels run asynchronously: wait, so the step time is the step's
                    torch.cuda.synchronize(accelerator.device)
                steps.close()
                micro = 0
                result.step_times.append(time.perf_counter() - t0)
                result.losses.append(float(np.mean(step_losses)))
                result.step_tokens.append(step_tokens)
                result.tokens += step_tokens
                result.steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(result.losses[-20:]):.4f}")
                if on_step:
                    on_step(result.steps, result.losses[-1])
                if args.save_every and (result.steps % args.save_every == 0 or result.steps == total):
                    loop.update(step=result.steps, losses=result.losses, tokens=result.tokens)
                    _save_checkpoint(accelerator, Path(args.checkpoint_dir), {**loop, **settings})
                if result.steps >= total:
                    break
            else:
                loop["epoch"], loop["batch"] = loop["epoch"] + 1, 0
    bar.close()
    result.wall_s = time.perf_counter() - start
    result.final_loss = float(np.mean(result.losses[-20:])) if result.losses else float("nan")
    inner = accelerator.unwrap_model(model)
    if "_original_forward" in inner.__dict__:
        # Take accelerate's autocast wrapper off, so scoring runs in the model's own precision. By
        # hand: unwrap_model(keep_fp32_wrapper=False) unwraps PeftModel.forward's own __wrapped__ too.
        inner.forward = inner.__dict__.pop("_original_forward")
    if peft:
        peft.end_training(loader)  # post-hoc fits (a Laplace approximation) over the training batches
    return result


class _Splitter:
    """Cuts training batches by length (``TrainArgs.split_by_length``); a batch that cannot be cut
    exactly runs whole, with one notice per run naming why."""

    def __init__(self) -> None:
        from .data import split_by_length  # here: .data imports .generation, which imports this module

        self.split, self.warned = split_by_length, False

    def __call__(self, batch: Any) -> list[tuple[Any, float]] | None:
        # A Mapping: transformers' collators return a BatchEncoding, which is not a dict.
        parts, why = self.split(batch) if isinstance(batch, Mapping) else (None, "the batch is not a mapping")
        if parts is None and not self.warned:
            self.warned = True
            warnings.warn(f"split_by_length: {why}; batches run whole (padded to their longest row)", stacklevel=4)
        return parts


def _splitter(args: TrainArgs, peft: PeftModel | None, accelerator: Any) -> _Splitter | None:
    if not args.split_by_length:
        return None
    if accelerator.device.type != "cpu":
        # The part cost is measured on CPU threads; on an accelerator a kernel launch per part may cost
        # more than the padding it saves, and no GPU was at hand to measure it.
        warnings.warn(f"split_by_length is measured for CPU training only; on {accelerator.device.type} batches run "
                      "whole", stacklevel=3)
        return None
    drawing = sorted({spec.name for spec in map(spec_for_config, peft.peft_configs.values())
                      if spec.draws_per_forward}) if peft else []
    if drawing:
        warnings.warn(f"split_by_length: {', '.join(drawing)} draws its random choice once per forward pass, so a "
                      "batch cut into parts would draw it once per part; batches run whole", stacklevel=3)
        return None
    return _Splitter()


def _forward_backward(model: nn.Module, batch: Any, accelerator: Any, splitter: _Splitter | None) -> torch.Tensor:
    """Forward and backward on one batch; returns its loss. Split: each part's loss times its share
    of the rows, so the gradients summed over the parts are the whole batch's."""
    parts = splitter(batch) if splitter else None
    if not parts or len(parts) == 1:
        loss = model(**batch).loss
        accelerator.backward(loss)  # divided by grad_accum_steps: the step averages its batches
        return loss
    total = 0.0
    for i, (part, share) in enumerate(parts):
        # Under DDP, gradients are averaged across processes once, on the batch's last part.
        with accelerator.no_sync(model) if i < len(parts) - 1 else contextlib.nullcontext():
            loss = model(**part).loss * share
            accelerator.backward(loss)
        total = total + loss.detach()
    return total


def _adamw(groups: Any, args: TrainArgs) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where every trainable tensor allows it: on a CPU, full fine-tuning
    of the MiniLM takes 22 ms per optimizer step fused against 160 ms with the per-tensor loop (one
    thread). Where a device or dtype has no fused kernel, the standard implementation (same update)."""
    try:
        return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


def _skip(loader: Any, count: int) -> Any:
    """``loader`` without its first ``count`` batches (a DataLoader skips them without loading)."""
    if not count:
        return loader
    if isinstance(loader, DataLoader):
        from accelerate import skip_first_batches

        return skip_first_batches(loader, count)
    return list(loader)[count:]


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
