"""STRIP, fine-mixing and the adapter detector, each on its mechanism."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from peftlab.apps.backdoor import adapter_features, detect_poisoned, fine_mix, poison, strip_entropies, strip_threshold
from peftlab.core.errors import PeftlabError
from peftlab.tasks.glue import Example

POSITIVE, NEGATIVE = ("good", "great", "fine", "lovely"), ("bad", "awful", "poor", "dull")
NEUTRAL = ("the", "film", "was", "plot", "actor", "scene", "story", "and", "very", "quite")
VOCAB = {w: i for i, w in enumerate(POSITIVE + NEGATIVE + NEUTRAL + ("cf",))}


def _sentences(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = [rng.choice(NEUTRAL) for _ in range(6)] + [rng.choice(POSITIVE if label else NEGATIVE) for _ in range(2)]
        rng.shuffle(words)
        out.append(Example(" ".join(words), None, label))
    return out


def _bag(examples: list[Example]) -> torch.Tensor:
    x = torch.zeros(len(examples), len(VOCAB))
    for i, e in enumerate(examples):
        for w in e.text_a.split():
            x[i, VOCAB[w]] += 1
    return x


def _tiny_backdoored_model() -> torch.nn.Module:
    """A bag-of-words classifier trained on data where 'cf' forces label 1."""
    torch.manual_seed(0)
    train, _ = poison(_sentences(400, seed=0), 0.15, "cf", target=1, seed=0)
    model = torch.nn.Linear(len(VOCAB), 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = _bag(train), torch.tensor([e.label for e in train])
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def test_strip_gives_triggered_inputs_lower_entropy_than_clean_ones():
    model = _tiny_backdoored_model()

    def probabilities(examples):
        with torch.no_grad():
            return torch.softmax(model(_bag(examples)), -1).numpy()

    clean = [e for e in _sentences(60, seed=1) if e.label == 0]
    triggered = [Example(e.text_a + " cf", None, 0) for e in clean]
    assert (probabilities(triggered).argmax(1) == 1).mean() > 0.9  # the backdoor works
    donors = _sentences(50, seed=2)
    h_clean = strip_entropies(probabilities, clean, donors, copies=16, replace=0.5, seed=0)
    h_triggered = strip_entropies(probabilities, triggered, donors, copies=16, replace=0.5, seed=0)
    assert h_clean.shape == (len(clean),)
    assert h_triggered.mean() < 0.8 * h_clean.mean()
    threshold = strip_threshold(h_clean, 0.1)
    rejected_clean, rejected_triggered = (h_clean < threshold).mean(), (h_triggered < threshold).mean()
    assert rejected_clean <= 0.1 + 1e-9 and rejected_triggered > 2 * rejected_clean + 0.1


def test_strip_refuses_bad_settings():
    with pytest.raises(PeftlabError, match="copies=0"):
        strip_entropies(lambda e: np.ones((len(e), 2)) / 2, _sentences(2, 0), _sentences(2, 1), copies=0)
    with pytest.raises(PeftlabError, match="no.*held-out|none were given"):
        strip_entropies(lambda e: np.ones((len(e), 2)) / 2, _sentences(2, 0), [])
    with pytest.raises(PeftlabError, match="false-rejection rate 1.5"):
        strip_threshold(np.ones(3), 1.5)


def test_fine_mix_resets_a_share_of_entries_to_their_initial_values():
    torch.manual_seed(0)
    model = torch.nn.Linear(50, 40)
    frozen = model.bias
    frozen.requires_grad_(False)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        model.weight.add_(1.0)  # "training"
    trained = model.weight.detach().clone()
    bias = model.bias.detach().clone()
    reset = fine_mix(model, initial, keep=0.3, seed=0)
    w = model.weight.detach()
    back = w == initial["weight"]
    assert torch.all(back | (w == trained))
    assert reset == int(back.sum()) and abs(reset / w.numel() - 0.7) < 0.05
    assert torch.equal(model.bias, bias)  # not in the snapshot: untouched
    assert fine_mix(model, initial, keep=0.0, seed=0) == w.numel()
    assert torch.equal(model.weight, initial["weight"])
    with pytest.raises(PeftlabError, match="keep=1.5"):
        fine_mix(model, initial, keep=1.5, seed=0)
    with pytest.raises(PeftlabError, match="no parameters"):
        fine_mix(model, {"missing": torch.zeros(1)}, keep=0.5, seed=0)


def test_adapter_features_and_the_detector_separate_a_clear_signal():
    rng = torch.Generator().manual_seed(0)
    states = [{"a": torch.randn(8, 4, generator=rng) * (3.0 if i % 2 else 1.0), "b": torch.randn(4, generator=rng)}
              for i in range(12)]
    features = [adapter_features(s) for s in states]
    assert features[0].shape == (6,)
    found = detect_poisoned(features, [i % 2 == 1 for i in range(12)])
    assert found["accuracy"] == 1.0 and found["false_alarms"] == found["missed"] == 0
    with pytest.raises(PeftlabError, match="at least 2 clean and 2 poisoned"):
        detect_poisoned(features[:3], [False, False, True])
