"""The registry of PEFT methods.

Each method file calls :func:`register` once with a :class:`MethodSpec`. Generic code (the model
wrapper, the conformance tests, the assessment) reads capabilities from the spec and never
compares method names.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .errors import PeftlabError
from .hooks import TrainingHooks

if TYPE_CHECKING:
    from .config import PeftConfig

FAMILIES = ("additive", "partial", "reparameterized", "hybrid", "unified")


@dataclass(frozen=True)
class MethodSpec:
    """What a method is and what it can do.

    ``attach(model, adapter_name, config, host)`` adds adapter ``adapter_name`` to ``model`` in
    place; ``host`` is the :class:`~peftlab.core.model.PeftModel`, used by methods that keep
    model-level state (soft prompts). Capabilities are declarations the conformance suite checks.
    """

    name: str
    family: str
    subcategory: str
    config_cls: type
    trains: str
    attach: Callable[..., None]
    paper: str = ""
    title: str = ""  # the name as papers and the review write it ("(IA)³", "LoRA"); reports show it
    mergeable: bool = False
    identity_at_init: bool = True
    merge_tolerance: float = 1e-5
    changes_sequence_length: bool = False
    peft_type: str | None = None
    # A learning rate that works for this method on BERT-size models (methods train at very
    # different rates: soft prompts want ~1e-2, LoRA ~5e-4); the assessment starts from it.
    default_lr: float = 1e-3
    # Its delta modules read ``DeltaModule.mixed_batch`` (one adapter name per example), so
    # ``PeftModel.forward(..., adapter_names=[...])`` can serve several adapters in one batch.
    supports_mixed_batch: bool = False
    # It trains a delta as large as the weights it targets (masked fine-tuning), so it needs their
    # full gradients: its cheapest training step is full fine-tuning's, not the frozen floor.
    needs_weight_gradients: bool = False
    # What the method does during training (data pass, loss term, step hooks, parameter groups).
    hooks: TrainingHooks = TrainingHooks()
    # Adapter arithmetic: ``combine(model, adapters, weights, new_name, combination_type, **options)``
    # adds adapter ``new_name`` to ``model`` (a PeftModel) as a weighted combination of trained
    # adapters of this method, and returns nothing; it raises PeftlabError naming what does not fit.
    combine: Callable[..., None] | None = None
    combination_types: tuple[str, ...] = ()
    # For a method that builds on other adapters (``config.required_adapters()``, e.g. AdapterFusion):
    # ``example()`` returns ({name: config} of the adapters to add first, the method's config over
    # them) — what the conformance suite builds, since the default config alone cannot apply.
    example: Callable[[], tuple[dict[str, Any], Any]] | None = None
    # It stores base weights quantized (QLoRA, QA-LoRA, LoftQ): attaching replaces the targeted base
    # layers in place, and they stay quantized when the adapter is disabled or deleted (the
    # full-precision weights are not kept: that is the memory saved). ``quantize_base(model, config)``
    # quantizes a bare model as attaching does: what the disabled or deleted adapter computes as.
    quantize_base: Callable[[Any, Any], None] | None = None
    # (module, pip extra) it needs beyond peftlab's own dependencies, e.g. ("bitsandbytes", "quant"):
    # the study skips it with a note where the module is missing.
    requires: tuple[str, str] | None = None
    # It runs the model's forward its own way (MoELoRA reads task ids; L-LoRA linearises around the
    # initialisation; Laplace-LoRA returns a predictive). ``around_forward(host, adapter_name, forward,
    # args, kwargs, extra)`` returns the output; ``forward(*args, **kwargs)`` runs the rest of the call.
    # ``PeftModel.forward`` applies it for each active, unmerged adapter (the first active outermost).
    around_forward: Callable[..., Any] | None = None
    # Keyword arguments of ``model(...)`` the method reads (e.g. ``("task_ids",)``): taken out of the
    # call before the base model sees them and handed to ``around_forward`` as ``extra``.
    forward_kwargs: tuple[str, ...] = ()
    # It applies to bidirectional encoder models only (PASTA reads the special tokens' states): it
    # refuses decoders and encoder-decoders, and the suites skip or omit it on those.
    encoder_only: bool = False
    # It scores the classes itself (WARP's verbalizer), so the model's classification head is never
    # read: training jobs do not add the head to ``modules_to_save`` for it.
    replaces_head: bool = False
    # It attends over the whole sequence and keeps no KV cache (Tiny-Attention): ``PeftModel.generate``
    # decodes without the cache (``use_cache=False``) while it is live.
    needs_full_sequence: bool = False
    # It is found by a search (AutoPEFT, S3Delta-M, S4): ``search(context, budget, config)`` trains candidates
    # through ``context`` (a :class:`~peftlab.core.search.SearchContext`) and returns a
    # :class:`~peftlab.core.search.SearchResult` whose ``config`` is this method's config; the study
    # runs it before training the found config like any other.
    search: Callable[..., Any] | None = None
    # It draws a random choice once per forward pass (AdaMix's expert route, AdapterDrop's dropped
    # layers, a hard-concrete gate sample): a batch cut into parts (``TrainArgs.split_by_length``) would
    # draw it once per part, so peftlab's loop runs its batches whole.
    draws_per_forward: bool = False
    # A stage of another method, not a method of the taxonomy (S3Delta-M's gated supernet, which its
    # search trains): the conformance suite tests it; the study's "all" and the benchmarks leave it out.
    internal: bool = False

    def missing_requirement(self) -> str | None:
        """Why this method cannot run here (its optional dependency is not installed), or None."""
        if self.requires is None:
            return None
        import importlib.util

        module, extra = self.requires
        if importlib.util.find_spec(module) is None:
            return f"{self.name} needs {module}, which is not installed: pip install 'peftlab[{extra}]'"
        return None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise PeftlabError(f"method {self.name!r}: family {self.family!r} is not one of {FAMILIES}")


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry; a second method with the same name is refused."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise PeftlabError(f"a method named {spec.name!r} is already registered; pick another name")
    _REGISTRY[spec.name] = spec
    spec.config_cls.method = spec.name
    return spec


def get_method(name: str) -> MethodSpec:
    """The spec of method ``name``; an unknown name lists the known ones."""
    _load_builtin_methods()
    key = name.lower().replace("-", "_")
    if key in _REGISTRY:
        return _REGISTRY[key]
    close = difflib.get_close_matches(key, list(_REGISTRY), n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise PeftlabError(f"unknown method {name!r}.{hint} Known methods: {', '.join(sorted(_REGISTRY))}.")


def spec_for_config(config: Any) -> MethodSpec:
    return get_method(type(config).method)


def all_methods() -> list[MethodSpec]:
    _load_builtin_methods()
    return sorted(_REGISTRY.values(), key=lambda s: (FAMILIES.index(s.family), s.subcategory, s.name))


def list_methods() -> list[tuple[str, str, str]]:
    """(name, family, subcategory) of every registered method, in taxonomy order."""
    return [(s.name, s.family, s.subcategory) for s in all_methods()]


def spec_for_peft_type(peft_type: str) -> MethodSpec:
    _load_builtin_methods()
    for spec in _REGISTRY.values():
        if spec.peft_type == peft_type:
            return spec
    known = sorted(s.peft_type for s in _REGISTRY.values() if s.peft_type)
    raise PeftlabError(f"peft_type {peft_type!r} has no peftlab method; peftlab reads {known}")


def _load_builtin_methods() -> None:
    # Importing the package registers every built-in method (one import line per method file).
    import peftlab.methods  # noqa: F401
