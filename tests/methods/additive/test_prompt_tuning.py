"""Prompt tuning: p trainable embeddings in front of the input embeddings, nothing else."""
from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch

from peftlab import PeftlabError, PeftModel, PromptTuningConfig, config_from_dict, get_peft_model
from peftlab.core.layer import DeltaModule
from peftlab.methods.additive.prompt_tuning import SoftPrompt, cache_argument

from ...conftest import STORIES, model_inputs, require_shared, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5

BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}
P = 3


def prompt_of(pm, name: str = "default") -> torch.Tensor:
    return pm.model_adapters["prompt_tuning"].prompt_embeddings[name]


def row_ids(prompt: torch.Tensor, table: torch.Tensor) -> list[int]:
    """The token id whose embedding each prompt row is (every row must be one)."""
    hits = (table.unsqueeze(0) == prompt.detach().unsqueeze(1)).all(dim=-1)  # (p, vocab)
    assert hits.any(dim=1).all(), "a prompt row is not a token embedding"
    return hits.float().argmax(dim=1).tolist()


def stories():
    path = require_shared(STORIES)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return path, AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("bad", [
    {"num_virtual_tokens": 0}, {"num_virtual_tokens": -2}, {"num_virtual_tokens": True},
    {"num_virtual_tokens": 2.5}, {"init": "zeros"}, {"init": "random", "init_text": "hello"},
    {"init_text": "  "}, {"targets": ("@query",)}, {"tokenizer_path": 3},
])
def test_bad_config_is_refused_with_the_field_named(bad):
    field = next(iter(bad)) if len(bad) == 1 else "init_text"
    with pytest.raises(PeftlabError, match=field):
        PromptTuningConfig(**bad)


@pytest.mark.parametrize("bad,field", [
    ({"vocab_top_k": 0}, "vocab_top_k"), ({"vocab_top_k": True}, "vocab_top_k"), ({"vocab_top_k": 2.0}, "vocab_top_k"),
    ({"frequency_file": ""}, "frequency_file"), ({"frequency_file": "f.txt", "init": "random"}, "frequency_file"),
    ({"frequency_file": "f.txt", "init_text": "hi"}, "frequency_file"),
    ({"init_labels": ("yes", "")}, "init_labels"),
    ({"init_labels": ("a", "b", "c"), "num_virtual_tokens": 2}, "init_labels"),
    ({"init_labels": "positive"}, "init_labels"),
])
def test_bad_init_options_are_refused_with_the_field_named(bad, field):
    with pytest.raises(PeftlabError, match=field):
        PromptTuningConfig(**bad)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_output_is_the_base_model_on_prompt_then_token_embeddings(kind):
    """The whole mechanism: f([P; E[ids]]) with the mask extended by p ones."""
    base = BUILDERS[kind]()
    pm = get_peft_model(BUILDERS[kind](), PromptTuningConfig(num_virtual_tokens=P))
    inputs = model_inputs(kind)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    prompt = prompt_of(pm).detach()
    embeds = torch.cat([prompt.expand(ids.shape[0], -1, -1), base.get_input_embeddings()(ids)], dim=1)
    full_mask = torch.cat([torch.ones(ids.shape[0], P, dtype=mask.dtype), mask], dim=1)
    with torch.no_grad():
        expected = base(inputs_embeds=embeds, attention_mask=full_mask).logits
        got = pm(**inputs).logits
        positional = pm(ids, attention_mask=mask).logits  # a positional input is named the same way
    assert got.shape == expected.shape
    if kind != "bert":
        assert got.shape[1] == P + ids.shape[1]  # the prompt positions stay in the output, as in peft
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(positional, expected, atol=1e-6, rtol=0)


def test_causal_lm_labels_get_minus_100_over_the_prompt():
    base, pm = tiny_llama(), get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=P))
    ids = model_inputs("llama")["input_ids"]
    prompt = prompt_of(pm).detach().expand(ids.shape[0], -1, -1)
    embeds = torch.cat([prompt, base.get_input_embeddings()(ids)], dim=1)
    labels = torch.cat([torch.full((ids.shape[0], P), -100), ids], dim=1)
    with torch.no_grad():
        expected = base(inputs_embeds=embeds, labels=labels).loss
        got = pm(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(got, expected)


def test_sequence_classification_labels_and_token_types_and_positions():
    base, pm = tiny_bert(), get_peft_model(tiny_bert(), PromptTuningConfig(num_virtual_tokens=P))
    ids = model_inputs("bert")["input_ids"]
    types = torch.ones_like(ids)
    positions = torch.arange(ids.shape[1]).unsqueeze(0) + 4
    labels = torch.tensor([0, 1])
    embeds = torch.cat([prompt_of(pm).detach().expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
    with torch.no_grad():
        expected = base(inputs_embeds=embeds, labels=labels,
                        token_type_ids=torch.cat([torch.zeros(2, P, dtype=torch.long), types], 1),
                        position_ids=torch.cat([torch.arange(P).unsqueeze(0), positions + P], 1))
        got = pm(input_ids=ids, labels=labels, token_type_ids=types, position_ids=positions)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.loss, expected.loss)  # (batch,) labels are left alone


def test_vocab_and_random_initialisation():
    torch.manual_seed(3)
    pm = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=6))
    table = pm.base_model.get_input_embeddings().weight
    for row in prompt_of(pm):
        assert (table == row).all(dim=1).any(), "a vocab-initialised prompt row is not a token embedding"
    pm = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=200, init="random"))
    prompt = prompt_of(pm)
    assert prompt.min() >= -0.5 and prompt.max() <= 0.5 and prompt.std() > 0.2  # U(-0.5, 0.5)


def test_text_initialisation_repeats_the_text_tokens():
    path = require_shared(STORIES)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    pm = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=7, init_text="Once upon", tokenizer_path=str(path)))
    ids = AutoTokenizer.from_pretrained(path)("Once upon", add_special_tokens=False)["input_ids"]
    expected = torch.tensor((ids * 7)[:7])
    torch.testing.assert_close(prompt_of(pm), model.get_input_embeddings().weight[expected])


def test_vocab_initialisation_samples_the_top_k_token_ids():
    """Lester et al.: prompts start from tokens sampled among the 5,000 most common; without counts the
    token id is the rank, so the pool is ids 0..k-1 (distinct tokens while there are enough)."""
    assert PromptTuningConfig().vocab_top_k == 5000
    model = tiny_llama()
    table = model.get_input_embeddings().weight
    torch.manual_seed(0)
    pm = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=8, vocab_top_k=10))
    ids = row_ids(prompt_of(pm), table)
    assert all(i < 10 for i in ids) and len(set(ids)) == 8
    pm = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=40, vocab_top_k=5))
    ids = row_ids(prompt_of(pm), table)
    assert set(ids) == set(range(5))  # more rows than the pool: drawn again, never outside it
    # vocab_top_k=None: the whole vocabulary (HF peft's SAMPLE_VOCAB).
    ids = row_ids(prompt_of(get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=40, vocab_top_k=None))),
                  table)
    assert max(ids) >= 10


def test_frequency_file_ranks_the_vocabulary_by_counted_tokens(tmp_path):
    path, model, tokenizer = stories()
    lines = ["Once upon a time"] * 6 + ["the cat sat on a mat"] * 2 + ["zebra"]
    (tmp_path / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    counts = Counter(i for line in lines for i in tokenizer(line, add_special_tokens=False)["input_ids"])
    top = {i for i, c in counts.items() if c >= 6}  # the first line's tokens, 6 or more times each
    assert max(c for i, c in counts.items() if i not in top) < 6
    config = PromptTuningConfig(num_virtual_tokens=len(top), vocab_top_k=len(top),
                                frequency_file=str(tmp_path / "corpus.txt"), tokenizer_path=str(path))
    torch.manual_seed(0)
    ids = row_ids(prompt_of(get_peft_model(model, config)), model.get_input_embeddings().weight)
    assert set(ids) == top  # exactly the most frequent tokens, each once
    # A pool larger than the text's distinct tokens holds only tokens the text has.
    config = config.replace(num_virtual_tokens=30, vocab_top_k=5000)
    ids = row_ids(prompt_of(get_peft_model(stories()[1], config)), model.get_input_embeddings().weight)
    assert set(ids) <= set(counts)
    with pytest.raises(PeftlabError, match="frequency_file"):
        get_peft_model(stories()[1], config.replace(frequency_file=str(tmp_path / "missing.txt")))


def test_class_label_initialisation_averages_each_label_then_follows_init():
    """Lester et al.'s class-label init: the first positions hold the (averaged) embeddings of the label
    words; the rest is the chosen init (here the text's tokens, then U(-0.5, 0.5))."""
    path, model, tokenizer = stories()
    table = model.get_input_embeddings().weight
    labels = ("negative", "positive")
    label_ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in labels]
    assert all(len(ids) > 1 for ids in label_ids)  # multi-token labels: averaged
    pm = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=5, init_labels=labels, init_text="Once upon",
                                                  tokenizer_path=str(path)))
    prompt = prompt_of(pm)
    for row, ids in enumerate(label_ids):
        torch.testing.assert_close(prompt[row], table[ids].mean(dim=0))
    text = tokenizer("Once upon", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(prompt[2:], table[(text * 3)[:3]])
    _, model, _ = stories()
    pm = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=4, init="random", init_labels=labels,
                                                  tokenizer_path=str(path)))
    torch.testing.assert_close(prompt_of(pm)[:2], prompt[:2])
    assert prompt_of(pm)[2:].abs().max() <= 0.5
    assert prompt_of(pm).shape == (4, table.shape[1])


def _snapshot(model):
    return ([n for n, _ in model.named_modules()], {n: p.detach().clone() for n, p in model.named_parameters()},
            {n: p.requires_grad for n, p in model.named_parameters()}, model.training)


def test_text_initialisation_without_a_tokenizer_is_refused_and_leaves_no_trace():
    model = tiny_llama()
    modules, params, _, training = _snapshot(model)
    inputs = model_inputs("llama")
    with torch.no_grad():
        before = model(**inputs).logits
    with pytest.raises(PeftlabError, match="tokenizer"):
        get_peft_model(model, PromptTuningConfig(init_text="hello", tokenizer_path="/nonexistent/tokenizer"))
    after_modules, after_params, _, after_training = _snapshot(model)
    assert after_modules == modules  # no wrapper, no new module
    assert not any(isinstance(m, DeltaModule) for m in model.modules())
    assert after_params.keys() == params.keys() and all(torch.equal(after_params[n], params[n]) for n in params)
    assert after_training == training
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


def test_a_refused_prompt_init_leaves_requires_grad_as_it_was():
    model = tiny_llama()
    flags = _snapshot(model)[2]
    with pytest.raises(PeftlabError, match="tokenizer"):
        get_peft_model(model, PromptTuningConfig(init_labels=("yes",), tokenizer_path="/nonexistent/tokenizer"))
    assert _snapshot(model)[2] == flags


def test_generate_returns_ids_then_new_tokens_and_matches_decoding_without_cache():
    pm = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=P, init="random"))
    pm.base_model.generation_config.eos_token_id = None  # decode all 6 steps, like the reference
    inputs = model_inputs("llama")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    mask = mask.flip(1)  # left padding, as for generation
    with torch.no_grad():
        out = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        with pm.disable_adapter():
            plain = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        # Reference: full recompute at every step (no KV cache), positions counted over real tokens.
        seq, m = ids, mask
        for _ in range(6):
            positions = (m.cumsum(-1) - 1).clamp(min=0)
            logits = pm(input_ids=seq, attention_mask=m, position_ids=positions, use_cache=False).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
    assert out.shape == plain.shape == (2, ids.shape[1] + 6)
    assert torch.equal(out[:, :ids.shape[1]], ids)
    assert torch.equal(out, seq)
    assert not torch.equal(out, plain)


@pytest.mark.parametrize("name", sorted({cache_argument(tiny_llama()), "past_key_values"}))
def test_incremental_forward_with_a_cache_matches_the_full_forward(name):
    """The cache under either name (transformers 5.24 calls it ``cache``; ``past_key_values`` still works)."""
    pm = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=P))
    ids = model_inputs("llama")["input_ids"][:1]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old name's deprecation notice
        full = pm(input_ids=ids).logits[:, -1]
        first = pm(input_ids=ids[:, :-1], use_cache=True)
        step = pm(input_ids=ids[:, -1:], **{name: first.past_key_values},
                  attention_mask=torch.ones_like(ids)).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=0)


def test_encoder_decoder_prompts_the_encoder_only():
    base, pm = tiny_t5(), get_peft_model(tiny_t5(), PromptTuningConfig(num_virtual_tokens=P))
    inputs = model_inputs("t5")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = ids[:, :4].contiguous()
    embeds = torch.cat([prompt_of(pm).detach().expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
    full_mask = torch.cat([torch.ones(2, P, dtype=mask.dtype), mask], dim=1)
    with torch.no_grad():
        expected = base(inputs_embeds=embeds, attention_mask=full_mask, labels=labels)
        got = pm(input_ids=ids, attention_mask=mask, labels=labels)
        assert got.logits.shape == (2, 4, 100)  # decoder side untouched
        torch.testing.assert_close(got.logits, expected.logits)
        torch.testing.assert_close(got.loss, expected.loss)
        out = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        ref = base.generate(inputs_embeds=embeds, attention_mask=full_mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, ref)


def test_checkpoint_holds_prompt_embeddings_only_and_reloads(tmp_path):
    pm = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=P))
    state = pm.adapter_state_dict()
    assert list(state) == ["prompt_embeddings"] and state["prompt_embeddings"].shape == (P, 32)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(prompt_of(loaded), prompt_of(pm))
    assert isinstance(loaded.model_adapters["prompt_tuning"], SoftPrompt)


def test_trains_and_only_the_prompt_gets_gradients():
    torch.manual_seed(0)
    pm = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=P))
    pm.train()
    ids = model_inputs("llama")["input_ids"]
    opt = torch.optim.Adam(pm.adapter_parameters("default"), lr=0.05)
    losses = []
    for _ in range(15):
        loss = pm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert all(p.grad is None for n, p in pm.base_model.named_parameters())


def test_peft_config_round_trip_and_refusals():
    cfg = PromptTuningConfig(num_virtual_tokens=5, init="random", modules_to_save=("classifier",))
    assert config_from_dict(cfg.peft_fields()) == cfg
    cfg = PromptTuningConfig(num_virtual_tokens=5, init_text="hi there", tokenizer_path="tok")
    fields = cfg.peft_fields()
    assert fields["prompt_tuning_init"] == "TEXT" and fields["prompt_tuning_init_text"] == "hi there"
    # A saved prompt is loaded over the initial one, so reading it back never needs the tokenizer.
    assert config_from_dict(fields) == PromptTuningConfig(num_virtual_tokens=5)
    with pytest.raises(PeftlabError, match="encoder only"):
        config_from_dict({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "num_transformer_submodules": 2})
    # peft's SAMPLE_VOCAB samples the whole vocabulary; the top-k and label inits are peftlab's own fields.
    peft_sample = config_from_dict({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4,
                                    "prompt_tuning_init": "SAMPLE_VOCAB", "inference_mode": False})
    assert peft_sample.init == "vocab" and peft_sample.vocab_top_k is None
    cfg = PromptTuningConfig(num_virtual_tokens=5, init_labels=("no", "yes"), vocab_top_k=100, frequency_file="f.txt")
    assert cfg.peft_fields()["prompt_tuning_init"] == "SAMPLE_VOCAB"
    assert config_from_dict(cfg.to_dict()) == cfg


def test_prompt_tuning_without_input_is_refused():
    pm = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=P))
    with pytest.raises(PeftlabError, match="input_ids or inputs_embeds"):
        pm(attention_mask=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(PeftlabError, match="2D attention_mask"):
        pm(input_ids=torch.ones(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 1, 3, 3))
