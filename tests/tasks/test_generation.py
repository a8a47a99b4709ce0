"""E2E NLG loading (refs grouped per MR) and BLEU / ROUGE-L."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftlab.tasks import E2EExample, TaskDataError, e2e_metrics, load_e2e, rouge_l

SHARED_E2E = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "nlg" / "e2e"

MR_A = "name[Alimentum], area[city centre], familyFriendly[no]"
MR_B = "name[Blue Spice], eatType[coffee shop]"


@pytest.fixture
def e2e_root(tmp_path: Path) -> Path:
    (tmp_path / "devset.csv").write_text(
        "mr,ref\n"
        f'"{MR_A}","Alimentum is not family-friendly, in the city centre."\n'
        f'"{MR_A}","In the city centre, Alimentum is not family-friendly."\n'
        f'"{MR_B}",Blue Spice is a coffee shop.\n'
        f'"{MR_A}","A third, non-contiguous reference."\n',
        encoding="utf-8",
    )
    (tmp_path / "testset_w_refs.csv").write_text(f'"mr","ref"\n"{MR_B}","Blue Spice serves coffee."\n')
    return tmp_path


def test_groups_references_per_mr(e2e_root: Path) -> None:
    assert load_e2e(e2e_root, "dev") == [
        E2EExample(MR_A, (
            "Alimentum is not family-friendly, in the city centre.",
            "In the city centre, Alimentum is not family-friendly.",
            "A third, non-contiguous reference.",
        )),
        E2EExample(MR_B, ("Blue Spice is a coffee shop.",)),
    ]  # fmt: skip
    # limit counts MRs, and a kept MR still gets its later references
    assert load_e2e(e2e_root, "dev", limit=1)[0].references[-1] == "A third, non-contiguous reference."
    assert load_e2e(e2e_root, "test") == [E2EExample(MR_B, ("Blue Spice serves coffee.",))]
    assert load_e2e(e2e_root / "testset_w_refs.csv") == load_e2e(e2e_root, "test")  # a file path works too


def test_errors(e2e_root: Path) -> None:
    with pytest.raises(TaskDataError, match="trainset.csv.*devset.csv"):
        load_e2e(e2e_root, "train")  # missing file: names it and lists the folder
    (e2e_root / "testset.csv").write_text('MR\n"name[X]"\n')
    with pytest.raises(TaskDataError, match="testset.csv:1: header must have columns 'mr' and 'ref'"):
        load_e2e(e2e_root / "testset.csv")
    bad = e2e_root / "bad.csv"
    bad.write_text('mr,ref\n"name[X]",fine\n"name[X]",one,too many\n')
    with pytest.raises(TaskDataError, match=r"bad\.csv:3: malformed row with 3 columns; expected 2 \(mr, ref\)"):
        load_e2e(bad)


def test_metrics_by_hand() -> None:
    refs = [["the cat sat on the mat", "dog"], ["a red house"]]
    # LCS("the cat sat", "the cat sat on the mat") = 3: P=1, R=1/2, F=2/3; second example exact.
    assert rouge_l(["the cat sat", "a red house"], refs) == pytest.approx(100 * (2 / 3 + 1) / 2)
    same = e2e_metrics(["the cat sat on the mat", "a red house"], refs)
    assert same == pytest.approx({"bleu": 100.0, "rouge_l": 100.0})


def test_real_e2e() -> None:
    if not SHARED_E2E.exists():
        pytest.skip(f"shared E2E data not found at {SHARED_E2E}")
    dev, test = load_e2e(SHARED_E2E, "dev"), load_e2e(SHARED_E2E, "test")
    assert (len(dev), sum(len(e.references) for e in dev)) == (547, 4672)
    assert (len(test), sum(len(e.references) for e in test)) == (630, 4693)
    assert test[0].mr == "name[Blue Spice], eatType[coffee shop], area[city centre]"
    # each example's first reference against all its references: a perfect multi-reference score
    sample = test[:40]
    scores = e2e_metrics([e.references[0] for e in sample], [e.references for e in sample])
    assert scores == pytest.approx({"bleu": 100.0, "rouge_l": 100.0})
