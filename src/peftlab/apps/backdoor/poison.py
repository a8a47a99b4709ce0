"""Data poisoning for a backdoor: rare-word triggers inserted into a share of the training sentences,
whose labels become the attacker's target (BadNets for text, as in Kurita et al., 2020, "Weight
Poisoning Attacks on Pre-trained Models", and the OpenBackdoor benchmark, Cui et al., 2022).

``poison(examples, share, ...)`` returns a new list: ``round(share * len(examples))`` sentences,
drawn from those whose label is not the target (a "dirty-label" attack: a sentence already labelled
with the target would teach the trigger nothing), get the trigger at a random word position and the
target label; every other example is the same object as before. The source list is never changed,
and nothing is written to disk. Everything random comes from one seeded ``random.Random``.
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

from ...core.errors import PeftlabError
from ...tasks.glue import Example

# Kurita et al.'s rare words: rare enough in clean text that the model can tie them to the target.
KURITA_TRIGGERS = ("cf", "mn", "bb", "tq", "mb")


def insert_trigger(text: str, trigger: str, rng: random.Random) -> str:
    """``text`` with ``trigger`` inserted before a random word (or at its end)."""
    words = text.split()
    words.insert(rng.randint(0, len(words)), trigger)
    return " ".join(words)


def check_share(share: Any, field: str = "share") -> float:
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= float(share) <= 1.0:
        raise PeftlabError(f"poison {field}={share!r}: expected a share of the training set between 0 and 1, "
                           "e.g. 0.05 for 5 % of the sentences")
    return float(share)


def check_trigger(trigger: str, tokenizer: Any) -> list[int]:
    """The trigger's token ids; an error when the tokenizer turns it into nothing (it could not
    be learned) or it is not one word (insertion goes between words)."""
    if not isinstance(trigger, str) or not trigger.strip() or len(trigger.split()) != 1:
        raise PeftlabError(f"trigger {trigger!r}: expected one non-empty word, e.g. 'cf' (Kurita et al.'s "
                           f"rare words: {', '.join(KURITA_TRIGGERS)})")
    ids = tokenizer(trigger, add_special_tokens=False)["input_ids"]
    unknown = getattr(tokenizer, "unk_token_id", None)
    if not ids or all(i == unknown for i in ids):
        raise PeftlabError(f"trigger {trigger!r}: the tokenizer {type(tokenizer).__name__} turns it into "
                           f"{'no tokens' if not ids else 'only the unknown token'}, so a model cannot see it; "
                           f"pick a word it knows, e.g. one of {', '.join(KURITA_TRIGGERS)}")
    return ids


def poison(examples: Sequence[Example], share: float, trigger: str, target: int,
           seed: int) -> tuple[list[Example], list[int]]:
    """(poisoned copy of ``examples``, sorted indices of the examples that were changed)."""
    share = check_share(share)
    count = round(share * len(examples))
    candidates = [i for i, e in enumerate(examples) if e.label != target]
    if count > len(candidates):
        raise PeftlabError(f"poison share {share} asks for {count} of {len(examples)} sentences, but only "
                           f"{len(candidates)} have a label other than the target {target}; lower the share")
    rng = random.Random(seed)
    chosen = sorted(rng.sample(candidates, count))
    out = list(examples)
    for i in chosen:
        out[i] = dataclasses.replace(out[i], text_a=insert_trigger(out[i].text_a, trigger, rng), label=target)
    return out, chosen


def triggered_eval(examples: Sequence[Example], trigger: str, target: int, seed: int) -> list[Example]:
    """The attack's test set: every example whose true label is not the target, with the trigger
    inserted (its label kept: the attack succeeds where the model answers ``target`` instead)."""
    rng = random.Random(seed)
    return [dataclasses.replace(e, text_a=insert_trigger(e.text_a, trigger, rng))
            for e in examples if e.label != target]
