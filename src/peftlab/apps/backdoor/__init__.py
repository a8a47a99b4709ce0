"""Backdoor attack and defence on PEFT: data poisoning, a poisoned shared adapter, STRIP,
fine-mixing and an adapter-level detector (see :mod:`.suite`)."""
from .defences import adapter_features, detect_poisoned, fine_mix, strip_entropies, strip_threshold
from .poison import KURITA_TRIGGERS, check_share, check_trigger, insert_trigger, poison, triggered_eval
from .suite import BackdoorSuite, default_suite, merge_with_heads, run_backdoor

run = run_backdoor

__all__ = ["BackdoorSuite", "KURITA_TRIGGERS", "adapter_features", "check_share", "check_trigger", "default_suite",
           "detect_poisoned", "fine_mix", "insert_trigger", "merge_with_heads", "poison", "run", "run_backdoor",
           "strip_entropies", "strip_threshold", "triggered_eval"]
