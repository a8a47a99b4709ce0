"""One translation fine-tuning run: WMT16 English->Romanian on an encoder-decoder model, scored by BLEU.

Used by the assessment's ``mt`` suite. The model is trained with teacher forcing (``labels`` = the
target tokens; the model shifts them right into the decoder input and returns the cross-entropy),
then decodes greedily or with beam search; the hypotheses are scored with sacreBLEU.

Data. The only WMT16 file available offline is newstest2016 (1,999 pairs); Tatoeba en-ro (10,019
short pairs) sits beside it. When ``train_split == eval_split`` (the default: both newstest2016)
the first ``eval_size`` lines are held out for scoring and training uses the lines after them -
deterministic and disjoint. Different splits (``train_split="train"`` from the hub, or training on
"tatoeba" and scoring on newstest2016) are used whole. ``train_limit``/``eval_limit`` then keep the
first pairs of each portion.

Model. ``model="random:<shape>"`` builds a randomly initialised T5 (shapes in
:data:`RANDOM_T5_SHAPES`; no pretrained seq2seq model is available offline), seeded by
``TrainArgs.seed``. Its tokenizer is trained on the run's training text (both languages, plus the
task prefix) by :func:`~peftlab.train.generation.train_tokenizer`: a cased BPE vocabulary that keeps
Romanian diacritics, which the offline MiniLM WordPiece vocabulary would strip (it is uncased and
removes accents); ``tokenizer=<folder>`` uses an existing tokenizer instead. Any other ``model`` is a
folder or hub id loaded with ``AutoModelForSeq2SeqLM`` (e.g. "t5-small" with the hub reachable) and
its own tokenizer. Sources get T5's task prefix, "translate English to Romanian: ".

A randomly initialised T5 learns little from ~1.5k pairs, and a PEFT method on a *random* frozen
base learns less still (there is no pretrained knowledge to adapt): expect BLEU near zero there.
The numbers are meaningful with a pretrained model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.config import PeftConfig
from ..core.errors import PeftlabError
from ..tasks.errors import TaskDataError
from ..tasks.translation import TranslationPair, bleu, load_wmt16_en_ro
from .data import make_seq2seq_loader
from .generation import count_after_training, default_device, generate_texts, save_run, summarize, train_tokenizer, wrap_model
from .loop import StepProbe, TrainArgs, train

RANDOM = "random:"
LANGUAGES = {"en": "English", "ro": "Romanian"}
# T5 shapes for random initialisation. "t5-small" is the published t5-small (60M parameters with a
# 32k vocabulary); the smaller ones are for CPU runs and tests.
RANDOM_T5_SHAPES: dict[str, dict[str, Any]] = {
    "t5-small": dict(d_model=512, d_ff=2048, d_kv=64, num_layers=6, num_heads=8),
    "t5-mini": dict(d_model=256, d_ff=1024, d_kv=32, num_layers=4, num_heads=4),
    "t5-tiny": dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4),
}


@dataclass(frozen=True)
class TranslationRun:
    """What to train and score; see the module docstring for the data and model choices.

    model: ``"random:<shape>"`` (a shape of :data:`RANDOM_T5_SHAPES`) or a seq2seq folder/hub id.
    data_dir: folder with newstest2016.en/.ro (e.g. ../shared/data/mt/en-ro); ``None``: the hub.
    tokenizer: tokenizer folder/hub id; ``None``: the model's own, or for a random model one trained
        on the training text with ``vocab_size`` entries.
    prefix: put before every source; ``None``: "translate <Source> to <Target>: " from ``direction``.
    max_new_tokens: decoding length limit; ``None``: ``max_target_length``.
    score_before: also score the model before training (metrics ``before/bleu``).
    """

    model: str = RANDOM + "t5-small"
    data_dir: str | None = None
    direction: str = "en-ro"
    train_split: str = "newstest2016"
    eval_split: str = "newstest2016"
    eval_size: int = 500
    train_limit: int | None = None
    eval_limit: int | None = None
    tokenizer: str | None = None
    vocab_size: int = 8000
    prefix: str | None = None
    batch_size: int = 16
    max_source_length: int = 128
    max_target_length: int = 128
    num_beams: int = 1
    max_new_tokens: int | None = None
    eval_batch_size: int = 64
    score_before: bool = False

    def task_prefix(self) -> str:
        if self.prefix is not None:
            return self.prefix
        src, tgt = self.direction.split("-")
        return f"translate {LANGUAGES.get(src, src)} to {LANGUAGES.get(tgt, tgt)}: "


def translation_splits(run: TranslationRun) -> tuple[list[TranslationPair], list[TranslationPair]]:
    """(training pairs, scoring pairs), disjoint; whitespace around each sentence is stripped.

    Raises:
        TaskDataError: a portion is empty (the message gives the sizes and what to change).
    """
    def load(split: str) -> list[TranslationPair]:
        pairs = load_wmt16_en_ro(run.data_dir, split, run.direction)
        return [TranslationPair(p.source.strip(), p.target.strip()) for p in pairs]

    where = run.data_dir or "the hub"
    if run.train_split == run.eval_split:
        pairs = load(run.train_split)
        if run.eval_size <= 0 or run.eval_size >= len(pairs):
            raise TaskDataError(
                f"train_split and eval_split are both {run.train_split!r} ({len(pairs)} pairs in {where}), so the "
                f"first eval_size lines are held out for scoring; eval_size={run.eval_size} leaves "
                f"{'nothing to score' if run.eval_size <= 0 else 'no training pairs'}. Use 0 < eval_size < "
                f"{len(pairs)} (e.g. 500), or train on another split (train_split='tatoeba')")
        train_pairs, eval_pairs = pairs[run.eval_size:], pairs[:run.eval_size]
    else:
        train_pairs, eval_pairs = load(run.train_split), load(run.eval_split)
    train_pairs = train_pairs[:run.train_limit] if run.train_limit is not None else train_pairs
    eval_pairs = eval_pairs[:run.eval_limit] if run.eval_limit is not None else eval_pairs
    for kind, split, limit, got in (("training", run.train_split, run.train_limit, train_pairs),
                                    ("scoring", run.eval_split, run.eval_limit, eval_pairs)):
        if not got:
            raise TaskDataError(
                f"the {kind} portion of split {split!r} ({where}) is empty (limit={limit}); expected at least "
                "one sentence pair. Check the files hold text, and use a positive limit or None")
    return train_pairs, eval_pairs


def build_random_t5(shape: str, tokenizer: Any) -> Any:
    """A randomly initialised ``T5ForConditionalGeneration`` of a named shape, sized to ``tokenizer``."""
    from transformers import T5Config, T5ForConditionalGeneration

    if shape not in RANDOM_T5_SHAPES:
        raise PeftlabError(f"unknown random model shape {shape!r} (from model='{RANDOM}{shape}'); "
                           f"known: {', '.join(RANDOM + s for s in RANDOM_T5_SHAPES)}")
    pad_id = tokenizer.pad_token_id
    config = T5Config(vocab_size=len(tokenizer), pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=pad_id, **RANDOM_T5_SHAPES[shape])
    return T5ForConditionalGeneration(config)


def _fill_special_tokens(tokenizer: Any, source: str) -> Any:
    # BERT-style vocabularies end a text with [SEP] and have no eos: [SEP] plays that part.
    if tokenizer.eos_token is None and getattr(tokenizer, "sep_token", None) is not None:
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise PeftlabError(f"tokenizer {source!r} has no end-of-sequence or padding token; a seq2seq model "
                           "needs both. Use another tokenizer, or tokenizer=None to train one")
    return tokenizer


def load_seq2seq(run: TranslationRun, train_pairs: list[TranslationPair]) -> tuple[Any, Any]:
    """(model, tokenizer) for ``run.model``; call under the run's seed (random models are seeded)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    if run.model.startswith(RANDOM):
        if run.tokenizer is not None:
            tokenizer = AutoTokenizer.from_pretrained(run.tokenizer)
        else:
            texts = [run.task_prefix()] + [p.source for p in train_pairs] + [p.target for p in train_pairs]
            tokenizer = train_tokenizer(texts, run.vocab_size)
        tokenizer = _fill_special_tokens(tokenizer, run.tokenizer or "trained")
        return build_random_t5(run.model[len(RANDOM):], tokenizer), tokenizer
    config = AutoConfig.from_pretrained(run.model)
    if not getattr(config, "is_encoder_decoder", False):
        raise PeftlabError(
            f"run_translation needs an encoder-decoder (seq2seq) model such as T5 or BART; {run.model!r} is a "
            f"{config.model_type!r} model without a decoder over an encoder (config.is_encoder_decoder is False). "
            f"Train decoder-only models on generation with run_generation, or use model='{RANDOM}t5-small'")
    model = AutoModelForSeq2SeqLM.from_pretrained(run.model)
    source = run.tokenizer or run.model
    tokenizer = _fill_special_tokens(AutoTokenizer.from_pretrained(source), source)
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise PeftlabError(f"tokenizer {source!r} has {len(tokenizer)} tokens but the model's embedding has {rows} "
                           "rows; use the model's own tokenizer")
    return model, tokenizer


def encode_translation(pairs: list[TranslationPair], tokenizer: Any, run: TranslationRun) -> list[dict[str, list[int]]]:
    """Rows ``{"input_ids": prefix + source, "labels": target}`` (both ending with the tokenizer's eos)."""
    prefix = run.task_prefix()
    sources = tokenizer([prefix + p.source for p in pairs], truncation=True, max_length=run.max_source_length)
    # text_target: tokenizers with target-side rules (mBART's language codes) apply them.
    targets = tokenizer(text_target=[p.target for p in pairs], truncation=True, max_length=run.max_target_length)
    return [{"input_ids": s, "labels": t} for s, t in zip(sources["input_ids"], targets["input_ids"])]


def score_translation(model: Any, tokenizer: Any, rows: list[dict[str, list[int]]], refs: list[str],
                      run: TranslationRun) -> tuple[float, list[str]]:
    hyps = generate_texts(model, tokenizer, [r["input_ids"] for r in rows], decoder_only=False,
                          batch_size=run.eval_batch_size, num_beams=run.num_beams,
                          max_new_tokens=run.max_new_tokens or run.max_target_length)
    return bleu(hyps, refs), hyps


def run_translation(run: TranslationRun, config: PeftConfig | None, args: TrainArgs,
                    out: str | Path | None = None,
                    probe: StepProbe | None = None) -> dict[str, Any]:
    """Train ``config``'s method (``None``: full fine-tuning) on English->Romanian and score BLEU.

    Returns the same summary dict as ``run_glue``; ``metrics`` holds ``bleu`` (sacreBLEU, 0-100)
    and, with ``run.score_before``, ``before/bleu``. With ``out``, writes the adapter (PEFT runs),
    ``metrics.json``, ``predictions.jsonl`` and a trained tokenizer. ``probe`` goes to
    :func:`~peftlab.train.loop.train` (the assessment measures memory with it).
    """
    if run.direction not in ("en-ro", "ro-en"):
        raise PeftlabError(f"direction={run.direction!r}: expected 'en-ro' or 'ro-en'")
    if run.num_beams < 1:
        raise PeftlabError(f"num_beams={run.num_beams}: expected 1 (greedy) or more (beam search)")
    train_pairs, eval_pairs = translation_splits(run)
    torch.manual_seed(args.seed)
    model, tokenizer = load_seq2seq(run, train_pairs)
    model.to(default_device())
    model, trainable, total = wrap_model(model, config)
    eval_rows = encode_translation(eval_pairs, tokenizer, run)
    refs = [p.target for p in eval_pairs]
    metrics: dict[str, float] = {}
    if run.score_before:
        metrics["before/bleu"] = score_translation(model, tokenizer, eval_rows, refs, run)[0]
    loader = make_seq2seq_loader(encode_translation(train_pairs, tokenizer, run), tokenizer, run.batch_size,
                                 shuffle=True, seed=args.seed)
    started = time.perf_counter()
    result = train(model, loader, args, probe=probe)
    trainable, total = count_after_training(model, trainable, total)
    metrics["bleu"], hyps = score_translation(model, tokenizer, eval_rows, refs, run)
    summary = summarize(run, config, args, trainable, total, result, started, metrics)
    if out is not None:
        predictions = [{"source": p.source, "reference": p.target, "hypothesis": h} for p, h in zip(eval_pairs, hyps)]
        trained_tokenizer = tokenizer if run.model.startswith(RANDOM) and run.tokenizer is None else None
        save_run(out, model, config, summary, predictions, trained_tokenizer)
    return summary
