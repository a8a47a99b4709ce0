"""Quantized base weights: QLoRA against LoRA on a full-precision base, side by side in one run.

    python -m benchmarks.quant                      # MiniLM and the 100M Llama, writes docs/benchmarks_quant.md/.json
    python -m benchmarks.quant --models tiny-bert   # smoke run

Every case trains LoRA with the same rank on the same layers (every linear layer but the head, QLoRA's
placement); only the base differs: fp32, bf16 (weights and LoRA in bf16), or 4-bit NF4 with double
quantization (bitsandbytes) with the rest of the model (embeddings, norms, head) and the 4-bit
matmuls in fp32, or in bf16 as the QLoRA paper runs it (LoRA's own factors stay fp32 there). Reported per case: the bytes of the frozen
base (the 4-bit layers' codes and block scales counted, which are not parameters), the peak bytes of
live tensors during one training step (weights, gradients, AdamW state, activations; measured as in
``benchmarks.measure``), and the step time, each as a ratio to LoRA on the fp32 base, timed in
interleaved rounds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab import LoraConfig, get_peft_model
from peftlab.core import quant
from peftlab.core.layer import base_of
from peftlab.methods.reparameterized.lora import LoraLayer
from peftlab.methods.reparameterized.qlora import QLoraConfig

from .measure import held_tensors, interleaved_times, peak_rise_bytes, storage_bytes
from .models import MODELS, make_batch

REFERENCE = "LoRA, fp32 base"
CASES = {
    REFERENCE: ("lora", torch.float32, {}),
    "LoRA, bf16 base": ("lora", torch.bfloat16, {}),
    "QLoRA, NF4 base, fp32 elsewhere": ("qlora", torch.float32, {}),
    # The paper's setting: bf16 compute, and the layers left unquantized (embeddings, norms, head) in bf16.
    "QLoRA, NF4 base, bf16 elsewhere": ("qlora", torch.bfloat16, {"compute_dtype": "bfloat16"}),
}


def _quant_state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The 4-bit layers' block scales and code books: part of the base, not parameters."""
    out = []
    for module in model.modules():
        if quant.is_bnb_4bit(module):
            state = module.weight.quant_state
            out += [state.absmax, state.code]
            if state.nested:
                out += [state.state2.absmax, state.state2.code]
    return out


def _base_bytes(model: nn.Module) -> int:
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    return storage_bytes(frozen + _quant_state_tensors(model))


def _linear_bytes(model: nn.Module) -> int:
    """Bytes of the weights of the adapted layers, the ones QLoRA quantizes (4-bit codes and block
    scales, or the full-precision weight); the output head and embeddings are not among them."""
    layers = [base_of(m) for m in model.modules() if isinstance(m, LoraLayer)]
    four_bit = nn.ModuleList(m for m in layers if quant.is_bnb_4bit(m))
    return storage_bytes([m.weight for m in layers] + _quant_state_tensors(four_bit))


def _case(bench: Any, method: str, dtype: torch.dtype, options: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)
    model = bench.build().to(dtype)
    heads = ["classifier"] if bench.task == "cls" else []
    if method == "lora":
        config = LoraConfig(targets="all-linear", modules_to_save=heads)
    else:
        config = QLoraConfig(modules_to_save=heads, **options)
    return get_peft_model(model, config).train()


def bench_model(name: str, repeats: int, log: Any) -> dict[str, Any]:
    bench = MODELS[name]
    batch = make_batch(bench, bench.batch, bench.seq, "cpu")
    models: dict[str, nn.Module] = {}
    optimizers: dict[str, torch.optim.Optimizer] = {}
    for label, (method, dtype, options) in CASES.items():
        models[label] = _case(bench, method, dtype, options)
        optimizers[label] = torch.optim.AdamW([p for p in models[label].parameters() if p.requires_grad], lr=1e-4)

    def step(label: str) -> None:
        out = models[label](**batch)
        out.loss.float().backward()
        optimizers[label].step()
        optimizers[label].zero_grad(set_to_none=True)

    rows = []
    for label in CASES:
        step(label)  # creates the AdamW state: it is held from then on
        held = storage_bytes(held_tensors(models[label], optimizers[label]) + _quant_state_tensors(models[label]))
        peak = held + peak_rise_bytes(lambda label=label: step(label), "cpu")
        rows.append({"case": label, "base_bytes": _base_bytes(models[label]),
                     "linear_bytes": _linear_bytes(models[label]), "held_bytes": held, "peak_bytes": peak,
                     "trainable": sum(p.numel() for p in models[label].parameters() if p.requires_grad)})
        log(f"  {label}: peak {peak / 2**20:,.0f} MB")
    log(f"  timing {len(CASES)} cases x {repeats} rounds")
    timings = interleaved_times({label: (lambda label=label: step(label)) for label in CASES}, repeats, 1, "cpu",
                                reference=REFERENCE)
    # The QLoRA paper trains with gradient checkpointing: activations then no longer hide the weights.
    for row in rows:
        model = models[row["case"]]
        model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        step(row["case"])
        held = storage_bytes(held_tensors(model, optimizers[row["case"]]) + _quant_state_tensors(model))
        row["peak_ckpt_bytes"] = held + peak_rise_bytes(lambda label=row["case"]: step(label), "cpu")
    ref = next(r for r in rows if r["case"] == REFERENCE)
    for row in rows:
        row["step_ms"] = 1e3 * sorted(timings.wall[row["case"]])[len(timings.wall[row["case"]]) // 2]
        row["step_x"] = timings.ratio(row["case"], REFERENCE)
        row["step_x_cpu"] = timings.ratio(row["case"], REFERENCE, cpu=True)
        for key in ("base_bytes", "linear_bytes", "peak_bytes", "peak_ckpt_bytes"):
            row[key.replace("_bytes", "_x")] = row[key] / ref[key]
    return {"model": name, "description": bench.description, "batch": bench.batch, "seq": bench.seq, "rows": rows}


def write(results: list[dict[str, Any]], out: Path, seconds: float) -> None:
    data = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "bitsandbytes": quant.require_bitsandbytes().__version__, "wall_s": seconds, "models": results}
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    lines = ["# Quantized base weights: QLoRA against LoRA", "",
             f"Generated by `python -m benchmarks.quant` on {data['date']} ({data['threads']} threads, torch "
             f"{data['torch']}, bitsandbytes {data['bitsandbytes']}, CPU; {seconds / 60:.1f} min). Every case trains "
             "LoRA r=8 on every linear layer but the head with AdamW; only the frozen base differs. Ratios are to "
             f"**{REFERENCE}**. *Base* counts every frozen tensor, the 4-bit layers' block scales included; *linear "
             "weights* only the weights of the adapted layers, the ones QLoRA quantizes (not the embeddings or head); *peak* is the live-tensor peak of one training "
             "step (weights, gradients, AdamW state, activations), also with gradient checkpointing as the QLoRA paper "
             "trains (non-reentrant, every decoder/encoder layer). Steps are timed without checkpointing; step "
             "ratios are medians of interleaved rounds.", ""]
    for res in results:
        lines += [f"## {res['model']}", "", f"{res['description']}; batch {res['batch']} x {res['seq']} tokens.", "",
                  "| case | base MB | x | linear weights MB | x | peak MB | x | peak MB, grad. checkpointing | x "
                  "| step ms | x (wall) | x (CPU) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["rows"]:
            lines.append(f"| {r['case']} | {r['base_bytes'] / 2**20:,.1f} | {r['base_x']:.3f} | "
                         f"{r['linear_bytes'] / 2**20:,.1f} | {r['linear_x']:.3f} | {r['peak_bytes'] / 2**20:,.0f} | "
                         f"{r['peak_x']:.2f} | {r['peak_ckpt_bytes'] / 2**20:,.0f} | {r['peak_ckpt_x']:.2f} | "
                         f"{r['step_ms']:,.0f} | {r['step_x']:.2f} | {r['step_x_cpu']:.2f} |")
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,llama-100m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("PEFTLAB_THREADS", "0")) or None)
    parser.add_argument("--out", default="docs/benchmarks_quant", help="path without suffix (.md and .json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = []
    for name in args.models.split(","):
        print(f"{name}:", flush=True)
        results.append(bench_model(name, args.repeats, lambda s: print(s, flush=True)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write(results, out, time.perf_counter() - start)
    print(f"wrote {out}.md and {out}.json")


if __name__ == "__main__":
    main()
