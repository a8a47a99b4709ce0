"""MAM adapter ("Mix-And-Match"; He et al., 2022, "Towards a Unified View of Parameter-Efficient
Transfer Learning", ICLR): prefix tuning on the attention and a scaled parallel adapter on the FFN,
the combination the paper's unified view found best::

    attention: head_i = Attn(x W_q, [P_k; x W_k], [P_v; x W_v])          (prefix tuning, l vectors)
    FFN:       FFN'(x) = FFN(x) + s * (W_up f(W_down x + b_down) + b_up)  (parallel adapter, s = 4)

Built from the two existing methods' configs (:class:`PrefixTuningConfig`,
:class:`ParallelAdapterConfig`) as one adapter: both parts attach under the adapter's name, train,
save (one ``adapter_config.json`` holding both parts' configs, one ``adapter_model.safetensors``),
load, disable and delete together; each part runs its own method's code.

Defaults follow the paper's MAM configuration: prefix length ``l = 30`` and a parallel adapter of
bottleneck 512 with ``s = 4`` on BART/mBART-large (d = 1024). The bottleneck is given here as the
same share of the width (``reduction_factor = 2``), so it scales with the model (m = 192 on MiniLM,
d = 384) instead of exceeding the width of small models. The prefix keeps prefix tuning's own
defaults otherwise (its MLP reparameterisation, folded away in checkpoints). Not mergeable, not the
identity at init (a prefix changes attention from the start).
"""
from __future__ import annotations

import dataclasses

from ...core.compose import attach_parts, part_capabilities, validate_parts
from ...core.config import PeftConfig
from ...core.registry import MethodSpec, register
from ..additive import parallel_adapter, prefix_tuning
from ..additive.parallel_adapter import ParallelAdapterConfig
from ..additive.prefix_tuning import PrefixTuningConfig


@dataclasses.dataclass(frozen=True)
class MAMAdapterConfig(PeftConfig):
    """prefix: the attention part (a :class:`PrefixTuningConfig`); adapter: the FFN part (a
    :class:`ParallelAdapterConfig`). modules_to_save applies to the whole adapter."""

    prefix: PrefixTuningConfig = PrefixTuningConfig(num_virtual_tokens=30)
    adapter: ParallelAdapterConfig = ParallelAdapterConfig(reduction_factor=2, scaling=4.0)

    def validate(self) -> None:
        self._require(isinstance(self.prefix, PrefixTuningConfig), "prefix", "a PrefixTuningConfig(...)")
        self._require(isinstance(self.adapter, ParallelAdapterConfig), "adapter", "a ParallelAdapterConfig(...)")
        validate_parts(self)


SPEC = register(MethodSpec(
    name="mam_adapter", title="MAM adapter", family="hybrid", subcategory="manual combination", config_cls=MAMAdapterConfig,
    trains="prefix key/values at every attention plus a scaled parallel adapter at every FFN",
    attach=attach_parts, paper="He et al. 2022, Towards a Unified View of Parameter-Efficient Transfer Learning",
    default_lr=prefix_tuning.SPEC.default_lr,
    **part_capabilities(prefix_tuning.SPEC, parallel_adapter.SPEC),
))
