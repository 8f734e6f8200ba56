"""The baselines LQF is compared with: the linear probe against scikit-learn, fine-tuning on a toy task."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from lqf_hub.compare.baselines import accuracy, fine_tune, linear_probe, probe_scores


def test_linear_probe_matches_scikit_learn_logistic_regression():
    """Same objective as LogisticRegression(C=1) on standardised features: same probabilities."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=generator) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0]) + 2.0
    y = torch.randint(0, 3, (60,), generator=generator)
    head = linear_probe(x, y, 3)
    standardised = ((x - x.mean(0)) / x.std(0)).double().numpy()
    reference = LogisticRegression(C=1.0, tol=1e-12, max_iter=10_000).fit(standardised, y.numpy())
    with torch.no_grad():
        ours = head(x).softmax(-1).double().numpy()
    np.testing.assert_allclose(ours, reference.predict_proba(standardised), atol=1e-6)


def test_probe_scores_count_correct_test_predictions_and_score_its_softmax():
    x = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]])
    y = torch.tensor([0, 0, 1, 1])
    test = torch.tensor([[-3.0], [3.0], [0.5]]), torch.tensor([0, 1, 0])
    scores = probe_scores((x, y), test, 2)
    assert scores["accuracy"] == 2 / 3
    with torch.no_grad():
        probabilities = linear_probe(x, y, 2)(test[0]).double().softmax(-1)
    assert scores["nll"] == pytest.approx(float(-probabilities[[0, 1, 2], test[1]].log().mean()))


def test_fine_tune_fits_a_separable_task_and_leaves_the_network_untouched():
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(40) % 2
    pixels = torch.randn(40, 3, 4, 4, generator=generator) * 0.3 + (labels * 2.0 - 1.0).reshape(-1, 1, 1, 1)
    data = [{"pixel_values": p, "label": int(t)} for p, t in zip(pixels, labels)]
    network = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.ReLU())
    before = {k: v.clone() for k, v in network.state_dict().items()}
    model = fine_tune(network, 8, 2, data, epochs=20, batch_size=8, learning_rate=0.05, progress=False)
    assert accuracy(model, data) == 1.0
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    assert not torch.equal(model[0][1].weight, network[1].weight)  # the copy's body was trained too
