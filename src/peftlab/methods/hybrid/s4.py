"""S4 (Chen, Zhang, Shi, Li, Smola & Yang, 2023, "Parameter-Efficient Fine-Tuning Design Spaces", ICLR):
a PEFT design *space* over four dimensions, the design pattern a greedy search of that space found, and
the search itself.

Design space (the paper's four components, for a model of ``L`` transformer layers):

1. layer grouping -- the layers are cut into ``G`` groups of consecutive layers (the paper uses G = 4),
   with a size pattern: ``uniform``, ``increasing``, ``decreasing``, ``spindle`` (middle groups larger)
   or ``bottleneck`` (middle groups smaller);
2. trainable parameter allocation -- how many trainable parameters each layer gets (uniform,
   increasing, decreasing);
3. tunable groups -- which groups are tuned at all;
4. strategy assignment -- which PEFT strategies each tuned group gets, any non-empty set of
   Adapter (A), Prefix (P), BitFit (B) and LoRA (L).

Every candidate is held to one parameter budget (``S4Config.budget``: a share of the base model's
parameters; the paper compares at 0.5%). Its update rule is that of its parts, each on its own layers::

    layer l in group g:  W x + b  ->  W x + (b + db_l)            B  in g: bias deltas (BitFit)
                         W_q, W_v ->  W + s B_l A_l               L  in g: LoRA on query/value
                         h -> h + U_l f(D_l h)                    A  in g: adapter after attn/FFN output
                         K, V -> [P_k^l; K], [P_v^l; V]           P  in g: prefix on the self-attention

Discovered pattern (the paper's S4-model; the method's default): spindle grouping into 4 groups, uniform
allocation, all groups tuned, and G1 = {A, L}, G2 = {A, P}, G3 = {A, P, B}, G4 = {P, B, L}.

Search (:func:`search`, the spec's ``search=``): the paper's progressive refinement, one dimension per
stage in the paper's order -- grouping, allocation, tunable groups, then the strategy set of G1, G2, ...
Within a stage every candidate choice is trained and scored on the context's held-out examples with the
dimensions not yet decided drawn at random (as the paper samples models from the current space); all
candidates of a stage share the same draws, so they differ only in the stage's dimension. The choice
with the best mean score is kept, and later stages sample from the narrowed space. Each candidate is
sized to the budget: one size ``s`` (adapter bottleneck, LoRA rank, prefix length -- each costs about
``2d`` parameters per unit per site) for every layer, the largest that keeps the adapter's parameters
(head excluded) under the budget; a candidate that cannot fit at ``s = 1`` is not trained.

Trial split (``budget.trials`` is a hard cap on ``context.fit`` calls): the stages with more than one
choice share the trials in order, each taking ``remaining // stages_left`` (at least 2, since one
trial compares nothing); a stage whose share is below its number of choices tries the current choice
(the paper's, or the user's) plus a seeded random sample of the others; a stage with enough trials
tries all choices, each ``share // choices`` times. A stage left with fewer than 2 trials, or started
after ``budget.time_left`` turned False, keeps the config's choice; the result's notes say which.

Default for any depth: ``S4Config()`` holds no parts, only the pattern (grouping, groups, strategies,
size); attaching writes the pattern for the model's depth (:func:`design_pattern`). A model shallower
than ``groups`` (the 2-layer test models) gets one layer per group for the groups of largest weight
(the spindle's middle groups G2, G3); :func:`design_pattern` called directly refuses such a depth. A
searched or generated config holds the parts (peftlab's BitFit, LoRA, sequential adapter and prefix
tuning configs, unused parts ``None``) with ``"@site[layers]"`` targets, and attaches as written.
BitFit needs biases: the default pattern (BitFit in G3, G4) refuses Llama and T5 with BitFit's error.

Reconstructed, not read: the paper's text beyond its abstract (and reviews stating the four found
patterns and the 0.5% budget) was not reachable, and its released code (amazon-science/peft-design-spaces)
holds adapter-transformers without the search. From memory: the four strategy sets above, G = 4 and the
five grouping patterns. The group-size rule is peftlab's: weights uniform (1,1,1,1), increasing
(1,2,3,4), decreasing (4,3,2,1), spindle (1,2,2,1), bottleneck (2,1,1,2); the L layers are apportioned
by weight (largest remainder, ties to the earlier group; where a group would be empty, one layer each
and the other L - G apportioned), e.g. spindle 6 layers -> 1,2,2,1, 8 -> 1,3,3,1, 12 -> 2,4,4,2 and
24 -> 4,8,8,4.

Deviations:
- allocation: only ``uniform`` (the paper's finding). Each part config has one size for all its
  layers, and a hybrid holds each method once, so per-layer sizes are not expressible; the search's
  allocation stage has one choice and runs no trial (noted in the result).
- prefix: trained directly (``prefix_projection=False``): the reparameterisation MLP alone costs more
  than a 0.5% budget. Self-attention only (``cross_attention=False``): a per-layer cross-attention
  placement is not expressible with prefix tuning's targets.
- one size ``s`` for all strategies (the paper's per-strategy sizes under the budget are not recalled);
  LoRA ``alpha = 2 s`` (LoRA's default ratio), adapter ``bottleneck = s``; ``s`` is capped at half
  the hidden size.
- the paper samples many models per stage (and averages); the trial budget here is the user's.
"""
from __future__ import annotations

import dataclasses
import itertools
import random
import time
from typing import Any

from torch import nn

from ...core.compose import attach_parts, part_capabilities, parts_of, validate_parts
from ...core.config import PeftConfig
from ...core.errors import PeftlabError
from ...core.registry import MethodSpec, register
from ...core.search import SearchBudget, SearchResult, Trial, pareto_front
from ...core.targets import layer_of, resolve_targets, site_in_layers
from ..additive import prefix_tuning, sequential_adapter
from ..additive.prefix_tuning import PrefixTuningConfig
from ..additive.sequential_adapter import SequentialAdapterConfig
from ..partial import bitfit
from ..partial.bitfit import BitFitConfig
from ..reparameterized import lora
from ..reparameterized.lora import LoraConfig

STRATEGIES = ("adapter", "prefix", "bitfit", "lora")
GROUPINGS = ("uniform", "increasing", "decreasing", "spindle", "bottleneck")
ALLOCATIONS = ("uniform",)  # the paper also has increasing/decreasing: see the module docstring
# The S4-model's assignment: G1 = {A, L}, G2 = {A, P}, G3 = {A, P, B}, G4 = {P, B, L}.
PAPER_STRATEGIES = ("adapter+lora", "adapter+prefix", "adapter+prefix+bitfit", "prefix+bitfit+lora")
PAPER_BUDGET = 0.005  # share of the backbone's parameters the paper compares methods at

# Where each strategy sits in a layer (peftlab's attach points).
_SITES = {
    "adapter": ("attn_out", "ffn_out"),
    "prefix": ("self_attention",),
    "bitfit": ("query", "key", "value", "attn_out", "ffn_in", "ffn_out", "layernorm"),
    "lora": ("query", "value"),
}


@dataclasses.dataclass(frozen=True)
class S4Config(PeftConfig):
    """The parts (each ``None`` when no group uses it): bitfit, lora, adapter, prefix -- in the order
    they wrap a module (BitFit innermost, so LoRA and the adapter see the shifted bias).

    The pattern (what :func:`design_pattern` wrote, and what a config without parts is built from at
    attach time): grouping (one of :data:`GROUPINGS`), groups (G), allocation (``"uniform"``), tuned
    (0-based indices of tuned groups; ``None``: all), strategies (per group, ``"+"``-joined names from
    :data:`STRATEGIES`), size (adapter bottleneck = LoRA rank = prefix length; LoRA alpha = 2 size).

    Search space (read by :func:`search`): budget (trainable share of the base model's parameters a
    candidate may use, head excluded), strategy_pool (strategies the search may assign)."""

    bitfit: BitFitConfig | None = None
    lora: LoraConfig | None = None
    adapter: SequentialAdapterConfig | None = None
    prefix: PrefixTuningConfig | None = None
    grouping: str = "spindle"
    groups: int = 4
    allocation: str = "uniform"
    tuned: tuple[int, ...] | None = None
    strategies: tuple[str, ...] = PAPER_STRATEGIES
    size: int = 8
    budget: float = PAPER_BUDGET
    strategy_pool: tuple[str, ...] = STRATEGIES

    def validate(self) -> None:
        for field, cls in (("bitfit", BitFitConfig), ("lora", LoraConfig), ("adapter", SequentialAdapterConfig),
                           ("prefix", PrefixTuningConfig)):
            self._require(getattr(self, field) is None or isinstance(getattr(self, field), cls), field,
                          f"None or a {cls.__name__}(...)")
        if parts_of(self):
            validate_parts(self, min_parts=1)
        self._require(self.grouping in GROUPINGS, "grouping", f"one of {GROUPINGS} (the paper's pattern: 'spindle')")
        self._require(self.groups > 0, "groups", "a positive number of layer groups (the paper's: 4)")
        self._require(self.allocation in ALLOCATIONS, "allocation",
                      "'uniform' (the paper's finding; increasing/decreasing need per-layer sizes, which one "
                      "part config cannot hold)")
        self._require(self.size > 0, "size", "a positive adapter bottleneck / LoRA rank / prefix length, e.g. 8")
        self._require(0.0 < self.budget < 1.0, "budget",
                      f"the share of the base model's parameters a candidate may train, in (0, 1), e.g. {PAPER_BUDGET}")
        self._require(isinstance(self.strategies, tuple) and len(self.strategies) == self.groups, "strategies",
                      f"one strategy set per group ({self.groups}), e.g. {PAPER_STRATEGIES}")
        for i, entry in enumerate(self.strategies):
            strategy_set(entry, f"S4Config.strategies[{i}]")
        pool = self.strategy_pool
        self._require(isinstance(pool, tuple) and len(pool) > 0 and len(set(pool)) == len(pool)
                      and all(s in STRATEGIES for s in pool), "strategy_pool",
                      f"a non-empty list of distinct strategies from {STRATEGIES}")
        self._require(self.tuned is None or (isinstance(self.tuned, tuple) and len(self.tuned) > 0
                      and len(set(self.tuned)) == len(self.tuned)
                      and all(isinstance(g, int) and not isinstance(g, bool) and 0 <= g < self.groups
                              for g in self.tuned)),
                      "tuned", f"None (all groups) or distinct group indices in 0..{self.groups - 1}")


def strategy_set(entry: Any, where: str) -> tuple[str, ...]:
    """``"adapter+lora"`` -> ("adapter", "lora"); an empty or unknown set is refused, naming ``where``."""
    names = tuple(n.strip() for n in entry.split("+")) if isinstance(entry, str) else ()
    if not names or not all(names):
        raise PeftlabError(f"{where}={entry!r}: the strategy set is empty; expected '+'-joined strategies from "
                           f"{STRATEGIES}, e.g. 'adapter+lora' (leave a group out with 'tuned' instead)")
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or len(set(names)) != len(names):
        raise PeftlabError(f"{where}={entry!r}: expected distinct strategies from {STRATEGIES}, e.g. "
                           f"'adapter+prefix'; got {unknown or 'a repeated name'}")
    return names


def group_weights(grouping: str, groups: int) -> list[int]:
    """Relative group sizes of a grouping pattern (spindle, 4 groups: 1, 2, 2, 1)."""
    spindle = [min(i + 1, groups - i) for i in range(groups)]
    table = {"uniform": [1] * groups, "increasing": list(range(1, groups + 1)),
             "decreasing": list(range(groups, 0, -1)), "spindle": spindle,
             "bottleneck": [max(spindle) + 1 - w for w in spindle]}
    if grouping not in table:
        raise PeftlabError(f"grouping={grouping!r} is unknown; expected one of {GROUPINGS} (the paper's "
                           "discovered pattern: 'spindle')")
    return table[grouping]


def _apportion(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to ``weights``: floors, then one more for the largest remainders
    (ties to the earlier group)."""
    quotas = [total * w / sum(weights) for w in weights]
    sizes = [int(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - int(quotas[i])), i))
    for i in by_remainder[:total - sum(sizes)]:
        sizes[i] += 1
    return sizes


def group_sizes(num_layers: int, grouping: str = "spindle", groups: int = 4) -> list[int]:
    """Layers per group, in order: ``num_layers`` apportioned by the pattern's weights (largest
    remainder, ties to the earlier group); where that leaves a group empty, one layer each and the
    rest apportioned. 12 layers, spindle: [2, 4, 4, 2]; 24: [4, 8, 8, 4]."""
    weights = group_weights(grouping, groups)
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise PeftlabError(f"num_layers={num_layers!r}: expected the model's number of transformer layers")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise PeftlabError(f"groups={groups!r}: expected a positive number of layer groups (the paper's: 4)")
    if groups > num_layers:
        raise PeftlabError(f"groups={groups} is more than the model's {num_layers} layers: every group needs a "
                           f"layer; use groups <= {num_layers}")
    sizes = _apportion(num_layers, weights)
    if min(sizes) == 0:
        sizes = [1 + n for n in _apportion(num_layers - groups, weights)]
    return sizes


def layer_groups(num_layers: int, grouping: str, groups: int, shallow: bool = False) -> list[list[int]]:
    """The layer indices of each group. ``shallow``: a model with fewer layers than groups gives one
    layer to each of the ``num_layers`` groups of largest weight (the rest stay empty)."""
    if shallow and num_layers < groups:
        weights = group_weights(grouping, groups)
        chosen = sorted(sorted(range(groups), key=lambda i: (-weights[i], i))[:num_layers])
        sizes = [1 if i in chosen else 0 for i in range(groups)]
    else:
        sizes = group_sizes(num_layers, grouping, groups)
    starts = list(itertools.accumulate([0] + sizes))
    return [list(range(starts[i], starts[i + 1])) for i in range(groups)]


def _parts(groups_layers: list[list[int]], tuned: tuple[int, ...] | None, strategies: tuple[str, ...],
           size: int) -> dict[str, PeftConfig | None]:
    """The part configs that place each strategy on the layers of the tuned groups that use it."""
    where: dict[str, list[int]] = {s: [] for s in STRATEGIES}
    for g, layers in enumerate(groups_layers):
        if tuned is None or g in tuned:
            for s in strategy_set(strategies[g], f"strategies[{g}]"):
                where[s] += layers
    def targets(strategy: str) -> tuple[str, ...]:
        return tuple(site_in_layers(site, where[strategy]) for site in _SITES[strategy])
    return {
        "bitfit": BitFitConfig(targets=targets("bitfit")) if where["bitfit"] else None,
        "lora": LoraConfig(targets=targets("lora"), r=size, alpha=2 * size) if where["lora"] else None,
        "adapter": SequentialAdapterConfig(targets=targets("adapter"), bottleneck=size) if where["adapter"] else None,
        "prefix": (PrefixTuningConfig(targets=targets("prefix"), num_virtual_tokens=size, prefix_projection=False,
                                      cross_attention=False) if where["prefix"] else None),
    }


def design_pattern(num_layers: int, grouping: str = "spindle", groups: int = 4, allocation: str = "uniform",
                   tuned: tuple[int, ...] | None = None, strategies: tuple[str, ...] = PAPER_STRATEGIES,
                   size: int = 8, **fields: Any) -> S4Config:
    """The S4 config of a design for a model of ``num_layers`` layers; the defaults are the paper's
    discovered pattern. ``fields``: other :class:`S4Config` fields (budget, modules_to_save, ...)."""
    pattern = S4Config(grouping=grouping, groups=groups, allocation=allocation, tuned=tuned,
                       strategies=tuple(strategies), size=size, **fields)  # validates the pattern first
    chosen = _parts(layer_groups(num_layers, grouping, groups), pattern.tuned, pattern.strategies, size)
    if not any(chosen.values()):
        raise PeftlabError(f"tuned={tuned!r}: the design tunes no layer; tune at least one group")
    return pattern.replace(**chosen)


def model_depth(model: nn.Module) -> int:
    """Transformer layers per stack (an encoder-decoder's index picks that layer in both stacks)."""
    depths = [w[2] for w in (layer_of(model, p) for p in resolve_targets(model, ("@self_attention",))) if w]
    if not depths:
        raise PeftlabError(f"{type(model).__name__}: found no self-attention layers to group")
    return max(depths)


def attach(model: nn.Module, name: str, config: S4Config, host: Any = None) -> None:
    """A config with parts attaches them as written; one without (the default) is the pattern,
    written for this model's depth first."""
    if not parts_of(config):
        depth = model_depth(model)
        chosen = _parts(layer_groups(depth, config.grouping, config.groups, shallow=True), config.tuned,
                        config.strategies, config.size)
        if not any(chosen.values()):
            raise PeftlabError(f"S4Config.tuned={config.tuned!r}: on this {depth}-layer model the pattern tunes no "
                               "layer; tune a group that holds layers, or use a deeper model")
        config = config.replace(**chosen)
    attach_parts(model, name, config, host)


# -- search ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Design:
    grouping: str
    tuned: tuple[int, ...]
    strategies: tuple[str, ...]


def _subsets(items: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    return [c for k in range(1, len(items) + 1) for c in itertools.combinations(items, k)]


class _Sizer:
    """Sizes a design to the budget: its adapter's parameter count is ``a + b s`` in the size ``s``
    (every strategy's size is linear in s; BitFit's is constant), read off two attached copies."""

    def __init__(self, context: Any, config: S4Config, depth: int, limit: int, cap: int) -> None:
        self.context, self.config, self.depth, self.limit, self.cap = context, config, depth, limit, cap
        self.cache: dict[tuple[Any, ...], int] = {}

    def build(self, design: _Design, size: int) -> S4Config:
        return design_pattern(self.depth, design.grouping, self.config.groups, "uniform", design.tuned,
                              design.strategies, size, budget=self.config.budget,
                              strategy_pool=self.config.strategy_pool, modules_to_save=self.config.modules_to_save)

    def cost(self, design: _Design, size: int) -> int:
        from ...core.model import get_peft_model

        key = (design, size)
        if key not in self.cache:
            built = self.build(design, size).replace(modules_to_save=())
            pm = get_peft_model(self.context.new_model(), built)
            self.cache[key] = sum(p.numel() for p in pm.adapter_parameters("default"))
        return self.cache[key]

    def fit(self, design: _Design) -> tuple[S4Config, int] | None:
        """The design at the largest size within the budget, and its cost; ``None`` if none fits."""
        one, two = self.cost(design, 1), self.cost(design, 2)
        if one > self.limit:
            return None
        per_unit = two - one
        size = self.cap if per_unit == 0 else max(1, min(self.cap, (self.limit - (one - per_unit)) // per_unit))
        return self.build(design, size), self.cost(design, size)


def search(context: Any, budget: SearchBudget, config: S4Config | None = None) -> SearchResult:
    """The paper's greedy, stage by stage (see the module docstring); at most ``budget.trials``
    ``context.fit`` calls. Returns the chosen design sized to ``config.budget``."""
    config = S4Config() if config is None else config
    if not isinstance(config, S4Config):
        raise PeftlabError(f"config={type(config).__name__}: expected an S4Config (its budget, groups and "
                           "strategy_pool set the search space)")
    started = time.perf_counter()
    base = context.new_model()
    depth = model_depth(base)
    group_sizes(depth, config.grouping, config.groups)  # refuses more groups than layers, naming them
    total = sum(p.numel() for p in base.parameters())
    limit = int(config.budget * total)
    hidden = int(base.config.get_text_config().hidden_size)
    sizer = _Sizer(context, config, depth, limit, cap=max(1, hidden // 2))
    pool = config.strategy_pool
    rng = random.Random(context.seed)
    groups = config.groups

    sizes = group_sizes(depth, "uniform", groups)
    smallest = sizes.index(min(sizes))
    cheapest = min(sizer.cost(_Design("uniform", (smallest,), (s,) * groups), 1) for s in pool)
    if cheapest > limit:
        raise PeftlabError(f"S4Config.budget={config.budget!r} allows {limit:,} of the model's {total:,} parameters; "
                           f"the cheapest candidate (one strategy on one group, size 1) needs {cheapest:,}. "
                           "Raise budget")

    # The config's own choices stand wherever a stage does not run.
    kept: dict[str, Any] = {"grouping": config.grouping, "allocation": "uniform",
                            "tuned": tuple(range(groups)) if config.tuned is None else tuple(sorted(config.tuned))}
    defaults = [tuple(s for s in strategy_set(e, "strategies") if s in pool) for e in config.strategies]
    kept.update({f"G{g + 1}": "+".join(d) if d else "+".join(pool) for g, d in enumerate(defaults)})

    def choices(stage: str) -> list[Any]:
        if stage == "grouping":
            return list(GROUPINGS)
        if stage == "allocation":
            return list(ALLOCATIONS)
        if stage == "tuned":
            return _subsets(tuple(range(groups)))
        return ["+".join(s) for s in _subsets(pool)]

    stages = ["grouping", "allocation", "tuned"] + [f"G{g + 1}" for g in range(groups)]
    decided: set[str] = set()
    trials: list[Trial] = []
    notes = [f"{depth} layers in {groups} groups; budget {config.budget:.4%} of {total:,} parameters = {limit:,} "
             f"(head excluded); allocation: uniform only (per-layer sizes are not expressible)"]

    def draw(stage: str, value: Any, sample_rng: random.Random) -> _Design:
        """The stage's value, the kept choices, and random draws for what is still open."""
        pick = {st: (value if st == stage else kept[st] if st in decided else None) for st in stages}
        for st in stages:
            if pick[st] is None:
                pick[st] = sample_rng.choice(choices(st))
        strategies = tuple(pick[f"G{g + 1}"] for g in range(groups))
        return _Design(pick["grouping"], tuple(pick["tuned"]), strategies)

    for index, stage in enumerate(stages):
        options = choices(stage)
        if stage.startswith("G") and int(stage[1:]) - 1 not in kept["tuned"]:
            notes.append(f"{stage}: not searched (the group is not tuned)")
            decided.add(stage)
            continue  # an untuned group has no strategy to choose
        if len(options) == 1:
            kept[stage] = options[0]
            decided.add(stage)
            continue
        open_stages = [s for s in stages[index:] if len(choices(s)) > 1 and
                       not (s.startswith("G") and int(s[1:]) - 1 not in kept["tuned"])]
        remaining = budget.trials - len(trials)
        share = max(2, remaining // len(open_stages))
        if remaining < 2 or not budget.time_left(started):
            why = "no time left" if remaining >= 2 else f"{remaining} trial(s) left"
            notes.append(f"{stage}: not searched ({why}); kept {kept[stage]!r}")
            decided.add(stage)
            continue
        share = min(share, remaining)
        current = kept[stage]
        if share >= len(options):
            tried, samples = [current] + [o for o in options if o != current], share // len(options)
        else:
            others = [o for o in options if o != current]
            tried, samples = [current] + rng.sample(others, share - 1), 1
        scores: dict[Any, list[float]] = {o: [] for o in tried}
        for sample in range(samples):
            seed = rng.random()
            for option in tried:
                if len(trials) >= budget.trials or not budget.time_left(started):
                    break
                fitted = sizer.fit(draw(stage, option, random.Random(seed)))
                if fitted is None:
                    continue  # over budget even at size 1: not trained
                candidate, cost = fitted
                trial, _ = context.fit(candidate, budget.steps)
                trials.append(dataclasses.replace(trial, info={
                    "stage": stage, "choice": option, "sample": sample, "size": candidate.size,
                    "adapter_entries": cost, "grouping": candidate.grouping, "tuned": list(candidate.tuned or ()),
                    "strategies": list(candidate.strategies)}))
                scores[option].append(trial.score)
        scored = {o: sum(v) / len(v) for o, v in scores.items() if v}
        if scored:
            best = max(scored, key=lambda o: (scored[o], -tried.index(o)))
            kept[stage] = best
            notes.append(f"{stage}: kept {best!r} (mean held-out score {scored[best]:.4f} over "
                         f"{len(scores[best])} trial(s); {len(scored)} of {len(options)} choices scored)")
        else:
            notes.append(f"{stage}: no candidate fitted the budget or the time; kept {kept[stage]!r}")
        decided.add(stage)

    final = _Design(kept["grouping"], kept["tuned"], tuple(kept[f"G{g + 1}"] for g in range(groups)))
    fitted = sizer.fit(final)
    if fitted is None:
        raise PeftlabError(f"S4Config.budget={config.budget!r}: the chosen design {final} does not fit {limit:,} "
                           "parameters at size 1; raise budget or narrow strategy_pool")
    chosen, cost = fitted
    notes.append(f"found: {chosen.grouping} grouping, tuned groups {list(chosen.tuned or ())}, strategies "
                 f"{list(chosen.strategies)}, size {chosen.size} ({cost:,} adapter parameters)")
    front = pareto_front([(t.score, t.trainable) for t in trials])
    return SearchResult(method=SPEC.name, config=chosen, trials=trials, budget=budget,
                        seconds=time.perf_counter() - started, front=front, notes=notes)


# default_lr: the parts' rates differ (LoRA 5e-4, adapter and BitFit 1e-3, a direct prefix wants
# more); 1e-3, the adapter's and BitFit's, which most of the pattern's layers carry.
SPEC = register(MethodSpec(
    name="s4", title="S4", family="hybrid", subcategory="automatic combination", config_cls=S4Config,
    trains="per layer group, the group's strategies (adapter, prefix, BitFit, LoRA) on its layers",
    attach=attach, paper="Chen et al. 2023, Parameter-Efficient Fine-Tuning Design Spaces",
    default_lr=1e-3, search=search,
    **part_capabilities(bitfit.SPEC, lora.SPEC, sequential_adapter.SPEC, prefix_tuning.SPEC),
))
