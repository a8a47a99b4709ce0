"""Training glue: data encoding, the loop (on HF accelerate, so it runs under accelerate/torchrun), evaluation."""
from .data import encode_pairs, make_loader
from .loop import TrainArgs, TrainResult, predict, train

__all__ = ["TrainArgs", "TrainResult", "encode_pairs", "make_loader", "predict", "train"]
