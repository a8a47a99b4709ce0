"""P-tuning v2: trainable key/value prompts in every layer, trained directly, beside a trained task head;
prefix tuning's layer without its MLP, under its own name and defaults."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from peftlab import CheckpointError, PeftlabError, PeftModel, PrefixTuningConfig, config_from_dict, get_peft_model
from peftlab.core.layer import DeltaModule, TrainableCopy
from peftlab.core.registry import get_method
from peftlab.methods.additive.p_tuning_v2 import HEADS, PTuningV2Config
from peftlab.methods.additive.prompt_tuning import cache_argument

from ...conftest import (STORIES, labelled_batches, model_inputs, perturb, require_shared, tiny_bert, tiny_gpt2,
                         tiny_llama)

P = 3


def prompt_of(pm, name: str = "default") -> torch.nn.Parameter:
    return pm.model_adapters["prefix_tuning"].prompt_embeddings[name]


# -- 1. config ------------------------------------------------------------------------------------------

def test_defaults_are_the_papers_and_the_registry_entry_is_its_own():
    config = PTuningV2Config()
    assert (config.num_virtual_tokens, config.prefix_projection, config.encoder_hidden_size) == (20, False, None)
    assert config.modules_to_save == () and HEADS == ("classifier", "score")
    spec = get_method("p_tuning_v2")
    assert spec.config_cls is PTuningV2Config and spec.default_lr == 5e-3 and spec.family == "additive"
    assert not spec.mergeable and not spec.identity_at_init
    assert get_method("prefix_tuning").config_cls is PrefixTuningConfig  # prefix tuning is unchanged


@pytest.mark.parametrize("bad,field", [
    ({"prefix_projection": True}, "prefix_projection"), ({"encoder_hidden_size": 64}, "encoder_hidden_size"),
    ({"num_virtual_tokens": 0}, "num_virtual_tokens"), ({"targets": ()}, "targets"),
])
def test_bad_config_is_refused_with_the_field_named(bad, field):
    with pytest.raises(PeftlabError, match=field):
        PTuningV2Config(**bad)


# -- 2. the mechanism -------------------------------------------------------------------------------------

def test_one_directly_trained_prompt_tensor_for_every_layer():
    """The only trained tensor is P (p, L*2*kv_heads*d_h) itself: no MLP (prefix tuning's default would
    train P' and an MLP) and not one (p, d) input prompt (prompt tuning, P-tuning)."""
    pm = get_peft_model(tiny_llama(), PTuningV2Config(num_virtual_tokens=P))
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is prompt_of(pm)
    assert tuple(trainable[0].shape) == (P, 2 * 2 * 2 * 8)  # 2 layers x (k, v) x 2 kv heads x 8
    assert not pm.model_adapters["prefix_tuning"].prefix_mlp


def test_equals_deep_prompts_as_past_keys_and_values_in_every_layer():
    """The paper's construction (its code passes the prompts to the model as past_key_values): the base
    model with a KV cache holding layer i's prompt keys/values, the mask extended by p ones."""
    pm = get_peft_model(tiny_llama(), PTuningV2Config(num_virtual_tokens=P))
    base = tiny_llama()
    inputs = model_inputs("llama")
    kv = prompt_of(pm).detach().view(P, 4, 2, 8).permute(1, 2, 0, 3)  # (L*2, kv_heads, p, d_h)
    cache = DynamicCache(config=base.config)
    for layer in range(2):
        cache.update(kv[2 * layer].expand(2, -1, -1, -1), kv[2 * layer + 1].expand(2, -1, -1, -1), layer)
    mask = torch.cat([torch.ones(2, P, dtype=torch.long), inputs["attention_mask"]], dim=1)
    with torch.no_grad():
        expected = base(input_ids=inputs["input_ids"], attention_mask=mask, **{cache_argument(base): cache}).logits
        got = pm(**inputs).logits
    assert got.shape == expected.shape  # prompts in the layers: no extra output positions
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2, tiny_llama])
def test_every_layers_keys_and_values_get_a_gradient(build):
    """Deep: the loss reaches the prompt of every layer, keys and values (a prompt at the input only
    would have one (p, d) tensor; here each of the L*2 slots gets its own gradient)."""
    pm = get_peft_model(build(), PTuningV2Config(num_virtual_tokens=P))
    out = pm(**model_inputs("llama"))
    out.logits.float().pow(2).mean().backward()
    grad = prompt_of(pm).grad.view(P, 2 * 2, -1)
    assert (grad.abs().sum(dim=(0, 2)) > 0).all()


def test_the_head_trains_with_the_prompts_and_the_base_stays_frozen():
    torch.manual_seed(0)
    pm = get_peft_model(tiny_bert(), PTuningV2Config(num_virtual_tokens=P, modules_to_save=HEADS))
    head = pm.base_model.classifier
    assert isinstance(head, TrainableCopy)
    base_head = {n: p.detach().clone() for n, p in head.base_layer.named_parameters()}
    trainable = {id(p) for p in pm.parameters() if p.requires_grad}
    assert trainable == {id(prompt_of(pm))} | {id(p) for p in head.copies["default"].parameters()}
    pm.train()
    opt = torch.optim.Adam(pm.adapter_parameters("default"), lr=get_method("p_tuning_v2").default_lr)
    batches = labelled_batches(4)
    losses = []
    for _ in range(10):
        for batch in batches:
            loss = pm(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert sum(losses[-4:]) < sum(losses[:4]) - 0.05
    assert all(p.grad is None for n, p in pm.base_model.named_parameters() if ".copies." not in n)
    assert all(torch.equal(p, base_head[n]) for n, p in head.base_layer.named_parameters())
    # A language model has no such head: the prompts alone train.
    lm = get_peft_model(tiny_gpt2(), PTuningV2Config(num_virtual_tokens=P, modules_to_save=HEADS))
    assert [p for p in lm.parameters() if p.requires_grad] == [prompt_of(lm)]


# -- 3. checkpoints -----------------------------------------------------------------------------------------

def test_checkpoint_is_peft_prefix_tuning_without_projection_and_reads_back_as_v2(tmp_path):
    pm = get_peft_model(tiny_bert(), PTuningV2Config(num_virtual_tokens=P, modules_to_save=HEADS))
    perturb(pm, scale=0.2)
    state = pm.adapter_state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "prompt_embeddings": (P, 2 * 2 * 4 * 8), "base_model.classifier.weight": (2, 32),
        "base_model.classifier.bias": (2,)}
    pm.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "PREFIX_TUNING" and written["prefix_projection"] is False
    assert written["peftlab"] == {"method": "p_tuning_v2"} and written["task_type"] == "SEQ_CLS"
    assert (written["num_layers"], written["token_dim"], written["num_attention_heads"]) == (2, 32, 4)
    inputs = model_inputs("bert")
    pm.eval()
    with torch.no_grad():
        expected = pm(**inputs).logits
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert loaded.peft_configs["default"] == PTuningV2Config(num_virtual_tokens=P, modules_to_save=HEADS,
                                                            task_type="SEQ_CLS", base_model_name_or_path="")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("damage", ["missing", "wrong shape"])
def test_a_damaged_checkpoint_is_refused_by_key_and_leaves_the_model_unchanged(tmp_path, damage):
    pm = get_peft_model(tiny_bert(), PTuningV2Config(num_virtual_tokens=P, modules_to_save=HEADS))
    pm.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    if damage == "missing":
        del state["base_model.classifier.bias"]
    else:
        state["prompt_embeddings"] = torch.zeros(P + 1, state["prompt_embeddings"].shape[1])
    save_file(state, tmp_path / "adapter_model.safetensors", metadata=metadata)
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attention = model.config._attn_implementation
    with pytest.raises(CheckpointError, match="classifier.bias" if damage == "missing" else "prompt_embeddings"):
        PeftModel.from_pretrained(model, tmp_path)
    assert not any(isinstance(m, DeltaModule) for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert model.config._attn_implementation == attention


def test_peft_config_reading():
    marked = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 7, "prefix_projection": False,
              "encoder_hidden_size": 64, "peftlab": {"method": "p_tuning_v2"}, "modules_to_save": ["score"]}
    assert config_from_dict(marked) == PTuningV2Config(num_virtual_tokens=7, modules_to_save=("score",))
    with pytest.raises(PeftlabError, match="prefix_projection"):
        config_from_dict({**marked, "prefix_projection": True})
    unmarked = {k: v for k, v in marked.items() if k != "peftlab"}
    assert type(config_from_dict(unmarked)) is PrefixTuningConfig  # a plain peft folder is prefix tuning
    config = PTuningV2Config(num_virtual_tokens=4, modules_to_save=HEADS)
    assert config_from_dict(config.to_dict()) == config


# -- 4. HF peft: the same checkpoint, the same outputs --------------------------------------------------------

IDS = torch.tensor([[0, 0, 1, 400, 300, 200], [1, 33, 44, 55, 66, 77]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # left padding


def stories_lm():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(require_shared(STORIES)).eval()


def peft_classifies_with_prefixes(model) -> bool:
    """peft 0.21.2's sequence-classification model passes a prefix as ``past_key_values``, by that name,
    to the model or its backbone, and refuses models whose forward does not name it; transformers 5.24's
    classification models take a cache by another name (``cache``) or none."""
    import inspect

    backbone = getattr(model, model.base_model_prefix, model)
    return any("past_key_values" in inspect.signature(type(m).forward).parameters for m in (model, backbone))


def stories_classifier():
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(7)  # the same new head in every copy
    model = AutoModelForSequenceClassification.from_pretrained(require_shared(STORIES), num_labels=3).eval()
    model.config.pad_token_id = 0
    return model


@pytest.mark.parametrize("build,heads", [(stories_lm, ()), (stories_classifier, HEADS)], ids=["lm", "classifier"])
def test_peftlab_checkpoint_runs_the_same_in_peft(build, heads, tmp_path):
    peft = pytest.importorskip("peft")
    ours = get_peft_model(build(), PTuningV2Config(num_virtual_tokens=5, modules_to_save=heads))
    perturb(ours, scale=0.3)
    ours.save_pretrained(tmp_path)
    if heads:
        assert {k: tuple(v.shape) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()} == {
            "prompt_embeddings": (5, 5 * 2 * 4 * 8), "base_model.score.weight": (3, 64)}
    if heads and not peft_classifies_with_prefixes(build()):
        pytest.skip(f"peft {peft.__version__} cannot run prefix tuning on {type(build()).__name__} with this "
                    "transformers (no past_key_values argument): only the checkpoint layout is compared")
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
    assert theirs.peft_config["default"].peft_type == "PREFIX_TUNING"
    assert not theirs.peft_config["default"].prefix_projection
    ours.eval()
    with torch.no_grad():
        a, b = ours(input_ids=IDS, attention_mask=MASK).logits, theirs(input_ids=IDS, attention_mask=MASK).logits
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_peft_prefix_tuning_without_projection_is_the_same_computation(tmp_path):
    """A peft PREFIX_TUNING folder (no MLP) loads here as prefix tuning (peft has no P-tuning v2 type)
    and computes what peft computes; its tensors in a P-tuning v2 adapter compute the same."""
    peft = pytest.importorskip("peft")
    trained = peft.get_peft_model(stories_lm(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    perturb([p for p in trained.parameters() if p.requires_grad], scale=0.3)
    trained.eval()
    trained.save_pretrained(tmp_path / "peft")
    ours = PeftModel.from_pretrained(stories_lm(), tmp_path / "peft")
    assert type(ours.peft_configs["default"]) is PrefixTuningConfig
    with torch.no_grad():
        expected = trained(input_ids=IDS, attention_mask=MASK).logits
        torch.testing.assert_close(ours(input_ids=IDS, attention_mask=MASK).logits, expected, atol=1e-5, rtol=0)
    # The same tensors as a P-tuning v2 adapter compute the same.
    v2 = get_peft_model(stories_lm(), PTuningV2Config(num_virtual_tokens=5))
    v2.load_adapter_state_dict("default", load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    v2.eval()
    with torch.no_grad():
        torch.testing.assert_close(v2(input_ids=IDS, attention_mask=MASK).logits, expected, atol=1e-5, rtol=0)
