"""One data-to-text fine-tuning run: E2E NLG on a decoder-only (causal) language model, scored by
BLEU and ROUGE-L against every human reference of each meaning representation (MR).

Used by the assessment's ``nlg`` suite. Each training example is the text ``"<mr> => <ref>"``
followed by the end-of-sequence token; the loss covers the reference and the eos only (labels are
-100 on the prompt ``"<mr> =>"`` and on padding), so the model learns to write, not to copy MRs.
Scoring left-pads the prompts and decodes greedily or with beam search up to eos.

Data. The E2E training CSV is not available offline, so by default training uses ``devset.csv``
(547 MRs, 4,672 references) and scoring ``testset_w_refs.csv`` (630 MRs, ~7.4 references each).
Training pairs are ordered round-robin over MRs (first reference of every MR, then every second
reference, ...), so ``train_limit`` pairs cover as many different MRs as possible;
``eval_limit`` keeps the first MRs of the scoring split.

Model: a folder or hub id loadable with ``AutoModelForCausalLM`` (the offline stories260K Llama,
or "gpt2" with the hub reachable), with its own tokenizer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..core.config import PeftConfig
from ..core.errors import PeftlabError
from ..tasks.errors import TaskDataError
from ..tasks.generation import E2EExample, e2e_metrics, load_e2e
from .data import make_seq2seq_loader
from .generation import IGNORE_INDEX, count_after_training, default_device, generate_texts, save_run, summarize, wrap_model
from .loop import StepProbe, TrainArgs, train


@dataclass(frozen=True)
class GenerationRun:
    """What to train and score.

    model: a causal LM folder or hub id. data_dir: the E2E folder (holding devset.csv, ...).
    train_limit: number of (MR, reference) pairs to train on; eval_limit: number of MRs to score.
    separator: written between the MR and the reference (the prompt is ``mr + separator``).
    max_length: longest training sequence (prompt + reference + eos) in tokens; longer references
        are cut (their eos is lost), an MR that alone fills it is an error.
    score_before: also score the model before training (metrics ``before/bleu``, ``before/rouge_l``).
    """

    model: str
    data_dir: str
    train_split: str = "dev"
    eval_split: str = "test"
    train_limit: int | None = None
    eval_limit: int | None = None
    tokenizer: str | None = None
    separator: str = " =>"
    batch_size: int = 16
    max_length: int = 256
    num_beams: int = 1
    max_new_tokens: int = 128
    eval_batch_size: int = 64
    score_before: bool = False


def training_pairs(examples: Sequence[E2EExample], limit: int | None = None) -> list[tuple[str, str]]:
    """(mr, reference) pairs, round-robin over MRs; the first ``limit`` of them."""
    pairs: list[tuple[str, str]] = []
    depth = max((len(e.references) for e in examples), default=0)
    for k in range(depth):
        pairs += [(e.mr, e.references[k]) for e in examples if k < len(e.references)]
    return pairs if limit is None else pairs[:limit]


def load_causal_lm(run: GenerationRun) -> tuple[Any, Any]:
    """(model, tokenizer) for ``run.model``; refuses models that are not decoder-only LMs."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(run.model)
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = list(getattr(config, "architectures", None) or [])
    if getattr(config, "is_encoder_decoder", False):
        raise PeftlabError(
            f"run_generation trains a decoder-only (causal) language model; {run.model!r} is an encoder-decoder "
            f"{config.model_type!r} model. Train it on translation with run_translation, or pass a causal LM "
            "(e.g. ../shared/models/stories260K or 'gpt2')")
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (archs and not causal_classes & set(archs)):
        raise PeftlabError(
            f"run_generation needs a causal language model (a *ForCausalLM / *LMHeadModel checkpoint); "
            f"{run.model!r} is {', '.join(archs) or config.model_type!r}, which cannot generate text. "
            "Pass a causal LM such as ../shared/models/stories260K or 'gpt2'")
    model = AutoModelForCausalLM.from_pretrained(run.model)
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer or run.model)
    if tokenizer.eos_token_id is None:
        raise PeftlabError(f"tokenizer {run.tokenizer or run.model!r} has no end-of-sequence token; the model must "
                           "learn where a text ends. Use a tokenizer with an eos token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; any id will do
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _strip_eos(ids: list[int], eos_id: int) -> list[int]:
    # Some tokenizers end every text with eos; the prompt must not, and the target gets exactly one.
    return ids[:-1] if ids and ids[-1] == eos_id else ids


def encode_prompt(mr: str, tokenizer: Any, separator: str) -> list[int]:
    """Token ids of ``mr + separator`` as the model sees them when asked to generate."""
    return _strip_eos(tokenizer(mr + separator)["input_ids"], tokenizer.eos_token_id)


def encode_example(mr: str, reference: str, tokenizer: Any, separator: str, max_length: int) -> dict[str, list[int]]:
    """One training row for ``"<mr><separator> <reference><eos>"``.

    ``input_ids`` = prompt + reference + eos; ``labels`` the same with the prompt replaced by -100.
    The reference's tokens are taken from the tokenization of the whole text (so word boundaries
    come out as in running text) when that starts with the prompt's tokens, otherwise from
    tokenizing the reference alone.

    Raises:
        TaskDataError: the prompt alone has ``max_length`` tokens or more.
    """
    eos = tokenizer.eos_token_id
    prompt = encode_prompt(mr, tokenizer, separator)
    full = _strip_eos(tokenizer(f"{mr}{separator} {reference}")["input_ids"], eos)
    if full[:len(prompt)] == prompt:
        target = full[len(prompt):]
    else:
        target = tokenizer(reference, add_special_tokens=False)["input_ids"]
    target = (target + [eos])[:max_length - len(prompt)]
    if not target:
        raise TaskDataError(f"the MR {mr[:80]!r} is {len(prompt)} tokens long, which leaves no room for the text "
                            f"within max_length={max_length}; raise max_length")
    return {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target}


def score_generation(model: Any, tokenizer: Any, examples: Sequence[E2EExample],
                     run: GenerationRun) -> tuple[dict[str, float], list[str]]:
    prompts = [encode_prompt(e.mr, tokenizer, run.separator) for e in examples]
    hyps = generate_texts(model, tokenizer, prompts, decoder_only=True, batch_size=run.eval_batch_size,
                          num_beams=run.num_beams, max_new_tokens=run.max_new_tokens)
    return e2e_metrics(hyps, [e.references for e in examples]), hyps


def generation_splits(run: GenerationRun) -> tuple[list[tuple[str, str]], list[E2EExample]]:
    """(training (mr, reference) pairs, scoring examples with all their references).

    Raises:
        TaskDataError: the two splits are the same file, or a portion is empty.
    """
    if run.train_split == run.eval_split:
        raise TaskDataError(f"train_split and eval_split are both {run.train_split!r}: the model would be scored "
                            "on the texts it trained on. Use train_split='dev', eval_split='test' (or 'train' "
                            "for training where trainset.csv is present)")
    pairs = training_pairs(load_e2e(run.data_dir, run.train_split), run.train_limit)
    examples = load_e2e(run.data_dir, run.eval_split, run.eval_limit)
    for kind, split, limit, got in (("training", run.train_split, run.train_limit, pairs),
                                    ("scoring", run.eval_split, run.eval_limit, examples)):
        if not got:
            raise TaskDataError(f"the {kind} split {split!r} of {run.data_dir} gave no examples (limit={limit}); "
                                "expected at least one MR with a reference. Check the CSV, and use a positive "
                                "limit or None")
    return pairs, examples


def run_generation(run: GenerationRun, config: PeftConfig | None, args: TrainArgs,
                   out: str | Path | None = None,
                   probe: StepProbe | None = None) -> dict[str, Any]:
    """Train ``config``'s method (``None``: full fine-tuning) on E2E and score BLEU and ROUGE-L.

    Returns the same summary dict as ``run_glue``; ``metrics`` holds ``bleu`` and ``rouge_l`` (0-100)
    and, with ``run.score_before``, ``before/bleu`` and ``before/rouge_l``. With ``out``, writes the
    adapter (PEFT runs), ``metrics.json`` and ``predictions.jsonl``. ``probe`` goes to
    :func:`~peftlab.train.loop.train` (the assessment measures memory with it).
    """
    if run.num_beams < 1:
        raise PeftlabError(f"num_beams={run.num_beams}: expected 1 (greedy) or more (beam search)")
    pairs, examples = generation_splits(run)
    torch.manual_seed(args.seed)
    model, tokenizer = load_causal_lm(run)
    model.to(default_device())
    model, trainable, total = wrap_model(model, config)
    metrics: dict[str, float] = {}
    if run.score_before:
        before, _ = score_generation(model, tokenizer, examples, run)
        metrics.update({f"before/{k}": v for k, v in before.items()})
    rows = [encode_example(mr, ref, tokenizer, run.separator, run.max_length) for mr, ref in pairs]
    loader = make_seq2seq_loader(rows, tokenizer, run.batch_size, shuffle=True, seed=args.seed)
    started = time.perf_counter()
    result = train(model, loader, args, probe=probe)
    trainable, total = count_after_training(model, trainable, total)
    scores, hyps = score_generation(model, tokenizer, examples, run)
    metrics.update(scores)
    summary = summarize(run, config, args, trainable, total, result, started, metrics)
    if out is not None:
        predictions = [{"mr": e.mr, "references": list(e.references), "hypothesis": h} for e, h in zip(examples, hyps)]
        save_run(out, model, config, summary, predictions)
    return summary
