"""The cross-lingual transfer suite: NLI trained on English only (GLUE MNLI), scored zero-shot on the
XNLI dev set in several languages, by four methods:

1. ``full``: full fine-tuning, the baseline.
2. ``adapter``: one task adapter (Pfeiffer placement: a bottleneck after each feed-forward output,
   reduction factor ``task_reduction_factor``) and the head, the encoder frozen.
3. ``madx``: MAD-X (Pfeiffer et al., 2020; see :mod:`.modeling`): per language a language adapter
   (reduction factor ``language_reduction_factor``) and an invertible adapter trained by masked
   language modelling on that language's unlabelled text, the encoder frozen; a task adapter trained
   on English NLI stacked on the English language adapters (frozen); at test time the target
   language's adapters replace English's under the same task adapter.
4. ``lt_sft``: LT-SFT composition (Ansell et al., 2022, "Composable Sparse Fine-Tuning for
   Cross-Lingual Transfer", ACL; the method is :mod:`peftlab.methods.partial.lt_sft`): per language a
   sparse fine-tuning trained by masked language modelling (L1 ``language_l1_reg``, 0.1 as the paper's
   language SFTs), a task SFT trained on English NLI with the English language SFT applied, then
   ``W0 + d_target + d_task`` at test time.

Unlabelled text: no corpus is available here, so each XNLI dev file (the same examples translated,
in the same order) is split by example index: the sentences of the even-indexed examples are that
language's unlabelled text (labels unused), the odd-indexed examples are the evaluation set. No
evaluated pair, in any language, is ever seen during training.

The default model is ``multilingual-e5-small`` from the shared folder, built on first use into the
cache (``$PEFTLAB_CACHE``, else ``~/.cache/peftlab``) by the shared folder's ``build.py``.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ...assess.store import write_json_atomic, write_text_atomic
from ...assess.suites import shared_dir
from ...core.config import PeftConfig, config_from_options
from ...core.errors import PeftlabError
from ...core.model import get_peft_model
from ...tasks.glue import Example, get_glue_task, load_glue
from ...train.data import encode_pairs, make_loader
from ...train.glue_job import classify, model_source_hint
from ...train.loop import TrainArgs, train
from .. import run_app
from .data import mlm_batches, read_xnli, split_halves, unlabelled_text, xnli_languages
from .modeling import EncoderWithHeads

METHODS = ("full", "adapter", "madx", "lt_sft")
SOURCE = "en"  # the training language: GLUE MNLI is English
E5 = "multilingual-e5-small"


def cache_dir() -> Path:
    return Path(os.environ.get("PEFTLAB_CACHE") or Path.home() / ".cache" / "peftlab")


def default_model_dir() -> Path:
    return cache_dir() / E5


@dataclass(frozen=True)
class CrossLingualSuite:
    """The cross-lingual suite's settings; every field can be set in the suite YAML (``suite: crosslingual``).

    model: a model folder or hub id (the default, the e5 build in the cache, is built on first use);
    data_dir: the GLUE root (MNLI train); xnli_dir: the folder of ``dev-<language>.tsv``; languages:
    the XNLI languages scored (``en`` among them: the source); methods: rows, among :data:`METHODS`;
    train_limit: English NLI training pairs; eval_limit: evaluation pairs per language (from the odd
    half; None: all of it); max_length, batch_size, epochs: the task training; full_lr, adapter_lr,
    sft_lr: the task training's learning rates; mlm_*: the language adaptation (optimizer steps, batch
    size, length, masking probability, learning rates for adapters and for SFTs);
    *_reduction_factor: bottleneck widths (hidden / factor); sft_keep_ratio: each SFT's share of the
    targeted entries; language_l1_reg: the language SFTs' L1 strength; seed: every draw."""

    name: str = "crosslingual"
    model: str = ""
    data_dir: str | None = None
    xnli_dir: str | None = None
    languages: tuple[str, ...] = ("en", "de", "ar", "zh")
    methods: tuple[str, ...] = METHODS
    train_limit: int = 768
    eval_limit: int | None = 150
    max_length: int = 64
    batch_size: int = 16
    epochs: float = 1.0
    full_lr: float = 1e-4
    adapter_lr: float = 3e-3
    sft_lr: float = 1e-4
    mlm_steps: int = 12
    mlm_batch_size: int = 16
    mlm_max_length: int = 64
    mlm_probability: float = 0.15
    mlm_adapter_lr: float = 1e-4
    mlm_sft_lr: float = 1e-4
    task_reduction_factor: float = 16
    language_reduction_factor: float = 2
    invertible_reduction_factor: float = 2
    sft_keep_ratio: float = 0.08
    language_l1_reg: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        where = f"suite {self.name!r}"
        for name in ("train_limit", "max_length", "batch_size", "mlm_steps", "mlm_batch_size", "mlm_max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PeftlabError(f"{where}: {name}={value!r}: expected a positive whole number")
        if self.eval_limit is not None and (isinstance(self.eval_limit, bool) or not isinstance(self.eval_limit, int)
                                            or self.eval_limit < 1):
            raise PeftlabError(f"{where}: eval_limit={self.eval_limit!r}: expected a positive whole number of "
                               "evaluation pairs per language, or null for the whole evaluation half")
        for name in ("max_length", "mlm_max_length"):
            if getattr(self, name) < 8:
                raise PeftlabError(f"{where}: {name}={getattr(self, name)}: expected at least 8 tokens (a sentence "
                                   "pair or sentence needs room beside the special tokens), e.g. 64")
        for name in ("epochs", "full_lr", "adapter_lr", "sft_lr", "mlm_adapter_lr", "mlm_sft_lr",
                     "task_reduction_factor", "language_reduction_factor", "invertible_reduction_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise PeftlabError(f"{where}: {name}={value!r}: expected a number above 0")
        for name, low, high in (("mlm_probability", 0.0, 1.0), ("sft_keep_ratio", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
                raise PeftlabError(f"{where}: {name}={value!r}: expected a share in (0, 1], e.g. "
                                   f"{0.15 if name == 'mlm_probability' else 0.08}")
        if isinstance(self.language_l1_reg, bool) or not isinstance(self.language_l1_reg, (int, float)) \
                or self.language_l1_reg < 0:
            raise PeftlabError(f"{where}: language_l1_reg={self.language_l1_reg!r}: expected a number >= 0 (the "
                               "paper's language SFTs use 0.1)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise PeftlabError(f"{where}: seed={self.seed!r}: expected a whole number")
        if not isinstance(self.languages, tuple) or not self.languages or \
                not all(isinstance(code, str) and code for code in self.languages):
            raise PeftlabError(f"{where}: languages={self.languages!r}: expected a list of XNLI language codes, "
                               "e.g. [en, de, ar, zh]")
        if len(set(self.languages)) != len(self.languages):
            raise PeftlabError(f"{where}: languages={list(self.languages)} names a language twice; list each once")
        if SOURCE not in self.languages:
            raise PeftlabError(f"{where}: languages={list(self.languages)} lacks {SOURCE!r}: the task trains on "
                               f"English, whose score (and language adapter) the transfer is measured against; add "
                               f"{SOURCE!r}")
        unknown = [m for m in self.methods] if not isinstance(self.methods, tuple) else \
            [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise PeftlabError(f"{where}: methods={self.methods!r}: expected distinct names among "
                               f"{', '.join(METHODS)}" + (f"; unknown: {unknown}" if unknown else ""))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_suite() -> CrossLingualSuite:
    shared = shared_dir()
    return CrossLingualSuite(model=str(default_model_dir()), data_dir=str(shared / "data" / "glue"),
                             xnli_dir=str(shared / "data" / "xling" / "xnli"))


def ensure_model(model: str, echo: Callable[[str], None] = print) -> str:
    """``model`` as given, except the default cache folder of e5, built first if it is not complete
    (the shared folder's ``build.py``, run with this Python; it writes atomically and leaves a
    complete folder as it is)."""
    target = Path(model).expanduser()
    if target != default_model_dir() or (target / "config.json").is_file():
        return model
    script = shared_dir() / "models" / E5 / "build.py"
    if not script.is_file():
        raise PeftlabError(f"model {model} is not built yet and its builder {script} does not exist; set PEFTLAB_SHARED "
                           "to the shared folder, or set the suite's model to a model folder or hub id")
    echo(f"building {E5} into {target} (once) ...")
    done = subprocess.run([sys.executable, str(script), str(target)], capture_output=True, text=True)
    if done.returncode != 0 or not (target / "config.json").is_file():
        raise PeftlabError(f"building {E5} into {target} failed (exit {done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-500:]}")
    return model


@dataclass
class _Data:
    train: list[Example]
    evaluation: dict[str, list[Example]]  # per language: the odd half, up to eval_limit
    text: dict[str, list[str]]  # per language: the even half's sentences
    pairs: int  # examples per XNLI file


class CrossLingualRunner:
    def __init__(self, suite: CrossLingualSuite, out: Path, echo: Callable[[str], None] = print) -> None:
        self.suite, self.out, self.echo = suite, out, echo
        self.tokenizer: Any = None
        self.results: dict[str, Any] = {"suite": suite.to_dict(), "data": {}, "accuracy": [], "stages": [],
                                        "notes": []}

    # -- checks before anything trains ----------------------------------------------------------
    def preflight(self) -> _Data:
        s = self.suite
        if not s.xnli_dir:
            raise PeftlabError("crosslingual suite: xnli_dir is not set; expected the folder of XNLI's "
                               "dev-<language>.tsv files")
        found = xnli_languages(s.xnli_dir)
        unknown = [code for code in s.languages if code not in found]
        if unknown:
            raise PeftlabError(f"crosslingual suite: languages {unknown} have no XNLI file in {s.xnli_dir}; the "
                               f"codes found there: {', '.join(found) or 'none (no dev-<code>.tsv files)'}; pick among those")
        files = {code: read_xnli(Path(s.xnli_dir) / f"dev-{code}.tsv") for code in s.languages}
        sizes = {code: len(rows) for code, rows in files.items()}
        if len(set(sizes.values())) != 1:
            raise PeftlabError(f"crosslingual suite: the XNLI files hold different numbers of examples {sizes}; they "
                               "must be the same examples translated, in the same order")
        pairs = next(iter(sizes.values()))
        if pairs < 2:
            raise PeftlabError(f"crosslingual suite: the XNLI files hold {pairs} example; at least 2 are needed (one "
                               "for the unlabelled half, one for evaluation)")
        evaluation, text = {}, {}
        for code, rows in files.items():
            unlabelled, held_out = split_halves(rows)
            evaluation[code] = held_out[:s.eval_limit] if s.eval_limit else held_out
            text[code] = unlabelled_text(unlabelled)
        if s.eval_limit and s.eval_limit > pairs // 2:
            self.results["notes"].append(f"eval_limit {s.eval_limit} exceeds the evaluation half "
                                         f"({pairs // 2} pairs): all of it is scored")
        mnli = get_glue_task("mnli")
        train_rows = load_glue(mnli, s.data_dir, "train", s.train_limit)
        if len(train_rows) < s.train_limit:
            raise PeftlabError(f"crosslingual suite: MNLI train in {s.data_dir} has {len(train_rows)} examples; "
                               f"train_limit is {s.train_limit}; lower it")
        model = ensure_model(s.model, self.echo)
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
        except (OSError, ValueError) as err:
            raise PeftlabError(f"crosslingual suite: cannot load the tokenizer of model {model!r}: "
                               f"{model_source_hint(model)} ({' '.join(str(err).split())[:300]})") from err
        if self.tokenizer.mask_token_id is None:
            raise PeftlabError(f"crosslingual suite: model {model!r}'s tokenizer has no mask token, which masked "
                               "language modelling needs; use a BERT-style encoder")
        self.results["data"] = {"train": len(train_rows), "xnli_pairs": pairs, "languages_found": found,
                                "evaluation": {c: len(v) for c, v in evaluation.items()},
                                "unlabelled_sentences": {c: len(v) for c, v in text.items()}}
        return _Data(train_rows, evaluation, text, pairs)

    # -- helpers ---------------------------------------------------------------------------------
    def _model(self, mlm: bool = False, invertible: bool = False) -> EncoderWithHeads:
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # e5 has no pooler: the "newly initialised" notice is expected
        torch.manual_seed(self.suite.seed)  # the same head initialisation for every method
        try:  # BERT-style models: no pooler (the head pools itself); others take no such option
            encoder = AutoModel.from_pretrained(self.suite.model, add_pooling_layer=False)
        except TypeError:
            encoder = AutoModel.from_pretrained(self.suite.model)
        return EncoderWithHeads(encoder, 3, mlm=mlm,
                                invertible_reduction=self.suite.invertible_reduction_factor if invertible else None)

    def _adapter(self, factor: float, heads: tuple[str, ...]) -> PeftConfig:
        # Pfeiffer placement: one bottleneck after each feed-forward output.
        return config_from_options("sequential_adapter", {"targets": '["@ffn_out"]', "reduction_factor": str(factor),
                                                          "modules_to_save": _json_list(heads)})

    def _sft(self, l1: float, heads: tuple[str, ...]) -> PeftConfig:
        return config_from_options("lt_sft", {"keep_ratio": str(self.suite.sft_keep_ratio), "l1_reg": str(l1),
                                              "modules_to_save": _json_list(heads)})

    def _args(self, lr: float, epochs: float = 1.0, split_by_length: bool = False) -> TrainArgs:
        return TrainArgs(epochs=epochs, lr=lr, seed=self.suite.seed, progress=False, split_by_length=split_by_length)

    def _fit_task(self, model: Any, data: _Data, lr: float) -> Any:
        s = self.suite
        loader = make_loader(encode_pairs(data.train, self.tokenizer, s.max_length), self.tokenizer, s.batch_size,
                             shuffle=True, seed=s.seed)
        torch.manual_seed(s.seed)
        return train(model, loader, self._args(lr, s.epochs, split_by_length=True))  # a loss per pair: splits exactly

    def _fit_mlm(self, model: Any, data: _Data, code: str, lr: float) -> Any:
        s = self.suite
        batches = mlm_batches(data.text[code], self.tokenizer, s.mlm_steps, s.mlm_batch_size, s.mlm_max_length,
                              s.mlm_probability, s.seed)
        torch.manual_seed(s.seed)
        return train(model, batches, self._args(lr))

    def _stage(self, method: str, stage: str, language: str, model: Any, result: Any, started: float) -> None:
        if hasattr(model, "trainable_parameters_report"):
            trainable = model.trainable_parameters_report().trainable_entries
        else:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        row = {"method": method, "stage": stage, "language": language, "trainable": int(trainable),
               "steps": result.steps, "final_loss": float(result.final_loss), "wall_s": time.perf_counter() - started}
        self.results["stages"].append(row)
        self.echo(f"[{method}] {stage} {language}: {row['steps']} steps, loss {row['final_loss']:.3f}, "
                  f"{row['trainable']:,} trainable ({row['wall_s']:.0f} s)")
        self.write()

    def _score(self, method: str, model: Any, data: _Data, code: str) -> None:
        started = time.perf_counter()
        logits, labels = classify(model, self.tokenizer, data.evaluation[code], self.suite.max_length)
        accuracy = 100 * float((logits.argmax(1) == labels).mean())
        self.results["accuracy"].append({"method": method, "language": code, "accuracy": accuracy,
                                         "n": len(labels), "wall_s": time.perf_counter() - started})
        self.echo(f"[{method}] XNLI {code}: accuracy {accuracy:.1f} ({len(labels)} pairs)")
        self.write()

    # -- the methods ---------------------------------------------------------------------------
    def full(self, data: _Data) -> None:
        started = time.perf_counter()
        model = self._model()
        result = self._fit_task(model, data, self.suite.full_lr)
        self._stage("full", "task", SOURCE, model, result, started)
        for code in self.suite.languages:
            self._score("full", model, data, code)

    def adapter(self, data: _Data) -> None:
        started = time.perf_counter()
        model = get_peft_model(self._model(), self._adapter(self.suite.task_reduction_factor, ("classifier",)), "task")
        result = self._fit_task(model, data, self.suite.adapter_lr)
        self._stage("adapter", "task", SOURCE, model, result, started)
        for code in self.suite.languages:
            self._score("adapter", model, data, code)

    def madx(self, data: _Data) -> None:
        s = self.suite
        language = self._adapter(s.language_reduction_factor, ("mlm_head", "invertible"))
        model = None
        for code in s.languages:
            started = time.perf_counter()
            if model is None:
                model = get_peft_model(self._model(mlm=True, invertible=True), language, f"lang_{code}")
            else:
                model.add_adapter(f"lang_{code}", language)
            model.set_adapter(f"lang_{code}")
            result = self._fit_mlm(model, data, code, s.mlm_adapter_lr)
            self._stage("madx", "language (MLM)", code, model, result, started)
        started = time.perf_counter()
        model.add_adapter("task", self._adapter(s.task_reduction_factor, ("classifier",)))
        model.set_adapter([f"lang_{SOURCE}", "task"], trainable="task")
        result = self._fit_task(model, data, s.adapter_lr)
        self._stage("madx", "task (on en's language adapter)", SOURCE, model, result, started)
        for code in s.languages:
            model.set_adapter([f"lang_{code}", "task"])
            self._score("madx", model, data, code)

    def lt_sft(self, data: _Data) -> None:
        s = self.suite
        language = self._sft(s.language_l1_reg, ("mlm_head",))
        model = None
        for code in s.languages:
            started = time.perf_counter()
            if model is None:
                model = get_peft_model(self._model(mlm=True), language, f"lang_{code}")
            else:
                model.add_adapter(f"lang_{code}", language)
            model.set_adapter(f"lang_{code}")
            result = self._fit_mlm(model, data, code, s.mlm_sft_lr)
            self._stage("lt_sft", "language SFT (MLM)", code, model, result, started)
        started = time.perf_counter()
        model.add_adapter("task", self._sft(0.0, ("classifier",)))  # task SFTs: no L1, as the reference
        model.set_adapter([f"lang_{SOURCE}", "task"], trainable="task")
        result = self._fit_task(model, data, s.sft_lr)
        self._stage("lt_sft", "task SFT (on en's language SFT)", SOURCE, model, result, started)
        for code in s.languages:
            model.set_adapter([f"lang_{code}", "task"])
            self._score("lt_sft", model, data, code)

    def stages(self, data: _Data) -> None:
        for method in self.suite.methods:
            getattr(self, method)(data)
        self.results["summary"] = summary(self.results)

    def write(self) -> None:
        from .report import markdown

        write_json_atomic(self.out / "results.json", self.results)
        write_text_atomic(self.out / "report.md", markdown(self.results))


def _json_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per method: accuracy per language, the average over the languages, and the gap (en minus the
    mean of the other languages)."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in results["accuracy"]):
        scores = {r["language"]: r["accuracy"] for r in results["accuracy"] if r["method"] == method}
        others = [v for code, v in scores.items() if code != SOURCE]
        rows.append({"method": method, "scores": scores, "average": float(np.mean(list(scores.values()))),
                     "gap": scores[SOURCE] - float(np.mean(others)) if SOURCE in scores and others else None})
    return rows


def run_crosslingual(suite: CrossLingualSuite, out: str | Path, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every method into folder ``out`` (results.json, report.md, a plot); returns the results."""
    from .report import write_plots

    return run_app("crosslingual", CrossLingualRunner(suite, Path(out), echo), write_plots)
