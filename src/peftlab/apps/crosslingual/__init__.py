"""Cross-lingual transfer with PEFT: English NLI scored zero-shot on XNLI by full fine-tuning, a task
adapter, MAD-X (language, invertible and task adapters) and LT-SFT composition (see :mod:`.suite`)."""
from .data import XNLI_LABELS, mask_tokens, mlm_batches, read_xnli, split_halves, unlabelled_text, xnli_languages
from .modeling import EncoderWithHeads, MlmHead, NiceCoupling
from .suite import METHODS, CrossLingualSuite, default_suite, ensure_model, run_crosslingual, summary

run = run_crosslingual

__all__ = ["CrossLingualSuite", "EncoderWithHeads", "METHODS", "MlmHead", "NiceCoupling", "XNLI_LABELS",
           "default_suite", "ensure_model", "mask_tokens", "mlm_batches", "read_xnli", "run", "run_crosslingual",
           "split_halves", "summary", "unlabelled_text", "xnli_languages"]
