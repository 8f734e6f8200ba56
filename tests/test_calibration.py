"""Calibrated probabilities: the temperature fitted on the solver's out-of-fold predictions, and the scores of
probabilities (NLL, ECE, Brier) against hand computations."""

import math

import pytest
import torch
from test_train import toy_images, toy_model

from lqf_hub import LQFModel, LQFTrainer, LQFTrainingArguments
from lqf_hub.modeling.calibration import fit_temperature, plot_reliability, probability_metrics


def test_the_fitted_temperature_recovers_the_one_the_labels_were_drawn_with():
    generator = torch.Generator().manual_seed(0)
    logits = 6 * torch.randn(40_000, 5, generator=generator, dtype=torch.float64)
    labels = torch.multinomial((logits / 3.0).softmax(-1), 1, generator=generator)[:, 0]
    assert fit_temperature(logits, labels) == pytest.approx(3.0, rel=0.03)


def test_the_fitted_temperature_is_the_grid_minimum_of_the_nll():
    generator = torch.Generator().manual_seed(1)
    logits = 15 * torch.randn(300, 4, generator=generator)
    labels = torch.multinomial((logits / 7).softmax(-1), 1, generator=generator)[:, 0]
    grid = torch.logspace(-1, 2, 3001, dtype=torch.float64)
    nll = torch.stack([torch.nn.functional.cross_entropy(logits.double() / t, labels) for t in grid])
    assert fit_temperature(logits, labels) == pytest.approx(float(grid[nll.argmin()]), rel=3e-3)


def test_probability_metrics_match_hand_computations():
    probabilities = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1])
    metrics = probability_metrics(probabilities, labels)
    assert metrics["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.7) + math.log(0.8)) / 4)
    assert metrics["brier"] == pytest.approx((2 * 0.01 + 2 * 0.36 + 2 * 0.09 + 2 * 0.04) / 4)
    # confidences 0.9 (right), 0.6 (wrong), 0.7 (right), 0.8 (right): one image per bin of width 1/15
    assert metrics["ece"] == pytest.approx((0.1 + 0.6 + 0.3 + 0.2) / 4)


def test_the_solver_fits_the_temperature_on_its_out_of_fold_predictions_and_the_checkpoint_keeps_it(tmp_path):
    data, test = toy_images(30, seed=3), toy_images(12, seed=4)
    model = toy_model(torch.float32)
    args = LQFTrainingArguments(output_dir=str(tmp_path / "run"), ridge_grid=[1.0, 0.1], progress=False)
    trainer = LQFTrainer(model, data, test, args)
    record = trainer.train()[-1]
    found = trainer.select()  # the same folds and paths again
    assert found.out_of_fold[0].shape == (30, 3) and torch.equal(found.out_of_fold[1].sort().values,
                                                                 torch.tensor([d["label"] for d in data]).sort().values)
    assert record["temperature"] == model.config.temperature == pytest.approx(fit_temperature(*found.out_of_fold))
    assert model.config.temperature != 1.0
    inputs = torch.stack([d["pixel_values"] for d in test])
    expected = (model(inputs) / model.config.temperature).softmax(-1)
    assert torch.allclose(model.predict_proba(inputs), expected)
    labels = torch.tensor([d["label"] for d in test])
    assert record["eval_ece"] == pytest.approx(probability_metrics(expected, labels)["ece"], abs=1e-6)
    assert (tmp_path / "run" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    saved = LQFModel.from_pretrained(tmp_path / "run" / "model")
    assert saved.config.temperature == model.config.temperature
    assert torch.equal(saved.predict_proba(inputs), model.predict_proba(inputs))
    assert saved.training_summary["metrics"]["ece"] == record["eval_ece"]


def test_the_reliability_diagram_is_a_png(tmp_path):
    probabilities = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    plot_reliability(probabilities, torch.tensor([0, 0]), tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
