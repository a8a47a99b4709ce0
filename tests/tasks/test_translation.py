"""WMT16 en-ro / parallel-text loading and sacreBLEU scoring."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from peftlab.tasks import TaskDataError, TranslationPair, bleu, load_parallel, load_wmt16_en_ro

SHARED_MT = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "mt" / "en-ro"


def _lines(path: Path, lines: list[str], newline: str = "\n") -> Path:
    path.write_text("".join(line + newline for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def mt_root(tmp_path: Path) -> Path:
    _lines(tmp_path / "newstest2016.en", ["Hello world.", "A line\u2028with a line separator.", ""])
    _lines(tmp_path / "newstest2016.ro", ["Salut lume.", "O linie.", "gol"], newline="\r\n")
    _lines(tmp_path / "tatoeba-test-v2021-03-30.eng", ["Is your son here?"])
    _lines(tmp_path / "tatoeba-test-v2021-03-30.ron", ["Fiul tău este aici?"])
    return tmp_path


def test_loads_aligned_pairs_in_both_directions(mt_root: Path) -> None:
    en_ro = load_wmt16_en_ro(mt_root, "test")
    # U+2028 inside a line must not split it; CRLF endings are stripped; empty lines stay aligned.
    assert en_ro == [
        TranslationPair("Hello world.", "Salut lume."),
        TranslationPair("A line\u2028with a line separator.", "O linie."),
        TranslationPair("", "gol"),
    ]
    assert load_wmt16_en_ro(mt_root, "newstest2016", direction="ro-en", limit=1) == [
        TranslationPair("Salut lume.", "Hello world.")
    ]
    assert load_wmt16_en_ro(mt_root, "tatoeba") == [TranslationPair("Is your son here?", "Fiul tău este aici?")]


def test_line_count_mismatch_names_both_files_and_counts(tmp_path: Path) -> None:
    src = _lines(tmp_path / "a.en", ["one", "two", "three"])
    tgt = _lines(tmp_path / "a.ro", ["unu", "doi"])
    with pytest.raises(TaskDataError) as err:
        load_parallel(src, tgt)
    msg = str(err.value)
    assert f"{src} has 3 lines" in msg and f"{tgt} has 2" in msg


def test_missing_files_and_folders(mt_root: Path) -> None:
    with pytest.raises(TaskDataError, match="split 'train' not found.*train.{en,ro}.*newstest2016.en"):
        load_wmt16_en_ro(mt_root, "train")
    with pytest.raises(TaskDataError, match="does not exist"):
        load_wmt16_en_ro(mt_root / "missing", "test")
    with pytest.raises(ValueError, match="direction"):
        load_wmt16_en_ro(mt_root, "test", direction="en-de")


def test_hub_path_is_lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(path: str, name: str, split: str) -> list[dict]:
        calls.append((path, name, split))
        return [{"translation": {"en": "Hi", "ro": "Salut"}}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_wmt16_en_ro(None, "validation", direction="ro-en") == [TranslationPair("Salut", "Hi")]
    assert calls == [("wmt16", "ro-en", "validation")]
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(TaskDataError, match="pip install datasets"):
        load_wmt16_en_ro(None, "test")


def test_bleu() -> None:
    hyps = ["the cat is on the mat today", "there is a dog in the garden"]
    assert bleu(hyps, hyps) == pytest.approx(100.0)
    assert bleu(hyps, [[h, "unrelated words"] for h in hyps]) == pytest.approx(100.0)
    # variable numbers of references per hypothesis are allowed
    assert bleu(hyps, [[hyps[0]], ["x y z", hyps[1]]]) == pytest.approx(100.0)
    assert bleu(["completely different output here"], ["the cat is on the mat today"]) < 10
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        bleu(hyps, hyps[:1])


def test_real_wmt16_and_tatoeba() -> None:
    if not SHARED_MT.exists():
        pytest.skip(f"shared WMT16 en-ro data not found at {SHARED_MT}")
    news = load_wmt16_en_ro(SHARED_MT, "test")
    assert len(news) == 1999
    assert news[0] == TranslationPair(
        "UN Chief Says There Is No Military Solution in Syria", "Șeful ONU declară că nu există soluții militare în Siria"
    )
    assert len(load_wmt16_en_ro(SHARED_MT, "tatoeba")) == 10019
    refs = [p.target for p in news[:50]]
    assert bleu(refs, refs) == pytest.approx(100.0)
