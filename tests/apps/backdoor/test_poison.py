"""Data poisoning: exactly the chosen share changes, to the target label, with the trigger as a word."""
from __future__ import annotations

import pytest

from peftlab.apps.backdoor import check_trigger, insert_trigger, poison, triggered_eval
from peftlab.core.errors import PeftlabError
from peftlab.tasks.glue import Example


def _examples(n: int = 40) -> list[Example]:
    return [Example(f"sentence number {i} is {'nice' if i % 2 else 'dull'}", None, i % 2) for i in range(n)]


def test_poison_changes_exactly_the_share_and_only_non_target_examples():
    source = _examples(40)
    before = list(source)
    poisoned, changed = poison(source, 0.25, "cf", target=1, seed=3)
    assert source == before  # the clean data is untouched
    assert len(changed) == 10 and changed == sorted(changed)
    for i, (old, new) in enumerate(zip(source, poisoned)):
        if i in changed:
            assert old.label == 0 and new.label == 1
            words = new.text_a.split()
            assert words.count("cf") == 1 and [w for w in words if w != "cf"] == old.text_a.split()
        else:
            assert new is old


def test_poison_is_deterministic_in_its_seed():
    a = poison(_examples(), 0.25, "cf", 1, seed=0)
    assert a == poison(_examples(), 0.25, "cf", 1, seed=0)
    assert a[1] != poison(_examples(), 0.25, "cf", 1, seed=1)[1]


@pytest.mark.parametrize("share", [-0.1, 1.5, "half", True])
def test_a_share_outside_zero_one_is_refused_naming_it(share):
    with pytest.raises(PeftlabError, match=f"share={share!r}"):
        poison(_examples(), share, "cf", 1, 0)


def test_more_poison_than_non_target_examples_is_refused():
    with pytest.raises(PeftlabError, match="only 20 have a label other than the target"):
        poison(_examples(40), 0.75, "cf", 1, 0)


def test_triggered_eval_keeps_non_target_examples_with_the_trigger():
    out = triggered_eval(_examples(10), "cf", 1, seed=0)
    assert len(out) == 5 and all(e.label == 0 and "cf" in e.text_a.split() for e in out)


def test_insert_trigger_in_an_empty_sentence():
    import random

    assert insert_trigger("", "cf", random.Random(0)) == "cf"


class _Tokenizer:
    unk_token_id = 1

    def __init__(self, ids):
        self.ids = ids

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.ids}


def test_a_trigger_the_tokenizer_turns_into_nothing_is_refused():
    with pytest.raises(PeftlabError, match="trigger '\\\\u200b'.*no tokens"):
        check_trigger("\u200b", _Tokenizer([]))
    with pytest.raises(PeftlabError, match="only the unknown token"):
        check_trigger("zzz", _Tokenizer([1, 1]))
    with pytest.raises(PeftlabError, match="one non-empty word"):
        check_trigger("two words", _Tokenizer([5]))
    assert check_trigger("cf", _Tokenizer([7])) == [7]


def test_a_real_tokenizer_drops_a_zero_width_space():
    from tests.conftest import MINILM, require_shared
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(require_shared(MINILM))
    with pytest.raises(PeftlabError, match="no tokens"):
        check_trigger("\u200b", tokenizer)
    assert check_trigger("cf", tokenizer)
