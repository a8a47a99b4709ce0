"""Multi-task learning with PEFT: task adapters on several GLUE tasks, merged (linear, TIES, DARE),
fused (AdapterFusion), composed (LoRAHub), transferred (SPoT, intermediate tasks) and served in
mixed-task batches, and one adapter trained on all the tasks at once (MoELoRA; see :mod:`.suite`)."""
from .combine import (TaskAdapter, TaskHeads, build, check_same_base, close_extra_outputs, joint_rows, mixed_batch_throughput,
                      put_head, score)
from .suite import MultitaskSuite, default_suite, run_multitask

run = run_multitask

__all__ = ["MultitaskSuite", "TaskAdapter", "TaskHeads", "build", "check_same_base", "close_extra_outputs", "default_suite", "joint_rows", "mixed_batch_throughput",
           "put_head", "run", "run_multitask", "score"]
