import pytest
import torch

from peftlab import LoraConfig, PeftlabError
from peftlab.core.search import Trial

from ..conftest import GLUE, MINILM, require_shared, tiny_search_context


def test_each_candidate_starts_from_the_same_base_and_trains_its_steps():
    context = tiny_search_context()
    base = {k: v.clone() for k, v in context.base.state_dict().items()}
    trial, model = context.fit(LoraConfig(r=2), steps=2, keep_model=True)
    assert isinstance(trial, Trial) and 0.0 <= trial.score <= 1.0 and trial.config == LoraConfig(r=2)
    # LoRA r=2 on query/value of two layers (2 x 2 x (32+32) x 2) plus the trained head (32 x 2 + 2)
    assert trial.trainable == 2 * 2 * 2 * 64 + 66
    assert model.base_model.classifier.copies["default"].weight.requires_grad  # the head trains too
    assert all(torch.equal(v, context.base.state_dict()[k]) for k, v in base.items())  # base untouched
    again, dropped = context.fit(LoraConfig(r=2), steps=2)
    assert dropped is None and again.score == trial.score  # same seed, same base: the same candidate


def test_glue_context_holds_out_training_examples(tmp_path):
    from peftlab.train.glue_job import GlueRun
    from peftlab.train.loop import TrainArgs
    from peftlab.train.search import glue_search_context

    run = GlueRun(model=str(require_shared(MINILM)), task="sst2", data_dir=str(require_shared(GLUE)),
                  train_limit=40, batch_size=8, max_length=32)
    context = glue_search_context(run, TrainArgs(lr=1e-3, seed=0, progress=False), holdout=0.25)
    trial, _ = context.fit(LoraConfig(r=2), steps=1)
    assert 0.0 <= trial.score <= 1.0
    with pytest.raises(PeftlabError, match="holdout=1.5"):
        glue_search_context(run, TrainArgs(), holdout=1.5)
