"""The models the benchmark runs on, and the batch each one gets.

Every model is built in one place so the table can say exactly what was measured: the real
MiniLM (a pretrained BERT, sequence classification, 2 labels) and three shapes built from
configs with random weights (speed does not depend on the weights' values).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class BenchModel:
    """What to build and which batch it gets.

    task: ``"cls"`` (labels: one class per example) or ``"lm"`` (labels: the input ids, the
        usual causal language-modelling loss).
    """

    name: str
    description: str
    build: Callable[[], nn.Module]
    batch: int
    seq: int
    task: str
    vocab: int
    device: str = "cpu"
    dtype: torch.dtype = torch.float32


def _minilm() -> nn.Module:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    if not MINILM.exists():
        raise FileNotFoundError(f"{MINILM} is absent: the real MiniLM lives in ../shared beside the repo")
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the new classifier head is reported as 'missing'; that is expected
    try:
        return AutoModelForSequenceClassification.from_pretrained(str(MINILM), num_labels=2)
    finally:
        logging.set_verbosity(verbosity)


def _gpt2_100m() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    # GPT-2 small's shape: 124M parameters (38.6M of them the tied token embedding).
    return GPT2LMHeadModel(GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024))


def _llama_100m() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    # 100M parameters: 12 layers of width 768, grouped-query attention (12 heads, 4 kv heads),
    # SwiGLU width 2048, 32k vocabulary with tied input/output embeddings.
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True))


def _llama_1b() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    # TinyLlama-1.1B's shape.
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048))


def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=2))


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128))


MODELS: dict[str, BenchModel] = {m.name: m for m in (
    BenchModel("minilm", "all-MiniLM-L6-v2 (real weights), BertForSequenceClassification, 22.7M params",
               _minilm, batch=32, seq=128, task="cls", vocab=30522),
    BenchModel("gpt2-100m", "GPT-2 small shape (random weights), GPT2LMHeadModel, 124M params",
               _gpt2_100m, batch=4, seq=128, task="lm", vocab=50257),
    BenchModel("llama-100m", "Llama shape (random weights), LlamaForCausalLM, 12x768, GQA 12/4, 100M params",
               _llama_100m, batch=4, seq=128, task="lm", vocab=32000),
    BenchModel("llama-1b", "TinyLlama-1.1B shape (random weights), LlamaForCausalLM, bf16 on CUDA",
               _llama_1b, batch=8, seq=512, task="lm", vocab=32000, device="cuda", dtype=torch.bfloat16),
    BenchModel("tiny-bert", "tiny BERT from a config (2x32), for smoke runs", _tiny_bert,
               batch=4, seq=16, task="cls", vocab=100),
    BenchModel("tiny-llama", "tiny Llama from a config (2x32), for smoke runs", _tiny_llama,
               batch=4, seq=16, task="lm", vocab=100),
)}
DEFAULT_MODELS = ("minilm", "gpt2-100m", "llama-100m")
QUICK_MODELS = ("tiny-bert", "tiny-llama")


def make_batch(spec: BenchModel, batch: int, seq: int, device: str) -> dict[str, torch.Tensor]:
    """Random token ids (no padding), and labels for the model's loss."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, spec.vocab, (batch, seq), generator=g)
    labels = torch.randint(0, 2, (batch,), generator=g) if spec.task == "cls" else ids.clone()
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in out.items()}
