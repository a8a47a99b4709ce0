"""Markdown tables generated from the benchmark JSON (nothing in the Markdown is typed by hand)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from peftlab.core.state import atomic_write_bytes


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _sci(value: float | None) -> str:
    return "–" if value is None else f"{value:.1e}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def own_length(floor_label: str) -> str | None:
    """``"148 tokens"`` for the floor case ``"floor (148 tokens)"``; None for the common floor."""
    return floor_label.removeprefix("floor (").removesuffix(")") if floor_label != "floor" else None


def _own_floor(row: dict[str, Any]) -> str:
    """The ratio to the floor at the row's own sequence length, where that differs from the batch's."""
    length = own_length(row.get("own_floor", "floor"))
    return "=" if length is None else f"{_num(row['x_own_floor'], 3)} ({length})"


def model_section(name: str, result: dict[str, Any]) -> list[str]:
    m = result["meta"]
    lines = [f"## {name}: {m['description']}", ""]
    hw = m["machine"] + (f", GPU {m['gpu']}" if m.get("gpu") else "")
    lines += [
        f"- command: `{m['command'].strip()}`",
        f"- machine: {hw}; {m['device']}, {m['dtype']}, {m['threads']} threads, "
        f"OMP_WAIT_POLICY={m.get('omp_wait_policy')}",
        f"- torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, Python {m['python']}",
        f"- date: {m['date']}; wall time {m['wall_s']} s",
        f"- batch {m['batch']} x {m['seq']} tokens; {m['warmup']} warm-up call(s) + 1 memory step, then "
        f"{m['repeats']} training rounds and {m['infer_repeats']} inference rounds, interleaved",
        f"- methods registered: {', '.join(m['methods'])}",
    ]
    if m.get("speedup_before") is not None:
        lines.append(f"- machine load: 1-min load average {m['load_before']} before, {m['load_after']} after; a 1024x1024 "
                     f"matmul ran {m['speedup_before']}x / {m['speedup_after']}x faster on {m['threads']} threads than on 1")
        if m["threads"] > 1 and min(m["speedup_before"], m["speedup_after"]) < 0.75 * m["threads"]:
            lines.append("- **the machine was busy**: other processes held the cores, so every parallel operator waited "
                         "for a descheduled thread; wall-clock ratios then grow with a case's operator count rather "
                         "than its work. Rerun on an idle machine (or with `--threads 1`) before reading the ratios.")
    lines.append("")
    if result.get("targets"):
        lines += ["### Targets", ""]
        rows = [[t["target"], f"<= {t['limit']}", _num(t["value"], 3), _num(t.get("value_cpu"), 3),
                 f"not comparable: {t['unlike']}" if t.get("unlike") else
                 {True: "yes", False: "**no**", None: "not measured"}[t["ok"]]] for t in result["targets"]]
        lines += _table(["target", "limit", "measured (wall)", "measured (CPU time)", "met (wall)"], rows)
    if result.get("train"):
        lines += ["### Training step (forward + backward + optimizer step)", ""]
        rows = [[r["label"], r["impl"], _num(r["trainable"]), _num(r["step_ms"], 0), _num(r["tokens_per_s"], 0),
                 _num(r["x_floor"], 3), _num(r["x_floor_cpu"], 3), _own_floor(r), _num(r["x_full"], 3), _num(r["x_peft"], 3),
                 _num(r["x_peft_cpu"], 3), _num(r["peak_mb"], 0), _num(r["peak_x_floor"], 2), r.get("note", "")]
                for r in result["train"]]
        lines += _table(["case", "impl", "trainable params", "step ms", "tokens/s", "x floor", "x floor (CPU)",
                         "x own-length floor", "x full FT", "x peft", "x peft (CPU)", "peak MB", "peak x floor", "note"], rows)
    if result.get("inference"):
        lines += ["### Inference (forward, no grad)", ""]
        rows = [[r["label"], r["impl"], _num(r["ms"], 0), _num(r["x_base"], 3), _num(r["x_base_cpu"], 3),
                 _num(r["x_peft"], 3), _num(r["x_peft_cpu"], 3)] for r in result["inference"]]
        lines += _table(["case", "impl", "ms", "x base", "x base (CPU)", "x peft", "x peft (CPU)"], rows)
    if result.get("mixed"):
        shape = f"{m.get('mixed_batch', m['batch'])} x {m.get('mixed_seq', m['seq'])} tokens"
        lines += [f"### Mixed-adapter batches ({shape}, example i uses adapter a(i mod k))", ""]
        rows = [[r["method"], r["impl"], str(r["k"]) if r["k"] else "one active adapter", _num(r["ms"], 0),
                 _num(r["x_single"], 3), _num(r["x_single_cpu"], 3), _num(r["x_peft"], 3), _num(r["x_peft_cpu"], 3),
                 _sci(r.get("max_abs_diff_vs_peft"))] for r in result["mixed"]]
        lines += _table(["method", "impl", "k adapters", "ms", "x one adapter", "x one adapter (CPU)", "x peft",
                         "x peft (CPU)", "max abs diff vs peft"], rows)
    if result.get("errors"):
        lines += ["### Not measured", ""]
        lines += [f"- {e['case']}: {e['error'].splitlines()[0][:300]}" for e in result["errors"]] + [""]
    return lines


def write_markdown(data: dict[str, Any], path: Path, notes: list[str], targets: list[tuple]) -> None:
    lines = ["# Benchmarks", "",
             f"Generated by `python -m benchmarks.run` from `{path.with_suffix('.json').name}`; "
             "every figure below comes from that file, so rerun the command rather than edit this page. "
             "Quantized bases (QLoRA against LoRA on fp32 and bf16 bases) have their own page, "
             "`benchmarks_quant.md` (`python -m benchmarks.quant`).", ""]
    lines += [f"- {n}" for n in notes] + [""]
    for name, result in data["models"].items():
        lines += model_section(name, result)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, "\n".join(lines).encode())
