"""Attention Fusion: per token, a learned-query softmax attention over the frozen encoder's layer
states; the weighted sum replaces the encoder output that the task head reads."""
from __future__ import annotations

import pytest
import torch

from peftlab import PeftlabError, PeftModel, config_from_dict, get_peft_model
from peftlab.core.registry import get_method

from ...conftest import main_output, model_inputs, perturb, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5

D = 32
INPUTS = model_inputs("bert")


@pytest.fixture(scope="module")
def af():
    import peftlab.methods.additive.attention_fusion as module

    spec = get_method("attention_fusion")
    assert spec is module.SPEC and spec.encoder_only and not spec.identity_at_init and not spec.mergeable
    assert spec.family == "additive"
    return module


def query(pm, name="default") -> torch.nn.Parameter:
    return pm.model_adapters["attention_fusion"].fusion_query[name]


def backbone_states(**inputs) -> list[torch.Tensor]:
    """The bare model's embedding output and every layer's output (what the fusion reads)."""
    with torch.no_grad():
        return list(tiny_bert()(**(inputs or INPUTS), output_hidden_states=True).hidden_states)


def by_hand(states: list[torch.Tensor], q: torch.Tensor, standardize: bool) -> torch.Tensor:
    """c_i = sum_l softmax_l(q . h_i^l / s_i) h_i^l, token by token with explicit loops."""
    batch, length, _ = states[0].shape
    out = torch.empty_like(states[0])
    for b in range(batch):
        for t in range(length):
            h = torch.stack([s[b, t] for s in states])                      # (K, d)
            spread = (h - h.mean(0)).pow(2).mean().sqrt() if standardize else torch.tensor(1.0)
            scores = torch.tensor([float(q @ h_l) for h_l in h]) / spread
            weights = torch.exp(scores - scores.max())
            weights = weights / weights.sum()
            out[b, t] = sum(w * h_l for w, h_l in zip(weights, h))
    return out


def head_input_and_logits(model, **inputs):
    """What the pooler (the task head's first module) reads, and the logits."""
    root = model.base_model if isinstance(model, PeftModel) else model
    seen = {}
    handle = root.bert.pooler.register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0]))
    try:
        with torch.no_grad():
            logits = main_output(model(**(inputs or INPUTS)))
    finally:
        handle.remove()
    return seen["x"], logits


# -- the mechanism ------------------------------------------------------------------------------
@pytest.mark.parametrize("standardize", [True, False])
def test_head_reads_the_softmax_weighted_sum_of_every_layer_state(af, standardize):
    """The task head reads, at every token, sum_l softmax_l(q . h^l / s) h^l over the embedding output
    and all layer outputs: not the last layer (the base model, or any method adapting inside layers),
    not a fixed mean (a scalar mix), and not AdapterFusion's mix of adapter outputs inside a layer."""
    states = backbone_states()
    assert len(states) == 3  # embedding output + 2 layers
    pm = get_peft_model(tiny_bert(), af.AttentionFusionConfig(standardize=standardize)).eval()
    perturb(pm, "default", 0, scale=2.0)
    q = query(pm).detach()
    fused, logits = head_input_and_logits(pm)
    expected = by_hand(states, q, standardize)
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(fused, states[-1], atol=1e-3)
    assert not torch.allclose(fused, torch.stack(states).mean(0), atol=1e-3)
    # the head itself is the base model's, applied to the fused states
    head = tiny_bert()
    with torch.no_grad():
        torch.testing.assert_close(logits, head.classifier(head.bert.pooler(expected)), rtol=0, atol=1e-5)


def test_zero_query_at_init_is_the_mean_of_the_layer_states(af):
    states = backbone_states()
    pm = get_peft_model(tiny_bert(), af.AttentionFusionConfig()).eval()
    assert torch.equal(query(pm).detach(), torch.zeros(D))
    fused, _ = head_input_and_logits(pm)
    torch.testing.assert_close(fused, torch.stack(states).mean(0), rtol=0, atol=1e-6)
    ones = get_peft_model(tiny_bert(), af.AttentionFusionConfig(init="ones"))
    assert torch.equal(query(ones).detach(), torch.ones(D))


def test_the_query_is_the_only_trainable_fusion_tensor(af):
    pm = get_peft_model(tiny_bert(), af.AttentionFusionConfig())
    assert [tuple(p.shape) for p in pm.adapter_parameters("default")] == [(D,)]
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable == ["model_adapters.attention_fusion.fusion_query.default"]
    assert list(pm.adapter_state_dict()) == ["fusion_query"]
    with_head = get_peft_model(tiny_bert(), af.AttentionFusionConfig(modules_to_save=("classifier",)))
    assert with_head.trainable_parameters_report().trainable == D + D * 2 + 2


def test_a_lower_layer_reaches_the_head_through_the_fusion(af):
    """Layer 0's output is changed where the fusion records it, while layer 1 still gets the unchanged
    state: the bare model's output does not move, the fused model's does, by the fusion's formula."""
    delta = torch.randn(2, 8, D, generator=torch.Generator().manual_seed(3))

    def run(model):
        root = model.base_model if isinstance(model, PeftModel) else model
        layers = root.bert.encoder.layer
        original = {}

        def shift(module, args, output):
            original["h"] = output
            return output + delta

        handles = [layers[0].register_forward_hook(shift, prepend=True),  # before the fusion's recording hook
                   layers[1].register_forward_pre_hook(lambda m, args: (original["h"], *args[1:]))]
        try:
            return head_input_and_logits(model)
        finally:
            for h in handles:
                h.remove()

    _, base_logits = head_input_and_logits(tiny_bert())
    _, bare_shifted = run(tiny_bert())
    torch.testing.assert_close(bare_shifted, base_logits, rtol=0, atol=1e-6)  # the change has no other path

    pm = get_peft_model(tiny_bert(), af.AttentionFusionConfig()).eval()
    perturb(pm, "default", 0, scale=2.0)
    plain_fused, plain_logits = head_input_and_logits(pm)
    shifted_fused, shifted_logits = run(pm)
    states = backbone_states()
    states[1] = states[1] + delta
    torch.testing.assert_close(shifted_fused, by_hand(states, query(pm).detach(), True), rtol=0, atol=1e-5)
    assert (shifted_logits - plain_logits).abs().max() > 1e-4


def test_no_gradient_and_no_graph_in_the_frozen_backbone(af):
    """Training the fusion (and the head) back-propagates into the fusion only: the encoder's states
    carry no autograd graph, and no backbone weight gets a gradient."""
    pm = get_peft_model(tiny_bert(), af.AttentionFusionConfig(modules_to_save=("classifier",))).train()
    perturb(pm, "default", 0, scale=0.5)
    layers = pm.base_model.bert.encoder.layer
    recorded = []
    handles = [layer.register_forward_hook(lambda m, a, o: recorded.append(o)) for layer in layers]
    out = pm(**INPUTS, labels=torch.tensor([0, 1]))
    for h in handles:
        h.remove()
    assert all(not s.requires_grad and s.grad_fn is None for s in recorded)
    out.loss.backward()
    trained = {id(p) for p in pm.parameters() if p.requires_grad}
    assert query(pm).grad is not None and query(pm).grad.abs().sum() > 0
    for name, p in pm.named_parameters():
        if id(p) not in trained:
            assert p.grad is None, f"backbone weight {name} got a gradient"


# -- configuration and models -------------------------------------------------------------------
def test_subset_of_layers_and_no_embedding_state(af):
    states = backbone_states()
    cfg = af.AttentionFusionConfig(targets=("bert.encoder.layer.1.attention.self",), include_embeddings=False)
    pm = get_peft_model(tiny_bert(), cfg).eval()
    fused, _ = head_input_and_logits(pm)
    torch.testing.assert_close(fused, states[2], rtol=0, atol=1e-6)  # one state: attention 1 on it
    layers_1_0 = ("bert.encoder.layer.1.attention.self", "bert.encoder.layer.0.attention.self")
    both = af.AttentionFusionConfig(targets=layers_1_0, include_embeddings=False)
    pm = get_peft_model(tiny_bert(), both).eval()
    perturb(pm, "default", 0, scale=2.0)
    fused, _ = head_input_and_logits(pm)
    torch.testing.assert_close(fused, by_hand(states[1:], query(pm).detach(), True), rtol=0, atol=1e-5)


def test_config_round_trip_and_bad_values(af):
    cfg = af.AttentionFusionConfig(init="ones", include_embeddings=False, standardize=False)
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(PeftlabError, match="init"):
        af.AttentionFusionConfig(init="random")
    with pytest.raises(PeftlabError, match="standardize"):
        af.AttentionFusionConfig(standardize="yes")


def test_save_load_restores_the_fusion(af, tmp_path):
    cfg = af.AttentionFusionConfig(init="ones", standardize=False)
    pm = get_peft_model(tiny_bert(), cfg).eval()
    perturb(pm, "default", 0, scale=0.5)
    _, expected = head_input_and_logits(pm)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    got_cfg = loaded.peft_configs["default"]
    assert (got_cfg.init, got_cfg.standardize, got_cfg.include_embeddings) == ("ones", False, True)
    _, got = head_input_and_logits(loaded)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama, tiny_t5], ids=["gpt2", "llama", "t5"])
def test_decoders_and_encoder_decoders_are_refused(af, build):
    with pytest.raises(PeftlabError, match="bidirectional encoder"):
        get_peft_model(build(), af.AttentionFusionConfig())


def test_one_active_at_a_time_disable_and_delete(af):
    _, base = head_input_and_logits(tiny_bert())
    pm = get_peft_model(tiny_bert(), af.AttentionFusionConfig()).eval()
    pm.add_adapter("other", af.AttentionFusionConfig())
    pm.set_adapter(["default", "other"])
    with pytest.raises(PeftlabError, match="active together"):
        head_input_and_logits(pm)
    pm.set_adapter("default")
    with pm.disable_adapter():
        torch.testing.assert_close(head_input_and_logits(pm)[1], base, rtol=0, atol=1e-6)
    pm.delete_adapter("other")
    pm.delete_adapter("default")
    assert "attention_fusion" not in pm.model_adapters
    encoder = pm.base_model.bert.encoder
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in [encoder, *encoder.layer])
    torch.testing.assert_close(head_input_and_logits(pm)[1], base, rtol=0, atol=1e-6)


def test_minilm_size_trains_one_hidden_size_vector(af):
    """all-MiniLM-L6-v2's shape (6 layers, hidden 384): 384 fusion parameters (0.0017% of 22.7M)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                                     intermediate_size=1536, vocab_size=30522))
    pm = get_peft_model(model, af.AttentionFusionConfig())
    assert pm.trainable_parameters_report().trainable == 384
    assert len(pm.model_adapters["attention_fusion"].settings["default"].layers) == 6
