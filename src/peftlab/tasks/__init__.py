"""Benchmark tasks: data loaders and official metrics (GLUE, WMT16 en-ro, E2E NLG)."""

from peftlab.tasks.errors import TaskDataError
from peftlab.tasks.generation import E2E_SPLITS, E2EExample, e2e_metrics, load_e2e, rouge_l
from peftlab.tasks.glue import (
    GLUE_TASKS,
    Example,
    GlueTask,
    accuracy,
    f1_binary,
    get_glue_task,
    glue_metrics,
    load_glue,
    matthews_corrcoef,
    pearson,
    spearman,
)
from peftlab.tasks.translation import TranslationPair, bleu, load_parallel, load_wmt16_en_ro

__all__ = [
    "TaskDataError",
    # GLUE
    "Example",
    "GlueTask",
    "GLUE_TASKS",
    "get_glue_task",
    "load_glue",
    "glue_metrics",
    "accuracy",
    "f1_binary",
    "matthews_corrcoef",
    "pearson",
    "spearman",
    # translation
    "TranslationPair",
    "load_parallel",
    "load_wmt16_en_ro",
    "bleu",
    # generation
    "E2EExample",
    "E2E_SPLITS",
    "load_e2e",
    "rouge_l",
    "e2e_metrics",
]
