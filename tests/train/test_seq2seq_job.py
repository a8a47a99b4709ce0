"""run_translation: a random T5 with a tokenizer trained on the fly, every registered method,
teacher-forced training that lowers the loss, decoding to text, BLEU, and clear errors."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from peftlab import LoraConfig, PeftlabError, get_peft_model
from peftlab.core.registry import all_methods
from peftlab.tasks import TaskDataError
from peftlab.train.data import make_seq2seq_loader
from peftlab.train.generation import IGNORE_INDEX, generate_texts, train_tokenizer
from peftlab.train.loop import TrainArgs, train
from peftlab.train.seq2seq_job import (TranslationRun, build_random_t5, encode_translation, load_seq2seq,
                                       run_translation, translation_splits)

SHARED_MT = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "mt" / "en-ro"
SUMMARY_KEYS = {"run", "method", "config", "train_args", "trainable_params", "total_params", "trainable_percent",
                "steps", "final_loss", "median_step_s", "tokens_per_s", "wall_s", "metrics"}
# A word-for-word toy language pair: learnable in a few dozen steps by a tiny model.
LEXICON = {"one": "unu", "two": "doi", "three": "trei", "four": "patru", "five": "cinci", "six": "șase",
           "seven": "șapte", "eight": "opt", "nine": "nouă", "ten": "zece"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    rng = random.Random(0)
    en, ro = [], []
    for _ in range(60):
        words = rng.choices(list(LEXICON), k=rng.randint(2, 5))
        en.append(" ".join(words) + ".")
        ro.append(" ".join(LEXICON[w] for w in words) + ".")
    (tmp_path / "newstest2016.en").write_text("\n".join(en) + "\n", encoding="utf-8")
    (tmp_path / "newstest2016.ro").write_text("\n".join(ro) + "\n", encoding="utf-8")
    return tmp_path


def tiny_run(corpus: Path, **kw) -> TranslationRun:
    base = dict(model="random:t5-tiny", data_dir=str(corpus), eval_size=8, vocab_size=120, batch_size=8,
                max_new_tokens=12, eval_batch_size=8)
    return TranslationRun(**{**base, **kw})


def quick_args(**kw) -> TrainArgs:
    return TrainArgs(**{**dict(max_steps=2, lr=1e-2, progress=False, warmup_ratio=0.0), **kw})


def test_tokenizer_is_cased_keeps_diacritics_and_ends_with_eos():
    tok = train_tokenizer(["Șeful ONU declară că nu există soluții.", "The UN chief says."] * 5, vocab_size=80)
    ids = tok("Șeful ONU declară")["input_ids"]
    assert ids[-1] == tok.eos_token_id == 1 and tok.pad_token_id == 0
    assert tok.decode(ids, skip_special_tokens=True) == "Șeful ONU declară"


def test_splits_hold_out_the_first_lines_for_scoring(corpus):
    train_pairs, eval_pairs = translation_splits(tiny_run(corpus))
    lines = (corpus / "newstest2016.en").read_text(encoding="utf-8").split("\n")
    assert [p.source for p in eval_pairs] == lines[:8]
    assert [p.source for p in train_pairs] == lines[8:60]


def test_teacher_forced_training_lowers_the_loss(corpus):
    run = tiny_run(corpus)
    train_pairs, _ = translation_splits(run)
    torch.manual_seed(0)
    model, tokenizer = load_seq2seq(run, train_pairs)
    rows = encode_translation(train_pairs, tokenizer, run)
    source = tokenizer.decode(rows[0]["input_ids"], skip_special_tokens=True)
    assert source == "translate English to Romanian: " + train_pairs[0].source  # T5's task prefix in front
    assert rows[0]["labels"][-1] == tokenizer.eos_token_id
    loader = make_seq2seq_loader(rows, tokenizer, 8, shuffle=True)
    batch = next(iter(loader))
    assert (batch["labels"] == IGNORE_INDEX).any() and not (batch["labels"] == tokenizer.pad_token_id).any()
    result = train(model, loader, quick_args(max_steps=30, lr=3e-3))
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first - 0.5, f"loss did not fall: {result.losses}"


def test_run_translation_summary_predictions_and_beam_search(corpus, tmp_path):
    out = tmp_path / "run"
    summary = run_translation(tiny_run(corpus, num_beams=2, score_before=True), LoraConfig(r=4),
                              quick_args(max_steps=3), out=out)
    assert set(summary) == SUMMARY_KEYS
    assert summary["method"] == "lora" and summary["steps"] == 3
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert set(summary["metrics"]) == {"bleu", "before/bleu"}
    assert 0.0 <= summary["metrics"]["bleu"] <= 100.0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 8 and all(isinstance(r["hypothesis"], str) for r in rows)
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((out / "metrics.json").read_text())["metrics"] == summary["metrics"]


def test_full_finetuning_trains_every_parameter(corpus):
    summary = run_translation(tiny_run(corpus, eval_limit=2), None, quick_args(max_steps=1))
    assert summary["method"] == "full" and summary["trainable_params"] == summary["total_params"]


# A search's internal stage (S3Delta-M's supernet) sets its gates in PeftModel.forward; it is trained
# by its search on classification, never used to generate.
SPECS = [s for s in all_methods() if not s.internal]


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_every_method_trains_and_decodes(spec, corpus):
    run = tiny_run(corpus, eval_limit=3, max_new_tokens=6)
    torch.manual_seed(0)
    model, tokenizer = load_seq2seq(run, translation_splits(run)[0])
    if spec.example is not None:
        pytest.skip(f"{spec.name} builds on other trained adapters; a job trains one adapter from scratch")
    try:  # a method that cannot apply to T5 says so at attach time (e.g. no biases for BitFit)
        model = get_peft_model(model, spec.config_cls())
    except PeftlabError as err:
        pytest.skip(f"{spec.name} does not apply to T5: {err}")
    # With a non-trivial adapter, padding the encoder input must not change what is decoded.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.adapter_parameters("default"):
            param.add_(torch.randn(param.shape, generator=g, dtype=param.dtype) * 0.05)
    prompts = [r["input_ids"] for r in encode_translation(translation_splits(run)[1], tokenizer, run)]
    together = generate_texts(model, tokenizer, prompts, decoder_only=False, batch_size=3, max_new_tokens=6)
    assert together == [generate_texts(model, tokenizer, [p], decoder_only=False, max_new_tokens=6)[0]
                        for p in prompts]
    summary = run_translation(run, spec.config_cls(), quick_args())
    assert summary["method"] == spec.name and summary["steps"] == 2
    assert torch.isfinite(torch.tensor(summary["final_loss"]))
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert 0.0 <= summary["metrics"]["bleu"] <= 100.0


def test_decoder_only_model_is_refused(corpus, tmp_path):
    from transformers import LlamaConfig

    folder = tmp_path / "llama"
    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(folder)
    with pytest.raises(PeftlabError, match="encoder-decoder.*'llama'.*run_generation"):
        run_translation(tiny_run(corpus, model=str(folder)), None, quick_args())


def test_unknown_random_shape_lists_the_known_ones(corpus):
    with pytest.raises(PeftlabError, match="random:t5-small"):
        run_translation(tiny_run(corpus, model="random:t5-huge"), None, quick_args())


def test_line_count_mismatch_names_both_files(corpus):
    (corpus / "newstest2016.ro").write_text("unu.\ndoi.\n", encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"newstest2016.en has 60 lines but .*newstest2016.ro has 2"):
        run_translation(tiny_run(corpus), None, quick_args())


@pytest.mark.parametrize("change,message", [
    (dict(eval_size=60), "eval_size=60 leaves no training pairs"),
    (dict(eval_size=0), "eval_size=0 leaves nothing to score"),
    (dict(train_limit=0), "training portion .* is empty"),
    (dict(eval_limit=0), "scoring portion .* is empty"),
])
def test_empty_portions_are_refused(corpus, change, message):
    with pytest.raises(TaskDataError, match=message):
        translation_splits(tiny_run(corpus, **change))


def test_random_t5_matches_the_tokenizer():
    tok = train_tokenizer(["a b c d e f g"] * 3, vocab_size=40)
    model = build_random_t5("t5-tiny", tok)
    assert model.config.vocab_size == len(tok) and model.config.decoder_start_token_id == tok.pad_token_id


def test_real_newstest_split_is_disjoint():
    if not SHARED_MT.is_dir():
        pytest.skip(f"{SHARED_MT} is absent: the real data lives in ../shared beside the repo (CI has it)")
    train_pairs, eval_pairs = translation_splits(TranslationRun(data_dir=str(SHARED_MT)))
    assert len(eval_pairs) == 500 and len(train_pairs) == 1999 - 500
    assert not {p.source for p in eval_pairs} & {p.source for p in train_pairs}


def test_a_saved_seq2seq_model_loads_by_folder(corpus, tmp_path):
    tok = train_tokenizer(["one two three unu doi trei"] * 3, vocab_size=60)
    torch.manual_seed(0)
    folder = tmp_path / "t5"
    build_random_t5("t5-tiny", tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    run = tiny_run(corpus, model=str(folder), eval_limit=2)
    summary = run_translation(run, LoraConfig(r=2), quick_args(max_steps=1))
    assert summary["run"]["model"] == str(folder) and summary["steps"] == 1


def test_random_t5_with_the_minilm_wordpiece_tokenizer(corpus):
    minilm = SHARED_MT.parents[2] / "models" / "all-MiniLM-L6-v2"
    if not minilm.is_dir():
        pytest.skip(f"{minilm} is absent: the real models live in ../shared beside the repo (CI has it)")
    run = tiny_run(corpus, tokenizer=str(minilm), eval_limit=2)
    _, tokenizer = load_seq2seq(run, translation_splits(run)[0])
    assert tokenizer.eos_token == "[SEP]"  # BERT vocabularies end a text with [SEP]: it serves as eos
    summary = run_translation(run, None, quick_args(max_steps=1))
    assert summary["total_params"] > 30522 * 64  # the model is sized to the 30,522-entry vocabulary
