"""The GLUE job's own checks (the API behind `peftlab train`): bad settings, a missing model and
bad data are refused with PeftlabError / TaskDataError before anything loads or trains."""
from __future__ import annotations

from pathlib import Path

import pytest

from peftlab.core.errors import PeftlabError
from peftlab.tasks.errors import TaskDataError
from peftlab.train.data import encode_pairs
from peftlab.train.glue_job import GlueRun, load_classifier, run_glue
from peftlab.train.loop import TrainArgs
from tests.assess.conftest import write_glue, write_tiny_model


@pytest.mark.parametrize("field,value", [("train_limit", 0), ("eval_limit", -2), ("batch_size", 0),
                                         ("max_length", 0), ("train_limit", True), ("batch_size", 1.5)])
def test_glue_run_refuses_non_positive_numbers(field: str, value: object) -> None:
    with pytest.raises(PeftlabError, match=f"GlueRun.{field}={value!r}: expected a positive whole number"):
        GlueRun(model="m", task="sst2", data_dir=None, **{field: value})


def test_missing_model_folder_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(PeftlabError) as err:
        load_classifier(str(missing), 2)
    msg = str(err.value)
    assert f"the folder {missing} does not exist" in msg and "not a valid hub id" in msg
    assert f"found in {tmp_path}" in msg or f"{tmp_path} is empty" in msg  # what is there instead


def test_unknown_hub_id_offline_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PeftlabError, match="'nobody-xyz/no-such-model'.*looked up as a hub id"):
        load_classifier("nobody-xyz/no-such-model", 2)


def test_empty_examples_encode_to_nothing() -> None:
    assert encode_pairs([], tokenizer=None, max_length=8) == []  # the tokenizer is never called


@pytest.mark.parametrize("split,content,expected", [
    ("dev", "sentence\tlabel\nfine\t1\nbad row\tmaybe\n", "dev.tsv:3: label 'maybe'"),
    ("train", "sentence\tlabel\n", "SST-2 train split in"),
    ("dev", "sentence\tlabel\n", "SST-2 dev split in"),
])
def test_run_glue_checks_every_split_before_the_model_loads(split: str, content: str, expected: str,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_glue(tmp_path / "glue", tasks=("SST-2",))
    (root / "SST-2" / f"{split}.tsv").write_text(content)

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr("peftlab.train.glue_job.load_classifier", no_model)
    with pytest.raises(TaskDataError, match=expected):
        run_glue(GlueRun(model="m", task="sst2", data_dir=str(root)), None, TrainArgs())


def test_the_frozen_floor_trains_only_the_head_and_backpropagates_through_every_layer(tmp_path, monkeypatch):
    """The study's reference step: the benchmarks' floor (weights frozen, activation gradients down to
    the embeddings) plus the classification head."""
    import peftlab.train.glue_job as glue_job
    from peftlab.tasks.glue import get_glue_task
    from peftlab.train.data import encode_pairs, make_loader
    from peftlab.train.loop import TrainArgs

    model_dir = write_tiny_model(tmp_path / "model")
    data = write_glue(tmp_path / "glue", tasks=("SST-2",), n_train=20)
    run = glue_job.GlueRun(model=str(model_dir), task="sst2", data_dir=str(data), batch_size=4, max_length=16)
    seen = {}
    real_train = glue_job.train

    def spy(model, loader, args, probe=None):
        seen["trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        embeds = model.get_input_embeddings()
        grads = []

        def keep_gradient(module, inputs, out):
            out.register_hook(grads.append)

        embeds.register_forward_hook(keep_gradient)
        result = real_train(model, loader, args, probe=probe)
        seen["embedding_grads"] = len(grads)
        return result

    monkeypatch.setattr(glue_job, "train", spy)
    task = get_glue_task("sst2")
    _, tokenizer = glue_job.load_classifier(str(model_dir), task.num_labels)
    rows = encode_pairs(glue_job.load_glue(task, str(data), "train", None), tokenizer, 16)
    batches = list(make_loader(rows, tokenizer, 4, shuffle=True, seed=0))[:3]
    result = glue_job.frozen_floor(run, task, batches, TrainArgs(seed=0, progress=False))
    assert result.steps == 3
    assert seen["trainable"] and all(n.startswith("classifier.") for n in seen["trainable"])
    assert seen["embedding_grads"] == 3  # the backward reached the embeddings' output at every step
    assert result.step_tokens == [int(b["attention_mask"].sum()) for b in batches]  # exactly those batches
