"""Does the posterior's variance make better probabilities than one temperature? Validation images only.

LQF's probabilities are ``softmax(f / T)`` with T fitted on the out-of-fold outputs. The posterior predictive
also gives each output a variance ``v``; the probit approximation of the softmax over it (MacKay 1992; the GLM
predictive's link in laplace-torch) is ``softmax(κ ⊙ f / T)`` with ``κ_c = (1 + π/8 · s · v_c / T²)^-½``, where
``s`` rescales the variance (σ² and the posterior's approximations). With ``s = 0`` it is temperature scaling,
so it can only gain where the variance tells confident-and-right from confident-and-wrong.

Scored on images of the model's training split that it was not trained on (drawn as `lqf-hub train` draws
them, then excluded), never on test images: the images are split in two halves; each link is fitted on one
half by NLL and scored on the other, both ways round.

    python benchmarks/probit_link.py --model out/model --images 800 --out benchmarks/results/probit_link.md
"""

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize

from lqf_hub import LQFModel
from lqf_hub.data import label_array, load_image_dataset, sample_shots, with_transform
from lqf_hub.modeling.calibration import fit_temperature, probability_metrics


def validation_images(model: LQFModel, count: int, seed: int = 123) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``count`` images of the model's training split outside its training draw: pixels, labels, description."""
    source = model.training_summary["train_data"]
    raw = load_image_dataset(source["dataset"], source["split"])
    raw = raw.add_column("_row", list(range(len(raw))))
    trained = set(sample_shots(raw, source["shots"], seed=source["seed"])["_row"])
    rest = np.array([i for i in range(len(raw)) if i not in trained])
    rows = np.sort(np.random.default_rng(seed).choice(rest, count, replace=False))
    data = with_transform(raw.select(rows), model.data_config)
    pixels = torch.stack([data[i]["pixel_values"] for i in range(len(data))])
    labels = torch.as_tensor(label_array(raw.select(rows)))
    return pixels, labels, (f"{count} images of {source['dataset']}'s {source['split']} split outside the model's "
                            f"{len(trained)} training images (seed {seed})")


def probit(outputs: torch.Tensor, variances: torch.Tensor, temperature: float, scale: float) -> torch.Tensor:
    """``softmax(κ ⊙ f / T)``, ``κ = (1 + π/8 · s · v / T²)^-½``: ``[n, C]``, ``[n, C]`` -> ``[n, C]``."""
    return (outputs / temperature / (1 + math.pi / 8 * scale * variances / temperature**2).sqrt()).softmax(-1)


def fit_probit(outputs: torch.Tensor, variances: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(T, s) minimising the NLL of ``probit``, from several starts (Nelder–Mead on log T, log s)."""
    def nll(p: np.ndarray) -> float:
        return float(F.nll_loss(probit(outputs, variances, math.exp(p[0]), math.exp(p[1])).clamp_min(1e-300).log(), labels))

    runs = [minimize(nll, [math.log(t), math.log(s)], method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-9})
            for t in (1.0, 2.0) for s in (1e-3, 0.1, 1.0)]
    best = min(runs, key=lambda r: r.fun)
    return math.exp(best.x[0]), math.exp(best.x[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = LQFModel.from_pretrained(args.model).eval()
    pixels, labels, described = validation_images(model, args.images)
    started = time.perf_counter()
    with torch.no_grad():
        trunk = model.encode_trunk(pixels)
        outputs = model(trunk_output=trunk).double()
    variances = torch.cat([model.predictive_covariance(trunk_output=z).diagonal(dim1=-2, dim2=-1)
                           for z in trunk.split(32)]).double()
    seconds = time.perf_counter() - started
    half = len(labels) // 2
    first, second = slice(0, half), slice(half, len(labels))
    rows = []
    for fit, score in ((first, second), (second, first)):
        temperature = fit_temperature(outputs[fit], labels[fit])
        probit_t, probit_s = fit_probit(outputs[fit], variances[fit], labels[fit])
        plain = probability_metrics((outputs[score] / temperature).softmax(-1), labels[score])
        linked = probability_metrics(probit(outputs[score], variances[score], probit_t, probit_s), labels[score])
        rows.append((temperature, probit_t, probit_s, plain, linked))
    lines = [f"# The posterior's variance in the link to probabilities (`{args.model}`)", "",
             "```bash", f"python benchmarks/probit_link.py --model {args.model} --images {args.images}"
             + (f" --out {args.out}" if args.out else ""), "```", "",
             f"{described}; outputs and posterior predictive variances in {seconds:.0f} s. Each link is fitted by NLL on "
             "one half and scored on the other (NLL · ECE % (15 bins) · Brier).", "",
             "| fitted on | scored on | softmax(f / T): T | NLL · ECE · Brier | probit: T, s | NLL · ECE · Brier |",
             "|---|---|---:|---|---:|---|"]
    for (temperature, probit_t, probit_s, plain, linked), names in zip(rows, (("first", "second"), ("second", "first"))):
        cell = lambda m: f"{m['nll']:.4f} · {100 * m['ece']:.2f} · {m['brier']:.4f}"  # noqa: E731
        lines.append(f"| {names[0]} half | {names[1]} half | {temperature:.3f} | {cell(plain)} | "
                     f"{probit_t:.3f}, {probit_s:.2e} | {cell(linked)} |")
    difference = [r[4]["nll"] - r[3]["nll"] for r in rows]
    lines += ["", f"NLL of the probit link minus temperature scaling's: {difference[0]:+.4f}, {difference[1]:+.4f} "
              f"(mean {sum(difference) / 2:+.4f}; negative favours the variance)."]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
