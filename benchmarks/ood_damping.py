"""Does K-FAC's damping hide what the model does not know? AUROC of telling Fashion-MNIST test images from MNIST
digits by the posterior predictive's standard deviation, with the posterior's damping γ varied — a diagnostic of
the AUROC target of issue #25, not a method: the model's own prior keeps its damping (with the K-FAC prior,
``M = K + γ``, so the solved δ would change with it), only the covariance ``σ²/N · ((1 + λ)K + λγ)⁻¹`` is recomputed.

    lqf-hub train --output-dir /tmp/dj          # the default job
    python benchmarks/ood_damping.py --model /tmp/dj/model --report benchmarks/results/ood_damping.md

The images are those of ``benchmarks/probabilities.py``'s AUROC: ``--images`` of each split in a seeded random
order (seed 0).
"""

import argparse
import dataclasses
from pathlib import Path

import torch
from probabilities import sample_order
from sklearn.metrics import roc_auc_score
from torch.utils.data import Subset

from lqf_hub import LQFModel
from lqf_hub.data import load_image_dataset, with_transform
from lqf_hub.training.objective import trunk_outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", type=int, default=250, help="Per dataset.")
    parser.add_argument("--dampings", type=float, nargs="+", default=[1.0, 0.1, 0.01, 0.001])
    parser.add_argument("--report", type=Path)
    args = parser.parse_args()
    model = LQFModel.from_pretrained(args.model)
    trunks = []
    for name in ("fashion-mnist", "mnist-5k"):
        split = with_transform(load_image_dataset(name, "test"), model.data_config)
        rows = sample_order(len(split))[:args.images].tolist()
        trunks.append(torch.as_tensor(trunk_outputs(model, Subset(split, rows)).values))
    z, n = torch.cat(trunks), len(trunks[0])
    is_digit = [0] * n + [1] * (len(z) - n)
    predicted = model(trunk_output=z).argmax(-1)
    own = model.posterior
    lines = ["# K-FAC's damping and telling digits from clothes", "",
             f"`python benchmarks/ood_damping.py --model {args.model}`: the default job's model ({own.prior} prior, "
             f"λ = {own.ridge:g}, damping {own.damping:g} × each block's mean eigenvalue), {n} Fashion-MNIST test images "
             f"and {len(z) - n} MNIST digits (seed 0). Only the posterior's damping changes; the model's prior, δ and σ² "
             "do not. AUROC (higher: the digits more uncertain) and the median predictive sd of each set.", "",
             "| posterior damping | AUROC, √ trace | AUROC, sd of the predicted class | median √ trace: Fashion / digits |",
             "|---:|---:|---:|---:|"]
    for damping in args.dampings:
        model.posterior = dataclasses.replace(own, damping=damping)
        covariance = model.predictive_covariance(trunk_output=z)
        trace = covariance.diagonal(dim1=-2, dim2=-1).sum(-1).sqrt()
        chosen = covariance.diagonal(dim1=-2, dim2=-1).gather(1, predicted[:, None]).squeeze(1).sqrt()
        lines.append(f"| {damping:g}{' (the model’s)' if damping == own.damping else ''} | "
                     f"{roc_auc_score(is_digit, trace.numpy()):.3f} | {roc_auc_score(is_digit, chosen.numpy()):.3f} | "
                     f"{float(trace[:n].median()):.1f} / {float(trace[n:].median()):.1f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.report:
        args.report.write_text(text)


if __name__ == "__main__":
    main()
