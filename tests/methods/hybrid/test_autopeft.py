"""AutoPEFT: a multi-objective GP search over serial adapter / parallel adapter / prefix, per layer."""
from __future__ import annotations

import dataclasses

import optuna
import pytest
import torch

from peftlab import PeftlabError, get_peft_model
from peftlab.core.registry import get_method
from peftlab.core.search import SearchBudget, pareto_front
from peftlab.methods.additive.parallel_adapter import ParallelAdapterConfig, ParallelAdapterLayer
from peftlab.methods.additive.prefix_tuning import PrefixTuningConfig
from peftlab.methods.additive.sequential_adapter import SequentialAdapterConfig, SequentialAdapterLayer
from peftlab.assess.plots import write_search_front
from peftlab.methods.hybrid.autopeft import AutoPeftConfig, candidate, search, size_grid

from ...conftest import main_output, model_inputs, tiny_bert, tiny_search_context


class Counting:
    """A search context that counts training runs."""

    def __init__(self, seed: int = 0) -> None:
        self.inner, self.fits = tiny_search_context(seed=seed), 0
        self.seed = self.inner.seed

    def new_model(self):
        return self.inner.new_model()

    def fit(self, config, steps=None, keep_model=False):
        self.fits += 1
        assert isinstance(config, AutoPeftConfig) and steps == 2
        return self.inner.fit(config, steps, keep_model)


@pytest.fixture(scope="module")
def searched():
    context = Counting()
    studies = []
    create = optuna.create_study

    def spy(*args, **kwargs):
        studies.append(create(*args, **kwargs))
        return studies[-1]

    optuna.create_study = spy
    try:
        result = search(context, SearchBudget(trials=5, steps=2), AutoPeftConfig())
    finally:
        optuna.create_study = create
    return context, result, studies[0]


def test_registered_with_its_search():
    spec = get_method("autopeft")
    assert spec.search is search and spec.config_cls is AutoPeftConfig and spec.family == "hybrid"


def test_one_fit_per_trial_and_the_front_of_what_it_measured(searched):
    context, result, _ = searched
    assert context.fits == len(result.trials) == 5
    assert result.front == pareto_front([(t.score, float(t.trainable)) for t in result.trials])
    assert isinstance(result.config, AutoPeftConfig)
    best = max(result.front, key=lambda i: (result.trials[i].score, -result.trials[i].trainable))
    assert result.config == result.trials[best].config


def test_each_trial_is_the_sampled_point(searched):
    _, result, study = searched
    for trial in result.trials:
        info, config = trial.info, trial.config
        assert config == candidate(AutoPeftConfig(), info["layers"], info["sizes"])
        params = study.trials[info["optuna_trial"]].params
        assert info["layers"] == [i for i in range(2) if params[f"layer_{i}"]]
        assert info["sizes"]["serial"] == size_grid(32)[params["serial_size_index"]]


def test_two_objectives_on_optunas_gp_sampler(searched):
    _, result, study = searched
    assert isinstance(study.sampler, optuna.samplers.GPSampler)
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    for trial in result.trials:
        assert study.trials[trial.info["optuna_trial"]].values == [trial.score, trial.info["param_percent"]]


def test_same_seed_same_trials(searched):
    _, result, _ = searched
    again = search(Counting(), SearchBudget(trials=5, steps=2), AutoPeftConfig())
    assert [t.info for t in again.trials] == [t.info for t in result.trials]
    assert [t.score for t in again.trials] == [t.score for t in result.trials]


def test_found_config_attaches_its_parts_at_its_layers_only():
    config = candidate(AutoPeftConfig(), [1], {"serial": 4, "parallel": 0, "prefix": 2})
    assert config.parallel is None and config.serial.targets == ("@ffn_out[1]",)
    pm = get_peft_model(tiny_bert(), config)
    serial = {n for n, m in pm.base_model.named_modules() if isinstance(m, SequentialAdapterLayer)}
    assert serial == {"bert.encoder.layer.1.output.dense"}
    assert not any(isinstance(m, ParallelAdapterLayer) for m in pm.base_model.modules())
    assert pm.model_adapters["prefix_tuning"].targets == ["bert.encoder.layer.1.attention.self"]
    # Both layers with every part: the default's placement.
    full = get_peft_model(tiny_bert(), AutoPeftConfig())
    parallel = {n for n, m in full.base_model.named_modules() if isinstance(m, ParallelAdapterLayer)}
    assert parallel == {"bert.encoder.layer.0.output", "bert.encoder.layer.1.output"}
    assert len(full.model_adapters["prefix_tuning"].targets) == 2


def test_budget_time_is_honoured():
    class OneThenStop(SearchBudget):
        def time_left(self, started):
            return context.fits == 0

    context = Counting()
    result = search(context, OneThenStop(trials=4, steps=2), AutoPeftConfig())
    assert context.fits == len(result.trials) == 1 and any("ran out" in n for n in result.notes)

    class NoTime(SearchBudget):
        def time_left(self, started):
            return False

    with pytest.raises(PeftlabError, match="budget.minutes"):
        search(Counting(), NoTime(trials=4, steps=2), AutoPeftConfig())


def test_search_parts_and_param_budget_are_read():
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        result = search(Counting(), SearchBudget(trials=3, steps=2),
                        AutoPeftConfig(search_parts=("serial",), max_param_percent=1e-6))
        assert optuna.logging.get_verbosity() == optuna.logging.INFO  # silenced during the search only
    finally:
        optuna.logging.set_verbosity(before)
    assert all(t.config.parallel is None and t.config.prefix is None for t in result.trials)
    assert result.config == result.trials[result.front[0]].config  # nothing fits 1e-6 %: the cheapest
    assert any("max_param_percent" in n for n in result.notes)


def test_size_grid_is_the_papers_on_bert_base_and_scales():
    assert size_grid(768) == [768, 384, 192, 96, 48, 24, 12, 6, 3, 1, 0]
    assert size_grid(384) == [384, 192, 96, 48, 24, 12, 6, 3, 1, 0]


def test_bad_input_is_named():
    with pytest.raises(PeftlabError, match="search_parts"):
        AutoPeftConfig(search_parts=())
    with pytest.raises(PeftlabError, match="expected one part"):
        AutoPeftConfig(serial=None, parallel=None, prefix=None)
    with pytest.raises(PeftlabError, match="SearchBudget.trials"):
        SearchBudget(trials=0)
    model = tiny_bert()
    inputs = model_inputs("bert")
    with torch.no_grad():
        before = main_output(model(**inputs))
    too_wide = AutoPeftConfig(serial=SequentialAdapterConfig(targets=("@ffn_out",), bottleneck=64))
    with pytest.raises(PeftlabError, match=r"serial.bottleneck=64 .*width d = 32"):
        get_peft_model(model, too_wide)
    too_long = AutoPeftConfig(prefix=PrefixTuningConfig(targets=("@attention",), num_virtual_tokens=40,
                                                        prefix_projection=False, cross_attention=False))
    with pytest.raises(PeftlabError, match=r"num_virtual_tokens=40 .*at most 32"):
        get_peft_model(model, too_long)
    no_layer = AutoPeftConfig(parallel=ParallelAdapterConfig(targets=("@ffn[5]",), bottleneck=4))
    with pytest.raises(PeftlabError, match="layer 5 does not exist"):
        get_peft_model(model, no_layer)
    with torch.no_grad():
        torch.testing.assert_close(main_output(model(**inputs)), before)  # untouched by the failed calls
    with pytest.raises(PeftlabError, match="AutoPeftConfig"):
        search(Counting(), SearchBudget(trials=1), ParallelAdapterConfig())


def test_write_front_writes_a_table_and_a_plot(searched, tmp_path):
    _, result, _ = searched
    table, plot = write_search_front(result, tmp_path)
    text = table.read_text()
    assert text.count("\n| ") == len(result.trials) + 1 and "**chosen**" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert dataclasses.asdict(result.budget)["trials"] == 5
