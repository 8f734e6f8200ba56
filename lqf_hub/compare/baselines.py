"""The baselines LQF is measured against: a linear probe, the probe with laplace-torch's Laplace posterior, and
ordinary (non-linear) fine-tuning."""

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from ..data import collate
from ..modeling.calibration import probability_metrics


def linear_probe(
    train_features: Tensor, train_labels: Tensor, num_classes: int, weight_decay: float | None = None
) -> nn.Linear:
    """Multinomial logistic regression on frozen features, fitted to convergence with L-BFGS.

    ``train_features [N, D]``, ``train_labels [N]``. Features are standardised; ``weight_decay``
    defaults to 1/N (scikit-learn's default C = 1). Returns a classifier on the *raw* features.
    """
    x = train_features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    weight_decay = 1.0 / len(x) if weight_decay is None else weight_decay
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=1000, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, train_labels) + 0.5 * weight_decay * w.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    head = nn.Linear(x.shape[1], num_classes, dtype=train_features.dtype)
    with torch.no_grad():  # fold the standardisation into the layer
        head.weight.copy_(w / std)
        head.bias.copy_(b - (w / std) @ mean)
    return head


def probe_scores(train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], num_classes: int) -> dict[str, float]:
    """Accuracy, and NLL, ECE and Brier score of the softmax, on ``test`` of a ``linear_probe`` fitted on
    ``train``: (features ``[N, D]``, labels ``[N]``)."""
    head = linear_probe(*train, num_classes)
    features, labels = test
    with torch.no_grad():
        logits = head(features)
    return {"accuracy": int((logits.argmax(-1) == labels).sum()) / len(labels),
            **probability_metrics(logits.double().softmax(-1), labels)}


def laplace_predictive(
    head: nn.Linear, train_features: Tensor, train_labels: Tensor, test_features: Tensor, *,
    hessian_structure: str = "kron", prior_precision: float | None = None,
) -> tuple[Tensor, float]:
    """laplace-torch's Laplace posterior over the MAP ``head`` (the last layer on frozen features), its prior
    precision maximising the Laplace marginal likelihood (or fixed at ``prior_precision``), and its GLM predictive
    with the probit approximation: probabilities ``[M, K]`` on ``test_features [M, D]`` and the prior precision.

    The posterior lives where ``linear_probe`` fitted the head, on the features standardised by the training
    images' mean and sd: its isotropic prior is then the probe's L2 penalty (on raw features it would weigh the
    features by their scales). ``train_features [N, D]``, ``train_labels [N]``: what ``head`` was fitted on.
    Needs ``pip install lqf-hub[laplace]``.
    """
    try:
        from laplace import Laplace
    except ImportError as err:
        raise ImportError("The Laplace baseline needs laplace-torch: pip install 'lqf-hub[laplace]'.") from err
    x = train_features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)  # as linear_probe standardises
    standardised = nn.Linear(x.shape[1], head.out_features, dtype=torch.float64)
    with torch.no_grad():  # unfold the standardisation linear_probe folded into the layer
        standardised.weight.copy_(head.weight.double() * std)
        standardised.bias.copy_(head.bias.double() + head.weight.double() @ mean)
    laplace = Laplace(nn.Sequential(standardised), "classification", subset_of_weights="all",
                      hessian_structure=hessian_structure)
    laplace.fit(DataLoader(TensorDataset((x - mean) / std, train_labels), batch_size=256))
    if prior_precision is None:
        laplace.optimize_prior_precision(method="marglik")
    else:
        laplace.prior_precision = prior_precision
    with torch.no_grad():
        probabilities = laplace((test_features.double() - mean) / std, pred_type="glm", link_approx="probit")
    return probabilities, float(laplace.prior_precision)


def fine_tune(
    network: nn.Module,
    num_features: int,
    num_classes: int,
    train_dataset: Dataset,
    *,
    epochs: int = 10,
    batch_size: int = 32,
    learning_rate: float = 0.01,
    weight_decay: float = 1e-4,
    min_steps: int = 0,
    label_smoothing: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Ordinary fine-tuning: every weight of ``network`` (pixels -> pre-logits [B, D]) and a new head,
    cross-entropy (with ``label_smoothing``), SGD with momentum 0.9 and a cosine schedule, BatchNorm in
    training mode; ``epochs``, or more when that is fewer than ``min_steps`` steps (few-shot sets).
    Returns ``nn.Sequential(network, head)`` (a copy; the input network is untouched)."""
    torch.manual_seed(seed)
    model = nn.Sequential(copy.deepcopy(network), nn.Linear(num_features, num_classes)).requires_grad_(True)
    device = next(network.parameters()).device
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
    loader = DataLoader(train_dataset, batch_size=batch_size, shuffle=True, collate_fn=collate, drop_last=len(train_dataset) > batch_size,
                        generator=torch.Generator().manual_seed(seed))
    epochs = max(epochs, math.ceil(min_steps / len(loader)))
    total = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    model.train()
    for epoch in range(epochs):
        for pixels, labels in tqdm(loader, desc=f"fine-tune {epoch + 1}/{epochs}", disable=not progress, leave=False):
            loss = F.cross_entropy(model(pixels.to(device)), labels.to(device), label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Logits ``[N, K]`` of ``model`` (pixels -> logits) on ``dataset`` and its labels ``[N]``."""
    device = next(model.parameters()).device
    logits, labels = [], []
    for pixels, batch_labels in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        logits.append(model(pixels.to(device)).float().cpu())
        labels.append(batch_labels)
    return torch.cat(logits), torch.cat(labels)


def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (pixels -> logits) on ``dataset``."""
    logits, labels = predict(model, dataset, batch_size)
    return float((logits.argmax(-1) == labels).double().mean())
