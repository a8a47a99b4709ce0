"""The training loop runs unchanged under torchrun (DDP, two CPU processes, gloo), and gives the
adapter weights of one process training at the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train import ddp_worker

WORKER = Path(ddp_worker.__file__)


def test_two_process_ddp_matches_one_process(tmp_path):
    pytest.importorskip("accelerate")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no gloo backend for CPU DDP")
    from safetensors.torch import load_file

    out = tmp_path / "ddp_adapter.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join(filter(None, [str(WORKER.parents[2]),
                                                                                    os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    ddp = load_file(str(out))
    single, losses = ddp_worker.train_once(world_size=1)
    assert set(ddp) == set(single) and ddp
    initial = ddp_worker.model().adapter_state_dict()
    moved = max((single[k] - initial[k]).abs().max().item() for k in single)
    assert moved > 1e-3, "the adapter did not train, so the comparison would prove nothing"
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    assert len(losses) == ddp_worker.STEPS
