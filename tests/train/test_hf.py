"""peftlab.train.hf.Trainer: checkpoints, save_model and Hub pushes hold the adapter, not the model."""
from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest
import torch

from peftlab import ChildTuningConfig, LoraConfig, PeftModel, get_peft_model
from peftlab.core.errors import CheckpointError, PeftlabError
from peftlab.core.hub import push_to_hub
from peftlab.core.state import read_tensors
from peftlab.train.hf import PeftlabCallback, Trainer, load_adapters

from ..conftest import model_inputs, tiny_bert
from ..core.test_trainer import Rows

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def lora_model():
    # Dropout in the base model and the adapter, so a resumed run only matches with the RNG state restored.
    return get_peft_model(tiny_bert(), LoraConfig(r=4, dropout=0.1, targets=("@query", "@value"),
                                                  modules_to_save=("classifier",)))


def make_trainer(pm, out, **overrides):
    from transformers import TrainingArguments

    options = dict(output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=16, max_steps=6,
                   save_steps=3, learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, seed=7)
    options.update(overrides.pop("args", {}))
    return Trainer(model=pm, args=TrainingArguments(**options), train_dataset=Rows(), **overrides)


def adapter(pm) -> dict[str, torch.Tensor]:
    return {k: t.detach().clone() for k, t in pm.adapter_state_dict("default").items()}


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_checkpoints_hold_the_adapter_and_evaluate_with_metrics(tmp_path, one_thread):
    pm = lora_model()
    seen = []

    def accuracy(prediction):
        seen.append(prediction.label_ids.shape)
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = make_trainer(pm, tmp_path, eval_dataset=Rows(), compute_metrics=accuracy,
                           args=dict(eval_strategy="steps", eval_steps=3))
    trainer.train()
    assert [type(c) for c in trainer.callback_handler.callbacks].count(PeftlabCallback) == 1  # added for us
    for step in (3, 6):
        checkpoint = tmp_path / f"checkpoint-{step}"
        held = files(checkpoint)
        assert ADAPTER_FILES <= held and "training_args.bin" in held
        assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= held
        assert not any(name.startswith("model") for name in held), held  # no model.safetensors
        full = sum(t.numel() * t.element_size() for t in pm.state_dict().values())
        assert (checkpoint / "adapter_model.safetensors").stat().st_size < full / 10
        assert read_tensors(checkpoint / "adapter_model.safetensors").keys() == pm.adapter_state_dict().keys()
    assert seen == [(32,), (32,)]
    evals = [row for row in trainer.state.log_history if "eval_accuracy" in row]
    assert len(evals) == 2 and all(0 <= row["eval_accuracy"] <= 1 for row in evals)


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(tmp_path, one_thread):
    # 32 rows at batch 4: the checkpoint at step 3 is mid-epoch, so the data order must resume too.
    whole = lora_model()
    make_trainer(whole, tmp_path / "whole").train()
    expected = adapter(whole)

    resumed = lora_model()
    assert any(not torch.equal(t, expected[k]) for k, t in adapter(resumed).items())
    trainer = make_trainer(resumed, tmp_path / "resumed")
    trainer.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    assert trainer.state.global_step == 6
    got = adapter(resumed)
    assert got.keys() == expected.keys()
    for key, tensor in got.items():
        torch.testing.assert_close(tensor, expected[key], rtol=0, atol=1e-6, msg=key)


def test_training_hooks_run_without_a_callback_and_resume(tmp_path, one_thread):
    # Child-Tuning_D refuses to train unless its hooks run (Fisher pass, then a gradient mask at
    # every step); the resumed run keeps the child network saved in the checkpoint.
    def child_model():
        return get_peft_model(tiny_bert(), ChildTuningConfig(targets=("@query", "@value"), fisher_batches=2))

    whole = child_model()
    make_trainer(whole, tmp_path / "whole").train()
    assert whole.training_state.step == 6
    resumed = child_model()
    trainer = make_trainer(resumed, tmp_path / "resumed")
    trainer.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    assert resumed.training_state.step == 6  # counted on from the checkpoint's step
    expected = whole.adapter_state_dict()
    for key, tensor in resumed.adapter_state_dict().items():
        torch.testing.assert_close(tensor, expected[key], rtol=0, atol=1e-6, msg=key)


def test_load_best_model_at_end_loads_the_best_checkpoints_adapter(tmp_path, one_thread):
    pm = lora_model()
    scores = iter([3.0, 2.0])  # the first evaluation is the best one

    trainer = make_trainer(pm, tmp_path, eval_dataset=Rows(), compute_metrics=lambda p: {"score": next(scores)},
                           args=dict(eval_strategy="steps", eval_steps=3, load_best_model_at_end=True,
                                     metric_for_best_model="score", greater_is_better=True))
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-3")
    best = read_tensors(tmp_path / "checkpoint-3" / "adapter_model.safetensors")
    last = read_tensors(tmp_path / "checkpoint-6" / "adapter_model.safetensors")
    assert all(torch.equal(t, best[k]) for k, t in pm.adapter_state_dict().items())
    assert any(not torch.equal(best[k], last[k]) for k in best)


def test_save_model_loads_onto_a_fresh_base_with_equal_logits(tmp_path, one_thread):
    pm = lora_model()
    trainer = make_trainer(pm, tmp_path / "run", args=dict(max_steps=2, save_strategy="no"))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert files(tmp_path / "final") == ADAPTER_FILES | {"training_args.bin"}

    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "final")
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**model_inputs("bert")).logits, pm(**model_inputs("bert")).logits,
                                   rtol=0, atol=0)


def test_every_adapter_is_saved_and_loaded_strictly(tmp_path):
    pm = lora_model()
    pm.add_adapter("other", LoraConfig(r=2, targets=("@value",)))
    pm.save_pretrained(tmp_path)
    assert files(tmp_path) == ADAPTER_FILES | {f"other/{name}" for name in ADAPTER_FILES}
    saved = {name: {k: t.clone() for k, t in pm.adapter_state_dict(name).items()} for name in ("default", "other")}
    with torch.no_grad():
        for name in saved:
            for p in pm.adapter_parameters(name):
                p.add_(1.0)
    load_adapters(pm, tmp_path)
    for name, tensors in saved.items():
        assert all(torch.equal(t, tensors[k]) for k, t in pm.adapter_state_dict(name).items())

    (tmp_path / "other" / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights for adapter 'other'"):
        load_adapters(pm, tmp_path)


def test_a_full_model_checkpoint_is_refused_with_a_way_out(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="plain transformers.Trainer checkpoint"):
        load_adapters(lora_model(), tmp_path)


def test_trainer_refuses_a_model_without_adapters(tmp_path):
    with pytest.raises(PeftlabError, match="must be a peftlab PeftModel"):
        make_trainer(tiny_bert(), tmp_path)


def test_a_given_callback_is_not_added_twice(tmp_path):
    trainer = make_trainer(lora_model(), tmp_path, callbacks=[PeftlabCallback()])
    assert [type(c) for c in trainer.callback_handler.callbacks].count(PeftlabCallback) == 1


# -- the Hub, mocked: HfApi's methods record what would be uploaded -------------------------------
@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import HfApi, RepoUrl

    calls: dict[str, object] = {"uploads": []}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = (repo_id, kwargs)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        ignored = kwargs.get("ignore_patterns") or []
        held = {f for f in files(Path(folder_path)) if not any(Path(f).match(p) for p in ignored)}
        weights = Path(folder_path) / "adapter_model.safetensors"  # read now: the folder may be temporary
        calls["uploads"].append((repo_id, held, read_tensors(weights) if weights.is_file() else {}))
        if kwargs.get("run_as_future"):  # the Trainer's checkpoint pushes run in the background
            done = concurrent.futures.Future()
            done.set_result("commit")
            return done
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_only_the_adapter_folder(hub):
    pm = lora_model()
    pm.add_adapter("other", LoraConfig(r=2, targets=("@value",)))
    assert push_to_hub(pm, "me/my-adapter", private=True) == "commit"
    assert hub["repo"] == ("me/my-adapter", {"private": True, "exist_ok": True, "repo_type": "model"})
    [(repo_id, held, tensors)] = hub["uploads"]
    assert repo_id == "me/my-adapter"
    assert held == ADAPTER_FILES | {f"other/{name}" for name in ADAPTER_FILES}
    assert all(torch.equal(t, tensors[k]) for k, t in pm.adapter_state_dict().items())


def test_push_to_hub_refuses_what_it_cannot_push(hub):
    with pytest.raises(PeftlabError, match="must be a peftlab PeftModel"):
        push_to_hub(tiny_bert(), "me/x")
    with pytest.raises(PeftlabError, match="repo_id"):
        push_to_hub(lora_model(), "")
    assert hub["uploads"] == []


@pytest.mark.skipif("push_to_hub" not in PeftModel.__dict__,
                    reason="PeftModel.push_to_hub not added to core/model.py yet")
def test_the_models_push_to_hub_uploads_the_adapter_not_the_base_model(hub):
    pm = lora_model()
    pm.push_to_hub("me/my-adapter")
    assert [held for _, held, _ in hub["uploads"]] == [ADAPTER_FILES]


def test_trainer_push_to_hub_uploads_the_adapter(tmp_path, hub, one_thread):
    trainer = make_trainer(lora_model(), tmp_path, args=dict(max_steps=1, save_strategy="no", hub_model_id="me/run"))
    trainer.train()
    trainer.push_to_hub()
    [(_, held, _)] = hub["uploads"]
    assert ADAPTER_FILES <= held and not any(name.startswith("model") for name in held), held


def test_checkpoint_pushes_carry_every_adapter(tmp_path, hub, one_thread):
    # transformers copies a checkpoint's adapter files to output_dir only with HF peft installed,
    # and never those in subfolders; the Trainer copies them all before each push.
    pm = lora_model()
    pm.add_adapter("other", LoraConfig(r=2, targets=("@value",)))
    trainer = make_trainer(pm, tmp_path, args=dict(max_steps=2, save_steps=1, push_to_hub=True, hub_model_id="me/run"))
    trainer.train()
    pushed = [held for _, held, _ in hub["uploads"]]
    assert pushed and all(ADAPTER_FILES | {f"other/{name}" for name in ADAPTER_FILES} <= held for held in pushed)
    assert not any(name.startswith("model") for held in pushed for name in held)
