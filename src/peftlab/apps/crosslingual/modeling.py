"""The encoder with its two heads (NLI classification, masked language modelling) and MAD-X's
invertible adapter.

**MAD-X** (Pfeiffer, Vulić, Gurevych and Ruder, 2020, "MAD-X: An Adapter-Based Framework for
Multi-Task Cross-Lingual Transfer", EMNLP). Per language, a language adapter in every layer and an
invertible adapter on the embedding output, trained by masked language modelling with the model
frozen; a task adapter stacked on the source language's adapters; at test time the target
language's adapters replace the source's. The invertible adapter is a NICE coupling (Dinh et al.,
2015) of the embedding ``e`` split into halves ``e1, e2`` (widths floor(d/2), ceil(d/2))::

    forward:   o1 = e1 + F(e2),   o2 = e2 + G(o1)
    inverse:   e2 = o2 - G(o1),   e1 = o1 - F(e2)

``F``, ``G``: bottlenecks ``W_up relu(W_down x + b_down) + b_up`` of width floor(d/2) / reduction
factor (2 in the paper). The inverse is applied to the last hidden states before the MLM head, so
the head sees the encoder's output mapped back into the language-independent embedding space of
the (tied) output layer.

Where it lives: the invertible adapter is a module of this model, ``invertible``, applied by a forward
hook on the encoder's embeddings module that this model registers and owns; each language gets its
own copy through ``modules_to_save`` of its language adapter (a per-adapter trainable copy that
``set_adapter`` swaps with the rest of the language adapter). peftlab's model-level input adapters
(``transform_inputs``) rewrite the model's inputs before the embeddings run, not the embeddings'
output, so they do not fit here.

Deviations from the paper and the reason:
- ``F`` and ``G`` start near the identity map (both projections drawn from N(0, 1e-2^2) truncated at two
  std, as peftlab's near-identity bottleneck), so the untrained invertible adapter leaves the
  embeddings almost as they are; the reference code (AdapterHub) draws them with torch's default
  Linear initialisation.
- e5 has no MLM head (it was trained for sentence embeddings): a new one is built as BERT's (dense,
  GELU, LayerNorm, then the output layer tied to the input word embeddings, frozen, plus a new bias)
  and trains with each language adapter. Its logits are computed only at the masked positions (the
  250,037-way output at every position would dominate the cost on a CPU); the loss is the same.

The classification head reads the mean of the last hidden states over the real tokens (e5's own
pooling; e5 has no trained pooler), then dropout and a linear layer.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import MaskedLMOutput, SequenceClassifierOutput

from ...core.errors import PeftlabError
from ...methods.additive.sequential_adapter import Bottleneck

NEAR_IDENTITY_STD = 1e-2


class NiceCoupling(nn.Module):
    """The invertible adapter: ``(..., d) -> (..., d)``, exactly invertible (``reverse=True``)."""

    def __init__(self, hidden: int, reduction_factor: float = 2, init_scale: float = NEAR_IDENTITY_STD) -> None:
        super().__init__()
        self.first = hidden // 2
        second = hidden - self.first
        width = max(1, int(self.first // reduction_factor))
        self.F = Bottleneck(second, width, self.first, "relu", init_scale, init_scale)
        self.G = Bottleneck(self.first, width, second, "relu", init_scale, init_scale)

    def forward(self, x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        x1, x2 = x[..., :self.first], x[..., self.first:]
        if not reverse:
            o1 = x1 + self.F(x2)
            return torch.cat([o1, x2 + self.G(o1)], dim=-1)
        e2 = x2 - self.G(x1)
        return torch.cat([x1 - self.F(e2), e2], dim=-1)


class MlmHead(nn.Module):
    """BERT's prediction head: ``LayerNorm(gelu(W h + b)) E^T + bias`` with ``E`` the word embeddings
    (passed in, so the output layer stays tied to them and frozen)."""

    def __init__(self, hidden: int, vocab_size: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(hidden))), embeddings, self.bias)


class EncoderWithHeads(nn.Module):
    """A Hugging Face encoder (``AutoModel``) with a classification head (``classifier``), optionally an
    MLM head (``mlm_head``) and an invertible adapter (``invertible``).

    ``forward(input_ids, attention_mask, ..., labels=None, mlm_labels=None)``: with ``mlm_labels``
    (batch, length; -100 where not masked) it returns the MLM loss over the masked positions, else the
    class logits (batch, num_labels) and, with ``labels``, their cross-entropy."""

    def __init__(self, encoder: nn.Module, num_labels: int, mlm: bool = False,
                 invertible_reduction: float | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        hidden = self.config.hidden_size
        self.dropout = nn.Dropout(getattr(self.config, "hidden_dropout_prob", 0.1))
        self.classifier = nn.Linear(hidden, num_labels)
        word_embeddings = encoder.get_input_embeddings()
        self.mlm_head = (MlmHead(hidden, word_embeddings.num_embeddings, getattr(self.config, "layer_norm_eps", 1e-12))
                         if mlm else None)
        self.invertible = NiceCoupling(hidden, invertible_reduction) if invertible_reduction else None
        if self.invertible is not None:
            if not isinstance(getattr(encoder, "embeddings", None), nn.Module):
                raise PeftlabError(f"{type(encoder).__name__} has no 'embeddings' module for MAD-X's invertible "
                                   "adapter to follow; use a BERT-style encoder, or leave madx out of methods")
            # Looked up at call time: peftlab swaps ``self.invertible`` for its per-adapter wrapper.
            encoder.embeddings.register_forward_hook(self._after_embeddings)

    def _after_embeddings(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return self.invertible(output)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                mlm_labels: torch.Tensor | None = None) -> Any:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        if mlm_labels is not None:
            if self.mlm_head is None:
                raise ValueError("this model was built without an MLM head (mlm=False)")
            picked = mlm_labels != -100
            states = hidden[picked]
            if self.invertible is not None:
                states = self.invertible(states, reverse=True)
            logits = self.mlm_head(states, self.encoder.get_input_embeddings().weight)
            return MaskedLMOutput(loss=F.cross_entropy(logits, mlm_labels[picked]), logits=logits)
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        logits = self.classifier(self.dropout(pooled))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
