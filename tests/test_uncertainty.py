"""The posterior predictive: exact for the head prior against brute-force Jacobians, K-FAC's form against K-FAC's
own preconditioner, the solver's σ² and a bit-exact round trip through the checkpoint and the Hub."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_solve import brute_force, problem
from test_train import NUM_CLASSES, toy_images, toy_model

from lqf_hub import LQFModel, LQFTrainer, LQFTrainingArguments
from lqf_hub.errors import CheckpointError
from lqf_hub.modeling.posterior import Posterior, noise_variance
from lqf_hub.solver.kfac import KFAC


def curvature(model, z, outputs: str = "exact") -> KFAC:
    kfac = KFAC(model.linearization_point, model.linearized_parameters, ridge=0.0, damping=0.3, outputs=outputs)
    for batch in z.split(8):
        kfac.accumulate(model.tail_function(batch), batch.shape[0])
    kfac.finalize()
    return kfac


def posterior(model, kfac: KFAC, prior: str, ridge: float, count: int, variance: float = 2.0) -> Posterior:
    return Posterior(kfac.state_dict(), list(model.linearization_point), kfac.damping, prior, ridge, count, variance)


def test_the_head_prior_gives_the_exact_bayesian_linear_regression_predictive(float64):
    model, z, labels = problem(24)
    test_z = model.encode_trunk(torch.stack([d["pixel_values"] for d in toy_images(5, seed=9)]).double())
    j, _ = brute_force(model, z, labels)  # [N·K, P]
    j_test, _ = brute_force(model, test_z, torch.zeros(5, dtype=torch.long))
    head = torch.cat([torch.full((t.numel(),), name.startswith("head."))
                      for name, t in model.linearized_parameters.items()])
    j, j_test = j[:, head], j_test[:, head]
    n, ridge, variance = len(labels), 0.3, 2.0
    covariance = variance / n * torch.linalg.inv(j.T @ j / n + ridge * torch.eye(j.shape[1]))
    expected = (j_test @ covariance @ j_test.T).reshape(5, NUM_CLASSES, 5, NUM_CLASSES).diagonal(dim1=0, dim2=2)
    # K-FAC's output vectors are sampled: the head's posterior must not depend on them
    model.posterior = posterior(model, curvature(model, z, "sampled"), "head", ridge, n, variance)
    found = model.predictive_covariance(trunk_output=test_z, chunk=2)
    assert torch.allclose(found, expected.permute(2, 0, 1), rtol=1e-9, atol=1e-12)
    assert torch.allclose(model.predict_uncertainty(trunk_output=test_z), found.diagonal(dim1=1, dim2=2).sqrt())


@pytest.mark.parametrize("prior", ["kfac", "isotropic"])
def test_the_kfac_predictive_is_jacobian_times_kfac_inverse_times_jacobian(float64, prior):
    """Against K-FAC's own preconditioner, damped as the posterior's ``G + λM``: ``K + λ`` (isotropic) or
    ``(1 + λ)(K + λγ/(1 + λ))`` (K-FAC prior, ``M = K + γ``)."""
    model, z, labels = problem(24)
    test_z = z[:4]
    kfac, ridge, n, variance = curvature(model, z), 0.5, 24, 3.0
    model.posterior = posterior(model, kfac, prior, ridge, n, variance)
    damped = KFAC(model.linearization_point, model.linearized_parameters,
                  ridge=ridge if prior == "isotropic" else 0.0,
                  damping=0.0 if prior == "isotropic" else kfac.damping * ridge / (1 + ridge))
    damped.load_state_dict(kfac.state_dict())
    scale = 1.0 if prior == "isotropic" else 1 / (1 + ridge)
    j, _ = brute_force(model, test_z, torch.zeros(4, dtype=torch.long))  # [4·K, P]
    flat = model.linearized_parameters
    rows = []
    for row in j:
        parts, start = {}, 0
        for name, t in flat.items():
            parts[name] = row[start:start + t.numel()].reshape(t.shape).clone()
            start += t.numel()
        damped.precondition(parts)
        rows.append(torch.cat([p.flatten() for p in parts.values()]))
    expected = scale * variance / n * (j @ torch.stack(rows).T)
    expected = expected.reshape(4, NUM_CLASSES, 4, NUM_CLASSES).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    assert torch.allclose(model.predictive_covariance(trunk_output=test_z, chunk=3), expected, rtol=1e-8, atol=1e-14)


def test_the_solver_leaves_a_posterior_that_survives_save_load_and_the_hub_bit_for_bit(tmp_path, fake_hub):
    data, test = toy_images(30, seed=3), toy_images(6, seed=4)
    model = toy_model(torch.float32)
    args = LQFTrainingArguments(output_dir=str(tmp_path / "run"), ridge_grid=[1.0, 0.1], progress=False)
    trainer = LQFTrainer(model, data, test, args)
    record = trainer.train()[-1]
    found = trainer.select()
    assert model.posterior is not None
    assert (model.posterior.prior, model.posterior.ridge, model.posterior.count) == (record["prior"], record["ridge"], 30)
    assert model.posterior.noise_variance == pytest.approx(noise_variance(*found.out_of_fold, 15.0))
    inputs = torch.stack([d["pixel_values"] for d in test])
    uncertainty = model.predict_uncertainty(inputs)
    assert uncertainty.shape == (6, NUM_CLASSES) and bool((uncertainty > 0).all())
    saved = LQFModel.from_pretrained(tmp_path / "run" / "model")
    assert torch.equal(saved.predict_uncertainty(inputs), uncertainty)
    saved.push_to_hub("alice/uncertain", token=fake_hub.users["alice"])
    pulled = LQFModel.from_pretrained("alice/uncertain", token=fake_hub.users["alice"])
    assert torch.equal(pulled.predict_uncertainty(inputs), uncertainty)
    assert torch.equal(pulled.predict_proba(inputs), model.predict_proba(inputs))


def test_a_posterior_that_does_not_fit_the_model_is_refused_on_load(tmp_path):
    model, z, _ = problem(16)
    model.posterior = posterior(model, curvature(model, z), "kfac", 1.0, 16)
    model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "posterior.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("/basis_a"))
    tensors[key] = tensors[key][..., :-1].contiguous()
    save_file(tensors, path, metadata={"prior": "kfac", "ridge": "1.0", "damping": "0.3", "count": "16",
                                       "noise_variance": "2.0"})
    with pytest.raises(CheckpointError, match="basis_a .* has shape"):
        LQFModel.from_pretrained(tmp_path / "ckpt")
    save_file(load_file(tmp_path / "ckpt" / "posterior.safetensors"), path, metadata={"prior": "kfac"})
    with pytest.raises(CheckpointError, match="metadata is incomplete"):
        LQFModel.from_pretrained(tmp_path / "ckpt")


def test_a_model_without_a_posterior_says_how_to_get_one():
    with pytest.raises(ValueError, match="no posterior"):
        toy_model().predict_uncertainty(torch.zeros(1, 3, 32, 32, dtype=torch.float64))
