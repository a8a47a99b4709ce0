"""Sparse differences to pretrained tensors, shared by the partial methods that train a chosen
subset of entries (FISH Mask, LT-SFT, diff pruning, SAM). Not a method itself.

Update rule, per wrapped module and part (weight, bias)::

    W = W0 + scatter(indices, values)       indices: flat positions (frozen), values: trained

Only the chosen entries exist as parameters, so the optimizer keeps state for them alone: the
memory these methods save over full fine-tuning (the backward pass still forms each targeted
tensor's dense gradient, one layer at a time, and keeps only the chosen entries of it).

A method chooses its entries in its data pass (``before_training``) and calls :func:`assign` or
:func:`select_top`. The values tensors are resized in place, keeping the same ``nn.Parameter``
objects, so an optimizer built before ``begin_training`` (HF Trainer, peftlab's loop) trains them;
under DDP/FSDP, which record parameter sizes when wrapping, call ``begin_training`` first.

Checkpoint per module and part: ``delta_<part>.indices`` (flat, increasing; int32 below 2^31 entries) and
``delta_<part>.values`` — Child-Tuning's layout — plus ``delta_<part>.base_norm``, the 2-norm of the
base tensor at those entries, which loading compares with the model's own: a sparse difference
applied to another base model (or added to a difference made for one) is refused.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ...core.errors import CheckpointError, PeftlabError
from ...core.inject import wrap
from ...core.layer import BufferDict, DeltaModule, base_of
from ...core.targets import resolve_targets

PARTS = ("weight", "bias")


class SparseDeltaLayer(DeltaModule):
    """Wraps any module with a weight (and bias): Linear, Conv1D, Embedding, LayerNorm, RMSNorm."""

    adapter_attrs = ("values_weight", "values_bias")
    frozen_attrs = ("indices_weight", "indices_bias")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.values_weight, self.values_bias = nn.ParameterDict(), nn.ParameterDict()
        self.indices_weight, self.indices_bias = BufferDict(), BufferDict()
        # The wrapped module's own tensors and their names relative to base_layer (another wrapper
        # may sit in between), for functional_call.
        inner, prefix = base_layer, ""
        while isinstance(inner, DeltaModule) and "base_layer" in inner._modules:
            inner, prefix = inner.base_layer, prefix + "base_layer."
        self.paths = {part: prefix + part for part in PARTS if isinstance(getattr(inner, part, None), nn.Parameter)}
        self.inner = [inner]  # a list: not registered twice as a submodule

    def base_tensor(self, part: str) -> nn.Parameter:
        return getattr(self.inner[0], part)

    def values(self, part: str) -> nn.ParameterDict:
        return getattr(self, f"values_{part}")

    def indices(self, part: str) -> BufferDict:
        return getattr(self, f"indices_{part}")

    def add(self, name: str) -> None:
        for part in self.paths:
            base = self.base_tensor(part)
            self.values(part)[name] = nn.Parameter(base.new_zeros(0))  # no entries until chosen
            self.indices(part)[name] = torch.zeros(0, dtype=torch.long, device=base.device)

    def set_entries(self, name: str, part: str, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Make ``indices`` (flat positions) the entries adapter ``name`` trains in ``part``,
        starting from ``values`` (zeros: the base tensor). Keeps the Parameter object."""
        base = self.base_tensor(part)
        indices = indices.to(base.device, torch.long).reshape(-1)
        order = indices.argsort()
        self.indices(part)[name] = indices[order]
        start = base.new_zeros(indices.numel()) if values is None else values.reshape(-1)[order].to(base)
        self.values(part)[name].data = start

    def dense_entries(self, name: str) -> int:
        return sum(self.base_tensor(part).numel() for part in self.paths if name in self.values(part))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        live = [n for n in self.live_adapters() if any(self.indices(p)[n].numel() for p in self.paths)]
        if not live:
            return self.base_layer(*args, **kwargs)
        weights = {}
        for part, path in self.paths.items():
            base = self.base_tensor(part)
            flat = base.reshape(-1)
            for name in live:
                if self.indices(part)[name].numel():
                    flat = flat.index_add(0, self.indices(part)[name], self.values(part)[name].to(flat.dtype))
            weights[path] = flat.view_as(base)
        return torch.func.functional_call(self.base_layer, weights, args, kwargs)

    def _add_delta(self, name: str, sign: int) -> None:
        with torch.no_grad():
            for part in self.paths:
                base = self.base_tensor(part)
                base.view(-1).index_add_(0, self.indices(part)[name], self.values(part)[name].to(base.dtype),
                                         alpha=sign)

    # -- checkpoint form -------------------------------------------------------------------
    def _base_norm(self, part: str, indices: torch.Tensor) -> torch.Tensor:
        return self.base_tensor(part).detach().reshape(-1)[indices.to(torch.long)].double().norm()

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for part in self.paths:
            if name in self.values(part):
                indices = self.indices(part)[name]
                # int32 positions where the tensor allows: 8 bytes per fp32 entry instead of 12.
                small = self.base_tensor(part).numel() < 2 ** 31
                state[f"delta_{part}.indices"] = indices.to(torch.int32) if small else indices
                state[f"delta_{part}.values"] = self.values(part)[name]
                state[f"delta_{part}.base_norm"] = self._base_norm(part, indices)
        return state

    def variable_length_keys(self, name: str) -> set[str]:
        return {f"delta_{part}.{key}" for part in self.paths for key in ("indices", "values")}

    def load_adapter_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        checked = {}
        for part in self.paths:  # check every part before changing any
            indices, values = tensors[f"delta_{part}.indices"], tensors[f"delta_{part}.values"]
            size = self.base_tensor(part).numel()
            if indices.dim() != 1 or values.shape != indices.shape:
                raise CheckpointError(f"delta_{part}: indices {tuple(indices.shape)} and values {tuple(values.shape)} "
                                      "must be 1-D and of equal length")
            if indices.is_floating_point() or (indices.numel() and (indices.min() < 0 or indices.max() >= size)):
                raise CheckpointError(f"delta_{part}.indices must be integers in [0, {size}) for a tensor of shape "
                                      f"{tuple(self.base_tensor(part).shape)}; was it saved for another model?")
            if indices.numel() != indices.unique().numel():
                raise CheckpointError(f"delta_{part}.indices repeats an entry; the file is damaged")
            saved, own = float(tensors[f"delta_{part}.base_norm"]), float(self._base_norm(part, indices))
            tolerance = 1e-2 if self.base_tensor(part).element_size() < 4 else 1e-5
            if not math.isclose(saved, own, rel_tol=tolerance, abs_tol=1e-6):
                raise CheckpointError(
                    f"delta_{part}: this sparse difference was made for another base model (the base entries it "
                    f"changes have norm {saved:.6g} there, {own:.6g} here); apply it to the model it was trained on")
            checked[part] = (indices, values)
        for part, (indices, values) in checked.items():
            self.set_entries(name, part, indices, values)


# -- what methods build on --------------------------------------------------------------------
def attach_sparse(model: nn.Module, name: str, targets: Any, method: str) -> None:
    """Wrap every module ``targets`` selects in a :class:`SparseDeltaLayer` holding adapter ``name``."""
    paths = resolve_targets(model, targets)
    owners: dict[int, list[str]] = {}  # a tensor shared by several modules (tied embeddings)
    for path, module in model.named_modules(remove_duplicate=False):
        for part in PARTS:
            tensor = getattr(module, part, None)
            if isinstance(tensor, nn.Parameter) and not isinstance(module, DeltaModule):
                owners.setdefault(id(tensor), []).append(path)
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(getattr(module, "weight", None), (nn.Parameter, torch.Tensor)):
            raise PeftlabError(f"{method} target {path!r} has no weight to update; target layers with weights")
        shared = [p for p in owners.get(id(base_of(module).weight), []) if p != path and not p.startswith(path + ".")]
        if shared:
            raise PeftlabError(f"{method} target {path!r} shares its weight with {shared} (tied embeddings): a "
                               "difference kept beside the weight would reach only one of them. Leave it out of targets")
    for path in paths:
        wrap(model, path, SparseDeltaLayer).add(name)


def entries(model: Any, name: str) -> list[tuple[SparseDeltaLayer, str]]:
    """(layer, part) of every tensor adapter ``name`` may change, in model order."""
    return [(m, part) for _, m in model._delta_modules()
            if isinstance(m, SparseDeltaLayer) and name in m.adapter_names() for part in m.paths]


def is_chosen(model: Any, name: str) -> bool:
    """Whether the adapter's entries are chosen (by its data pass, or loaded with it)."""
    return any(layer.indices(part)[name].numel() for layer, part in entries(model, name))


def count_of(share: float, total: int) -> int:
    return max(1, math.ceil(share * total))


def entry_budget(model: Any, name: str, method: str) -> int:
    """K of a config with ``keep_ratio`` and ``num_entries`` (which wins), checked against the
    targets' size before a long first phase runs."""
    config = model.peft_configs[name]
    total = sum(t.numel() for t in base_tensors(model, name))
    k = config.num_entries if config.num_entries is not None else count_of(config.keep_ratio, total)
    if k > total:
        raise PeftlabError(f"{method}: num_entries={k} but the targets hold {total} entries; choose K <= {total}")
    return k


def select_top(model: Any, name: str, scores: list[torch.Tensor], k: int, method: str,
               start: list[torch.Tensor] | None = None) -> None:
    """Give adapter ``name`` the ``k`` entries with the largest score across all its tensors
    together (``scores`` in the order of :func:`entries`), starting from ``start`` (else zero)."""
    targets = entries(model, name)
    total = sum(s.numel() for s in scores)
    if not 0 < k <= total:
        raise PeftlabError(f"{method}: {k} entries to train, but the targets hold {total}; choose between 1 and {total}")
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores])
    keep = torch.zeros(total, dtype=torch.bool, device=flat.device)
    keep[flat.topk(k).indices] = True
    offset = 0
    for i, ((layer, part), score) in enumerate(zip(targets, scores)):
        chosen = keep[offset:offset + score.numel()].nonzero().reshape(-1)
        offset += score.numel()
        values = start[i].detach().reshape(-1)[chosen.to(start[i].device)] if start is not None else None
        layer.set_entries(name, part, chosen, values)


def batches(data: Iterable[Any] | None, method: str, limit: int | None = None, cycle: bool = False) -> Iterator[Any]:
    """The batches of a data pass: ``limit`` of them (cycling over ``data`` when ``cycle``), or
    one pass; no data or an empty loader is an error naming the method."""
    if data is None:
        raise PeftlabError(f"{method} makes a pass over the training data before training: call "
                           "model.begin_training(<training DataLoader>, total_steps, learning_rate)")
    count = 0
    while True:
        got = False
        for batch in data:
            if limit is not None and count >= limit:
                return
            got = True
            count += 1
            yield batch
        if not got and count == 0:
            raise PeftlabError(f"{method}'s data pass got no batches: the training data is empty")
        if not cycle or not got or limit is None:
            return


def batch_loss(model: Any, batch: Any, method: str) -> torch.Tensor:
    loss = getattr(model(**batch), "loss", None)
    if loss is None:
        raise PeftlabError(f"{method}'s data pass needs the training loss: the batches must carry labels")
    return loss


def examples(batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The examples of a batch one by one (every tensor sliced along dim 0), for per-example gradients."""
    size = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
    for i in range(size):
        yield {k: v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == size else v
               for k, v in batch.items()}


def base_tensors(model: Any, name: str) -> list[nn.Parameter]:
    return [layer.base_tensor(part) for layer, part in entries(model, name)]


def train_phase(model: Any, params: list[torch.Tensor], data: Iterable[Any], steps: int, lr: float, method: str,
                loss_term: Callable[[], torch.Tensor] | None = None,
                after_step: Callable[[], None] | None = None) -> None:
    """A training phase inside a data pass: AdamW on ``params`` for ``steps`` batches (cycling over
    ``data``), the rate decaying linearly to zero, as a fine-tuning run would. Leaves no ``.grad``."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / steps))
    model.train()
    for batch in itertools.islice(batches(data, method, steps, cycle=True), steps):
        loss = batch_loss(model, batch, method)
        if loss_term is not None:
            loss = loss + loss_term()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
    for p in params:
        p.grad = None


def learning_rate(model: Any, configured: float | None, method: str) -> float:
    """The rate of a phase trained in a data pass: the config's, else the run's."""
    lr = configured if configured is not None else model.training_state.learning_rate
    if lr is None:
        raise PeftlabError(f"{method} trains a phase in its data pass and needs a learning rate: pass "
                           "model.begin_training(loader, total_steps, learning_rate=...) or set it in the config")
    return lr


def combine_sparse(model: Any, adapters: list[str], weights: list[float], new_name: str, combination_type: str,
                   **options: Any) -> None:
    """``"linear"``: adapter ``new_name`` = ``sum_i w_i d_i``, the sparse differences added entry by
    entry (on the union of their entries and targets). With weights 1 this is applying them one after
    the other, as composing a language and a task difference does (LT-SFT)."""
    from ...core.targets import logical_name

    if options:
        raise PeftlabError(f"option(s) {sorted(options)} do not apply to adding sparse differences; remove them")
    configs = [model.peft_configs[n] for n in adapters]
    heads = {n: list(c.modules_to_save) for n, c in zip(adapters, configs) if c.modules_to_save}
    if heads:
        raise PeftlabError(f"adapters {heads} train full copies of modules (modules_to_save), which cannot be added "
                           "entry by entry; stack the adapters instead: model.set_adapter([...])")
    empty = [n for n in adapters if not is_chosen(model, n)]
    if empty:
        raise PeftlabError(f"adapters {empty} have no entries yet (their data pass has not run): train or load them first")
    paths = [logical_name(path).removeprefix("base_model.")
             for path, m in model._delta_modules()
             if isinstance(m, SparseDeltaLayer) and any(n in m.adapter_names() for n in adapters)]
    model.add_adapter(new_name, configs[0].replace(targets=tuple(paths)))
    with torch.no_grad():
        for layer, part in entries(model, new_name):
            parts = [(layer.indices(part)[n], w * layer.values(part)[n].detach())
                     for n, w in zip(adapters, weights) if n in layer.values(part)]
            indices = torch.cat([i for i, _ in parts])
            summed = torch.zeros(layer.base_tensor(part).numel(), device=indices.device,
                                 dtype=layer.values(part)[new_name].dtype)
            summed.index_add_(0, indices, torch.cat([v for _, v in parts]).to(summed.dtype))
            union = indices.unique()
            layer.set_entries(new_name, part, union, summed[union])
