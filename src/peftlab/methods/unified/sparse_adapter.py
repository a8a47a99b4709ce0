"""SparseAdapter (He, Ding, Dong, Zhang, Tao, 2022, "SparseAdapter: An Easy Approach for Improving the
Parameter-Efficiency of Adapters", Findings of EMNLP 2022).

A sequential bottleneck adapter (Houlsby placement: after the attention and FFN output projections,
before the residual add) whose two weight matrices are pruned once, at initialisation, to a target
sparsity ``s``; the mask then stays fixed and only the kept entries train. With ``h`` the
projection's output and ``M_down``, ``M_up`` the fixed binary masks::

    h <- h + (M_up * W_up) f((M_down * W_down) h + b_down) + b_up

The masks keep the ``(1 - s)`` share of all adapter weight entries (of every site together: one
global ranking, as the reference code's default ``mask_scope="global"``) that score highest under
``criterion``:

- ``"snip"`` (default, the paper's recommendation; Lee et al. 2019): ``|w * dL/dw|`` with the
  gradient summed over ``score_batches`` training batches, taken in the data pass before the first
  optimizer step (``model.begin_training(loader, ...)``), with the model in eval mode as the reference;
- ``"magnitude"``: ``|w|``; ``"random"``: uniform scores. These two need no data: the adapter is
  pruned when it is added.

**Large-Sparse** (the paper's setting): a bottleneck ``k`` times wider at sparsity ``1 - 1/k`` keeps
as many weights as a dense adapter of the base width but spreads them over more hidden units
(2x at 50%, as in the paper). ``width_scale`` widens the bottleneck; the preset
``SparseAdapterConfig.large_sparse(k)`` sets both.

Storage: each weight matrix holds only its kept entries, as a trained ``values`` vector and a frozen
vector of flat ``indices`` (like ``partial/sparse_delta.py``); the dense matrix is scattered from them
in the forward pass. So pruned entries do not exist: no gradient, no optimizer state and no weight
decay can move them, the parameter count is the kept count, and the checkpoint holds per matrix
``down.indices``/``down.values`` and ``up.indices``/``up.values`` (plus the two biases), loaded
strictly (lengths, range and repeats of the indices are checked). Before SNIP's data pass a matrix
holds all its entries (indices 0..n-1); pruning shrinks the same ``nn.Parameter`` in place, so an
optimizer built before ``begin_training`` trains the kept values (under DDP/FSDP, which record sizes
when wrapping, call ``begin_training`` first). A loaded (already pruned) adapter is not pruned again.

Defaults: ``sparsity=0.4`` (the ratio the abstract recommends with SNIP); width ``hidden // 12``
(the reference's ``attn_bn = ffn_bn = 64`` on 768-wide RoBERTa-base), ReLU; both weight matrices
``~ N(0, 0.02^2)`` and biases zero, the reference's ``init_bert_weights`` (``W_up`` must not start at
zero: every SNIP score ``|w * g|`` of both matrices would be 0); SNIP on 10 batches (the reference
scores 320 training examples: ``length=10`` x 32); learning rate 1e-4 (the reference's
``run_glue.sh``, with weight decay 0.1).

Deviations from the paper / reference code:
- The reference adapter has its own LayerNorm on the adapter input (``adapter_layernorm_option="in"``)
  and dropout on the bottleneck; this adapter is peftlab's plain Houlsby bottleneck (as the sequential
  adapter), without them.
- Biases are never pruned (as the reference, ``prune_bias=False``) and do not count toward ``s``; so
  Large-Sparse keeps the dense adapter's weight budget exactly, and its ``b_down`` grows with the width.
- The reference keeps entries with score strictly above the k-th smallest (ties pruned); here exactly
  ``round((1 - s) n)`` entries are kept (top-k), so the kept share is ``1 - s`` to within one entry.
- Only the one-shot schedule (``prune_epochs = prune_iterations = 1``, the paper's setting); the
  reference's GraSP and SynFlow pruners are not offered.
- Not mergeable: ``f`` is nonlinear.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import torch
from torch import nn

from ...core.config import PeftConfig
from ...core.errors import CheckpointError, PeftlabError
from ...core.hooks import TrainingHooks
from ...core.inject import wrap
from ...core.layer import BufferDict, DeltaModule, built_once_without_grad
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, resolve_targets
from ..additive.sequential_adapter import ACTIVATIONS, factory_kwargs, linear_features, validate_bottleneck_fields
from ..partial.sparse_delta import batch_loss, batches

METHOD = "SparseAdapter"
CRITERIA = ("snip", "magnitude", "random")
DATA_FREE = ("magnitude", "random")
PARTS = ("down", "up")
# m = hidden // 12 when neither bottleneck nor reduction_factor is set: the reference's 64 at 768.
DEFAULT_REDUCTION_FACTOR = 12


@dataclasses.dataclass(frozen=True)
class SparseAdapterConfig(PeftConfig):
    """sparsity: share of the adapter weight entries pruned at initialisation, in (0, 1);
    criterion: how they are ranked, one of :data:`CRITERIA` (``"snip"`` needs a data pass);
    bottleneck / reduction_factor: the base width m (one of them; neither: hidden // 12);
    width_scale: Large-Sparse widening, the bottleneck is ``round(width_scale * m)`` wide;
    activation: f; init_scale: std of the normal init of both weight matrices;
    score_batches: training batches SNIP sums its gradient over (None: one pass over the data)."""

    targets: tuple[str, ...] | str | None = ("@attn_out", "@ffn_out")
    sparsity: float = 0.4
    criterion: str = "snip"
    bottleneck: int | None = None
    reduction_factor: float | None = None
    width_scale: float = 1.0
    activation: str = "relu"
    init_scale: float = 0.02
    score_batches: int | None = 10

    @classmethod
    def large_sparse(cls, scale: float = 2.0, **fields: Any) -> "SparseAdapterConfig":
        """The paper's Large-Sparse setting: a bottleneck ``scale`` times wider at sparsity
        ``1 - 1/scale``, keeping as many weights as the dense adapter of the base width."""
        if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 1):
            raise PeftlabError(f"SparseAdapterConfig.large_sparse(scale={scale!r}): expected a widening factor > 1 "
                               "such as 2 (twice the width at 50% sparsity)")
        return cls(width_scale=scale, sparsity=1 - 1 / scale, **fields)

    def validate(self) -> None:
        self._require(0 < self.sparsity < 1, "sparsity",
                      "the pruned share of the adapter weights, strictly between 0 and 1, such as 0.4 "
                      "(0 would be the plain sequential adapter, 1 would prune it away)")
        self._require(self.criterion in CRITERIA, "criterion",
                      f"one of {CRITERIA} ('snip': |w * dL/dw| on training batches, the paper's choice)")
        validate_bottleneck_fields(self)
        self._require(self.width_scale >= 1, "width_scale",
                      "a widening factor >= 1 (Large-Sparse: 2 with sparsity 0.5 keeps the dense budget)")
        self._require(self.score_batches is None or self.score_batches > 0, "score_batches",
                      "a positive number of batches for SNIP's scores, or None for one pass over the data")

    def width(self, hidden: int) -> int:
        """The bottleneck width at a site of width ``hidden``."""
        if self.bottleneck is not None:
            base = self.bottleneck
        else:
            factor = self.reduction_factor if self.reduction_factor is not None else DEFAULT_REDUCTION_FACTOR
            base = max(1, int(hidden // factor))
        return max(1, round(base * self.width_scale))


class SparseAdapterLayer(DeltaModule):
    """Wraps a Linear/Conv1D and adds a sparse bottleneck of its output ``h`` for each live adapter,
    in order. Each weight matrix is its kept ``values`` scattered at flat ``indices``."""

    adapter_attrs = ("down_values", "up_values", "down_bias", "up_bias")
    frozen_attrs = ("down_indices", "up_indices")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.features = linear_features(base_layer)[1]
        self.down_values, self.up_values = nn.ParameterDict(), nn.ParameterDict()
        self.down_bias, self.up_bias = nn.ParameterDict(), nn.ParameterDict()
        self.down_indices, self.up_indices = BufferDict(), BufferDict()

    def values(self, part: str) -> nn.ParameterDict:
        return getattr(self, f"{part}_values")

    def indices(self, part: str) -> BufferDict:
        return getattr(self, f"{part}_indices")

    def shape(self, name: str, part: str) -> tuple[int, int]:
        """(out, in) of weight ``part`` of adapter ``name``, laid out as ``nn.Linear``'s."""
        width, d = self.settings[name]["width"], self.features
        return (width, d) if part == "down" else (d, width)

    def add(self, name: str, config: SparseAdapterConfig) -> None:
        d, kw = self.features, factory_kwargs(self.base_layer)
        width = config.width(d)
        self.settings[name] = {"width": width, "activation": config.activation}
        for part in PARTS:
            dense = torch.empty(self.shape(name, part), **kw)
            nn.init.normal_(dense, std=config.init_scale)
            self.values(part)[name] = nn.Parameter(dense.reshape(-1))
            self.indices(part)[name] = torch.arange(dense.numel(), device=dense.device)  # all kept until pruned
        self.down_bias[name] = nn.Parameter(torch.zeros(width, **kw))
        self.up_bias[name] = nn.Parameter(torch.zeros(d, **kw))

    def weight_of(self, name: str, part: str) -> torch.Tensor:
        """The dense weight matrix (zero at pruned entries), differentiable in the kept values."""
        values, indices = self.values(part)[name], self.indices(part)[name]
        rows, cols = self.shape(name, part)
        # At inference the scatter is redone only when the kept values or their positions change.
        return built_once_without_grad(self, (name, part), (values, indices), lambda: values.new_zeros(
            rows * cols).index_add(0, indices, values).view(rows, cols))

    def dense_entries(self, name: str) -> int:
        return sum(math.prod(self.shape(name, part)) for part in PARTS) if name in self.settings else 0

    def kept_entries(self, name: str) -> int:
        return sum(self.indices(part)[name].numel() for part in PARTS)

    def keep(self, name: str, part: str, chosen: torch.Tensor) -> None:
        """Keep only the entries at flat positions ``chosen`` of weight ``part``, with their current values."""
        values, indices = self.values(part)[name], self.indices(part)[name]
        dense = values.detach().new_zeros(math.prod(self.shape(name, part))).index_add(0, indices, values.detach())
        chosen = chosen.to(indices.device, torch.long).sort().values
        self.indices(part)[name] = chosen
        values.data = dense[chosen].clone()  # the same Parameter, so an optimizer built earlier trains it

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(*args, **kwargs)
        for name in self.live_adapters():
            act = ACTIVATIONS[self.settings[name]["activation"]]
            x = out.to(self.down_bias[name].dtype)
            hidden = act(nn.functional.linear(x, self.weight_of(name, "down"), self.down_bias[name]))
            out = out + nn.functional.linear(hidden, self.weight_of(name, "up"), self.up_bias[name]).to(out.dtype)
        return out

    # -- checkpoint form: the kept entries only -----------------------------------------
    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.settings:
            return {}
        state: dict[str, torch.Tensor] = {}
        for part in PARTS:
            indices = self.indices(part)[name]
            # int32 positions where the matrix allows: 8 bytes per fp32 entry instead of 12.
            small = math.prod(self.shape(name, part)) < 2 ** 31
            state[f"{part}.indices"] = indices.to(torch.int32) if small else indices
            state[f"{part}.values"] = self.values(part)[name]
            state[f"{part}.bias"] = getattr(self, f"{part}_bias")[name]
        return state

    def variable_length_keys(self, name: str) -> set[str]:
        return {f"{part}.{key}" for part in PARTS for key in ("indices", "values")} if name in self.settings else set()

    def load_adapter_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        for part in PARTS:  # check every matrix before changing any
            indices, values = tensors[f"{part}.indices"], tensors[f"{part}.values"]
            size = math.prod(self.shape(name, part))
            if indices.dim() != 1 or values.shape != indices.shape:
                raise CheckpointError(f"{part}: indices {tuple(indices.shape)} and values {tuple(values.shape)} must "
                                      "be 1-D and of equal length (one value per kept entry)")
            integers = indices.dtype in (torch.int32, torch.int64)
            if not integers or (indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= size)):
                raise CheckpointError(f"{part}.indices must be integers in [0, {size}) for a {self.shape(name, part)} "
                                      "matrix; was it saved with another bottleneck width or model?")
            if indices.numel() != indices.unique().numel():
                raise CheckpointError(f"{part}.indices repeats an entry; the file is damaged")
        with torch.no_grad():
            for part in PARTS:
                indices = tensors[f"{part}.indices"].to(self.indices(part)[name].device, torch.long)
                order = indices.argsort()
                self.indices(part)[name] = indices[order]
                param = self.values(part)[name]
                param.data = tensors[f"{part}.values"].to(param.device, param.dtype)[order].clone()
                getattr(self, f"{part}_bias")[name].copy_(tensors[f"{part}.bias"])


# -- pruning at initialisation ---------------------------------------------------------------
def layers_of(model: Any, name: str) -> list[SparseAdapterLayer]:
    return [m for _, m in model._delta_modules() if isinstance(m, SparseAdapterLayer) and name in m.settings]


def is_pruned(layers: list[SparseAdapterLayer], name: str) -> bool:
    """Whether the adapter's masks are chosen (pruned here, or loaded with a checkpoint)."""
    return sum(layer.kept_entries(name) for layer in layers) < sum(layer.dense_entries(name) for layer in layers)


def kept_count(sparsity: float, total: int) -> int:
    return min(total, max(1, round((1 - sparsity) * total)))


def snip_scores(layers: list[SparseAdapterLayer], name: str, losses: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """SNIP's connection sensitivity ``|w * sum_b dL_b/dw|`` of every kept entry (order: layer by
    layer, down then up), over the losses of ``losses``. Takes only the adapter's gradients, so no
    ``.grad`` of any parameter is touched."""
    values = [layer.values(part)[name] for layer in layers for part in PARTS]
    summed = [torch.zeros_like(v) for v in values]
    count = 0
    for loss in losses:
        for total, grad in zip(summed, torch.autograd.grad(loss, values, allow_unused=True)):
            if grad is not None:
                total.add_(grad)
        count += 1
    if count == 0:
        raise PeftlabError(f"{METHOD}'s SNIP pass got no batches: the training data is empty")
    return [(v.detach() * g).abs() for v, g in zip(values, summed)]


def prune(layers: list[SparseAdapterLayer], name: str, sparsity: float, scores: list[torch.Tensor]) -> None:
    """Keep the ``1 - sparsity`` share of all kept entries of the adapter (every site together)
    with the largest ``scores`` (one per weight matrix, in the order of :func:`snip_scores`)."""
    flat = torch.cat([s.detach().float().reshape(-1) for s in scores])
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[flat.topk(kept_count(sparsity, flat.numel())).indices] = True
    offset = 0
    for layer in layers:
        for part in PARTS:
            indices = layer.indices(part)[name]
            chosen = keep[offset:offset + indices.numel()].nonzero().reshape(-1).to(indices.device)
            layer.keep(name, part, indices[chosen])  # flat positions in the matrix
            offset += indices.numel()


def data_free_scores(layers: list[SparseAdapterLayer], name: str, criterion: str) -> list[torch.Tensor]:
    values = [layer.values(part)[name].detach() for layer in layers for part in PARTS]
    if criterion == "magnitude":
        return [v.abs() for v in values]
    return [torch.rand(v.shape, device=v.device) for v in values]


def _prune_with_snip(model: Any, name: str, data: Iterable[Any] | None) -> None:
    config: SparseAdapterConfig = model.peft_configs[name]
    layers = layers_of(model, name)
    if config.criterion != "snip" or is_pruned(layers, name):
        return  # pruned when added (data-free criteria), or masks loaded with the adapter: keep them
    model.eval()  # as the reference (prune_train_mode=False): scores without dropout noise
    losses = (batch_loss(model, batch, METHOD) for batch in batches(data, METHOD, config.score_batches))
    prune(layers, name, config.sparsity, snip_scores(layers, name, losses))


def attach(model: nn.Module, name: str, config: SparseAdapterConfig, host: Any = None) -> None:
    layers = []
    for path in resolve_targets(model, config.targets, allowed_types=LINEAR_TYPES):
        layer = wrap(model, path, SparseAdapterLayer)
        layer.add(name, config)
        layers.append(layer)
    if config.criterion in DATA_FREE:  # pruned at initialisation, before any data is seen
        prune(layers, name, config.sparsity, data_free_scores(layers, name, config.criterion))


SPEC = register(MethodSpec(
    name="sparse_adapter", title="SparseAdapter", family="unified", subcategory="sparse adapter", config_cls=SparseAdapterConfig,
    trains="the kept entries (fixed mask chosen at initialisation, SNIP by default) of bottleneck adapters "
           "after the attention and FFN output projections, and their biases",
    attach=attach, paper="He et al. 2022, SparseAdapter: An Easy Approach for Improving the "
                         "Parameter-Efficiency of Adapters",
    mergeable=False, identity_at_init=False, default_lr=1e-4,
    hooks=TrainingHooks(before_training=_prune_with_snip),
))
