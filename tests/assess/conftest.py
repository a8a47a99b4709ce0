"""Fixtures for the assessment tests: a tiny GLUE folder in the standard layout and a tiny BERT
(built from a config, with a WordPiece tokenizer over a small vocabulary) saved as a model folder."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

WORDS = ("the a cat dog sat ran on under mat house red blue big small happy sad good bad film movie "
         "was is very not what who where how why question answer same different").split()

HEADERS = {
    "MRPC": ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
    "STS-B": ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
              "sentence2", "score"],
    "QNLI": ["index", "question", "sentence", "label"],
    "QQP": ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
    "SST-2": ["sentence", "label"],
}


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))


def _row(task: str, i: int, rng: random.Random) -> list[str]:
    a, b = _sentence(rng), _sentence(rng)
    if task == "MRPC":
        return [str(i % 2), str(i), str(i + 100), a, b]
    if task == "STS-B":
        return [str(i), "main-captions", "MSRvid", "2012test", str(i), "none", "none", a, b, f"{(i * 0.37) % 5:.3f}"]
    if task == "QNLI":
        return [str(i), a + " ?", b, ("entailment", "not_entailment")[i % 2]]
    if task == "QQP":
        return [str(i), str(2 * i), str(2 * i + 1), a + " ?", b + " ?", str(i % 2)]
    return [a, str(i % 2)]


def write_glue(root: Path, tasks: tuple[str, ...] = ("MRPC", "STS-B", "QNLI", "QQP"), n_train: int = 16,
               n_dev: int = 12) -> Path:
    rng = random.Random(0)
    for task in tasks:
        folder = root / task
        folder.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", n_train), ("dev", n_dev)):
            lines = ["\t".join(HEADERS[task])] + ["\t".join(_row(task, i, rng)) for i in range(n)]
            (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def write_tiny_model(folder: Path) -> Path:
    """A 2-layer BERT encoder (no head: the assessment adds one per task) and its tokenizer."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?"] + sorted(set(WORDS))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    if len(tokenizer) < len(vocab):  # transformers 5 reads the vocabulary from vocab=, not vocab_file=
        tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    assert len(tokenizer) == len(vocab), "the tiny tokenizer lost its vocabulary: every word would be [UNK]"
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture()
def glue_dir(tmp_path: Path) -> Path:
    return write_glue(tmp_path / "glue")
