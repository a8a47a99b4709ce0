"""The review's model sizes, built from their published configurations with random weights.

The efficiency suite trains nothing to convergence: it measures what a method costs on a model of
a given size (trainable share, peak training memory, step time at a fixed batch). Random weights
cost the same as pretrained ones, so no download is needed.

Whether a size is run here is decided from its parameter count (counted on the ``meta`` device,
which allocates nothing): a size whose full fine-tuning would not fit in memory (weights,
gradients and two AdamW moments: 16 bytes per parameter, plus a margin for activations) runs only
the PEFT methods; on CPU a size above the suite's ``max_params`` is skipped, because a handful of
its training steps would take longer than the suite's budget on a few cores.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from ..core.errors import PeftlabError


@dataclass(frozen=True)
class ModelSize:
    name: str
    kind: str  # "encoder" (sequence classification), "seq2seq" or "decoder" (causal LM)
    config: Callable[[], Any]


def _roberta(hidden: int, layers: int, heads: int, ffn: int) -> Callable[[], Any]:
    def build() -> Any:
        from transformers import RobertaConfig

        return RobertaConfig(vocab_size=50265, hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=514,
                             type_vocab_size=1, pad_token_id=1, num_labels=2)
    return build


def _t5(d_model: int, d_ff: int, layers: int, heads: int) -> Callable[[], Any]:
    def build() -> Any:
        from transformers import T5Config

        return T5Config(vocab_size=32128, d_model=d_model, d_kv=64, d_ff=d_ff, num_layers=layers,
                        num_heads=heads, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return build


def _llama(hidden: int, ffn: int, layers: int, heads: int) -> Callable[[], Any]:
    def build() -> Any:
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048)
    return build


# The shapes of the models the review's efficiency table uses (and two small ones for tests).
SIZES: dict[str, ModelSize] = {s.name: s for s in (
    ModelSize("roberta-base", "encoder", _roberta(768, 12, 12, 3072)),
    ModelSize("roberta-large", "encoder", _roberta(1024, 24, 16, 4096)),
    ModelSize("t5-base", "seq2seq", _t5(768, 3072, 12, 12)),
    ModelSize("t5-large", "seq2seq", _t5(1024, 4096, 24, 16)),
    ModelSize("llama-7b", "decoder", _llama(4096, 11008, 32, 32)),
    ModelSize("tiny-roberta", "encoder", _roberta(32, 2, 4, 64)),
    ModelSize("tiny-t5", "seq2seq", _t5(32, 64, 2, 4)),
    ModelSize("tiny-llama", "decoder", _llama(32, 64, 2, 4)),
)}


def get_size(name: str) -> ModelSize:
    if name not in SIZES:
        raise PeftlabError(f"unknown model size {name!r} for the efficiency suite; known: {', '.join(SIZES)}")
    return SIZES[name]


def _auto_class(kind: str) -> Any:
    import transformers

    return {"encoder": transformers.AutoModelForSequenceClassification,
            "seq2seq": transformers.AutoModelForSeq2SeqLM,
            "decoder": transformers.AutoModelForCausalLM}[kind]


def count_parameters(size: ModelSize) -> int:
    """Parameters of ``size`` without allocating them (built on the meta device)."""
    with torch.device("meta"):
        model = _auto_class(size.kind).from_config(size.config())
    return sum(p.numel() for p in model.parameters())


def build(size: ModelSize, seed: int, device: str = "cpu") -> Any:
    """``size`` with random weights, created directly on ``device`` (a 7B model never sits in host memory)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    with torch.device(device):
        return _auto_class(size.kind).from_config(size.config())


def available_memory(device: str) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fit_notes(size: ModelSize, params: int, device: str, max_params: int | None) -> tuple[bool, bool, str | None]:
    """(run the PEFT methods?, run full fine-tuning?, note saying what was skipped and why)."""
    gib = 1024 ** 3
    avail = available_memory(device)
    weights = 4 * params * 1.3  # fp32 weights plus room for activations at a small batch
    full = 16 * params * 1.2  # weights, gradients, two AdamW moments
    where = "GPU" if device == "cuda" else "CPU"
    if device != "cuda" and max_params is not None and params > max_params:
        return False, False, (f"{size.name} ({params / 1e6:,.0f}M parameters) skipped on {where}: above the "
                              f"suite's max_params ({max_params / 1e6:,.0f}M), so its steps would not fit the time "
                              "budget on a few CPU cores; run on a GPU or raise --max-params")
    if weights > avail:
        return False, False, (f"{size.name} ({params / 1e6:,.0f}M parameters) skipped: its fp32 weights alone need "
                               f"~{weights / gib:,.1f} GiB, {avail / gib:,.1f} GiB is available on the {where}")
    if full > avail:
        return True, False, (f"{size.name}: full fine-tuning skipped (needs ~{full / gib:,.1f} GiB for weights, "
                             f"gradients and AdamW state; {avail / gib:,.1f} GiB available on the {where}); "
                             "the PEFT methods ran")
    return True, True, None


def synthetic_loader(size: ModelSize, vocab: int, batch_size: int, seq_len: int, steps: int, seed: int) -> DataLoader:
    """``steps`` identical-shape batches of random tokens with labels fitting the model's head."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch_size * steps):
        ids = torch.randint(5, vocab, (seq_len,), generator=g)
        row = {"input_ids": ids, "attention_mask": torch.ones(seq_len, dtype=torch.long)}
        if size.kind == "encoder":
            row["labels"] = torch.randint(0, 2, (), generator=g)
        elif size.kind == "seq2seq":
            row["labels"] = torch.randint(5, vocab, (max(1, seq_len // 2),), generator=g)
        else:
            row["labels"] = ids.clone()
        rows.append(row)
    return DataLoader(rows, batch_size=batch_size, shuffle=False)
