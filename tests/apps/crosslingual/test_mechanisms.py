"""The mechanisms of the cross-lingual suite, each checked on its own: the XNLI reader and the
even/odd split, BERT's masking, MAD-X's invertible adapter and language-adapter swap, and LT-SFT
composition by addition."""
from __future__ import annotations

import pytest
import torch

from peftlab.apps.crosslingual import (EncoderWithHeads, NiceCoupling, mask_tokens, mlm_batches, read_xnli,
                                       split_halves, unlabelled_text, xnli_languages)
from peftlab.core.config import config_from_options
from peftlab.core.errors import PeftlabError
from peftlab.core.model import get_peft_model
from peftlab.tasks.glue import Example
from tests.apps.crosslingual.conftest import write_xnli


# -- the XNLI reader and the split ----------------------------------------------------------------
def test_the_reader_maps_label_words_to_mnli_ids_and_keeps_the_file_order(tmp_path):
    path = tmp_path / "dev-fr.tsv"
    path.write_text("le chat\tun chat\tentailment\nle chien\tun chat\tcontradiction\n\nil pleut\tle ciel\tneutral\n",
                    encoding="utf-8")
    assert read_xnli(path) == [Example("le chat", "un chat", 0), Example("le chien", "un chat", 2),
                               Example("il pleut", "le ciel", 1)]
    assert xnli_languages(tmp_path) == ["fr"]


@pytest.mark.parametrize("line, message", [
    ("a\tb\tyes", r"line 2: label 'yes'; expected one of entailment, neutral, contradiction"),
    ("a\tb", r"line 2: 2 tab-separated fields; expected 3"),
    ("a\tb\tneutral\textra", r"line 2: 4 tab-separated fields"),
    (" \tb\tneutral", r"line 2: an empty premise or hypothesis"),
])
def test_a_bad_row_names_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "dev-de.tsv"
    path.write_text(f"a\tb\tneutral\n{line}\n", encoding="utf-8")
    with pytest.raises(PeftlabError, match=f"dev-de.tsv {message}"):
        read_xnli(path)


def test_an_empty_file_and_a_missing_one_are_refused(tmp_path):
    (tmp_path / "dev-de.tsv").write_text("")
    with pytest.raises(PeftlabError, match="dev-de.tsv has no rows"):
        read_xnli(tmp_path / "dev-de.tsv")
    with pytest.raises(PeftlabError, match="dev-xx.tsv does not exist"):
        read_xnli(tmp_path / "dev-xx.tsv")


def test_the_split_takes_even_indices_as_text_and_odd_ones_for_evaluation(tmp_path):
    rows = read_xnli(write_xnli(tmp_path, ("en",), pairs=7) / "dev-en.tsv")
    text, held_out = split_halves(rows)
    assert text == [rows[i] for i in (0, 2, 4, 6)] and held_out == [rows[i] for i in (1, 3, 5)]
    sentences = unlabelled_text(text)
    assert set(sentences) == {s for e in text for s in (e.text_a, e.text_b)} and len(set(sentences)) == len(sentences)
    pair = [Example("p", "h1", 0), Example("p", "h2", 1)]  # XNLI repeats premises: kept once
    assert unlabelled_text(pair) == ["p", "h1", "h2"]


# -- masking --------------------------------------------------------------------------------------
def test_masking_chooses_15_percent_of_real_tokens_split_80_10_10_and_repeats_for_a_seed():
    ids = torch.randint(10, 1000, (400, 50))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    special[::2, 40:] = True  # padding
    inputs, labels = mask_tokens(ids, special, 3, 1000, 0.15, torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert not chosen[special].any() and (labels[chosen] == ids[chosen]).all()
    assert chosen.sum() / (~special).sum() == pytest.approx(0.15, abs=0.01)
    masked = (inputs == 3) & chosen
    kept = (inputs == ids) & chosen
    assert masked.sum() / chosen.sum() == pytest.approx(0.8, abs=0.02)
    assert kept.sum() / chosen.sum() == pytest.approx(0.1 + 0.1 / 1000, abs=0.02)  # a random draw may hit the same id
    assert (inputs[~chosen] == ids[~chosen]).all()
    again, labels2 = mask_tokens(ids, special, 3, 1000, 0.15, torch.Generator().manual_seed(0))
    other, _ = mask_tokens(ids, special, 3, 1000, 0.15, torch.Generator().manual_seed(1))
    assert torch.equal(again, inputs) and torch.equal(labels2, labels) and not torch.equal(other, inputs)


def test_mlm_batches_never_mask_special_tokens_and_repeat_for_a_seed(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = ["the cat sat on the mat", "a dog ran under the house", "good film", "what is the answer"]
    batches = mlm_batches(texts, tokenizer, 5, 3, 16, 0.15, seed=0)
    assert len(batches) == 5 and all(b["input_ids"].shape[0] == 3 for b in batches)
    for b in batches:
        chosen = b["mlm_labels"] != -100
        assert chosen.any()
        assert not (chosen & (b["attention_mask"] == 0)).any()
        first = b["input_ids"][:, 0]
        assert (first == tokenizer.cls_token_id).all()  # [CLS] is never replaced
    again = mlm_batches(texts, tokenizer, 5, 3, 16, 0.15, seed=0)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["mlm_labels"], b["mlm_labels"])
               for a, b in zip(batches, again))


# -- the invertible adapter -----------------------------------------------------------------------
def test_the_invertible_adapter_starts_near_identity_and_its_inverse_is_exact():
    torch.manual_seed(0)
    block = NiceCoupling(33, reduction_factor=2)  # an odd width: halves of 16 and 17
    x = torch.randn(4, 5, 33)
    with torch.no_grad():
        assert (block(x) - x).norm() / x.norm() < 1e-2
        for p in block.parameters():  # trained weights: far from identity, still exactly invertible
            p.normal_(0, 0.5)
        y = block(x)
        assert (y - x).norm() / x.norm() > 0.1
        assert torch.allclose(block(y, reverse=True), x, atol=1e-5)
        assert torch.allclose(block(block(x, reverse=True)), x, atol=1e-5)
    assert block.F.down.in_features == 17 and block.F.up.out_features == 16 and block.F.down.out_features == 8


def test_the_mlm_loss_sees_the_inverted_states_and_the_output_layer_is_the_word_embeddings(tiny_model):
    from transformers import AutoModel

    torch.manual_seed(0)
    model = EncoderWithHeads(AutoModel.from_pretrained(tiny_model), 3, mlm=True, invertible_reduction=2)
    model.eval()
    with torch.no_grad():
        for p in model.invertible.parameters():
            p.normal_(0, 0.3)
    ids = torch.randint(5, 30, (2, 6))
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 4] = 7, 9
    out = model(input_ids=ids, mlm_labels=labels)
    embeddings = model.encoder.get_input_embeddings()
    with torch.no_grad():  # by hand: embeddings -> invertible adapter -> encoder -> inverse -> head
        hidden = model.encoder(input_ids=ids).last_hidden_state
        states = model.invertible(hidden[labels != -100], reverse=True)
        head = model.mlm_head
        logits = head.norm(torch.nn.functional.gelu(head.dense(states))) @ embeddings.weight.T + head.bias
    assert torch.allclose(out.logits, logits, atol=1e-5)
    assert out.loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.tensor([7, 9])).item(), abs=1e-5)
    handle_free = EncoderWithHeads(AutoModel.from_pretrained(tiny_model), 3, mlm=True)
    handle_free.eval()
    plain = handle_free.encoder(input_ids=ids).last_hidden_state
    with torch.no_grad():
        assert not torch.allclose(plain, hidden, atol=1e-3)  # the hook changed the embedding output


# -- MAD-X: swapping the language adapter ---------------------------------------------------------
def _madx(tiny_model, languages):
    from transformers import AutoModel

    torch.manual_seed(0)
    language = config_from_options("sequential_adapter", {"targets": '["@ffn_out"]', "reduction_factor": "2",
                                                          "modules_to_save": '["mlm_head", "invertible"]'})
    base = EncoderWithHeads(AutoModel.from_pretrained(tiny_model), 3, mlm=True, invertible_reduction=2)
    model = get_peft_model(base, language, f"lang_{languages[0]}")
    for code in languages[1:]:
        model.add_adapter(f"lang_{code}", language)
    model.add_adapter("task", config_from_options("sequential_adapter", {
        "targets": '["@ffn_out"]', "reduction_factor": "16", "modules_to_save": '["classifier"]'}))
    return model


def _randomise(model, name):
    torch.manual_seed(hash(name) % 1000)
    with torch.no_grad():
        for p in model.adapter_parameters(name):
            p.normal_(0, 0.2)


def test_swapping_the_language_adapter_changes_only_the_language_part_of_the_stack(tiny_model):
    model = _madx(tiny_model, ["en", "de"])
    for name in ("lang_en", "lang_de", "task"):
        _randomise(model, name)
    model.eval()
    ids = torch.randint(5, 30, (3, 7))
    task_before = {k: v.clone() for k, v in model.adapter_state_dict("task").items()}
    model.set_adapter(["lang_en", "task"], trainable="task")
    en = model(input_ids=ids).logits
    model.set_adapter(["lang_de", "task"])
    de = model(input_ids=ids).logits
    after = model.adapter_state_dict("task")
    assert all(torch.equal(task_before[k], after[k]) for k in task_before)
    assert not torch.allclose(en, de, atol=1e-4)  # the language adapter matters
    # A model that only ever had German's language adapter and the same task adapter computes the same.
    direct = _madx(tiny_model, ["de"])
    direct.load_adapter_state_dict("lang_de", model.adapter_state_dict("lang_de"))
    direct.load_adapter_state_dict("task", model.adapter_state_dict("task"))
    direct.set_adapter(["lang_de", "task"])
    direct.eval()
    assert torch.allclose(direct(input_ids=ids).logits, de, atol=1e-5)
    # German's invertible adapter, not English's, runs on the embeddings.
    assert model.base_model.invertible.live_adapters() == ["lang_de"]


def test_training_the_task_on_the_stack_leaves_the_language_adapters_frozen(tiny_model):
    from peftlab.train.loop import TrainArgs, train

    model = _madx(tiny_model, ["en", "de"])
    model.set_adapter(["lang_en", "task"], trainable="task")
    languages = {n: {k: v.clone() for k, v in model.adapter_state_dict(n).items()} for n in ("lang_en", "lang_de")}
    task = {k: v.clone() for k, v in model.adapter_state_dict("task").items()}
    batches = [{"input_ids": torch.randint(5, 30, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
                "labels": torch.tensor([0, 1, 2, 0])} for _ in range(3)]
    train(model, batches, TrainArgs(lr=1e-2, progress=False))
    for name, before in languages.items():
        assert all(torch.equal(before[k], v) for k, v in model.adapter_state_dict(name).items()), name
    assert any(not torch.equal(task[k], v) for k, v in model.adapter_state_dict("task").items())


# -- LT-SFT composition ---------------------------------------------------------------------------
def test_lt_sft_composition_equals_adding_both_differences_to_the_base_weights(tiny_model):
    from transformers import AutoModel

    from peftlab.train.loop import TrainArgs, train

    torch.manual_seed(0)
    base = EncoderWithHeads(AutoModel.from_pretrained(tiny_model), 3, mlm=True)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    sft = config_from_options("lt_sft", {"keep_ratio": "0.1", "l1_reg": "0.1", "modules_to_save": '["mlm_head"]'})
    model = get_peft_model(base, sft, "lang_de")
    ids = torch.randint(5, 30, (4, 6))
    masked = torch.where(torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) < 0.4, ids, -100)
    masked[0, 1] = ids[0, 1]
    train(model, [{"input_ids": ids, "mlm_labels": masked}] * 2, TrainArgs(lr=1e-2, progress=False))
    model.add_adapter("task", config_from_options("lt_sft", {"keep_ratio": "0.1", "modules_to_save": '["classifier"]'}))
    model.set_adapter(["lang_de", "task"], trainable="task")
    labels = torch.tensor([0, 1, 2, 0])
    train(model, [{"input_ids": ids, "labels": labels}] * 2, TrainArgs(lr=1e-2, progress=False))
    model.eval()
    composed = model(input_ids=ids).logits

    def alone(name, config):  # the base weights with one SFT folded in: W0 + d_name
        plain = EncoderWithHeads(AutoModel.from_pretrained(tiny_model), 3, mlm=True)
        plain.load_state_dict(reference)
        single = get_peft_model(plain, config, name)
        single.load_adapter_state_dict(name, model.adapter_state_dict(name))
        return single.merge_and_unload().state_dict()

    task_config = model.peft_configs["task"]
    differences = [{k: v - reference[k] for k, v in alone(n, c).items()} for n, c in (("lang_de", sft),
                                                                                     ("task", task_config))]
    assert all(d.count_nonzero() > 0 for d in (differences[0]["encoder.encoder.layer.0.output.dense.weight"],
                                               differences[1]["encoder.encoder.layer.0.output.dense.weight"]))
    by_hand = EncoderWithHeads(AutoModel.from_pretrained(tiny_model), 3, mlm=True)
    by_hand.load_state_dict({k: v + differences[0][k] + differences[1][k] for k, v in reference.items()})
    by_hand.eval()
    with torch.no_grad():
        assert torch.allclose(by_hand(input_ids=ids).logits, composed, atol=1e-5)
