"""L-LoRA: linearised LoRA (Tang, Shen, Luo, Zhan, Hu, Du, Chen and Tao, 2023, "Parameter Efficient
Multi-task Model Fusion with Partial Linearization", ICLR 2024).

Each LoRA module is replaced by its first-order Taylor expansion around its initial parameters
``phi0 = (A0, B0)``, fine-tuned per task, and the tasks are merged by task arithmetic. A LoRA layer
computes ``f(x; A, B) = W0 x + s B A x`` (``s = alpha / r``); its linearisation is::

    f_lin(x; A, B) = f(x; phi0) + J_phi f(x; phi0) (phi - phi0)
                   = W0 x + s [B0 A0 + (B - B0) A0 + B0 (A - A0)] x
                   = W0 x + s [B A0 + B0 (A - A0)] x                       (computed as this)

which is exactly linear in ``phi - phi0`` ("fine-tuning in the tangent space"). Task arithmetic on
such adapters (same ``phi0``, task vectors ``tau_t = phi_t - phi0``)::

    phi_merged = phi0 + sum_t lambda_t tau_t
    => dW(phi_merged) - dW(phi0) = sum_t lambda_t (dW(phi_t) - dW(phi0))   in every layer, exactly

(``dW(phi0) = s B0 A0``, zero with the default ``B0 = 0``). Plain LoRA has no such property: its
weight change ``s B A`` is bilinear, so summed task vectors bring cross terms ``s dB_i dA_j`` between
tasks (and ``lambda^2`` on each task's own product), the interference the paper sets out to remove.

What is linearised, following the reference code (``tanganke/peta``: ``finetune_lm.py``,
``finetune_clip.py``; ``fusion_bench``: ``linearize_lora_model_``): each LoRA *module* separately —
every peft ``LoraLayer`` is wrapped in ``LinearizedModelWraper``, which runs
``torch.func.jvp(functional_call(module, ...), params0, params - params0)`` and returns
``out + dp``. The whole network is therefore not linear in ``phi`` (the nonlinear layers between the
LoRA modules stay); each adapted layer's weight change is. Since a LoRA module is linear in ``x``,
its linearisation is a linear map of ``x`` too, so an L-LoRA adapter merges into the base weight
exactly: ``W0 + s [B A0 + B0 (A - A0)]``.

Initialisation, as the reference: peft's LoRA default, ``A0`` Kaiming-uniform, ``B0 = 0``. With
``B0 = 0`` the first-order term in ``A`` vanishes: ``f_lin = W0 x + s B A0 x``, the gradient of ``A``
is exactly zero, and the trained function is ``B`` in the fixed random row space of ``A0`` (the
function class of LoRA-FA). The reference keeps ``A`` trainable all the same (it gets zero
gradients; only an optimiser's weight decay moves it, with no effect on the output); so does this file, so
that ``phi`` and the task vectors are the reference's (A, B) pairs. ``B0`` is kept as adapter state
so that the expansion is the general one above (``B0 != 0`` is reachable by loading one).

Task arithmetic needs one ``phi0`` for all tasks: the reference seeds the global RNG (42) before
adding the adapter. Here ``init_seed`` (default 42) draws each layer's ``A0`` on the CPU from a
generator seeded by the seed and the layer's name, so every adapter made with the same seed on the
same architecture shares ``phi0`` (``None``: the global RNG, as LoRA). ``phi0`` is stored in the
checkpoint (``lora_A0``, ``lora_B0`` beside ``lora_A.weight``, ``lora_B.weight``), not regenerated:
a loaded adapter reproduces its outputs exactly whatever the torch version's RNG, and a merged
adapter keeps the ``phi0`` of its tasks. Merging tasks: ``model.add_weighted_adapter(tasks,
[lam] * n, "merged", combination_type="task_arithmetic")`` (the reference code uses one ``lambda``
for all tasks and scores a grid of 21 values in [0, 1] on validation data); it refuses adapters with
different ``phi0``.

Placement and defaults: peftlab's LoRA (attention query and value, ``r = 8``, ``alpha = 16``, no
dropout; Linear and GPT-2 Conv1D layers). Dropout, when set, masks ``x`` once for both terms, as the
jvp through a module whose dropout sits on its input does.

Deviations, and why:
- The forward computes the jvp in closed form (the formula above: one down-projection by
  ``[A0; A - A0]``, one up-projection by ``[B, B0]``) rather than through ``torch.func.jvp`` over
  ``functional_call``: a LoRA module is bilinear in ``(A, B)``, so the two are the same numbers
  (the tests check it against ``torch.func.jvp``) and this costs two rank-2r GEMMs per layer instead
  of a forward-mode pass through the module including its frozen full-width weight.
- The reference's configs (r = 16, alpha = 32, dropout 0.1, targets ``q_proj`` and a misspelt
  ``v_porj``, i.e. query only) are not the defaults: peftlab's LoRA defaults are, as for every
  LoRA-derived method here, so L-LoRA and LoRA compare at the same settings.
- Embedding targets are refused: peft's embedding LoRA starts with ``A = 0`` and ``B`` random, and
  the reference linearises Linear LoRA layers only.
- Mixed batches (one adapter per example) are not served, as for LoRA's other variants.
- Checkpoints are peftlab's own form (HF peft has no L-LoRA, and the fusion_bench file layout
  ``linearized_adapter_model.safetensors`` holds peft-internal parameter names).
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import peft_names
from ...core.errors import PeftlabError
from ...core.inject import wrap
from ...core.layer import BufferDict
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, logical_name, resolve_targets
from . import lora


@peft_names(**lora.LoraConfig.peft_aliases)
@dataclasses.dataclass(frozen=True)
class LLoraConfig(lora.LoraConfig):
    """LoRA's r, alpha, dropout, rslora and targets (Linear/Conv1D layers only), linearised around
    the initial ``(A0, B0)``. init_seed: seeds each layer's ``A0`` (with the layer's name), so adapters
    made with one seed share ``phi0`` and can be merged by task arithmetic; None: the global RNG."""

    init_seed: int | None = 42

    def validate(self) -> None:
        super().validate()
        self._require(not self.use_dora, "use_dora",
                      "False: L-LoRA linearises plain LoRA's s B A (DoRA's normalised update is another function)")
        self._require(self.init_seed is None or self.init_seed >= 0, "init_seed",
                      "a non-negative integer (adapters with one seed share their initial A0, B0) or None "
                      "(draw A0 from the global RNG, as LoRA)")

    def variant(self) -> "lora.LoraVariant | None":
        return L_LORA

    def peft_fields(self) -> dict[str, Any]:
        return {}  # peftlab's own form: HF peft has no L-LoRA

    @classmethod
    def from_peft(cls, data: dict[str, Any]) -> "LLoraConfig":
        raise PeftlabError("LLoraConfig cannot read an HF peft config: peft has no L-LoRA (a peft LoRA checkpoint "
                           "loads as LoraConfig)")


class LLoraLayer(lora.LoraLayer):
    """A Linear/Conv1D layer with L-LoRA adapters (and any plain LoRA adapters added over them).

    Per L-LoRA adapter: trained ``lora_A`` (r x in) and ``lora_B`` (out x r), and the expansion point,
    frozen: ``lora_A0`` (r x in) and ``lora_B0`` (out x r)."""

    frozen_attrs = ("lora_A0", "lora_B0")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A0 = BufferDict()
        self.lora_B0 = BufferDict()


class LinearisedLora(lora.LoraVariant):
    """The update ``s [B A0 + B0 (A - A0)] x``: LoRA's ``s B A x`` to first order around (A0, B0)."""

    def add(self, layer: lora.LoraLayer, name: str, config: lora.LoraConfig) -> None:
        if not isinstance(layer, LLoraLayer) or layer.is_embedding:
            raise PeftlabError("L-LoRA adapters live in LLoraLayer wrappers of Linear/Conv1D layers; add them with "
                               "LLoraConfig through get_peft_model or add_adapter")
        a, b, _ = layer._factors(name)
        layer.lora_A0[name] = a.detach().clone()
        layer.lora_B0[name] = b.detach().clone()

    def forward(self, layer: lora.LoraLayer, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        a, b, scale = layer._factors(name)
        a0, b0 = layer.lora_A0[name], layer.lora_B0[name]
        h = layer.lora_dropout[name](x) if name in layer.lora_dropout else x
        low = F.linear(h.to(a.dtype), torch.cat([a0, a - a0]))  # (..., 2r): [x A0^T, x (A - A0)^T]
        return out + (F.linear(low, torch.cat([b, b0], dim=1)) * scale).to(out.dtype)

    def delta_weight(self, layer: lora.LoraLayer, name: str) -> torch.Tensor:
        a, b, scale = layer._factors(name)
        a0, b0 = layer.lora_A0[name], layer.lora_B0[name]
        delta = (b @ a0 + b0 @ (a - a0)) * scale  # out x in
        return delta.T if layer.transposed else delta


L_LORA = LinearisedLora()


def _layer_seed(seed: int, path: str) -> int:
    # One generator per layer, keyed by its name (not by the order layers are visited), so the same
    # layer gets the same A0 whatever else the model holds.
    return zlib.crc32(f"{seed}:{path}".encode())


def attach(model: nn.Module, name: str, config: LLoraConfig, host: Any = None) -> None:
    # Linear/Conv1D only, checked before any layer is wrapped: a refused config changes nothing.
    paths = resolve_targets(model, config.targets, allowed_types=LINEAR_TYPES)
    for path in paths:
        layer = wrap(model, path, LLoraLayer)
        layer.add(name, config)
        if config.init_seed is not None:
            a = layer.lora_A[name].weight
            generator = torch.Generator().manual_seed(_layer_seed(config.init_seed, logical_name(path)))
            drawn = torch.empty(a.shape)  # on the CPU in float32: the same A0 on every device
            nn.init.kaiming_uniform_(drawn, a=math.sqrt(5), generator=generator)  # LoRA's draw
            with torch.no_grad():
                a.copy_(drawn)
                layer.lora_A0[name].copy_(drawn)
    lora._group_siblings(model)


# -- task arithmetic --------------------------------------------------------------------------------

def combine(model: Any, adapters: list[str], weights: list[float], new_name: str, combination_type: str,
            **options: Any) -> None:
    """Add L-LoRA adapter ``new_name`` to ``model`` (a PeftModel): ``phi = phi0 + sum_i w_i (phi_i - phi0)``
    for ``phi = (A, B)`` of every layer, ``phi0 = (A0, B0)`` the expansion point all ``adapters`` share
    (``combination_type="task_arithmetic"``, the paper's; one ``lambda`` for all tasks is
    ``weights=[lam] * n``). The layers' weight changes then add up exactly: ``dW = sum_i w_i dW_i``,
    counted from the change at ``phi0`` (``s B0 A0``, zero when ``B0 = 0``, the default).

    Raises PeftlabError, before anything is added, when an option is given (there are none), the
    adapters are not all L-LoRA, differ in rank, scale or layers, carry trained module copies
    (``modules_to_save``: one head per task cannot be averaged into one), or do not share ``phi0``.
    """
    if options:
        raise PeftlabError(f"option(s) {sorted(options)} do not apply to L-LoRA's 'task_arithmetic', which reads "
                           "none; remove them")
    configs = [model.peft_configs[n] for n in adapters]
    if not all(isinstance(c, LLoraConfig) for c in configs):
        raise PeftlabError("L-LoRA task arithmetic combines L-LoRA adapters; got "
                           f"{[type(c).__name__ for c in configs]}")
    heads = {n: list(c.modules_to_save) for n, c in zip(adapters, configs) if c.modules_to_save}
    if heads:
        raise PeftlabError(f"adapters {heads} train full copies of modules (modules_to_save, e.g. a task head), which "
                           "task arithmetic cannot combine into one; combine adapters without them and keep each "
                           "task's head apart")
    shapes = {n: (c.r, c.scaling) for n, c in zip(adapters, configs)}
    if len(set(shapes.values())) > 1:
        raise PeftlabError(f"task arithmetic adds the adapters' A and B, so they need one rank and one scale; got "
                           f"(r, alpha/r) = {shapes}")
    layers = lora._same_layers(model, adapters)
    first = adapters[0]
    for layer in layers:
        for other in adapters[1:]:
            if not (torch.equal(layer.lora_A0[other], layer.lora_A0[first])
                    and torch.equal(layer.lora_B0[other], layer.lora_B0[first])):
                raise PeftlabError(f"adapters {first!r} and {other!r} were linearised around different initial "
                                   "(A0, B0), so their task vectors phi - phi0 do not share an origin; train the tasks "
                                   "from one init_seed (the default, 42)")
    model.add_adapter(new_name, configs[0])
    with torch.no_grad():
        for layer in layers:
            a0, b0 = layer.lora_A0[first], layer.lora_B0[first]
            layer.lora_A0[new_name].copy_(a0)
            layer.lora_B0[new_name].copy_(b0)
            for factor, origin in ((layer.lora_A, a0), (layer.lora_B, b0)):
                merged = origin.clone()
                for w, n in zip(weights, adapters):
                    merged.add_(factor[n].weight - origin, alpha=float(w))
                factor[new_name].weight.copy_(merged)


SPEC = register(MethodSpec(
    name="l_lora", title="L-LoRA", family="reparameterized", subcategory="LoRA-based improvement", config_cls=LLoraConfig,
    trains="low-rank factors A, B of LoRA modules linearised (first order) around their initial values",
    attach=attach,
    paper="Tang et al. 2023, Parameter Efficient Multi-task Model Fusion with Partial Linearization",
    # The linearised module is linear in x: W0 + s [B A0 + B0 (A - A0)] is exactly what it computes.
    mergeable=True, merge_tolerance=1e-4, default_lr=5e-4,
    combine=combine, combination_types=("task_arithmetic",),
))
