"""MoELoRA (Qidong Liu, Xian Wu, Xiangyu Zhao, Yuanshao Zhu, Derong Xu, Feng Tian and Yefeng Zheng, 2023,
"MOELoRA: An MOE-based Parameter Efficient Fine-Tuning Method for Multi-task Medical Applications",
arXiv 2310.18339; its v2 is retitled "When MOE Meets LLMs: Parameter Efficient Fine-tuning for Multi-task
Medical Applications", SIGIR 2024; reference code: github.com/liuqidong07/MOELoRA-peft).

Each adapted weight ``W0`` (out x in) gets ``N`` LoRA experts that split LoRA's rank ``r`` between
them (expert ``i``: ``A_i``, r/N x in, and ``B_i``, out x r/N), mixed by weights that depend on the
task ``t`` of the example alone::

    h = W0 x + (alpha / r) * sum_i w_{t,i} B_i A_i x
    w_t = softmax(W_g e_t)        e_t = E[t]: task embedding (d_T);  W_g: N x d_T (no bias)

So the trained parameters are LoRA's ``r (in + out)`` per layer plus the gate: ``E`` (num_tasks x d_T)
and ``W_g`` (N x d_T). Because ``w_t`` does not depend on the input, task ``t``'s update is one plain
LoRA of rank ``r``: with ``A = [A_1; ...; A_N]`` (r x in) and ``B = [B_1, ..., B_N]`` (out x r),
``sum_i w_{t,i} B_i A_i = (B diag(g_t)) A`` where ``g_t`` repeats ``w_{t,i}`` r/N times.
:func:`export_task_lora` writes exactly that as a LoRA adapter (HF peft's layout when saved), which
also merges, per task, into ``W0``; the MoELoRA adapter itself is not mergeable (``mergeable=False``:
a merged weight would serve one task only — export the task, then merge the export).

Storage and forward: the experts are kept concatenated along the rank, ``moelora_A`` (r x in, expert
``i`` owns rows ``i r/N ... (i+1) r/N``) and ``moelora_B`` (out x r, the same columns), so the forward is
LoRA's two GEMMs with the per-example rank gate in between: ``low = (x A^T) * g_t`` (one multiply of a
tokens x r tensor), ``h = W0 x + s low B^T``.

Task ids: ``model(..., task_ids=...)`` (an int for the whole batch, or a LongTensor/list of one id per
example: tasks may be mixed in a batch) — the method declares ``forward_kwargs=("task_ids",)`` and an
``around_forward`` hook that hands the ids to its layers for the duration of the call (removed
afterwards, also when the call raises). Ids are 0-based, in ``[0, num_tasks)``; one outside is a
PeftlabError naming it. Without ``task_ids``: with ``num_tasks == 1`` (the default: single-task use)
every example is task 0; with ``num_tasks > 1`` the forward refuses, naming the adapter. For calls
that bypass ``PeftModel.forward`` (``generate``, the base model called directly, or the recomputation
of HF gradient checkpointing during backward) wrap them in :func:`use_task_ids`.

Placement, initialisation, defaults (the paper and its reference code):
- the gate: one task embedding table and one gate for the whole model (``gate_per_layer=False``),
  as the paper's "task-motivated gate function for all MOELoRA layers" and the reference code that
  its scripts run (``MMOELoraConfigS``: ``PeftModelForCausalLMShared`` computes the expert weights
  once and every ``MMOELoraLinearS`` reads them). ``gate_per_layer=True`` gives each layer its own
  table and gate, as the reference's other layer (``MMOELoraLinear``) does;
- ``E`` drawn N(0, 1) (``nn.Embedding``'s default), ``W_g`` as ``nn.Linear``'s default
  (Kaiming-uniform, ``a = sqrt(5)``), ``A_i`` N(0, 0.01^2), ``B_i = 0`` (identity at init), all as the
  reference's ``reset_lora_parameters``;
- scale ``alpha / r`` with ``r`` the total rank (the reference's ``scaling``); ``num_experts = 4`` and
  ``task_embedding_dim = 64`` (the reference's argument defaults; its medical script uses 8 experts
  and r = 16); ``r`` must be a multiple of ``num_experts`` (the reference asserts it);
- targets: the attention query and value (``@query``, ``@value``), the reference's argument default
  (``q_proj,v_proj``); its ChatGLM script adapts every linear layer (``targets="all-linear"``).

Deviations, and why:
- ``alpha = 16`` (scale 2 at r = 8) and ``dropout = 0``, peftlab's LoRA defaults, where the reference
  defaults to ``alpha = 32`` and dropout 0.1: the learning rates peftlab uses were measured at LoRA's
  scale. Pass ``alpha=32, dropout=0.1`` for the reference's.
- Task ids are 0-based with ``num_tasks`` rows in ``E``; the reference numbers its tasks from 1 and
  keeps a row 0 that only its multi-hot ("department") input uses as padding. That multi-hot input
  (the mean of several task embeddings) is not implemented: one task per example.
- ``num_tasks`` defaults to 1 (the reference: 16, its dataset's count), so the adapter works as a
  single-task method without task ids (the study, the conformance suite). Set it to your task count.
- Linear and GPT-2 Conv1D layers (the reference: Linear and Conv1D too); no embeddings.
- Saved in peftlab's own form (HF peft has no MoELoRA): per layer ``moelora_A`` / ``moelora_B``, and
  ``moelora_task_embedding`` / ``moelora_gate`` once per model (per layer with ``gate_per_layer``).
- No mixed-adapter batches (``adapter_names=``); mixed *tasks* in a batch are served by ``task_ids``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import PeftConfig, peft_names
from ...core.errors import PeftlabError
from ...core.inject import delta_modules, wrap
from ...core.layer import DeltaModule, TrainableCopy, base_of, linear_io
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, logical_name, resolve_targets
from .lora import LoraConfig, LoraLayer

_KEY = "moelora"  # the model-level module holding the shared gates, in ``PeftModel.model_adapters``
_BASE = "base_model."


@peft_names(lora_alpha="alpha", target_modules="targets", lora_dropout="dropout", expert_num="num_experts",
            task_num="num_tasks")
@dataclasses.dataclass(frozen=True)
class MoELoraConfig(PeftConfig):
    """r: total rank, split evenly over ``num_experts`` experts (r/N each); alpha: scale numerator
    (scale alpha/r); dropout: on the experts' input; num_tasks: task ids 0..num_tasks-1 (1: no ids
    needed); task_embedding_dim: d_T of the task embedding; gate_per_layer: one embedding table and
    gate per layer instead of one for the model. The reference's names ``expert_num``, ``task_num``
    (and peft's ``lora_alpha``, ``lora_dropout``, ``target_modules``) are accepted too."""

    targets: tuple[str, ...] | str | None = ("@query", "@value")
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    num_experts: int = 4
    num_tasks: int = 1
    task_embedding_dim: int = 64
    gate_per_layer: bool = False

    def validate(self) -> None:
        self._require(self.r > 0, "r", "a positive integer rank such as 8 (split over num_experts)")
        self._require(self.num_experts > 0, "num_experts", "a positive integer such as 4")
        if self.r % self.num_experts:
            raise PeftlabError(f"MoELoraConfig.r={self.r} is not a multiple of num_experts={self.num_experts}: the "
                               f"rank is split evenly over the experts (r/num_experts each); choose r among "
                               f"{[self.num_experts * k for k in range(1, 5)]} or num_experts among "
                               f"{[d for d in range(1, self.r + 1) if self.r % d == 0]}")
        self._require(self.num_tasks > 0, "num_tasks", "a positive integer: the number of tasks (1: single task)")
        self._require(self.task_embedding_dim > 0, "task_embedding_dim", "a positive integer such as 64")
        self._require(self.alpha > 0, "alpha", "a positive number (often 2*r)")
        self._require(0.0 <= self.dropout < 1.0, "dropout", "a probability in [0, 1)")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def gate_weights(embedding: torch.Tensor, gate: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """``softmax(W_g E[t])`` for each id in ``task_ids``: shape ``task_ids.shape + (N,)``. The only
    input is the task id (``embedding``: num_tasks x d_T, ``gate``: N x d_T)."""
    return torch.softmax(F.linear(F.embedding(task_ids, embedding), gate), dim=-1)


def _new_gate(config: MoELoraConfig, like: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    kw = {"device": like.device, "dtype": like.dtype if like.is_floating_point() else torch.float32}
    embedding = torch.randn(config.num_tasks, config.task_embedding_dim, **kw)  # nn.Embedding's init
    gate = torch.empty(config.num_experts, config.task_embedding_dim, **kw)
    nn.init.kaiming_uniform_(gate, a=math.sqrt(5))  # nn.Linear's init
    return nn.Parameter(embedding), nn.Parameter(gate)


class MoELoraGates(DeltaModule):
    """Model-level: each shared-gate adapter's task embedding table ``E`` and gate ``W_g``."""

    adapter_attrs = ("moelora_task_embedding", "moelora_gate")

    def __init__(self) -> None:
        super().__init__()
        self.moelora_task_embedding = nn.ParameterDict()
        self.moelora_gate = nn.ParameterDict()

    def add(self, name: str, config: MoELoraConfig, like: torch.Tensor) -> None:
        self.moelora_task_embedding[name], self.moelora_gate[name] = _new_gate(config, like)

    def merge(self, name: str) -> None:  # never reached (mergeable=False); nothing of ours is in W0
        raise NotImplementedError("MoELoRA merges per task: export_task_lora(...), then merge the export")


class MoELoraLayer(DeltaModule):
    """Wraps a Linear/Conv1D; adds ``(alpha/r) ((x A^T) * g_t) B^T`` per live adapter, ``g_t`` the
    task's expert weights repeated over each expert's r/N ranks."""

    adapter_attrs = ("moelora_A", "moelora_B", "moelora_task_embedding", "moelora_gate", "moelora_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.moelora_A, self.moelora_B = nn.ParameterDict(), nn.ParameterDict()
        # Only with gate_per_layer: this layer's own E and W_g.
        self.moelora_task_embedding, self.moelora_gate = nn.ParameterDict(), nn.ParameterDict()
        self.moelora_dropout = nn.ModuleDict()
        self.in_features, self.out_features, self.transposed = linear_io(base_layer)
        self.shared: dict[str, MoELoraGates] = {}  # adapter -> model-level gates (not our child)
        self.num_experts: dict[str, int] = {}
        # Adapter -> the task ids of the call in progress (set by use_task_ids; absent outside one).
        self.task_ids: dict[str, torch.Tensor] = {}

    def add(self, name: str, config: MoELoraConfig, shared: MoELoraGates | None) -> None:
        weight = base_of(self.base_layer).weight
        kw = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        self.moelora_A[name] = nn.Parameter(torch.randn(config.r, self.in_features, **kw) * 0.01)
        self.moelora_B[name] = nn.Parameter(torch.zeros(self.out_features, config.r, **kw))
        if shared is None:
            self.moelora_task_embedding[name], self.moelora_gate[name] = _new_gate(config, weight)
        else:
            self.shared[name] = shared
        if config.dropout > 0:
            self.moelora_dropout[name] = nn.Dropout(config.dropout)
        self.settings[name] = (config.scaling, config.num_tasks)
        self.num_experts[name] = config.num_experts

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.shared.pop(name, None)
        self.num_experts.pop(name, None)
        self.task_ids.pop(name, None)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {k: v for k, v in super().adapter_state(name).items() if not k.startswith("moelora_dropout")}

    def gate_params(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(E: num_tasks x d_T, W_g: N x d_T) that this layer's adapter ``name`` reads."""
        owner = self.shared.get(name, self)
        return owner.moelora_task_embedding[name], owner.moelora_gate[name]

    def expert_weights(self, name: str, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The gate's output for ``task_ids`` (default: the call's, else task 0 where num_tasks is 1):
        ``(N,)`` for one id, ``(batch, N)`` for one per example."""
        if task_ids is None:
            task_ids = self.task_ids.get(name)
        if task_ids is None:
            num_tasks = self.settings[name][1]
            if num_tasks > 1:
                raise PeftlabError(f"MoELoRA adapter {name!r} has num_tasks={num_tasks}: pass the task of each "
                                   "example, model(..., task_ids=...) (an int, or a LongTensor with one id per "
                                   "example); for generate() or a direct call wrap it in use_task_ids(model, ids)")
            task_ids = torch.zeros((), dtype=torch.long)
        embedding, gate = self.gate_params(name)
        return gate_weights(embedding, gate, task_ids.to(embedding.device, torch.long))

    def rank_gate(self, name: str, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``g_t``: each expert's weight repeated over its r/N ranks, ``(r,)`` or ``(batch, r)``."""
        r = self.moelora_A[name].shape[0]
        return self.expert_weights(name, task_ids).repeat_interleave(r // self.num_experts[name], dim=-1)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        for name in self.live_adapters():
            a, b = self.moelora_A[name], self.moelora_B[name]
            g = self.rank_gate(name)
            if g.dim() == 2:  # one task per example: examples along dim 0, as HF models lay them out
                if x.dim() < 2 or x.shape[0] != g.shape[0]:
                    raise PeftlabError(f"task_ids has {g.shape[0]} entries but a MoELoRA layer got input of shape "
                                       f"{tuple(x.shape)} (examples along dim 0); give one task id per example, "
                                       "or one int for the whole batch")
                g = g.view(g.shape[0], *[1] * (x.dim() - 2), g.shape[1])
            h = self.moelora_dropout[name](x) if name in self.moelora_dropout else x
            low = F.linear(h.to(a.dtype), a) * g.to(a.dtype)
            out = out + (F.linear(low, b) * self.settings[name][0]).to(out.dtype)
        return out

    def task_delta_weight(self, name: str, task_id: int) -> torch.Tensor:
        """Task ``task_id``'s ``(alpha/r) sum_i w_i B_i A_i`` laid out like the base weight."""
        g = self.rank_gate(name, torch.tensor(task_id))
        delta = (self.moelora_B[name] * g) @ self.moelora_A[name] * self.settings[name][0]
        return delta.T if self.transposed else delta


# -- task ids through the model's forward ------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_task_ids(value: Any, num_tasks: int, adapter: str) -> torch.Tensor:
    """``value`` (int, sequence of ints, integer tensor of 0 or 1 dims) as a long tensor, range-checked."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool or value.dim() > 1:
            raise PeftlabError(f"task_ids={value!r}: expected an int or a 1-D integer tensor (one id per example), "
                               f"got a {value.dim()}-D {value.dtype} tensor")
        ids = value.long()
    elif not (_is_int(value) or (isinstance(value, (list, tuple)) and all(_is_int(v) for v in value))):
        raise PeftlabError(f"task_ids={value!r}: expected an int or a list/LongTensor of ints (one per example)")
    else:
        ids = torch.tensor(value, dtype=torch.long)
    if torch.compiler.is_compiling():  # the check reads the values: a traced graph cannot
        return ids
    bad = ids[(ids < 0) | (ids >= num_tasks)]
    if bad.numel():
        raise PeftlabError(f"task_ids holds {sorted(set(bad.tolist()))}, outside MoELoRA adapter {adapter!r}'s range "
                           f"[0, {num_tasks}) (num_tasks={num_tasks}, ids are 0-based); use ids below {num_tasks} "
                           "or build the adapter with a larger num_tasks")
    return ids


def _layers(model: Any, adapter: str) -> list[tuple[str, MoELoraLayer]]:
    return [(path, m) for path, m in delta_modules(model) if isinstance(m, MoELoraLayer) and adapter in m.moelora_A]


def _moelora_config(model: Any, adapter: str | None) -> tuple[str, MoELoraConfig]:
    configs = getattr(model, "peft_configs", None)
    if configs is None:
        raise PeftlabError(f"expected a PeftModel (get_peft_model(...)), got {type(model).__name__}")
    if adapter is None:
        active = [n for n in model.active_adapters if isinstance(configs[n], MoELoraConfig)]
        if len(active) != 1:
            raise PeftlabError(f"name the MoELoRA adapter: the active MoELoRA adapters are {active} "
                               f"(adapters: {sorted(configs)})")
        adapter = active[0]
    config = configs.get(adapter)
    if not isinstance(config, MoELoraConfig):
        found = type(config).__name__ if config is not None else "no such adapter"
        raise PeftlabError(f"adapter {adapter!r} is not a MoELoRA adapter ({found}); adapters: {sorted(configs)}")
    return adapter, config


@contextlib.contextmanager
def use_task_ids(model: Any, task_ids: Any, adapter_name: str | None = None) -> Iterator[None]:
    """Within the block, MoELoRA adapter ``adapter_name`` (default: the active one) of ``model`` (a
    PeftModel) computes with ``task_ids`` (an int, or one id per example): for ``generate()`` and other
    calls that do not go through ``model(..., task_ids=...)``. The previous ids come back afterwards."""
    adapter, config = _moelora_config(model, adapter_name)
    ids = _check_task_ids(task_ids, config.num_tasks, adapter) if task_ids is not None else None
    layers = [m for _, m in _layers(model, adapter)]
    if ids is not None and layers:  # once per call, not once per layer
        ids = ids.to(layers[0].moelora_A[adapter].device)
    previous = [m.task_ids.get(adapter) for m in layers]
    for m in layers:
        if ids is None:
            m.task_ids.pop(adapter, None)
        else:
            m.task_ids[adapter] = ids
    try:
        yield
    finally:
        for m, before in zip(layers, previous):
            if before is None:
                m.task_ids.pop(adapter, None)
            else:
                m.task_ids[adapter] = before


def _around_forward(host: Any, adapter_name: str, forward: Any, args: tuple, kwargs: dict, extra: dict) -> Any:
    task_ids = extra.get("task_ids")
    config = host.peft_configs[adapter_name]
    if task_ids is None and config.num_tasks > 1:
        raise PeftlabError(f"MoELoRA adapter {adapter_name!r} has num_tasks={config.num_tasks}: pass the task of each "
                           "example, model(..., task_ids=...) (an int, or a LongTensor with one id per example)")
    with use_task_ids(host, task_ids, adapter_name):
        return forward(*args, **kwargs)


# -- a task's mixture as a plain LoRA adapter ----------------------------------------------------------

def export_task_lora(model: Any, adapter_name: str, task_id: int, new_name: str) -> LoraConfig:
    """Add LoRA adapter ``new_name`` to ``model`` (a PeftModel) equal to MoELoRA adapter ``adapter_name``
    for task ``task_id``: per layer ``A = [A_1; ...; A_N]``, ``B = [w_1 B_1, ..., w_N B_N]`` with ``w``
    the gate's output for the task, rank r and scale alpha/r as the MoELoRA adapter, so
    ``(alpha/r) B A = (alpha/r) sum_i w_i B_i A_i`` exactly. Trained module copies (``modules_to_save``,
    a head) are copied over. The new adapter is added inactive (``set_adapter(new_name)`` to use it);
    it saves in HF peft's LoRA layout and merges like any LoRA adapter. Returns its config.
    Raises PeftlabError, adding nothing, for an adapter that is not MoELoRA or a task id out of range."""
    adapter, config = _moelora_config(model, adapter_name)
    if isinstance(task_id, torch.Tensor) and task_id.numel() == 1:
        task_id = int(task_id)
    if isinstance(task_id, bool) or not isinstance(task_id, int):
        raise PeftlabError(f"export_task_lora: task_id={task_id!r}: expected one int in [0, {config.num_tasks})")
    _check_task_ids(task_id, config.num_tasks, adapter)
    layers = {logical_name(path[len(_BASE):]): m for path, m in _layers(model, adapter) if path.startswith(_BASE)}
    lora = LoraConfig(targets=tuple(layers), r=config.r, alpha=config.alpha, dropout=config.dropout,
                      modules_to_save=config.modules_to_save, task_type=config.task_type)
    model.add_adapter(new_name, lora)
    try:
        with torch.no_grad():
            written = set()
            for path, module in delta_modules(model):
                if isinstance(module, LoraLayer) and new_name in module.lora_A:
                    source = layers[logical_name(path[len(_BASE):])]
                    module.lora_A[new_name].weight.copy_(source.moelora_A[adapter])
                    g = source.rank_gate(adapter, torch.tensor(task_id))
                    module.lora_B[new_name].weight.copy_(source.moelora_B[adapter] * g)
                    written.add(logical_name(path[len(_BASE):]))
                elif isinstance(module, TrainableCopy) and new_name in module.copies and adapter in module.copies:
                    module.copies[new_name].load_state_dict(module.copies[adapter].state_dict())
            if written != set(layers):
                raise PeftlabError(f"export_task_lora: the LoRA adapter landed on {sorted(written)}, not on the "
                                   f"MoELoRA layers {sorted(layers)}")
    except BaseException:
        model.delete_adapter(new_name)
        raise
    return lora


def attach(model: nn.Module, name: str, config: MoELoraConfig, host: Any = None) -> None:
    paths = resolve_targets(model, config.targets, allowed_types=LINEAR_TYPES)
    shared = None
    if not config.gate_per_layer:
        if host is None:
            raise PeftlabError("MoELoRA keeps a model-level gate: apply it with get_peft_model (or set "
                               "gate_per_layer=True)")
        shared = host.model_adapters[_KEY] if _KEY in host.model_adapters else MoELoraGates()
        host.model_adapters[_KEY] = shared
        shared.add(name, config, base_of(model.get_submodule(paths[0])).weight)
    for path in paths:
        wrap(model, path, MoELoraLayer).add(name, config, shared)


SPEC = register(MethodSpec(
    name="moelora", title="MOELoRA", family="reparameterized", subcategory="LoRA derivative", config_cls=MoELoraConfig,
    trains="N low-rank experts per layer (rank r split over them) mixed by a task-conditioned softmax gate",
    attach=attach,
    paper="Liu et al. 2023, MOELoRA: An MOE-based Parameter Efficient Fine-Tuning Method for Multi-task "
          "Medical Applications",
    mergeable=False, default_lr=5e-4, around_forward=_around_forward, forward_kwargs=("task_ids",),
))
