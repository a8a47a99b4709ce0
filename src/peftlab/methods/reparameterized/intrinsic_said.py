"""Intrinsic SAID (Aghajanyan, Zettlemoyer & Gupta, 2021, "Intrinsic Dimensionality Explains the
Effectiveness of Language Model Fine-Tuning", ACL).

Every targeted pretrained weight moves inside one random d-dimensional subspace, through the
Fastfood transform (Le et al. 2013, as in Li et al. 2018's reference code)::

    theta_i = theta0_i + lambda_i * P_i(theta_d)            (SAID, structure-aware)
    theta_i = theta0_i + P_i(theta_d)                       (plain Intrinsic, said=False)
    P_i(x) = (H G Pi H B pad(x))[:D_i] / (sqrt(L_i * sum(G^2)) * sqrt(D_i / L_i))

``H`` is the (unnormalised) Walsh-Hadamard matrix, computed by a fast transform in O(L log L);
``G`` a diagonal Gaussian, ``Pi`` a random permutation, ``B`` a diagonal of random signs; ``L_i`` the
next power of two of the tensor's size ``D_i`` (the reference code's padding and scaling). As in the
reference code, each targeted tensor gets its own Fastfood block (B, Pi, G) mapping the shared
d-vector to that tensor's entries, rather than one giant block over all D parameters. The blocks
are drawn from ``seed`` in target order, never stored: a load regenerates them.

SAID takes m of the d trained numbers as one scalar lambda_i per targeted tensor (m = number of
targeted tensors), so ``theta_d`` has d - m entries (init 0) and the lambdas m (init 1, as the
structure-aware reference implementations do); d numbers train in all. At init theta_d = 0, so the
model is the base model. The delta is a dense change of each weight, so merging adds it exactly.

Defaults and deviations: the paper projects every parameter of the model; here the default targets
are the weights of every linear layer (``"all-linear"``, the output head excluded), because the
wrapped-layer design of this library adds a delta to a layer's weight; biases, LayerNorms and
embeddings stay frozen. ``d = 1000`` (the scale of the paper's d90 for BERT/RoBERTa-size models on
GLUE). Where a tensor is smaller than d (L_i < d, which the reference code does not handle), its block
is sized to the next power of two of d and truncated to D_i (the same construction, padded further).
peft has no such method, so the checkpoint is peftlab's own form (``said_theta``, ``said_lambda``).

Against the structure-aware reference code (the ``IntrinsicDimensionLight`` released with the paper's
code and reused by T-Few): (1) it counts m as every named parameter of the model and trains
d - m - 1 subspace coordinates; here m is the number of targeted tensors and d - m coordinates train,
so exactly d numbers train. (2) Its Walsh-Hadamard autograd function scales the backward pass by
1/sqrt(L) per transform (the gradient of a tensor's block is 1/L_i of the true one); here autograd
gives the exact gradient of the forward, which weighs large tensors more than the reference does.
(3) The blocks are kept as non-persistent buffers (float signs and Gaussian, int64 permutation: about
16 bytes per padded entry, ~0.3 GB for MiniLM-L6 all-linear, ~2.3 GB for BERT-base) instead of being
recomputed from the seed each step; each forward recomputes every targeted delta (two FWHTs per tensor).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import PeftConfig
from ...core.errors import PeftlabError
from ...core.inject import wrap
from ...core.layer import DeltaModule, base_of, linear_io
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, resolve_targets

_KEY = "intrinsic_said"  # this method's entry in PeftModel.model_adapters


@dataclasses.dataclass(frozen=True)
class IntrinsicSaidConfig(PeftConfig):
    """d: the intrinsic dimension (numbers trained in all); said: structure-aware (one trained scalar
    per targeted tensor, taken from the d); seed: draws the Fastfood blocks (regenerated on load)."""

    targets: tuple[str, ...] | str | None = "all-linear"
    d: int = 1000
    said: bool = True
    seed: int = 0

    def validate(self) -> None:
        self._require(isinstance(self.d, int) and not isinstance(self.d, bool) and self.d > 0, "d",
                      "a positive integer intrinsic dimension such as 1000")
        self._require(isinstance(self.said, bool), "said", "True (structure-aware) or False (plain Intrinsic)")
        self._require(isinstance(self.seed, int) and not isinstance(self.seed, bool), "seed", "an integer seed")


def _hadamard(size: int, like: torch.Tensor) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=like.dtype, device=like.device)
    while h.shape[0] < size:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform (Sylvester order) of the last dimension (a power of two).

    H_(ab) = H_a (x) H_b, so the vector is viewed as a grid with sides of at most 128 and a small dense
    Hadamard matrix is applied along each side: O(L log L) work done as a few batched matmuls."""
    n = x.shape[-1]
    bits = n.bit_length() - 1
    if n != 1 << bits:
        raise PeftlabError(f"fwht needs a power-of-two length, got {n}")
    sides = []
    while bits > 0:
        sides.append(1 << min(bits, 7))
        bits -= min(bits, 7)
    lead = x.shape[:-1]
    y = x.reshape(-1, *sides)
    for axis, side in enumerate(sides, start=1):
        y = (y.movedim(axis, -1) @ _hadamard(side, y)).movedim(-1, axis)
    return y.reshape(*lead, n)


class FastfoodBlock(nn.Module):
    """One tensor's Fastfood block: non-persistent buffers (regenerated from the seed, never saved)."""

    def __init__(self, size: int, d: int, generator: torch.Generator, device: torch.device) -> None:
        super().__init__()
        self.size = size
        self.length = 2 ** math.ceil(math.log2(max(size, d, 2)))
        signs = torch.randint(0, 2, (self.length,), generator=generator).float() * 2 - 1
        perm = torch.randperm(self.length, generator=generator)
        gauss = torch.randn(self.length, generator=generator)
        self.divisor = float(torch.sqrt(self.length * gauss.double().pow(2).sum())) * math.sqrt(size / self.length)
        self.register_buffer("signs", signs.to(device), persistent=False)
        self.register_buffer("perm", perm.to(device), persistent=False)
        self.register_buffer("gauss", gauss.to(device), persistent=False)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        x = F.pad(theta.float(), (0, self.length - theta.shape[0]))
        x = fwht(x * self.signs.float())
        x = fwht(x[self.perm] * self.gauss.float())
        return x[: self.size] / self.divisor


class IntrinsicSpace(DeltaModule):
    """Model-level: each adapter's trained theta_d (d - m numbers, init 0) and lambdas (m, init 1)."""

    adapter_attrs = ("said_theta", "said_lambda")

    def __init__(self) -> None:
        super().__init__()
        self.said_theta, self.said_lambda = nn.ParameterDict(), nn.ParameterDict()

    def add(self, name: str, config: IntrinsicSaidConfig, tensors: int, like: torch.Tensor) -> None:
        scalars = tensors if config.said else 0
        self.said_theta[name] = nn.Parameter(torch.zeros(config.d - scalars, device=like.device))
        if scalars:
            self.said_lambda[name] = nn.Parameter(torch.ones(scalars, device=like.device))

    def merge(self, name: str) -> None:  # the layers fold the delta; theta stays as it is
        self.merged_adapters.append(name)

    def unmerge(self, name: str) -> None:
        self.merged_adapters.remove(name)


class IntrinsicSaidLayer(DeltaModule):
    """Wraps a Linear/Conv1D; its weight becomes W0 + lambda_i * P_i(theta_d) per live adapter."""

    # Fastfood blocks hold only non-persistent buffers: no parameters, nothing saved.
    adapter_attrs = ("said_fastfood",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.said_fastfood = nn.ModuleDict()
        self.in_features, self.out_features, self.transposed = linear_io(base_layer)
        self.shared: list[IntrinsicSpace] = []  # a list: the model-level module is not our child

    def add(self, name: str, block: FastfoodBlock, index: int, shared: IntrinsicSpace) -> None:
        self.said_fastfood[name] = block
        self.settings[name] = index  # this tensor's lambda
        self.shared = [shared]

    def delta_weight(self, name: str) -> torch.Tensor:
        """lambda_i * P_i(theta_d), laid out like the base weight."""
        shared = self.shared[0]
        weight = base_of(self.base_layer).weight
        delta = self.said_fastfood[name](shared.said_theta[name]).reshape(weight.shape)
        if name in shared.said_lambda:
            delta = delta * shared.said_lambda[name][self.settings[name]]
        return delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        for name in self.live_adapters():
            delta = self.delta_weight(name).to(x.dtype)
            update = x @ delta if self.transposed else F.linear(x, delta)
            out = out + update.to(out.dtype)
        return out


def attach(model: nn.Module, name: str, config: IntrinsicSaidConfig, host: Any = None) -> None:
    if host is None:
        raise PeftlabError("Intrinsic SAID keeps its d trained numbers at model level: apply it with get_peft_model")
    paths = resolve_targets(model, config.targets, allowed_types=LINEAR_TYPES)
    weights = [base_of(model.get_submodule(p)).weight for p in paths]
    total = sum(w.numel() for w in weights)
    if config.d > total:
        raise PeftlabError(f"IntrinsicSaidConfig.d={config.d} is above the {total} parameters of the {len(paths)} "
                           f"targeted weights: the subspace cannot have more dimensions than the space; choose "
                           f"d <= {total} or target more layers")
    if config.said and config.d <= len(paths):
        raise PeftlabError(f"IntrinsicSaidConfig.d={config.d} leaves no subspace dimension once SAID takes one scalar "
                           f"for each of the {len(paths)} targeted weights: choose d > {len(paths)} or said=False")
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    blocks = [FastfoodBlock(w.numel(), config.d, generator, w.device) for w in weights]  # all drawn before any change
    layers = [wrap(model, path, IntrinsicSaidLayer) for path in paths]
    shared = host.model_adapters[_KEY] if _KEY in host.model_adapters else IntrinsicSpace()
    host.model_adapters[_KEY] = shared
    shared.add(name, config, len(paths), weights[0])
    for index, (layer, block) in enumerate(zip(layers, blocks)):
        layer.add(name, block, index, shared)


SPEC = register(MethodSpec(
    name="intrinsic_said", title="Intrinsic SAID", family="reparameterized", subcategory="low-rank decomposition",
    config_cls=IntrinsicSaidConfig,
    trains="d numbers: a d-m vector projected by per-tensor Fastfood blocks onto every targeted weight, "
           "and one scale per tensor",
    attach=attach, paper="Aghajanyan et al. 2021, Intrinsic Dimensionality Explains the Effectiveness of "
                         "Language Model Fine-Tuning",
    mergeable=True, merge_tolerance=1e-4, default_lr=1e-2,
))
