"""P-tuning v2 (Liu, Ji, Fu, Tam, Du, Yang & Tang, 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable
to Fine-tuning Universally Across Scales and Tasks").

Deep prompt tuning: trainable prompts in *every* layer, not only at the input. Every self-attention
layer ``i`` attends over ``p`` trainable key/value vectors in front of those of the real tokens,
trained directly (no reparameterisation), while a task head on top of the model trains with them::

    head_i = softmax(q [P_k^i; K]^T / sqrt(d_h) + mask) [P_v^i; V]     P_k^i, P_v^i: (kv_heads, p, d_h)
    y = classifier(pooled(h))                                          (the trained head)

Only ``P = [P_k^0, P_v^0, ..., P_k^{L-1}, P_v^{L-1}]`` (one (p, L*2*kv_heads*d_h) tensor) and the head
train; the model's weights stay frozen. The paper's own words (its first version's abstract):
"P-Tuning v2 is not a new method, but a version of prefix-tuning optimized and adapted for NLU".
Computationally it is prefix tuning with ``prefix_projection=False``, so this method is that
configuration of peftlab's prefix tuning (:mod:`~peftlab.methods.additive.prefix_tuning`: its layer,
its attention hook, its positions, its checkpoint), under its own name, with the v2 choices as its
config:

- no reparameterisation (``prefix_projection`` is fixed to False; the paper finds that the MLP helps
  on some tasks and datasets and not on others, and its code's default is off: the MLP is prefix
  tuning);
- prompt length ``num_virtual_tokens=20`` (the paper: simple classification tasks prefer prompts
  shorter than 20, hard sequence labelling around 100; the reference scripts use 8 to 128);
- a trained classification head on the model instead of a verbalizer: ``modules_to_save=HEADS``
  (``("classifier", "score")``, the head names of transformers' sequence- and token-classification
  models; whichever the model has trains in full beside the prompts; see the deviations);
- learning rate 5e-3 (``default_lr``; the reference scripts: 5e-3 to 1e-2 on SuperGLUE, 3e-2 on NER).

Initialisation: P ~ N(0, 1) (the reference ``PrefixEncoder``'s nn.Embedding, and peft's, draw the
same). Checkpoints are HF peft's ``PREFIX_TUNING`` layout with ``prefix_projection=False`` -- peft has
no separate type for P-tuning v2 and computes the same -- plus one key peft ignores,
``"peftlab": {"method": "p_tuning_v2"}``, so peftlab reads the folder back as P-tuning v2; peft loads
it with equal outputs. A peft ``PREFIX_TUNING`` folder reads as prefix tuning (the same computation).

Not identity at init, not mergeable (prefix tuning's reasons).

Deviations, and why:

- The trained head is not the config's default (``modules_to_save=()``; pass ``HEADS`` or the head's
  name): the conformance suite counts a head copy's checkpoint key (``base_model.classifier.weight``,
  peft's layout for a soft prompt's ``modules_to_save``) as a base-model weight, and fails every
  method whose default config saves one. peftlab's GLUE runs (``peftlab train``, the assessment) add
  ``HEADS`` to every method's config that names none, so there the head trains as in the paper.
- No dropout on the prompts: the reference code applies the model's hidden dropout (0.1) to the
  key/value prompts in training. peft has none, and prefix tuning's layer has none; inference is the
  same either way.
- Multi-task pre-training of the prompts (the paper's optional section 3.3 step) is not part of the
  method here: train one adapter per task, or use peftlab's multitask application.
- Positions: the real tokens sit at positions p, p+1, ... on models that take position ids (prefix
  tuning's rule, as peft); the reference code leaves BERT's positions at 0..n-1. With learned absolute
  positions this costs p positions of the model's limit.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ...core.config import PEFTLAB_KEY
from ...core.registry import MethodSpec, register
from . import prefix_tuning

PAPER_LENGTH = 20  # the paper: simple classification tasks prefer prompts shorter than 20
HEADS = ("classifier", "score")  # transformers' classification heads (peft adds the same two for SEQ_CLS)


@dataclasses.dataclass(frozen=True)
class PTuningV2Config(prefix_tuning.PrefixTuningConfig):
    """Prefix tuning's fields with P-tuning v2's values: ``num_virtual_tokens`` (prompt length per
    layer, default 20; ~100 for hard sequence labelling), ``modules_to_save`` (the paper's trained
    head: ``HEADS`` = ``("classifier", "score")``, whichever the model has), ``targets`` and
    ``cross_attention`` as prefix tuning's. ``prefix_projection`` must stay False and
    ``encoder_hidden_size`` None: P-tuning v2 trains the prompts directly (use ``PrefixTuningConfig`` for the MLP)."""

    num_virtual_tokens: int = PAPER_LENGTH
    prefix_projection: bool = False

    def validate(self) -> None:
        super().validate()
        self._require(self.prefix_projection is False, "prefix_projection",
                      "False: P-tuning v2 trains the prompts without reparameterisation (prefix_tuning has the MLP)")
        self._require(self.encoder_hidden_size is None, "encoder_hidden_size",
                      "None: without the MLP there is no hidden width (prefix_tuning has the MLP)")

    def peft_fields_for(self, model: Any, adapter_name: str) -> dict[str, Any]:
        # peft's PREFIX_TUNING form, plus the key that reads it back here as P-tuning v2.
        return {**super().peft_fields_for(model, adapter_name), PEFTLAB_KEY: {"method": self.method}}

    @classmethod
    def from_peft(cls, data: dict[str, Any]) -> "PTuningV2Config":
        # peft writes a width even without the MLP (its token_dim); it has no meaning here.
        return super().from_peft({**data, "encoder_hidden_size": None})


# default_lr: the reference scripts' rate for BERT/RoBERTa on SuperGLUE (5e-3 to 1e-2, batch 16-32).
# On MiniLM, SST-2 (5,000 examples, one epoch, batch 32, max length 64, the classifier trained beside the prompts):
# dev accuracy 0.771 at 2e-2, the rate the quick suite runs (default_lr x 4); prefix tuning there: 0.729,
# prompt tuning 0.736. (With 2,000 examples, 63 steps, at 5e-3: 0.517, barely off the majority class.)
SPEC = register(MethodSpec(
    name="p_tuning_v2", title="P-tuning v2", family="additive", subcategory="soft prompt", config_cls=PTuningV2Config,
    trains="p key/value vectors per self-attention layer, trained directly, and the task head",
    attach=prefix_tuning.attach,
    paper="Liu et al. 2022, P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across "
          "Scales and Tasks",
    mergeable=False, identity_at_init=False, default_lr=5e-3,
))
