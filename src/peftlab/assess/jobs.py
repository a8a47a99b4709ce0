"""The runs of a suite, one kind of job per kind of task.

Every job measures the same things the same way: trainable parameters (count and share), peak
training memory (:class:`~peftlab.assess.measure.MemoryProbe` on probed steps), median step time
and tokens/s of the un-probed steps, and the task score. A job never looks at a method's name: the
method's config comes from ``spec.config_cls()`` (plus the user's options), its learning rate
from ``spec.default_lr`` times the suite's scale.

Before anything trains, :meth:`Jobs.preflight` checks the model and reads every data file of the
plan, so a missing folder, a malformed row or a label outside the task's set stops the suite at
once with the file and line, instead of an hour later.
"""
from __future__ import annotations

import dataclasses
import gc
import importlib
import inspect
import os
import platform
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import PeftlabError
from ..core.registry import get_method
from ..tasks.errors import TaskDataError, describe_folder
from .efficiency import SIZES, build, count_parameters, fit_notes, get_size, synthetic_loader
from .measure import MemoryProbe
from .store import fingerprint
from .suites import FULL, Suite, TaskSpec


def family_of(method: str) -> str:
    return "full fine-tuning" if method == FULL else get_method(method).family


def subcategory_of(method: str) -> str:
    return "" if method == FULL else get_method(method).subcategory


def _versions() -> dict[str, str]:
    import transformers

    from .. import __version__

    return {"peftlab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": str(torch.get_num_threads())}


def machine() -> str:
    """The processor the runs are timed on: architecture, CPU model, logical cores (and GPU)."""
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{platform.machine()} {model} x{os.cpu_count()}{gpu}".replace("  ", " ")


# -- model checks --------------------------------------------------------------------------------
_HEADS = {
    "sequence classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "seq2seq generation": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "causal generation": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
}


def check_model(model: str, head: str, task_label: str) -> None:
    """Fail early, with a fix, when ``model`` is missing or has no ``head`` in transformers."""
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto

    from ..train.glue_job import model_source_hint

    path = Path(model)
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise PeftlabError(f"model {model!r} not found: {model_source_hint(model)}; pass a folder "
                               "holding config.json and the weights, or a hub id")
        if not (path / "config.json").is_file():
            raise PeftlabError(f"{path / 'config.json'} not found ({describe_folder(path)}); a model folder needs "
                               "config.json (save one with model.save_pretrained(folder))")
    try:
        config = AutoConfig.from_pretrained(model)
    except Exception as err:  # noqa: BLE001 - any loading failure gets the same advice
        raise PeftlabError(f"cannot read the configuration of model {model!r}: {model_source_hint(model)} "
                           f"({type(err).__name__}: {' '.join(str(err).split())}); pass a local model folder "
                           "(the hub may be unreachable)") from err
    mapping = getattr(modeling_auto, _HEADS[head])
    if config.model_type not in mapping:
        where = path / "config.json" if looks_local else model
        able = sorted(mapping)
        raise PeftlabError(
            f"{where}: model_type {config.model_type!r} has no {head} head in transformers, so it cannot do "
            f"{task_label}. Fix: use a model of a type that has one ({', '.join(able[:12])}, ... {len(able)} "
            "types), or pick tasks this model can do")


# -- one run -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Measured:
    """What a job hands back to be stored with the run."""

    summary: dict[str, Any]
    probe: MemoryProbe
    score: float | None
    score_metric: str | None
    metrics: dict[str, float]
    search: dict[str, Any] | None = None  # a search method's search (SearchResult.to_dict) before the run
    floor: dict[str, Any] | None = None  # the frozen floor measured after the run in the same process


class Jobs:
    """Base: a kind of task. Subclasses fill in tasks, preflight, baselines and run."""

    head = "sequence classification"

    def __init__(self, suite: Suite, progress: bool = True) -> None:
        self.suite = suite
        self.progress = progress  # per-run training bars
        self.notes: list[str] = []
        self.threads: int | None = None  # torch threads per run (None: this process's setting)

    def tasks(self) -> list[TaskSpec]:
        return list(self.suite.tasks)

    def preflight(self, tasks: list[TaskSpec], methods: list[str]) -> None:
        for method in methods:
            self.suite.method_config(method)  # a bad method_options entry fails here, with its message

    def baseline(self, task: TaskSpec) -> float | None:
        return None

    def methods_for(self, task: TaskSpec, methods: list[str]) -> list[str]:
        return methods

    def settings(self, task: TaskSpec, method: str, seed: int) -> dict[str, Any]:
        suite = self.suite
        config = suite.method_config(method)
        return {"kind": suite.kind, "model": suite.model, "data_dir": suite.data_dir, "task": task.to_dict(),
                "method": method, "config": config.to_dict() if config else None,
                "lr": suite.learning_rate(method), "epochs": suite.epochs, "max_steps": suite.max_steps,
                "batch_size": suite.batch_size, "split_by_length": suite.split_by_length,
                "warmup_ratio": suite.warmup_ratio,
                "weight_decay": suite.weight_decay, "seed": seed, "timed_steps": suite.timed_steps,
                "floor_steps": suite.floor_steps,
                # Scores move with the thread count (reduction order) and times with the machine:
                # a run made under other ones is not reused.
                "threads": self.threads or torch.get_num_threads(), "machine": machine(),
                **({"search": {"trials": suite.search_trials, "steps": suite.search_steps,
                               "minutes": suite.search_minutes}} if config is not None and _searched(method) else {})}

    def train_args(self, method: str, seed: int, max_steps: int | None = None) -> Any:
        from ..train.loop import TrainArgs

        s = self.suite
        return TrainArgs(epochs=s.epochs, lr=s.learning_rate(method), weight_decay=s.weight_decay,
                         warmup_ratio=s.warmup_ratio, max_steps=max_steps or s.max_steps, seed=seed,
                         progress=self.progress, split_by_length=s.split_by_length)

    def measure(self, task: TaskSpec, method: str, seed: int) -> Measured:
        raise NotImplementedError

    def run(self, task: TaskSpec, method: str, seed: int) -> dict[str, Any]:
        """One run, as the record stored in its JSON file (``status`` ok or failed)."""
        settings = self.settings(task, method, seed)
        record: dict[str, Any] = {
            "suite": self.suite.name, "kind": self.suite.kind, "model": self.suite.model, "task": task.name,
            "method": method, "family": family_of(method), "subcategory": subcategory_of(method), "seed": seed,
            "lr": settings["lr"],
            "config": settings["config"], "settings": settings, "fingerprint": fingerprint(settings),
            "baseline": self.baseline(task), "versions": _versions(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        wall0, cpu0 = time.perf_counter(), time.process_time()
        try:
            measured = self.measure(task, method, seed)
        except TaskDataError:
            raise  # bad data is the user's to fix: stop the suite with the message
        except Exception as err:  # noqa: BLE001 - a method failing on one model must not stop the suite
            record.update(status="failed", error=f"{type(err).__name__}: {err}",
                          traceback=traceback.format_exc(limit=8)[-4000:])
        else:
            s, probe = measured.summary, measured.probe
            if measured.search is not None:
                record["search"] = measured.search
            if measured.floor is not None:
                record["floor"] = measured.floor
            record.update(
                status="ok", score=measured.score, score_metric=measured.score_metric, metrics=measured.metrics,
                trainable_params=s["trainable_params"], total_params=s["total_params"],
                trainable_percent=s["trainable_percent"], steps=s["steps"], final_loss=_clean(s["final_loss"]),
                median_step_s=_clean(s["median_step_s"]), tokens_per_s=_clean(s["tokens_per_s"]),
                peak_memory_bytes=probe.peak_bytes, held_memory_bytes=probe.held_bytes,
                memory_method=probe.method or "not measured (no training step was probed)",
                device=str(s.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")))
        record["wall_s"] = time.perf_counter() - wall0
        record["cpu_s"] = time.process_time() - cpu0
        record["threads"] = torch.get_num_threads()
        return record


def _searched(method: str) -> bool:
    return get_method(method).search is not None


def _clean(value: float | None) -> float | None:
    """JSON has no NaN: an undefined figure (no timed step, no score) is stored as null."""
    return None if value is None or not np.isfinite(value) else float(value)


# -- GLUE ----------------------------------------------------------------------------------------
class GlueJobs(Jobs):
    head = "sequence classification"

    def __init__(self, suite: Suite, progress: bool = True) -> None:
        super().__init__(suite, progress)
        self._baselines: dict[str, float] = {}

    def tasks(self) -> list[TaskSpec]:
        from ..tasks.glue import GLUE_TASKS, get_glue_task

        out: list[TaskSpec] = []
        for spec in self.suite.tasks:
            if spec.name != "*":
                out.append(dataclasses.replace(spec, name=get_glue_task(spec.name).name))
                continue
            root = Path(self.suite.data_dir or "")
            if not root.is_dir():
                raise TaskDataError(f"GLUE data folder {root} not found ({describe_folder(root.parent)}); pass "
                                    "--data-dir with the folder holding CoLA/, SST-2/, ... ")
            present = {get_glue_task(p.name).name for p in root.iterdir() if p.is_dir() and _is_glue(p.name)}
            if not present:
                raise TaskDataError(f"no GLUE task folder in {root} ({describe_folder(root)}); expected folders "
                                    f"named {', '.join(t.dir_name for t in GLUE_TASKS.values())}")
            out += [dataclasses.replace(spec, name=name) for name in GLUE_TASKS if name in present]
        return out

    def preflight(self, tasks: list[TaskSpec], methods: list[str]) -> None:
        from ..tasks.glue import get_glue_task, load_glue

        super().preflight(tasks, methods)
        names = ", ".join(get_glue_task(t.name).dir_name for t in tasks)
        check_model(self.suite.model, self.head, f"GLUE ({names})")
        for task in tasks:
            glue = get_glue_task(task.name)
            if not load_glue(glue, self.suite.data_dir, "train", task.train_limit):
                raise TaskDataError(f"GLUE {glue.dir_name} train split in {self.suite.data_dir} has no examples")
            labels = [e.label for e in load_glue(glue, self.suite.data_dir, glue.eval_splits[0], task.eval_limit)]
            for split in glue.eval_splits[1:]:
                try:
                    load_glue(glue, self.suite.data_dir, split, task.eval_limit)
                except TaskDataError as err:  # run_glue scores the splits there are
                    first = str(err).split("; ")[0].split(". ")[0]
                    self.notes.append(f"{glue.dir_name}: no {split} split ({first}); scored on {glue.eval_splits[0]} only")
            self._baselines[task.name] = constant_baseline(glue, labels)

    def baseline(self, task: TaskSpec) -> float | None:
        return self._baselines.get(task.name)

    def measure(self, task: TaskSpec, method: str, seed: int) -> Measured:
        from ..tasks.glue import get_glue_task
        from ..train.glue_job import GlueRun, run_glue

        s = self.suite
        run = GlueRun(model=s.model, task=task.name, data_dir=s.data_dir, train_limit=task.train_limit,
                      eval_limit=task.eval_limit, batch_size=s.batch_size, max_length=task.max_length,
                      split_by_length=s.split_by_length)
        config, search = s.method_config(method), None
        if config is not None and _searched(method):
            config, search = self._search(run, method, seed, config)
        probe, floor_probe = MemoryProbe(), MemoryProbe()
        summary = run_glue(run, config, self.train_args(method, seed), probe=probe, floor_steps=s.floor_steps,
                           floor_probe=floor_probe)
        glue = get_glue_task(task.name)
        metrics = summary["metrics"]
        key = glue.main_metric if glue.main_metric in metrics else f"{glue.eval_splits[0]}/{glue.main_metric}"
        floor = summary.get("floor")
        if floor is not None:
            floor = {**floor, "peak_memory_bytes": floor_probe.peak_bytes}
        return Measured(summary, probe, _clean(metrics.get(key)), glue.main_metric, metrics, search, floor)

    def _search(self, run: Any, method: str, seed: int, config: Any) -> tuple[Any, dict[str, Any]]:
        """Run the method's search on held-out training examples (the dev set stays unseen); the
        found config then trains as the run. Its candidates train at the run's learning rate."""
        from ..train.search import glue_search_context

        context = glue_search_context(run, self.train_args(method, seed))
        budget = self.suite.search_budget(context.run_steps)
        result = get_method(method).search(context, budget, config)
        return result.config, result.to_dict()


def _is_glue(name: str) -> bool:
    from ..tasks.glue import get_glue_task

    try:
        get_glue_task(name)
    except ValueError:
        return False
    return True


def constant_baseline(task: Any, labels: list[Any]) -> float:
    """The best main-metric score of a constant prediction on ``labels``: the majority class for
    classification (accuracy = majority share; Matthews = 0), the mean for regression (Pearson = 0).
    A trained model at or below it has learned nothing the label distribution does not give."""
    from ..tasks.glue import glue_metrics

    if task.is_regression:
        return float(glue_metrics(task, np.full(len(labels), float(np.mean(labels))), labels)[task.main_metric])
    return max(glue_metrics(task, np.full(len(labels), k), labels)[task.main_metric] for k in range(task.num_labels))


# -- translation and generation (jobs written in peftlab.train) ---------------------------------
class TextJobs(Jobs):
    """Runs a ``peftlab.train`` job function ``fn(run, config, args, probe=...)`` whose first
    argument is a dataclass of run settings; its summary has run_glue's keys."""

    module = ""
    function = ""
    metric = "bleu"

    def _job(self) -> tuple[Any, type]:
        try:
            mod = importlib.import_module(self.module)
        except ModuleNotFoundError as err:
            raise PeftlabError(f"the {self.suite.name} suite runs {self.module}.{self.function}, which this "
                               f"peftlab does not have yet ({err}); update peftlab") from err
        fn = getattr(mod, self.function, None)
        if fn is None:
            raise PeftlabError(f"{self.module} has no {self.function}(); update peftlab")
        # the run settings class is the annotation of the first parameter (a name in fn's module)
        annotation = next(iter(inspect.signature(fn).parameters.values())).annotation
        run_cls = fn.__globals__.get(annotation) if isinstance(annotation, str) else annotation
        if not dataclasses.is_dataclass(run_cls):
            raise PeftlabError(f"{self.module}.{self.function}: its first parameter should be annotated with the "
                               f"dataclass of run settings, got {annotation!r}")
        return fn, run_cls

    def preflight(self, tasks: list[TaskSpec], methods: list[str]) -> None:
        super().preflight(tasks, methods)
        self._job()
        if not self.suite.model.startswith("random:"):
            check_model(self.suite.model, self.head, f"the {self.suite.name} suite")
        if self.suite.data_dir is not None and not Path(self.suite.data_dir).is_dir():
            raise TaskDataError(f"data folder {self.suite.data_dir} not found "
                                f"({describe_folder(Path(self.suite.data_dir).parent)}); pass --data-dir")
        fn, run_cls = self._job()
        if "probe" not in inspect.signature(fn).parameters:
            self.notes.append(f"{self.module}.{self.function} takes no `probe`, so peak memory is not measured "
                              "in this suite")

    def measure(self, task: TaskSpec, method: str, seed: int) -> Measured:
        fn, run_cls = self._job()
        s = self.suite
        fields = {f.name for f in dataclasses.fields(run_cls)}
        values: dict[str, Any] = {"model": s.model, "data_dir": s.data_dir, "train_limit": task.train_limit,
                                  "eval_limit": task.eval_limit, "batch_size": s.batch_size}
        for name in ("max_length", "max_source_length", "max_target_length", "max_seq_length"):
            values[name] = task.max_length
        values.update(task.options)
        unknown = sorted(set(task.options) - fields)
        if unknown:
            raise PeftlabError(f"task {task.name!r} options {unknown} are not fields of {run_cls.__name__}; "
                               f"its fields: {sorted(fields)}")
        run = run_cls(**{k: v for k, v in values.items() if k in fields})
        probe = MemoryProbe()
        kwargs = {"probe": probe} if "probe" in inspect.signature(fn).parameters else {}
        summary = fn(run, s.method_config(method), self.train_args(method, seed), **kwargs)
        metrics = summary["metrics"]
        return Measured(summary, probe, _clean(metrics.get(self.metric)), self.metric, metrics)


class TranslationJobs(TextJobs):
    head = "seq2seq generation"
    module = "peftlab.train.seq2seq_job"
    function = "run_translation"


class GenerationJobs(TextJobs):
    head = "causal generation"
    module = "peftlab.train.causal_job"
    function = "run_generation"


# -- efficiency ----------------------------------------------------------------------------------
class EfficiencyJobs(Jobs):
    """Trainable share, peak memory and step time at a fixed batch; no task score."""

    def __init__(self, suite: Suite, progress: bool = True) -> None:
        super().__init__(suite, progress)
        self._plan: dict[str, tuple[bool, bool]] = {}

    def _device(self) -> str:
        return self.suite.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def preflight(self, tasks: list[TaskSpec], methods: list[str]) -> None:
        super().preflight(tasks, methods)
        device = self._device()
        for task in tasks:
            size = get_size(task.name)
            params = count_parameters(size)
            peft_ok, full_ok, note = fit_notes(size, params, device, self.suite.max_params)
            self._plan[task.name] = (peft_ok, full_ok)
            if note:
                self.notes.append(note)
            for method in self._encoder_only(size, methods):
                self.notes.append(f"{task.name}: method {method!r} applies to encoder models only, so it is "
                                  f"skipped on this {size.kind} model")

    def methods_for(self, task: TaskSpec, methods: list[str]) -> list[str]:
        peft_ok, full_ok = self._plan.get(task.name, (True, True))
        skip = self._encoder_only(get_size(task.name), methods)
        return [m for m in methods if (full_ok if m == FULL else peft_ok and m not in skip)]

    @staticmethod
    def _encoder_only(size: Any, methods: list[str]) -> list[str]:
        """The methods that declare ``encoder_only``, where ``size`` is not an encoder."""
        if size.kind == "encoder":
            return []
        return [m for m in methods if m != FULL and get_method(m).encoder_only]

    def settings(self, task: TaskSpec, method: str, seed: int) -> dict[str, Any]:
        out = super().settings(task, method, seed)
        out["device"] = self._device()
        return out

    def measure(self, task: TaskSpec, method: str, seed: int) -> Measured:
        from ..train.glue_job import HEADS

        size = get_size(task.name)
        model = build(size, seed, self._device())
        config = self.suite.method_config(method)
        if (config is not None and size.kind == "encoder" and not config.modules_to_save
                and not get_method(method).replaces_head):
            config = config.replace(modules_to_save=HEADS)
        try:
            return self._measure(model, size, task, method, config, seed)
        finally:
            del model
            gc.collect()  # the next size must not start with this one's memory still held
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _measure(self, model: Any, size: Any, task: TaskSpec, method: str, config: Any, seed: int) -> Measured:
        from ..train.generation import wrap_model
        from ..train.loop import train

        model, trainable, total = wrap_model(model, config)
        # step 0 warms up (and creates the optimizer state), step 1 is probed, the rest are timed
        steps = 2 + max(1, self.suite.timed_steps)
        loader = synthetic_loader(size, model.config.vocab_size, self.suite.batch_size, task.max_length, steps, seed)
        probe = MemoryProbe(steps=(1,))
        args = dataclasses.replace(self.train_args(method, seed, max_steps=steps), progress=False)
        result = train(model, loader, args, probe=probe)
        summary = {"trainable_params": trainable, "total_params": total,
                   "trainable_percent": 100.0 * trainable / total, "steps": result.steps,
                   "final_loss": result.final_loss, "median_step_s": _median_timed(result),
                   "tokens_per_s": _tokens_per_s(result), "device": self._device()}
        return Measured(summary, probe, None, None, {})


def _timed(result: Any) -> list[int]:
    probed = set(result.probed_steps)
    return [i for i in range(1, len(result.step_times)) if i not in probed]


def _median_timed(result: Any) -> float:
    times = [result.step_times[i] for i in _timed(result)]
    return float(np.median(times)) if times else float("nan")


def _tokens_per_s(result: Any) -> float:
    idx = _timed(result)
    seconds = sum(result.step_times[i] for i in idx)
    return sum(result.step_tokens[i] for i in idx) / seconds if seconds else float("nan")


JOBS: dict[str, type[Jobs]] = {"glue": GlueJobs, "translation": TranslationJobs, "generation": GenerationJobs,
                               "efficiency": EfficiencyJobs}


def jobs_for(suite: Suite, progress: bool = True) -> Jobs:
    return JOBS[suite.kind](suite, progress)


__all__ = ["JOBS", "Jobs", "check_model", "constant_baseline", "jobs_for", "SIZES"]
