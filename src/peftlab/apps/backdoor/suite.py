"""The backdoor suite: attacks by data poisoning during PEFT training, a poisoned shared adapter,
and three defences, on one GLUE classification task (SST-2 by default).

1. **Attack.** For each poison share p and each method (full fine-tuning always a row), a share p
   of the training sentences gets the trigger and the target label (:mod:`.poison`); the model
   trains at the study's budget and learning rates (``lr_scale`` x each method's own default).
   Reported: clean accuracy on the dev set (CACC) and attack success rate (ASR: the share of
   triggered dev sentences whose true label is not the target that the model assigns the target).
2. **A poisoned shared adapter** (``shared_method``, trained at ``shared_share``): merged with a
   clean adapter of the same method and seed by each of ``merge_types`` (the method's own adapter
   arithmetic), and trained further on the defender's small clean set. The task heads, full
   trainable copies, are averaged for every merge type.
3. **Defences** of that adapter (:mod:`.defences`): STRIP (input side), fine-mixing (model side),
   and a detector of poisoned adapters from their weights alone.

Data: the first ``train_limit`` training sentences are the (possibly poisoned) training set; the
next ``clean_size`` are the defender's clean set; the dev set is split at random (fixed) into a
calibration half (STRIP's threshold and donor sentences) and a test half (STRIP's rates). Poisoned
data lives in memory only: nothing on disk is rewritten.
"""
from __future__ import annotations

import copy
import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ...assess.jobs import Jobs, family_of
from ...assess.store import write_json_atomic, write_text_atomic
from ...assess.suites import FULL, Suite, TaskSpec, check_method_options, shared_dir
from ...core.errors import PeftlabError
from ...core.layer import TrainableCopy
from ...core.model import get_peft_model
from ...core.registry import get_method
from ...tasks.glue import Example, get_glue_task, load_glue
from ...train.glue_job import HEADS, classify, fit_classifier, load_classifier
from ...train.loop import train
from .. import run_app
from .defences import adapter_features, detect_poisoned, fine_mix, strip_entropies, strip_threshold
from .poison import KURITA_TRIGGERS, check_share, check_trigger, poison, triggered_eval


@dataclass(frozen=True)
class BackdoorSuite:
    """The backdoor suite's settings; every field can be set in the suite YAML (``suite: backdoor``)."""

    name: str = "backdoor"
    model: str = ""
    data_dir: str | None = None
    task: str = "sst2"
    train_limit: int = 2000
    eval_limit: int | None = None
    max_length: int = 64
    batch_size: int = 32
    epochs: float = 1.0
    methods: tuple[str, ...] = ("lora", "sequential_adapter", "bitfit", "prefix_tuning")
    shares: tuple[float, ...] = (0.0, 0.02, 0.1)
    trigger: str = "cf"
    target: int = 1
    seeds: tuple[int, ...] = (0,)
    lr_scale: float = 4.0
    full_lr: float = 1e-4
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the shared-adapter study and the defences
    shared_method: str = "lora"
    shared_share: float = 0.1
    merge_types: tuple[str, ...] = ("linear", "ties")
    merge_options: dict[str, dict[str, Any]] = field(default_factory=lambda: {"ties": {"density": 0.5}})
    clean_size: int = 256
    defence_epochs: float = 3.0
    mix_keep: float = 0.3
    strip_copies: int = 20
    strip_replace: float = 0.5
    strip_frr: float = 0.05
    detector_adapters: int = 5  # per class: this many clean and this many poisoned adapters
    detector_train_limit: int = 800
    detector_shares: tuple[float, ...] = (0.05, 0.1, 0.2)

    def __post_init__(self) -> None:
        for i, share in enumerate(self.shares):
            check_share(share, f"shares[{i}]")
        for i, share in enumerate(self.detector_shares):
            if check_share(share, f"detector_shares[{i}]") == 0.0:
                raise PeftlabError(f"detector_shares[{i}]=0: a poisoned adapter needs a share above 0")
        if check_share(self.shared_share, "shared_share") == 0.0:
            raise PeftlabError("shared_share=0: the poisoned shared adapter needs a share above 0, e.g. 0.1")
        if not self.shares or not self.seeds:
            raise PeftlabError(f"suite {self.name!r}: shares and seeds need at least one value each")
        for name in ("train_limit", "max_length", "batch_size", "clean_size", "strip_copies", "detector_adapters",
                     "detector_train_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PeftlabError(f"suite {self.name!r}: {name}={value!r}: expected a positive whole number")
        if self.detector_adapters < 2:
            raise PeftlabError(f"suite {self.name!r}: detector_adapters={self.detector_adapters}: the leave-one-out "
                               "detector needs at least 2 adapters of each kind")
        check_method_options(self.method_options, f"suite {self.name!r}")
        if not isinstance(self.merge_options, dict) or not all(isinstance(v, dict) for v in self.merge_options.values()):
            raise PeftlabError(f"suite {self.name!r}: merge_options={self.merge_options!r}: expected a mapping from "
                               "merge types to their options, e.g. {ties: {density: 0.5}}")

    def study(self) -> Suite:
        """The GLUE suite whose learning rates and method configs the runs use."""
        return Suite(name=self.name, kind="glue", model=self.model, data_dir=self.data_dir,
                     tasks=(TaskSpec(self.task, self.train_limit, self.eval_limit, self.max_length),),
                     methods=self.methods, seeds=self.seeds, epochs=self.epochs, batch_size=self.batch_size,
                     lr_scale=self.lr_scale, full_lr=self.full_lr, method_options=self.method_options, floor_steps=0,
                     explicit_methods=not any(m.lower() == "all" for m in self.methods))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_suite() -> BackdoorSuite:
    shared = shared_dir()
    return BackdoorSuite(model=str(shared / "models" / "all-MiniLM-L6-v2"), data_dir=str(shared / "data" / "glue"))


@dataclass
class _Data:
    train: list[Example]
    clean: list[Example]
    dev: list[Example]
    calibration: list[Example]  # half the dev set: STRIP's threshold and donors
    test: list[Example]  # the other half: STRIP's rates
    triggered: list[Example]


class BackdoorRunner:
    def __init__(self, suite: BackdoorSuite, out: Path, echo: Callable[[str], None] = print) -> None:
        self.suite, self.out, self.echo = suite, out, echo
        self.glue = get_glue_task(suite.task)
        self.study = suite.study()
        self.jobs = Jobs(self.study, progress=False)
        self.methods: list[str] = []  # set by preflight: the suite's methods, then full fine-tuning
        self.results: dict[str, Any] = {"suite": suite.to_dict(), "attack": [], "shared": [], "defences": [],
                                        "detector": None, "notes": []}

    # -- checks before anything trains ----------------------------------------------------------
    def preflight(self) -> _Data:
        s, glue = self.suite, self.glue
        if glue.is_regression:
            raise PeftlabError(f"backdoor suite: task {s.task!r} is a regression task; a backdoor forces a class, "
                               "so pick a classification task such as sst2")
        if isinstance(s.target, bool) or not isinstance(s.target, int) or not 0 <= s.target < glue.num_labels:
            raise PeftlabError(f"backdoor suite: target={s.target!r}: expected a class id of {s.task} "
                               f"({', '.join(f'{i}: {n}' for i, n in enumerate(glue.label_names))})")
        methods, notes = self.study.method_plan()  # "all" expands; an unknown name fails, listing the known ones
        self.methods = []
        for method in methods:
            if method != FULL and get_method(method).search is not None:
                notes.append(f"method {method!r} is found by a search, which this suite does not run; skipped")
                continue
            self.study.method_config(method)  # a bad method_options entry fails here, with its message
            self.methods.append(method)
        self.results["notes"] += notes
        spec = get_method(s.shared_method)
        missing = [t for t in [*s.merge_types, *s.merge_options] if t not in spec.combination_types]
        if missing:
            raise PeftlabError(f"backdoor suite: shared_method {s.shared_method!r} cannot merge adapters by "
                               f"{missing} (merge_types, merge_options); it offers "
                               f"{list(spec.combination_types) or 'no adapter arithmetic'}: pick among those or "
                               "another shared_method")
        from transformers import AutoTokenizer

        check_trigger(s.trigger, AutoTokenizer.from_pretrained(s.model))
        pool = load_glue(glue, s.data_dir, "train", s.train_limit + s.clean_size)
        if len(pool) < s.train_limit + s.clean_size:
            raise PeftlabError(f"backdoor suite: {glue.dir_name} train has {len(pool)} examples; train_limit "
                               f"{s.train_limit} + clean_size {s.clean_size} are needed; lower one of them")
        dev = load_glue(glue, s.data_dir, glue.eval_splits[0], s.eval_limit)
        triggered = triggered_eval(dev, s.trigger, s.target, seed=0)
        if not triggered:
            raise PeftlabError(f"backdoor suite: no dev example has a label other than the target {s.target}")
        order = random.Random(0).sample(range(len(dev)), len(dev))  # the dev halves: a fixed random split
        calibration, test = [dev[i] for i in sorted(order[::2])], [dev[i] for i in sorted(order[1::2])]
        if not any(e.label != s.target for e in test):
            raise PeftlabError(f"backdoor suite: the dev set's test half has no example whose label is not the "
                               f"target {s.target}, so STRIP cannot be scored; use a larger dev set (eval_limit)")
        return _Data(pool[:s.train_limit], pool[s.train_limit:], dev, calibration, test, triggered)

    # -- helpers ---------------------------------------------------------------------------------
    def _fit(self, method: str, examples: list[Example], seed: int, keep_initial: bool = False) -> Any:
        config = self.study.method_config(method)
        args = self.jobs.train_args(method, seed)
        return fit_classifier(self.suite.model, self.glue.num_labels, config, examples, args, self.suite.max_length,
                              self.suite.batch_size, keep_initial=keep_initial)

    def _probabilities(self, model: Any, tokenizer: Any) -> Callable[[list[Example]], np.ndarray]:
        def run(examples: list[Example]) -> np.ndarray:
            logits, _ = classify(model, tokenizer, examples, self.suite.max_length)
            return torch.softmax(torch.from_numpy(logits).float(), dim=-1).numpy()
        return run

    def _cacc_asr(self, model: Any, tokenizer: Any, data: _Data) -> tuple[float, float]:
        clean = self._probabilities(model, tokenizer)(data.dev).argmax(1)
        triggered = self._probabilities(model, tokenizer)(data.triggered).argmax(1)
        cacc = float((clean == np.array([e.label for e in data.dev])).mean())
        return 100 * cacc, 100 * float((triggered == self.suite.target).mean())

    def _clean_tune(self, model: Any, tokenizer: Any, data: _Data, method: str, seed: int) -> float:
        """Train ``model`` further on the defender's clean set; returns seconds."""
        from ...train.data import encode_pairs, make_loader

        started = time.perf_counter()
        loader = make_loader(encode_pairs(data.clean, tokenizer, self.suite.max_length), tokenizer,
                             self.suite.batch_size, shuffle=True, seed=seed)
        args = dataclasses.replace(self.jobs.train_args(method, seed), epochs=self.suite.defence_epochs, max_steps=None)
        train(model, loader, args)
        return time.perf_counter() - started

    # -- the stages --------------------------------------------------------------------------------
    def attack(self, data: _Data) -> dict[str, Any]:
        """Stage 1; returns the shared method's clean and poisoned fits of the first seed."""
        s = self.suite
        methods = self.methods
        shares = list(dict.fromkeys([*s.shares]))
        kept: dict[str, Any] = {}
        plan = [(seed, share, method) for seed in s.seeds for share in shares for method in methods]
        for i, (seed, share, method) in enumerate(plan, 1):
            started = time.perf_counter()
            poisoned, changed = poison(data.train, share, s.trigger, s.target, seed)
            keep = method == s.shared_method and seed == s.seeds[0] and share in (0.0, s.shared_share)
            fitted = self._fit(method, poisoned, seed, keep_initial=keep)
            cacc, asr = self._cacc_asr(fitted.model, fitted.tokenizer, data)
            row = {"method": method, "family": family_of(method), "share": share, "seed": seed,
                   "poisoned": len(changed), "cacc": cacc, "asr": asr,
                   "trainable_percent": 100.0 * fitted.trainable / fitted.total,
                   "wall_s": time.perf_counter() - started}
            self.results["attack"].append(row)
            self.echo(f"[attack {i}/{len(plan)}] {method} p={share:g} seed {seed}: CACC {cacc:.1f}, ASR {asr:.1f} "
                      f"({row['wall_s']:.0f} s)")
            if keep:
                kept["clean" if share == 0.0 else "poisoned"] = fitted
            self.write()
        for name, share in (("clean", 0.0), ("poisoned", s.shared_share)):
            if name not in kept:  # not in the grid: trained here, for stages 2 and 3
                poisoned, _ = poison(data.train, share, s.trigger, s.target, s.seeds[0])
                kept[name] = self._fit(s.shared_method, poisoned, s.seeds[0], keep_initial=True)
        return kept

    def shared(self, data: _Data, kept: dict[str, Any]) -> None:
        """Stage 2: the poisoned adapter merged with a clean one, and trained further on clean data."""
        s = self.suite
        bad, good = kept["poisoned"], kept["clean"]
        cacc, asr = self._cacc_asr(bad.model, bad.tokenizer, data)
        self._shared_row("poisoned adapter as shared", cacc, asr, 0.0)
        cacc, asr = self._cacc_asr(good.model, good.tokenizer, data)
        self._shared_row("clean adapter (same method and seed)", cacc, asr, 0.0)
        for kind in s.merge_types:
            started = time.perf_counter()
            merged = merge_with_heads(s.model, self.glue.num_labels, {"poisoned": bad, "clean": good}, kind,
                                      **s.merge_options.get(kind, {}))
            cacc, asr = self._cacc_asr(merged, bad.tokenizer, data)
            options = "".join(f", {k} {v}" for k, v in s.merge_options.get(kind, {}).items())
            self._shared_row(f"merged with the clean adapter ({kind}{options}, weights 0.5/0.5)", cacc, asr,
                             time.perf_counter() - started)
        model = copy.deepcopy(bad.model)
        seconds = self._clean_tune(model, bad.tokenizer, data, s.shared_method, s.seeds[0])
        cacc, asr = self._cacc_asr(model, bad.tokenizer, data)
        self._shared_row(f"trained further on {len(data.clean)} clean sentences ({s.defence_epochs:g} epochs)",
                         cacc, asr, seconds)

    def _shared_row(self, what: str, cacc: float, asr: float, seconds: float) -> None:
        self.results["shared"].append({"what": what, "cacc": cacc, "asr": asr, "seconds": seconds})
        self.echo(f"[shared] {what}: CACC {cacc:.1f}, ASR {asr:.1f}")
        self.write()

    def defences(self, data: _Data, kept: dict[str, Any]) -> None:
        """Stage 3: STRIP and fine-mixing on the poisoned adapter."""
        s = self.suite
        bad = kept["poisoned"]
        started = time.perf_counter()
        probabilities = self._probabilities(bad.model, bad.tokenizer)
        options = dict(donors=data.calibration, copies=s.strip_copies, replace=s.strip_replace)
        calibration = strip_entropies(probabilities, data.calibration, seed=1, **options)
        threshold = strip_threshold(calibration, s.strip_frr)
        clean = strip_entropies(probabilities, data.test, seed=2, **options)
        attacked = triggered_eval(data.test, s.trigger, s.target, seed=0)
        triggered = strip_entropies(probabilities, attacked, seed=3, **options)
        accepted = clean >= threshold
        clean_pred = probabilities(data.test).argmax(1)
        trig_pred = probabilities(attacked).argmax(1)
        labels = np.array([e.label for e in data.test])
        self.results["defences"].append({
            "defence": "STRIP", "threshold": threshold, "frr_target": s.strip_frr,
            "frr": float(1 - accepted.mean()), "detected": float((triggered < threshold).mean()),
            "cacc": 100 * float((clean_pred == labels)[accepted].mean()) if accepted.any() else 0.0,
            "asr": 100 * float(((trig_pred == s.target) & (triggered >= threshold)).mean()),
            "clean_entropy": float(clean.mean()), "triggered_entropy": float(triggered.mean()),
            "evaluated_on": f"dev test half: {len(data.test)} clean, {len(attacked)} triggered",
            "cost": f"{s.strip_copies} forward passes per input", "seconds": time.perf_counter() - started})
        row = self.results["defences"][-1]
        self.echo(f"[defence] STRIP: detects {100 * row['detected']:.1f}% of triggered inputs at FRR "
                  f"{100 * row['frr']:.1f}%; ASR {row['asr']:.1f}")
        self.write()
        started = time.perf_counter()
        model = copy.deepcopy(bad.model)
        reset = fine_mix(model, bad.initial, s.mix_keep, seed=s.seeds[0])
        self._clean_tune(model, bad.tokenizer, data, s.shared_method, s.seeds[0])
        cacc, asr = self._cacc_asr(model, bad.tokenizer, data)
        self.results["defences"].append({
            "defence": f"fine-mixing (keep {s.mix_keep:g}, then {s.defence_epochs:g} epochs on the clean set)",
            "cacc": cacc, "asr": asr, "reset_entries": reset, "evaluated_on": f"dev: {len(data.dev)} clean, "
            f"{len(data.triggered)} triggered", "cost": f"{len(data.clean)} clean sentences",
            "seconds": time.perf_counter() - started})
        self.echo(f"[defence] fine-mixing: CACC {cacc:.1f}, ASR {asr:.1f}")
        self.write()

    def detector(self, data: _Data) -> None:
        """Stage 4: clean and poisoned adapters (varied seeds, triggers and shares) told apart by weights."""
        s = self.suite
        examples = data.train[:s.detector_train_limit]
        features, labels, kinds = [], [], []
        for i in range(2 * s.detector_adapters):
            is_poisoned = i % 2 == 1
            seed = 100 + i
            trigger = KURITA_TRIGGERS[(i // 2) % len(KURITA_TRIGGERS)]
            share = s.detector_shares[(i // 2) % len(s.detector_shares)] if is_poisoned else 0.0
            trained, _ = poison(examples, share, trigger, s.target, seed)
            fitted = self._fit(s.shared_method, trained, seed)
            features.append(adapter_features(fitted.model.adapter_state_dict()))
            labels.append(is_poisoned)
            kinds.append({"seed": seed, "trigger": trigger if is_poisoned else None, "share": share})
            self.echo(f"[detector {i + 1}/{2 * s.detector_adapters}] {s.shared_method} seed {seed} "
                      f"{'poisoned (' + trigger + f', p={share:g})' if is_poisoned else 'clean'}")
        found = detect_poisoned(features, labels)
        self.results["detector"] = {**found, "adapters": kinds, "method": s.shared_method,
                                    "train_limit": len(examples)}
        self.echo(f"[detector] leave-one-out accuracy {100 * found['accuracy']:.0f}% over {len(labels)} adapters")
        self.write()

    def stages(self, data: _Data) -> None:
        kept = self.attack(data)
        self.shared(data, kept)
        self.defences(data, kept)
        self.detector(data)

    def write(self) -> None:
        from .report import markdown

        write_json_atomic(self.out / "results.json", self.results)
        write_text_atomic(self.out / "report.md", markdown(self.results))


def merge_with_heads(model_path: str, num_labels: int, fits: dict[str, Any], combination_type: str,
                     **options: Any) -> Any:
    """A new model: the trained adapters of ``fits`` (one method, one seed: same head initialisation)
    combined by the method's ``combination_type`` (with its ``options``) with equal weights, and the
    average of their heads.
    The method's arithmetic sees adapters without heads (a trained head is a full copy, which adapter
    arithmetic does not combine)."""
    first = next(iter(fits.values()))
    headless = first.config.replace(modules_to_save=())
    base, _ = load_classifier(model_path, num_labels)
    model = None
    for name, fitted in fits.items():
        if model is None:
            model = get_peft_model(base, headless, adapter_name=name)
        else:
            model.add_adapter(name, headless)
        wanted = model.adapter_state_dict(name)
        trained = fitted.model.adapter_state_dict()
        model.load_adapter_state_dict(name, {k: trained[k] for k in wanted}, source=f"the {name} adapter")
    names = list(fits)
    model.add_weighted_adapter(names, [1.0 / len(names)] * len(names), "merged", combination_type=combination_type,
                              **options)
    model.set_adapter("merged")
    heads = [{path: m.copies["default"].state_dict() for path, m in f.model.base_model.named_modules()
              if isinstance(m, TrainableCopy)} for f in fits.values()]
    if not heads[0]:
        raise PeftlabError(f"the fitted adapters have no trained head ({', '.join(HEADS)}) to merge")
    for path in heads[0]:
        target = model.base_model.get_submodule(path)
        target.load_state_dict({k: sum(h[path][k] for h in heads) / len(heads) for k in heads[0][path]})
    return model


def run_backdoor(suite: BackdoorSuite, out: str | Path, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage into folder ``out`` (results.json, report.md, plots); returns the results."""
    from .report import write_plots

    return run_app("backdoor", BackdoorRunner(suite, Path(out), echo), write_plots)
