"""Shared pieces of the text-generation jobs (:mod:`.seq2seq_job`, :mod:`.causal_job`).

Batching for teacher-forced training (labels padded with -100, so padding never counts in the
loss), batched decoding with greedy or beam search, a tokenizer trained on the fly for models that
come without one, and the summary dict every job returns (the same keys as ``run_glue``'s).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.config import PeftConfig
from ..core.model import get_peft_model
from .loop import TrainArgs, TrainResult

IGNORE_INDEX = -100  # labels with this value are left out of the loss by every HF model


# -- padding (generation prompts; training batches use transformers' collators: data.py) -------------
def pad(seqs: Sequence[Sequence[int]], value: int, side: str = "right") -> torch.Tensor:
    """Stack integer lists into one (batch, longest) tensor, filling with ``value`` on ``side``."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, seq in enumerate(seqs):
        if seq:
            if side == "left":
                out[i, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
            else:
                out[i, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return out


def default_device() -> torch.device:
    """Where accelerate's single-process ``Accelerator`` puts the model (scoring before training runs there too)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -- decoding ------------------------------------------------------------------------------------
@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], *, decoder_only: bool,
                   batch_size: int = 32, num_beams: int = 1, max_new_tokens: int = 64,
                   progress: bool = False) -> list[str]:
    """Decode a continuation of each prompt (token ids) and return it as text, in prompt order.

    Greedy when ``num_beams == 1``, beam search otherwise; no sampling, so results are
    reproducible. Prompts go in length order (less padding) and come back in the original order.
    A decoder-only model gets its prompts left-padded, so every row's last real token sits at the
    end and new tokens follow it directly; its output repeats the prompt, which is cut off here.
    """
    if not prompts:
        return []
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    extra: dict[str, Any] = {}
    if not decoder_only:
        config = getattr(model, "config", None)
        start = getattr(config, "decoder_start_token_id", None)
        extra["decoder_start_token_id"] = pad_id if start is None else start
    for lo in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
        chunk = order[lo:lo + batch_size]
        seqs = [prompts[i] for i in chunk]
        side = "left" if decoder_only else "right"
        ids = pad(seqs, pad_id, side).to(device)
        mask = pad([[1] * len(s) for s in seqs], 0, side).to(device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             num_beams=num_beams, do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id,
                             **extra)
        if decoder_only:
            out = out[:, ids.shape[1]:]
        for i, row in zip(chunk, out.tolist()):
            texts[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return texts


# -- a tokenizer for models that come without one ------------------------------------------------
def train_tokenizer(texts: Iterable[str], vocab_size: int, append_eos: bool = True) -> Any:
    """Train a BPE tokenizer on ``texts`` and wrap it as a transformers fast tokenizer.

    SentencePiece-style pre-tokenization ('▁' marks a word start), so decoding restores the
    spacing. Special tokens follow T5's numbering: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2; with
    ``append_eos`` every encoded text ends with ``</s>`` (what T5 expects). Text is NFKC-normalised
    and kept cased and accented (Romanian diacritics survive, unlike with an uncased WordPiece
    vocabulary such as MiniLM's). Characters never seen in ``texts`` become ``<unk>``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 16:
        raise ValueError(f"vocab_size={vocab_size} is too small for a tokenizer; use a few hundred or more")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                  limit_alphabet=300, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if append_eos:
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


# -- the run summary ------------------------------------------------------------------------------
def wrap_model(model: nn.Module, config: PeftConfig | None) -> tuple[nn.Module, int, int]:
    """``get_peft_model`` for a config, the model itself for full fine-tuning (``None``);
    also returns (trainable, total) parameter counts."""
    if config is None:
        for param in model.parameters():
            param.requires_grad_(True)
        total = sum(p.numel() for p in model.parameters())
        return model, total, total
    model = get_peft_model(model, config)
    report = model.trainable_parameters_report()
    return model, report.trainable, report.total


def count_after_training(model: nn.Module, trainable: int, total: int) -> tuple[int, int]:
    """(trainable, total) as the review counts them, taken after training: a masked method's entries
    are chosen by its data pass. Trainable: the entries that can change; total: the base model plus
    those. Full fine-tuning (not a PeftModel) keeps its counts."""
    report = getattr(model, "trainable_parameters_report", None)
    if report is None:
        return trainable, total
    counts = report()
    return counts.trainable_entries, counts.base + counts.trainable_entries


def summarize(run: Any, config: PeftConfig | None, args: TrainArgs, trainable: int, total: int,
              result: TrainResult, started: float, metrics: dict[str, float]) -> dict[str, Any]:
    """The dict every job returns; the keys are exactly ``run_glue``'s."""
    return {
        "run": asdict(run), "method": getattr(config, "method", None) or "full",
        "config": config.to_dict() if config else None, "train_args": asdict(args),
        "trainable_params": trainable, "total_params": total, "trainable_percent": 100.0 * trainable / total,
        "steps": result.steps, "final_loss": result.final_loss, "median_step_s": result.median_step_s,
        "tokens_per_s": result.tokens_per_s, "wall_s": time.perf_counter() - started, "metrics": metrics,
    }


def save_run(out: str | Path, model: nn.Module, config: PeftConfig | None, summary: dict[str, Any],
             predictions: list[dict[str, Any]], tokenizer: Any = None) -> None:
    """Write the adapter (PEFT runs), ``metrics.json``, ``predictions.jsonl`` and, for a tokenizer
    trained in the run, ``tokenizer/``."""
    out = Path(out)
    if config is not None:
        model.save_pretrained(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as fh:
        for row in predictions:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out / "tokenizer")
