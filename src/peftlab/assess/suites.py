"""What an assessment runs: suites of (model, tasks, methods, seeds, budget).

A suite is data. The built-in ones live in :data:`SUITES`; any field can be changed on the command
line or in a YAML file (``--config suite.yaml``), e.g.::

    suite: quick                 # start from a built-in suite (optional)
    model: ../shared/models/all-MiniLM-L6-v2
    tasks:
      - sst2                     # a name takes the suite's budget
      - {name: rte, train_limit: 500, max_length: 128}
    methods: [lora, ia3]         # or "all": every registered method; full fine-tuning is always added
    seeds: [0, 1, 2]
    lr_scale: 2.0                # every method trains at spec.default_lr * lr_scale
    method_options: {lora: {r: 16}}   # config fields for one method (the user's choice, not the suite's)

The learning rate of a method is its own ``MethodSpec.default_lr`` times the suite's ``lr_scale``;
full fine-tuning, which has no spec, uses ``full_lr``. No per-method numbers live here.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import config_from_options
from ..core.errors import PeftlabError
from ..core.registry import all_methods, get_method

FULL = "full"
KINDS = ("glue", "translation", "generation", "efficiency")
# The methods the review benchmarks (its Tables 3-4) that peftlab implements; the quick and GLUE
# suites run these unless told otherwise. A name that is not registered is skipped with a note.
# QLoRA needs the quant extra (bitsandbytes); without it the suites skip it with a note.
REVIEW_METHODS = ("sequential_adapter", "prompt_tuning", "prefix_tuning", "ia3", "bitfit", "child_tuning", "lora",
                  "adalora", "qlora", "mam_adapter", "propetl")


def shared_dir() -> Path:
    """``../shared`` beside the repository: $PEFTLAB_SHARED, else beside the working directory,
    else beside the source checkout (so the defaults work from a fresh clone at any path)."""
    if os.environ.get("PEFTLAB_SHARED"):
        return Path(os.environ["PEFTLAB_SHARED"])
    here = (Path.cwd() / ".." / "shared").resolve()
    if here.is_dir():
        return here
    return (Path(__file__).resolve().parents[3] / ".." / "shared").resolve()


@dataclass(frozen=True)
class TaskSpec:
    """One task of a suite and its budget. ``None`` limits mean the whole split."""

    name: str
    train_limit: int | None = None
    eval_limit: int | None = None
    max_length: int = 128
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Suite:
    """Everything one assessment needs. ``tasks`` may be ``("*",)``: every GLUE task in ``data_dir``."""

    name: str
    kind: str
    model: str
    data_dir: str | None
    tasks: tuple[TaskSpec, ...]
    methods: tuple[str, ...] = REVIEW_METHODS
    seeds: tuple[int, ...] = (0, 1, 2)  # a spread, not a single number: the report gives mean ± std
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 32
    split_by_length: bool = True  # GLUE: each batch run as parts of similar length (less padding, same gradient)
    lr_scale: float = 1.0
    full_lr: float = 5e-5
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    lrs: dict[str, float] = field(default_factory=dict)  # explicit learning rates given by the user
    baseline_margin: float = 0.01  # a score within this of the majority baseline gets a note
    # efficiency only: the biggest model run on CPU (parameters), timed steps after warm-up/probe
    max_params: int | None = 300_000_000
    timed_steps: int = 2
    # GLUE: after each run, its first floor_steps batches are trained again with the model frozen but
    # its head (the frozen floor), in the same process: the run's step time and memory are reported as
    # ratios to that, which machine load between runs and workers does not skew. 0: not measured.
    floor_steps: int = 10
    device: str | None = None  # None: accelerate's choice (GPU when there is one)
    # A built-in suite's stand-in for its default model when that cannot be loaded (a hub id with the
    # hub out of reach and nothing cached): run instead, with a note. A model the user names has none.
    model_fallback: str | None = None
    explicit_methods: bool = False  # methods came from the user: unknown names are errors, not notes
    # methods found by a search (AutoPEFT, S3Delta-M, S4): candidates trained per search, optimizer steps
    # per candidate (None: a quarter of a run's steps) and a wall-time cap, before the found config's run
    search_trials: int = 6
    search_steps: int | None = None
    search_minutes: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PeftlabError(f"suite {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if not self.seeds:
            raise PeftlabError(f"suite {self.name!r}: seeds is empty; give at least one seed, e.g. --seeds 0")
        if self.lr_scale <= 0 or self.full_lr <= 0:
            raise PeftlabError(f"suite {self.name!r}: lr_scale={self.lr_scale} and full_lr={self.full_lr} "
                               "must be positive")
        if isinstance(self.floor_steps, bool) or not isinstance(self.floor_steps, int) or (0 < self.floor_steps < 6) \
                or self.floor_steps < 0:
            raise PeftlabError(f"suite {self.name!r}: floor_steps={self.floor_steps!r}: expected 0 (no frozen-floor "
                               "reference) or a whole number of steps of at least 6 (the first 3 and the 2 probed for "
                               "memory are not timed), e.g. floor_steps: 12")
        check_method_options(self.method_options, f"suite {self.name!r}")
        self.search_budget(100)  # a bad search_trials / search_steps / search_minutes fails here, named

    def search_budget(self, run_steps: int) -> Any:
        """The budget of a search method's search, for runs of ``run_steps`` optimizer steps."""
        from ..core.search import SearchBudget

        try:
            return SearchBudget(trials=self.search_trials, steps=self.search_steps or max(1, run_steps // 4),
                                minutes=self.search_minutes)
        except PeftlabError as err:
            raise PeftlabError(f"suite {self.name!r}: {str(err).replace('SearchBudget.', 'search_')}") from None

    def replace(self, **changes: Any) -> "Suite":
        if "model" in changes and changes["model"] != self.model:
            changes.setdefault("model_fallback", None)  # the user's model: no stand-in
        return dataclasses.replace(self, **changes)

    def with_reachable_model(self) -> tuple["Suite", str | None]:
        """This suite, or (when its default model cannot be loaded and it has a fallback) the suite
        on the fallback model, with a note saying so."""
        if self.model_fallback is None:
            return self, None
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(self.model)
        except Exception as err:  # noqa: BLE001 - any failure to load means: not reachable here
            detail = " ".join(str(err).split())[:160]
            note = (f"the {self.name} suite's model {self.model!r} could not be loaded ({type(err).__name__}: "
                    f"{detail}), so it ran {self.model_fallback!r} instead; pass --model with a local folder or "
                    "a hub id you can reach for a pretrained model")
            return self.replace(model=self.model_fallback), note
        return self, None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tasks"] = [t.to_dict() for t in self.tasks]
        return out

    # -- methods -------------------------------------------------------------------------
    def method_plan(self) -> tuple[list[str], list[str]]:
        """(methods to run, notes about requested methods that are not registered)."""
        wanted = list(self.methods)
        every = any(m.lower() == "all" for m in wanted)
        if every:  # every method of the taxonomy: a search's internal stage is not one
            wanted = [s.name for s in all_methods() if not s.internal]
        chosen: list[str] = []
        notes: list[str] = []
        for name in wanted:
            if name == FULL:
                continue
            try:
                spec = get_method(name)
            except PeftlabError as err:
                if self.explicit_methods:
                    raise
                notes.append(f"method {name!r} is in the {self.name} suite's list but not registered "
                             f"in this peftlab; skipped ({err})")
                continue
            missing = spec.missing_requirement()
            if missing:
                if self.explicit_methods:
                    raise PeftlabError(missing)
                notes.append(f"method {spec.name!r} skipped: {missing}")
                continue
            if spec.encoder_only and self.kind in ("translation", "generation"):
                why = (f"method {spec.name!r} applies to encoder models only; the {self.name} suite's {self.kind} "
                       "model is a decoder or encoder-decoder")
                if self.explicit_methods and not every:
                    raise PeftlabError(f"{why}: drop it from methods")
                notes.append(f"{why}, so it is skipped here")
                continue
            if spec.search is not None and self.kind != "glue":
                why = (f"method {spec.name!r} is found by a search, which the study runs on GLUE tasks only (its "
                       f"candidates are scored on held-out training examples); the {self.name} suite is {self.kind}")
                if self.explicit_methods and not every:
                    raise PeftlabError(f"{why}: drop it from methods")
                notes.append(f"{why}, so it is skipped here")
                continue
            if spec.example is not None:  # it combines adapters trained before; one run trains one from scratch
                notes.append(f"method {spec.name!r} builds on other trained adapters; a study run trains one "
                             "adapter from scratch, so it is skipped here")
                continue
            if spec.name not in chosen:
                chosen.append(spec.name)
        return chosen + [FULL], notes

    def learning_rate(self, method: str) -> float:
        if method in self.lrs:
            return float(self.lrs[method])
        if method == FULL:
            return self.full_lr
        return get_method(method).default_lr * self.lr_scale

    def method_config(self, method: str) -> Any:
        """The config a method runs with: its own defaults plus the user's ``method_options``."""
        if method == FULL:
            return None
        spec = get_method(method)
        return spec.config_cls(**self.method_options.get(method, {}))


def _shared(*parts: str) -> str:
    return str(shared_dir().joinpath(*parts))


def builtin_suites() -> dict[str, Suite]:
    """The built-in suites (paths resolved now, so $PEFTLAB_SHARED and the cwd are honoured)."""
    minilm = _shared("models", "all-MiniLM-L6-v2")
    glue = _shared("data", "glue")
    return {
        # The README's main job: the review's methods x 3 seeds in 15 minutes on two CPU cores. SST-2
        # only: RTE (which it ran before) is at chance for every method with this 22M-parameter model,
        # so it ranked nothing. 2,000 training sentences: 2,500 took 16.6 min with QLoRA; the rank
        # correlation with a 4x budget is in docs/assessment.md. One short epoch
        # wants larger steps than the methods' defaults (tuned for full runs), hence lr_scale 4.
        "quick": Suite(
            name="quick", kind="glue", model=minilm, data_dir=glue,
            tasks=(TaskSpec("sst2", train_limit=2000, max_length=64),),
            lr_scale=4.0, full_lr=1e-4),
        "glue": Suite(
            name="glue", kind="glue", model=minilm, data_dir=glue,
            tasks=(TaskSpec("*", train_limit=4000, max_length=128),), lr_scale=4.0, full_lr=1e-4),
        # t5-small from the hub (or its cache) when it can be loaded; else a T5 of that shape with random
        # weights, whose report says in bold that its scores say nothing about PEFT.
        "mt": Suite(
            name="mt", kind="translation", model="t5-small", model_fallback="random:t5-small",
            data_dir=_shared("data", "mt", "en-ro"),
            tasks=(TaskSpec("wmt16_en_ro", train_limit=2000, eval_limit=200, max_length=64),),
            batch_size=16, lr_scale=2.0, full_lr=1e-4),
        "nlg": Suite(
            name="nlg", kind="generation", model=_shared("models", "stories260K"),
            data_dir=_shared("data", "nlg", "e2e"),
            tasks=(TaskSpec("e2e", train_limit=2000, eval_limit=200, max_length=96),),
            batch_size=16, lr_scale=2.0, full_lr=1e-3),
        # Every registered method, family by family, on one small SST-2 budget x 3 seeds: the table of
        # the whole taxonomy. 1,500 sentences: 54.7 min for the 159 runs on two cores (see the README);
        # 1,000 took 44.6 min but left 23 of the 53 methods at the majority class (8 at 1,500), a table
        # that ranks nothing.
        "taxonomy": Suite(
            name="taxonomy", kind="glue", model=minilm, data_dir=glue,
            tasks=(TaskSpec("sst2", train_limit=1500, max_length=64),), methods=("all",),
            lr_scale=4.0, full_lr=1e-4),
        # No training to convergence: trainable share, peak memory and step time per method at a
        # fixed batch, on the review's model sizes built from their configs with random weights.
        "efficiency": Suite(
            name="efficiency", kind="efficiency", model="random",
            data_dir=None,
            tasks=tuple(TaskSpec(size, max_length=32) for size in
                        ("roberta-base", "roberta-large", "t5-base", "t5-large", "llama-7b")),
            batch_size=4, seeds=(0,)),  # nothing is trained: seeds would only repeat the same measurement
    }


SUITE_NAMES = ("quick", "taxonomy", "glue", "mt", "nlg", "efficiency")

_TASK_KEYS = {f.name for f in dataclasses.fields(TaskSpec)}
_SUITE_KEYS = {f.name for f in dataclasses.fields(Suite)} - {"explicit_methods", "model_fallback"}


def parse_task(value: Any, default: TaskSpec | None = None) -> TaskSpec:
    """A task from a name (taking ``default``'s budget) or a mapping of TaskSpec fields."""
    base = default or TaskSpec("*")
    if isinstance(value, TaskSpec):
        return value
    if isinstance(value, str):
        return dataclasses.replace(base, name=value)
    if isinstance(value, dict):
        unknown = sorted(set(value) - _TASK_KEYS)
        if unknown or "name" not in value:
            raise PeftlabError(f"task entry {value!r}: expected a name or a mapping with 'name' and any of "
                               f"{sorted(_TASK_KEYS)}; unknown keys: {unknown or 'none'}")
        return dataclasses.replace(base, **value)
    raise PeftlabError(f"task entry {value!r}: expected a task name or a mapping such as "
                       "{name: rte, train_limit: 1000}")


def suite_from_mapping(data: dict[str, Any], source: str, base: Suite | None = None) -> Suite:
    """Apply a YAML mapping onto ``base`` (or the built-in suite it names with ``suite:``)."""
    if not isinstance(data, dict):
        raise PeftlabError(f"{source}: expected a mapping of suite fields, got {type(data).__name__}")
    data = dict(data)
    name = data.pop("suite", None)
    if name is not None:
        base = get_suite(str(name))
    if base is None:
        raise PeftlabError(f"{source}: name a built-in suite to start from ('suite: quick'; one of "
                           f"{', '.join(SUITE_NAMES)}) or pass --suite")
    unknown = sorted(set(data) - _SUITE_KEYS)
    if unknown:
        raise PeftlabError(f"{source}: unknown suite field(s) {unknown}; allowed: {sorted(_SUITE_KEYS)}")
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key == "tasks":
            value = value if isinstance(value, list) else [value]
            default = base.tasks[0] if base.tasks else None
            changes[key] = tuple(parse_task(v, default) for v in value)
        elif key == "methods":
            value = [value] if isinstance(value, str) else list(value)
            changes[key] = tuple(str(v) for v in value)
            changes["explicit_methods"] = True
        elif key == "method_options":
            check_method_options(value, source)  # here, so the message names the file
            changes[key] = value
        elif key == "seeds":
            value = [value] if isinstance(value, int) else list(value)
            changes[key] = tuple(int(v) for v in value)
        else:
            changes[key] = value
    return base.replace(**changes)


def check_method_options(options: Any, source: str) -> None:
    """Refuse an unknown method, an unknown option or a bad value in ``method_options`` before
    anything runs, with the check ``--opt`` gets (:func:`~peftlab.core.config.config_from_options`:
    it names the option and lists the method's options); ``source`` (the YAML file) leads the message."""
    if not isinstance(options, dict):
        raise PeftlabError(f"{source}: method_options={options!r}: expected a mapping of method names to "
                           "their options, e.g. method_options: {lora: {r: 16}}")
    for method, values in options.items():
        if not isinstance(values, dict):
            raise PeftlabError(f"{source}: method_options.{method}={values!r}: expected a mapping of option "
                               f"names to values, e.g. method_options: {{{method}: {{r: 16}}}}")
        try:
            # The config takes HF peft's names too (lora_alpha), so those are checked under peftlab's.
            aliases = getattr(get_method(str(method)).config_cls, "peft_aliases", {})
            # config_from_options reads each value as JSON (as --opt KEY=VALUE); written as JSON, a
            # YAML value reads back unchanged. The config built is only a check: method_config builds the real one.
            config_from_options(str(method), {aliases.get(str(k), str(k)): json.dumps(v, default=str)
                                              for k, v in values.items()})
        except PeftlabError as err:
            raise PeftlabError(f"{source}: method_options.{method}: {err}") from None


def read_suite_file(path: str | Path) -> Any:
    """The YAML document in ``path`` (a mapping of suite fields, unchecked)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PeftlabError(f"suite file {path} not found; pass a YAML file of suite fields (see docs/assessment.md)")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise PeftlabError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from err


def load_suite_file(path: str | Path, base: Suite | None = None) -> Suite:
    return suite_from_mapping(read_suite_file(path), str(path), base)


def get_suite(name: str) -> Suite:
    suites = builtin_suites()
    if name not in suites:
        from ..apps import APPS

        raise PeftlabError(f"unknown suite {name!r}; built-in suites: {', '.join(SUITE_NAMES)}; applications: "
                           f"{', '.join(APPS)}")
    return suites[name]
