"""PASTA: trainable vectors added to the special tokens' hidden states at every layer's input."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftlab import CheckpointError, PeftlabError, PeftModel, config_from_dict, get_peft_model
from peftlab.core.layer import DeltaModule
from peftlab.core.registry import get_method

from ...conftest import MINILM, main_output, model_inputs, require_shared, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5

D, CLS, SEP, PAD = 32, 1, 2, 0
IDS = torch.tensor([[CLS, 5, 6, SEP, 7, 8, SEP, PAD],   # a pair: [CLS] a [SEP] b [SEP] [PAD]
                    [CLS, 9, 9, 9, SEP, PAD, PAD, PAD]])  # one sentence
MASK = (IDS != PAD).long()


@pytest.fixture(scope="module")
def pasta():
    import peftlab.methods.additive.pasta as module

    assert get_method("pasta") is module.SPEC and module.SPEC.encoder_only
    return module


def without_special_ids(model):
    """``model`` with the cls/sep ids tiny BERT's config names taken out (as in most BERT configs)."""
    model.config.cls_token_id = model.config.sep_token_id = None
    return model


def config(pasta, **kwargs):
    kwargs.setdefault("special_token_ids", (CLS, SEP))
    return pasta.PastaConfig(**kwargs)


def vectors(pm, name="default") -> torch.Tensor:
    return pm.model_adapters["pasta"].pasta_vectors[name]


def query_inputs(model) -> list[torch.Tensor]:
    """The hidden states each layer's self-attention receives (after PASTA's addition)."""
    seen: list[torch.Tensor] = []
    root = model.base_model if isinstance(model, PeftModel) else model
    handles = [layer.attention.self.query.register_forward_hook(lambda m, i, o: seen.append(i[0]))
               for layer in root.bert.encoder.layer]
    with torch.no_grad():
        model(input_ids=IDS, attention_mask=MASK)
    for h in handles:
        h.remove()
    return seen


def logits(model, ids=IDS, mask=MASK):
    with torch.no_grad():
        return main_output(model(input_ids=ids, attention_mask=mask))


# -- the mechanism ------------------------------------------------------------------------------
def test_layer0_only_special_positions_change_by_their_occurrence_vector(pasta):
    """At layer 0's input only [CLS]/[SEP] positions move, each by e_p^0 of its occurrence p; every
    other token's hidden state is the base model's exactly. Plain LoRA (or any weight update) would
    leave the layer input alone and move every token after it; a prompt would change the length."""
    base = query_inputs(tiny_bert())
    pm = get_peft_model(tiny_bert(), config(pasta)).eval()
    e = vectors(pm).detach()
    assert e.shape == (2, 3, D)
    got = query_inputs(pm)
    delta = got[0] - base[0]
    special = (IDS == CLS) | (IDS == SEP)
    assert torch.equal(delta[~special], torch.zeros_like(delta[~special]))
    occurrence = {(0, 0): 0, (0, 3): 1, (0, 6): 2, (1, 0): 0, (1, 4): 1}
    for (b, t), p in occurrence.items():
        torch.testing.assert_close(delta[b, t], e[0, p], rtol=0, atol=1e-6)
    # Layer 1: the input is layer 0's output plus e^1 at the same positions, nothing elsewhere.
    layer0_out = pm.base_model.bert.encoder.layer[0]
    seen = {}
    hook = layer0_out.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o[0] if isinstance(o, tuple) else o))
    got = query_inputs(pm)
    hook.remove()
    delta1 = got[1] - seen["out"]
    assert torch.equal(delta1[~special], torch.zeros_like(delta1[~special]))
    for (b, t), p in occurrence.items():
        torch.testing.assert_close(delta1[b, t], e[1, p], rtol=0, atol=1e-6)


def test_ordinary_tokens_change_only_through_attention_in_later_layers(pasta):
    pm = get_peft_model(tiny_bert(), config(pasta)).eval()
    base = query_inputs(tiny_bert())
    got = query_inputs(pm)
    special = (IDS == CLS) | (IDS == SEP)
    assert (got[1] - base[1])[~special & (MASK == 1)].abs().amax() > 0  # layer 0's attention spread it


def test_init_normal_by_default_zeros_on_request(pasta):
    pm = get_peft_model(tiny_bert(), config(pasta))
    assert 0.01 < float(vectors(pm).detach().std()) < 0.03  # BERT's initializer_range, as the reference's nn.Embedding
    assert not torch.allclose(logits(pm), logits(tiny_bert()))
    zero = get_peft_model(tiny_bert(), config(pasta, init="zeros"))
    torch.testing.assert_close(logits(zero), logits(tiny_bert()), rtol=0, atol=0)
    std = get_peft_model(tiny_bert(), config(pasta, init_std=0.5))
    assert float(vectors(std).detach().std()) > 0.3


def test_dropout_defaults_to_hidden_dropout_and_acts_in_training_only(pasta):
    pm = get_peft_model(tiny_bert(), config(pasta))
    module = pm.model_adapters["pasta"]
    assert module.settings["default"].dropout == pytest.approx(0.1)
    no_drop = get_peft_model(tiny_bert(), config(pasta, dropout=0.0))
    assert no_drop.model_adapters["pasta"].settings["default"].dropout == 0.0
    pm.train()
    for m in pm.base_model.modules():  # keep the model's own dropout off: only PASTA's may act
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    torch.manual_seed(0)
    first = logits(pm)
    torch.manual_seed(1)
    assert not torch.allclose(first, logits(pm))
    pm.eval()
    torch.testing.assert_close(logits(pm), logits(pm), rtol=0, atol=0)


def test_special_ids_from_the_model_config(pasta):
    model = without_special_ids(tiny_bert())
    model.config.cls_token_id, model.config.sep_token_id = CLS, SEP
    pm = get_peft_model(model, pasta.PastaConfig(init="zeros"))
    assert pm.model_adapters["pasta"].settings["default"].special_ids == (CLS, SEP)
    roberta_like = without_special_ids(tiny_bert())
    roberta_like.config.bos_token_id, roberta_like.config.eos_token_id = 0, 2  # pad 0 is left out
    assert get_peft_model(roberta_like, pasta.PastaConfig()).model_adapters["pasta"].settings["default"].special_ids == (2,)


def test_targets_choose_the_layers(pasta):
    pm = get_peft_model(tiny_bert(), config(pasta, targets=("bert.encoder.layer.1.attention.self",))).eval()
    assert vectors(pm).shape == (1, 3, D)
    torch.testing.assert_close(query_inputs(pm)[0], query_inputs(tiny_bert())[0], rtol=0, atol=0)


def test_real_bert_default_reads_cls_and_sep_from_its_tokenizer_and_a_pair_gets_three_vectors(pasta, tmp_path):
    """all-MiniLM-L6-v2's config names only the pad id: the default finds [CLS] 101 and [SEP] 102 in
    the tokenizer beside the weights (the model's name_or_path), and loading finds them again."""
    from transformers import AutoModel, AutoTokenizer

    path = str(require_shared(MINILM))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    assert all(getattr(model.config, f, None) is None for f in pasta._ID_FIELDS)  # the premise
    pm = get_peft_model(model, pasta.PastaConfig()).eval()
    assert pm.model_adapters["pasta"].settings["default"].special_ids == (101, 102)
    assert (tokenizer.cls_token_id, tokenizer.sep_token_id) == (101, 102)
    assert vectors(pm).shape == (6, 3, 384)
    batch = tokenizer(["a short one", "and a longer second sentence"], ["its pair", "pair"], padding=True,
                      return_tensors="pt")
    slots = []
    with torch.no_grad():
        pm(**batch)
        slots = pm.model_adapters["pasta"]._slots["default"]
    tokens = batch["input_ids"]
    special = (tokens == tokenizer.cls_token_id) | (tokens == tokenizer.sep_token_id)
    assert torch.equal(slots.sum(-1).bool(), special)
    assert torch.equal(slots.sum(1), torch.ones(2, 3, dtype=slots.dtype))  # [CLS], [SEP], [SEP] once each
    with torch.no_grad():
        expected = pm(**batch).last_hidden_state
    with pm.disable_adapter(), torch.no_grad():
        assert not torch.allclose(pm(**batch).last_hidden_state, expected)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(AutoModel.from_pretrained(path), tmp_path).eval()
    assert loaded.model_adapters["pasta"].settings["default"].special_ids == (101, 102)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).last_hidden_state, expected, rtol=0, atol=1e-6)


def test_gradient_checkpointing_recomputes_with_the_same_special_tokens(pasta):
    grads = []
    for checkpointing in (False, True):
        pm = get_peft_model(tiny_bert(), config(pasta, dropout=0.0))
        for m in pm.base_model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        if checkpointing:
            base = pm.base_model  # transformers 5.x renamed gradient_checkpointing_enable
            (getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable)()
        pm.train()
        main_output(pm(input_ids=IDS, attention_mask=MASK)).pow(2).sum().backward()
        grads.append(vectors(pm).grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


# -- what conformance checks, on an encoder whose inputs hold special tokens ---------------------
def test_trainable_set_is_the_vectors_and_all_get_gradients(pasta):
    pm = get_peft_model(tiny_bert(), config(pasta, modules_to_save=("classifier",)))
    pm.train()
    main_output(pm(input_ids=IDS, attention_mask=MASK)).pow(2).mean().backward()
    trained = {id(p) for p in pm.adapter_parameters("default")}
    assert {id(p) for p in pm.parameters() if p.requires_grad} == trained
    for name, p in pm.named_parameters():
        assert (p.grad is not None) == (id(p) in trained), name
    assert vectors(pm).grad[:, :3].abs().sum(-1).min() > 0  # every layer and occurrence was used
    assert pm.trainable_parameters_report().trainable == 2 * 3 * D + (2 * D + 2)


def test_disable_delete_and_two_adapters(pasta):
    base = logits(tiny_bert())
    bare = tiny_bert()
    hooks = lambda m: sum(len(x._forward_pre_hooks) for x in m.modules())  # noqa: E731
    pm = get_peft_model(bare, config(pasta))
    first = logits(pm)
    with pm.disable_adapter():
        torch.testing.assert_close(logits(pm), base, rtol=0, atol=0)
    pm.add_adapter("second", config(pasta, num_special_tokens=4))
    torch.testing.assert_close(logits(pm), first, rtol=0, atol=0)  # inactive: no effect
    pm.set_adapter("second")
    assert not torch.allclose(logits(pm), first)
    assert {id(p) for p in pm.parameters() if p.requires_grad} == {id(vectors(pm, "second"))}
    pm.set_adapter(["default", "second"])  # both: the vectors add up
    assert not torch.allclose(logits(pm), first)
    pm.delete_adapter("second")
    pm.set_adapter("default")
    torch.testing.assert_close(logits(pm), first, rtol=0, atol=0)
    with pytest.raises(PeftlabError, match="cannot be merged"):
        pm.merge_adapter()
    pm.delete_adapter("default")
    assert not pm.model_adapters and not any(isinstance(m, DeltaModule) for m in bare.modules())
    assert hooks(bare) == 0  # every hook went with the last adapter
    torch.testing.assert_close(logits(pm), base, rtol=0, atol=0)


def test_save_load_strict_and_equal(tmp_path, pasta):
    pm = get_peft_model(tiny_bert(), config(pasta, modules_to_save=("classifier",))).eval()
    expected = logits(pm)
    state = pm.adapter_state_dict()
    assert tuple(state["pasta_vectors"].shape) == (2, 3, D)
    assert sorted(state) == ["base_model.model.classifier.bias", "base_model.model.classifier.weight", "pasta_vectors"]
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    saved = loaded.peft_configs["default"]
    assert config_from_dict(saved.to_dict()) == saved and saved.special_token_ids == (CLS, SEP)


@pytest.mark.parametrize("damage", ["missing", "shape", "extra"])
def test_damaged_checkpoint_is_refused_and_leaves_the_model_unchanged(tmp_path, pasta, damage):
    get_peft_model(tiny_bert(), config(pasta)).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    if damage == "missing":
        tensors = {"other": torch.zeros(1)}
    elif damage == "shape":
        tensors["pasta_vectors"] = torch.zeros(2, 2, D)
    else:
        tensors["pasta_bias"] = torch.zeros(D)
    save_file(tensors, str(weights))
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="pasta_vectors" if damage != "extra" else "pasta_bias"):
        PeftModel.from_pretrained(model, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 0
    torch.testing.assert_close(logits(model), logits(tiny_bert()), rtol=0, atol=0)


# -- bad input -----------------------------------------------------------------------------------
def test_model_config_without_special_ids_is_refused_with_what_it_needs(pasta, tmp_path):
    model = without_special_ids(tiny_bert())  # and no name_or_path: no tokenizer to read
    with pytest.raises(PeftlabError, match=r"no name_or_path.*names a special token id.*"
                                           r"special_token_ids=\(tokenizer\.cls_token_id.*tokenizer_path="):
        get_peft_model(model, pasta.PastaConfig())
    assert not any(isinstance(m, DeltaModule) for m in model.modules())
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 0
    model.config._name_or_path = str(tmp_path / "nowhere")  # a name_or_path with no tokenizer there
    with pytest.raises(PeftlabError, match=r"nor its tokenizer \('.*nowhere'\) names a special token id"):
        get_peft_model(model, pasta.PastaConfig())


def test_tokenizer_path_is_read_and_a_bad_one_is_refused(pasta, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "a": 3}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="a")),
                                   pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")
    fast.save_pretrained(tmp_path / "tok")
    model = without_special_ids(tiny_bert())
    pm = get_peft_model(model, pasta.PastaConfig(tokenizer_path=str(tmp_path / "tok")))
    assert pm.model_adapters["pasta"].settings["default"].special_ids == (CLS, SEP)
    with pytest.raises(PeftlabError, match=r"could not load a tokenizer from tokenizer_path='.*nowhere'"):
        get_peft_model(without_special_ids(tiny_bert()), pasta.PastaConfig(tokenizer_path=str(tmp_path / "nowhere")))


def test_tiny_bert_conformance_inputs_hold_its_special_tokens(pasta):
    """The shared conformance inputs frame tiny BERT's text with the [CLS]/[SEP] its config names, so
    the default config acts there: [CLS] first, [SEP] last before the padding."""
    inputs = model_inputs("bert")
    pm = get_peft_model(tiny_bert(), pasta.PastaConfig()).eval()
    with torch.no_grad():
        pm(**inputs)
    slots = pm.model_adapters["pasta"]._slots["default"]
    assert torch.equal(slots.sum(1)[:, :2], torch.ones(2, 2, dtype=slots.dtype))  # [CLS], [SEP] once each


def test_ids_outside_the_vocabulary_are_refused(pasta):
    with pytest.raises(PeftlabError, match=r"\[101, 102\] \(from special_token_ids\) are outside the model's vocabulary of 100"):
        get_peft_model(tiny_bert(), pasta.PastaConfig(special_token_ids=(101, 102)))


@pytest.mark.parametrize("make,what", [(tiny_gpt2, "causal attention"), (tiny_llama, "causal attention"),
                                       (tiny_t5, "encoder-decoder")])
def test_decoders_and_encoder_decoders_are_refused(pasta, make, what):
    with pytest.raises(PeftlabError, match=what):
        get_peft_model(make(), pasta.PastaConfig(special_token_ids=(1, 2)))


def test_bert_configured_as_decoder_is_refused(pasta):
    model = tiny_bert()
    model.config.is_decoder = True
    with pytest.raises(PeftlabError, match="is_decoder=True"):
        get_peft_model(model, config(pasta))


def test_too_many_special_tokens_in_an_input_is_refused(pasta):
    pm = get_peft_model(tiny_bert(), config(pasta, num_special_tokens=2))
    with pytest.raises(PeftlabError, match="example 0 holds 3 special tokens.*num_special_tokens >= 3"):
        logits(pm)


def test_inputs_embeds_instead_of_ids_is_refused(pasta):
    pm = get_peft_model(tiny_bert(), config(pasta))
    embeds = pm.base_model.get_input_embeddings()(IDS)
    with pytest.raises(PeftlabError, match="passed no input_ids"):
        pm(inputs_embeds=embeds, attention_mask=MASK)


@pytest.mark.parametrize("field,value,expected", [
    ("num_special_tokens", 0, "positive integer"),
    ("special_token_ids", (1, 1), "distinct non-negative"),
    ("special_token_ids", (), "distinct non-negative"),
    ("special_token_ids", (-1,), "distinct non-negative"),
    ("tokenizer_path", "", "tokenizer folder"),
    ("init", "uniform", "one of"),
    ("init_std", 0.0, "positive"),
    ("dropout", 1.0, r"\[0, 1\)"),
])
def test_bad_config_fields_are_refused_naming_them(pasta, field, value, expected):
    with pytest.raises(PeftlabError, match=rf"PastaConfig\.{field}=.*{expected}"):
        pasta.PastaConfig(**{field: value})
