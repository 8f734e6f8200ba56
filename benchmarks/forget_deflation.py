"""Why a forget takes 17–19 conjugate-gradient iterations, and whether a recycled subspace helps (issue #26's
30-second target).

On a solved model, the objective without two training images (the model's M kept, so that only the data term
changes) is solved from the model's δ by conjugate gradients preconditioned by M, as ``forget`` does: once as is,
then from a Galerkin start on the k largest Ritz vectors of the preconditioned Hessian ``A + λ`` (``A = M^-½ G
M^-½``), found by a Lanczos run from a random vector on the model's own data term — what a session could compute
once and recycle for every forget. Printed: products to a relative gradient of 1e-4, the relative gradient at the
start and after each product, and A's extreme Ritz values.

    lqf-hub train --output-dir out
    python benchmarks/forget_deflation.py --model out/model --remove 20 849 --ritz 10 20 \\
        --out benchmarks/results/forget_deflation.md
"""

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lqf_hub import LQFModel
from lqf_hub.demo import DemoSession
from lqf_hub.files import atomic_write_text
from lqf_hub.solver.solve import DataTerm, KrylovPath, _dual_norm, _inner


def conjugate_gradients(data: DataTerm, metric, ridge: float, x: torch.Tensor, tolerance: float, budget: int = 80):
    """PCG on ``(G + λM) x = b`` from ``x``, preconditioned by M: (products, relative gradients after each)."""
    def hessian(v):
        return data.gauss_newton(v) + ridge * metric.power(v, -1.0)

    rhs_norm = _dual_norm(data.rhs, metric)
    residual = data.rhs - hessian(x)
    preconditioned = metric.power(residual, 1.0)
    direction, rz, used = preconditioned, _inner(residual, preconditioned), 1
    history = [math.sqrt(max(rz, 0.0)) / rhs_norm]
    while history[-1] > tolerance and used < budget:
        product = hessian(direction)
        used += 1
        step = rz / _inner(direction, product)
        x, residual = x + step * direction, residual - step * product
        preconditioned = metric.power(residual, 1.0)
        rz, previous = _inner(residual, preconditioned), rz
        direction = preconditioned + (rz / previous) * direction
        history.append(math.sqrt(max(rz, 0.0)) / rhs_norm)
    return used, history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--remove", type=int, nargs="+", default=[20, 849])
    parser.add_argument("--ritz", type=int, nargs="+", default=[10, 20], help="Ritz vectors recycled.")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = LQFModel.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as cache:
        session = DemoSession(model, cache)
        data, metric, ridge = session.explainer.data, session.explainer.metric, model.config.ridge
        delta = data.flat.flatten(dict(model.linearized_parameters))
        rest = session.trunk.select([i for i in range(data.count) if i not in set(args.remove)])
        without = DataTerm(model, rest.values, rest.labels, rest.digests, batch_size=data.batch_size)
        rows = []
        started = time.perf_counter()
        used, history = conjugate_gradients(without, metric, ridge, delta, 1e-4)
        rows.append(("as `forget` does (from the model's δ)", 0, used, history, time.perf_counter() - started))
        extremes = {}
        for k in args.ritz:
            started = time.perf_counter()
            probe = torch.randn(sum(data.flat.sizes), generator=torch.Generator().manual_seed(0)).to(data.flat.dtype)
            lanczos = KrylovPath(data, metric, [ridge], tolerance=1e-12, max_iterations=k, start=probe)
            ritz, vectors = np.linalg.eigh(lanczos._tridiagonal())
            extremes[k] = (float(ritz.min()), float(ritz.max()))
            basis = torch.from_numpy(vectors.T).to(data.flat.dtype) @ torch.stack(lanczos.basis)  # Ritz vectors [k, P]
            lifted = torch.stack([metric.power(u, 0.5) for u in basis])  # M^-½ u, in δ's coordinates
            residual = without.rhs - without.gauss_newton(delta) - ridge * metric.power(delta, -1.0)
            start = delta + ((lifted @ residual) / torch.from_numpy(ritz + ridge).to(data.flat.dtype)) @ lifted
            used, history = conjugate_gradients(without, metric, ridge, start, 1e-4)
            rows.append((f"Galerkin start on {k} Ritz vectors", lanczos.iterations + 1, used, history,
                         time.perf_counter() - started))
    lines = [f"# A forget's conjugate gradients, and a recycled subspace ({args.model}, without {args.remove})", "",
             "```bash", f"python benchmarks/forget_deflation.py --model {args.model} --remove "
             f"{' '.join(map(str, args.remove))} --ritz {' '.join(map(str, args.ritz))}", "```", "",
             f"{data.count} training images, prior {metric.kind}, λ = {ridge:g}; M kept (only the data term changes).",
             "", "| start | products to build it | products to 1e-4 | relative gradient: start, then after 1, 2 |"
             " seconds |", "|---|---:|---:|---|---:|"]
    for name, built, used, history, seconds in rows:
        lines.append(f"| {name} | {built} | {used} | {', '.join(f'{h:.1e}' for h in history[:3])} | {seconds:.0f} |")
    lines += ["", "Extreme Ritz values of A = M^-½ G M^-½ (Lanczos from a random vector): "
              + "; ".join(f"{k} steps: {low:.2g} … {high:.4g}" for k, (low, high) in extremes.items()) + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
