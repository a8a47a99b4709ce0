"""run_generation: E2E on a decoder-only LM; the loss sits on the reference only (labels -100 on
the prompt and padding), left-padded batched decoding, every registered method, clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftlab import LoraConfig, PeftlabError, get_peft_model
from peftlab.core.registry import all_methods
from peftlab.tasks import E2EExample, TaskDataError
from peftlab.train.causal_job import (GenerationRun, encode_example, encode_prompt, generation_splits,
                                      load_causal_lm, run_generation, training_pairs)
from peftlab.train.data import make_seq2seq_loader

from ..conftest import perturb
from peftlab.train.generation import IGNORE_INDEX, generate_texts, train_tokenizer
from peftlab.train.loop import TrainArgs, train

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
STORIES = SHARED / "models" / "stories260K"
E2E = SHARED / "data" / "nlg" / "e2e"
SUMMARY_KEYS = {"run", "method", "config", "train_args", "trainable_params", "total_params", "trainable_percent",
                "steps", "final_loss", "median_step_s", "tokens_per_s", "wall_s", "metrics"}


def need(path: Path) -> str:
    if not path.exists():
        pytest.skip(f"{path} is absent: the real models/data live in ../shared beside the repo (CI has it)")
    return str(path)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


@pytest.fixture
def e2e_dir(tmp_path: Path) -> Path:
    rows = [("name[Bob], food[tea]", "Bob serves tea."), ("name[Bob], food[tea]", "Tea is served at Bob."),
            ("name[Al]", "Al is a pub."), ("name[Cy], area[riverside]", "Cy is by the river.")]
    body = "".join(f'"{mr}","{ref}"\n' for mr, ref in rows)
    (tmp_path / "devset.csv").write_text("mr,ref\n" + body, encoding="utf-8")
    (tmp_path / "testset_w_refs.csv").write_text("mr,ref\n" + body, encoding="utf-8")
    return tmp_path


def quick_args(**kw) -> TrainArgs:
    return TrainArgs(**{**dict(max_steps=2, lr=1e-2, progress=False, warmup_ratio=0.0), **kw})


# -- batching and label masking --------------------------------------------------------------------
def test_label_masking_hand_checked():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(need(STORIES))
    row = encode_example("name[Bob]", "Bob is.", tok, " =>", max_length=256)
    # <s> ▁nam e [ B o b ] ▁ = >  |  ▁B o b ▁ is . </s>   (11 prompt tokens, 7 target tokens)
    assert tok.convert_ids_to_tokens(row["input_ids"]) == [
        "<s>", "▁nam", "e", "[", "B", "o", "b", "]", "▁", "<0x3D>", ">",
        "▁B", "o", "b", "▁", "is", ".", "</s>"]
    assert row["labels"] == [IGNORE_INDEX] * 11 + row["input_ids"][11:]
    assert row["input_ids"][:11] == encode_prompt("name[Bob]", tok, " =>")  # what generation is given

    longer = encode_example("name[Al], food[tea]", "Al has tea.", tok, " =>", max_length=256)
    batch = next(iter(make_seq2seq_loader([row, longer], tok, 2, shuffle=False)))
    width = len(longer["input_ids"])
    assert batch["labels"].shape == (2, width)
    labels, mask = batch["labels"][0].tolist(), batch["attention_mask"][0].tolist()
    # -100 exactly on the 11 prompt positions and the padding after the 18 real tokens.
    assert [i for i, v in enumerate(labels) if v == IGNORE_INDEX] == list(range(11)) + list(range(18, width))
    assert mask == [1] * 18 + [0] * (width - 18)
    assert batch["input_ids"][0, 18:].eq(tok.pad_token_id).all()


def test_batches_pad_right_with_minus_100_whatever_side_the_tokenizer_pads():
    tok = train_tokenizer(["a b c"] * 4, vocab_size=40)  # pad id 0
    tok.padding_side = "left"  # as for decoding; training still pads on the right
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}]
    batch = next(iter(make_seq2seq_loader(rows, tok, 2, shuffle=False)))
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert tok.padding_side == "left"  # the caller's tokenizer is left as it was


def test_training_pairs_go_round_robin_over_mrs():
    examples = [E2EExample("a", ("a1", "a2", "a3")), E2EExample("b", ("b1",)), E2EExample("c", ("c1", "c2"))]
    assert training_pairs(examples) == [("a", "a1"), ("b", "b1"), ("c", "c1"), ("a", "a2"), ("c", "c2"), ("a", "a3")]
    assert training_pairs(examples, limit=2) == [("a", "a1"), ("b", "b1")]


# -- the real model --------------------------------------------------------------------------------
def test_left_padded_batch_decodes_like_one_by_one():
    run = GenerationRun(model=need(STORIES), data_dir="unused")
    model, tok = load_causal_lm(run)
    prompts = [tok(t)["input_ids"] for t in ("Once upon a time", "The dog", "Lily and her mom went to the")]
    together = generate_texts(model, tok, prompts, decoder_only=True, batch_size=3, max_new_tokens=10)
    alone = [generate_texts(model, tok, [p], decoder_only=True, max_new_tokens=10)[0] for p in prompts]
    assert together == alone and len(set(together)) == 3 and all(together)


def test_lora_on_16_examples_lowers_the_loss_and_scores():
    run = GenerationRun(model=need(STORIES), data_dir=need(E2E), train_limit=16, eval_limit=4, batch_size=8,
                        max_new_tokens=24)
    pairs, _ = generation_splits(run)
    assert len(pairs) == 16 and len({mr for mr, _ in pairs}) == 16  # round-robin: 16 different MRs
    torch.manual_seed(0)
    model, tok = load_causal_lm(run)
    model = get_peft_model(model, LoraConfig())
    rows = [encode_example(mr, ref, tok, run.separator, run.max_length) for mr, ref in pairs]
    result = train(model, make_seq2seq_loader(rows, tok, 8, shuffle=True), quick_args(max_steps=12))
    first, last = sum(result.losses[:2]) / 2, sum(result.losses[-2:]) / 2
    assert last < first - 0.3, f"loss did not fall: {result.losses}"

    summary = run_generation(run, LoraConfig(), quick_args(max_steps=4))
    assert set(summary) == SUMMARY_KEYS and summary["method"] == "lora"
    assert set(summary["metrics"]) == {"bleu", "rouge_l"}
    assert all(0.0 <= v <= 100.0 for v in summary["metrics"].values())


def test_run_generation_writes_predictions_and_scores_before(tmp_path):
    run = GenerationRun(model=need(STORIES), data_dir=need(E2E), train_limit=8, eval_limit=3, max_new_tokens=12,
                        num_beams=2, score_before=True)
    summary = run_generation(run, LoraConfig(r=2), quick_args(max_steps=1), out=tmp_path)
    assert set(summary["metrics"]) == {"bleu", "rouge_l", "before/bleu", "before/rouge_l"}
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3 and all(isinstance(r["hypothesis"], str) and r["references"] for r in rows)
    assert any(r["hypothesis"] for r in rows)
    assert (tmp_path / "adapter_model.safetensors").is_file()


# A search's internal stage (S3Delta-M's supernet) sets its gates in PeftModel.forward; it is trained
# by its search on classification, never used to generate.
SPECS = [s for s in all_methods() if not s.internal]


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_every_method_trains_and_generates(spec, e2e_dir):
    run = GenerationRun(model=need(STORIES), data_dir=str(e2e_dir), train_split="dev",
                        eval_split="test", eval_limit=2, max_new_tokens=6, batch_size=4)
    model, tok = load_causal_lm(run)
    if spec.example is not None:
        pytest.skip(f"{spec.name} builds on other trained adapters; a job trains one adapter from scratch")
    try:  # a method that cannot apply to Llama says so at attach time (e.g. no biases for BitFit)
        model = get_peft_model(model, spec.config_cls())
    except PeftlabError as err:
        pytest.skip(f"{spec.name} does not apply to Llama: {err}")
    # With a non-trivial adapter, left padding must not change what is generated (soft prompts and
    # prefixes shift positions and masks; this catches a misaligned one).
    perturb(model, scale=0.05)
    prompts = [tok(t)["input_ids"] for t in ("Once upon a time", "The dog", "Lily and her mom went to the")]
    together = generate_texts(model, tok, prompts, decoder_only=True, batch_size=3, max_new_tokens=8)
    assert together == [generate_texts(model, tok, [p], decoder_only=True, max_new_tokens=8)[0] for p in prompts]
    summary = run_generation(run, spec.config_cls(), quick_args())
    assert summary["method"] == spec.name and summary["steps"] == 2
    assert torch.isfinite(torch.tensor(summary["final_loss"]))
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert set(summary["metrics"]) == {"bleu", "rouge_l"}


# -- bad input -------------------------------------------------------------------------------------
def _save_config(folder: Path, config) -> str:
    config.save_pretrained(folder)
    return str(folder)


def test_encoder_decoder_model_is_refused(e2e_dir, tmp_path):
    from transformers import T5Config

    model = _save_config(tmp_path / "t5", T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(PeftlabError, match="encoder-decoder 't5'.*run_translation"):
        run_generation(GenerationRun(model=model, data_dir=str(e2e_dir)), None, quick_args())


def test_encoder_only_model_is_refused(e2e_dir, tmp_path):
    from transformers import BertConfig

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, architectures=["BertModel"])
    model = _save_config(tmp_path / "bert", config)
    with pytest.raises(PeftlabError, match="causal language model.*BertModel.*cannot generate"):
        run_generation(GenerationRun(model=model, data_dir=str(e2e_dir)), None, quick_args())


@pytest.mark.parametrize("change,message", [
    (dict(eval_split="dev"), "both 'dev'.*scored on the texts it trained on"),
    (dict(train_limit=0), "training split 'dev' .* gave no examples"),
    (dict(eval_limit=0), "scoring split 'test' .* gave no examples"),
])
def test_bad_splits_are_refused(e2e_dir, change, message):
    with pytest.raises(TaskDataError, match=message):
        generation_splits(GenerationRun(**{**dict(model="unused", data_dir=str(e2e_dir)), **change}))


def test_an_mr_longer_than_max_length_is_refused():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(need(STORIES))
    with pytest.raises(TaskDataError, match="max_length=8; raise max_length"):
        encode_example("name[The Golden Palace], food[Chinese]", "It is.", tok, " =>", max_length=8)
    cut = encode_example("name[Bob]", "Bob is a very long text indeed.", tok, " =>", max_length=14)
    assert len(cut["input_ids"]) == 14 and cut["labels"][:11] == [IGNORE_INDEX] * 11
