"""`peftlab train --grad-accum / --mixed-precision / --save-every / --resume`: bad values are refused
with the flag named, and a run killed midway resumes from its checkpoint to the same adapter."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftlab.cli import main
from tests.assess.conftest import write_glue, write_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture()
def sst2(tmp_path: Path) -> Path:
    return write_glue(tmp_path / "glue", tasks=("SST-2",)) / "SST-2"  # 16 training rows, 12 dev rows


def argv(model: Path, task: Path, out: Path, *extra: str) -> list[str]:
    # 4 batches of 4 per epoch, 2 epochs: 8 optimizer steps
    return ["train", "--model", str(model), "--task", str(task), "--max-length", "16", "--batch-size", "4",
            "--epochs", "2", "--lr", "1e-3", "--out", str(out), *extra]


def usage_error(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    return err


def error(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    assert main(args) == 2
    return capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("flag,value,expected", [
    ("--grad-accum", "0", "argument --grad-accum: '0': expected a positive whole number"),
    ("--save-every", "-3", "argument --save-every: '-3': expected a positive whole number"),
    ("--mixed-precision", "fp32", "argument --mixed-precision: 'fp32': expected no, bf16 (CPU or GPU) or fp16 (GPU only)"),
])
def test_bad_values_are_refused_naming_the_flag(capsys, tmp_path, flag, value, expected):
    assert expected in usage_error(capsys, argv(Path("m"), Path("sst2"), tmp_path, flag, value))


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed with a GPU")
def test_fp16_without_a_gpu_is_refused(capsys, tmp_path):
    err = usage_error(capsys, argv(Path("m"), Path("sst2"), tmp_path, "--mixed-precision", "fp16"))
    assert "argument --mixed-precision: 'fp16' needs a CUDA GPU" in err and "use bf16" in err


def test_resume_without_a_checkpoint_is_refused(capsys, tiny_model, sst2, tmp_path):
    out = tmp_path / "out"
    last = error(capsys, argv(tiny_model, sst2, out, "--resume"))
    assert last == (f"peftlab: error: --resume: no checkpoint to resume from in {out / 'checkpoints'} "
                    f"({out / 'checkpoints'} does not exist); pass the --out of a run started with --save-every N, "
                    "or drop --resume to start afresh")


class Crash(Exception):
    pass


def test_a_killed_run_resumes_to_the_same_adapter(capsys, monkeypatch, tiny_model, sst2, tmp_path):
    import peftlab.train.glue_job as glue_job

    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert main(argv(tiny_model, sst2, whole, "--save-every", "2")) == 0
    assert [p.name for p in (whole / "checkpoints").iterdir()] == ["step-00000008"]

    real_train = glue_job.train

    def killed_at_step_4(*args, **kwargs):  # after the checkpoint of step 2, before that of step 4
        def on_step(step: int, loss: float) -> None:
            if step == 4:
                raise Crash
        return real_train(*args, on_step=on_step, **kwargs)

    monkeypatch.setattr(glue_job, "train", killed_at_step_4)
    with pytest.raises(Crash):
        main(argv(tiny_model, sst2, broken, "--save-every", "2"))
    assert not (broken / "metrics.json").exists()
    assert [p.name for p in (broken / "checkpoints").iterdir()] == ["step-00000002"]
    monkeypatch.setattr(glue_job, "train", real_train)

    # without --resume the old checkpoints are not silently mixed with a new run
    assert "add --resume to continue it" in error(capsys, argv(tiny_model, sst2, broken, "--save-every", "2"))
    assert main(argv(tiny_model, sst2, broken, "--save-every", "2", "--resume")) == 0
    a, b = load_file(str(whole / "adapter_model.safetensors")), load_file(str(broken / "adapter_model.safetensors"))
    assert set(a) == set(b) and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7, msg=key)
    first, second = (json.loads((folder / "metrics.json").read_text()) for folder in (whole, broken))
    assert first["metrics"] == second["metrics"] and first["steps"] == second["steps"] == 8
    assert second["final_loss"] == pytest.approx(first["final_loss"], abs=1e-6)


def test_accumulation_and_bf16_flags_reach_the_loop(tiny_model, sst2, tmp_path):
    out = tmp_path / "out"
    assert main(argv(tiny_model, sst2, out, "--method", "ia3", "--grad-accum", "2", "--mixed-precision", "bf16")) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["steps"] == 4  # 4 batches an epoch, 2 per step, 2 epochs
    assert summary["train_args"]["grad_accum_steps"] == 2 and summary["train_args"]["mixed_precision"] == "bf16"
