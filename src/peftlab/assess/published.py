"""Published GLUE figures the study can be set beside: other papers' numbers on other models.

Only the ranking of methods can be compared: the figures below are RoBERTa-base (125M parameters,
full GLUE training sets, many epochs, tuned learning rates), the study's are a 22M-parameter
MiniLM on a small budget. Each table names its source; rows map to peftlab method names
(``"full"`` is full fine-tuning).

Hu et al. 2022 (LoRA), Table 2, RoBERTa-base rows. The full fine-tuning and LoRA rows were checked
against the LoRA repository's README (microsoft/LoRA); the BitFit and AdapterDrop rows were
transcribed from the paper and agree with its averages (85.2, 84.4, 85.4). Metrics: MNLI matched
accuracy, SST-2, MRPC, QNLI, QQP, RTE accuracy, CoLA Matthews correlation, STS-B Pearson.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PublishedRow:
    method: str  # peftlab's name
    label: str  # as the source writes it
    trainable: str
    scores: dict[str, float]  # peftlab task name -> score (×100)


@dataclass(frozen=True)
class PublishedTable:
    source: str
    model: str
    rows: tuple[PublishedRow, ...]


_TASKS = ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb")


def _row(method: str, label: str, trainable: str, *scores: float) -> PublishedRow:
    return PublishedRow(method, label, trainable, dict(zip(_TASKS, scores)))


LORA_ROBERTA_BASE = PublishedTable(
    source="Hu et al. 2022, LoRA: Low-Rank Adaptation of Large Language Models, Table 2 (RoBERTa-base rows)",
    model="RoBERTa-base (125M)",
    rows=(
        _row("full", "FT", "125M", 87.6, 94.8, 90.2, 63.6, 92.8, 91.9, 78.7, 91.2),
        _row("bitfit", "BitFit", "0.1M", 84.7, 93.7, 92.7, 62.0, 91.8, 84.0, 81.5, 90.8),
        _row("adapter_drop", "AdptD (0.3M)", "0.3M", 87.1, 94.2, 88.5, 60.8, 93.1, 90.2, 71.5, 89.7),
        _row("adapter_drop", "AdptD (0.9M)", "0.9M", 87.3, 94.7, 88.4, 62.6, 93.0, 90.6, 75.9, 90.3),
        _row("lora", "LoRA", "0.3M", 87.5, 95.1, 89.7, 63.4, 93.3, 90.8, 86.6, 91.5),
    ),
)

PUBLISHED = (LORA_ROBERTA_BASE,)
