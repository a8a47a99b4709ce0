"""P-tuning (Liu, Zheng, Du, Ding, Qian, Yang & Tang, 2021, "GPT Understands, Too").

Like prompt tuning, ``p`` continuous virtual tokens go in front of the frozen model's input
embeddings; unlike it, they are not trained directly but produced by a small trainable *prompt
encoder* from its own input embeddings ``E`` (p x d). The paper introduces the encoder against two
problems of free vectors: they move little from a random start in the model's discrete embedding
space, and they should be associated with each other, which the sequence model makes them::

    E                                                   (p x d, the encoder's trainable input)
    H = BiLSTM(E)                                       (p x 2h, forward and backward states)
    P = W2 relu(W1 H + b1) + b2                         (p x d: the virtual tokens)
    h = f([P; E_model[input_ids]])                      (the frozen model on p + n positions)

``encoder_reparameterization_type="MLP"`` (HF peft's alternative) replaces the LSTM and the MLP by
``P = W3 relu(W2 relu(W1 E + b1) + b2) + b3`` (widths d -> h -> h -> d). Only the encoder trains.

Layout (HF peft's ``PromptEncoder``, ``P_TUNING``): ``embedding`` (nn.Embedding(p, d)), ``lstm_head``
(the parameters and computation of nn.LSTM(d, h, ``encoder_num_layers``, bidirectional, batch-first,
dropout ``encoder_dropout`` between layers; see :class:`BiLSTM`) and ``mlp_head`` (Linear(2h, 2h),
ReLU, Linear(2h, d)); for ``"MLP"`` only ``embedding`` and ``mlp_head``. Module state keys are
peft's (``prompt_encoder.<adapter>.embedding.weight``, ``.lstm_head.weight_ih_l0``,
``.mlp_head.0.weight``, ...), under ``model_adapters.p_tuning.``; peft's encoder state loads into
peftlab's strictly and computes the same prompt.

Initialisation: PyTorch's defaults, as the reference code and peft (E ~ N(0, 1); LSTM and Linear
weights uniform in +-1/sqrt(fan)). Widths: ``encoder_hidden_size=None`` means the reference code's:
for the LSTM h = d // 2, so that its two directions together are d wide and the MLP is
Linear(d, d), ReLU, Linear(d, d) -- exactly THUDM/P-tuning's LAMA ``PromptEncoder``; for the MLP h = d
(peft's default). Encoder: the paper's bidirectional LSTM with 2 layers, no dropout (the LAMA code's
``lstm_dropout`` default). The rest of the forward -- mask, token types, positions, labels, KV cache,
``generate`` -- is prompt tuning's (:class:`~peftlab.methods.additive.prompt_tuning.SoftPrompt`, whose
rows here come from the encoder).

Checkpoints hold what peft writes: one tensor ``prompt_embeddings`` (p x d), the encoder's *output*
(peft's ``get_peft_model_state_dict`` saves ``get_prompt_embedding_to_save``, the encoder run on its
inputs, and an inference-mode peft model holds that output as its ``embedding.weight``), at the top
level, with ``peft_type: "P_TUNING"``. peft reads peftlab's folder and peftlab reads peft's, with equal
outputs. Loading a checkpoint replaces the adapter's encoder by that tensor (the encoder is a
training-time reparameterisation; what it computes is the prompt). An input that the prompt pushes
past the model's ``max_position_embeddings`` is refused before the model runs.

Not identity at init (the virtual tokens are attended to from the first step), not mergeable (it
adds positions, not weights); it changes the sequence length of token-level outputs.

Deviations, and why:

- Placement: all virtual tokens go in front of the input (peft's layout, the same as prompt tuning),
  not at template positions around the input and its anchor tokens (the paper's
  ``[P_0..P_i] x [P_{i+1}..P_j] [MASK]``, LAMA templates (3, 3, 3)). A fixed prefix needs no per-task
  template, runs on every task and model family, and is what peft writes and reads.
- ``num_virtual_tokens`` defaults to 20 (prompt tuning's default here), not the LAMA templates' 9
  (BERT) or 6 (GPT-2), so the side-by-side study compares the reparameterisation at equal prompt length.
- The encoder follows peft's layout, whose MLP after the LSTM is 2h -> 2h -> d; with the default width
  that is the LAMA code's d -> d -> d. THUDM's few-shot code (LSTM h = d, then 2d -> d -> d) cannot be
  expressed in that layout. peft's default width h = d for the LSTM (about 3x the LAMA encoder) is
  available as ``encoder_hidden_size=d``.
- The base model stays frozen, as in the paper's LAMA experiments; THUDM's few-shot SuperGLUE code
  also fine-tunes the language model (at 1e-5), which a parameter-efficient method does not do.
- After loading a checkpoint, further training updates the loaded prompt directly (there is no
  encoder left to train). peft 0.21.2 with ``is_trainable=True`` instead puts the loaded output
  through a freshly initialised encoder, which computes another prompt; peftlab does not follow that.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from ...core.config import PeftConfig, is_positive_int
from ...core.errors import PeftlabError
from ...core.registry import MethodSpec, register
from .prompt_tuning import SoftPrompt, _input_embedding_weight

ENCODER_TYPES = ("LSTM", "MLP")
_KEY = "p_tuning"  # this method's entry in PeftModel.model_adapters


@dataclasses.dataclass(frozen=True)
class PTuningConfig(PeftConfig):
    """num_virtual_tokens: prompt length ``p``; encoder_reparameterization_type: ``"LSTM"`` (the
    paper's bidirectional LSTM followed by a two-layer ReLU MLP) or ``"MLP"`` (peft's three-layer ReLU
    MLP); encoder_hidden_size: the encoder width ``h`` (``None``: d // 2 for the LSTM, d for the MLP,
    see the module docstring); encoder_num_layers: the LSTM's depth (the MLP's is fixed);
    encoder_dropout: dropout between LSTM layers. Field names are HF peft's ``PromptEncoderConfig``'s.
    Soft prompts touch no module, so ``targets`` must stay ``None``."""

    checkpoint_model_prefix: ClassVar[str] = "base_model."

    num_virtual_tokens: int = 20
    encoder_reparameterization_type: str = "LSTM"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def validate(self) -> None:
        self._require(self.targets is None, "targets",
                      "None: the virtual tokens are prepended to the input and touch no module")
        self._require(is_positive_int(self.num_virtual_tokens), "num_virtual_tokens", "a positive integer such as 20")
        self._require(self.encoder_reparameterization_type in ENCODER_TYPES, "encoder_reparameterization_type",
                      f"one of {ENCODER_TYPES} (upper case, as peft writes it)")
        self._require(self.encoder_hidden_size is None or is_positive_int(self.encoder_hidden_size),
                      "encoder_hidden_size", "None (d // 2 for the LSTM, d for the MLP) or a positive integer")
        lstm = self.encoder_reparameterization_type == "LSTM"
        self._require(is_positive_int(self.encoder_num_layers) and (lstm or self.encoder_num_layers == 2),
                      "encoder_num_layers", "a positive integer (the LSTM's depth); with the MLP encoder, whose "
                      "depth is fixed, leave it at 2")
        dropout = self.encoder_dropout
        self._require(0.0 <= dropout < 1.0, "encoder_dropout", "a probability in [0, 1)")
        self._require(dropout == 0.0 or (lstm and self.encoder_num_layers > 1), "encoder_dropout",
                      "0.0 unless the encoder is an LSTM of 2 or more layers (the dropout sits between them)")

    def hidden_size(self, d: int) -> int:
        """The encoder width ``h`` on a model of width ``d``."""
        if self.encoder_hidden_size is not None:
            return self.encoder_hidden_size
        return max(d // 2, 1) if self.encoder_reparameterization_type == "LSTM" else d

    def peft_fields(self) -> dict[str, Any]:
        return {"peft_type": "P_TUNING", "num_virtual_tokens": self.num_virtual_tokens,
                "encoder_reparameterization_type": self.encoder_reparameterization_type,
                "encoder_hidden_size": self.encoder_hidden_size, "encoder_num_layers": self.encoder_num_layers,
                "encoder_dropout": self.encoder_dropout, "num_transformer_submodules": 1, "inference_mode": True,
                "modules_to_save": list(self.modules_to_save) or None}

    def peft_fields_for(self, model: Any, adapter_name: str) -> dict[str, Any]:
        # peft's "no width" means d; peftlab's LSTM default is d // 2: write the number used.
        d = int(_input_embedding_weight(model).shape[1])
        return {"token_dim": d, "encoder_hidden_size": self.hidden_size(d)}

    @classmethod
    def from_peft(cls, data: dict[str, Any]) -> "PTuningConfig":
        if (data.get("num_transformer_submodules") or 1) != 1:
            raise PeftlabError("this peft P-tuning checkpoint prompts both encoder and decoder "
                               f"(num_transformer_submodules={data['num_transformer_submodules']}); peftlab "
                               "prompts the encoder only. Retrain it with num_transformer_submodules=1.")
        kind = str(data.get("encoder_reparameterization_type") or "MLP").rsplit(".", 1)[-1].upper()  # peft: MLP
        layers, dropout = int(data.get("encoder_num_layers") or 2), float(data.get("encoder_dropout") or 0.0)
        if kind != "LSTM":
            layers, dropout = 2, 0.0  # peft ignores both for its MLP
        elif layers < 2:
            dropout = 0.0  # torch's LSTM ignores dropout with one layer
        return cls(num_virtual_tokens=int(data["num_virtual_tokens"]), encoder_reparameterization_type=kind,
                   encoder_hidden_size=data.get("encoder_hidden_size"), encoder_num_layers=layers,
                   encoder_dropout=dropout, modules_to_save=tuple(data.get("modules_to_save") or ()))


class PromptEncoder(nn.Module):
    """One adapter's encoder: called without arguments, it returns the virtual tokens (p x d)."""

    def __init__(self, config: PTuningConfig, d: int, like: torch.Tensor) -> None:
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype if like.is_floating_point() else torch.float32}
        h = config.hidden_size(d)
        self.embedding = nn.Embedding(config.num_virtual_tokens, d, **kw)
        if config.encoder_reparameterization_type == "LSTM":
            self.lstm_head: BiLSTM | None = BiLSTM(d, h, config.encoder_num_layers, config.encoder_dropout, **kw)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h, **kw), nn.ReLU(), nn.Linear(2 * h, d, **kw))
        else:
            self.lstm_head = None
            self.mlp_head = nn.Sequential(nn.Linear(d, h, **kw), nn.ReLU(), nn.Linear(h, h, **kw), nn.ReLU(),
                                          nn.Linear(h, d, **kw))

    def forward(self) -> torch.Tensor:
        states = self.embedding.weight.unsqueeze(0)  # (1, p, d): one sequence, shared by the whole batch
        if self.lstm_head is not None:
            states = self.lstm_head(states)          # (1, p, 2h)
        return self.mlp_head(states)[0]


class BiLSTM(nn.Module):
    """``nn.LSTM(d, h, layers, dropout=..., bidirectional=True, batch_first=True)``: its parameters,
    under its names (``weight_ih_l0``, ``bias_hh_l1_reverse``, ...: peft's ``lstm_head`` keys) and
    initialised by it, and its computation, through the op it calls (``torch.lstm``). torch.compile
    cannot trace an ``nn.LSTM`` module (a graph break); it traces the op. Returns the outputs only,
    (batch, steps, 2h), from zero initial states."""

    def __init__(self, d: int, h: int, layers: int, dropout: float, **kw: Any) -> None:
        super().__init__()
        reference = nn.LSTM(d, h, layers, dropout=dropout, bidirectional=True, batch_first=True, **kw)
        # The op's order: per layer, per direction: W_ih, W_hh, b_ih, b_hh.
        self.names = tuple(f"{kind}_{part}_l{layer}{suffix}" for layer in range(layers) for suffix in ("", "_reverse")
                           for kind, part in (("weight", "ih"), ("weight", "hh"), ("bias", "ih"), ("bias", "hh")))
        for name in self.names:
            self.register_parameter(name, getattr(reference, name))
        self.hidden_size, self.num_layers, self.dropout = h, layers, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zeros = x.new_zeros(2 * self.num_layers, x.shape[0], self.hidden_size)
        weights = [getattr(self, name) for name in self.names]
        return torch.lstm(x, (zeros, zeros), weights, True, self.num_layers, self.dropout, self.training,
                          True, True)[0]  # has_biases, layers, dropout, train, bidirectional, batch_first


def attach(model: nn.Module, name: str, config: PTuningConfig, host: Any) -> None:
    if host is None:
        raise PeftlabError("P-tuning keeps its prompt encoder on the PeftModel; use get_peft_model(model, config)")
    weight = _input_embedding_weight(model)
    encoder = PromptEncoder(config, int(weight.shape[1]), weight)
    if _KEY not in host.model_adapters:
        encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        host.model_adapters[_KEY] = SoftPrompt(encoder_decoder)
    host.model_adapters[_KEY].prompt_encoder[name] = encoder


# default_lr: measured on MiniLM, SST-2 (5,000 examples, one epoch, batch 32, max length 64, the
# classifier trained beside the encoder): dev accuracy 0.528 at lr 3e-4, 0.658 at 1e-3, 0.641 at 4e-3
# (prompt tuning 0.736, prefix tuning 0.729 in the quick suite). Shorter runs stayed at the majority class
# (0.509): 2,000 examples (63 steps) at 3e-3 and 1e-2, 1,000 (32 steps) at 1e-3. The quick suite runs
# default_lr x 4: 1e-3, the best of these.
SPEC = register(MethodSpec(
    name="p_tuning", title="P-tuning", family="additive", subcategory="soft prompt", config_cls=PTuningConfig,
    trains="a prompt encoder (bidirectional LSTM + MLP, or MLP) whose output is p virtual tokens prepended "
           "to the input", attach=attach, paper="Liu et al. 2021, GPT Understands, Too",
    mergeable=False, identity_at_init=False, changes_sequence_length=True, peft_type="P_TUNING",
    default_lr=2.5e-4,
))
