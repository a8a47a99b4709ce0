import pytest
import torch

from peftlab import LoraConfig, PeftlabError, get_peft_model
from peftlab.core.targets import resolve_targets

from ..conftest import tiny_bert, tiny_gpt2, tiny_llama, tiny_t5


def test_suffix_exact_regex_and_sites_on_bert():
    model = tiny_bert()
    q = resolve_targets(model, ("query",))
    assert q == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
    assert resolve_targets(model, ("bert.encoder.layer.0.attention.self.query",)) == q[:1]
    assert resolve_targets(model, r"bert\.encoder\.layer\.1\.attention\.self\.(query|value)") == [
        "bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value"]
    assert resolve_targets(model, ("@query",)) == q
    # '@ffn_out' must not pick the attention output projection, which has the same leaf name.
    assert resolve_targets(model, ("@ffn_out",)) == [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]
    assert resolve_targets(model, ("@attn_out",)) == [f"bert.encoder.layer.{i}.attention.output.dense" for i in range(2)]


def test_all_linear_skips_the_head():
    names = resolve_targets(tiny_bert(), "all-linear")
    assert "classifier" not in names and len(names) == 2 * 6 + 1  # q,k,v,o,in,out per layer + pooler
    assert "lm_head" not in resolve_targets(tiny_llama(), "all-linear")


@pytest.mark.parametrize("factory,site,expected", [
    (tiny_gpt2, "@query", "transformer.h.0.attn.c_attn"),
    (tiny_gpt2, "@ffn_out", "transformer.h.0.mlp.c_proj"),
    (tiny_llama, "@value", "model.layers.0.self_attn.v_proj"),
    (tiny_llama, "@ffn_in", "model.layers.0.mlp.gate_proj"),
    (tiny_llama, "@embeddings", "model.embed_tokens"),
    (tiny_t5, "@embeddings", "encoder.embed_tokens"),  # what the stacks call, not the tied ``shared``
    (tiny_t5, "@query", "encoder.block.0.layer.0.SelfAttention.q"),
    (tiny_t5, "@ffn_out", "encoder.block.0.layer.1.DenseReluDense.wo"),
    (tiny_bert, "@layernorm", "bert.embeddings.LayerNorm"),
])
def test_sites_per_architecture(factory, site, expected):
    assert expected in resolve_targets(factory(), (site,))


def test_unmatched_target_names_pattern_and_similar_names():
    with pytest.raises(PeftlabError) as err:
        resolve_targets(tiny_bert(), ("qurey",))
    assert "'qurey'" in str(err.value) and "query" in str(err.value)
    with pytest.raises(PeftlabError, match="unknown attach point '@nope'"):
        resolve_targets(tiny_bert(), ("@nope",))


def test_unsupported_module_type_is_refused():
    with pytest.raises(PeftlabError, match="LayerNorm"):
        get_peft_model(tiny_bert(), LoraConfig(targets=("@layernorm",)))


def test_failed_attach_leaves_model_untouched():
    model = tiny_bert()
    before = {n for n, _ in model.named_modules()}
    with pytest.raises(PeftlabError):
        get_peft_model(model, LoraConfig(targets=("query", "missing_module")))
    assert {n for n, _ in model.named_modules()} == before


def test_methods_stack_inside_a_wrapped_block():
    from peftlab import ParallelAdapterConfig

    pm = get_peft_model(tiny_llama(), ParallelAdapterConfig())
    pm.add_adapter("lora", LoraConfig(targets=("@ffn_out",)))
    paths = resolve_targets(pm.base_model, ("@ffn_out",))
    assert paths == [f"model.layers.{i}.mlp.base_layer.down_proj" for i in range(2)]
    # Adapter weights are never targets, even for "all-linear".
    assert not any("lora_A" in n or "adapter" in n.split(".")[-1] for n in resolve_targets(pm.base_model, "all-linear"))


@pytest.mark.parametrize("targets", ["re:(", ("query", "re:(")])
def test_bad_regex_target_is_a_peftlab_error_naming_the_pattern(targets):
    # A whole-config regex string and a 're:' entry of a list alike: never a bare re.error.
    with pytest.raises(PeftlabError, match=r"target regex '\(' is not a valid regular expression"):
        resolve_targets(tiny_bert(), targets)


def test_sites_restricted_to_listed_layers():
    model = tiny_bert()
    assert resolve_targets(model, ("@ffn_out[1]",)) == ["bert.encoder.layer.1.output.dense"]
    assert resolve_targets(model, ("@query[0-1]",)) == resolve_targets(model, ("@query",))
    t5 = tiny_t5()  # an index picks that layer in the encoder and the decoder stack
    assert resolve_targets(t5, ("@ffn_out[0]",)) == ["encoder.block.0.layer.1.DenseReluDense.wo",
                                                       "decoder.block.0.layer.2.DenseReluDense.wo"]
    with pytest.raises(PeftlabError, match=r"'@ffn_out\[5\]': layer 5 does not exist.*2 layers"):
        resolve_targets(model, ("@ffn_out[5]",))
    with pytest.raises(PeftlabError, match="'3-1'"):
        resolve_targets(model, ("@ffn_out[3-1]",))
    with pytest.raises(PeftlabError, match="unknown attach point '@nope\\[0\\]'"):
        resolve_targets(model, ("@nope[0]",))


def test_layer_of_names_the_stack_and_index():
    from peftlab.core.targets import layer_block, layer_of

    model = tiny_bert()
    assert layer_of(model, "bert.encoder.layer.1.attention.self.query") == ("bert.encoder.layer", 1, 2)
    assert layer_block(model, "bert.encoder.layer.1.output.dense") == "bert.encoder.layer.1"
    assert layer_of(model, "bert.embeddings.word_embeddings") is None


def test_t5_embeddings_site_is_what_the_stacks_call():
    model = tiny_t5()
    assert resolve_targets(model, ("@embeddings",)) == ["encoder.embed_tokens", "decoder.embed_tokens"]
    pm = get_peft_model(model, LoraConfig(targets=("@embeddings",), r=2))
    for name, p in pm.named_parameters():
        if p.requires_grad and "lora" in name:
            torch.nn.init.normal_(p)
    ids = torch.randint(3, 100, (2, 5))
    out = pm(input_ids=ids, decoder_input_ids=ids).logits
    with pm.disable_adapter():
        assert not torch.allclose(out, pm(input_ids=ids, decoder_input_ids=ids).logits)


def test_site_in_layers_writes_runs_as_ranges_and_reads_back():
    from peftlab.core.targets import site_in_layers

    assert site_in_layers("ffn_out", [5, 0, 1, 2, 7, 8]) == "@ffn_out[0-2,5,7-8]"
    assert resolve_targets(tiny_bert(), (site_in_layers("query", {1}),)) == ["bert.encoder.layer.1.attention.self.query"]
