"""P-tuning: virtual tokens produced by a trainable prompt encoder (BiLSTM + MLP, or MLP), in front of
the input embeddings; checkpoints hold the encoder's output in HF peft's P_TUNING layout."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftlab import CheckpointError, PeftlabError, PeftModel, PromptTuningConfig, config_from_dict, get_peft_model
from peftlab.core.layer import DeltaModule
from peftlab.core.registry import get_method
from peftlab.methods.additive.p_tuning import BiLSTM, PromptEncoder, PTuningConfig
from peftlab.methods.additive.prompt_tuning import SoftPrompt

from ...conftest import (MINILM, STORIES, check_position_limit, labelled_batches, model_inputs, perturb,
                         require_shared, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5)

BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}
P = 3
D = 32  # the tiny models' width


def owner_of(pm) -> SoftPrompt:
    return pm.model_adapters["p_tuning"]


def encoder_of(pm, name: str = "default") -> PromptEncoder:
    return owner_of(pm).prompt_encoder[name]


def by_hand(encoder: PromptEncoder) -> torch.Tensor:
    """The virtual tokens from the encoder's weights: torch's own nn.LSTM loaded with its LSTM weights,
    then the ReLU MLP written out (the LSTM type), or the three-layer ReLU MLP (the MLP type)."""
    e = encoder.embedding.weight.detach()
    mlp = [m for m in encoder.mlp_head if isinstance(m, nn.Linear)]
    x = e
    if encoder.lstm_head is not None:
        lstm_state = encoder.lstm_head.state_dict()
        layers = max(int(k.split("_l")[1].split("_")[0]) for k in lstm_state) + 1
        reference = nn.LSTM(D, encoder.lstm_head.hidden_size, layers, bidirectional=True, batch_first=True)
        reference.load_state_dict(lstm_state)  # strict: the same names and shapes as nn.LSTM's
        with torch.no_grad():
            x = reference(e.unsqueeze(0))[0][0]
    with torch.no_grad():
        for i, linear in enumerate(mlp):
            x = x @ linear.weight.T + linear.bias
            if i < len(mlp) - 1:
                x = x.relu()
    return x


# -- 1. config ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,field", [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens"), ({"num_virtual_tokens": True}, "num_virtual_tokens"),
    ({"encoder_reparameterization_type": "GRU"}, "encoder_reparameterization_type"),
    ({"encoder_reparameterization_type": "lstm"}, "encoder_reparameterization_type"),
    ({"encoder_hidden_size": 0}, "encoder_hidden_size"), ({"encoder_num_layers": 0}, "encoder_num_layers"),
    ({"encoder_reparameterization_type": "MLP", "encoder_num_layers": 3}, "encoder_num_layers"),
    ({"encoder_dropout": 1.0}, "encoder_dropout"), ({"encoder_dropout": -0.1}, "encoder_dropout"),
    ({"encoder_reparameterization_type": "MLP", "encoder_dropout": 0.1}, "encoder_dropout"),
    ({"encoder_num_layers": 1, "encoder_dropout": 0.1}, "encoder_dropout"),
    ({"targets": ("@query",)}, "targets"),
])
def test_bad_config_is_refused_with_the_field_named(bad, field):
    with pytest.raises(PeftlabError, match=field):
        PTuningConfig(**bad)


def test_registry_entry_and_defaults():
    spec = get_method("p_tuning")
    assert spec.config_cls is PTuningConfig and spec.peft_type == "P_TUNING" and spec.family == "additive"
    assert spec.changes_sequence_length and not spec.mergeable and not spec.identity_at_init
    config = PTuningConfig()
    assert config.encoder_reparameterization_type == "LSTM"
    assert (config.encoder_num_layers, config.encoder_dropout, config.encoder_hidden_size) == (2, 0.0, None)


def test_encoder_widths_lama_reference_by_default_and_peft_layout():
    """Default LSTM width h = d/2 (THUDM's LAMA encoder: LSTM(d, d/2, 2 layers, bidirectional), then
    Linear(d, d), ReLU, Linear(d, d)); the MLP type is peft's d -> h -> h -> d with h = d."""
    lstm = encoder_of(get_peft_model(tiny_llama(), PTuningConfig(num_virtual_tokens=P)))
    shapes = {k: tuple(v.shape) for k, v in lstm.state_dict().items()}
    assert shapes["embedding.weight"] == (P, D)
    assert shapes["lstm_head.weight_ih_l0"] == (4 * 16, D) and shapes["lstm_head.weight_hh_l1_reverse"] == (4 * 16, 16)
    assert shapes["lstm_head.weight_ih_l1"] == (4 * 16, 2 * 16)
    assert (shapes["mlp_head.0.weight"], shapes["mlp_head.2.weight"]) == ((D, D), (D, D))
    assert len([k for k in shapes if k.startswith("lstm_head.")]) == 2 * 2 * 4  # 2 layers x 2 directions x 4
    wide = encoder_of(get_peft_model(tiny_llama(), PTuningConfig(num_virtual_tokens=P, encoder_hidden_size=D)))
    assert tuple(wide.mlp_head[0].weight.shape) == (2 * D, 2 * D) and tuple(wide.mlp_head[2].weight.shape) == (D, 2 * D)
    mlp = encoder_of(get_peft_model(tiny_llama(), PTuningConfig(num_virtual_tokens=P,
                                                                 encoder_reparameterization_type="MLP")))
    assert mlp.lstm_head is None
    assert [tuple(m.weight.shape) for m in mlp.mlp_head if isinstance(m, nn.Linear)] == [(D, D)] * 3


# -- 2. the mechanism -----------------------------------------------------------------------------------

@pytest.mark.parametrize("encoder", ["LSTM", "MLP"])
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_virtual_tokens_are_the_encoders_output_of_its_embeddings(kind, encoder):
    """f([MLP(BiLSTM(E)); E_model[ids]]) with the mask extended by p ones. Training E directly (prompt
    tuning) would put E itself in front: the first assertion below fails for that."""
    torch.manual_seed(0)
    pm = get_peft_model(BUILDERS[kind](), PTuningConfig(num_virtual_tokens=P, encoder_reparameterization_type=encoder))
    base = BUILDERS[kind]()
    virtual = by_hand(encoder_of(pm))
    assert (virtual - encoder_of(pm).embedding.weight).abs().max() > 0.1  # not the encoder's input
    inputs = model_inputs(kind)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    embeds = torch.cat([virtual.expand(ids.shape[0], -1, -1), base.get_input_embeddings()(ids)], dim=1)
    with torch.no_grad():
        expected = base(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, P, dtype=mask.dtype), mask], 1))
        got = pm(**inputs)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    # The output follows the encoder's weights, not only its input embeddings.
    with torch.no_grad():
        encoder_of(pm).mlp_head[0].weight.mul_(2.0)
        assert (pm(**inputs).logits - got.logits).abs().max() > 1e-4


def test_bilstm_is_torch_lstm_forward_and_backward():
    """peftlab's LSTM (traceable by torch.compile) computes nn.LSTM's outputs and gradients."""
    torch.manual_seed(0)
    ours = BiLSTM(8, 5, 3, 0.0)
    theirs = nn.LSTM(8, 5, 3, bidirectional=True, batch_first=True)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 7, 8)
    a, b = ours(x), theirs(x)[0]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    a.pow(2).sum().backward()
    b.pow(2).sum().backward()
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, getattr(theirs, name).grad, atol=1e-5, rtol=0)
    torch.manual_seed(1)
    dropped = BiLSTM(8, 5, 2, 0.5).train()
    assert not torch.equal(dropped(x), dropped(x))  # dropout between layers in training
    dropped.eval()
    assert torch.equal(dropped(x), dropped(x))


def test_only_the_encoder_trains_and_every_part_of_it_learns():
    torch.manual_seed(0)
    pm = get_peft_model(tiny_llama(), PTuningConfig(num_virtual_tokens=P))
    pm.train()
    ids = model_inputs("llama")["input_ids"]
    params = pm.adapter_parameters("default")
    assert {id(p) for p in params} == {id(p) for p in encoder_of(pm).parameters()}
    assert {id(p) for p in params} == {id(p) for p in pm.parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in encoder_of(pm).named_parameters()}
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(15):
        loss = pm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert all(p.grad is None for p in pm.base_model.parameters())
    moved = {n for n, p in encoder_of(pm).named_parameters() if not torch.equal(p, before[n])}
    assert moved == set(before)  # embedding, every LSTM tensor, every MLP tensor


def test_sequence_classification_and_generate_reuse_the_soft_prompt():
    """The input rewrite is prompt tuning's: BERT's labels stay per sequence, token types get zeros;
    generate returns [ids, new tokens] and matches greedy decoding by full forward passes."""
    pm = get_peft_model(tiny_bert(), PTuningConfig(num_virtual_tokens=P))
    batch = labelled_batches(1)[0]
    with torch.no_grad():
        out = pm(**batch, token_type_ids=torch.ones_like(batch["input_ids"]))
    assert out.logits.shape == (4, 2) and out.loss.ndim == 0

    pm = get_peft_model(tiny_llama(), PTuningConfig(num_virtual_tokens=P))
    pm.base_model.generation_config.eos_token_id = None
    inputs = model_inputs("llama")
    ids, mask = inputs["input_ids"], inputs["attention_mask"].flip(1)  # left padding
    with torch.no_grad():
        out = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        seq, m = ids, mask
        for _ in range(5):
            positions = (m.cumsum(-1) - 1).clamp(min=0)
            logits = pm(input_ids=seq, attention_mask=m, position_ids=positions, use_cache=False).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
    assert torch.equal(out, seq)


def test_encoder_decoder_prompts_the_encoder_only():
    pm = get_peft_model(tiny_t5(), PTuningConfig(num_virtual_tokens=P))
    base = tiny_t5()
    inputs = model_inputs("t5")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = ids[:, :4].contiguous()
    embeds = torch.cat([by_hand(encoder_of(pm)).expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
    with torch.no_grad():
        expected = base(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, P, dtype=mask.dtype), mask], 1),
                        labels=labels)
        got = pm(input_ids=ids, attention_mask=mask, labels=labels)
    assert got.logits.shape == (2, 4, 100)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)


def test_stacks_with_a_prompt_tuning_adapter():
    """Both soft prompts active: P-tuning's rows, then prompt tuning's, then the input."""
    pm = get_peft_model(tiny_llama(), PTuningConfig(num_virtual_tokens=P))
    pm.add_adapter("plain", PromptTuningConfig(num_virtual_tokens=2, init="random"))
    pm.set_adapter(["default", "plain"])
    base = tiny_llama()
    inputs = model_inputs("llama")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    plain = pm.model_adapters["prompt_tuning"].prompt_embeddings["plain"].detach()
    front = torch.cat([plain, by_hand(encoder_of(pm))])  # each rewrite puts its prompt in front of the last
    embeds = torch.cat([front.expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
    with torch.no_grad():
        expected = base(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, 5, dtype=mask.dtype), mask], 1))
        torch.testing.assert_close(pm(**inputs).logits, expected.logits, atol=1e-5, rtol=0)


# -- 3. bad input -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(BUILDERS))
def test_an_input_pushed_past_the_position_limit_is_refused_before_the_forward(kind):
    """The tiny models have 64 positions: 20 virtual tokens + 45 tokens need 65."""
    check_position_limit(get_peft_model(BUILDERS[kind](), PTuningConfig(num_virtual_tokens=20)), kind)


# -- 4. checkpoints ---------------------------------------------------------------------------------------

def test_checkpoint_is_the_encoder_output_in_peft_layout_and_loading_replaces_the_encoder(tmp_path):
    pm = get_peft_model(tiny_llama(), PTuningConfig(num_virtual_tokens=P))
    perturb(pm, scale=0.2)
    state = pm.adapter_state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {"prompt_embeddings": (P, D)}
    torch.testing.assert_close(state["prompt_embeddings"], by_hand(encoder_of(pm)), atol=1e-6, rtol=0)
    pm.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "P_TUNING" and written["inference_mode"] is True
    assert (written["token_dim"], written["encoder_hidden_size"]) == (D, 16)  # the LSTM's default: d // 2
    assert written["encoder_reparameterization_type"] == "LSTM"
    assert written["num_transformer_submodules"] == 1
    inputs = model_inputs("llama")
    with torch.no_grad():
        expected = pm(**inputs).logits
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not owner_of(loaded).prompt_encoder and "default" in owner_of(loaded).prompt_embeddings
    assert isinstance(loaded.peft_configs["default"], PTuningConfig)
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, atol=1e-6, rtol=0)
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert [p.shape for p in again.parameters() if p.requires_grad] == [torch.Size([P, D])]
    again.save_pretrained(tmp_path / "again")  # the loaded prompt saves as it was loaded
    torch.testing.assert_close(load_file(tmp_path / "again" / "adapter_model.safetensors")["prompt_embeddings"],
                               state["prompt_embeddings"])


@pytest.mark.parametrize("damage", ["missing", "wrong shape", "unexpected"])
def test_a_damaged_checkpoint_is_refused_by_key_and_leaves_the_model_unchanged(tmp_path, damage):
    pm = get_peft_model(tiny_llama(), PTuningConfig(num_virtual_tokens=P))
    pm.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    if damage == "missing":
        state = {"other": torch.zeros(1)}
    elif damage == "wrong shape":
        state = {"prompt_embeddings": torch.zeros(P + 1, D)}
    else:
        state["lstm_head.weight_ih_l0"] = torch.zeros(4, D)
    save_file(state, tmp_path / "adapter_model.safetensors", metadata=metadata)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(CheckpointError, match="prompt_embeddings|lstm_head"):
        PeftModel.from_pretrained(model, tmp_path)
    assert not any(isinstance(m, DeltaModule) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_peft_config_round_trip_and_refusals():
    for config in (PTuningConfig(num_virtual_tokens=5, modules_to_save=("classifier",)),
                   PTuningConfig(encoder_reparameterization_type="MLP", encoder_hidden_size=8),
                   PTuningConfig(encoder_num_layers=3, encoder_dropout=0.1)):
        assert config_from_dict(config.peft_fields()) == config
        assert config_from_dict(config.to_dict()) == config
    with pytest.raises(PeftlabError, match="encoder only"):
        config_from_dict({"peft_type": "P_TUNING", "num_virtual_tokens": 4, "num_transformer_submodules": 2})
    # peft's defaults (MLP) and what peft ignores: the MLP's depth and dropout, one LSTM layer's dropout.
    read = config_from_dict({"peft_type": "P_TUNING", "num_virtual_tokens": 4, "encoder_num_layers": 5,
                             "encoder_dropout": 0.3, "encoder_hidden_size": 12})
    assert (read.encoder_reparameterization_type, read.encoder_num_layers, read.encoder_dropout) == ("MLP", 2, 0.0)
    assert read.encoder_hidden_size == 12
    one_layer = {"peft_type": "P_TUNING", "num_virtual_tokens": 4, "encoder_reparameterization_type": "LSTM",
                 "encoder_num_layers": 1, "encoder_dropout": 0.3}
    read = config_from_dict(one_layer)
    assert (read.encoder_num_layers, read.encoder_dropout) == (1, 0.0)
    assert PTuningConfig().peft_fields_for(tiny_llama(), "default") == {"token_dim": D, "encoder_hidden_size": 16}


# -- 5. HF peft: the same checkpoint, the same outputs, loaded either way --------------------------------

IDS = torch.tensor([[0, 0, 1, 400, 300, 200], [1, 33, 44, 55, 66, 77]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # left padding


def stories():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(require_shared(STORIES)).eval()


@pytest.mark.parametrize("encoder", ["LSTM", "MLP"])
def test_peftlab_checkpoint_runs_the_same_in_peft(encoder, tmp_path):
    peft = pytest.importorskip("peft")
    ours = get_peft_model(stories(), PTuningConfig(num_virtual_tokens=5, encoder_reparameterization_type=encoder))
    perturb(ours, scale=0.3)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(stories(), tmp_path).eval()
    assert theirs.peft_config["default"].peft_type == "P_TUNING"
    ours.eval()
    with torch.no_grad():
        a = ours(input_ids=IDS, attention_mask=MASK, labels=IDS)
        b = theirs(input_ids=IDS, attention_mask=MASK, labels=IDS)
    assert a.logits.shape == b.logits.shape == (2, 5 + 6, 512)  # both keep the prompt positions
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("encoder", ["LSTM", "MLP"])
def test_peft_checkpoint_runs_the_same_in_peftlab(encoder, tmp_path):
    """peft trains its encoder and saves the encoder's output; peftlab's load of that folder computes
    what peft's live (training-form) model computes and what peft's own reload computes."""
    peft = pytest.importorskip("peft")
    trained = peft.get_peft_model(stories(), peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_reparameterization_type=encoder, encoder_hidden_size=24))
    perturb([p for p in trained.parameters() if p.requires_grad], scale=0.3)
    trained.eval()
    trained.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(stories(), tmp_path).eval()
    ours = PeftModel.from_pretrained(stories(), tmp_path)
    config = ours.peft_configs["default"]
    assert config.encoder_reparameterization_type == encoder
    assert (config.encoder_hidden_size, config.num_virtual_tokens) == (24, 5)
    with torch.no_grad():
        got = ours(input_ids=IDS, attention_mask=MASK).logits
        torch.testing.assert_close(got, reloaded(input_ids=IDS, attention_mask=MASK).logits, atol=1e-5, rtol=0)
        # The live encoder runs again here, without autograd: torch's CPU LSTM then differs from the saved
        # run by ~4e-7 (peft's own reload differs from its live model by ~1e-5 in these logits).
        torch.testing.assert_close(got, trained(input_ids=IDS, attention_mask=MASK).logits, atol=5e-5, rtol=0)


@pytest.mark.parametrize("encoder,hidden", [("LSTM", 24), ("LSTM", None), ("MLP", 24)])
def test_the_encoder_is_peft_prompt_encoder_key_for_key(encoder, hidden):
    """peft's PromptEncoder state dict loads strictly into peftlab's encoder (same keys and shapes, once
    peftlab's width is named) and both compute the same virtual tokens: the training-time encoder is
    peft's, not only the checkpoint."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = PTuningConfig(num_virtual_tokens=P, encoder_reparameterization_type=encoder, encoder_hidden_size=hidden)
    ours = encoder_of(get_peft_model(tiny_llama(), config))
    theirs = peft.PromptEncoder(peft.PromptEncoderConfig(
        peft_type="P_TUNING", task_type="CAUSAL_LM", num_virtual_tokens=P, token_dim=D, num_transformer_submodules=1,
        num_attention_heads=4, num_layers=2, encoder_reparameterization_type=encoder,
        encoder_hidden_size=config.hidden_size(D)))
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ours(), theirs(torch.arange(P).unsqueeze(0))[0], atol=1e-6, rtol=0)


def test_bert_classifier_with_a_trained_head_runs_the_same_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    def minilm():
        torch.manual_seed(7)  # the same new head in every copy
        return AutoModelForSequenceClassification.from_pretrained(require_shared(MINILM), num_labels=2).eval()

    ours = get_peft_model(minilm(), PTuningConfig(num_virtual_tokens=4, modules_to_save=("classifier",)))
    perturb(ours, scale=0.3)
    ours.save_pretrained(tmp_path)
    assert {k: tuple(v.shape) for k, v in ours.adapter_state_dict().items()} == {
        "prompt_embeddings": (4, 384), "base_model.classifier.weight": (2, 384), "base_model.classifier.bias": (2,)}
    theirs = peft.PeftModel.from_pretrained(minilm(), tmp_path).eval()
    ids = torch.randint(1000, 2000, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                                   theirs(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)
