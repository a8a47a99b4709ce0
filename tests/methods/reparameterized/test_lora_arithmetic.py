"""LoRA adapter arithmetic: ``PeftModel.add_weighted_adapter`` with LoRA's combination types."""
import pytest
import torch
from torch import nn

from peftlab import IA3Config, LoraConfig, PeftlabError, get_peft_model
from peftlab.core.layer import base_of
from peftlab.methods.reparameterized.lora import LoraLayer, write_combination

from ...conftest import model_inputs, tiny_bert, tiny_gpt2

# Per model: targets that cover a Linear and an Embedding (BERT) and a Conv1D (GPT-2; not its embedding,
# which the LM head shares, so adding to that weight in the reference below would change the head too).
TARGETS = {"bert": ("query", "value", "word_embeddings"), "gpt2": ("c_attn", "c_proj")}
MAKERS = {"bert": tiny_bert, "gpt2": tiny_gpt2}


def _randomize(pm, names, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            for p in pm.adapter_parameters(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _two_adapters(kind="bert", r=(2, 4), alpha=(4, 3)):
    targets = TARGETS[kind]
    pm = get_peft_model(MAKERS[kind](), LoraConfig(r=r[0], alpha=alpha[0], targets=targets), "a")
    pm.add_adapter("b", LoraConfig(r=r[1], alpha=alpha[1], targets=targets))
    _randomize(pm, ["a", "b"])
    return pm


def _lora_layers(pm):
    return [m for _, m in pm.named_modules() if isinstance(m, LoraLayer)]


def _output_with_weight_delta(pm, deltas, inputs):
    """The base model's output with ``deltas[layer]`` added to each wrapped layer's weight."""
    with pm.disable_adapter(), torch.no_grad():
        for layer, delta in deltas.items():
            base_of(layer).weight.add_(delta)
        try:
            return pm(**inputs).logits
        finally:
            for layer, delta in deltas.items():
                base_of(layer).weight.sub_(delta)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
@pytest.mark.parametrize("combination_type,options,rank", [
    ("cat", {}, 6),
    ("svd", {"svd_rank": 6}, 6),  # full rank of the sum: exact
])
def test_exact_types_give_the_weighted_sum_of_updates(kind, combination_type, options, rank):
    pm = _two_adapters(kind)
    weights = [0.7, -1.3]
    pm.add_weighted_adapter(["a", "b"], weights, "new", combination_type, **options)
    assert pm.peft_configs["new"].r == rank and pm.peft_configs["new"].scaling == 1.0
    layers = _lora_layers(pm)
    assert len(layers) == 5 if kind == "bert" else len(layers) == 6
    assert any(layer.is_embedding for layer in layers) if kind == "bert" else all(layer.transposed for layer in layers)
    expected = {}
    for layer in layers:
        assert "new" in layer.settings
        expected[layer] = weights[0] * layer.delta_weight("a") + weights[1] * layer.delta_weight("b")
        assert torch.allclose(layer.delta_weight("new"), expected[layer], atol=1e-5)
    inputs = model_inputs(kind)
    pm.set_adapter("new")
    with torch.no_grad():
        out = pm(**inputs).logits
    assert torch.allclose(out, _output_with_weight_delta(pm, expected, inputs), atol=1e-4)
    # The sources are untouched and the new adapter is a plain LoRA adapter that saves.
    assert sorted(pm.peft_configs) == ["a", "b", "new"]
    assert any(k.endswith("lora_A.weight") for k in pm.adapter_state_dict("new"))


def test_svd_below_full_rank_is_the_best_low_rank_approximation():
    pm = _two_adapters()
    pm.add_weighted_adapter(["a", "b"], [1.0, 1.0], "new", "svd", svd_rank=3)
    for layer in _lora_layers(pm):
        total = layer.delta_weight("a") + layer.delta_weight("b")
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        assert torch.allclose(layer.delta_weight("new"), best, atol=1e-5)
    assert pm.peft_configs["new"].r == 3


def test_svd_default_rank_is_the_largest():
    pm = _two_adapters()
    pm.add_weighted_adapter(["a", "b"], [1.0, 1.0], "new", "svd")
    assert pm.peft_configs["new"].r == 4


def test_linear_is_the_weighted_sum_of_A_and_B():
    pm = _two_adapters(r=(3, 3), alpha=(6, 6))
    weights = [0.5, -2.0]
    pm.add_weighted_adapter(["a", "b"], weights, "new", "linear")
    config = pm.peft_configs["new"]
    assert (config.r, config.alpha, config.scaling) == (3, 6, 2.0)
    for layer in _lora_layers(pm):
        for attr in (("lora_embedding_A", "lora_embedding_B") if layer.is_embedding else ("lora_A", "lora_B")):
            tensors = {n: getattr(layer, attr)[n] for n in ("a", "b", "new")}
            tensors = {n: t if isinstance(t, torch.Tensor) else t.weight for n, t in tensors.items()}
            assert torch.allclose(tensors["new"], weights[0] * tensors["a"] + weights[1] * tensors["b"], atol=1e-6)
        # Not the weighted sum of the updates: the product has cross terms.
        summed = weights[0] * layer.delta_weight("a") + weights[1] * layer.delta_weight("b")
        assert not torch.allclose(layer.delta_weight("new"), summed, atol=1e-4)


def test_linear_folds_unequal_scales_into_B():
    pm = _two_adapters(r=(3, 3), alpha=(6, 3))  # scales 2 and 1
    pm.add_weighted_adapter(["a", "b"], [1.0, 1.0], "new", "linear")
    for layer in _lora_layers(pm):
        if layer.is_embedding:
            continue
        A = {n: layer.lora_A[n].weight for n in "ab"}
        B = {n: layer.lora_B[n].weight for n in "ab"}
        expected = 2.0 * (B["a"] + 0.5 * B["b"]) @ (A["a"] + A["b"])  # new scale 2 (the first adapter's)
        assert torch.allclose(layer.delta_weight("new"), expected, atol=1e-5)


def test_one_adapter_linear_weight_one_is_a_copy():
    pm = _two_adapters()
    pm.add_weighted_adapter(["a"], [1.0], "dup", "linear")
    for layer in _lora_layers(pm):
        assert torch.allclose(layer.delta_weight("dup"), layer.delta_weight("a"))


class _One(nn.Module):
    """One 2x2 linear layer, for combinations checked by hand."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(2, 2, bias=False)

    def forward(self, x):
        return self.proj(x)


TAU_1 = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
TAU_2 = torch.tensor([[-2.0, -4.0], [1.0, 0.1]])


def _hand_model():
    """Adapters a and b (rank 2, scale 1) whose updates are exactly TAU_1 and TAU_2."""
    torch.manual_seed(0)
    pm = get_peft_model(_One(), LoraConfig(r=2, alpha=2, targets=("proj",)), "a")
    pm.add_adapter("b", LoraConfig(r=2, alpha=2, targets=("proj",)))
    layer = pm.base_model.proj
    with torch.no_grad():
        for name, tau in (("a", TAU_1), ("b", TAU_2)):
            layer.lora_A[name].weight.copy_(torch.eye(2))
            layer.lora_B[name].weight.copy_(tau)
    return pm, layer


def test_ties_by_hand():
    pm, layer = _hand_model()
    # density 0.5 keeps 2 of 4 entries: TAU_1 -> [[3, 0], [0, 2]], TAU_2 -> [[-2, -4], [0, 0]].
    # Elected signs (sign of the sum [[1, -4], [0, 2]]): [[+, -], [+, +]]; disjoint mean of agreeing values.
    pm.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ties", "ties", density=0.5, svd_rank=2)
    assert torch.allclose(layer.delta_weight("ties"), torch.tensor([[3.0, -4.0], [0.0, 2.0]]), atol=1e-5)
    # Weights scale the task vectors before the election: 2 * TAU_2 outvotes TAU_1 at [0, 0].
    pm.add_weighted_adapter(["a", "b"], [1.0, 2.0], "ties2", "ties", density=0.5, svd_rank=2)
    assert torch.allclose(layer.delta_weight("ties2"), torch.tensor([[-4.0, -8.0], [0.0, 2.0]]), atol=1e-5)
    # "frequency" counts signs: at [0, 0] the vote ties (+1, -1) and goes to +.
    pm.add_weighted_adapter(["a", "b"], [1.0, 2.0], "freq", "ties", density=0.5, svd_rank=2,
                            majority_sign_method="frequency")
    assert torch.allclose(layer.delta_weight("freq"), torch.tensor([[3.0, -8.0], [0.0, 2.0]]), atol=1e-5)
    # Averaging, not summing, where both agree: density 1 keeps all; at [1, 0] both are positive.
    pm.add_weighted_adapter(["a", "b"], [1.0, 1.0], "full", "ties", density=1.0, svd_rank=2)
    assert torch.allclose(layer.delta_weight("full"), torch.tensor([[3.0, -2.5], [0.75, 1.05]]), atol=1e-5)


def _dare_masks(seed, n, density):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(2, 2, generator=g) < density for _ in range(n)]


def test_peft_names_of_the_svd_types():
    pm, layer = _hand_model()
    pm.add_weighted_adapter(["a", "b"], [1.0, 2.0], "ours", "ties", density=0.5, svd_rank=2)
    pm.add_weighted_adapter(["a", "b"], [1.0, 2.0], "peft", "ties_svd", density=0.5, svd_rank=2)
    assert torch.equal(layer.delta_weight("ours"), layer.delta_weight("peft"))
    pm.add_weighted_adapter(["a", "b"], [1.0, 2.0], "dare", "dare_ties_svd", density=0.5, seed=0)
    assert pm.peft_configs["dare"].r == 2


def test_dare_by_hand():
    pm, layer = _hand_model()
    m1, m2 = _dare_masks(7, 2, 0.5)
    d1, d2 = TAU_1 * m1 / 0.5, 0.5 * TAU_2 * m2 / 0.5
    pm.add_weighted_adapter(["a", "b"], [1.0, 0.5], "lin", "dare_linear", density=0.5, seed=7, svd_rank=2)
    assert torch.allclose(layer.delta_weight("lin"), d1 + d2, atol=1e-5)
    pm.add_weighted_adapter(["a", "b"], [1.0, 0.5], "ties", "dare_ties", density=0.5, seed=7, svd_rank=2)
    stacked = torch.stack([d1, d2])
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == elected
    expected = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    assert torch.allclose(layer.delta_weight("ties"), expected, atol=1e-5)


def test_dare_seed_reproducible_and_unbiased():
    pm, layer = _hand_model()
    pm.add_weighted_adapter(["a", "b"], [1.0, 1.0], "x", "dare_linear", density=0.5, seed=3, svd_rank=2)
    pm.add_weighted_adapter(["a", "b"], [1.0, 1.0], "y", "dare_linear", density=0.5, seed=3, svd_rank=2)
    pm.add_weighted_adapter(["a", "b"], [1.0, 1.0], "z", "dare_linear", density=0.5, seed=4, svd_rank=2)
    assert torch.equal(layer.delta_weight("x"), layer.delta_weight("y"))
    assert not torch.allclose(layer.delta_weight("x"), layer.delta_weight("z"))
    pm.add_weighted_adapter(["a", "b"], [1.0, 1.0], "keep_all", "dare_linear", density=1.0, svd_rank=2)
    assert torch.allclose(layer.delta_weight("keep_all"), TAU_1 + TAU_2, atol=1e-5)
    # The rescale keeps the expectation: the mean over many seeds approaches the plain sum.
    mean = torch.zeros(2, 2)
    masks_seen = 400
    for seed in range(masks_seen):
        m1, m2 = _dare_masks(seed, 2, 0.5)
        mean += (TAU_1 * m1 + TAU_2 * m2) / 0.5 / masks_seen
    assert torch.allclose(mean, TAU_1 + TAU_2, atol=0.5)


def test_dora_adapters_combine_by_their_whole_update():
    pm = get_peft_model(tiny_bert(), LoraConfig(r=2, targets=("query",), use_dora=True), "a")
    pm.add_adapter("b", LoraConfig(r=2, targets=("query",)))
    _randomize(pm, ["a", "b"])
    pm.add_weighted_adapter(["a", "b"], [1.0, 0.5], "new", "svd", svd_rank=4)
    for layer in _lora_layers(pm):
        expected = layer.delta_weight("a") + 0.5 * layer.delta_weight("b")
        # DoRA's update is full rank in general: rank 4 approximates it, so compare the best rank-4 fit.
        u, s, vh = torch.linalg.svd(expected, full_matrices=False)
        assert torch.allclose(layer.delta_weight("new"), (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5)
    with pytest.raises(PeftlabError, match="DoRA"):
        pm.add_weighted_adapter(["a", "b"], [1.0, 0.5], "lin", "linear")


def test_write_combination_rewrites_in_place():
    pm = _two_adapters(r=(3, 3), alpha=(6, 6))
    pm.add_weighted_adapter(["a", "b"], [0.0, 0.0], "new", "linear")
    write_combination(pm, ["a", "b"], [1.0, 0.0], "new", "linear")
    for layer in _lora_layers(pm):
        assert torch.allclose(layer.delta_weight("new"), layer.delta_weight("a"))
    with pytest.raises(PeftlabError, match="was not made by combining"):
        write_combination(pm, ["a", "b"], [1.0, 0.0], "a_missing", "linear")


@pytest.mark.parametrize("case,call,match", [
    ("different methods", lambda pm: pm.add_weighted_adapter(["a", "ia3"], [1, 1], "new", "cat"), "one method"),
    ("different targets", lambda pm: pm.add_weighted_adapter(["a", "q"], [1, 1], "new", "cat"), "different layers"),
    ("unequal ranks, linear", lambda pm: pm.add_weighted_adapter(["a", "b"], [1, 1], "new", "linear"), "equal ranks"),
    ("unknown type", lambda pm: pm.add_weighted_adapter(["a", "b"], [1, 1], "new", "mean"), "offers"),
    ("weights length", lambda pm: pm.add_weighted_adapter(["a", "b"], [1], "new", "cat"), "one weight per adapter"),
    ("no density", lambda pm: pm.add_weighted_adapter(["a", "b"], [1, 1], "new", "ties"), "needs density"),
    ("bad density", lambda pm: pm.add_weighted_adapter(["a", "b"], [1, 1], "new", "dare_ties", density=1.5),
     "needs density"),
    ("option not read", lambda pm: pm.add_weighted_adapter(["a", "b"], [1, 1], "new", "cat", density=0.5),
     "do not apply"),
    ("bad svd_rank", lambda pm: pm.add_weighted_adapter(["a", "b"], [1, 1], "new", "svd", svd_rank=0), "svd_rank"),
    ("bad sign method", lambda pm: pm.add_weighted_adapter(["a", "b"], [1, 1], "new", "ties", density=0.5,
                                                           majority_sign_method="mode"), "majority_sign_method"),
    ("head copies", lambda pm: pm.add_weighted_adapter(["a", "h"], [1, 1], "new", "cat"), "modules_to_save"),
    ("unknown adapter", lambda pm: pm.add_weighted_adapter(["a", "zz"], [1, 1], "new", "cat"), "no adapter named"),
])
def test_bad_requests_raise_and_change_nothing(case, call, match):
    pm = _two_adapters()
    pm.add_adapter("q", LoraConfig(r=2, targets=("query",)))
    pm.add_adapter("h", LoraConfig(r=2, targets=TARGETS["bert"], modules_to_save=("classifier",)))
    pm.add_adapter("ia3", IA3Config())
    inputs = model_inputs("bert")
    with torch.no_grad():
        before = pm(**inputs).logits
    names, modules = sorted(pm.peft_configs), [n for n, _ in pm.named_modules()]
    with pytest.raises(PeftlabError, match=match):
        call(pm)
    assert sorted(pm.peft_configs) == names
    assert [n for n, _ in pm.named_modules()] == modules
    assert not any("new" in m.adapter_names() for m in _lora_layers(pm))
    with torch.no_grad():
        assert torch.equal(pm(**inputs).logits, before)


def test_error_names_the_differing_targets_and_ranks():
    pm = _two_adapters()
    pm.add_adapter("q", LoraConfig(r=2, targets=("query",)))
    with pytest.raises(PeftlabError) as err:
        pm.add_weighted_adapter(["a", "q"], [1, 1], "new", "svd")
    assert "value" in str(err.value) and "'q'" in str(err.value)
    with pytest.raises(PeftlabError) as err:
        pm.add_weighted_adapter(["a", "b"], [1, 1], "new", "linear")
    assert "'a': 2" in str(err.value) and "'b': 4" in str(err.value)


@pytest.mark.parametrize("ours,theirs,weights,options", [
    ("cat", "cat", [0.7, -1.3], {}),
    ("svd", "svd", [0.7, -1.3], {"svd_rank": 6}),
    ("ties", "ties_svd", [0.6, 0.6], {"density": 0.5, "svd_rank": 6}),  # equal positive weights: same election
    ("linear", "linear", [1.0, 1.0], {}),  # peft's sqrt-split weights agree with ours at weight 1
])
def test_same_outputs_as_peft(tmp_path, ours, theirs, weights, options):
    peft = pytest.importorskip("peft", reason="HF peft is a test extra: pip install -e .[test]")
    r = (4, 4) if ours == "linear" else (2, 4)
    pm = _two_adapters(r=r, alpha=(4, 4) if ours == "linear" else (4, 3))
    pm.add_weighted_adapter(["a", "b"], weights, "new", ours, **options)
    pm.set_adapter("new")
    inputs = model_inputs("bert")
    with torch.no_grad():
        expected = pm(**inputs).logits
    pm.save_pretrained(tmp_path, adapter_names=["a", "b"])
    model = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    model.add_weighted_adapter(["a", "b"], weights, "new", combination_type=theirs, **options)
    model.set_adapter("new")
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, expected, atol=1e-4)
