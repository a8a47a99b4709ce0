"""Speed and memory of every registered peftlab method, side by side with its floor and HF peft.

Run from the repository root::

    python -m benchmarks.run                        # MiniLM, GPT-2-100M, Llama-100M (CPU, 2 threads)
    python -m benchmarks.run --model minilm         # one model; other models' results are kept
    python -m benchmarks.run --quick --out /tmp/b   # tiny models, two steps: a smoke run for CI
    python -m benchmarks.run --model llama-1b --device cuda

Writes ``<out>.json`` (all figures, every repetition) and ``<out>.md`` (generated from the JSON).
What each row means is written in :func:`describe` and printed at the top of the Markdown file.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import itertools
import json
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# Waiting OpenMP threads sleep instead of spinning. On a machine other processes share, a spinning
# thread holds the core its descheduled sibling needs, so each parallel operator can stall for a
# scheduler slice (2 threads ran 4-6x slower than 1 in our measurements) and cases differ by how
# many operators they launch. Only effective before torch loads OpenMP; an explicit setting is kept.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

if __package__ in (None, ""):  # `python benchmarks/run.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import (Timings, held_tensors, interleaved_times, parallel_speedup, peak_rise_bytes,
                                storage_bytes)
from benchmarks.models import DEFAULT_MODELS, MODELS, QUICK_MODELS, BenchModel, make_batch
from benchmarks.report import own_length, write_markdown

from peftlab import get_peft_model
from peftlab.core.registry import MethodSpec, all_methods, get_method
from peftlab.core.state import atomic_write_bytes

# Configurations measured per method (default: its config's defaults), and whether the variant
# also gets inference rows (dropout does nothing at inference, so that variant would repeat them).
VARIANTS: dict[str, list[tuple[dict[str, Any], bool]]] = {
    # all-linear: LoRAPrune's placement, so its row has LoRA at the same layers beside it
    "lora": [({}, True), ({"dropout": 0.1}, False), ({"use_dora": True}, True), ({"targets": "all-linear"}, False)],
    "child_tuning": [({}, True), ({"mode": "F"}, False)],
    "propetl": [({}, True), ({"form": "prefix"}, True)],
    # Phase 1 (full fine-tuning in the data pass) would otherwise last the whole nominal run.
    "lt_sft": [({"dense_steps": 1}, True)],
    # Likewise diff pruning's stage 1 (the L0-penalised dense difference).
    "diff_pruning": [({"l0_steps": 1}, True)],
}
MIXED_KS = (1, 2, 4, 8)
MIXED_EXAMPLES = 32
# (what, table, row label, column, limit): the speed targets the LoRA implementation must hold.
TARGETS = [
    ("LoRA training step / floor", "train", "lora", "x_floor", 1.03),
    ("LoRA (dropout 0.1) training step / floor", "train", "lora (dropout=0.1)", "x_floor", 1.10),
    ("LoRA unmerged inference / base model", "inference", "lora", "x_base", 1.02),
    ("LoRA merged inference / base model", "inference", "lora merged", "x_base", 1.005),
    ("LoRA batch over 8 adapters / batch with one adapter", "mixed", "lora k=8", "x_single", 1.15),
]
OTHER_METHODS_FLOOR = 1.10


def describe() -> list[str]:
    return [
        "**Floor**: the base model in training mode (dropout on) with every weight frozen "
        "(`requires_grad=False`) and the input-embedding output made to require grad (a forward hook), "
        "so `loss.backward()` computes the gradient of every activation through every layer down to the "
        "embeddings but no weight gradient; no optimizer step. A PEFT method cannot train much faster: it "
        "needs the same forward and, below its first trainable tensor, the same input-gradient backward "
        "(one whose first trainable tensor sits inside layer 0, such as LoRA on the query, skips the "
        "embedding part of that backward and can land a little under 1.0; prompt methods lengthen the "
        "sequence and sit above it).",
        "**Training step**: forward with labels (classification: cross-entropy over 2 labels; LM: next-token "
        "loss), `backward()`, `AdamW(fused=True).step()`, `zero_grad(set_to_none=True)`; median over repetitions after "
        "warm-up. Full fine-tuning trains every weight. peftlab methods use `spec.config_cls()` defaults "
        "(plus the listed variants) and train only the method's parameters: no task head, so the method's "
        "own cost is isolated. HF peft rows hold the very same adapter: peftlab's `save_pretrained` output, "
        "read back with `peft.get_peft_model(PeftConfig.from_pretrained(...))` and "
        "`set_peft_model_state_dict`; peft's automatic classifier copy is frozen so both train the same "
        "parameters (the note column says where peft could not read peftlab's weights).",
        "**Ratios** (`x floor`, `x base`, `x peft`, ...) are medians over rounds: cases take turns (A, B, C, "
        "then C, B, A, ...), the reference (floor; base model; one-adapter batch) runs before every 4 of them, "
        "and each time is first divided by the mean of the reference runs just before and after it, so load "
        "that changes within a round cancels. `step ms`/`ms` are raw medians. The `(CPU)` columns "
        "use process CPU time instead of wall time. The runner sets `OMP_WAIT_POLICY=PASSIVE` (unless set): "
        "on a shared machine spinning OpenMP threads otherwise stall every parallel operator, which "
        "penalizes cases by operator count instead of work.",
        "**Peak memory**: live tensor bytes held by the case (weights, buffers, gradients, optimizer state, "
        "each storage once) plus the largest rise during one step. CPU: from `torch.profiler` memory events "
        "of PyTorch's allocator — sees autograd's saved activations, misses oneDNN/MKL scratch space, "
        "Python objects and fragmentation. CUDA: `torch.cuda.max_memory_allocated`.",
        "**Inference**: `torch.inference_mode()` forward without labels, eval mode. Unmerged peftlab LoRA "
        "folds its update into a temporary weight per call when no gradient is wanted (see "
        "`methods/reparameterized/lora.py`); *merged*: `merge_and_unload()`, which returns the plain base "
        "model with the update folded into its weights.",
        "**Own-length floor**: a method that lengthens the sequence (prompt tuning: its virtual tokens go "
        "through every layer) is also compared with the floor run on as many tokens as its base model sees "
        "(measured with a hook, e.g. `floor (148 tokens)`); `x own-length floor` is `=` where that is the "
        "common batch. Targets: LoRA's own, then for every other method `x own-length floor <= 1.10`, and for "
        "each method peft also has: step time and peak memory <= peft's.",
        "**Reading a `no` against peft**: where both rows do the same arithmetic (prompt tuning prepends the "
        "same embeddings; (IA)^3 multiplies by the same vectors) the step-time ratio to peft is this machine's "
        "run-to-run noise, and its sign changed between runs on unchanged code; both sit at their floor. A "
        "target marked *not comparable* compares adapters of different sizes: peft builds another adapter "
        "from the same config (GPT-2's fused `c_attn` in (IA)^3, the prefix MLP's width under grouped-query "
        "attention).",
        "**GPU**: the 1B-parameter Llama in bf16 (`--model llama-1b`, CUDA) has a section here only when the "
        "command ran on a machine with a GPU.",
        "**Mixed batch**: one forward of the batch where example i uses adapter `a{i mod k}` "
        "(`adapter_names=[...]`), k distinct adapters; `x single` compares with the same model's plain "
        "forward with one active adapter.",
    ]


# -- cases ---------------------------------------------------------------------------------
@dataclass
class TrainCase:
    label: str
    impl: str  # floor | full | peftlab | peft
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    method: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    counterpart: str | None = None  # label of the peft row a peftlab row is compared with
    note: str = ""
    infer: bool = True  # also measured at inference
    # A method that lengthens the sequence (prompt tuning) is also compared with a floor fed that
    # many tokens: its own floor, which its extra tokens cannot beat.
    batch: dict[str, torch.Tensor] | None = None  # None: the common batch
    own_floor: str = "floor"

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def clone_model(model: nn.Module, share: bool) -> nn.Module:
    """A copy of ``model``; with ``share`` its weights and buffers are the template's tensors
    (new Parameter objects, same storage), so many frozen cases cost one model's memory."""
    if not share:
        return copy.deepcopy(model)
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        memo[id(t)] = nn.Parameter(t.detach(), requires_grad=False) if isinstance(t, nn.Parameter) else t
    return copy.deepcopy(model, memo)


def _template_storages(template: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in itertools.chain(template.parameters(), template.buffers())}


def _writes_template(model: nn.Module, storages: set[int]) -> bool:
    """True when a trainable tensor of ``model`` is a shared template weight (BitFit's biases)."""
    return any(p.requires_grad and p.untyped_storage().data_ptr() in storages for p in model.parameters())


def variant_label(spec: MethodSpec, variant: dict[str, Any]) -> str:
    if not variant:
        return spec.name
    return f"{spec.name} ({', '.join(f'{k}={v}' for k, v in variant.items())})"


def _adamw(model: nn.Module) -> torch.optim.Optimizer | None:
    # fused: one kernel for all parameters instead of ~10 small ops per tensor, which on a busy
    # machine would cost each method in proportion to how many tensors it trains.
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-5, fused=True) if params else None


def _peft_from(peftlab_model: nn.Module, template: nn.Module, folder: Path, adapters: list[str],
               trainable: bool, notes: list[str]) -> nn.Module:
    """HF peft model holding the same adapters, built from the config and weights peftlab saved."""
    import peft
    from safetensors.torch import load_file

    peftlab_model.save_pretrained(folder, adapter_names=adapters)
    model = None
    for name in adapters:
        path = folder if name == "default" else folder / name
        config = peft.PeftConfig.from_pretrained(str(path))
        config.inference_mode = not trainable
        if model is None:
            model = peft.get_peft_model(clone_model(template, share=True), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        # peft adds a classifier copy for SEQ_CLS and expects it in the file; peftlab rows train no
        # head, so that copy keeps peft's own (unchanged) weights.
        own = peft.get_peft_model_state_dict(model, adapter_name=name)
        try:
            result = peft.set_peft_model_state_dict(
                model, {**own, **load_file(str(path / "adapter_model.safetensors"))}, adapter_name=name)
            # soft prompts are loaded beside load_state_dict and so always come back as 'unexpected'
            if result.unexpected_keys and not config.is_prompt_learning:
                raise RuntimeError(f"keys {result.unexpected_keys[:3]} matched nothing")
        except Exception as err:  # speed does not depend on the values: keep peft's own init, say so
            detail = " ".join(str(err).split())[:160]
            notes.append(f"peft could not read peftlab's weights ({type(err).__name__}: {detail}); "
                         "same config, peft's own initial weights")
    model.set_adapter(adapters[0])
    for pname, param in model.named_parameters():
        if "modules_to_save" in pname:  # that classifier copy stays frozen: both rows train the same set
            param.requires_grad_(False)
    return model


def _input_grad_hook(model: nn.Module) -> None:
    model.get_input_embeddings().register_forward_hook(lambda mod, args, out: out.requires_grad_(True))


def seen_length(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Sequence length the base model inside a peftlab ``model`` is actually run on."""
    seen: list[int] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        x = kwargs.get("inputs_embeds")
        x = kwargs.get("input_ids") if x is None else x
        seen.append((x if x is not None else args[0]).shape[1])

    handle = model.base_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return seen[0]


def build_train_cases(template: nn.Module, specs: list[MethodSpec], use_peft: bool, only: re.Pattern | None,
                      tmp: Path, errors: list[dict[str, str]], bench: BenchModel, batch: dict[str, torch.Tensor]
                      ) -> list[TrainCase]:
    storages = _template_storages(template)
    floor = clone_model(template, share=True).train()
    _input_grad_hook(floor)
    cases = [TrainCase("floor", "floor", floor, None)]
    own_floors: dict[int, str] = {batch["input_ids"].shape[1]: "floor"}
    if only is None or only.search("full FT"):
        full = clone_model(template, share=False).train()
        for p in full.parameters():
            p.requires_grad_(True)
        cases.append(TrainCase("full FT", "full", full, _adamw(full)))
    for spec in specs:
        for variant, infer in VARIANTS.get(spec.name, [({}, True)]):
            label = variant_label(spec, variant)
            if only is not None and not only.search(label):
                continue
            try:
                # A method that builds on other adapters has no default config of its own: its example's.
                config = spec.example()[1].replace(**variant) if spec.example else spec.config_cls(**variant)
                model = _apply(spec, clone_model(template, share=True), config).train()
                if _writes_template(model, storages):
                    model = _apply(spec, clone_model(template, share=False), config).train()
                # Data passes (Fisher, a dense phase) run once, here, at the optimizer's rate.
                model.begin_training([batch], total_steps=10**6, learning_rate=1e-5)
            except Exception as err:  # a method that does not apply to this architecture
                errors.append({"case": label, "error": f"{type(err).__name__}: {err}"})
                continue
            case = TrainCase(label, "peftlab", model, _adamw(model), spec.name, config.to_dict(), infer=infer)
            if spec.changes_sequence_length:
                length = seen_length(model, batch)
                if length not in own_floors:
                    own_floors[length] = f"floor ({length} tokens)"
                    cases.append(TrainCase(own_floors[length], "floor", floor, None, infer=False,
                                           batch=make_batch(bench, batch["input_ids"].shape[0], length,
                                                            batch["input_ids"].device.type)))
                case.own_floor = own_floors[length]
            cases.append(case)
            if use_peft and spec.peft_type:
                try:
                    notes: list[str] = []
                    pmodel = _peft_from(model, template, tmp / label.replace(" ", "_"), ["default"], True, notes).train()
                except Exception as err:
                    errors.append({"case": f"peft {label}", "error": f"{type(err).__name__}: {err}"})
                    continue
                cases.append(TrainCase(f"peft {label}", "peft", pmodel, _adamw(pmodel), spec.name, config.to_dict(),
                                       infer=infer))
                case.counterpart = f"peft {label}"
                cases[-1].own_floor = case.own_floor
                if cases[-1].trainable != case.trainable:
                    notes.append(f"trains {cases[-1].trainable:,} parameters, peftlab {case.trainable:,}")
                cases[-1].note = "; ".join(dict.fromkeys(notes))
    return cases


def _apply(spec: MethodSpec, model: nn.Module, config: Any) -> nn.Module:
    """The method on ``model``; one that builds on other adapters (``spec.example``) gets them first,
    frozen, as it would find them after their own training."""
    if spec.example is None:
        return get_peft_model(model, config)
    prerequisites, _ = spec.example()
    names = list(prerequisites)
    peft_model = get_peft_model(model, prerequisites[names[0]], names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, prerequisites[name])
    peft_model.add_adapter("default", config)
    peft_model.set_adapter("default")
    return peft_model


def _train_step(case: TrainCase, batch: dict[str, torch.Tensor]) -> None:
    out = case.model(**batch)
    out.loss.backward()
    if case.optimizer is not None:
        # A peftlab model runs its methods' step hooks (gradient masks, ...) around the step.
        step = getattr(case.model, "optimizer_step", None) if case.impl == "peftlab" else None
        step(case.optimizer) if step else case.optimizer.step()
        case.optimizer.zero_grad(set_to_none=True)


def _perturb(params: list[nn.Parameter], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_((torch.randn(p.shape, generator=g) * 0.02).to(p.device, p.dtype))


# -- the three measurements ----------------------------------------------------------------
def run_training(cases: list[TrainCase], batch: dict[str, torch.Tensor], device: str,
                 repeats: int, warmup: int, errors: list[dict[str, str]], log: Callable[[str], None]) -> list[dict]:
    steps = _working({c.label: (lambda c=c: _train_step(c, c.batch or batch)) for c in cases}, errors,
                     "training step")
    ok = [c for c in cases if c.label in steps]
    memory: dict[str, tuple[int, int]] = {}
    for case in ok:
        held = storage_bytes(held_tensors(case.model, case.optimizer))
        memory[case.label] = (held, held + peak_rise_bytes(steps[case.label], device))
    log(f"  training: {len(ok)} cases x {repeats} rounds")
    timings = interleaved_times(steps, repeats, max(warmup - 1, 0), device, reference="floor")
    rows = []
    for case in ok:
        tokens = (case.batch or batch)["input_ids"].numel()
        t = timings.wall[case.label]
        row: dict[str, Any] = {
            "label": case.label, "impl": case.impl, "method": case.method, "config": case.config,
            "trainable": case.trainable, "times_s": t, "cpu_times_s": timings.cpu[case.label],
            "step_ms": 1e3 * _median(t), "tokens_per_s": tokens / _median(t),
            **_ratios("x_floor", timings, case.label, "floor"),
            "own_floor": case.own_floor, **_ratios("x_own_floor", timings, case.label, case.own_floor),
            **_ratios("x_full", timings, case.label, "full FT"),
            **_ratios("x_peft", timings, case.label, case.counterpart),
            "held_mb": memory[case.label][0] / 2**20, "peak_mb": memory[case.label][1] / 2**20,
            "peak_x_floor": memory[case.label][1] / memory["floor"][1], "note": case.note,
        }
        rows.append(row)
    return rows


def run_inference(template: nn.Module, cases: list[TrainCase], specs: dict[str, MethodSpec],
                  batch: dict[str, torch.Tensor], device: str, repeats: int, warmup: int,
                  errors: list[dict[str, str]], log: Callable[[str], None]) -> list[dict]:
    models: dict[str, tuple[nn.Module, str, str | None, str | None]] = {"base": (template, "base", None, None)}
    cases = [c for c in cases if c.infer and c.impl in ("peftlab", "peft")]
    for case in cases:
        models[case.label] = (case.model, case.impl, case.method, case.counterpart)
    for case in cases:
        spec = specs.get(case.method or "")
        if case.impl == "peftlab" and spec is not None and spec.mergeable:
            try:
                merged = get_peft_model(clone_model(template, share=False), case.model.peft_configs["default"])
                _perturb(merged.adapter_parameters("default"), 1)
                models[f"{case.label} merged"] = (merged.merge_and_unload(), "peftlab", case.method, None)
            except Exception as err:
                errors.append({"case": f"{case.label} merged", "error": f"{type(err).__name__}: {err}"})
    for model, *_ in models.values():
        model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def forward(model: nn.Module) -> None:
        with torch.inference_mode():
            model(**inputs)

    fns = _working({k: (lambda m=m[0]: forward(m)) for k, m in models.items()}, errors, "inference")
    models = {k: v for k, v in models.items() if k in fns}
    log(f"  inference: {len(models)} cases x {repeats} rounds")
    timings = interleaved_times(fns, repeats, max(warmup - 1, 0), device, reference="base")
    rows = []
    for label, (_, impl, method, counterpart) in models.items():
        t = timings.wall[label]
        rows.append({"label": label, "impl": impl, "method": method, "times_s": t, "cpu_times_s": timings.cpu[label],
                     "ms": 1e3 * _median(t), **_ratios("x_base", timings, label, "base"),
                     **_ratios("x_peft", timings, label, counterpart)})
    return rows


def run_mixed(template: nn.Module, specs: list[MethodSpec], batch: dict[str, torch.Tensor], device: str,
              repeats: int, warmup: int, use_peft: bool, only: re.Pattern | None, tmp: Path,
              errors: list[dict[str, str]], log: Callable[[str], None]) -> list[dict]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    n = inputs["input_ids"].shape[0]
    names = [f"a{i}" for i in range(max(MIXED_KS))]
    fns: dict[str, Callable[[], object]] = {}
    meta: dict[str, dict[str, Any]] = {}
    checks: list[tuple[str, nn.Module, nn.Module]] = []
    for spec in specs:
        if not getattr(spec, "supports_mixed_batch", False) or (only is not None and not only.search(spec.name)):
            continue
        try:
            model = get_peft_model(clone_model(template, share=True), spec.config_cls(), names[0])
            for name in names[1:]:
                model.add_adapter(name, spec.config_cls())
            for i, name in enumerate(names):
                _perturb(model.adapter_parameters(name), 10 + i)
            model.set_adapter(names[0])
            model.eval()
        except Exception as err:
            errors.append({"case": f"mixed {spec.name}", "error": f"{type(err).__name__}: {err}"})
            continue
        impls = [("peftlab", model)]
        if use_peft and spec.peft_type:
            try:
                pm = _peft_from(model, template, tmp / f"mixed_{spec.name}", names, False, []).eval()
                impls.append(("peft", pm))
                checks.append((spec.name, model, pm))
            except Exception as err:
                errors.append({"case": f"mixed peft {spec.name}", "error": f"{type(err).__name__}: {err}"})
        for impl, m in impls:
            key = f"{impl} {spec.name} single"
            fns[key] = lambda m=m: _forward(m, inputs)
            meta[key] = {"method": spec.name, "impl": impl, "k": 0}
            for k in MIXED_KS:
                chosen = [names[i % k] for i in range(n)]
                key = f"{impl} {spec.name} k={k}"
                fns[key] = lambda m=m, chosen=chosen: _forward(m, inputs, adapter_names=chosen)
                meta[key] = {"method": spec.name, "impl": impl, "k": k}
    if not fns:
        return []
    fns = _working(fns, errors, "mixed batch")
    parity = {}
    chosen = [names[i % max(MIXED_KS)] for i in range(n)]
    for method, model, pm in checks:  # same adapters, same batch: the two libraries must agree
        if f"peftlab {method} k={max(MIXED_KS)}" in fns and f"peft {method} k={max(MIXED_KS)}" in fns:
            with torch.inference_mode():
                a, b = _logits(model(**inputs, adapter_names=chosen)), _logits(pm(**inputs, adapter_names=chosen))
            parity[method] = float((a.float() - b.float()).abs().max())
    meta = {k: v for k, v in meta.items() if k in fns}
    log(f"  mixed batches: {len(fns)} cases x {repeats} rounds")
    timings = interleaved_times(fns, repeats, max(warmup - 1, 0), device)  # reference: peftlab's single adapter
    rows = []
    for key, info in meta.items():
        t = timings.wall[key]
        peer = f"peft {info['method']} " + (f"k={info['k']}" if info["k"] else "single")
        rows.append({"label": f"{info['method']} " + (f"k={info['k']}" if info["k"] else "single"), **info,
                     "times_s": t, "cpu_times_s": timings.cpu[key], "ms": 1e3 * _median(t),
                     **_ratios("x_single", timings, key, f"{info['impl']} {info['method']} single"),
                     **_ratios("x_peft", timings, key, peer if info["impl"] == "peftlab" else None),
                     "max_abs_diff_vs_peft": parity.get(info["method"]) if info["impl"] == "peftlab" else None})
    return rows


def _working(fns: dict[str, Callable[[], object]], errors: list[dict[str, str]], what: str
             ) -> dict[str, Callable[[], object]]:
    """Call each once (the first warm-up call): one that fails is reported and left out, not fatal."""
    ok = {}
    for key, fn in fns.items():
        try:
            fn()
            ok[key] = fn
        except Exception as err:
            errors.append({"case": key, "error": f"{what}: {type(err).__name__}: {err}"})
    return ok


def _ratios(name: str, timings: Timings, key: str, ref: str | None) -> dict[str, float | None]:
    """``name`` (wall-clock ratio) and ``name_cpu`` (process-CPU-time ratio) of ``key`` to ``ref``."""
    if ref not in timings.wall:
        return {name: None, f"{name}_cpu": None}
    return {name: timings.ratio(key, ref), f"{name}_cpu": timings.ratio(key, ref, cpu=True)}


def _forward(model: nn.Module, inputs: dict[str, torch.Tensor], **kwargs: Any) -> None:
    with torch.inference_mode():
        model(**inputs, **kwargs)


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def _median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


def check_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for what, table, label, column, limit in TARGETS:
        rows = [r for r in result.get(table, []) if r["label"] == label and r.get("impl", "peftlab") == "peftlab"]
        value = rows[0][column] if rows and rows[0].get(column) is not None else None
        value_cpu = rows[0].get(f"{column}_cpu") if rows else None
        out.append(_target(what, limit, value, value_cpu))
    # Every method without a target of its own above: at most 1.10x the floor at its own sequence
    # length; and where peft has the method, no slower and no larger at its peak than peft.
    own = {label for _, table, label, _, _ in TARGETS if table == "train"}
    rows = {r["label"]: r for r in result.get("train", [])}
    for r in rows.values():
        if r["impl"] != "peftlab":
            continue
        if r["label"] not in own and needs_weight_gradients(r.get("method")):
            # Its delta is as large as the weights it targets: full fine-tuning's step is its floor.
            out.append(_target(f"{r['label']} training step / full fine-tuning", OTHER_METHODS_FLOOR,
                               r["x_full"], r.get("x_full_cpu")))
        elif r["label"] not in own:
            length = own_length(r["own_floor"])
            where = f" ({length})" if length else ""
            out.append(_target(f"{r['label']} training step / floor at its own length{where}", OTHER_METHODS_FLOOR,
                               r["x_own_floor"], r["x_own_floor_cpu"]))
        peer = rows.get(f"peft {r['label']}")
        if peer is not None:
            # peft may build another adapter from the same config (GPT-2's fused qkv in (IA)^3, the
            # prefix MLP's width under GQA): then the two rows are not the same work.
            unlike = (f"peft trains {peer['trainable']:,} parameters, peftlab {r['trainable']:,}"
                      if peer["trainable"] != r["trainable"] else None)
            out.append(_target(f"{r['label']} training step / peft's", 1.0, r["x_peft"], r["x_peft_cpu"], unlike))
            out.append(_target(f"{r['label']} peak training memory / peft's", 1.0, r["peak_mb"] / peer["peak_mb"],
                               None, unlike))
    return out


def needs_weight_gradients(method: str | None) -> bool:
    try:
        return bool(method) and get_method(method).needs_weight_gradients
    except Exception:  # a row of a method this peftlab no longer has
        return False


def _target(what: str, limit: float, value: float | None, value_cpu: float | None = None,
            unlike: str | None = None) -> dict[str, Any]:
    ok = None if value is None or unlike else bool(value <= limit)
    return {"target": what, "limit": limit, "value": value, "value_cpu": value_cpu, "ok": ok, "unlike": unlike}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


# -- driver --------------------------------------------------------------------------------
def bench_model(spec: BenchModel, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    device = args.device or spec.device
    dtype = spec.dtype if device.startswith("cuda") else torch.float32
    batch_size, seq = args.batch or spec.batch, args.seq or spec.seq
    torch.manual_seed(0)
    template = spec.build().to(device=device, dtype=dtype)
    for p in template.parameters():
        p.requires_grad_(False)
    batch = make_batch(spec, batch_size, seq, device)
    # Mixed batches need room for 8 adapters: at least MIXED_EXAMPLES examples, the same number of
    # tokens as the training batch where that batch is smaller (shorter sequences).
    mixed_n = max(batch_size, MIXED_EXAMPLES)
    mixed = make_batch(spec, mixed_n, max(8, batch_size * seq // mixed_n), device)
    specs = [s for s in all_methods() if not s.internal]  # a search stage is measured as its method
    only = re.compile(args.only) if args.only else None
    use_peft = not args.no_peft
    if use_peft:
        try:
            import peft  # noqa: F401
        except ImportError:
            log("  peft is not installed (pip install -e .[bench]); peft rows are skipped")
            use_peft = False
    errors: list[dict[str, str]] = []
    started = time.time()
    busy = {"load_before": os.getloadavg()[0], "speedup_before": parallel_speedup(torch.get_num_threads())}
    with tempfile.TemporaryDirectory() as tmp:
        result: dict[str, Any] = {}
        cases = build_train_cases(template, specs, use_peft, only, Path(tmp), errors, spec, batch) \
            if args.parts & {"train", "inference"} else []
        if "train" in args.parts:
            result["train"] = run_training(cases, batch, device, args.repeats, args.warmup, errors, log)
        if "inference" in args.parts:
            result["inference"] = run_inference(template, cases, {s.name: s for s in specs}, batch, device,
                                                args.infer_repeats, args.warmup, errors, log)
        del cases
        gc.collect()
        if "mixed" in args.parts:
            result["mixed"] = run_mixed(template, specs, mixed, device, args.infer_repeats, args.warmup, use_peft,
                                        only, Path(tmp), errors, log)
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    busy.update(load_after=os.getloadavg()[0], speedup_after=parallel_speedup(torch.get_num_threads()))
    result["meta"] = {
        "model": spec.name, "description": spec.description, "batch": batch_size, "seq": seq, "device": device,
        "mixed_batch": mixed_n, "mixed_seq": mixed["input_ids"].shape[1],
        "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "repeats": args.repeats, "infer_repeats": args.infer_repeats, "warmup": args.warmup,
        "command": " ".join(["python -m benchmarks.run", *args.argv]), "machine": machine(),
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": round(time.time() - started, 1), **{k: round(v, 2) for k, v in busy.items()},
        "methods": [s.name for s in specs],
    }
    result["errors"] = errors
    result["targets"] = check_targets(result)
    return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--model", help=f"comma-separated, from {', '.join(MODELS)} (default: {', '.join(DEFAULT_MODELS)})")
    p.add_argument("--quick", action="store_true", help="tiny models, 2 rounds: checks the runner, not speed")
    p.add_argument("--out", default="docs/benchmarks", help="writes OUT.json and OUT.md (default docs/benchmarks)")
    p.add_argument("--device", help="cpu or cuda (default: the model's own, cpu except llama-1b)")
    p.add_argument("--repeats", type=int, help="timed training rounds (default 5; quick 2)")
    p.add_argument("--infer-repeats", type=int, help="timed inference rounds (default 7; quick 2)")
    p.add_argument("--warmup", type=int, help="untimed calls per case before timing (default 1)")
    p.add_argument("--batch", type=int, help="override the model's batch size")
    p.add_argument("--seq", type=int, help="override the model's sequence length")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--only", help="regex: measure only peftlab methods/variants whose label matches")
    p.add_argument("--no-peft", action="store_true", help="skip the HF peft rows")
    p.add_argument("--report-only", action="store_true", help="measure nothing: rewrite OUT.md from OUT.json")
    p.add_argument("--parts", default="train,inference,mixed",
                   help="comma-separated subset of train,inference,mixed (default: all three)")
    args = p.parse_args(argv)
    args.argv = argv
    args.parts = set(args.parts.split(","))
    if not args.parts <= {"train", "inference", "mixed"}:
        p.error(f"--parts {sorted(args.parts)}: choose from train, inference, mixed")
    # Fewer rounds left ratios of identical work (prompt tuning here and in peft) 6% apart between runs.
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.infer_repeats = args.infer_repeats or (2 if args.quick else 7)
    args.warmup = 1 if args.warmup is None else args.warmup
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    names = args.model.split(",") if args.model else list(QUICK_MODELS if args.quick else DEFAULT_MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model {unknown}; choose from {', '.join(MODELS)}")
    out = Path(args.out)
    json_path, md_path = out.with_suffix(".json"), out.with_suffix(".md")
    data: dict[str, Any] = {"models": {}}
    if json_path.exists():  # keep the other models' results: one file holds every model's latest run
        data = json.loads(json_path.read_text())
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if args.report_only:
        write_markdown(data, md_path, describe(), TARGETS)
        return data
    torch.set_num_threads(args.threads)
    for name in names:
        log(f"{name}: {MODELS[name].description}")
        data["models"][name] = bench_model(MODELS[name], args, log)
        log(f"  done in {data['models'][name]['meta']['wall_s']} s")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(json_path, json.dumps(data, indent=1).encode())
        write_markdown(data, md_path, describe(), TARGETS)
    return data


if __name__ == "__main__":
    main()
