"""Train a tiny BERT + LoRA for a few steps with peftlab's loop; run by test_ddp.py.

``python -m torch.distributed.run --nproc_per_node=2 ddp_worker.py OUT`` trains with DDP (gloo on CPU,
set up by accelerate from torchrun's environment) and rank 0 writes the adapter weights to OUT.
:func:`train_once` is the same run in one process.
"""
from __future__ import annotations

import sys

import torch
from torch.utils.data import DataLoader

GLOBAL_BATCH = 8
STEPS = 4
EXAMPLES = GLOBAL_BATCH * STEPS


def rows() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(EXAMPLES):
        length = 6 + i % 5  # varying lengths: padding and masks are exercised
        ids = torch.zeros(12, dtype=torch.long)
        ids[:length] = torch.randint(3, 100, (length,), generator=g)
        mask = (torch.arange(12) < length).long()
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(i % 2)})
    return out


def model() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    from peftlab import LoraConfig, get_peft_model

    torch.manual_seed(0)
    # no dropout: ranks draw from different random streams, and the comparison must be exact
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base = BertForSequenceClassification(cfg)
    return get_peft_model(base, LoraConfig(r=4, modules_to_save=("classifier",)))


def train_once(world_size: int = 1) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Adapter weights after STEPS steps at global batch GLOBAL_BATCH, and the losses seen by this rank."""
    from peftlab.train.loop import TrainArgs, train

    net = model()
    # Each process loads GLOBAL_BATCH / world_size rows per step; accelerate hands batch k to rank
    # k % world_size, so one optimizer step sees the same GLOBAL_BATCH rows as the single process.
    loader = DataLoader(rows(), batch_size=GLOBAL_BATCH // world_size, shuffle=False)
    result = train(net, loader, TrainArgs(lr=1e-2, warmup_ratio=0.0, max_steps=STEPS, progress=False))
    state = {k: v.detach().clone() for k, v in net.adapter_state_dict().items()}
    return state, result.losses


def main(out: str) -> None:
    import os

    import torch.distributed as dist
    from safetensors.torch import save_file

    world = int(os.environ.get("WORLD_SIZE", "1"))
    state, _ = train_once(world)
    if world > 1:
        # the loop must have joined the process group torchrun set up; otherwise each process
        # trained alone and the comparison in test_ddp.py would be meaningless
        assert dist.is_initialized() and dist.get_world_size() == world, "the loop did not run under DDP"
        if dist.get_rank() == 0:
            save_file({k: v.contiguous() for k, v in state.items()}, out)
        dist.barrier()
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, out)


if __name__ == "__main__":
    main(sys.argv[1])
