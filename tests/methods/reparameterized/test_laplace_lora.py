"""Laplace-LoRA: LoRA trained as usual, then a post-hoc KFAC Laplace approximation over A and B (stored in
the adapter's buffers) and the linearised predictive in eval mode. The mechanism tests rebuild the
Kronecker-factored covariance and the Jacobian densely, by brute force, on a tiny BERT."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from peftlab import CheckpointError, LoraConfig, PeftlabError, PeftModel, get_peft_model
from peftlab.methods.reparameterized.lora import LoraLayer
from peftlab.methods.reparameterized.laplace_lora import (
    KfacLinear, LaplaceLoraConfig, contrast_basis, fit_laplace, is_fitted, predictive_moments, tune_prior_precision)

from ...conftest import labelled_batches, model_inputs, tiny_bert, tiny_gpt2


def _perturb(pm, name="default", seed=0, size=0.3):
    """Stand in for training: every A and B (and the head copy) moves away from its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.adapter_parameters(name):
            p.add_(torch.randn(p.shape, generator=g) * size)


def _fit_batches():
    batches = labelled_batches(3, seed=3)
    batches[1]["attention_mask"][0, -3:] = 0  # padding: only valid tokens count in the input factors
    batches[1]["attention_mask"][2, -1:] = 0
    return batches


def _model(**options):
    pm = get_peft_model(tiny_bert(), LaplaceLoraConfig(r=2, modules_to_save=("classifier",), **options))
    _perturb(pm)
    return pm


def _sites(pm, name="default"):
    return [m for _, m in pm.base_model.named_modules() if isinstance(m, LoraLayer) and name in m.lora_A]


# -- brute force: factors, dense posterior, Jacobians ------------------------------------------------------

def _brute_factors(pm, batches):
    """Per LoRA layer: (A_in, G_A, B_in, G_B) with the inputs' covariance averaged over valid tokens and the
    exact Fisher's output gradients summed, from the wrapper layers' own inputs and outputs (no recorder)."""
    sites = _sites(pm)
    acc = {id(m): [0.0, 0.0, 0.0, 0.0, 0.0] for m in sites}  # a_in, g_a, b_in, g_b, tokens
    pm.eval()
    for batch in batches:
        seen = {}
        hooks = [m.register_forward_hook(lambda mod, inp, out: seen.__setitem__(id(mod), (inp[0], out))) for m in sites]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = pm.base_model(**inputs).logits
        for h in hooks:
            h.remove()
        mask = batch["attention_mask"].double()[..., None]
        p = logits.detach().double().softmax(-1)
        for m in sites:
            x, _ = seen[id(m)]
            a = m.lora_A["default"].weight.detach().double()
            x = x.detach().double() * mask
            low = x @ a.T
            acc[id(m)][0] = acc[id(m)][0] + torch.einsum("nti,ntj->ij", x, x)
            acc[id(m)][2] = acc[id(m)][2] + torch.einsum("nti,ntj->ij", low, low)
            acc[id(m)][4] += float(mask.sum())
        for c in range(p.shape[1]):
            v = (p - torch.eye(p.shape[1], dtype=p.dtype)[c]) * p[:, c:c + 1].sqrt()
            grads = torch.autograd.grad(logits, [seen[id(m)][1] for m in sites], grad_outputs=v.float(),
                                        retain_graph=True)
            for m, gout in zip(sites, grads):
                scale = m.settings["default"]
                g_b = scale * gout.double() * mask
                g_a = g_b @ m.lora_B["default"].weight.detach().double()
                acc[id(m)][1] = acc[id(m)][1] + torch.einsum("nto,ntp->op", g_a, g_a)
                acc[id(m)][3] = acc[id(m)][3] + torch.einsum("nto,ntp->op", g_b, g_b)
    return [(acc[id(m)][0] / acc[id(m)][4], acc[id(m)][1], acc[id(m)][2] / acc[id(m)][4], acc[id(m)][3])
            for m in sites]


def _params(pm):
    """The LoRA weights in the posterior's order: per layer, A then B (row-major)."""
    return [w for m in _sites(pm) for w in (m.lora_A["default"].weight, m.lora_B["default"].weight)]


def _dense_precision(factors):
    blocks = []
    for a_in, g_a, b_in, g_b in factors:
        blocks += [torch.kron(g_a, a_in), torch.kron(g_b, b_in)]
    return torch.block_diag(*blocks)


def _dense_jacobian(pm, inputs):
    """d logits / d theta for each example and class, (batch, classes, P), one backward per entry."""
    logits = pm.base_model(**inputs).logits
    params = _params(pm)
    rows = []
    for n in range(logits.shape[0]):
        per_class = []
        for k in range(logits.shape[1]):
            grads = torch.autograd.grad(logits[n, k], params, retain_graph=True)
            per_class.append(torch.cat([g.double().reshape(-1) for g in grads]))
        rows.append(torch.stack(per_class))
    return logits.detach().double(), torch.stack(rows)


def _dense_moments(pm, inputs, batches, delta):
    precision = _dense_precision(_brute_factors(pm, batches))
    cov = torch.linalg.inv(precision + delta * torch.eye(precision.shape[0], dtype=torch.float64))
    f_mu, jac = _dense_jacobian(pm, inputs)
    return f_mu, jac @ cov @ jac.transpose(1, 2)


# -- 1. the mechanism ----------------------------------------------------------------------------------------

def test_fitted_factors_are_the_kfac_of_the_exact_fisher_over_valid_tokens():
    pm = _model()
    batches = _fit_batches()
    fit_laplace(pm, batches)
    for m, (a_in, g_a, b_in, g_b) in zip(_sites(pm), _brute_factors(pm, batches)):
        kfac_a, kfac_b = m.lora_A["default"], m.lora_B["default"]
        assert isinstance(kfac_a, KfacLinear) and isinstance(kfac_b, KfacLinear)
        torch.testing.assert_close(kfac_a.kfac_in.double(), a_in, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(kfac_a.kfac_out.double(), g_a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(kfac_b.kfac_in.double(), b_in, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(kfac_b.kfac_out.double(), g_b, rtol=1e-4, atol=1e-6)


def test_predictive_is_the_linearised_laplace_of_the_dense_kronecker_covariance_and_differs_from_lora():
    pm = _model(link="probit")
    batches = _fit_batches()
    delta = fit_laplace(pm, batches)
    inputs = model_inputs("bert", batch=3)
    f_mu, f_var = _dense_moments(pm, inputs, batches, delta)
    pm.eval()
    _, mu, var = predictive_moments(pm, "default", pm.base_model, (), inputs)
    torch.testing.assert_close(mu.double(), f_mu, rtol=0, atol=1e-6)
    torch.testing.assert_close(var, f_var, rtol=1e-4, atol=1e-7)
    assert float(torch.diagonal(f_var, dim1=1, dim2=2).detach().min()) > 1e-3, "the posterior must matter here"
    # In the contrast directions U (orthogonal to all-ones; what the MC link uses): U^T f_var U.
    basis = contrast_basis(2)
    _, _, var_c = predictive_moments(pm, "default", pm.base_model, (), inputs, basis)
    torch.testing.assert_close(var_c, basis.T @ f_var @ basis, rtol=1e-4, atol=1e-7)
    # The model's eval output: log softmax(f_mu / sqrt(1 + pi/8 diag f_var)), the probit predictive.
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * torch.diagonal(f_var, dim1=1, dim2=2))
    expected = (kappa * f_mu).log_softmax(-1)
    with torch.no_grad():
        got = pm(**inputs).logits.double()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # Plain LoRA with the same weights predicts softmax(f_mu): not this.
    torch.manual_seed(0)
    plain = get_peft_model(tiny_bert(), LoraConfig(r=2, modules_to_save=("classifier",)))
    plain.load_adapter_state_dict("default", {k: v for k, v in pm.adapter_state_dict().items() if "kfac" not in k
                                              and "prior_precision" not in k})
    plain.eval()
    with torch.no_grad():
        lora_out = plain(**inputs).logits.double().log_softmax(-1)
    torch.testing.assert_close(lora_out, f_mu.log_softmax(-1), rtol=0, atol=1e-5)
    assert (lora_out - expected).abs().max() > 1e-3


def test_monte_carlo_link_matches_the_gaussian_integral_of_the_sigmoid():
    pm = _model(n_samples=200000, seed=1)
    batches = _fit_batches()
    delta = fit_laplace(pm, batches)
    inputs = model_inputs("bert", batch=3)
    f_mu, f_var = _dense_moments(pm, inputs, batches, delta)
    # Two classes: p(class 1) = E[sigmoid(d)], d ~ N(mu_1 - mu_0, var_00 + var_11 - 2 var_01), by quadrature.
    mean = f_mu[:, 1] - f_mu[:, 0]
    sd = (f_var[:, 0, 0] + f_var[:, 1, 1] - 2 * f_var[:, 0, 1]).clamp(min=0).sqrt()
    nodes, weights = (torch.from_numpy(t) for t in np.polynomial.hermite_e.hermegauss(80))
    p1 = (torch.sigmoid(mean[:, None] + sd[:, None] * nodes) * weights).sum(1) / weights.sum()
    pm.eval()
    with torch.no_grad():
        got = pm(**inputs).logits.double().exp()
    torch.testing.assert_close(got.sum(-1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(got[:, 1], p1, rtol=0, atol=3e-3)
    with torch.no_grad():
        again = pm(**inputs).logits
    torch.testing.assert_close(again.double().exp(), got, rtol=0, atol=0)  # seeded: repeatable


def test_prior_precision_maximises_the_dense_laplace_evidence():
    pm = _model()
    batches = _fit_batches()
    delta = fit_laplace(pm, batches)
    precision = _dense_precision(_brute_factors(pm, batches))
    theta_sq = float(sum(p.detach().double().pow(2).sum() for p in _params(pm)))
    size = precision.shape[0]

    def evidence(d):  # the terms of the log evidence that depend on delta
        return -0.5 * (torch.logdet(precision + d * torch.eye(size, dtype=torch.float64)) - size * math.log(d)
                       + d * theta_sq)

    assert all(float(m.lora_A["default"].prior_precision) == pytest.approx(delta) for m in _sites(pm))
    best = evidence(delta)
    for factor in (0.8, 0.95, 1.05, 1.25):
        assert best > evidence(delta * factor)
    # the fixed-delta option is kept as given
    fixed = _model(prior_precision=2.5)
    assert fit_laplace(fixed, batches) == 2.5
    # four eigenvalues 1, |theta|^2 = 1: 4/(1 + d) - 4/d + 1 = 0, i.e. d^2 + d - 4 = 0
    assert tune_prior_precision([torch.ones(4)], 1.0) == pytest.approx((math.sqrt(17) - 1) / 2)


# -- 2. MAP where there is no fit, training, merging ---------------------------------------------------------

def test_unfitted_adapter_trains_and_predicts_exactly_as_plain_lora():
    batches = labelled_batches(2)
    runs = []
    for config in (LoraConfig(r=4, modules_to_save=("classifier",)),
                   LaplaceLoraConfig(r=4, modules_to_save=("classifier",))):
        torch.manual_seed(0)
        pm = get_peft_model(tiny_bert(), config)
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
        pm.train()
        losses = []
        for batch in batches:
            loss = pm(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        pm.eval()
        with torch.no_grad():
            runs.append((losses, pm(**model_inputs("bert")).logits))
    assert runs[0][0] == pytest.approx(runs[1][0], abs=1e-6)
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=0, atol=1e-5)


def test_end_training_fits_and_train_mode_and_merge_give_map():
    pm = _model()
    for module in pm.modules():  # train mode without dropout: comparable with eval
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    pm.train()
    from transformers import BatchEncoding  # what transformers' collators yield (a UserDict, not a dict)

    pm.end_training([BatchEncoding(b) for b in _fit_batches()])
    assert is_fitted(pm, "default") and pm.base_model.training, "fitted, and train mode restored"
    inputs = model_inputs("bert")
    with torch.no_grad():
        map_logits = pm(**inputs).logits  # train mode: MAP
        pm.eval()
        laplace = pm(**inputs).logits
        pm.merge_adapter()
        merged = pm(**inputs).logits
        pm.unmerge_adapter()
    assert (laplace - map_logits.log_softmax(-1)).abs().max() > 1e-4
    torch.testing.assert_close(merged, map_logits, rtol=0, atol=1e-4)  # after merge: MAP, as declared
    with pytest.raises(PeftlabError, match="torch.no_grad"), torch.inference_mode():
        pm(**inputs)
    with pytest.raises(PeftlabError, match="return_dict=False"):
        pm(**inputs, return_dict=False)
    # labels given: the loss is the predictive's NLL
    batch = labelled_batches(1)[0]
    with torch.no_grad():
        out = pm(**batch)
    torch.testing.assert_close(out.loss, torch.nn.functional.nll_loss(out.logits, batch["labels"]))


# -- 3. save / load --------------------------------------------------------------------------------------------

def test_save_load_carries_the_fit_strictly(tmp_path):
    pm = _model()
    fit_laplace(pm, _fit_batches())
    pm.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["method"] == "laplace_lora" and "peft_type" not in written
    state = load_file(tmp_path / "adapter_model.safetensors")
    expected = pm.adapter_state_dict()
    assert set(state) == set(expected)
    assert {tuple(v.shape) for k, v in state.items() if k.endswith("query.lora_A.kfac_in")} == {(32, 32)}
    assert {tuple(v.shape) for k, v in state.items() if k.endswith("query.lora_B.kfac_out")} == {(32, 32)}
    assert {tuple(v.shape) for k, v in state.items() if k.endswith("query.lora_A.kfac_out")} == {(2, 2)}
    assert all(tuple(state[k].shape) == tuple(v.shape) for k, v in expected.items())
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert isinstance(loaded.peft_configs["default"], LaplaceLoraConfig) and is_fitted(loaded, "default")
    pm.eval()
    inputs = model_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, pm(**inputs).logits, rtol=0, atol=1e-6)
    # a damaged checkpoint: a factor missing, then one of the wrong shape -> clear error, model unchanged
    for damage in ("drop", "reshape"):
        bad = dict(state)
        key = next(k for k in bad if k.endswith("value.lora_A.kfac_in"))
        if damage == "drop":
            del bad[key]
        else:
            bad[key] = torch.zeros(3, 3)
        save_file(bad, tmp_path / "adapter_model.safetensors")
        base = tiny_bert()
        before = {n: type(m) for n, m in base.named_modules()}
        with pytest.raises(CheckpointError, match="kfac_in"):
            PeftModel.from_pretrained(base, tmp_path)
        assert {n: type(m) for n, m in base.named_modules()} == before
        with pytest.raises(CheckpointError, match="kfac_in"):
            loaded.load_adapter(tmp_path, "other")
        assert set(loaded.peft_configs) == {"default"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, pm(**inputs).logits, rtol=0, atol=1e-6)


# -- 4. bad input ---------------------------------------------------------------------------------------------

def test_fit_refuses_an_untrained_adapter_an_empty_or_missing_loader_and_other_adapters():
    pm = get_peft_model(tiny_bert(), LaplaceLoraConfig(r=2))
    with pytest.raises(PeftlabError, match="never trained.*lora_B is still 0"):
        fit_laplace(pm, _fit_batches())
    _perturb(pm)
    with pytest.raises(PeftlabError, match="no batches"):
        fit_laplace(pm, [])
    with pytest.raises(PeftlabError, match="loader=None"):
        fit_laplace(pm, None)
    with pytest.raises(PeftlabError, match="adapter_name='nope'"):
        fit_laplace(pm, _fit_batches(), adapter_name="nope")
    pm.add_adapter("plain", LoraConfig(r=2))
    with pytest.raises(PeftlabError, match="adapter_name='plain' is not a laplace_lora adapter"):
        fit_laplace(pm, _fit_batches(), adapter_name="plain")
    pm.merge_adapter("default")
    with pytest.raises(PeftlabError, match="unmerge_adapter"):
        fit_laplace(pm, _fit_batches())
    pm.unmerge_adapter()
    assert not is_fitted(pm, "default"), "refused fits change nothing"
    with pytest.raises(PeftlabError, match="empirical.*labels"):
        fit_laplace(_trained(LaplaceLoraConfig(r=2, fisher="empirical")), [{"input_ids": torch.ones(2, 4).long()}])


def _trained(config):
    pm = get_peft_model(tiny_bert(), config)
    _perturb(pm)
    return pm


def test_language_model_heads_are_refused_by_the_fit_and_warned_about_by_the_hook():
    pm = get_peft_model(tiny_gpt2(), LaplaceLoraConfig(r=2))
    _perturb(pm)
    batch = {"input_ids": torch.randint(0, 100, (2, 6)), "labels": torch.randint(0, 100, (2, 6))}
    with pytest.raises(PeftlabError, match=r"\(batch, classes\) logits.*shape \(2, 6, 100\)"):
        fit_laplace(pm, [batch])
    with pytest.warns(UserWarning, match="predicts as plain LoRA"):
        pm.end_training([batch])
    assert not is_fitted(pm, "default")


@pytest.mark.parametrize("field,value,needle", [
    ("fisher", "diag", "fisher"), ("link", "bridge", "link"), ("n_samples", 0, "n_samples"),
    ("prior_precision", -1.0, "prior_precision"), ("use_dora", True, "use_dora")])
def test_config_errors_name_the_field(field, value, needle):
    with pytest.raises(PeftlabError, match=needle):
        LaplaceLoraConfig(**{field: value})


def test_embedding_targets_are_refused_before_anything_changes():
    model = tiny_bert()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(PeftlabError, match="Narrow the targets|Embedding"):
        get_peft_model(model, LaplaceLoraConfig(targets=("query", "word_embeddings")))
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_two_fitted_adapters_active_at_once_predict_with_the_outer_posterior():
    pm = _model(link="probit")
    pm.add_adapter("second", LaplaceLoraConfig(r=2, link="probit"))
    pm.set_adapter("second")
    _perturb(pm, "second", seed=1)
    fit_laplace(pm, _fit_batches(), "second")
    pm.set_adapter("default")
    fit_laplace(pm, _fit_batches(), "default")
    pm.set_adapter(["default", "second"])
    pm.eval()
    inputs = model_inputs("bert")
    with torch.no_grad():
        out = pm(**inputs).logits
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2), rtol=0, atol=1e-5)
    _, f_mu, f_var = predictive_moments(pm, "default", pm.base_model, (), inputs)  # "second" at its MAP inside
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * torch.diagonal(f_var, dim1=1, dim2=2))
    torch.testing.assert_close(out.double(), (kappa * f_mu.double()).log_softmax(-1), rtol=0, atol=1e-5)
