"""Training glue: data encoding, the loop (on HF accelerate, so it runs under accelerate/torchrun),
and one job per kind of task (GLUE classification, translation, generation)."""
from .causal_job import GenerationRun, run_generation
from .data import encode_pairs, make_loader, make_seq2seq_loader
from .glue_job import GlueRun, run_glue
from .loop import TrainArgs, TrainResult, latest_checkpoint, predict, train
from .seq2seq_job import TranslationRun, run_translation

__all__ = ["GenerationRun", "GlueRun", "TrainArgs", "TrainResult", "TranslationRun", "encode_pairs",
           "latest_checkpoint", "make_loader", "make_seq2seq_loader", "predict", "run_generation", "run_glue",
           "run_translation", "train"]
