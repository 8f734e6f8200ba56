"""What the posterior predictive costs per image: the factored rotation ``Σ_t (Q_Bᵀg_t)(Q_Aᵀa_t)ᵀ`` that
``LQFModel.predictive_covariance`` uses, against rotating each dense per-image Jacobian ``Q_Bᵀ J Q_A`` (from
``vmap(jacrev)``, what it did before), side by side on the same images, with their largest difference.

    lqf-hub train --output-dir out
    python benchmarks/uncertainty_cost.py --model out/model --images 32 --out benchmarks/results/uncertainty_cost.md
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.func import jacrev, vmap

from lqf_hub import LQFModel
from lqf_hub.demo import DemoSession
from lqf_hub.files import atomic_write_text
from lqf_hub.modeling.kfac_state import FACTORS


def dense_covariance(model: LQFModel, z: torch.Tensor) -> torch.Tensor:
    """``σ²/N · J (G + λM)⁻¹ Jᵀ`` from dense per-image Jacobians rotated in the weights' coordinates: ``[B, K, K]``.

    The library's previous code path, kept here as the reference: it reads the posterior's parsed K-FAC state and
    damping rule (``_blocks``, ``_diagonals``, ``_damped``) so that only the rotation differs."""
    posterior, point = model.posterior, model.linearization_point
    layers, diagonal = posterior.layer_names(), posterior.diagonal_names()
    names = [*layers, *[b for b in layers.values() if b], *diagonal]

    def outputs(params, image):
        return model.tail_function(image[None])(params)[0]

    jacobians = vmap(jacrev(outputs), in_dims=(None, 0))({n: point[n] for n in names}, z)
    parts = []
    for name, bias in layers.items():
        block = posterior._blocks[name]
        weight = jacobians[name]
        matrix = weight.reshape(*weight.shape[:2], block.groups, weight.shape[2] // block.groups, -1)
        if bias:
            matrix = torch.cat([matrix, jacobians[bias].reshape(*weight.shape[:2], block.groups, -1, 1)], dim=-1)
        eig_a, basis_a, eig_b, basis_b = (block.factors[k].to(matrix.dtype) for k in FACTORS)
        rotated = matrix @ basis_a
        if posterior.prior == "head":
            eigenvalues, mean = eig_a.unsqueeze(-2), eig_a.mean()
        else:
            rotated = basis_b.transpose(-1, -2) @ rotated
            eigenvalues, mean = eig_b.unsqueeze(-1) * eig_a.unsqueeze(-2), eig_a.mean() * eig_b.mean()
        parts.append((rotated / posterior._damped(eigenvalues, mean).sqrt()).flatten(2))
    for name in diagonal:
        diag = posterior._diagonals[name].to(z.dtype).flatten()
        parts.append(jacobians[name].flatten(2) / posterior._damped(diag, diag.mean()).sqrt())
    whitened = torch.cat(parts, dim=-1)
    return posterior.noise_variance / posterior.count * whitened @ whitened.transpose(-1, -2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", type=int, default=32, help="Training images to time it on, in chunks of 8.")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = LQFModel.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as cache:
        z = DemoSession(model, cache).explainer.data.trunk(slice(0, args.images))
    seconds, results = {}, {}
    for name, run in (("factored", lambda rows: model.predictive_covariance(trunk_output=rows)),
                      ("dense", lambda rows: dense_covariance(model, rows))):
        started = time.perf_counter()
        results[name] = torch.cat([run(rows) for rows in z.split(8)])
        seconds[name] = (time.perf_counter() - started) / len(z)
    difference = float((results["factored"] - results["dense"]).abs().max() / results["dense"].abs().max())
    threads = torch.get_num_threads()
    text = "\n".join([
        f"# The posterior predictive's cost per image ({args.model})", "", "```bash",
        f"python benchmarks/uncertainty_cost.py --model {args.model} --images {args.images}", "```", "",
        f"{len(z)} training images' trunk outputs, chunks of 8, {threads} threads; prior {model.posterior.prior}, "
        f"all {model.num_classes} outputs.", "",
        "| rotation | seconds per image |", "|---|---:|",
        f"| factored: Σ_t (Q_Bᵀg_t)(Q_Aᵀa_t)ᵀ (`predictive_covariance`) | {seconds['factored']:.3f} |",
        f"| dense: Q_Bᵀ J Q_A of each vmap(jacrev) Jacobian (before) | {seconds['dense']:.3f} |", "",
        f"Dense / factored: **{seconds['dense'] / seconds['factored']:.1f}×**; largest difference of the covariances "
        f"{difference:.1e} of the largest entry (float32)."]) + "\n"
    print(text)
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
