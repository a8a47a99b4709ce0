"""S3Delta-M: gated candidates in a supernet, the shifted-sigmoid budget, greedy selection within the
budget, the found hybrid and the search's trials."""
from __future__ import annotations

import pytest
import torch

from peftlab import PeftlabError, config_from_dict, get_peft_model
from peftlab.core.layer import DeltaModule
from peftlab.core.search import SearchBudget
from peftlab.methods.additive.sequential_adapter import SequentialAdapterLayer
from peftlab.methods.hybrid.s3delta import (KINDS, S3DeltaConfig, S3DeltaSupernetConfig, SupernetSite, found_config,
                                            search, select, solve_shift)
from peftlab.methods.partial.bitfit import BitFitLayer
from peftlab.methods.partial.ln_tuning import LNTuningLayer
from peftlab.methods.reparameterized.lora import LoraLayer

from ...conftest import model_inputs, perturb, tiny_bert, tiny_llama, tiny_search_context

KEY = "s3delta_supernet"


def supernet(**kw):
    pm = get_peft_model(tiny_bert(), S3DeltaSupernetConfig(**kw))
    return pm, pm.model_adapters[KEY]


def fix_gates(structure, z: torch.Tensor) -> None:
    structure.gates = lambda name, training: z  # the sites read whatever the structure hands out


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs("bert")).logits


def inner(module, cls):
    while not isinstance(module, cls):
        module = module.base_layer
    return module


def test_gate_zero_removes_a_candidate_exactly_and_one_gives_its_method():
    pm, structure = supernet()
    perturb(pm, "default", 0, scale=0.3)
    candidates = structure.settings["default"]["candidates"]
    k = len(candidates)
    base = logits(tiny_bert())
    fix_gates(structure, torch.zeros(k))
    assert torch.equal(logits(pm), base), "gates at 0 must leave the base model's output"
    sites = {n.removeprefix("base_model."): m for n, m in pm.named_modules() if isinstance(m, SupernetSite)}
    for kind, wrapper in (("lora", LoraLayer), ("adapter", SequentialAdapterLayer), ("bitfit", BitFitLayer),
                          ("ln_tuning", LNTuningLayer)):
        index = next(i for i, c in enumerate(candidates) if c[0] == kind and c[2] == 1)
        fix_gates(structure, torch.nn.functional.one_hot(torch.tensor(index), k).float())
        gated = logits(pm)
        # The same candidate as the found hybrid's part (its own method's code), with the same weights.
        one = found_config(S3DeltaConfig(), candidates, [index])
        real = get_peft_model(tiny_bert(), one)
        paths = [p for p, m in sites.items() if m.settings["default"].get(kind) == index]
        assert paths
        for path in paths:
            site, layer = sites[path], inner(real.base_model.get_submodule(path), wrapper)
            with torch.no_grad():
                if kind == "lora":
                    layer.lora_A["default"].weight.copy_(site.s3_lora_A["default"])
                    layer.lora_B["default"].weight.copy_(site.s3_lora_B["default"])
                elif kind == "adapter":
                    layer.bottleneck["default"].load_state_dict(site.s3_adapter["default"].state_dict())
                elif kind == "bitfit":
                    layer.bias_delta["default"].copy_(site.s3_bias["default"])
                else:
                    layer.ln_tuning_weight["default"].copy_(site.s3_ln_weight["default"])
                    layer.ln_tuning_bias["default"].copy_(site.s3_ln_bias["default"])
        assert not torch.allclose(gated, base, atol=1e-6), kind
        torch.testing.assert_close(gated, logits(real), atol=1e-6, rtol=1e-5, msg=kind)


def test_shift_holds_the_expected_size_at_the_budget_and_its_gradient_moves_mass():
    pm, structure = supernet(param_budget=0.02)
    sizes, budget = structure.s3_size["default"], structure.settings["default"]["budget"]
    with torch.no_grad():
        structure.s3_alpha["default"].copy_(torch.randn(len(sizes), generator=torch.Generator().manual_seed(0)) * 3)
    p = structure.probabilities("default")
    assert abs(float((p.detach() * sizes).sum()) - budget) < 1e-3 * budget
    # shift_detach: the gradient of the total probability is zero (mass moves between candidates).
    (grad,) = torch.autograd.grad(p.sum(), structure.s3_alpha["default"], retain_graph=True)
    assert grad.abs().max() < 1e-6
    (grad,) = torch.autograd.grad(p[0], structure.s3_alpha["default"])
    assert grad[0] > 0 and (grad[1:] <= 0).all()
    shift = solve_shift(torch.zeros(3), torch.tensor([1.0, 2.0, 3.0]), 3.0, 1.0)
    assert abs(float(torch.sigmoid(-shift)) - 0.5) < 1e-5  # by hand: 6 p = 3


def test_gates_sample_in_training_and_are_the_probabilities_in_eval():
    _, structure = supernet()
    p = structure.probabilities("default").detach()
    torch.manual_seed(0)
    a, b = structure.gates("default", training=True), structure.gates("default", training=True)
    assert not torch.allclose(a, b) and ((a > 0) & (a < 1)).all()
    assert torch.equal(structure.gates("default", training=False).detach(), p)


def test_selection_is_greedy_by_probability_within_the_budget():
    # By hand: 0 (5), 1 does not fit (5 + 10 > 9), 2 (8), 3 (9).
    assert select([0.9, 0.8, 0.7, 0.1], [5, 10, 3, 1], 9) == [0, 2, 3]
    assert select([0.1, 0.9], [4, 4], 3) == []


def test_found_config_attaches_exactly_the_selected_candidates():
    pm, structure = supernet()
    candidates = structure.settings["default"]["candidates"]
    sizes = [int(s) for s in structure.s3_size["default"]]
    chosen = [i for i, (kind, site, layer) in enumerate(candidates)
              if (kind, site, layer) in {("lora", "query", 1), ("lora", "ffn_in", 0), ("bitfit", "layernorm", 0),
                                         ("ln_tuning", "layernorm", 1), ("adapter", "ffn_out", 1)}]
    assert len(chosen) == 5
    found = found_config(S3DeltaConfig(), candidates, chosen)
    assert found.lora.targets == ("@query[1]", "@ffn_in[0]") and found.bitfit.targets == ("@layernorm[0]",)
    assert found.ln_tuning.targets == ("@layernorm[1]",) and found.adapter.targets == ("@ffn_out[1]",)
    assert config_from_dict(found.to_dict()) == found
    real = get_peft_model(tiny_bert(), found)
    wrapped = {n.removeprefix("base_model."): type(m) for n, m in real.named_modules()
               if isinstance(m, DeltaModule) and not n.endswith("base_layer")}
    assert set(wrapped) == {"bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.0.intermediate.dense",
                            "bert.encoder.layer.0.attention.output.LayerNorm", "bert.encoder.layer.0.output.LayerNorm",
                            "bert.encoder.layer.1.attention.output.LayerNorm", "bert.encoder.layer.1.output.LayerNorm",
                            "bert.encoder.layer.1.output.dense"}
    assert sum(p.numel() for p in real.adapter_parameters("default")) == sum(sizes[i] for i in chosen)


def test_search_trains_the_supernet_then_retrains_within_the_budget():
    calls = []
    context = tiny_search_context()
    fit = context.fit
    context.fit = lambda config, steps=None, keep_model=False: calls.append((type(config).__name__, steps)) or fit(
        config, steps, keep_model)
    config = S3DeltaConfig(param_budget=0.01, modules_to_save=("classifier",))
    result = search(context, SearchBudget(trials=3, steps=3), config)
    # the supernet takes the steps of every trial but the retrain's
    assert calls == [("S3DeltaSupernetConfig", 6), ("S3DeltaConfig", 3)]
    assert result.method == "s3delta" and isinstance(result.config, S3DeltaConfig)
    assert result.config.param_budget == 0.01 and result.config.modules_to_save == ("classifier",)
    supernet_trial, retrain = result.trials
    probabilities = supernet_trial.info["probabilities"]
    assert len(set(probabilities.values())) > 1, "the structure logits did not train"
    # The retrained structure trains at most the budget (beside the full classifier head).
    model = tiny_bert()
    head = sum(p.numel() for p in model.classifier.parameters())
    assert retrain.trainable - head <= 0.01 * sum(p.numel() for p in model.parameters())
    assert retrain.config == result.config

    calls.clear()
    short = search(context, SearchBudget(trials=1, steps=2), config)
    assert calls == [("S3DeltaSupernetConfig", 2)] and len(short.trials) == 1 and "not retrained" in short.notes[-1]
    calls.clear()
    late = search(context, SearchBudget(trials=5, steps=2, minutes=1e-6), config)  # no time for the retrain
    assert calls == [("S3DeltaSupernetConfig", 8)] and len(late.trials) == 1


def test_supernet_learning_rate_of_the_structure_logits():
    pm, structure = supernet(alpha_lr=0.25)
    groups = pm.param_groups(1e-4, weight_decay=0.01)
    alpha = structure.s3_alpha["default"]
    (group,) = [g for g in groups if any(p is alpha for p in g["params"])]
    assert group["lr"] == 0.25 and group["weight_decay"] == 0.0 and len(group["params"]) == 1


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, True, "0.01"])
def test_param_budget_outside_zero_one_is_refused(value):
    with pytest.raises(PeftlabError, match="param_budget"):
        S3DeltaConfig(param_budget=value)


def test_bad_search_spaces_are_refused_by_name():
    with pytest.raises(PeftlabError, match="candidates"):
        S3DeltaConfig(candidates=())
    with pytest.raises(PeftlabError, match="candidates"):
        S3DeltaConfig(candidates=("lora", "prefix"))
    with pytest.raises(PeftlabError, match="smallest candidate"):
        get_peft_model(tiny_bert(), S3DeltaSupernetConfig(param_budget=1e-6))
    with pytest.raises(PeftlabError, match="nothing to choose"):
        get_peft_model(tiny_bert(), S3DeltaSupernetConfig(param_budget=0.9))
    with pytest.raises(PeftlabError, match="no place"):  # Llama has no biases for BitFit
        get_peft_model(tiny_llama(), S3DeltaSupernetConfig(candidates=("bitfit",)))
    with pytest.raises(PeftlabError, match="expected one part"):
        S3DeltaConfig(lora=None, ln_tuning=None)


def test_default_config_is_rank_one_lora_on_query_and_ln_tuning_on_every_norm():
    config = S3DeltaConfig()
    assert config.lora.r == 1 and config.lora.targets == ("@query",) and config.ln_tuning.targets == ("@layernorm",)
    assert config.adapter is None and config.bitfit is None and config.candidates == KINDS
    model = get_peft_model(tiny_llama(), config)  # no biases needed
    assert any(isinstance(m, LNTuningLayer) for m in model.modules())
