"""Three defences against a backdoored classifier or adapter, each generic over PEFT methods.

- **STRIP** (Gao et al., 2019, "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks";
  the text form of Gao et al., 2021, STRIP-ViTA): an input is perturbed ``copies`` times and the
  mean Shannon entropy of the predictions is taken, H(x) = mean_n -sum_c p_c(x_n) log p_c(x_n).
  A trigger keeps forcing the target class whatever else the sentence says, so triggered inputs
  have low entropy; inputs below a threshold are rejected. The threshold is the ``frr`` quantile of
  clean inputs' entropies (a false-rejection rate fixed in advance, as the paper does).
  Perturbation for text: a share ``replace`` of the input's word positions take words of a random
  held-out clean sentence (the paper superimposes images; STRIP-ViTA replaces words).
- **Fine-mixing** (Zhang et al., 2022, "Fine-mixing: Mitigating Backdoors in Fine-tuned Language
  Models"): each trained entry keeps its trained value with probability ``keep`` and goes back to
  its value before training otherwise, theta = theta_0 + m * (theta_bd - theta_0), m ~ Bernoulli(keep);
  then the model is fine-tuned on a small clean set. For a PEFT adapter "before training" is the
  adapter's initialisation (LoRA's B = 0: no change to the model), the paper's pretrained weights.
  Deviation: the paper also purifies word embeddings (E-PUR); the adapters studied here do not
  train embeddings, so it is left out.
- **An adapter-level detector**: from an adapter's tensors alone (no data, no forward pass), a
  logistic regression on per-tensor statistics (log norm, log largest entry, kurtosis of the
  entries) tells poisoned adapters from clean ones; scored by leave-one-out over a set of both.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ...core.errors import PeftlabError
from ...tasks.glue import Example


# -- STRIP ---------------------------------------------------------------------------------------
def perturb(text: str, donor: str, replace: float, rng: random.Random) -> str:
    """``text`` with a share ``replace`` of its word positions (at least one) filled by random words of ``donor``."""
    words, pool = text.split(), donor.split() or ["."]
    if not words:
        return text
    for i in rng.sample(range(len(words)), max(1, round(replace * len(words)))):
        words[i] = rng.choice(pool)
    return " ".join(words)


def strip_entropies(probabilities: Callable[[list[Example]], np.ndarray], examples: Sequence[Example],
                    donors: Sequence[Example], copies: int = 20, replace: float = 0.5, seed: int = 0) -> np.ndarray:
    """Each example's mean prediction entropy over ``copies`` perturbations (shape ``[len(examples)]``).
    ``probabilities(examples)`` gives class probabilities ``[n, classes]``."""
    if copies < 1 or not 0.0 < replace <= 1.0:
        raise PeftlabError(f"STRIP: copies={copies!r}, replace={replace!r}: expected copies >= 1 and a share of "
                           "words to replace in (0, 1], e.g. copies=20, replace=0.5")
    if not donors:
        raise PeftlabError("STRIP needs held-out clean sentences to perturb inputs with; none were given")
    rng = random.Random(seed)
    perturbed = [Example(perturb(e.text_a, rng.choice(donors).text_a, replace, rng), e.text_b, e.label)
                 for e in examples for _ in range(copies)]
    p = np.clip(probabilities(perturbed), 1e-12, 1.0)
    entropy = -(p * np.log(p)).sum(axis=1)
    return entropy.reshape(len(examples), copies).mean(axis=1)


def strip_threshold(clean_entropies: np.ndarray, frr: float) -> float:
    """The entropy below which inputs are rejected: the ``frr`` quantile of clean inputs' entropies."""
    if not 0.0 < frr < 1.0:
        raise PeftlabError(f"STRIP false-rejection rate {frr!r}: expected a share in (0, 1), e.g. 0.05")
    return float(np.quantile(clean_entropies, frr))


# -- Fine-mixing ---------------------------------------------------------------------------------
def fine_mix(model: torch.nn.Module, initial: dict[str, torch.Tensor], keep: float, seed: int) -> int:
    """Send each trained entry back to its ``initial`` value with probability ``1 - keep``, in place;
    returns how many entries were reset. ``initial``: the trainable tensors by parameter name, copied
    before training (``fit_classifier(keep_initial=True)``)."""
    if not 0.0 <= keep <= 1.0:
        raise PeftlabError(f"fine-mixing keep={keep!r}: expected the share of trained entries kept, in [0, 1]")
    params = dict(model.named_parameters())
    missing = sorted(set(initial) - set(params))
    if missing:
        raise PeftlabError(f"fine-mixing: the model has no parameters {missing[:3]} of the snapshot; take the "
                           "snapshot from this model before training")
    generator = torch.Generator().manual_seed(seed)
    reset = 0
    with torch.no_grad():
        for name, before in initial.items():
            param = params[name]
            back = (torch.rand(param.shape, generator=generator) >= keep).to(param.device)
            param.copy_(torch.where(back, before.to(param.device, param.dtype), param))
            reset += int(back.sum())
    return reset


# -- Adapter-level detection ---------------------------------------------------------------------
def adapter_features(state: dict[str, torch.Tensor]) -> np.ndarray:
    """Per tensor of an adapter (in key order): log Frobenius norm, log largest |entry|, kurtosis."""
    out = []
    for key in sorted(state):
        t = state[key].detach().double().flatten()
        centred = t - t.mean()
        var = float((centred ** 2).mean())
        kurtosis = float((centred ** 4).mean()) / var ** 2 - 3.0 if var > 0 else 0.0
        out += [float(torch.log(t.norm() + 1e-12)), float(torch.log(t.abs().max() + 1e-12)), kurtosis]
    return np.asarray(out)


def detect_poisoned(features: Sequence[np.ndarray], poisoned: Sequence[bool]) -> dict[str, Any]:
    """Leave-one-out accuracy of a logistic regression telling poisoned adapters from clean ones by
    their :func:`adapter_features`; each adapter is scored by a detector that never saw it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = np.stack(features), np.asarray(poisoned, dtype=int)
    if len({len(f) for f in features}) != 1:
        raise PeftlabError("adapter detection needs adapters of one method and shape; their tensors differ")
    if min(y.sum(), len(y) - y.sum()) < 2:
        raise PeftlabError(f"adapter detection needs at least 2 clean and 2 poisoned adapters; got "
                           f"{len(y) - y.sum()} clean and {y.sum()} poisoned")
    guesses = []
    for i in range(len(y)):
        rest = np.arange(len(y)) != i
        detector = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
        detector.fit(x[rest], y[rest])
        guesses.append(int(detector.predict(x[i:i + 1])[0]))
    guesses = np.asarray(guesses)
    return {"accuracy": float((guesses == y).mean()), "guesses": guesses.tolist(), "truth": y.tolist(),
            "false_alarms": int(((guesses == 1) & (y == 0)).sum()), "missed": int(((guesses == 0) & (y == 1)).sum())}
