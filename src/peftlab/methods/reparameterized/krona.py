"""KronA: Kronecker Adapter (Edalati, Tahaei, Kobyzev, Partovi Nia, Clark and Rezagholizadeh, 2022,
"KronA: Parameter Efficient Tuning with Kronecker Adapter", arXiv:2212.10650).

The frozen weight ``W0`` (out x in) gets a trainable update that is a Kronecker product, in parallel
to the layer as LoRA's is::

    h = W0 x + s (A ⊗ B) x       A: a1 x a2 (zero),  B: (out/a1) x (in/a2) (random) -> identity at init

``A ⊗ B`` can have full rank (``rank(A ⊗ B) = rank(A) rank(B)``) with only
``a1 a2 + (out/a1)(in/a2)`` trained numbers per layer, where LoRA's ``B A`` has rank at most ``r``.

The forward never forms ``A ⊗ B`` (out x in). It uses the Kronecker-vector identity. In the paper's
column-major notation it is ``(A ⊗ B) vec(X) = vec(B X A^T)``. PyTorch is row-major (``x.reshape``
reads rows first), so with ``X = x.reshape(a2, b2)`` (``b2 = in/a2``) the same identity reads::

    (A ⊗ B) x = (A X B^T).reshape(out)        (torch.kron(A, B) @ x, checked in the tests)

For a batch of N tokens that is two GEMMs over all tokens, ``X B^T`` then ``A (.)``, or ``A X`` then
``(.) B^T``, whichever costs fewer multiply-adds: ``N a2 b1 (b2 + a1)`` vs ``N a1 b2 (a2 + b1)`` (``b1 = out/a1``).
The largest intermediate is N x a2 x (out/a1) or N x a1 x (in/a2), not out x in. Merging adds
``s torch.kron(A, B)`` into ``W0`` (transposed for GPT-2's Conv1D, which stores the weight in x out).

Paper choices kept here:
- placement: the attention query and value projections, as LoRA's (``@query``, ``@value``);
- one factor zero so the adapter starts as the identity: ``A`` (the small left factor) is zero and
  ``B`` is drawn Kaiming-uniform (``a = sqrt(5)``, ``bound = 1/sqrt(in/a2)``), as LoRA draws its
  non-zero factor; ``A`` gets a gradient from the first step, ``B`` from the second. (The paper's
  text was not available here to confirm which factor it zeroes; A is the one peft's LoKr zeroes too.)
- the fixed scale ``s`` of the update (``scale``).

Deviations, with reasons:
- factor sizes: the paper fixes ``(a1, a2)`` per model. Its exact numbers could not be checked here, so
  the default (``a1 = a2 = None``) picks per layer the divisor of ``out`` (``in``) nearest its square
  root (ties to the smaller; on the usual sizes it is the first number of peft's
  ``factorization(dim)``). That nearly balances the two factors and
  keeps the trained-number count near its minimum, ``2 sqrt(out in)``. For a 768 x 768 layer this
  gives A 24 x 24 and B 32 x 32. Give ``a1``/``a2`` to fix them; a size that does not divide a
  targeted layer's dimension is refused before anything changes, naming the layer and its shape.
  A prime dimension has only 1 and itself, so the automatic choice is 1 there: the update is then
  ``1 x a2`` times ``out x in/a2``, still exact but no longer small.
- ``scale`` defaults to 1 (the update as written, ``A ⊗ B``); the paper tunes ``s`` per task.
- ``dropout`` (default 0, off) on the adapter's input, as LoRA's; the paper has none.
- ``default_lr`` (1e-3) is a starting point, not a value measured for this method.
- KronA^B and KronA^B_res, the paper's variants, are not implemented. They put a Kronecker adapter in
  parallel to the whole feed-forward block instead of to one weight matrix, and ``_res`` adds a
  scaled residual path. Only the plain KronA is here.

How it differs from HF peft's LoKr (``peft.LoKrConfig``, 0.21), which LyCORIS derived from KronA:
- factor shapes: LoKr's ``w1`` is ``(out_l, in_m)`` and ``w2`` is ``(out_k, in_n)``, with
  ``(out_l, out_k)`` and ``(in_m, in_n)`` from ``factorization(dim, decompose_factor)``. Here
  ``a1``/``a2`` are chosen per side directly.
- low rank inside a factor: LoKr replaces ``w2`` by ``w2_a @ w2_b`` of rank ``r`` whenever
  ``r < max(w2.shape) / 2``. With peft's default ``r = 8`` that is nearly every layer, and
  ``decompose_both`` does the same to ``w1``. KronA trains both factors in full.
- initialisation and scale: LoKr zeroes ``w1`` and draws ``w2`` Kaiming-uniform, or the LyCORIS way,
  which zeroes ``w2``. It scales by ``alpha / r``, which depends on a rank KronA does not have.
  KronA scales by ``s``.
- LoKr adds ``rank_dropout`` and ``module_dropout``, and also targets Conv1d/Conv2d.
- compute: LoKr's forward builds the full ``out x in`` ``torch.kron`` every call. This one never does.
Because the trained tensors and the scale differ, this adapter is saved in peftlab's own form
(``krona_A``/``krona_B`` per layer, ``peft_type`` none), not as a LoKr checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import PeftConfig, peft_names
from ...core.errors import PeftlabError
from ...core.inject import wrap
from ...core.layer import DeltaModule, base_of, linear_io
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, resolve_targets


@peft_names(target_modules="targets")
@dataclasses.dataclass(frozen=True)
class KronAConfig(PeftConfig):
    """a1, a2: rows and columns of the left factor A (each must divide the layer's out and in
    dimension; None: the divisor nearest the square root, per layer); scale: s in
    ``W0 x + s (A ⊗ B) x``; dropout: on the adapter's input."""

    targets: tuple[str, ...] | str | None = ("@query", "@value")
    a1: int | None = None
    a2: int | None = None
    scale: float = 1.0
    dropout: float = 0.0

    def validate(self) -> None:
        for field in ("a1", "a2"):
            value = getattr(self, field)
            self._require(value is None or value > 0, field,
                          "a positive integer that divides the layer's dimension, or None to pick one per layer")
        self._require(self.scale != 0, "scale", "a non-zero number such as 1.0")
        self._require(0.0 <= self.dropout < 1.0, "dropout", "a probability in [0, 1)")


def nearest_sqrt_divisor(n: int) -> int:
    """The divisor of ``n`` nearest ``sqrt(n)`` (the smaller one on a tie)."""
    root = math.sqrt(n)
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - root), d))


def factor_shapes(config: KronAConfig, out_features: int, in_features: int, where: str
                  ) -> tuple[tuple[int, int], tuple[int, int]]:
    """((a1, a2), (b1, b2)) of A and B for a layer of shape out x in; a size that does not divide is
    refused, naming the layer (``where``), its shape and the offending size."""
    sizes = []
    for field, dim, side in (("a1", out_features, "out"), ("a2", in_features, "in")):
        size = getattr(config, field)
        if size is None:
            size = nearest_sqrt_divisor(dim)
        elif dim % size:
            divisors = [d for d in range(1, dim + 1) if dim % d == 0]
            raise PeftlabError(f"KronA cannot adapt {where} (weight out x in = {out_features} x {in_features}): "
                               f"{field}={size} does not divide its {side} dimension {dim}. Choose {field} among "
                               f"{divisors}, leave {field}=None to pick one per layer, or target other layers")
        sizes.append(size)
    a1, a2 = sizes
    return (a1, a2), (out_features // a1, in_features // a2)


def kron_matmul(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x @ torch.kron(a, b).T`` for ``x`` of shape (N, a2 * b2), without forming the Kronecker
    product: row by row, ``(a ⊗ b) x_n = (a X_n b^T).reshape(-1)`` with ``X_n = x_n.reshape(a2, b2)``.

    Each factor is applied as one GEMM over all N rows, with a transposing copy of the N x a2 x b1
    (or N x a1 x b2) intermediate in between, cheaper than N tiny batched products. The order
    taken is the one with fewer multiply-adds."""
    (a1, a2), (b1, b2) = a.shape, b.shape
    if b1 * a2 * (b2 + a1) <= a1 * b2 * (a2 + b1):  # B first: (N a2, b2) -> (N a2, b1), then A over a2
        z = F.linear(x.reshape(-1, b2), b).view(-1, a2, b1).transpose(1, 2).reshape(-1, a2)
        return F.linear(z, a).view(-1, b1, a1).transpose(1, 2).reshape(-1, a1 * b1)
    # A first: (N b2, a2) -> (N b2, a1), then B over b2
    z = x.reshape(-1, a2, b2).transpose(1, 2).reshape(-1, a2)
    z = F.linear(z, a).view(-1, b2, a1).transpose(1, 2).reshape(-1, b2)
    return F.linear(z, b).view(-1, a1 * b1)


class KronALayer(DeltaModule):
    """Wraps a Linear/Conv1D; adds ``s (A ⊗ B) x`` per live adapter, computed factor by factor."""

    adapter_attrs = ("krona_A", "krona_B", "krona_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.krona_A, self.krona_B = nn.ParameterDict(), nn.ParameterDict()
        self.krona_dropout = nn.ModuleDict()
        self.in_features, self.out_features, self.transposed = linear_io(base_layer)

    def add(self, name: str, config: KronAConfig, where: str = "this layer") -> None:
        (a1, a2), (b1, b2) = factor_shapes(config, self.out_features, self.in_features, where)
        weight = base_of(self.base_layer).weight
        kw = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        self.krona_A[name] = nn.Parameter(torch.zeros(a1, a2, **kw))
        b = torch.empty(b1, b2, **kw)
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        self.krona_B[name] = nn.Parameter(b)
        if config.dropout > 0:
            self.krona_dropout[name] = nn.Dropout(config.dropout)
        self.settings[name] = float(config.scale)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {k: v for k, v in super().adapter_state(name).items() if not k.startswith("krona_dropout")}

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        for name in self.live_adapters():
            a, b = self.krona_A[name], self.krona_B[name]
            h = self.krona_dropout[name](x) if name in self.krona_dropout else x
            update = kron_matmul(a * self.settings[name], b, h.to(a.dtype))  # the scale on the small factor
            out = out + update.view(*x.shape[:-1], self.out_features).to(out.dtype)
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s (A ⊗ B)``, laid out like the base weight (Conv1D: transposed)."""
        delta = torch.kron(self.krona_A[name], self.krona_B[name]) * self.settings[name]
        return delta.T if self.transposed else delta


def attach(model: nn.Module, name: str, config: KronAConfig, host: Any = None) -> None:
    paths = resolve_targets(model, config.targets, allowed_types=LINEAR_TYPES)
    # Every layer's factor sizes are checked before the first wrapper goes in: nothing half-changed.
    for path in paths:
        in_features, out_features, _ = linear_io(model.get_submodule(path))
        factor_shapes(config, out_features, in_features, path)
    for path in paths:
        wrap(model, path, KronALayer).add(name, config, path)


SPEC = register(MethodSpec(
    name="krona", title="KronA", family="reparameterized", subcategory="low-rank decomposition", config_cls=KronAConfig,
    trains="a Kronecker-product update s (A ⊗ B) of chosen weight matrices (two small full factors per layer)",
    attach=attach, paper="Edalati et al. 2022, KronA: Parameter Efficient Tuning with Kronecker Adapter",
    mergeable=True, merge_tolerance=1e-4, default_lr=1e-3,
))
