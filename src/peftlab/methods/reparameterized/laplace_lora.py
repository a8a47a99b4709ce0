"""Laplace-LoRA (Yang, Robeyns, Wang and Aitchison, 2024, "Bayesian Low-rank Adaptation for Large Language
Models", ICLR 2024).

LoRA is trained as usual (MAP); after training a Laplace approximation is fitted post hoc over the LoRA
parameters ``theta`` (every ``A`` and ``B``), with a Kronecker-factored (KFAC) Fisher and a Gaussian prior
of precision ``delta``::

    p(theta | D) ~= N(theta_MAP, Sigma),   Sigma^-1 = H + delta I,   H_l ~= G_l (x) A_l  per LoRA linear l

Each LoRA linear (``lora_A``: in -> r and ``lora_B``: r -> out) is its own KFAC block, as the paper's
``Laplace(..., hessian_structure='kron')`` over the LoRA modules: ``A_l`` is the covariance of the
linear's inputs ``a`` (mean over the valid tokens of the training set), ``G_l`` the sum over examples,
tokens and Fisher vectors of the gradients ``g`` of the log likelihood at the linear's outputs. With the
exact Fisher (the paper's backend, ASDL's ``FISHER_EXACT``) the Fisher vectors of an example with class
probabilities ``p`` are ``sqrt(p_c) (p - e_c)`` for each class ``c`` (so ``sum_c`` of their outer products
is ``diag(p) - p p^T``; computed with the K - 1 vectors of its eigendecomposition that span it, one
backward pass fewer, same sum); ``fisher="mc"`` draws one label ``y ~ p`` (``p - e_y``), ``fisher="empirical"``
uses the true label. Parameters are vectorised row-major (``vec(W)[i * in + j] = W[i, j]``), where a
token's gradient ``g a^T`` is ``g (x) a``: hence ``G (x) A``. With the eigendecompositions
``A = Q_A diag(s) Q_A^T`` and ``G = Q_G diag(t) Q_G^T`` the block's covariance is
``(Q_G (x) Q_A) diag(1 / (t_i s_j + delta)) (Q_G (x) Q_A)^T``.

The prior precision ``delta`` (one for all blocks: the paper's default ``laplace_prior='homo'``) is chosen
as the paper does with the whole training set: by maximising the Laplace model evidence
``log p(D) ~= log p(D | theta_MAP) - 1/2 [sum_k log(lambda_k + delta) - P log delta + delta |theta_MAP|^2]``
over ``delta`` (``lambda_k`` the eigenvalues of ``H``, ``P`` the number of LoRA parameters); its derivative
in ``delta`` is increasing, so the optimum is the one root, found by bisection on ``log delta``.
``LaplaceLoraConfig(prior_precision=...)`` fixes it instead.

The predictive is the linearised (GLM) one: ``f(x; theta) ~= f(x; theta_MAP) + J (theta - theta_MAP)``
gives logits ``f ~ N(f_MAP, J Sigma J^T)`` with ``J = d f / d theta`` at ``theta_MAP``; class probabilities
are ``E[softmax(f)]``, by Monte Carlo (``link="mc"``, the paper's ``mc_corr``: ``n_samples`` correlated
draws ``f_MAP + L eps``, ``L L^T = J Sigma J^T``, from a generator seeded by ``seed``, so predictions are
repeatable; softmax ignores a common shift of the logits, so the covariance is taken in the K - 1
directions orthogonal to all-ones, one backward pass per direction) or the probit approximation
``softmax(f_MAP / sqrt(1 + pi/8 diag(J Sigma J^T)))`` (``link="probit"``, deterministic).

How it sits in peftlab:
- Training is LoRA's: the adapter is a LoRA adapter of :class:`~.lora.LoraLayer` whose update runs as a
  :class:`~.lora.LoraVariant` (same numbers as LoRA; the variant lets the fit see each linear's input and
  output, which LoRA's fused fast paths never materialise). Its ``lora_A``/``lora_B`` are
  :class:`KfacLinear` modules: LoRA's ``nn.Linear`` plus the fitted factors and prior precision as
  buffers (``kfac_in`` = ``A_l``, ``kfac_out`` = ``G_l``, ``prior_precision``), so ``save_pretrained`` /
  ``from_pretrained`` carry the fit, strictly checked like the weights. Keys: LoRA's ``lora_A.weight``
  beside ``lora_A.kfac_in`` ...; the adapter is saved in peftlab's form only (peft would not read the fit).
- The fit is :func:`fit_laplace` (``fit_laplace(model, loader, adapter_name=...)``), also run by the spec's
  ``TrainingHooks.after_training`` over the training batches, so ``peftlab train``, the study and the HF
  callback fit it automatically after the last step. It runs the model in eval mode (no dropout).
- Prediction: ``PeftModel.forward`` calls :func:`around_forward`; in eval mode, with the fit present, it
  returns the predictive's log probabilities in ``logits`` (``softmax(logits)`` is the predictive, so
  NLL/ECE read it unchanged; with two classes the exact predictive's argmax is MAP's, since ``E[sigmoid(d)]``
  lies on the same side of 1/2 as the mean of ``d``, and Monte Carlo can flip near-ties; with more classes
  it can differ) and, when labels are given, the
  predictive NLL as ``loss``. A model not yet fitted (``prior_precision`` still 0), a model in train mode,
  and a merged adapter predict as plain LoRA (MAP): merging folds ``theta_MAP`` into the base weights as
  LoRA does, after which the predictive is MAP.
- Heads: the fit and the predictive serve outputs whose ``logits`` are (batch, classes) -- sequence
  classification, the paper's GLUE setting. For other heads (a language model's (batch, tokens, vocab))
  ``fit_laplace`` refuses with the shape it found, the ``after_training`` hook warns and leaves the
  adapter unfitted (MAP), and ``around_forward`` returns MAP: the paper's LM experiments restrict the
  predictive to the answer tokens of multiple-choice prompts, which needs the task's answer set.

Placement, initialisation, defaults: LoRA's (query and value, ``r = 8``, ``alpha = 16``; the reference
fine-tunes with peft's LoRA, ``r = 8``, ``alpha = 16``, dropout 0.1 -- set ``dropout=0.1`` for that).
Laplace defaults as the reference code (adamxyang/laplace-lora): KFAC over all LoRA weights, exact Fisher,
one prior precision tuned by marginal likelihood on the training set, GLM predictive with correlated MC.

Deviations, and why:
- The curvature is computed here, not by laplace-torch/ASDL (which the reference uses): those libraries
  find ``nn.Linear`` modules and hook their forward, while peftlab's LoRA computes ``x A^T`` inside fused
  kernels (a joint GEMM for sibling layers, folded weights at inference) that never call those modules;
  and laplace-torch pulls torchvision, backpack, asdfghjkl, curvlinops and torchmetrics into a CPU CI
  install for a few hundred lines of linear algebra that the tests check against a dense computation.
- The input factor is the mean over *valid* tokens (``attention_mask``; KFAC-expand, Eschenhagen et al.
  2023); ASDL also counts padding tokens, whose number depends on how a batch was padded.
- Factors are stored dense (``in x in`` for ``lora_A``): the paper keeps a low-rank approximation of the
  large factor for 7B models; for BERT-size models dense is exact and small (0.6 MB per 384-wide layer).
- ``delta`` is found by bisection on the evidence's derivative instead of 1,000 Adam steps on
  ``log delta`` (same optimum, deterministic). The reference's other option (a validation split,
  ``testing_set='train_val'``) is not offered: pass ``prior_precision`` to fix ``delta`` by hand.
- Monte Carlo uses ``n_samples = 10,000`` draws by default (reference: 100,000): the predictive's
  sampling error is then ~1e-3 in probability; raise it in the config if wanted.
- Embedding targets, DoRA and mixed batches are refused / not served (a variant, as LoRA's others).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import warnings
from collections.abc import Mapping
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import peft_names
from ...core.errors import PeftlabError
from ...core.hooks import TrainingHooks
from ...core.inject import delta_modules
from ...core.registry import MethodSpec, register
from ...core.targets import LINEAR_TYPES, resolve_targets
from . import lora

FISHERS = ("exact", "mc", "empirical")
LINKS = ("mc", "probit")


@peft_names(**lora.LoraConfig.peft_aliases)
@dataclasses.dataclass(frozen=True)
class LaplaceLoraConfig(lora.LoraConfig):
    """LoRA's r, alpha, dropout, rslora and targets (Linear/Conv1D layers), plus the Laplace fit:

    prior_precision: ``delta``; None (default) tunes it by marginal likelihood after the fit.
    fisher: "exact" (default, the paper's), "mc" (one sampled label per example) or "empirical".
    link: "mc" (default, Monte Carlo over the logits' Gaussian) or "probit".
    n_samples: Monte Carlo draws per example (link "mc"); seed: their generator's seed (and the "mc"
    Fisher's label draws)."""

    prior_precision: float | None = None
    fisher: str = "exact"
    link: str = "mc"
    n_samples: int = 10000
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if self.use_dora:
            raise PeftlabError("LaplaceLoraConfig.use_dora=True is not supported: the Laplace fit is over LoRA's A and "
                               "B only; use use_dora=False")
        delta = self.prior_precision
        self._require(delta is None or (delta > 0 and math.isfinite(delta)), "prior_precision",
                      "None (tuned by marginal likelihood) or a positive number such as 1.0")
        self._require(self.fisher in FISHERS, "fisher", f"one of {FISHERS}")
        self._require(self.link in LINKS, "link", f"one of {LINKS}")
        self._require(isinstance(self.n_samples, int) and self.n_samples >= 1, "n_samples",
                      "a positive whole number of Monte Carlo draws such as 10000")
        self._require(isinstance(self.seed, int), "seed", "an integer")

    def variant(self) -> "lora.LoraVariant | None":
        return LAPLACE

    def peft_fields(self) -> dict[str, Any]:
        return {}  # peftlab's form only: peft would drop the fitted factors

    @classmethod
    def from_peft(cls, data: dict[str, Any]) -> "LaplaceLoraConfig":
        raise PeftlabError("Laplace-LoRA adapters are saved in peftlab's form; a peft LoRA checkpoint loads as "
                           "method 'lora' (then train/fit it as laplace_lora)")


class KfacLinear(nn.Linear):
    """A LoRA factor (``lora_A``: in -> r, or ``lora_B``: r -> out) with its Laplace fit as buffers:
    ``kfac_in`` (in x in, the inputs' covariance ``A_l``), ``kfac_out`` (out x out, the summed Fisher of the
    outputs ``G_l``) and ``prior_precision`` (shape (1,); 0 until fitted)."""

    def __init__(self, linear: nn.Linear) -> None:
        weight = linear.weight
        # Built on the meta device, then given LoRA's weight: no random draw, so training consumes the
        # random stream exactly as plain LoRA does (same seed, same run).
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta", dtype=weight.dtype)
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        kw = {"device": weight.device, "dtype": torch.float32}
        self.register_buffer("kfac_in", torch.zeros(linear.in_features, linear.in_features, **kw))
        self.register_buffer("kfac_out", torch.zeros(linear.out_features, linear.out_features, **kw))
        self.register_buffer("prior_precision", torch.zeros(1, **kw))
        self._eig: tuple[Any, ...] | None = None

    def eigen(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(s, Q_A, t, Q_G): eigenvalues (clamped at 0) and vectors of ``kfac_in`` and ``kfac_out``, in
        float64, cached until either buffer changes (a refit or a load writes them in place)."""
        key = (self.kfac_in._version, self.kfac_out._version, self.kfac_in.data_ptr(), self.kfac_out.data_ptr())
        if self._eig is None or self._eig[0] != key:
            s, qa = torch.linalg.eigh(self.kfac_in.double())
            t, qg = torch.linalg.eigh(self.kfac_out.double())
            self._eig = (key, (s.clamp(min=0), qa, t.clamp(min=0), qg))
        return self._eig[1]


class _Recorder:
    """What one forward pass of adapter ``name`` records at each of its LoRA linears: (module, its input,
    its output), the outputs being graph nodes whose gradients the fit and the predictive take."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sites: list[tuple[KfacLinear, torch.Tensor, torch.Tensor]] = []


_LOCAL = threading.local()


def _recorder() -> _Recorder | None:
    return getattr(_LOCAL, "recorder", None)


@contextlib.contextmanager
def _recording(name: str) -> Iterator[_Recorder]:
    previous = _recorder()
    _LOCAL.recorder = rec = _Recorder(name)
    try:
        yield rec
    finally:
        _LOCAL.recorder = previous


class LaplaceLora(lora.LoraVariant):
    """LoRA's update ``scale * B (A x)``; while a recorder for this adapter is on, A and B act through
    leaf copies that require gradients, so the outputs ``A x`` and ``B A x`` are graph nodes even in a
    frozen model, and each linear's input and output are recorded."""

    def add(self, layer: lora.LoraLayer, name: str, config: lora.LoraConfig) -> None:
        if layer.is_embedding:  # attach refuses these first; a direct LoraLayer.add lands here
            raise PeftlabError("Laplace-LoRA adapts Linear/Conv1D layers; a target is an Embedding. Narrow the targets")
        layer.lora_A[name] = KfacLinear(layer.lora_A[name])
        layer.lora_B[name] = KfacLinear(layer.lora_B[name])

    def forward(self, layer: lora.LoraLayer, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        a, b, scale = layer._factors(name)
        h = layer.lora_dropout[name](x) if name in layer.lora_dropout else x
        h = h.to(a.dtype)
        rec = _recorder()
        if rec is not None and rec.name == name:
            low = F.linear(h, a.detach().requires_grad_())
            up = F.linear(low, b.detach().requires_grad_())
            rec.sites.append((layer.lora_A[name], h, low))
            rec.sites.append((layer.lora_B[name], low, up))
        else:
            up = F.linear(F.linear(h, a), b)
        return out + (up * scale).to(out.dtype)

    def delta_weight(self, layer: lora.LoraLayer, name: str) -> torch.Tensor:
        a, b, scale = layer._factors(name)
        delta = (b @ a) * scale  # out x in
        return delta.T if layer.transposed else delta


LAPLACE = LaplaceLora()


# -- the fit --------------------------------------------------------------------------------------------

class UnsupportedHead(PeftlabError):
    """The model's output is not (batch, classes) logits, which the fit and the predictive need."""


def _kfac_modules(model: Any, name: str) -> list[KfacLinear]:
    found: list[KfacLinear] = []
    for _, module in delta_modules(model):
        if isinstance(module, lora.LoraLayer) and name in module.lora_A and isinstance(module.lora_A[name], KfacLinear):
            found += [module.lora_A[name], module.lora_B[name]]
    return found


def is_fitted(model: Any, adapter_name: str) -> bool:
    """Whether adapter ``adapter_name`` holds a Laplace fit (else it predicts as plain LoRA, MAP)."""
    modules = _kfac_modules(model, adapter_name)
    return bool(modules) and all(float(m.prior_precision) > 0 for m in modules)


def _flat(t: torch.Tensor, width: int) -> torch.Tensor:
    """A linear's input or output as (batch, tokens, width); a 2-D one as one token per example."""
    return t.reshape(t.shape[0], -1, width)


def _token_mask(site_input: torch.Tensor, mask: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """The batch's attention mask as (batch, tokens, 1) when it matches this linear's tokens, else None."""
    x = _flat(site_input, width)
    if mask is None or mask.dim() != 2 or tuple(mask.shape) != tuple(x.shape[:2]):
        return None
    return mask.to(x.dtype)[..., None]


def _check_adapter(model: Any, adapter_name: str | None) -> str:
    from ...core.model import PeftModel

    if not isinstance(model, PeftModel):
        raise PeftlabError(f"fit_laplace(model, ...): model must be a PeftModel with a laplace_lora adapter, got "
                           f"{type(model).__name__}")
    name = adapter_name if adapter_name is not None else model.active_adapter
    if name not in model.peft_configs or not isinstance(model.peft_configs[name], LaplaceLoraConfig):
        raise PeftlabError(f"adapter_name={name!r} is not a laplace_lora adapter of this model (adapters: "
                           f"{ {n: type(c).method for n, c in model.peft_configs.items()} }); pass one that is")
    layers = [m for _, m in delta_modules(model) if isinstance(m, lora.LoraLayer) and name in m.lora_A]
    if any(name in m.merged_adapters for m in layers):
        raise PeftlabError(f"adapter {name!r} is merged into the base weights; unmerge_adapter({name!r}) before "
                           "fitting or predicting with its Laplace approximation")
    if name not in model.active_adapters:
        raise PeftlabError(f"adapter {name!r} is not active (active: {model.active_adapters}); "
                           f"set_adapter({name!r}) before fitting it")
    if all(not bool(m.lora_B[name].weight.any()) for m in layers):
        raise PeftlabError(f"adapter {name!r} was never trained: every lora_B is still 0, its initial value, so the "
                           "Laplace fit would be around the base model, not a trained LoRA (MAP). Train it first "
                           "(peftlab train, or a loop ending with model.end_training(loader))")
    return name


def _batch_inputs(batch: Any, device: torch.device) -> tuple[dict[str, Any], torch.Tensor | None]:
    if not isinstance(batch, Mapping):  # a dict, or transformers' BatchEncoding (a UserDict)
        raise PeftlabError(f"the Laplace fit reads batches as dicts of tensors (input_ids, attention_mask, labels), "
                           f"got {type(batch).__name__}; pass a loader of such dicts")
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(batch).items()}
    # labels stay in the call: a seq2seq model builds its decoder inputs from them
    return moved, moved.get("labels")


def _class_logits(out: Any) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UnsupportedHead(f"Laplace-LoRA's fit and predictive need (batch, classes) logits (a sequence "
                              f"classification head); this model returns logits of shape {shape}. Use a "
                              "...ForSequenceClassification model, or plain LoRA for this head")
    return logits


def _fisher_vectors(config: LaplaceLoraConfig, logits: torch.Tensor, labels: torch.Tensor | None,
                    generator: torch.Generator) -> list[torch.Tensor]:
    """Vectors v (batch, classes) at the logits whose outer products sum to the chosen Fisher."""
    p = logits.detach().double().softmax(-1)
    eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
    if config.fisher == "exact":
        # diag(p) - p p^T has rank K - 1 (its null vector is all-ones: softmax ignores a common shift), so
        # K - 1 vectors sqrt(l_i) u_i of its eigendecomposition give the same sum of outer products as the
        # K vectors sqrt(p_c) (p - e_c): one backward pass fewer (half the cost for two classes).
        values, vectors = torch.linalg.eigh(torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
        return [vectors[:, :, i] * values[:, i:i + 1].clamp(min=0).sqrt() for i in range(1, p.shape[1])]
    if config.fisher == "mc":
        y = torch.multinomial(p.cpu(), 1, generator=generator).reshape(-1).to(p.device)
    else:
        if labels is None:
            raise PeftlabError("fisher='empirical' needs the true labels: the loader's batches have no 'labels'")
        y = labels.reshape(-1).long()
    return [p - eye[y]]


def fit_laplace(model: Any, loader: Iterable[Any], adapter_name: str | None = None) -> float:
    """Fit the Laplace approximation of Laplace-LoRA adapter ``adapter_name`` (default: the active one) of
    ``model`` (a PeftModel) over ``loader`` (the training batches: dicts with input_ids, attention_mask and
    labels), store it in the adapter's buffers and return the prior precision ``delta`` used.

    Runs in eval mode (the modules' modes are restored). Raises PeftlabError, changing nothing, for a
    loader that is None or yields no batches, an adapter that was never trained (every ``lora_B`` zero),
    is not Laplace-LoRA, not active or merged, or a head that is not (batch, classes)."""
    name = _check_adapter(model, adapter_name)
    if loader is None:
        raise PeftlabError("fit_laplace(model, loader=None): the Laplace fit needs the training batches; pass the "
                           "training loader")
    config: LaplaceLoraConfig = model.peft_configs[name]
    modules = _kfac_modules(model, name)
    device = modules[0].weight.device
    sums_in = {id(m): torch.zeros_like(m.kfac_in, dtype=torch.float64) for m in modules}
    sums_out = {id(m): torch.zeros_like(m.kfac_out, dtype=torch.float64) for m in modules}
    tokens = {id(m): 0.0 for m in modules}
    generator = torch.Generator().manual_seed(config.seed)
    batches = examples = 0
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for batch in loader:
            inputs, labels = _batch_inputs(batch, device)
            with torch.enable_grad(), _recording(name) as rec:
                logits = _class_logits(model(**inputs))
            if not rec.sites:
                raise PeftlabError(f"adapter {name!r} took no part in the forward pass; is it enabled?")
            batches += 1
            examples += logits.shape[0]
            mask = inputs.get("attention_mask")
            outputs = [site_out for _, _, site_out in rec.sites]
            for v in _fisher_vectors(config, logits, labels, generator):
                grads = torch.autograd.grad(logits, outputs, grad_outputs=v.to(logits.dtype), retain_graph=True,
                                            allow_unused=True)
                for (module, site_in, site_out), g in zip(rec.sites, grads):
                    if g is None:
                        continue
                    g3 = _flat(g, module.out_features).float()
                    keep = _token_mask(site_in, mask, module.in_features)
                    if keep is not None:
                        g3 = g3 * keep.float()
                    g2 = g3.reshape(-1, module.out_features)
                    sums_out[id(module)] += (g2.T @ g2).double()  # one batch in float32, the sum in float64
            for module, site_in, _ in rec.sites:
                a3 = _flat(site_in.detach(), module.in_features).float()
                keep = _token_mask(site_in, mask, module.in_features)
                if keep is not None:
                    a3 = a3 * keep.float()
                    tokens[id(module)] += float(keep.sum())
                else:
                    tokens[id(module)] += a3.shape[0] * a3.shape[1]
                a2 = a3.reshape(-1, module.in_features)
                sums_in[id(module)] += (a2.T @ a2).double()
            del rec, outputs
    finally:
        for module, mode in modes:
            module.training = mode
    if batches == 0:
        raise PeftlabError(f"fit_laplace: the loader yielded no batches (0 examples) for adapter {name!r}; the "
                           "Laplace fit needs the training batches -- pass a non-empty loader")
    eig = []
    for m in modules:
        a_mean = sums_in[id(m)] / max(tokens[id(m)], 1.0)
        s, qa = torch.linalg.eigh(a_mean)
        t, qg = torch.linalg.eigh(sums_out[id(m)])
        eig.append((s.clamp(min=0), t.clamp(min=0), a_mean, sums_out[id(m)]))
    delta = config.prior_precision
    if delta is None:
        theta_sq = sum(float(m.weight.detach().double().pow(2).sum()) for m in modules)
        delta = tune_prior_precision([torch.outer(t, s).reshape(-1) for s, t, _, _ in eig], theta_sq)
    with torch.no_grad():
        for m, (_, _, a_mean, g_sum) in zip(modules, eig):
            m.kfac_in.copy_(a_mean.to(m.kfac_in.dtype))
            m.kfac_out.copy_(g_sum.to(m.kfac_out.dtype))
            m.prior_precision.fill_(delta)
    return float(delta)


def tune_prior_precision(eigenvalues: list[torch.Tensor], theta_sq: float) -> float:
    """The ``delta`` maximising the Laplace evidence: the root of
    ``d/d delta [sum_k log(lambda_k + delta) - P log delta + delta |theta|^2] = sum_k 1/(lambda_k + delta)
    - P / delta + |theta|^2``, which increases with ``delta`` (bisection on ``log delta``)."""
    lam = torch.cat([e.double().reshape(-1) for e in eigenvalues])
    count = lam.numel()

    def slope(log_delta: float) -> float:
        d = math.exp(log_delta)
        return float((1.0 / (lam + d)).sum()) - count / d + theta_sq

    lo, hi = -30.0, 30.0
    if slope(lo) >= 0:
        return math.exp(lo)
    if slope(hi) <= 0:
        return math.exp(hi)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(mid) < 0 else (lo, mid)
    return math.exp(0.5 * (lo + hi))


def _after_training(model: Any, adapter_name: str, data: Iterable[Any] | None) -> None:
    try:
        fit_laplace(model, data, adapter_name)
    except UnsupportedHead as err:
        warnings.warn(f"adapter {adapter_name!r} is not fitted and predicts as plain LoRA (MAP): {err}", stacklevel=2)


# -- the predictive -------------------------------------------------------------------------------------

def contrast_basis(classes: int, device: Any = None) -> torch.Tensor:
    """U (classes x classes-1): an orthonormal basis of the logit directions orthogonal to all-ones. Softmax
    ignores a common shift, so the MC predictive needs the logits' covariance in these directions only."""
    centring = torch.eye(classes, dtype=torch.float64) - 1.0 / classes
    return torch.linalg.eigh(centring)[1][:, 1:].to(device)


def predictive_moments(model: Any, adapter_name: str, forward: Any, args: tuple, kwargs: dict[str, Any],
                       directions: torch.Tensor | None = None) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """(output, f_mu: (batch, classes), f_var) of the linearised predictive of a fitted adapter: ``f_mu`` the
    MAP logits, ``f_var = J Sigma J^T`` (batch, classes, classes) with the KFAC covariance -- or, given
    ``directions`` W (classes x D), ``W^T J Sigma J^T W`` (batch, D, D): one backward pass per column."""
    with torch.enable_grad(), _recording(adapter_name) as rec:
        out = forward(*args, **kwargs)
    logits = _class_logits(out)
    n = logits.shape[0]
    if directions is None or directions.shape[0] != logits.shape[1]:
        directions = torch.eye(logits.shape[1], dtype=torch.float64, device=logits.device)
    directions = directions.to(logits.device)
    k = directions.shape[1]
    f_var = torch.zeros(n, k, k, dtype=torch.float64, device=logits.device)
    outputs = [site_out for _, _, site_out in rec.sites]
    # Rotated Jacobians per class: Jt[c][site] = Q_G^T J Q_A, (batch, out, in).
    rotated: list[list[torch.Tensor | None]] = []
    for c in range(k):
        v = directions[:, c].to(logits.dtype).expand_as(logits)
        grads = torch.autograd.grad(logits, outputs, grad_outputs=v, retain_graph=c < k - 1, allow_unused=True)
        row: list[torch.Tensor | None] = []
        for (module, site_in, _), g in zip(rec.sites, grads):
            if g is None:
                row.append(None)
                continue
            s, qa, t, qg = module.eigen()
            jac = torch.einsum("nto,nti->noi", _flat(g, module.out_features).double(),
                               _flat(site_in.detach(), module.in_features).double())
            row.append(qg.T @ jac @ qa)
        rotated.append(row)
    for i, (module, _, _) in enumerate(rec.sites):
        if rotated[0][i] is None:
            continue
        s, _, t, _ = module.eigen()
        inv = 1.0 / (torch.outer(t, s) + float(module.prior_precision))
        for c in range(k):
            for d in range(c, k):
                value = (rotated[c][i] * rotated[d][i] * inv).sum((1, 2))
                f_var[:, c, d] += value
                if d != c:
                    f_var[:, d, c] += value
    return out, logits.detach(), f_var


def predictive_log_probs(config: LaplaceLoraConfig, f_mu: torch.Tensor, f_var: torch.Tensor,
                         basis: torch.Tensor | None = None) -> torch.Tensor:
    """log E[softmax(f)] for f ~ N(f_mu, f_var), per ``config.link`` (see the module docstring); with
    ``basis`` U, ``f_var`` is the covariance in U's directions (Monte Carlo only)."""
    mu = f_mu.double()
    if config.link == "probit":
        kappa = 1.0 / torch.sqrt(1.0 + math.pi / 8.0 * torch.diagonal(f_var, dim1=1, dim2=2))
        return (kappa * mu).log_softmax(-1)
    # L with L L^T = f_var from the eigendecomposition (f_var is PSD but may be singular).
    e, q = torch.linalg.eigh(f_var)
    root = q * e.clamp(min=0).sqrt()[:, None, :]
    if basis is not None:
        root = basis.to(root) @ root  # (batch, classes, D)
    generator = torch.Generator().manual_seed(config.seed)
    eps = torch.randn(config.n_samples, mu.shape[0], root.shape[2], generator=generator, dtype=torch.float64)
    eps = eps.to(mu.device)
    samples = mu + torch.einsum("nij,snj->sni", root, eps)
    return torch.logsumexp(samples.log_softmax(-1), dim=0) - math.log(config.n_samples)


def around_forward(host: Any, adapter_name: str, forward: Any, args: tuple, kwargs: dict[str, Any],
                   extra: dict[str, Any]) -> Any:
    """In eval mode with a fit present: the output with ``logits`` replaced by the linearised predictive's
    log probabilities (and ``loss`` by its NLL when labels are given); otherwise the MAP output."""
    rec = _recorder()
    # Inside a fit, or inside another Laplace adapter's predictive (two active at once: the outer one's
    # posterior is taken with this one at its MAP), this adapter computes as LoRA.
    if (host.base_model.training or rec is not None or torch.compiler.is_compiling()
            or not is_fitted(host, adapter_name)):
        return forward(*args, **kwargs)
    if kwargs.get("return_dict") is False:
        raise PeftlabError(f"adapter {adapter_name!r} (laplace_lora) is fitted and returns its predictive in the "
                           "output's 'logits'; call the model without return_dict=False")
    if torch.is_inference_mode_enabled():
        raise PeftlabError(f"adapter {adapter_name!r} (laplace_lora) is fitted, and its linearised predictive needs "
                           "Jacobians, which torch.inference_mode() forbids; call the model under torch.no_grad() "
                           "instead, or merge_adapter() to predict as MAP (plain LoRA)")
    config: LaplaceLoraConfig = host.peft_configs[adapter_name]
    # Monte Carlo needs the covariance of the logits' differences only: K - 1 backward passes, not K.
    classes = getattr(getattr(host.base_model, "config", None), "num_labels", 0)
    basis = contrast_basis(classes) if config.link == "mc" and isinstance(classes, int) and classes > 1 else None
    try:
        out, f_mu, f_var = predictive_moments(host, adapter_name, forward, args, kwargs, basis)
    except UnsupportedHead:
        return forward(*args, **kwargs)  # an LM head: MAP (see the module docstring)
    if basis is not None and f_var.shape[1] != basis.shape[1]:
        basis = None  # the head's size differed from config.num_labels: full covariance was taken
    log_probs = predictive_log_probs(config, f_mu, f_var, basis).to(f_mu.dtype)
    out["logits"] = log_probs
    labels = kwargs.get("labels")
    if getattr(out, "loss", None) is not None and isinstance(labels, torch.Tensor) and not labels.is_floating_point():
        out["loss"] = F.nll_loss(log_probs, labels.reshape(-1))
    elif getattr(out, "loss", None) is not None:
        out["loss"] = out.loss.detach()
    return out


def attach(model: nn.Module, name: str, config: LaplaceLoraConfig, host: Any = None) -> None:
    # Linear/Conv1D only, checked before any layer is wrapped: a refused config changes nothing.
    resolve_targets(model, config.targets, allowed_types=LINEAR_TYPES)
    lora.attach(model, name, config, host)


SPEC = register(MethodSpec(
    name="laplace_lora", title="Laplace-LoRA", family="reparameterized", subcategory="LoRA-based improvement", config_cls=LaplaceLoraConfig,
    trains="low-rank update B A (as LoRA); a KFAC Laplace posterior over A and B is fitted after training",
    attach=attach,
    paper="Yang, Robeyns, Wang and Aitchison 2024, Bayesian Low-rank Adaptation for Large Language Models",
    mergeable=True, merge_tolerance=1e-4, default_lr=5e-4,
    hooks=TrainingHooks(after_training=_after_training),
    around_forward=around_forward,
))
