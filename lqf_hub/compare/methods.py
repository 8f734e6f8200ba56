"""The contenders of ``lqf-hub compare``: each a way of training (``kind``) and what it changes from LQF's defaults."""

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Method:
    """One contender: how it is trained (``kind``) and what it changes from LQF's defaults."""

    kind: str  # "solve": LQFTrainer's optimum (λ on its path) | "sgd": LQF's SGD loop (epochs chosen) | "probe" | "laplace" | "ft"
    description: str
    config: dict[str, Any] = field(default_factory=dict)  # LQFConfig fields
    training: dict[str, Any] = field(default_factory=dict)  # LQFTrainingArguments fields


METHODS = {
    "fine-tuning": Method("ft", "every weight, cross-entropy, SGD + cosine (timm recipe); lr, augmentation on validation"),
    "linear-probe": Method("probe", "logistic regression on the frozen pre-logits; weight decay on validation"),
    "laplace": Method("laplace", "the linear probe's MAP with laplace-torch's Kronecker Laplace posterior (on the "
                      "standardised features the probe was fitted on), its prior precision by marginal likelihood; "
                      "probit predictive"),
    "lqf": Method("solve", "LQF defaults: the certified optimum, the prior and λ by the solver's 5-fold cross-validation"),
    # its held-out loss still fell at the default grid's λ = 0.1 with the K-FAC prior (a 50-shot Fashion-MNIST
    # draw), and with the isotropic one the rule took the top of 10 … 0.001 on all 9 cpu-preset draws: the
    # default grid's half-decades, extended two decades lower
    "lqf-head": Method("solve", "LQF on the last layer only", config={"linearize": "head"},
                       training={"ridge_grid": [1000.0, 300.0, 100.0, 30.0, 10.0, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01,
                                                0.003, 0.001]}),
    "lqf-relu": Method("solve", "ablation: plain ReLU (no leaky derivative)", config={"activation": "none"}),
    "lqf-leaky": Method("solve", "ablation: ReLUs swapped for Leaky-ReLU (f0 changes)", config={"activation": "leaky"}),
    "lqf-cross-entropy": Method("sgd", "ablation: cross-entropy instead of MSE (K-FAC SGD loop; epochs on validation)",
                                training={"method": "sgd", "loss": "cross_entropy"}),
    "lqf-no-kfac": Method("solve", "ablation: no K-FAC: the isotropic ridge only (same λ grid, same product budget)",
                          training={"prior": "isotropic"}),
    "lqf-kfac-prior": Method("solve", "ablation: the K-FAC prior only (no choice of prior; the default until 2026-12-04)",
                             training={"prior": "kfac"}),
    "plain-linearization": Method("sgd", "the paper's baseline: ReLU, cross-entropy, plain SGD (epochs on validation)",
                                  config={"activation": "none"},
                                  training={"method": "sgd", "loss": "cross_entropy", "preconditioner": "none"}),
}
