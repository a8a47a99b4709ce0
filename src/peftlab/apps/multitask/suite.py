"""The multi-task suite: task adapters trained on several GLUE tasks, then combined and transferred.

1. **Task adapters.** On each task, one adapter of ``merge_method`` (LoRA: merged by arithmetic) and
   one of ``fusion_adapter`` (a bottleneck adapter: fused by AdapterFusion), each with its own head;
   a ``prompt_method`` prompt on every task but the target (SPoT's and ATTEMPT's sources). Each is
   scored on its own task.
2. **Combinations, scored on every task** (each task's own head in front of the combined body):
   the task LoRAs merged by each of ``merge_types`` (the method's adapter arithmetic: linear, TIES,
   DARE), per task an AdapterFusion over every task adapter, trained on that task (Pfeiffer et
   al. 2021's second stage), and one ``joint_method`` adapter trained on all the tasks at once, each
   example routed by its task id (MoELoRA, Liu et al. 2023: a task-conditioned gate over LoRA experts).
3. **Transfer to a low-resource target** (``target``, its first ``target_shots`` training examples),
   from the other tasks, against training on the target alone:
   - each adapter kind trained on the target alone;
   - SPoT (Vu et al. 2022): the target prompt starts from the ``spot_source`` prompt;
   - intermediate-task transfer: the target LoRA starts from the ``spot_source`` LoRA;
   - LoRAHub (Huang et al. 2023): the source LoRAs composed by a gradient-free search on the shots;
   - AdapterFusion over the source adapters and the target's own, trained on the shots;
   - ATTEMPT (Asai et al. 2022): the source prompts mixed per input with a new target prompt.
4. **Mixed-task batches**: one model holding every task's LoRA and head; inference throughput of
   batches that mix the tasks (``adapter_names``) against batches of one task each.

Decisions (see :mod:`.combine`): every head is as wide as the largest class count among the tasks,
so one model holds all heads at once; a task with fewer classes has its extra outputs closed (fixed
at -10^4: no probability, no gradient), so it trains and scores as a head of its own width. A head belongs to
its task: merges and fusions combine adapters, not heads. AdapterFusion's head starts from the
target task adapter's trained head (a new head at the fusion's learning rate does not learn in the
quick budget). LoRAHub needs a head for the target: it uses the head trained with the target-alone
LoRA on the same shots. ATTEMPT's target prompt has prompt tuning's settings (``method_options``
of ``prompt_method``, then of ``mixture_method``). The joint adapter keeps one head per task
(:class:`.combine.TaskHeads`: each example's logits from its task's head, extra outputs closed); its
examples are the tasks' training sets shuffled together (batches mix tasks) for ``epochs`` epochs,
the same passes over each example as a task adapter. (One head over the union of the tasks' classes,
the analogue of the paper's shared vocabulary, left SST-2 at 51.7 % in the quick default; likely the
same failure as an open head: the other tasks' outputs take the mass while the body, the same for
every task until the adapter moves, cannot tell the tasks apart.)
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ...assess.jobs import Jobs
from ...assess.report import method_title
from ...assess.store import write_json_atomic, write_text_atomic
from ...assess.suites import Suite, TaskSpec, check_method_options, shared_dir
from ...core.errors import PeftlabError
from ...core.model import get_peft_model
from ...core.registry import get_method
from ...methods.reparameterized.lorahub import lorahub
from ...tasks.glue import Example, get_glue_task, load_glue
from ...train.data import encode_pairs, make_loader
from ...train.glue_job import HEADS, fit_classifier, load_classifier, load_eval_splits
from ...train.loop import train
from .. import run_app
from .combine import (TaskAdapter, TaskHeads, build, close_extra_outputs, joint_rows, mixed_batch_throughput,
                      put_head, score)


@dataclass(frozen=True)
class MultitaskSuite:
    """The multi-task suite's settings; every field can be set in the suite YAML (``suite: multitask``)."""

    name: str = "multitask"
    model: str = ""
    data_dir: str | None = None
    # The quick default: CoLA (the fourth task) stays at MCC 0 at this budget; add it in the YAML.
    tasks: tuple[str, ...] = ("sst2", "mnli", "rte")
    # 500 examples and 300 dev examples per task, 64 target shots: the quick default in about 15 minutes on
    # 2 cores (at 1,000 / 400 / 128 it took 23.4 min without the joint adapter; measured 2026-12-03)
    train_limit: int = 500  # per task
    eval_limit: int | None = 300  # per task
    max_length: int = 128
    batch_size: int = 32
    # 3 epochs: LoRA on 2,000 MNLI pairs for one epoch (63 steps) stayed at the majority class (36.0 %);
    # three epochs reached 52.6 % (measured 2026-12-03).
    epochs: float = 3.0
    seed: int = 0
    lr_scale: float = 4.0
    method_options: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"sequential_adapter": {"targets": ("@ffn_out",)}})  # Pfeiffer et al.'s placement
    merge_method: str = "lora"
    merge_types: tuple[str, ...] = ("linear", "ties", "dare_linear")
    merge_options: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"ties": {"density": 0.5}, "dare_linear": {"density": 0.5, "seed": 0}})
    # each adapter's weight in a merge; a type not listed: 1 / number of tasks (the average)
    merge_weights: dict[str, float] = field(default_factory=lambda: {"ties": 1.0})
    fusion_adapter: str = "sequential_adapter"
    fusion_method: str = "adapter_fusion"
    # AdapterFusion's training epochs per task: it starts from trained adapters and a trained head, and
    # at 3 epochs it cost 109 s (SST-2) and 256 s (MNLI) of the quick default (measured 2026-12-03)
    fusion_epochs: float = 1.0
    prompt_method: str = "prompt_tuning"
    joint_method: str | None = "moelora"  # one adapter for all tasks, routed by task id; None: skip
    mixture_method: str = "attempt"  # mixes the source prompts per input (ATTEMPT)
    target: str = "rte"
    target_shots: int = 64
    target_epochs: float = 5.0
    spot_source: str = "mnli"
    lorahub_steps: int = 40
    mixed_examples: int = 128  # per task
    mixed_repeats: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.tasks, tuple) or len(set(self.tasks)) < 2:
            raise PeftlabError(f"suite {self.name!r}: tasks={list(self.tasks) if isinstance(self.tasks, tuple) else self.tasks!r}: "
                               "a multi-task suite needs at least two different tasks, e.g. [sst2, cola, rte, mnli]")
        for task in self.tasks:
            if get_glue_task(task).is_regression:
                raise PeftlabError(f"suite {self.name!r}: task {task!r} is a regression task; the multi-task suite "
                                   "takes classification tasks")
        for name in ("target", "spot_source"):
            if getattr(self, name) not in self.tasks:
                raise PeftlabError(f"suite {self.name!r}: {name}={getattr(self, name)!r} is not one of the tasks "
                                   f"{list(self.tasks)}; pick one of them")
        if self.target == self.spot_source:
            raise PeftlabError(f"suite {self.name!r}: spot_source={self.spot_source!r} is the target itself; transfer "
                               "comes from another task")
        for name in ("train_limit", "max_length", "batch_size", "target_shots", "lorahub_steps", "mixed_examples",
                     "mixed_repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PeftlabError(f"suite {self.name!r}: {name}={value!r}: expected a positive whole number")
        for name in ("epochs", "target_epochs", "fusion_epochs", "lr_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise PeftlabError(f"suite {self.name!r}: {name}={value!r}: expected a positive number")
        check_method_options(self.method_options, f"suite {self.name!r}")
        for name in ("merge_options", "merge_weights"):
            value = getattr(self, name)
            if not isinstance(value, dict) or set(value) - set(self.merge_types):
                raise PeftlabError(f"suite {self.name!r}: {name}={value!r}: expected a mapping from some of the "
                                   f"merge_types {list(self.merge_types)} to their settings")

    @property
    def width(self) -> int:
        """Every head's number of outputs: the largest class count among the tasks."""
        return max(get_glue_task(t).num_labels for t in self.tasks)

    def study(self) -> Suite:
        """The GLUE suite whose learning rates and method configs the runs use."""
        return Suite(name=self.name, kind="glue", model=self.model, data_dir=self.data_dir,
                     tasks=tuple(TaskSpec(t, self.train_limit, self.eval_limit, self.max_length) for t in self.tasks),
                     methods=(self.merge_method, self.fusion_adapter, self.prompt_method), seeds=(self.seed,),
                     epochs=self.epochs, batch_size=self.batch_size, lr_scale=self.lr_scale,
                     method_options=self.method_options, floor_steps=0, explicit_methods=True)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_suite() -> MultitaskSuite:
    shared = shared_dir()
    return MultitaskSuite(model=str(shared / "models" / "all-MiniLM-L6-v2"), data_dir=str(shared / "data" / "glue"))


class MultitaskRunner:
    def __init__(self, suite: MultitaskSuite, out: Path, echo: Callable[[str], None] = print) -> None:
        self.suite, self.out, self.echo = suite, out, echo
        self.study = suite.study()
        self.jobs = Jobs(self.study, progress=False)
        self.train: dict[str, list[Example]] = {}
        self.dev: dict[str, list[Example]] = {}
        self.results: dict[str, Any] = {"suite": suite.to_dict(), "single": [], "combined": [], "transfer": [],
                                        "mixed": None, "notes": []}

    # -- checks before anything trains ----------------------------------------------------------
    def preflight(self) -> None:
        s = self.suite
        for method in (s.merge_method, s.fusion_adapter, s.prompt_method, s.fusion_method, s.mixture_method):
            get_method(method)  # an unknown name fails here, listing the known ones
        for method in (s.merge_method, s.fusion_adapter, s.prompt_method):
            self.study.method_config(method)  # a bad method_options entry fails here, with its message
        if s.joint_method is not None:
            spec = get_method(s.joint_method)
            if "task_ids" not in spec.forward_kwargs or "num_tasks" not in {f.name for f in dataclasses.fields(spec.config_cls)}:
                raise PeftlabError(f"multitask suite: joint_method {s.joint_method!r} cannot route examples by task "
                                   "(it takes no task_ids and no num_tasks); pick a method that does, e.g. moelora, "
                                   "or set joint_method: null to skip the joint adapter")
            self._joint_config()  # a bad method_options entry fails here
        offered = get_method(s.merge_method).combination_types
        missing = [t for t in s.merge_types if t not in offered]
        if missing:
            raise PeftlabError(f"multitask suite: merge_method {s.merge_method!r} cannot merge adapters by {missing}; "
                               f"it offers {list(offered) or 'no adapter arithmetic'}")
        for task in s.tasks:
            glue = get_glue_task(task)
            self.train[task] = load_glue(glue, s.data_dir, "train", s.train_limit)
            self.dev[task] = next(iter(load_eval_splits(glue, s.data_dir, s.eval_limit).values()))
            if not self.train[task]:
                raise PeftlabError(f"multitask suite: {glue.dir_name} train in {s.data_dir} has no examples")
        if len(self.train[s.target]) < s.target_shots:
            raise PeftlabError(f"multitask suite: target_shots={s.target_shots} but {s.target} has "
                               f"{len(self.train[s.target])} training examples within train_limit {s.train_limit}")

    # -- helpers ---------------------------------------------------------------------------------
    def _config(self, method: str) -> Any:
        return self.study.method_config(method).replace(modules_to_save=HEADS)

    def _args(self, method: str, epochs: float | None = None) -> Any:
        # the study's arguments for ``method`` (learning rate, warm-up, weight decay), at this stage's epochs
        return dataclasses.replace(self.jobs.train_args(method, self.suite.seed), epochs=epochs or self.suite.epochs)

    def _fit(self, task: str, method: str, examples: list[Example], epochs: float | None = None,
             start: TaskAdapter | None = None) -> tuple[TaskAdapter, float, Any]:
        """Train a ``method`` adapter on ``examples``; ``start``: begin from that adapter's tensors
        (not its head). Returns the adapter, its score on ``task``'s dev set and the fitted run."""
        s = self.suite

        def begin(model: Any) -> None:
            if start is not None:
                body = start.body()
                model.load_adapter_state_dict("default", {**{k: v for k, v in model.adapter_state_dict().items()
                                                             if k not in body}, **body},
                                              source=f"the {start.task} adapter")
            close_extra_outputs(model, "default", get_glue_task(task).num_labels)

        fitted = fit_classifier(s.model, s.width, self._config(method), examples, self._args(method, epochs),
                                s.max_length, s.batch_size, prepare=begin)
        value = score(fitted.model, fitted.tokenizer, get_glue_task(task), self.dev[task], s.max_length)
        return TaskAdapter.from_fitted(task, fitted, s.model), value, fitted

    def _train(self, model: Any, tokenizer: Any, examples: list[Example], method: str, epochs: float) -> float:
        started = time.perf_counter()
        torch.manual_seed(self.suite.seed)
        loader = make_loader(encode_pairs(examples, tokenizer, self.suite.max_length), tokenizer,
                             self.suite.batch_size, shuffle=True, seed=self.suite.seed)
        train(model, loader, self._args(method, epochs))
        return time.perf_counter() - started

    def _fuse(self, adapters: dict[str, TaskAdapter], head_of: str, task: str, examples: list[Example],
              epochs: float) -> tuple[float, int, float]:
        """An AdapterFusion over ``adapters`` (its head starting from ``head_of``'s), trained on
        ``examples``; returns its score on ``task``, its trainable entries and seconds."""
        s = self.suite
        model, tokenizer = build(s.model, s.width, adapters, heads=False)
        put_head(model, adapters[head_of].head)  # the fusion's head copy starts from this one
        config = get_method(s.fusion_method).config_cls(
            **{**s.method_options.get(s.fusion_method, {}), "adapters": tuple(adapters), "modules_to_save": HEADS})
        model.add_adapter("fusion", config)
        model.set_adapter("fusion")
        close_extra_outputs(model, "fusion", get_glue_task(task).num_labels)
        seconds = self._train(model, tokenizer, examples, s.fusion_method, epochs)
        trainable = model.trainable_parameters_report().trainable_entries
        return score(model, tokenizer, get_glue_task(task), self.dev[task], s.max_length), trainable, seconds

    def _joint_config(self) -> Any:
        s = self.suite
        return get_method(s.joint_method).config_cls(**{**s.method_options.get(s.joint_method, {}),
                                                        "num_tasks": len(s.tasks)})

    def _joint(self) -> None:
        """One ``joint_method`` adapter trained on every task's examples together, scored on each task."""
        s = self.suite
        started = time.perf_counter()
        torch.manual_seed(s.seed)
        base, tokenizer = load_classifier(s.model, s.width)
        heads = TaskHeads.install(base, [get_glue_task(t).num_labels for t in s.tasks])
        model = get_peft_model(base, self._joint_config())
        heads.follow(model)
        loader = make_loader(joint_rows({t: self.train[t] for t in s.tasks}, tokenizer, s.max_length), tokenizer,
                             s.batch_size, shuffle=True, seed=s.seed)
        train(model, loader, self._args(s.joint_method))
        scores = {task: score(model, tokenizer, get_glue_task(task), self.dev[task], s.max_length, task_id=i)
                  for i, task in enumerate(s.tasks)}
        took = time.perf_counter() - started
        self._log("combined", {"combination": f"{method_title(s.joint_method)} trained on the {len(s.tasks)} tasks at "
                                              "once (batches mixing tasks, each example routed by its task id)",
                               "method": s.joint_method, "kind": "joint", "scores": scores,
                               "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                               "wall_s": took})
        self.echo(f"[combined] {s.joint_method} on all tasks: " + ", ".join(f"{t} {v:.1f}" for t, v in scores.items())
                  + f" ({took:.0f} s)")

    def _log(self, stage: str, row: dict[str, Any]) -> None:
        self.results[stage].append(row)
        self.write()

    # -- the stages --------------------------------------------------------------------------------
    def single(self) -> dict[str, dict[str, TaskAdapter]]:
        """Stage 1: one adapter per task and kind; returns them by kind, then task."""
        s = self.suite
        kept: dict[str, dict[str, TaskAdapter]] = {s.merge_method: {}, s.fusion_adapter: {}, s.prompt_method: {}}
        # Prompts on the source tasks only: the target's own prompt is trained on its shots in stage 3.
        plan = [(m, t) for m in (s.merge_method, s.fusion_adapter) for t in s.tasks]
        plan += [(s.prompt_method, t) for t in s.tasks if t != s.target]
        for i, (method, task) in enumerate(plan, 1):
            started = time.perf_counter()
            adapter, value, fitted = self._fit(task, method, self.train[task])
            kept[method][task] = adapter
            self._log("single", {"method": method, "task": task, "score": value,
                                 "metric": get_glue_task(task).main_metric, "trainable": fitted.trainable,
                                 "trainable_percent": 100.0 * fitted.trainable / fitted.total,
                                 "wall_s": time.perf_counter() - started})
            self.echo(f"[single {i}/{len(plan)}] {method} on {task}: {value:.1f} ({time.perf_counter() - started:.0f} s)")
        return kept

    def combined(self, kept: dict[str, dict[str, TaskAdapter]]) -> None:
        """Stage 2: merges of the task LoRAs, one AdapterFusion per task and the joint adapter, scored
        on every task."""
        s = self.suite
        loras = kept[s.merge_method]
        model, tokenizer = build(s.model, s.width, loras, heads=False)
        n = len(loras)
        for kind in s.merge_types:
            started = time.perf_counter()
            weight = float(s.merge_weights.get(kind, 1.0 / n))
            name = f"merged_{kind}"
            model.add_weighted_adapter(list(loras), [weight] * n, name, combination_type=kind,
                                       **s.merge_options.get(kind, {}))
            model.set_adapter(name)
            scores = {}
            for task in s.tasks:
                put_head(model, loras[task].head)
                scores[task] = score(model, tokenizer, get_glue_task(task), self.dev[task], s.max_length)
            options = "".join(f", {k} {v}" for k, v in s.merge_options.get(kind, {}).items() if k != "seed")
            self._log("combined", {"combination": f"{kind} merge of the {n} task adapters (weights {weight:.3g}{options})",
                                   "method": s.merge_method, "kind": kind, "scores": scores,
                                   "wall_s": time.perf_counter() - started})
            self.echo(f"[combined] {kind} merge: " + ", ".join(f"{t} {v:.1f}" for t, v in scores.items()))
        del model
        adapters = kept[s.fusion_adapter]
        scores, seconds = {}, 0.0
        for task in s.tasks:
            scores[task], trainable, took = self._fuse(adapters, task, task, self.train[task], s.fusion_epochs)
            seconds += took
            self.echo(f"[combined] AdapterFusion trained on {task}: {scores[task]:.1f} ({took:.0f} s)")
        self._log("combined", {"combination": f"AdapterFusion over the {n} task adapters, one trained per task",
                               "method": s.fusion_method, "kind": "fusion", "scores": scores,
                               "trainable": trainable, "wall_s": seconds})
        if s.joint_method is not None:
            self._joint()

    def transfer(self, kept: dict[str, dict[str, TaskAdapter]]) -> None:
        """Stage 3: the low-resource target from the other tasks, against the target alone."""
        s = self.suite
        shots = self.train[s.target][:s.target_shots]
        sources = [t for t in s.tasks if t != s.target]
        target = get_glue_task(s.target)
        alone: dict[str, TaskAdapter] = {}

        def row(what: str, kind: str, value: float, trainable: int, seconds: float, **extra: Any) -> None:
            self._log("transfer", {"what": what, "kind": kind, "score": value, "trainable": trainable,
                                   "wall_s": seconds, **extra})
            self.echo(f"[transfer] {what}: {value:.1f} ({seconds:.0f} s)")

        for method in (s.merge_method, s.fusion_adapter, s.prompt_method):
            started = time.perf_counter()
            alone[method], value, fitted = self._fit(s.target, method, shots, s.target_epochs)
            row(f"{method_title(method)} on the target alone", "alone", value, fitted.trainable, time.perf_counter() - started,
                method=method)
        for method, what in ((s.prompt_method, f"SPoT: {method_title(s.prompt_method)} started from the {s.spot_source} prompt"),
                             (s.merge_method, f"{method_title(s.merge_method)} started from the {s.spot_source} adapter "
                                              "(intermediate-task transfer)")):
            started = time.perf_counter()
            _, value, fitted = self._fit(s.target, method, shots, s.target_epochs, start=kept[method][s.spot_source])
            row(what, "from_source", value, fitted.trainable, time.perf_counter() - started, method=method,
                source=s.spot_source)
        started = time.perf_counter()
        loras = {t: kept[s.merge_method][t] for t in sources}
        model, tokenizer = build(s.model, s.width, loras, heads=False)
        put_head(model, alone[s.merge_method].head)
        batches = [{k: v for k, v in b.items()} for b in make_loader(
            encode_pairs(shots, tokenizer, s.max_length), tokenizer, s.batch_size, shuffle=False)]
        found = lorahub(model, sources, batches, "hub", steps=s.lorahub_steps, seed=s.seed)
        model.set_adapter("hub")
        value = score(model, tokenizer, target, self.dev[s.target], s.max_length)
        row(f"LoRAHub over the {len(sources)} source {method_title(s.merge_method)} adapters ({s.lorahub_steps} CMA-ES steps; "
            "head of the target-alone LoRA)", "lorahub", value, 0, time.perf_counter() - started,
            weights=dict(zip(sources, found.weights)), few_shot_loss=found.loss)
        del model
        fused = {**{t: kept[s.fusion_adapter][t] for t in sources}, s.target: alone[s.fusion_adapter]}
        value, trainable, seconds = self._fuse(fused, s.target, s.target, shots, s.target_epochs)
        row("AdapterFusion over the source adapters and the target's own, trained on the shots", "fusion", value,
            trainable, seconds)
        started = time.perf_counter()
        model, tokenizer = build(s.model, s.width, {t: kept[s.prompt_method][t] for t in sources}, heads=False)
        config = get_method(s.mixture_method).config_cls(**{
            **s.method_options.get(s.prompt_method, {}), **s.method_options.get(s.mixture_method, {}),
            "sources": tuple(sources), "modules_to_save": HEADS})
        model.add_adapter("mixture", config)
        model.set_adapter("mixture")
        close_extra_outputs(model, "mixture", target.num_labels)
        self._train(model, tokenizer, shots, s.mixture_method, s.target_epochs)
        value = score(model, tokenizer, target, self.dev[s.target], s.max_length)
        row(f"{method_title(s.mixture_method)} over the {len(sources)} source prompts (a new target prompt and attention, "
            "trained on the shots)", "mixture", value, model.trainable_parameters_report().trainable_entries,
            time.perf_counter() - started)

    def mixed(self, kept: dict[str, dict[str, TaskAdapter]]) -> None:
        """Stage 4: mixed-task batches against one task per batch."""
        s = self.suite
        model, tokenizer = build(s.model, s.width, kept[s.merge_method], heads=True)
        examples = {t: self.dev[t][:s.mixed_examples] for t in s.tasks}
        found = mixed_batch_throughput(model, tokenizer, examples, s.max_length, s.batch_size, s.seed, s.mixed_repeats)
        self.results["mixed"] = found
        self.echo(f"[mixed] {found['mixed_examples_per_s']:.0f} examples/s mixed, "
                  f"{found['per_task_examples_per_s']:.0f} one task per batch")
        self.write()

    def stages(self, _: None) -> None:
        kept = self.single()
        self.combined(kept)
        self.transfer(kept)
        self.mixed(kept)

    def write(self) -> None:
        from .report import markdown

        write_json_atomic(self.out / "results.json", self.results)
        write_text_atomic(self.out / "report.md", markdown(self.results))


def run_multitask(suite: MultitaskSuite, out: str | Path, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage into folder ``out`` (results.json, report.md, plots); returns the results."""
    from .report import write_plots

    return run_app("multitask", MultitaskRunner(suite, Path(out), echo), write_plots)
