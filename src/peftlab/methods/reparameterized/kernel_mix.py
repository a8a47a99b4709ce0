"""Kernel-mix: kernel-wise (per-head) low-rank adapters (Yifan Chen, Devamanyu Hazarika, Mahdi Namazifar,
Yang Liu, Di Jin and Dilek Hakkani-Tur, 2022, "Empowering Parameter-Efficient Transfer Learning by
Recognizing the Kernel Structure in Self-Attention", Findings of NAACL 2022, arXiv:2205.03720).

The paper reads each attention head as a kernel estimator (query/key form the kernel, value the
values it averages) and, following multiple-kernel learning, tunes each head (kernel) separately
while a shared part keeps what all heads have in common. For a projection ``W0`` (out x in) whose
output splits into ``H`` heads of ``d_h = out / H`` rows, head ``h``'s rows get::

    W0^h x + s (B_s^h A_s x  +  B^h A^h x)

    A_s: r_s x in    shared by every head of the projection     B_s^h: d_h x r_s (rows h of B_s)
    A^h: r_h x in    head h's own                              B^h:   d_h x r_h

i.e. ``dW = s (B_s A_s + blockdiag_h(B^h) [A^1; ...; A^H])``: a shared LoRA of rank ``r_s`` plus,
for each head, a LoRA of rank ``r_h`` that only moves that head's rows. Trained numbers per adapted
projection::

    r_s (in + H d_h)  +  H r_h (in + d_h)

The update has rank up to ``r_s + H r_h``; each head's slice has rank at most ``r_s + r_h`` and,
without the shared part, exactly the structure plain LoRA cannot express (a row block per head
moved by its own factors only).

Placement, initialisation, defaults:
- the attention key and value projections (``@key``, ``@value``), per head: the issue for this
  method gives this as the paper's placement (the key enters the kernel, the value is what the
  kernel averages); ``@query`` may be added. Other modules are refused: they have no head split;
- GPT-2 fuses q, k, v in ``c_attn``: the ``@key``/``@value`` sites adapt only their third of its
  output (each third with its own shared and per-head factors); naming ``c_attn`` itself adapts
  all three thirds. Llama's grouped-query k/v have ``num_key_value_heads`` heads, its q
  ``num_attention_heads``; BERT/T5 read ``num_attention_heads`` (T5: ``num_heads``) from the config;
- A factors are drawn Kaiming-uniform (``a = sqrt(5)``) as LoRA's A, B factors start at zero, so
  the adapter is the identity at init;
- ``shared_rank = 2``, ``head_rank = 1``, ``scale = 2.0``.

The forward never forms ``dW`` (out x in). It runs two GEMMs, as LoRA does: ``low = x A^T`` with
``A = [A_s; A^1; ...; A^H]`` (R = r_s + H r_h rows: every low-rank input at once), then
``low (s B)^T`` with ``B = [B_s | blockdiag_h(B^h)]`` (out x R, the size of a low-rank factor, zero
off the head blocks), added into the base output in place on a plain layer. For a fused projection
the parts are stacked the same way (each part's shared columns feed only its rows). Merging adds
``s B A`` into ``W0`` (transposed for Conv1D): exact up to float rounding, the update being linear
in ``x``.

Deviations, and why:
- The paper's full text and its reference code could not be read in this environment (only its
  abstract and summaries were reachable), so the update rule above — shared plus head-specific
  low-rank factors, per head, on key/value — is reconstructed from the abstract ("kernel-wise
  adapters ... enable separate parameter tuning for each attention head") and the issue, not
  checked line by line against the paper. Its exact variants (e.g. any "lite" form, or a
  kernel-wise adapter on the value path built differently) may differ.
- Defaults (``shared_rank=2``, ``head_rank=1``) are not the paper's numbers (not available): they
  put the trained budget within ~6% of LoRA r=8 on q,v for BERT-size models (d=384..768, 12 heads).
- ``scale`` is one fixed multiplier for both parts (2.0 = this library's LoRA default 16/8), not
  an ``alpha / r`` rule; the paper's scaling could not be checked.
- No dropout on the adapter input; no mixed batches (one adapter per call).
- ``default_lr`` (5e-4, LoRA's) is a starting point, not a value measured for this method.
- Saved in peftlab's own form (no HF peft equivalent).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import PeftConfig
from ...core.errors import PeftlabError
from ...core.inject import wrap
from ...core.layer import DeltaModule, base_of, linear_io
from ...core.registry import MethodSpec, register
from ...core.targets import ARCHITECTURES, LINEAR_TYPES, architecture_of, logical_name, resolve_targets

ROLES = ("query", "key", "value")  # the order of GPT-2's fused c_attn output


@dataclasses.dataclass(frozen=True)
class KernelMixConfig(PeftConfig):
    """shared_rank: rank r_s of the part shared by all heads of a projection (0: per-head parts only);
    head_rank: rank r_h of each head's own part (at most the head dimension); scale: s in
    ``W0 x + s dW x``. targets: attention query/key/value projections only (default key, value)."""

    targets: tuple[str, ...] | str | None = ("@key", "@value")
    shared_rank: int = 2
    head_rank: int = 1
    scale: float = 2.0

    def validate(self) -> None:
        self._require(self.shared_rank >= 0, "shared_rank",
                      "a rank >= 0 for the part shared by all heads (0 turns it off), e.g. 2")
        self._require(self.head_rank >= 1, "head_rank",
                      "a rank >= 1 for each head's own part, e.g. 1 (with 0 this would be plain LoRA: use LoRA)")
        self._require(self.scale != 0, "scale", "a non-zero number such as 2.0")


@dataclasses.dataclass(frozen=True)
class Part:
    """One adapted block of a projection's output: ``heads`` heads of ``head_dim`` rows from ``offset``."""

    role: str
    offset: int
    heads: int
    head_dim: int

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


@dataclasses.dataclass(frozen=True)
class _Setup:
    scale: float
    parts: tuple[Part, ...]


def parameter_count(in_features: int, heads: int, head_dim: int, shared_rank: int, head_rank: int) -> int:
    """Trained numbers of one adapted part: ``r_s (in + H d_h) + H r_h (in + d_h)``."""
    return shared_rank * (in_features + heads * head_dim) + heads * head_rank * (in_features + head_dim)


class KernelMixLayer(DeltaModule):
    """Wraps a Linear/Conv1D q/k/v projection; adds the shared plus per-head low-rank update to the
    chosen parts of its output. Tensors per adapter (P parts, all of one shape):
    shared A (P, r_s, in), shared B (P, H d_h, r_s), head A (P, H, r_h, in), head B (P, H, d_h, r_h)."""

    adapter_attrs = ("kernel_mix_shared_A", "kernel_mix_shared_B", "kernel_mix_head_A", "kernel_mix_head_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kernel_mix_shared_A, self.kernel_mix_shared_B = nn.ParameterDict(), nn.ParameterDict()
        self.kernel_mix_head_A, self.kernel_mix_head_B = nn.ParameterDict(), nn.ParameterDict()
        self.in_features, self.out_features, self.transposed = linear_io(base_layer)

    def add(self, name: str, config: KernelMixConfig, parts: tuple[Part, ...]) -> None:
        weight = base_of(self.base_layer).weight
        kw = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        p, heads, head_dim = len(parts), parts[0].heads, parts[0].head_dim
        rs, rh = config.shared_rank, config.head_rank
        if rs > 0:
            self.kernel_mix_shared_A[name] = nn.Parameter(_kaiming(torch.empty(p, rs, self.in_features, **kw)))
            self.kernel_mix_shared_B[name] = nn.Parameter(torch.zeros(p, heads * head_dim, rs, **kw))
        self.kernel_mix_head_A[name] = nn.Parameter(_kaiming(torch.empty(p, heads, rh, self.in_features, **kw)))
        self.kernel_mix_head_B[name] = nn.Parameter(torch.zeros(p, heads, head_dim, rh, **kw))
        self.settings[name] = _Setup(float(config.scale), parts)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A: R x in, B: P H d_h x R) with ``s dW = s B A`` over the adapted parts, stacked.

        ``A = [A_s(part 1); ...; A_s(part P); A^1; ...; A^{PH}]`` (``R = P (r_s + H r_h)``) and ``B``
        is block-structured: part p's rows read only part p's shared columns, and head g's rows
        read only head g's own ``r_h`` columns (zero elsewhere). ``B`` is (adapted rows x R), the size of
        a low-rank factor, never the (out x in) update."""
        head_a, head_b = self.kernel_mix_head_A[name], self.kernel_mix_head_B[name]
        p, heads, head_dim, rh = head_b.shape
        g = p * heads
        own = head_b.new_zeros(g, head_dim, g, rh)
        idx = torch.arange(g, device=head_b.device)
        own[idx, :, idx, :] = head_b.reshape(g, head_dim, rh)  # head g's rows x head g's columns
        a_rows, b_cols = [head_a.reshape(g * rh, self.in_features)], [own.reshape(g * head_dim, g * rh)]
        if name in self.kernel_mix_shared_A:
            shared_a, shared_b = self.kernel_mix_shared_A[name], self.kernel_mix_shared_B[name]
            rs = shared_a.shape[1]
            per_part = shared_b.new_zeros(p, heads * head_dim, p, rs)
            pidx = torch.arange(p, device=shared_b.device)
            per_part[pidx, :, pidx, :] = shared_b  # part p's rows x part p's shared columns
            a_rows.insert(0, shared_a.reshape(p * rs, self.in_features))
            b_cols.insert(0, per_part.reshape(g * head_dim, p * rs))
        return torch.cat(a_rows), torch.cat(b_cols, dim=1)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        live = self.live_adapters()
        if not live:
            return self.base_layer(x, *args, **kwargs)
        if self.mixed_batch is not None:
            raise PeftlabError(f"kernel_mix adapters {live} do not serve mixed batches (adapter_names=...); run each "
                               "adapter's examples in a separate call")
        x2 = x.reshape(-1, self.in_features)
        base = self.base_layer
        # A plain Linear/Conv1D is replayed on the 2-D input: its output is then a fresh tensor that
        # nothing keeps (its backward needs x and W0 only), so the update is added into it in place.
        # Another wrapper or a hook inside might keep its output: add out of place there.
        in_place = (type(base) in LINEAR_TYPES and not base._forward_hooks and not base._forward_pre_hooks
                    and not args and not kwargs and not torch.compiler.is_compiling())
        if in_place:
            out2 = (torch.addmm(base.bias, x2, base.weight) if self.transposed  # Conv1D keeps W as in x out
                    else F.linear(x2, base.weight, base.bias))
        else:
            out2 = base(x, *args, **kwargs).reshape(-1, self.out_features)
        dtype = out2.dtype
        for name in live:
            setup: _Setup = self.settings[name]
            a, b = self.factors(name)
            # Two GEMMs, as LoRA: every low-rank input at once (N x R), then the block-structured B,
            # scaled while it is R x out; the second GEMM adds into the base output.
            low = F.linear(x2.to(a.dtype), a)
            bt = (b * setup.scale).T
            if not (in_place and out2.dtype == low.dtype):
                out2 = out2.to(low.dtype).clone()
            parts = setup.parts
            width = parts[0].width
            if len(parts) == 1 and width == self.out_features:
                out2.addmm_(low, bt)
            else:  # some blocks of a fused projection: the others get no update
                for i, part in enumerate(parts):
                    out2[:, part.offset:part.offset + width].addmm_(low, bt[:, i * width:(i + 1) * width])
        return out2.to(dtype).view(*x.shape[:-1], self.out_features)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s dW`` laid out like the base weight (Conv1D: in x out)."""
        setup: _Setup = self.settings[name]
        a, b = self.factors(name)
        blocks = (b @ a) * setup.scale  # (P H d_h) x in
        width = setup.parts[0].width
        if len(setup.parts) == 1 and width == self.out_features:
            delta = blocks
        else:
            delta = blocks.new_zeros(self.out_features, self.in_features)
            for i, part in enumerate(setup.parts):
                delta[part.offset:part.offset + width] = blocks[i * width:(i + 1) * width]
        return delta.T if self.transposed else delta


def _kaiming(t: torch.Tensor) -> torch.Tensor:
    # LoRA's A draw (Kaiming-uniform, a = sqrt(5): bound 1/sqrt(in)) for each factor of the stack.
    bound = 1.0 / math.sqrt(t.shape[-1])
    with torch.no_grad():
        return t.uniform_(-bound, bound)


def _heads(model: nn.Module, role: str) -> int:
    config = getattr(model, "config", None)
    count = getattr(config, "num_key_value_heads", None) if role != "query" else None
    count = count or getattr(config, "num_attention_heads", None)
    if not isinstance(count, int) or count < 1:
        raise PeftlabError(f"kernel_mix splits the {role} projection per attention head, but the model config "
                           f"({type(config).__name__}) gives no head count (num_attention_heads={count!r})")
    return count


def plan(model: nn.Module, config: KernelMixConfig) -> dict[str, tuple[Part, ...]]:
    """Module path -> the parts of its output the adapter moves; every check before anything changes."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        arch = architecture_of(model)
    except PeftlabError:
        raise PeftlabError(f"kernel_mix adapts attention projections per head, so it needs peftlab's attach-point "
                           f"map of the model; model_type {model_type!r} has none (known: {sorted(ARCHITECTURES)})"
                           ) from None
    paths = resolve_targets(model, config.targets, allowed_types=LINEAR_TYPES)
    # Which roles each path was asked for: a '@query/@key/@value' entry names its role (one third of a
    # fused projection); any other entry takes the roles its module plays (all three for a fused one).
    asked: dict[str, set[str]] = {}
    entries = config.targets if isinstance(config.targets, tuple) else (config.targets,)
    for entry in entries:
        for path in resolve_targets(model, (entry,)) if isinstance(config.targets, tuple) else paths:
            if entry.startswith("@") and entry[1:] in ROLES:
                roles = {entry[1:]}
            else:
                roles = {r for r in ROLES if re.search(arch.sites[r], logical_name(path))}
            if not roles:
                raise PeftlabError(f"kernel_mix adapts attention query/key/value projections per head; target "
                                   f"{entry!r} selects {logical_name(path)!r}, which is none of them for model_type "
                                   f"{model_type!r}. Use targets such as ('@key', '@value')")
            asked.setdefault(path, set()).update(roles)
    out: dict[str, tuple[Part, ...]] = {}
    for path in paths:
        in_features, out_features, _ = linear_io(model.get_submodule(path))
        roles = [r for r in ROLES if r in asked[path]]
        blocks = len(ROLES) if arch.fused_qkv else 1
        if out_features % blocks:
            raise PeftlabError(f"{logical_name(path)!r} is a fused q/k/v projection with {out_features} outputs, "
                               "not three equal blocks; kernel_mix cannot split it")
        width = out_features // blocks
        parts = []
        for role in roles:
            heads = _heads(model, role)
            if width % heads:
                raise PeftlabError(f"kernel_mix cannot split {logical_name(path)!r} ({role}, {width} outputs) into "
                                   f"{heads} heads: {heads} does not divide {width}. Check the model config's head "
                                   "count (num_attention_heads / num_key_value_heads)")
            head_dim = width // heads
            if config.head_rank > head_dim:
                raise PeftlabError(f"KernelMixConfig.head_rank={config.head_rank} exceeds the head dimension "
                                   f"{head_dim} of {logical_name(path)!r} ({role}: {width} outputs / {heads} heads); "
                                   f"a head's own update has rank at most {head_dim}: choose head_rank <= {head_dim}")
            offset = ROLES.index(role) * width if arch.fused_qkv else 0
            parts.append(Part(role, offset, heads, head_dim))
        if len({(part.heads, part.head_dim) for part in parts}) > 1:
            raise PeftlabError(f"the blocks of fused {logical_name(path)!r} have different head layouts "
                               f"{[(part.role, part.heads, part.head_dim) for part in parts]}; kernel_mix adapts "
                               "blocks of one layout per module: target one role of it at a time")
        out[path] = tuple(parts)
    return out


def attach(model: nn.Module, name: str, config: KernelMixConfig, host: Any = None) -> None:
    for path, parts in plan(model, config).items():
        wrap(model, path, KernelMixLayer).add(name, config, parts)


SPEC = register(MethodSpec(
    name="kernel_mix", title="Kernel-mix", family="reparameterized", subcategory="LoRA", config_cls=KernelMixConfig,
    trains="per attention head: a shared low-rank update plus each head's own low-rank update of q/k/v projections",
    attach=attach,
    paper="Chen et al. 2022, Empowering Parameter-Efficient Transfer Learning by Recognizing the Kernel Structure "
          "in Self-Attention",
    mergeable=True, merge_tolerance=1e-4, default_lr=5e-4,
))
