"""How far the default job's probabilities and uncertainty can be trusted.

    lqf-hub train --output-dir /tmp/dj          # the default job
    python benchmarks/probabilities.py --model /tmp/dj/model --report benchmarks/results/probabilities.md

1. Calibration, on all 10 000 Fashion-MNIST test images: accuracy, NLL, ECE (15 bins) and Brier score of
   ``softmax(f / T)`` for T = 1, the T the solver fitted on its out-of-fold predictions (``config.temperature``,
   the default) and the T that minimises the test NLL (an oracle: the bar, not a method); the linear probe
   (logistic regression on the same features) beside them; the reliability diagram as a PNG.
2. The posterior predictive's accuracy: K-FAC's variance of the predicted class's output (what
   ``predict_uncertainty`` returns) against the exact ``σ²/N · J(G + λM)⁻¹Jᵀ`` by certified conjugate gradients
   over the training images, on a few Fashion-MNIST and MNIST test images.
3. Knowing what it does not know: AUROC of telling ``--ood-images`` Fashion-MNIST test images from as many MNIST
   digits (mnist-5k), drawn at random, by LQF's predictive standard deviation (√ of the trace of the output
   covariance), by LQF's calibrated top probability, by the probe's and by fine-tuning's; and the seconds per
   image of the posterior predictive.

Fine-tuning (in 1 and 3) is `lqf-hub compare`'s: the same pretrained backbone and training images, every weight,
its learning rate chosen on a stratified 20% of the training images held out (accuracy, then loss), its
temperature fitted on that part's logits, then refit on all of them.
"""

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch.func import jacrev
from tqdm.auto import tqdm

from lqf_hub import LQFModel
from lqf_hub.adapters import backbone_from_source
from lqf_hub.analysis.explain import training_images
from lqf_hub.compare.baselines import fine_tune, linear_probe, predict
from lqf_hub.compare.runner import CompareSettings, stratified_split
from lqf_hub.data import load_image_dataset, with_transform
from lqf_hub.modeling.calibration import fit_temperature, plot_reliability, probability_metrics
from lqf_hub.solver.solve import inverse_hessian_product
from lqf_hub.training.cache import content_digests
from lqf_hub.training.objective import Objective, trunk_outputs


@torch.no_grad()
def outputs_and_features(model: LQFModel, dataset):
    """Trunk outputs ``[N, ...]``, ``f_lin [N, K]``, pre-logit features ``[N, D]`` and labels ``[N]``."""
    cache = trunk_outputs(model, dataset, progress=True)
    values = torch.as_tensor(cache.values)
    outputs = torch.cat([model(trunk_output=z) for z in values.split(256)])
    features = torch.cat([model.features(trunk_output=z) for z in values.split(256)])
    return values, outputs, features, cache.labels


def covariances(model: LQFModel, trunk: torch.Tensor) -> torch.Tensor:
    """``predictive_covariance`` over ``trunk`` in batches, with a progress bar: ``[N, K, K]``."""
    return torch.cat([model.predictive_covariance(trunk_output=z) for z in tqdm(trunk.split(64), desc="posterior")])


def exact_variance(model: LQFModel, data, metric, z: torch.Tensor, cls: int) -> float:
    """``σ²/N · u (G + λM)⁻¹ uᵀ`` with ``u = ∂f_cls(x)/∂δ``, by certified conjugate gradients to the model's own
    tolerance (1e-4 relative residual; a Galerkin quadratic form: its error is second order in the residual)."""
    jacobians = jacrev(model.tail_function(z[None]))(model.linearization_point)
    u = torch.cat([jacobians[name][0, cls].reshape(-1) for name in model.linearization_point])
    solved = inverse_hessian_product(data, metric, model.config.ridge, u, tolerance=1e-4)
    posterior = model.posterior
    return posterior.noise_variance / posterior.count * float(u.double() @ solved.double())


def fine_tuned(model: LQFModel, train) -> tuple[torch.nn.Module, float, str]:
    """Fine-tuning of ``model``'s pretrained backbone on its training images ``train`` by `lqf-hub compare`'s recipe
    (``CompareSettings``' defaults): the network (pixels -> logits), its held-out temperature, and the choice."""
    settings = CompareSettings()
    backbone = backbone_from_source(model.config.backbone)
    items = [train[i] for i in range(len(train))]
    labels = torch.tensor([item["label"] for item in items])
    fit, held = stratified_split(labels, content_digests(items), settings.validation_fraction, seed=0)

    def train_on(rows: torch.Tensor, learning_rate: float) -> torch.nn.Module:
        return fine_tune(backbone.network, backbone.num_features, model.num_classes, [items[i] for i in rows.tolist()],
                         epochs=settings.ft_epochs, min_steps=settings.ft_min_steps, batch_size=settings.ft_batch_size,
                         learning_rate=learning_rate, label_smoothing=settings.ft_label_smoothing, progress=True)

    held_items = [items[i] for i in held.tolist()]
    scored = {}
    for learning_rate in tqdm(settings.ft_learning_rates, desc="fine-tuning: learning rate on the held-out part"):
        logits, held_labels = predict(train_on(fit, learning_rate), held_items)
        loss = float(F.cross_entropy(logits.double(), held_labels))
        scored[learning_rate] = (float((logits.argmax(-1) == held_labels).double().mean()),
                                 math.inf if math.isnan(loss) else loss, logits, held_labels)
    chosen = min(scored, key=lambda lr: (-scored[lr][0], scored[lr][1]))  # ties: the lower loss, then the smaller lr
    temperature = fit_temperature(*scored[chosen][2:])
    described = (f"learning rate {chosen:g} of {settings.ft_learning_rates} (held-out accuracy "
                 f"{100 * scored[chosen][0]:.1f}%), T = {temperature:.2f}")
    return train_on(torch.arange(len(items)), chosen), temperature, described


def sample_order(count: int, seed: int = 0) -> torch.Tensor:
    """A seeded random order of ``count`` images: the first images of a split may be one class (mnist-5k's are 0s)."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="The default job's model directory.")
    parser.add_argument("--report", required=True)
    parser.add_argument("--exact-images", type=int, default=2, help="Per dataset, for the exact variance.")
    parser.add_argument("--ood-images", type=int, default=250, help="Per dataset, for the AUROC.")
    args = parser.parse_args()
    model = LQFModel.from_pretrained(args.model)
    fashion = with_transform(load_image_dataset("fashion-mnist", "test"), model.data_config)
    digits = with_transform(load_image_dataset("mnist-5k", "test"), model.data_config)
    trunk, outputs, features, labels = outputs_and_features(model, fashion)
    fashion_order, digit_order = (sample_order(len(d)) for d in (fashion, digits))  # mnist-5k test: sorted by label
    _, train = training_images(model)
    train_cache = trunk_outputs(model, train, progress=True)
    _, _, train_features, train_labels = outputs_and_features(model, train_cache)
    with torch.no_grad():
        probe = linear_probe(train_features, train_labels, model.num_classes)
        probe_probabilities = probe(features).double().softmax(-1)
    network, tuned_temperature, tuned_choice = fine_tuned(model, train)
    tuned_logits = predict(network, fashion)[0].double()
    fitted, oracle = model.config.temperature, fit_temperature(outputs, labels)
    calibrated = (outputs.double() / fitted).softmax(-1)
    rows = {"LQF, softmax (T = 1)": outputs.double().softmax(-1),
            f"LQF, T = {fitted:.2f} fitted on out-of-fold outputs (the default)": calibrated,
            f"LQF, T = {oracle:.2f} fitted on the test images (oracle)": (outputs.double() / oracle).softmax(-1),
            "linear probe (softmax)": probe_probabilities,
            "fine-tuning (softmax)": tuned_logits.softmax(-1),
            f"fine-tuning, T = {tuned_temperature:.2f} fitted on its held-out part": (tuned_logits / tuned_temperature).softmax(-1)}
    lines = [f"`{args.model}` ({model.training_summary.get('train_samples')} training images; prior "
             f"{model.posterior.prior}, λ = {model.posterior.ridge:g}, σ² = {model.posterior.noise_variance:.3f}), "
             f"all {len(labels)} Fashion-MNIST test images. Fine-tuning on the same training images: {tuned_choice}.",
             "", "## Calibration", "",
             "| probabilities | accuracy | NLL | ECE (15 bins) | Brier |", "|---|---:|---:|---:|---:|"]
    for name, probabilities in rows.items():
        m = probability_metrics(probabilities, labels)
        accuracy = float((probabilities.argmax(-1) == labels).double().mean())
        lines.append(f"| {name} | {100 * accuracy:.2f}% | {m['nll']:.3f} | {100 * m['ece']:.2f}% | {m['brier']:.3f} |")

    data, metric = Objective.of_solved_model(model, train_cache)
    digit_trunk, digit_outputs, digit_features, _ = outputs_and_features(model, digits)
    lines += ["", "## The posterior's variance: K-FAC against the exact solve", "",
              f"Variance of the predicted class's output; the exact one by conjugate gradients over the {data.count} "
              "training images (relative residual 1e-4).", "", "| image | K-FAC | exact | K-FAC / exact | exact solve |",
              "|---|---:|---:|---:|---:|"]
    ratios = []
    for name, z_all, out_all, order in (("Fashion-MNIST", trunk, outputs, fashion_order),
                                        ("MNIST", digit_trunk, digit_outputs, digit_order)):
        for i in order[:args.exact_images].tolist():
            cls = int(out_all[i].argmax())
            kfac = float(model.predictive_covariance(trunk_output=z_all[i:i + 1])[0, cls, cls])
            started = time.perf_counter()
            exact = exact_variance(model, data, metric, z_all[i], cls)
            ratios.append(kfac / exact)
            lines.append(f"| {name} #{i} | {kfac:.4g} | {exact:.4g} | {kfac / exact:.2f} | "
                         f"{time.perf_counter() - started:.0f} s |")
    log_ratios = torch.tensor(ratios).log()
    lines += ["", f"Geometric mean of K-FAC / exact {math.exp(float(log_ratios.mean())):.2f}, spread (sd of the log "
              f"ratio) {float(log_ratios.std()):.2f}.", ""]

    n = min(args.ood_images, len(digit_trunk), len(trunk))
    fashion_rows, digit_rows = fashion_order[:n], digit_order[:n]
    digit_probabilities = (digit_outputs[digit_rows].double() / fitted).softmax(-1)
    digit_probe = probe(digit_features[digit_rows]).double().softmax(-1)
    digit_tuned = predict(network, [digits[i] for i in digit_rows.tolist()])[0].double().softmax(-1)
    started = time.perf_counter()
    covariance = covariances(model, torch.cat([trunk[fashion_rows], digit_trunk[digit_rows]]))
    seconds_per_image = (time.perf_counter() - started) / (2 * n)
    is_digit = [0] * n + [1] * n
    scores = {"LQF predictive std (√ trace of the output covariance)":
              covariance.diagonal(dim1=-2, dim2=-1).sum(-1).sqrt(),
              "LQF calibrated top probability (1 − max p)":
              1 - torch.cat([calibrated[fashion_rows], digit_probabilities]).max(-1).values,
              "linear probe top probability (1 − max p)":
              1 - torch.cat([probe_probabilities[fashion_rows], digit_probe]).max(-1).values,
              "fine-tuning top probability (1 − max p)":
              1 - torch.cat([tuned_logits[fashion_rows].softmax(-1), digit_tuned]).max(-1).values}
    lines += ["## Fashion-MNIST test images against MNIST digits", "",
              f"{n} test images of each, drawn at random (seed 0); AUROC of the score (higher: more likely a digit). The posterior "
              f"predictive took {seconds_per_image:.2f} s per image (all K outputs).", "",
              "| score | AUROC |", "|---|---:|"]
    lines += [f"| {name} | {roc_auc_score(is_digit, score.detach().numpy()):.3f} |" for name, score in scores.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.report).write_text(text)
    plot_reliability(calibrated, labels, Path(args.report).with_suffix(".png"),
                     title=f"LQF, T = {fitted:.2f} from out-of-fold outputs")


if __name__ == "__main__":
    main()
