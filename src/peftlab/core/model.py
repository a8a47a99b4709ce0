"""PeftModel: a model with named adapters.

It forwards calls to the wrapped model (so it drops into a plain loop or the HF ``Trainer``),
keeps one config per adapter, and does the method-agnostic work: activate, disable, delete,
merge, save and load. Everything method-specific sits in the methods' delta modules.
"""
from __future__ import annotations

import contextlib
import json
import functools
import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator

import torch
from torch import nn

from . import quant
from .config import PeftConfig, config_from_dict
from .errors import CheckpointError, PeftlabError
from .hooks import TrainingState, run_hook
from .inject import delta_modules, remove_empty_wrappers, unwrap_all, wrap
from .layer import DeltaModule, TrainableCopy
from .registry import spec_for_config
from .state import CONFIG_NAME, WEIGHTS_NAME, check_state, read_config_dict, read_metadata, read_tensors, save_adapter
from .targets import logical_name, resolve_modules_to_save

_BASE = "base_model."


@dataclass(frozen=True)
class ParameterReport:
    """Trainable parameters as the review reports them: count and share of the whole model."""

    trainable: int
    total: int
    base: int
    # Scalars that can change in training: below ``trainable`` for methods that train a masked
    # subset of a dense tensor (the review counts those entries, not the tensor).
    trainable_entries: int | None = None
    # Entries of the dense tensors a masked method chooses its trainable entries from (0 if none).
    dense_entries: int = 0

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        text = (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {self.percent:.4f}")
        if self.trainable_entries is not None and self.trainable_entries != self.trainable:
            text += (f" || trainable entries: {self.trainable_entries:,} "
                     f"({100.0 * self.trainable_entries / max(self.total, 1):.4f}%)")
        if self.dense_entries:
            text += f" || chosen from {self.dense_entries:,} dense entries"
        return text


class _carries_base_signature:
    """Descriptor for ``PeftModel.forward``: bound to a model, it carries the wrapped model's
    signature, so tools that inspect it (the HF ``Trainer``'s column filter) see the real inputs."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    def __get__(self, obj: Any, owner: type) -> Any:
        if obj is None:  # the class: the HF Trainer reads label names here, before any instance
            return _with_label_names(self.fn, owner.label_names)
        if torch.compiler.is_compiling():  # tracing calls it, never inspects it: a plain method
            return self.fn.__get__(obj, owner)
        call = functools.partial(self.fn, obj)
        call.__signature__ = obj._forward_signature()  # type: ignore[attr-defined]
        return call


@functools.lru_cache(maxsize=None)
def _with_label_names(fn: Any, label_names: tuple[str, ...]) -> Any:
    """``fn`` whose signature names the task's label arguments, as the HF ``Trainer`` looks for
    them (``find_labels`` inspects the class's forward for parameters named like labels)."""

    @functools.wraps(fn)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(self, *args, **kwargs)

    kind = inspect.Parameter
    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [kind("self", kind.POSITIONAL_OR_KEYWORD), kind("args", kind.VAR_POSITIONAL)]
        + [kind(name, kind.KEYWORD_ONLY, default=None) for name in label_names]
        + [kind("kwargs", kind.VAR_KEYWORD)])
    return forward


def _around(hook: Any, host: Any, name: str, inner: Any, extra: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    return hook(host, name, inner, args, kwargs, extra)


def _submodules(model: nn.Module) -> dict[tuple[str, str], nn.Module]:
    """Every (parent path, attribute) -> child module of ``model``: references only, no copies."""
    return {(path, name): child for path, module in model.named_modules() for name, child in module.named_children()}


def _put_back(model: nn.Module, layers: dict[tuple[str, str], nn.Module]) -> None:
    """Undo module replacements made since ``layers = _submodules(model)`` (after adapter wrappers are
    removed): a method that quantizes base layers in place replaces them, and a failed load must
    leave the model as it was given."""
    for (path, name), child in layers.items():
        try:
            parent = model.get_submodule(path) if path else model
        except AttributeError:
            continue
        if getattr(parent, name, None) is not child:
            setattr(parent, name, child)


class PeftModel(nn.Module):
    """A base model plus one or more named adapters, one of them active.

    ``PeftModel(model, config)`` returns the subclass for the model's task (as HF peft's
    ``PeftModelForSequenceClassification`` and friends), which names the task's label arguments.
    """

    # Each subclass names its peft task_type and the label arguments the Trainer looks for.
    task_type: ClassVar[str | None] = None
    label_names: ClassVar[tuple[str, ...]] = ()
    task_classes: ClassVar[dict[str, type["PeftModel"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.task_type:
            PeftModel.task_classes[cls.task_type] = cls

    def __new__(cls, model: nn.Module | None = None, *args: Any, **kwargs: Any) -> "PeftModel":
        if cls is PeftModel and model is not None:
            cls = PeftModel.task_classes.get(_task_type(model), PeftModel)
        return super().__new__(cls)

    def __init__(self, model: nn.Module, config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.base_model = model
        # Model-level delta modules (soft prompts) that do not sit inside a layer of the model.
        self.model_adapters = nn.ModuleDict()
        self.peft_configs: dict[str, PeftConfig] = {}
        self._active: list[str] = []           # applied, in this order, where they share a module
        self._trainable: list[str] | None = None  # a subset of _active that trains; None: all of them
        self.inference_adapters: set[str] = set()  # loaded with is_trainable=False: never train
        self.training_state = TrainingState()
        # Hooks of the trainable adapters, gathered when the trainable set changes (not per forward).
        self._loss_hooks: list[tuple[str, str, Any]] = []
        self._needs_begin = False
        flags = [(p, p.requires_grad) for p in model.parameters()]
        for param in model.parameters():
            param.requires_grad_(False)
        try:
            self.add_adapter(adapter_name, config)  # cleans up its own wrappers if it fails
        except BaseException:
            for param, flag in flags:  # and the caller's model keeps its trainable flags
                param.requires_grad_(flag)
            raise
        self.set_adapter(adapter_name)

    # -- forwarding ----------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def _input_adapters(self) -> list[DeltaModule]:
        # Model-level modules that rewrite the inputs (soft prompts); others only hold shared state.
        return [m for m in self.model_adapters.values() if m.live_adapters() and hasattr(m, "transform_inputs")]

    def _forward_signature(self) -> inspect.Signature:
        """The base model's forward signature plus the keywords the adapters' methods read
        (``spec.forward_kwargs``), so the HF Trainer keeps a ``task_ids`` column."""
        declared = tuple(sorted({k for c in self.peft_configs.values() for k in spec_for_config(c).forward_kwargs}))
        cached = self.__dict__.get("_signature")
        if cached is None or cached[0] is not self.base_model or cached[1] != declared:
            signature = inspect.signature(self.base_model.forward)
            params = list(signature.parameters.values())
            known = {p.name for p in params}
            var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
            added = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None) for k in declared if k not in known]
            signature = signature.replace(parameters=[p for p in params if p not in var_kw] + added + var_kw)
            cached = (self.base_model, declared, signature)
            self.__dict__["_signature"] = cached
        return cached[2]

    @_carries_base_signature
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward. ``adapter_names=[...]`` (one name per example, ``"__base__"``
        for none) runs each example with its own adapter in this one call (see :meth:`mixed_batch`)."""
        extra = self._method_kwargs(kwargs)
        with self.mixed_batch(kwargs.pop("adapter_names", None)):
            for module in self._input_adapters():
                args, kwargs = module.transform_inputs(self.base_model, args, kwargs)
            out = self._wrapped_forward(extra)(*args, **kwargs)
        # The base model's mode: a new PeftModel is in train mode whatever mode its base is in.
        if self.base_model.training and torch.is_grad_enabled() and (self._loss_hooks or self._needs_begin):
            out = self._with_loss_terms(out)
        return out

    def _live_specs(self) -> list[tuple[str, Any]]:
        """(adapter, spec) of the live adapters (active, not merged, not disabled), in active order."""
        modules = [m for _, m in self._delta_modules()]
        return [(name, spec_for_config(self.peft_configs[name])) for name in self._active
                if any(name in m.live_adapters() for m in modules)]

    def _around_forward(self) -> list[tuple[str, Any]]:
        """(adapter, spec) of the live adapters whose methods run the forward themselves."""
        if not any(spec_for_config(config).around_forward for config in self.peft_configs.values()):
            return []  # the common case: no walk over the delta modules on every call
        return [(name, spec) for name, spec in self._live_specs() if spec.around_forward is not None]

    def _method_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Take the keyword arguments that methods read (``spec.forward_kwargs``) out of ``kwargs``."""
        declared = {key for n in self.peft_configs for key in spec_for_config(self.peft_configs[n]).forward_kwargs}
        extra = {key: kwargs.pop(key) for key in list(kwargs) if key in declared}
        if extra:
            readers = {key for _, spec in self._around_forward() for key in spec.forward_kwargs}
            unread = sorted(set(extra) - readers)
            if unread:
                raise PeftlabError(f"model(...) got {', '.join(k + '=' for k in unread)} but no active, unmerged, "
                                   f"enabled adapter reads it (active: {self._active}); activate the adapter that "
                                   "does (set_adapter) or leave the argument out")
        return extra

    def _wrapped_forward(self, extra: dict[str, Any]) -> Any:
        call = self.base_model
        for name, spec in reversed(self._around_forward()):
            call = functools.partial(_around, spec.around_forward, self, name, call, extra)
        return call

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names: list[str] | None) -> Iterator[None]:
        """Within the block, example ``i`` of a batch uses adapter ``adapter_names[i]``.

        Only adapters of methods whose spec declares ``supports_mixed_batch`` may be named; their
        delta modules read ``DeltaModule.mixed_batch``. Every delta module sees just the named
        adapters as active, so nothing else applies to any example. ``None`` changes nothing.
        """
        if adapter_names is None:
            yield
            return
        names = list(adapter_names)
        wanted = list(dict.fromkeys(n for n in names if n != "__base__"))
        for name in wanted:
            self._check_known(name)
            spec = spec_for_config(self.peft_configs[name])
            if not spec.supports_mixed_batch:
                raise PeftlabError(f"adapter {name!r} is {spec.name}, which does not support mixed batches "
                                   "(its spec has supports_mixed_batch=False); run its examples in a separate call")
        modules = self._unmerged_modules("adapter_names=")
        previous = [m.active_adapters for m in modules]
        for module in modules:
            module.set_active(wanted)
            module.mixed_batch = names
        try:
            yield
        finally:
            for module, active in zip(modules, previous):
                module.active_adapters = active
                module.mixed_batch = None

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's ``generate`` with every live input-level adapter (soft prompts, prefixes):
        each rewrites the call and hands it to the next, the last to the base model. With a live adapter
        whose method keeps no KV cache (``spec.needs_full_sequence``) it decodes without the cache."""
        if any(spec.needs_full_sequence for _, spec in self._live_specs()):
            kwargs.setdefault("use_cache", False)
        modules = self._input_adapters()

        def through(i: int) -> Any:
            if i == len(modules):
                return self.base_model.generate
            return lambda *a, **k: modules[i].generate(self.base_model, a, k, through(i + 1))

        return through(0)(*args, **kwargs)

    # -- adapters ------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        """Add an adapter (inactive unless it is the first); a name in use is refused."""
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise PeftlabError(f"adapter name {adapter_name!r}: expected a non-empty string without '.'")
        if hasattr(nn.ModuleDict, adapter_name) or hasattr(nn.ParameterDict, adapter_name):
            raise PeftlabError(f"adapter name {adapter_name!r} is a name torch's module containers use for "
                               "themselves (keys, copy, update, ...); pick another")
        if adapter_name in self.peft_configs:
            raise PeftlabError(f"an adapter named {adapter_name!r} already exists (adapters: "
                               f"{sorted(self.peft_configs)}); pick another name or delete_adapter() first")
        if not isinstance(config, PeftConfig):
            raise PeftlabError(f"config must be a peftlab config such as LoraConfig(...), got {type(config).__name__}")
        missing = [n for n in config.required_adapters() if n not in self.peft_configs]
        if missing:
            raise PeftlabError(f"adapter {adapter_name!r} builds on adapters {missing}, which this model does not "
                               f"have (it has {sorted(self.peft_configs)}); add or load them first, under those names")
        spec = spec_for_config(config)
        try:
            spec.attach(self.base_model, adapter_name, config, self)
            for path in resolve_modules_to_save(self.base_model, config.modules_to_save):
                wrap(self.base_model, path, TrainableCopy).add(adapter_name, config)
        except BaseException:
            self._remove_everywhere(adapter_name)  # leave the model as it was
            raise
        self.peft_configs[adapter_name] = config
        if config.inference_mode:
            self.inference_adapters.add(adapter_name)
        self.set_adapter(self._active or adapter_name, self._trainable)

    def set_adapter(self, adapter_name: str | list[str], trainable: str | list[str] | None = None) -> None:
        """Make ``adapter_name`` the active adapter, or several at once (a list): all of them apply —
        one after the other where two sit in the same module (a stack), in the order given.
        ``trainable`` names the active adapters that train (default: all); the others stay frozen."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if not names or len(set(names)) != len(names):
            raise PeftlabError(f"set_adapter({adapter_name!r}): expected an adapter name or a list of distinct names")
        for name in names:
            self._check_known(name)
        chosen = None if trainable is None else ([trainable] if isinstance(trainable, str) else list(trainable))
        if chosen is not None and not set(chosen) <= set(names):
            raise PeftlabError(f"trainable={chosen!r} names adapters that are not active ({names}); "
                               "an adapter trains only while it is active")
        self._active, self._trainable = names, chosen
        for _, module in self._delta_modules():
            module.set_active(names)
        self._set_trainable()

    @property
    def active_adapter(self) -> str | None:
        """The active adapter (the first one when several are active)."""
        return self._active[0] if self._active else None

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes as the base model."""
        modules = self._unmerged_modules("disabling")
        previous = [m.disabled for m in modules]
        for module in modules:
            module.disabled = True
        try:
            yield
        finally:
            for module, was in zip(modules, previous):
                module.disabled = was

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        users = [n for n, c in self.peft_configs.items() if adapter_name in c.required_adapters()]
        if users:
            raise PeftlabError(f"adapter {adapter_name!r} is used by {users}; delete those first")
        self._remove_everywhere(adapter_name)
        del self.peft_configs[adapter_name]
        self.inference_adapters.discard(adapter_name)
        active = [n for n in self._active if n != adapter_name] or list(self.peft_configs)[:1]
        trainable = None if self._trainable is None else [n for n in self._trainable if n != adapter_name]
        self._active, self._trainable = [], None
        if active:
            self.set_adapter(active, trainable if trainable is None or set(trainable) <= set(active) else None)

    def _remove_everywhere(self, adapter_name: str) -> None:
        for _, module in list(self._delta_modules()):
            module.delete_adapter(adapter_name)
        remove_empty_wrappers(self.base_model)
        for key in [k for k, m in self.model_adapters.items() if not m.adapter_names()]:
            self.model_adapters[key].release(self.base_model)
            del self.model_adapters[key]

    # -- arithmetic ----------------------------------------------------------------------
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str | None = None, **options: Any) -> None:
        """Add ``adapter_name``: a weighted combination of trained adapters of one method (HF peft's
        call). ``combination_type`` is one the method's spec lists in ``combination_types`` (default:
        the first it lists; LoRA's is "svd", as peft's)."""
        adapters, weights = list(adapters), [float(w) for w in weights]
        for name in adapters:
            self._check_known(name)
        if not adapters or len(adapters) != len(weights):
            raise PeftlabError(f"add_weighted_adapter: {len(adapters)} adapters and {len(weights)} weights; "
                               "give one weight per adapter, at least one adapter")
        specs = {spec_for_config(self.peft_configs[n]).name: spec_for_config(self.peft_configs[n]) for n in adapters}
        if len(specs) > 1:
            raise PeftlabError(f"add_weighted_adapter combines adapters of one method; got "
                               f"{ {n: spec_for_config(self.peft_configs[n]).name for n in adapters} }")
        spec = next(iter(specs.values()))
        combination_type = combination_type or next(iter(spec.combination_types), None)
        if spec.combine is None or combination_type not in spec.combination_types:
            offered = list(spec.combination_types) or "none"
            raise PeftlabError(f"{spec.name} adapters cannot be combined by {combination_type!r}; "
                               f"{spec.name} offers: {offered}")
        if adapter_name in self.peft_configs:
            raise PeftlabError(f"an adapter named {adapter_name!r} already exists; pick another name")
        try:
            spec.combine(self, adapters, weights, adapter_name, combination_type, **options)
        except BaseException:
            if adapter_name in self.peft_configs:  # leave the model as it was
                self.delete_adapter(adapter_name)
            raise

    # -- merging -------------------------------------------------------------------------
    def merge_adapter(self, adapter_name: str | None = None) -> None:
        """Fold ``adapter_name`` (default: every active adapter) into the base weights."""
        names = [adapter_name] if adapter_name is not None else self.active_adapters
        for name in names:
            self._check_known(name)
            spec = spec_for_config(self.peft_configs[name])
            if not spec.mergeable:
                raise PeftlabError(f"method {spec.name!r} (adapter {name!r}) cannot be merged into the base weights "
                                   "(it adds computation the base model does not have); keep it unmerged")
        for name in names:
            for _, module in self._delta_modules():
                if name in module.adapter_names() and name not in module.merged_adapters:
                    module.merge(name)

    def unmerge_adapter(self, adapter_name: str | None = None) -> None:
        """Take ``adapter_name`` (default: every merged adapter) back out of the base weights."""
        for _, module in self._delta_modules():
            for name in reversed(list(module.merged_adapters)):
                if adapter_name is None or name == adapter_name:
                    module.unmerge(name)

    def merge_and_unload(self) -> nn.Module:
        """Fold the active adapter(s) into the base weights and return the plain base model."""
        self.merge_adapter()
        unwrap_all(self.base_model)
        for key in list(self.model_adapters):
            self.model_adapters[key].release(self.base_model)
            del self.model_adapters[key]
        self.peft_configs.clear()
        return self.base_model

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the base model."""
        for name in list(self.peft_configs):
            self.delete_adapter(name)
        return self.base_model

    # -- HF peft's names for the same things ------------------------------------------------
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        """Adapter name -> config (HF peft's name for ``peft_configs``)."""
        return self.peft_configs

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as HF peft returns them."""
        report = self.trainable_parameters_report()
        return report.trainable, report.total

    def disable_adapter_layers(self) -> None:
        """Compute as the base model until :meth:`enable_adapter_layers` (``disable_adapter()`` is the
        block form)."""
        for module in self._unmerged_modules("disabling"):
            module.disabled = True

    def enable_adapter_layers(self) -> None:
        for _, module in self._delta_modules():
            module.disabled = False

    def get_layer_status(self) -> list[dict[str, Any]]:
        """One row per module that holds adapters: its name, type, which adapters it holds, which are
        active and merged, and whether it is enabled (HF peft's ``get_layer_status``, as dicts)."""
        return [{"name": logical_name(path[len(_BASE):]) if path.startswith(_BASE) else path,
                 "module_type": type(module).__name__, "enabled": not module.disabled,
                 "active_adapters": list(module.active_adapters), "merged_adapters": list(module.merged_adapters),
                 "available_adapters": module.adapter_names(),
                 "requires_grad": {n: any(p.requires_grad for p in module.adapter_parameters(n))
                                   for n in module.adapter_names()}}
                for path, module in self._delta_modules()]

    def get_model_status(self) -> dict[str, Any]:
        """The whole model's adapter state in one dict (HF peft's ``get_model_status``)."""
        layers = self.get_layer_status()
        trainable, total = self.get_nb_trainable_parameters()
        return {"base_model_type": type(self.base_model).__name__, "adapter_model_type": type(self).__name__,
                "peft_types": {n: type(c).method for n, c in self.peft_configs.items()},
                "trainable_params": trainable, "total_params": total, "num_adapter_layers": len(layers),
                "enabled": all(row["enabled"] for row in layers) if layers else True,
                "active_adapters": self.active_adapters, "trainable_adapters": self.trainable_adapters(),
                "merged_adapters": sorted({n for row in layers for n in row["merged_adapters"]}),
                "available_adapters": sorted(self.peft_configs)}

    # -- training hooks (see core/hooks.py) -----------------------------------------------
    def trainable_adapters(self) -> list[str]:
        """The adapters whose tensors train now."""
        chosen = self._active if self._trainable is None else self._trainable
        return [n for n in chosen if n not in self.inference_adapters]

    def _hooks(self, field: str) -> list[tuple[str, str, Any]]:
        """(method, adapter, hook) for each trainable adapter whose method declares ``field``."""
        found = []
        for name in self.trainable_adapters():
            spec = spec_for_config(self.peft_configs[name])
            if getattr(spec.hooks, field) is not None:
                found.append((spec.name, name, getattr(spec.hooks, field)))
        return found

    def begin_training(self, data: Iterable[Any] | None = None, total_steps: int | None = None,
                       learning_rate: float | None = None) -> None:
        """Start a training run: reset the step count and run the methods' data passes on ``data``
        (an iterable of the training batches; a method that needs it says so when it is missing).
        ``learning_rate``: the run's peak rate, for methods whose data pass trains. Call once
        before the first step."""
        self.training_state = TrainingState(total_steps=total_steps, started=True, learning_rate=learning_rate)
        modes = [(m, m.training) for m in self.modules()]  # data passes switch to train mode
        for method, name, hook in self._hooks("before_training"):
            run_hook(method, "before_training", self.training_state, hook, self, name, data)
        for module, mode in modes:
            module.training = mode

    def end_training(self, data: Iterable[Any] | None = None) -> None:
        """Finish a training run: run the methods' post-hoc passes (``after_training``: a Laplace fit)
        on ``data``, the training batches. Call once after the last step; a no-op for other methods."""
        modes = [(m, m.training) for m in self.modules()]
        try:
            for method, name, hook in self._hooks("after_training"):
                run_hook(method, "after_training", self.training_state, hook, self, name, data)
        finally:
            for module, mode in modes:
                module.training = mode

    def before_optimizer_step(self) -> None:
        """Run after backward, before ``optimizer.step()`` (gradient masks, rank allocation)."""
        self._require_begun("before_optimizer_step")
        for method, name, hook in self._hooks("before_step"):
            run_hook(method, "before_step", self.training_state, hook, self, name, self.training_state)

    def after_optimizer_step(self) -> None:
        """Run after ``optimizer.step()``; counts the step."""
        self._require_begun("after_optimizer_step")
        for method, name, hook in self._hooks("after_step"):
            run_hook(method, "after_step", self.training_state, hook, self, name, self.training_state)
        self.training_state.step += 1

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The one call a plain training loop makes per step, in place of ``optimizer.step()``."""
        self.before_optimizer_step()
        optimizer.step()
        self.after_optimizer_step()

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer parameter groups for every trainable tensor: the methods' own groups, and
        one group at ``lr`` / ``weight_decay`` for the rest."""
        groups: list[dict[str, Any]] = []
        for method, name, hook in self._hooks("param_groups"):
            groups += run_hook(method, "param_groups", self.training_state, hook, self, name, lr, weight_decay)
        covered = {id(p) for group in groups for p in group["params"]}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in covered]
        if rest:
            groups.insert(0, {"params": rest, "lr": lr, "weight_decay": weight_decay})
        return groups

    def extra_loss(self) -> torch.Tensor | None:
        """The sum of the trainable adapters' loss terms (``None`` if they declare none). Added to a
        model output's ``loss`` automatically; a loop that computes its own loss adds this."""
        terms = [run_hook(method, "loss", self.training_state, hook, self, name) for method, name, hook in self._loss_hooks]
        terms = [t for t in terms if t is not None]
        return torch.stack([t.reshape(()) for t in terms]).sum() if terms else None

    def _with_loss_terms(self, out: Any) -> Any:
        if self._needs_begin and not self.training_state.started:
            method = next(spec_for_config(self.peft_configs[n]).name for n in self.trainable_adapters())
            raise PeftlabError(
                f"{method} acts during training (data pass or step hooks), but training has not begun: call "
                "model.begin_training(loader, total_steps) and model.optimizer_step(optimizer) in a plain loop, "
                "add peftlab.train.hf.PeftlabCallback() to an HF Trainer, or use peftlab's train loop")
        if not self._loss_hooks:
            return out
        if getattr(out, "loss", None) is None:
            # The caller computes its own loss (no labels given): it must add the term itself.
            if not self.__dict__.get("_warned_loss") and not torch.compiler.is_compiling():
                self.__dict__["_warned_loss"] = True
                warnings.warn("the active adapter adds a loss term, but the model output has no loss (no labels "
                              "given): add model.extra_loss() to the loss you compute", stacklevel=3)
            return out
        extra = self.extra_loss()
        if extra is not None:
            out["loss"] = out.loss + extra
        return out

    def _require_begun(self, call: str) -> None:
        if not self.training_state.started:
            raise PeftlabError(f"{call}() before begin_training(): call model.begin_training(loader, total_steps) "
                               "once before the first step")

    # -- parameters ----------------------------------------------------------------------
    def _delta_modules(self) -> Iterator[tuple[str, DeltaModule]]:
        return delta_modules(self)

    def _unmerged_modules(self, before: str) -> list[DeltaModule]:
        """Every delta module; refused while an adapter is merged (its delta is in the base weights)."""
        modules = [m for _, m in self._delta_modules()]
        if any(m.merged_adapters for m in modules):
            raise PeftlabError(f"an adapter is merged into the base weights; unmerge_adapter() before {before}")
        return modules

    def _check_known(self, adapter_name: str | None) -> None:
        if adapter_name not in self.peft_configs:
            raise PeftlabError(f"no adapter named {adapter_name!r}; adapters: {sorted(self.peft_configs)}")

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for _, module in self._delta_modules():
            for param in module.adapter_parameters(adapter_name):
                seen[id(param)] = param
        return list(seen.values())

    def _set_trainable(self) -> None:
        for name in self.peft_configs:
            for param in self.adapter_parameters(name):
                param.requires_grad_(False)
        for name in self.trainable_adapters():
            for param in self.adapter_parameters(name):
                param.requires_grad_(True)
        self.check_parameter_partition()
        self._loss_hooks = self._hooks("loss")
        self._needs_begin = any(spec_for_config(self.peft_configs[n]).hooks.has_step_hooks
                                for n in self.trainable_adapters())

    def check_parameter_partition(self) -> None:
        """Every parameter is either trainable state of a trainable adapter or frozen; nothing else."""
        wanted = {id(p) for n in self.trainable_adapters() for p in self.adapter_parameters(n)}
        wrong = [n for n, p in self.named_parameters() if p.requires_grad != (id(p) in wanted)]
        if wrong:
            raise PeftlabError(f"parameters outside the active adapter are trainable, or adapter parameters "
                               f"are frozen: {wrong[:5]}. Something set requires_grad by hand; "
                               "call set_adapter() to restore the partition.")

    def trainable_parameters_report(self) -> ParameterReport:
        adapters = {id(p) for n in self.peft_configs for p in self.adapter_parameters(n)}
        params = {id(p): p for p in self.parameters()}
        trainable = sum(p.numel() for p in params.values() if p.requires_grad)
        held = [(n, m) for n in self.trainable_adapters() for _, m in self._delta_modules() if n in m.adapter_names()]
        masked = sum(sum(p.numel() for p in m.adapter_parameters(n)) - m.trainable_entries(n) for n, m in held)
        # A quantized base counts the weights it stands for, not its packed bytes or buffers.
        quantized = quant.buffered_weights(self)
        return ParameterReport(
            trainable=trainable,
            total=sum(quant.weight_numel(p) for p in params.values()) + quantized,
            base=sum(quant.weight_numel(p) for i, p in params.items() if i not in adapters) + quantized,
            trainable_entries=trainable - masked,
            dense_entries=sum(m.dense_entries(n) for n, m in held),
        )

    def print_trainable_parameters(self) -> None:
        print(self.trainable_parameters_report())

    # -- state ---------------------------------------------------------------------------
    def _state_entries(self, adapter_name: str) -> dict[str, tuple[DeltaModule, str, torch.Tensor]]:
        """Checkpoint key -> (module, key inside the module, tensor) for one adapter."""
        prefix = self.peft_configs[adapter_name].checkpoint_model_prefix
        entries: dict[str, tuple[DeltaModule, str, torch.Tensor]] = {}
        for path, module in self._delta_modules():
            for local, tensor in module.adapter_state(adapter_name).items():
                if path.startswith(_BASE):
                    # The model's own module name, whatever wraps it (another adapter's wrapper
                    # makes the path '...value.base_layer'), so the key loads into any stacking.
                    key = f"{prefix}{logical_name(path[len(_BASE):])}.{local}"
                else:  # model-level modules name their tensors at the top level, as peft does
                    key = local
                if key in entries:
                    raise PeftlabError(f"adapter {adapter_name!r}: two of its modules write checkpoint key {key!r}")
                entries[key] = (module, local, tensor)
        return entries

    def _adapter_paths(self, adapter_name: str) -> list[str]:
        paths = [logical_name(path[len(_BASE):]) for path, m in self._delta_modules()
                 if path.startswith(_BASE) and not isinstance(m, TrainableCopy) and adapter_name in m.adapter_names()]
        return list(dict.fromkeys(paths))

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Only the adapter's tensors, under the keys written to ``adapter_model.safetensors``."""
        name = adapter_name or self.active_adapter
        self._check_known(name)
        return {k: t for k, (_, _, t) in self._state_entries(name).items()}

    def load_adapter_state_dict(self, adapter_name: str, tensors: dict[str, torch.Tensor], source: str = "state dict") -> None:
        entries = self._state_entries(adapter_name)
        variable = {k for k, (module, local, _) in entries.items() if local in module.variable_length_keys(adapter_name)}
        check_state({k: t for k, (_, _, t) in entries.items()}, tensors, source, variable)
        per_module: dict[int, tuple[DeltaModule, dict[str, torch.Tensor], str]] = {}
        for key, (module, local, _) in entries.items():
            per_module.setdefault(id(module), (module, {}, key[: len(key) - len(local)]))[1][local] = tensors[key]
        for module, local_tensors, prefix in per_module.values():
            try:
                module.load_adapter_state(adapter_name, local_tensors)
            except CheckpointError as err:  # the module knows its own keys only: add where they sit
                raise CheckpointError(f"{source}: {prefix}{err}") from None
        self._set_trainable()

    def save_pretrained(self, path: str | Path, adapter_names: list[str] | None = None) -> None:
        """Save each adapter as ``adapter_config.json`` + ``adapter_model.safetensors``.

        The default adapter goes to ``path``, any other to ``path/<name>`` (peft's layout).
        """
        for name in adapter_names or list(self.peft_configs):
            self._check_known(name)
            folder = Path(path) if name == "default" else Path(path) / name
            # Methods HF peft also has are written in peft's own form (read back via from_peft),
            # so either library loads the folder without unknown-key warnings.
            own = self.peft_configs[name]
            refusal = own.peft_fields() and own.peft_form_refusal(self.base_model)
            if refusal:
                warnings.warn(f"adapter {name!r} is saved in peftlab's form only, which HF peft cannot load: {refusal}",
                              stacklevel=2)
            config = own.peftlab_form() if refusal else own.peft_fields() or own.to_dict()
            config["base_model_name_or_path"] = getattr(getattr(self.base_model, "config", None), "_name_or_path", None)
            config["task_type"] = self.peft_configs[name].task_type or config.get("task_type") or _task_type(self.base_model)
            if ("peft_type" in config and config["task_type"] in _HEAD_TASKS and not self._saves_a_head(name)
                    and not self._rewrites_inputs(name)):
                # peft's class for these tasks expects the head in the file; without one, peft's
                # generic PeftModel loads the adapter and the head stays the base model's, as here.
                # (peft's soft prompts need their task class: there the head must be saved.)
                config["task_type"] = None
            if "target_modules" in config:  # peft cannot read '@' sites: write the resolved names
                config["target_modules"] = self._adapter_paths(name)
            if not refusal:
                config.update(own.peft_fields_for(self.base_model, name))
            save_adapter(folder, config, self.adapter_state_dict(name),
                         {SHAPE_KEY: json.dumps(_model_shape(self.base_model))})

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload the adapters (what ``save_pretrained`` writes), not the base model, to the Hub repo
        ``repo_id``; options as :func:`peftlab.core.hub.push_to_hub`."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def _rewrites_inputs(self, name: str) -> bool:
        return any(name in m.adapter_names() and hasattr(m, "transform_inputs") for m in self.model_adapters.values())

    def _saves_a_head(self, name: str) -> bool:
        return any(isinstance(m, TrainableCopy) and name in m.adapter_names() for _, m in self._delta_modules())

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | Path, adapter_name: str = "default",
                        is_trainable: bool = False) -> "PeftModel":
        """Load an adapter saved by peftlab or HF peft onto ``model``; strict about every key.

        ``is_trainable=False`` (peft's default) loads it for inference: it never trains, while
        adapters added later train as usual. A failed load leaves ``model`` exactly as it was given.
        """
        if not isinstance(model, nn.Module):
            raise PeftlabError(f"PeftModel.from_pretrained(model, path): model must be the base nn.Module (e.g. "
                               f"AutoModelForSequenceClassification.from_pretrained(...)), got {type(model).__name__} "
                               f"{model!r:.80}; the adapter folder is the second argument")
        config = _read_config(path)
        flags = [(p, p.requires_grad) for p in model.parameters()]
        layers = _submodules(model)
        peft_model = None
        try:
            peft_model = cls(model, config, adapter_name)
            peft_model._load_into(adapter_name, path, is_trainable)
        except BaseException:
            if peft_model is not None:
                peft_model.unload()
            _put_back(model, layers)  # layers a method replaced (a quantized base)
            for param, flag in flags:
                param.requires_grad_(flag)
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, path: str | Path, adapter_name: str, is_trainable: bool = False) -> None:
        """Add a saved adapter under ``adapter_name`` (inactive until set_adapter); with
        ``is_trainable=False`` (peft's default) it never trains."""
        config = _read_config(path)
        layers = _submodules(self.base_model)
        self.add_adapter(adapter_name, config)
        try:
            self._load_into(adapter_name, path, is_trainable)
        except BaseException:
            self.delete_adapter(adapter_name)
            _put_back(self.base_model, layers)  # layers a method replaced (a quantized base)
            raise

    def _load_into(self, adapter_name: str, path: str | Path, is_trainable: bool) -> None:
        if not is_trainable:
            self.inference_adapters.add(adapter_name)
        weights = Path(path) / WEIGHTS_NAME
        base = self.peft_configs[adapter_name].base_model_name_or_path or "an unnamed base model"
        saved = json.loads(read_metadata(weights).get(SHAPE_KEY, "{}"))
        here = _model_shape(self.base_model)
        differ = {k: (saved[k], here.get(k)) for k in saved if saved[k] != here.get(k)}
        if differ:  # the same width passes the key check, so a 6-layer adapter would load into 8 layers
            raise CheckpointError(f"the adapter in {path} was saved for {base} "
                                  + ", ".join(f"{k}={a!r}" for k, (a, _) in differ.items()) + "; this model has "
                                  + ", ".join(f"{k}={b!r}" for k, (_, b) in differ.items())
                                  + ". Load it onto the base model it was trained on")
        try:
            self.load_adapter_state_dict(adapter_name, read_tensors(weights), str(path))
        except CheckpointError as err:
            raise CheckpointError(f"{err}\nThe adapter was saved from {base}.") from None


# Safetensors metadata key: the base model's shape the adapter was made for (peftlab files only).
SHAPE_KEY = "peftlab_base_model"


def _model_shape(model: nn.Module) -> dict[str, Any]:
    """What an adapter must match beyond its tensors' shapes: the model type and its depth and width."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    shape = {"model_type": getattr(config, "model_type", None)}
    for key in ("num_hidden_layers", "hidden_size", "num_layers", "num_decoder_layers", "n_layer", "d_model"):
        value = getattr(text, key, None)
        if isinstance(value, int):
            shape[key] = value
    return shape


def _read_config(path: str | Path) -> PeftConfig:
    data = read_config_dict(path)
    try:
        return config_from_dict(data)
    except PeftlabError as err:
        raise CheckpointError(f"{Path(path) / CONFIG_NAME}: {err}") from None
    except (KeyError, TypeError, ValueError) as err:  # a field missing or of the wrong type in the file
        what = f"required field {err.args[0]!r} is missing" if isinstance(err, KeyError) else str(err)
        raise CheckpointError(f"{Path(path) / CONFIG_NAME}: {what}; the file is damaged or was not written "
                              "by save_pretrained") from None


# Tasks whose peft model class adds the task head to modules_to_save and expects it in the file.
_HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


def _task_type(model: nn.Module) -> str | None:
    # peft reads task_type to pick its model class; map from the HF head class name.
    name = type(model).__name__
    for suffix, task in (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION"


class PeftModelForSequenceClassification(PeftModel):
    task_type, label_names = "SEQ_CLS", ("labels",)


class PeftModelForCausalLM(PeftModel):
    task_type, label_names = "CAUSAL_LM", ("labels",)


class PeftModelForSeq2SeqLM(PeftModel):
    task_type, label_names = "SEQ_2_SEQ_LM", ("labels",)


class PeftModelForTokenClassification(PeftModel):
    task_type, label_names = "TOKEN_CLS", ("labels",)


class PeftModelForQuestionAnswering(PeftModel):
    task_type, label_names = "QUESTION_ANS", ("start_positions", "end_positions")


class PeftModelForFeatureExtraction(PeftModel):
    task_type, label_names = "FEATURE_EXTRACTION", ()


def get_peft_model(model: nn.Module, config: PeftConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap ``model`` with a new adapter built from ``config``; only the adapter trains."""
    return PeftModel(model, config, adapter_name)
