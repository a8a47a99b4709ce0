"""WARP: prompts around a [MASK] token, the class read at [MASK] against trainable verbalizers."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from peftlab import CheckpointError, PeftlabError, PeftModel, config_from_dict, get_peft_model
from peftlab.core.registry import get_method

from ...conftest import MINILM, labelled_batches, model_inputs, require_shared, tiny_bert, tiny_gpt2, tiny_t5

D, P, MASK_ID = 32, 8, 4


@pytest.fixture(scope="module")
def warp():
    import peftlab.methods.additive.warp as module

    spec = get_method("warp")
    assert spec is module.SPEC and spec.encoder_only and spec.around_forward is not None
    return module


def config(warp, **kw):
    return warp.WarpConfig(**{"mask_token_id": MASK_ID, **kw})


def inputs():
    return model_inputs("bert")


def perturbed(pm, name="default", seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.adapter_parameters(name):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return pm


def by_hand(model, prompts, mask_row, batch, final=None):
    """The [MASK] position's output, computed without peftlab: [P_1..P_4, E[MASK], P_5..P_8, x]."""
    ids, attention = batch["input_ids"], batch["attention_mask"]
    embeds = model.get_input_embeddings()(ids)
    rows = torch.cat([prompts[:4], mask_row[None], prompts[4:]])
    full = torch.cat([rows.unsqueeze(0).expand(ids.shape[0], -1, -1), embeds], dim=1)
    mask = torch.cat([torch.ones(ids.shape[0], P + 1, dtype=attention.dtype), attention], dim=1)
    out = model(inputs_embeds=full, attention_mask=mask, output_hidden_states=True)
    h = out.hidden_states[-1][:, 4]
    return final(h) if final is not None else h


# -- the mechanism ---------------------------------------------------------------------------------
def test_logits_are_the_mask_output_scored_against_the_verbalizers_not_the_head(warp):
    base = tiny_bert()
    pm = perturbed(get_peft_model(tiny_bert(), config(warp))).eval()
    state = pm.model_adapters["warp"]
    V, b = state.verbalizer["default"], state.verbalizer_bias["default"]
    with torch.no_grad():
        got = pm(**inputs()).logits
        h = by_hand(base, state.prompt_embeddings["default"], base.get_input_embeddings().weight[MASK_ID], inputs())
        # the model's own classifier would give base.classifier(pooler(h_CLS)): not this
        torch.testing.assert_close(got, h @ V.T + b, rtol=0, atol=1e-6)
        assert got.shape == (2, 2)
        # the classifier is not read: changing it changes nothing
        pm.base_model.classifier.weight.add_(1.0)
        torch.testing.assert_close(pm(**inputs()).logits, got, rtol=0, atol=0)


def test_an_mlm_head_transforms_the_mask_state_and_its_decoder_is_replaced(warp):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64)
    base = BertForMaskedLM(cfg).eval()
    model = BertForMaskedLM(cfg).eval()
    model.load_state_dict(base.state_dict())
    pm = perturbed(get_peft_model(model, config(warp, num_labels=3))).eval()
    state = pm.model_adapters["warp"]
    V, b = state.verbalizer["default"], state.verbalizer_bias["default"]
    with torch.no_grad():
        got = pm(**inputs()).logits
        g = by_hand(base.bert, state.prompt_embeddings["default"], base.get_input_embeddings().weight[MASK_ID],
                    inputs(), final=base.cls.predictions.transform)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, g @ V.T + b, rtol=0, atol=1e-6)


def test_labels_give_the_cross_entropy_and_only_prompts_and_verbalizers_learn(warp):
    pm = get_peft_model(tiny_bert(), config(warp)).train()
    batch = labelled_batches(1)[0]
    out = pm(**batch)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, batch["labels"]))
    out.loss.backward()
    trained = {id(p) for p in pm.adapter_parameters("default")}
    assert len(trained) == 3
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pm.adapter_parameters("default"))
    assert all(p.grad is None for p in pm.parameters() if id(p) not in trained)  # classifier included
    assert not pm.base_model.classifier.weight.requires_grad


def test_training_the_prompts_and_verbalizers_lowers_the_loss(warp):
    torch.manual_seed(0)
    pm = get_peft_model(tiny_bert(), config(warp)).eval()  # eval: no dropout, so the losses compare
    batch = labelled_batches(1, size=8)[0]
    opt = torch.optim.Adam(pm.adapter_parameters("default"), lr=3e-2)
    losses = []
    for _ in range(30):
        loss = pm(**batch).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.9 * losses[0]


def test_one_class_is_regression(warp):
    pm = get_peft_model(tiny_bert(num_labels=1), config(warp))
    target = torch.tensor([0.5, 2.0])
    out = pm(**inputs(), labels=target)
    assert out.logits.shape == (2, 1)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), target))


# -- initialisation --------------------------------------------------------------------------------
def test_prompts_start_as_the_mask_embedding_or_token_embeddings(warp):
    model = tiny_bert()
    pm = get_peft_model(model, config(warp))
    E = model.get_input_embeddings().weight
    prompts = pm.model_adapters["warp"].prompt_embeddings["default"]
    assert torch.equal(prompts, E[MASK_ID].expand(P, D))
    assert torch.equal(pm.model_adapters["warp"].mask_embedding["default"], E[MASK_ID])
    torch.manual_seed(3)
    pm = get_peft_model(tiny_bert(), config(warp, prompt_init="vocab", num_virtual_tokens=5))
    rows = pm.model_adapters["warp"].prompt_embeddings["default"]
    assert rows.shape == (5, D) and all((E == r).all(dim=1).any() for r in rows)


def test_mask_id_from_the_model_config_and_mean_row_without_any(warp):
    model = tiny_bert()
    model.config.mask_token_id = 7
    pm = get_peft_model(model, warp.WarpConfig())
    assert torch.equal(pm.model_adapters["warp"].mask_embedding["default"], model.get_input_embeddings().weight[7])
    model = tiny_bert()
    pm = get_peft_model(model, warp.WarpConfig())  # no mask id, no tokenizer: the mean embedding
    torch.testing.assert_close(pm.model_adapters["warp"].mask_embedding["default"],
                               model.get_input_embeddings().weight.mean(dim=0))


def test_real_minilm_reads_mask_from_its_tokenizer_and_label_words_init_the_verbalizers(warp, tmp_path):
    path = str(require_shared(MINILM))
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    E = model.get_input_embeddings().weight.detach().clone()
    pm = get_peft_model(model, warp.WarpConfig(label_words=("terrible", "great"))).eval()
    state = pm.model_adapters["warp"]
    assert torch.equal(state.mask_embedding["default"], E[tokenizer.mask_token_id])
    words = [tokenizer("terrible", add_special_tokens=False)["input_ids"],
             tokenizer("great", add_special_tokens=False)["input_ids"]]
    torch.testing.assert_close(state.verbalizer["default"], torch.stack([E[w].mean(dim=0) for w in words]))
    assert torch.equal(state.verbalizer_bias["default"], torch.zeros(2))
    batch = tokenizer(["a great film", "it was terrible and dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = pm(**batch).logits
    assert expected.shape == (2, 2)
    pm.save_pretrained(tmp_path)
    fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=0)


# -- adapters, save and load -----------------------------------------------------------------------
def test_disable_delete_and_a_second_adapter(warp):
    base = tiny_bert()
    with torch.no_grad():
        plain = base(**inputs()).logits
    pm = perturbed(get_peft_model(tiny_bert(), config(warp))).eval()
    with torch.no_grad():
        first = pm(**inputs()).logits
        with pm.disable_adapter():
            torch.testing.assert_close(pm(**inputs()).logits, plain, rtol=0, atol=0)
        pm.add_adapter("second", config(warp, num_labels=3))
        pm.set_adapter("second")
        assert pm(**inputs()).logits.shape == (2, 3)
        pm.set_adapter("default")
        torch.testing.assert_close(pm(**inputs()).logits, first, rtol=0, atol=0)


def test_two_live_warp_adapters_are_refused(warp):
    pm = get_peft_model(tiny_bert(), config(warp))
    pm.add_adapter("second", config(warp))
    pm.set_adapter(["default", "second"])
    with pytest.raises(PeftlabError, match="activate one"):
        pm(**inputs())


def test_save_load_strict_and_equal(tmp_path, warp):
    pm = perturbed(get_peft_model(tiny_bert(), config(warp, num_virtual_tokens=4))).eval()
    with torch.no_grad():
        expected = pm(**inputs()).logits
    state = pm.adapter_state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "prompt_embeddings": (4, D), "verbalizer": (2, D), "verbalizer_bias": (2,), "mask_embedding": (D,)}
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs()).logits, expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    saved = loaded.peft_configs["default"]
    assert config_from_dict(saved.to_dict()) == saved and saved.num_virtual_tokens == 4


@pytest.mark.parametrize("damage", ["missing", "shape", "extra"])
def test_damaged_checkpoint_is_refused_and_leaves_the_model_unchanged(tmp_path, warp, damage):
    get_peft_model(tiny_bert(), config(warp)).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    if damage == "missing":
        del tensors["verbalizer"]
    elif damage == "shape":
        tensors["verbalizer"] = torch.zeros(3, D)
    else:
        tensors["verbalizer_extra"] = torch.zeros(D)
    save_file(tensors, str(weights))
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="verbalizer"):
        PeftModel.from_pretrained(model, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs()).logits, tiny_bert()(**inputs()).logits, rtol=0, atol=0)


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,expected", [
    ("num_virtual_tokens", 0, "positive integer"),
    ("num_labels", 0, "positive integer"),
    ("label_words", ("good", ""), "non-empty words"),
    ("prompt_init", "random", "one of"),
    ("mask_token_id", -1, "non-negative token id"),
    ("tokenizer_path", "", "tokenizer folder"),
    ("targets", ("query",), "touches no module"),
])
def test_bad_config_fields_are_refused_naming_them(warp, field, value, expected):
    with pytest.raises(PeftlabError, match=rf"WarpConfig\.{field}=.*{expected}"):
        warp.WarpConfig(**{field: value})


def test_label_words_must_match_num_labels(warp):
    with pytest.raises(PeftlabError, match=r"label_words=.*num_labels=3"):
        warp.WarpConfig(num_labels=3, label_words=("bad", "good"))


def test_label_words_must_match_the_models_classes(warp):
    with pytest.raises(PeftlabError, match="2 words but the task has 3 classes"):
        get_peft_model(tiny_bert(num_labels=3), config(warp, label_words=("bad", "good")))


def test_mask_id_outside_the_vocabulary_is_refused(warp):
    with pytest.raises(PeftlabError, match="mask_token_id=500 is outside"):
        get_peft_model(tiny_bert(), config(warp, mask_token_id=500))


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_t5], ids=["decoder", "encoder-decoder"])
def test_decoders_and_encoder_decoders_are_refused(warp, make):
    with pytest.raises(PeftlabError, match="decoder or encoder-decoder"):
        get_peft_model(make(), config(warp))


def test_glue_job_trains_no_classifier_copy_for_warp(warp, tmp_path):
    """WARP scores the classes itself (``replaces_head``): the GLUE job adds no head copy to train."""
    from peftlab.train.glue_job import GlueRun, run_glue
    from peftlab.train.loop import TrainArgs

    from ...conftest import GLUE

    run = GlueRun(model=str(require_shared(MINILM)), task="sst2", data_dir=str(require_shared(GLUE) / "SST-2"),
                  train_limit=8, eval_limit=8, batch_size=4)
    summary = run_glue(run, warp.WarpConfig(), TrainArgs(max_steps=1, progress=False), tmp_path)
    d = 384  # MiniLM's width: 8 prompts, 2 verbalizer rows and their bias
    assert summary["trainable_params"] == 8 * d + 2 * d + 2
