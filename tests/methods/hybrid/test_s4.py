"""S4: the design-space generator (grouping, placement), the default pattern, and the greedy search."""
from __future__ import annotations

import pytest
import torch

from peftlab import PeftlabError, config_from_dict, get_peft_model
from peftlab.core.search import SearchBudget, Trial
from peftlab.core.targets import layer_of
from peftlab.methods.hybrid.s4 import (GROUPINGS, PAPER_STRATEGIES, S4Config, design_pattern, group_sizes,
                                       search)

from ...conftest import tiny_bert, tiny_search_context


def deep_bert(layers: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def placement(pm) -> dict[str, set[int]]:
    """Layers each strategy's modules sit in, read from the wrapped model."""
    where: dict[str, set[int]] = {"adapter": set(), "bitfit": set(), "lora": set(), "prefix": set()}
    kinds = {"SequentialAdapterLayer": "adapter", "BitFitLayer": "bitfit", "LoraLayer": "lora"}
    model = pm.base_model
    for path, module in model.named_modules():
        kind = kinds.get(type(module).__name__)
        if kind:
            where[kind].add(layer_of(model, path)[1])
    for owner in pm.model_adapters.values():
        where["prefix"] |= {layer_of(model, t)[1] for t in getattr(owner, "targets", [])}
    return where


def test_spindle_grouping_sizes():
    # Spindle: the two middle groups hold twice the layers of the outer ones (weights 1, 2, 2, 1).
    assert group_sizes(12, "spindle") == [2, 4, 4, 2]
    assert group_sizes(24, "spindle") == [4, 8, 8, 4]
    assert group_sizes(6, "spindle") == [1, 2, 2, 1]
    assert group_sizes(12, "bottleneck") == [4, 2, 2, 4]
    assert group_sizes(12, "uniform") == [3, 3, 3, 3]
    for layers in (4, 7, 12, 24):
        for grouping in GROUPINGS:
            sizes = group_sizes(layers, grouping)
            assert sum(sizes) == layers and min(sizes) >= 1
        assert group_sizes(layers, "increasing") == sorted(group_sizes(layers, "increasing"))
        assert group_sizes(layers, "decreasing") == sorted(group_sizes(layers, "decreasing"), reverse=True)


def test_generator_puts_each_groups_strategies_on_its_layers():
    config = design_pattern(8)  # spindle: G1 = {0}, G2 = {1, 2, 3}, G3 = {4, 5, 6}, G4 = {7}
    assert config.strategies == PAPER_STRATEGIES  # A+L, A+P, A+P+B, P+B+L
    pm = get_peft_model(deep_bert(8), config)
    assert placement(pm) == {"adapter": {0, 1, 2, 3, 4, 5, 6}, "lora": {0, 7},
                             "prefix": {1, 2, 3, 4, 5, 6, 7}, "bitfit": {4, 5, 6, 7}}
    assert config_from_dict(config.to_dict()) == config
    # Untuned groups get nothing.
    only = design_pattern(8, tuned=(0, 3))
    assert placement(get_peft_model(deep_bert(8), only)) == {"adapter": {0}, "lora": {0, 7}, "prefix": {7},
                                                             "bitfit": {7}}


def test_default_is_the_pattern_for_the_models_depth():
    # 2 layers, 4 groups: the spindle's middle groups G2 (A+P) and G3 (A+P+B) get one layer each.
    pm = get_peft_model(tiny_bert(), S4Config())
    assert placement(pm) == {"adapter": {0, 1}, "prefix": {0, 1}, "bitfit": {1}, "lora": set()}
    # On a 12-layer model the default attaches what the generator writes for 12 layers.
    assert placement(get_peft_model(deep_bert(12), S4Config())) == \
        placement(get_peft_model(deep_bert(12), design_pattern(12)))


def test_bad_input_is_refused_by_name():
    with pytest.raises(PeftlabError, match="groups=4 is more than the model's 2 layers"):
        design_pattern(2, groups=4)
    with pytest.raises(PeftlabError, match="grouping='diamond'"):
        design_pattern(12, grouping="diamond")
    with pytest.raises(PeftlabError, match=r"strategies\[1\]=''.*empty"):
        S4Config(strategies=("adapter", "", "lora", "bitfit"))
    with pytest.raises(PeftlabError, match="strategy_pool"):
        S4Config(strategy_pool=())
    with pytest.raises(PeftlabError, match="allocation"):
        S4Config(allocation="increasing")
    ctx = tiny_search_context()
    with pytest.raises(PeftlabError, match="groups=4 is more than"):
        search(ctx, SearchBudget(trials=2, steps=1), S4Config())
    with pytest.raises(PeftlabError, match=r"budget=0\.001 allows"):
        search(ctx, SearchBudget(trials=2, steps=1), S4Config(groups=2, strategies=("adapter", "lora"), budget=0.001))


class ScoredByDesign:
    """A context whose held-out score is a known function of the design: bottleneck grouping +10,
    tuning only G2 +5, G2 = BitFit+LoRA +1. Every fit is recorded."""

    seed = 0

    def __init__(self):
        self.fits = []

    def new_model(self):
        return deep_bert(4)

    def fit(self, config, steps=None, keep_model=False):
        self.fits.append(config)
        score = (10.0 * (config.grouping == "bottleneck") + 5.0 * (config.tuned == (1,))
                 + 1.0 * (config.strategies[1] == "bitfit+lora"))
        return Trial(config, score, 0, 0.0), None


def test_greedy_stages_run_in_order_and_keep_their_best_choice():
    ctx = ScoredByDesign()
    config = S4Config(groups=2, strategies=("adapter+lora", "adapter+prefix"), budget=0.5)
    result = search(ctx, SearchBudget(trials=40, steps=1), config)
    assert len(ctx.fits) == len(result.trials) <= 40
    stages = [t.info["stage"] for t in result.trials]
    assert stages == sorted(stages, key=["grouping", "tuned", "G1", "G2"].index)  # one stage after another
    assert set(stages) == {"grouping", "tuned", "G2"}  # G1 untuned once tuned = (G2,): nothing to choose
    # Each stage kept its best choice, and later stages build on it.
    found = result.config
    assert (found.grouping, found.tuned, found.strategies[1]) == ("bottleneck", (1,), "bitfit+lora")
    assert all(t.config.grouping == "bottleneck" for t in result.trials if t.info["stage"] != "grouping")
    assert all(t.config.tuned == (1,) for t in result.trials if t.info["stage"] == "G2")
    # Every grouping was tried under the same random draws of the open dimensions.
    grouping_trials = [t for t in result.trials if t.info["stage"] == "grouping" and t.info["sample"] == 0]
    assert {t.info["choice"] for t in grouping_trials} == set(GROUPINGS)
    assert len({(t.config.tuned, t.config.strategies) for t in grouping_trials}) == 1
    # The found design: BitFit + LoRA on G2's layers (bottleneck, 4 layers in 2 groups: 2, 2), nothing else.
    assert placement(get_peft_model(deep_bert(4), found)) == {"adapter": set(), "prefix": set(),
                                                               "lora": {2, 3}, "bitfit": {2, 3}}


def test_trial_budget_and_parameter_budget_are_honoured():
    ctx = tiny_search_context()
    calls = []
    fit = ctx.fit
    ctx.fit = lambda config, steps=None, keep_model=False: calls.append(config) or fit(config, steps, keep_model)
    config = S4Config(groups=2, strategies=("adapter+lora", "adapter+prefix"), budget=0.3)
    result = search(ctx, SearchBudget(trials=3, steps=2), config)
    assert 2 <= len(calls) == len(result.trials) <= 3
    assert any("not searched" in note for note in result.notes)  # too few trials for every stage
    total = sum(p.numel() for p in ctx.new_model().parameters())
    for trial in result.trials:
        assert trial.info["adapter_entries"] <= 0.3 * total
    pm = get_peft_model(ctx.new_model(), result.config)
    assert sum(p.numel() for p in pm.adapter_parameters("default")) <= 0.3 * total
    assert isinstance(result.config, S4Config)
    assert any((result.config.bitfit, result.config.lora, result.config.adapter, result.config.prefix))
