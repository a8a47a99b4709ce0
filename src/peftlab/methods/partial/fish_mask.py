"""FISH Mask (Sung, Nair and Raffel, 2021, "Training Neural Networks with Fixed Sparse Masks",
NeurIPS): train only the ``k`` pretrained weights with the largest Fisher information, chosen once
before training; every other weight stays frozen::

    F(w) = 1/N sum_{i<=N} (d log p(y_i | x_i) / dw)^2        empirical Fisher: true labels, one
                                                            example per gradient
    M    = top-k of F over all targeted weights together    (k = keep_ratio * their number)
    W    = W0 + M * d,   only d on M trains                 (d = 0 at start: identity at init)

The review files it under pretrained weight masking; what it trains is a sparse difference to the
pretrained weights, so peftlab holds it as one (:mod:`.sparse_delta`): only the ``k`` chosen entries
are parameters (optimizer state for them alone), the checkpoint keeps them as index/value pairs, and
merging adds them into the weights.

Defaults (from the paper and its reference code, varunnair18/FISH) and deviations:
- N = 1024 examples and ``keep_ratio = 0.005`` (0.5%), the paper's GLUE setting; the mask is chosen
  once, on the pretrained weights, before training (the paper's GLUE setting; it also studies
  re-choosing it during training, which peftlab does not offer).
- The Fisher is the empirical one (true labels) and its squared gradients are taken per example, as
  the reference computes it (its Fisher pass runs at batch size 1). This is what sets it apart from
  Child-Tuning_D, which squares batch gradients.
- Targets: every weight and bias of the transformer blocks and the LayerNorms (``@query`` ...
  ``@ffn_out``, ``@layernorm``). Deviation: the reference also ranks the embeddings and the pooler;
  the word-embedding table is left out by default (add ``@embeddings`` where it is not tied to the
  output layer) because its dense gradient would cost what the sparse optimizer state saves.
- A task head new to the model is not in the ranking: name it in ``modules_to_save`` and it trains
  in full, outside K. (The reference also always trains its classifier, but counts it in K.)
- ``default_lr = 5e-5``, the paper's rate for every GLUE task.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch
from torch import nn

from ...core.config import PeftConfig
from ...core.hooks import TrainingHooks
from ...core.registry import MethodSpec, register
from .sparse_delta import (attach_sparse, base_tensors, batch_loss, batches, combine_sparse, count_of,
                           examples, is_chosen, select_top)

NAME = "FISH Mask"


@dataclasses.dataclass(frozen=True)
class FishMaskConfig(PeftConfig):
    """keep_ratio: share of the targeted entries that train (one ranking across the model);
    num_samples: examples in the Fisher pass (N)."""

    targets: tuple[str, ...] | str | None = ("@query", "@key", "@value", "@attn_out", "@ffn_in", "@ffn_out",
                                             "@layernorm")
    keep_ratio: float = 0.005
    num_samples: int = 1024

    def validate(self) -> None:
        self._require(isinstance(self.keep_ratio, (int, float)) and 0 < self.keep_ratio <= 1, "keep_ratio",
                      "a share in (0, 1] such as 0.005")
        self._require(isinstance(self.num_samples, int) and self.num_samples > 0, "num_samples",
                      "a positive number of examples, such as 1024")


def fisher_information(model: Any, name: str, data: Iterable[Any], num_samples: int) -> list[torch.Tensor]:
    """Mean over ``num_samples`` examples of each targeted base entry's squared per-example gradient
    of the loss (order of :func:`.sparse_delta.entries`). Gradients are taken with
    ``torch.autograd.grad``, so no ``.grad`` is touched."""
    tensors = base_tensors(model, name)
    flags = [t.requires_grad for t in tensors]
    fisher = [torch.zeros_like(t, dtype=torch.float32) for t in tensors]
    seen = 0
    model.train()
    try:
        for t in tensors:
            t.requires_grad_(True)
        for batch in batches(data, NAME):
            for example in examples(batch):
                if seen >= num_samples:
                    break
                grads = torch.autograd.grad(batch_loss(model, example, NAME), tensors, allow_unused=True)
                for f, g in zip(fisher, grads):
                    if g is not None:
                        f.addcmul_(g.float(), g.float())
                seen += 1
            if seen >= num_samples:
                break
    finally:
        for t, flag in zip(tensors, flags):
            t.requires_grad_(flag)
    return [f / seen for f in fisher]


def _choose(model: Any, name: str, data: Iterable[Any]) -> None:
    if is_chosen(model, name):
        return  # a mask loaded with the adapter: keep it
    config: FishMaskConfig = model.peft_configs[name]
    fisher = fisher_information(model, name, data, config.num_samples)
    select_top(model, name, fisher, count_of(config.keep_ratio, sum(f.numel() for f in fisher)), NAME)


def attach(model: nn.Module, name: str, config: FishMaskConfig, host: Any = None) -> None:
    attach_sparse(model, name, config.targets, NAME)


SPEC = register(MethodSpec(
    name="fish_mask", title="FISH Mask", family="partial", subcategory="pretrained weight masking", config_cls=FishMaskConfig,
    trains="the pretrained weights with the largest Fisher information (a fixed sparse mask chosen before training)",
    attach=attach, paper="Sung, Nair and Raffel 2021, Training Neural Networks with Fixed Sparse Masks",
    mergeable=True, merge_tolerance=1e-5, default_lr=5e-5, needs_weight_gradients=True,
    hooks=TrainingHooks(before_training=_choose), combine=combine_sparse, combination_types=("linear",),
))
