"""AutoPEFT (Zhou, Wan, Vulić & Korhonen, 2024, "AutoPEFT: Automatic Configuration Search for
Parameter-Efficient Fine-Tuning", TACL 12): a multi-objective Bayesian optimisation over a space of
PEFT configurations, trading the task score against the number of trained parameters.

The found architecture (:class:`AutoPeftConfig`) is the paper's configuration space, each part
optional and each acting only in the chosen layers ``L`` (written ``"@site[i,j,...]"``)::

    serial adapter   (SA, size m_s):  h <- h + W_up f(W_down h)           after the FFN output projection
    parallel adapter (PA, size m_p):  FFN'(x) = FFN(x) + 4 W_up f(W_down x)   beside the FFN
    prefix           (PT, length p):  attention over [P_k; K], [P_v; V]    in every attention of L

Each part is the code of its own peftlab method (:class:`SequentialAdapterConfig`,
:class:`ParallelAdapterConfig`, :class:`PrefixTuningConfig`), attached under one adapter name.

Search (:func:`search`, the spec's ``search``), as in the authors' code (cambridgeltl/autopeft,
``adapterhub/bo/search_space.py``, ``base_function.py``): per layer one binary "insert or leave out"
variable shared by the three parts, and per part one integer ``k`` (the code's
``log2_reduction_*``, 0..10) for its size ``d / 2^k`` on the model width ``d``, where ``2^9`` gives
size 1 and ``2^10`` switches the part off. On BERT-base (d = 768) this is the paper's grid
{768, 384, 192, 96, 48, 24, 12, 6, 3, 1, 0}; here the grid is ``max(1, floor(d / 2^k))`` for
k = 0..9 plus 0, deduplicated (:func:`size_grid`), so it scales with the width (MiniLM, d = 384:
{384, 192, ..., 3, 1, 0}; the 32-wide test models: {32, 16, 8, 4, 2, 1, 0}) and keeps the code's
ordinal encoding (the sampler sees the grid index). A sampled point with no layer or with every part
off is rejected and sampled again (the code's rejection sampling); it costs no training run, and once
the GP has data it is told the worst score and cost seen so far (else the GP, which never sees a
failed trial, proposes the same empty point again). Each
candidate is trained by ``context.fit(config, steps=budget.steps)`` and scored on held-out examples;
the objectives are (maximise) that score and (minimise) the trained entries as a percentage of the
base model's parameters (the code's ``param`` objective; the context's count, head included, which
ranks candidates as the adapter alone does). The optimiser is optuna's multi-objective Gaussian-
process sampler (:class:`optuna.samplers.GPSampler`, seeded from ``context.seed``: a GP surrogate with
an expected-hypervolume-improvement acquisition; the authors' code builds its GP in BoTorch), started from ``ceil(trials / 2)``
random points as the authors' script starts from half its evaluations (``-ni 100`` of ``-mi 200``).
The result's front is :func:`~peftlab.core.search.pareto_front` of every trained candidate; the
chosen point is the front's best score (ties: fewer entries), or, with ``max_param_percent`` set,
the best score among front points at most that share of the model (the paper picks points off the
front by parameter budget the same way); if none fits, the front's cheapest point, with a note.

Default config (no search): the authors' own SAPPA starting configuration (``run_glue.py``,
``adapter_name == "sappa"``: a prefix of adapter-transformers' default length 30, an SA of
reduction factor 4 and a PA of reduction factor 8, scaling 4, in every layer), so the default is
the full space's three parts at the code's default sizes, scaled with the width (m_s = d/4, m_p = d/8).

Deviations from the paper, and why:
- The SA sits after the FFN output projection, before the residual add and LayerNorm (peftlab's
  sequential adapter at ``@ffn_out``); the authors' ``AutoPEFTConfig`` is the Pfeiffer variant
  (``original_ln_before=True``: after the block's residual and LayerNorm, with another residual).
  Both are one bottleneck per layer after the FFN; peftlab has the one placement.
- The prefix trains directly (``prefix_projection=False``): through peftlab's MLP
  reparameterisation every prefix would train an extra d x d + d x 2Ld MLP whatever its length (1.9M
  entries on MiniLM), so the count the search minimises would no longer be the paper's
  ``p * d * 2 * |L|``. A user's ``prefix`` part keeps its own setting; the size and layers are searched.
- Prefix lengths above half the model's learned positions are left out of the grid (peftlab shifts
  the real tokens' positions by p, as peft does; the authors' library did not), so that inputs fit.
- The paper trains each candidate to convergence with early stopping; here each trains
  ``budget.steps`` optimizer steps (the search budget), and layer choice covers the decoder stack too
  on encoder-decoder models (one index picks that layer in both stacks).
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Any

from torch import nn

from ...core.compose import attach_parts, part_capabilities, validate_parts
from ...core.config import PeftConfig
from ...core.errors import PeftlabError
from ...core.registry import MethodSpec, register
from ...core.search import SearchBudget, SearchResult, Trial, pareto_front
from ...core.targets import site_in_layers
from ..additive import parallel_adapter, prefix_tuning, sequential_adapter
from ..additive.parallel_adapter import ParallelAdapterConfig
from ..additive.prefix_tuning import PrefixTuningConfig
from ..additive.sequential_adapter import SequentialAdapterConfig

PARTS = ("serial", "parallel", "prefix")
# Where each part acts in a layer: SA after the FFN output projection, PA beside the FFN, the prefix
# in every attention of the layer (T5: self- and cross-attention of a decoder block).
SITES = {"serial": "ffn_out", "parallel": "ffn", "prefix": "attention"}
LOG2_STEPS = 10  # the code's log2_reduction_* run 0..10; 2^10 switches the part off
MAX_REJECTED = 200  # empty samples in a row before the search gives up on the space


@dataclasses.dataclass(frozen=True)
class AutoPeftConfig(PeftConfig):
    """serial / parallel / prefix: the parts (``None``: off), each with targets at its site, optionally
    restricted to layers (``"@ffn_out[0,2]"``); sizes are the parts' own fields (``bottleneck`` or
    ``reduction_factor``, ``num_virtual_tokens``).

    Search settings (read by :func:`search` only): search_parts: the parts the search may switch on
    (the others stay off in every candidate; a given part is the template whose other fields the
    candidates keep); max_param_percent: choose the best-scoring front point training at most this
    percentage of the base model's parameters (``None``: the best score on the front)."""

    serial: SequentialAdapterConfig | None = SequentialAdapterConfig(targets=("@ffn_out",), reduction_factor=4)
    parallel: ParallelAdapterConfig | None = ParallelAdapterConfig(reduction_factor=8, scaling=4.0)
    prefix: PrefixTuningConfig | None = PrefixTuningConfig(targets=("@attention",), num_virtual_tokens=30,
                                                           prefix_projection=False, cross_attention=False)
    search_parts: tuple[str, ...] = PARTS
    max_param_percent: float | None = None

    def validate(self) -> None:
        self._require(self.serial is None or isinstance(self.serial, SequentialAdapterConfig), "serial",
                      "a SequentialAdapterConfig(...) (the serial adapter), or None for none")
        self._require(self.parallel is None or isinstance(self.parallel, ParallelAdapterConfig), "parallel",
                      "a ParallelAdapterConfig(...) (the parallel adapter), or None for none")
        self._require(self.prefix is None or isinstance(self.prefix, PrefixTuningConfig), "prefix",
                      "a PrefixTuningConfig(...) (the prefix), or None for none")
        self._require(isinstance(self.search_parts, tuple) and len(self.search_parts) > 0
                      and all(p in PARTS for p in self.search_parts)
                      and len(set(self.search_parts)) == len(self.search_parts), "search_parts",
                      f"a non-empty list of distinct parts from {list(PARTS)} that the search may switch on "
                      "(an empty list leaves the search nothing to search)")
        self._require(self.max_param_percent is None or (0 < self.max_param_percent <= 100), "max_param_percent",
                      "None (choose the best score) or a share of the base model's parameters in percent, "
                      "0 < x <= 100, e.g. 1.0")
        validate_parts(self, min_parts=1)


# -- the model's dimensions and the size grids ------------------------------------------------------
def model_facts(model: nn.Module) -> tuple[int, int, int | None]:
    """(layers per stack, width d, learned positions or ``None``) of a transformers model."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers, width = getattr(text, "num_hidden_layers", None), getattr(text, "hidden_size", None)
    if not isinstance(layers, int) or not isinstance(width, int) or layers < 1 or width < 1:
        raise PeftlabError(f"AutoPEFT reads num_hidden_layers and hidden_size from the model config; "
                           f"{type(text).__name__} gives {layers!r} and {width!r}")
    positions = None
    if not getattr(text, "is_encoder_decoder", False):
        positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    return layers, width, positions


def size_grid(width: int) -> list[int]:
    """The paper's sizes d / 2^k (k = 0..9, at least 1) then 0 (off), largest first, deduplicated."""
    sizes = sorted({max(1, width >> k) for k in range(LOG2_STEPS)}, reverse=True)
    return sizes + [0]


def prefix_grid(width: int, positions: int | None) -> list[int]:
    """:func:`size_grid`, lengths above half the learned positions left out (the real tokens keep the rest)."""
    return [p for p in size_grid(width) if positions is None or p <= positions // 2]


def candidate(template: AutoPeftConfig, layers: list[int], sizes: dict[str, int]) -> AutoPeftConfig | None:
    """The config of one point of the space: the parts of ``sizes`` with a size above 0, in ``layers``;
    other fields from ``template``'s parts (or the defaults). ``None`` when nothing is switched on."""
    if not layers or not any(sizes.values()):
        return None
    defaults = AutoPeftConfig()
    parts: dict[str, PeftConfig | None] = dict.fromkeys(PARTS)
    for name, size in sizes.items():
        if not size:
            continue
        base = getattr(template, name) or getattr(defaults, name)
        target = (site_in_layers(SITES[name], layers),)
        if name == "prefix":
            parts[name] = base.replace(targets=target, num_virtual_tokens=size, cross_attention=False)
        else:
            parts[name] = base.replace(targets=target, bottleneck=size, reduction_factor=None)
    return template.replace(**parts)


def _check_fits(model: nn.Module, config: AutoPeftConfig) -> None:
    """Sizes above the space's (the width d; half the learned positions for the prefix): refused by name."""
    _, width, positions = model_facts(model)
    for name in ("serial", "parallel"):
        part = getattr(config, name)
        if part is not None and part.bottleneck is not None and part.bottleneck > width:
            raise PeftlabError(f"AutoPeftConfig.{name}.bottleneck={part.bottleneck} does not fit this model: "
                               f"AutoPEFT's sizes go up to the width d = {width}; pick one of {size_grid(width)[:-1]}")
    if config.prefix is not None and positions and config.prefix.num_virtual_tokens > positions // 2:
        raise PeftlabError(f"AutoPeftConfig.prefix.num_virtual_tokens={config.prefix.num_virtual_tokens} does not "
                           f"fit this model: its {positions} learned positions leave room for a prefix of at most "
                           f"{positions // 2} (half of them); pick a shorter prefix")


def attach(model: nn.Module, name: str, config: AutoPeftConfig, host: Any = None) -> None:
    _check_fits(model, config)
    attach_parts(model, name, config, host)


# -- the search ---------------------------------------------------------------------------------------
def search(context: Any, budget: SearchBudget, config: AutoPeftConfig | None = None) -> SearchResult:
    """Multi-objective Bayesian optimisation (optuna's GP sampler) of score against trained entries
    over :class:`AutoPeftConfig`'s space; ``budget.trials`` training runs (rejected empty samples are
    not trained and do not count), none started after ``budget.minutes``."""
    import optuna
    from optuna.trial import TrialState

    config = AutoPeftConfig() if config is None else config
    if not isinstance(config, AutoPeftConfig):
        raise PeftlabError(f"AutoPEFT's search takes an AutoPeftConfig (its space settings), got {type(config).__name__}")
    if not isinstance(budget, SearchBudget):
        raise PeftlabError(f"budget: expected a SearchBudget(trials=..., steps=..., minutes=...), got {budget!r}")
    model = context.new_model()
    layers, width, positions = model_facts(model)
    base_entries = sum(p.numel() for p in model.parameters())
    del model
    grids = {name: prefix_grid(width, positions) if name == "prefix" else size_grid(width)
             for name in config.search_parts}

    started = time.perf_counter()
    trials: list[Trial] = []
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no line per trial; restored below
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.GPSampler(seed=context.seed, n_startup_trials=math.ceil(budget.trials / 2))
            study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
            rejected = empty = 0
            while len(trials) < budget.trials and budget.time_left(started):
                asked = study.ask()
                chosen = [i for i in range(layers) if asked.suggest_int(f"layer_{i}", 0, 1)]
                sizes = {name: grid[asked.suggest_int(f"{name}_size_index", 0, len(grid) - 1)]
                         for name, grid in grids.items()}
                found = candidate(config, chosen, sizes)
                if found is None:  # the code's rejection sampling: nothing to train, sample again
                    if trials:  # and teach the GP that region is worst on both objectives, or it stays there
                        study.tell(asked, [min(t.score for t in trials),
                                           max(t.info["param_percent"] for t in trials)])
                    else:  # the random start: no model to teach
                        study.tell(asked, state=TrialState.FAIL)
                    rejected += 1
                    empty += 1
                    if rejected >= MAX_REJECTED:
                        raise PeftlabError(f"AutoPEFT sampled {MAX_REJECTED} empty configurations in a row from "
                                           f"search_parts={list(config.search_parts)} on {layers} layers; "
                                           "widen search_parts")
                    continue
                rejected = 0
                trial, _ = context.fit(found, steps=budget.steps)
                percent = 100.0 * trial.trainable / base_entries
                trial = dataclasses.replace(trial, info={**trial.info, "layers": chosen, "sizes": sizes,
                                                         "param_percent": percent, "optuna_trial": asked.number,
                                                         "summary": describe(found)})
                study.tell(asked, [trial.score, percent])
                trials.append(trial)
    finally:
        optuna.logging.set_verbosity(verbosity)
    if not trials:
        raise PeftlabError(f"AutoPEFT trained no candidate within budget.minutes={budget.minutes}; raise it "
                           "(a candidate needs one full training run)")

    front = pareto_front([(t.score, float(t.trainable)) for t in trials])
    notes = [f"space: {layers} layers x sizes {grids} (d = {width}); objectives: held-out score (max), "
             f"trained entries in % of the base model's {base_entries} (min); sampler: optuna GPSampler, "
             f"{math.ceil(budget.trials / 2)} random start points, seed {context.seed}"]
    pick = front
    if config.max_param_percent is not None:
        pick = [i for i in front if trials[i].info["param_percent"] <= config.max_param_percent]
        if not pick:
            pick = front[:1]
            notes.append(f"no front point trains at most max_param_percent={config.max_param_percent}%; "
                         f"chose the cheapest ({trials[pick[0]].info['param_percent']:.3f}%)")
    best = max(pick, key=lambda i: (trials[i].score, -trials[i].trainable))
    rule = ("the best score on the front" if config.max_param_percent is None
            else f"the best score on the front within {config.max_param_percent}% of the model")
    notes.append(f"chose trial {best}, {rule}: score {trials[best].score:.4f}, {trials[best].trainable} "
                 f"trained entries ({trials[best].info['param_percent']:.3f}%): {describe(trials[best].config)}")
    if empty:
        notes.append(f"{empty} sampled configurations switched everything off; rejected without training "
                     "(told to the sampler as its worst values once it has trials)")
    if len(trials) < budget.trials:
        notes.append(f"stopped after {len(trials)} of {budget.trials} trials: budget.minutes={budget.minutes} ran out")
    chosen_config = trials[best].config
    assert isinstance(chosen_config, AutoPeftConfig)
    return SearchResult(method=SPEC.name, config=chosen_config, trials=trials, budget=budget,
                        seconds=time.perf_counter() - started, front=front, notes=notes)


def describe(config: AutoPeftConfig) -> str:
    """One line: each part's size and layers, e.g. ``SA 24 @[0-5]; PT 12 @[1,3]``."""
    out = []
    for name, short in (("serial", "SA"), ("parallel", "PA"), ("prefix", "PT")):
        part = getattr(config, name)
        if part is None:
            continue
        if name == "prefix":
            size: Any = part.num_virtual_tokens
        else:
            size = part.bottleneck if part.bottleneck is not None else f"d/{part.reduction_factor or 16:g}"
        targets = (part.targets,) if isinstance(part.targets, str) else part.targets or ("all",)
        where = ",".join(t.split("[", 1)[1].rstrip("]") if "[" in t else "all" for t in targets)
        out.append(f"{short} {size} @[{where}]")
    return "; ".join(out) or "none"


# default_lr: the adapters' (1e-3); the prefix trains directly, as a soft prompt, at the same rate.
SPEC = register(MethodSpec(
    name="autopeft", title="AutoPEFT", family="hybrid", subcategory="automatic combination", config_cls=AutoPeftConfig,
    trains="a searched subset of layers, each with a serial adapter, a parallel adapter and a prefix of searched sizes",
    attach=attach, search=search, default_lr=1e-3,
    paper="Zhou et al. 2024, AutoPEFT: Automatic Configuration Search for Parameter-Efficient Fine-Tuning",
    **part_capabilities(sequential_adapter.SPEC, parallel_adapter.SPEC, prefix_tuning.SPEC),
))
