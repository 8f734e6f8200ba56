"""How far the default job's probabilities can be trusted: the temperature fitted on out-of-fold outputs against
the raw softmax, a test-fitted temperature (an oracle: the bar, not a method) and the linear probe.

    lqf-hub train --output-dir /tmp/dj          # the default job (its metrics.json: the 2000 test images it reads)
    python benchmarks/calibration.py --model /tmp/dj/model --report benchmarks/results/calibration.md

On all 10 000 Fashion-MNIST test images: accuracy, NLL, ECE (15 bins) and Brier score of ``softmax(f / T)`` for
T = 1, the T the solver fitted on its out-of-fold predictions (``config.temperature``) and the T that minimises
the test NLL; the linear probe (logistic regression on the same features, ``lqf_hub.compare.baselines``) beside
them; and the reliability diagrams as one PNG next to the report.
"""

import argparse
from pathlib import Path

import torch

from lqf_hub import LQFModel
from lqf_hub.analysis.explain import training_images
from lqf_hub.compare.baselines import linear_probe
from lqf_hub.data import load_image_dataset, with_transform
from lqf_hub.modeling.calibration import fit_temperature, plot_reliability, probability_metrics
from lqf_hub.training.objective import trunk_outputs


@torch.no_grad()
def outputs_and_features(model: LQFModel, dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``f_lin [N, K]``, pre-logit features ``[N, D]`` and labels ``[N]`` of ``dataset``, through its trunk outputs."""
    cache = trunk_outputs(model, dataset, progress=True)
    values = torch.as_tensor(cache.values)
    outputs = torch.cat([model(trunk_output=z) for z in values.split(256)])
    features = torch.cat([model.features(trunk_output=z) for z in values.split(256)])
    return outputs, features, cache.labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="The default job's model directory.")
    parser.add_argument("--report", required=True)
    args = parser.parse_args()
    model = LQFModel.from_pretrained(args.model)
    test_images = with_transform(load_image_dataset("fashion-mnist", "test"), model.data_config)
    outputs, features, labels = outputs_and_features(model, test_images)
    _, train = training_images(model)
    _, train_features, train_labels = outputs_and_features(model, train)
    with torch.no_grad():
        probe = linear_probe(train_features, train_labels, model.num_classes)(features).double().softmax(-1)
    fitted, oracle = model.config.temperature, fit_temperature(outputs, labels)
    rows = {"LQF, softmax (T = 1)": (outputs.double()).softmax(-1),
            f"LQF, T = {fitted:.2f} fitted on out-of-fold outputs (the default)": (outputs.double() / fitted).softmax(-1),
            f"LQF, T = {oracle:.2f} fitted on the test images (oracle)": (outputs.double() / oracle).softmax(-1),
            "linear probe (softmax)": probe}
    lines = [f"`{args.model}` ({model.training_summary.get('train_samples')} training images), all "
             f"{len(labels)} Fashion-MNIST test images", "",
             "| probabilities | accuracy | NLL | ECE (15 bins) | Brier |", "|---|---:|---:|---:|---:|"]
    for name, probabilities in rows.items():
        m = probability_metrics(probabilities, labels)
        accuracy = float((probabilities.argmax(-1) == labels).double().mean())
        lines.append(f"| {name} | {100 * accuracy:.2f}% | {m['nll']:.3f} | {100 * m['ece']:.2f}% | {m['brier']:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.report).write_text(text)
    plot_reliability((outputs.double() / fitted).softmax(-1), labels, Path(args.report).with_suffix(".png"),
                     title=f"LQF, T = {fitted:.2f} from out-of-fold outputs")


if __name__ == "__main__":
    main()
