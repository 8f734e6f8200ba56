"""Why a forget takes 17–19 conjugate-gradient iterations, and whether a recycled subspace or a better
preconditioner helps (issue #26's 30-second target, and every certified solve of issues #22 and #24).

On a solved model, the objective without the ``--remove`` training images (the model's M kept, so that only the
data term changes) is solved from the model's δ to a relative gradient of 1e-4 by ``solve`` (a product for the
fresh gradient at the start, CG, a product for the certificate), as ``forget`` does:

1. preconditioned by M, as is;
2. from a Galerkin start on the k largest Ritz vectors of the preconditioned Hessian ``A + λ`` (``A = M^-½ G
   M^-½``), found by a Lanczos run from a random vector on the model's own data term — what a session could
   compute once and recycle for every forget;
3. preconditioned by M and the converged ones of those Ritz pairs (a spectral preconditioner, Carpentieri, Duff
   & Giraud 2003): in ``u = M^½ δ`` each converged Ritz direction's eigenvalue ``θ + λ`` is mapped to the first
   one left, ``C⁻¹ = I + Σ_i (μ / (θ_i + λ) − 1) y_i y_iᵀ``, the bulk untouched — a deflation that needs no
   products beyond the Lanczos run (the certificate is the same: only the speed depends on the pairs);
4. preconditioned by eigenvalue-corrected K-FAC (EKFAC, George et al. 2018): in each Kronecker block's eigenbasis
   ``Q = Q_A ⊗ Q_B``, the exact diagonal of G, ``S = mean_i Σ_c (Q_Bᵀ ∂f_c(x_i)/∂W Q_A)²``, in place of K-FAC's
   ``e_A e_B``: ``P = Q (S + λ e_M) Qᵀ`` with ``e_M`` M's eigenvalues (the diagonal tensors keep their exact
   diagonal). ``S`` from the C outputs exactly (C backward passes) or from one Gaussian output vector per image.

The refit from δ = 0 at the model's λ (the trainer's certified solve) is timed in products by M, by the spectral
preconditioners and by EKFAC too.
Printed: products to a relative gradient of 1e-4 and the relative gradient at the start and after each product,
and A's extreme Ritz values.

    lqf-hub train --output-dir out
    python benchmarks/forget_deflation.py --model out/model --remove 20 849 --ritz 20 40 \\
        --out benchmarks/results/forget_deflation.md
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from lqf_hub import LQFModel
from lqf_hub.demo import DemoSession
from lqf_hub.files import atomic_write_text
from lqf_hub.modeling.layer_rows import input_rows, layer_call, output_rows
from lqf_hub.solver.solve import DataTerm, KrylovPath, solve


class CorrectedDiagonal(TorchFunctionMode):
    """Adds, for every F.linear / F.conv2d on a Kronecker block's weight, each image's squared gradient rotated
    into the block's eigenbasis to ``sums[weight] [groups, d_out, d_in (+1)]``, per backward pass of the outputs."""

    def __init__(self, kfac, names_by_id: dict[int, str], sums: dict) -> None:
        super().__init__()
        self.kfac, self.names_by_id, self.sums = kfac, names_by_id, sums

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        call = layer_call(func, args, kwargs)
        name = None if call is None else self.names_by_id.get(id(call["weight"]))
        if name not in self.kfac.blocks:
            return out
        block, x = self.kfac.blocks[name], call["input"]
        rows, groups, channel_dim = input_rows(func, call, block.bias is not None)
        inputs = torch.einsum("mgi,gij->mgj", rows, block.eig["basis_a"]).reshape(len(x), -1, groups, rows.shape[-1])

        def hook(grad: torch.Tensor) -> None:
            g = output_rows(grad.detach(), groups, channel_dim)
            g = torch.einsum("mgo,gop->mgp", g, block.eig["basis_b"]).reshape(len(x), -1, groups, g.shape[-1])
            square = torch.einsum("ntgp,ntgj->ngpj", g, inputs).square().sum(0)
            self.sums[name] = self.sums.get(name, 0) + square

        out.register_hook(hook)
        return out


def corrected_diagonal(model: LQFModel, data: DataTerm, kfac, exact: bool, batch_size: int = 64) -> dict:
    """EKFAC's ``S`` per Kronecker block: mean over images of the squared per-image, per-output gradients in the
    block's eigenbasis, from every output (``exact``) or one Gaussian output vector per image (seed 0)."""
    sums = {}
    generator = torch.Generator().manual_seed(0)
    names = list(model.linearized_parameters)
    for start in range(0, data.count, batch_size):
        point = {n: model.linearization_point[n].clone().requires_grad_() for n in names}
        with CorrectedDiagonal(kfac, {id(t): n for n, t in point.items()}, sums):
            out = model.tail_function(data.trunk(slice(start, start + batch_size)))(point)
        vectors = (list(torch.eye(out.shape[1]).unsqueeze(1).expand(-1, *out.shape)) if exact
                   else [torch.randn(out.shape, generator=generator)])
        for v in vectors:
            torch.autograd.grad((out * v.to(out)).sum(), list(point.values()), retain_graph=True, allow_unused=True)
    return {name: total / data.count for name, total in sums.items()}


def corrected_preconditioner(data: DataTerm, kfac, diagonal: dict, ridge: float):
    """``r ↦ P⁻¹r`` with ``P = Q (S + λ e_M) Qᵀ`` per Kronecker block and ``d + λ(d + γ)`` per diagonal tensor."""
    def apply(vector: torch.Tensor) -> torch.Tensor:
        parts, result = data.flat.unflatten(vector), {}
        for name, block in kfac.blocks.items():
            e, weight = block.eig, parts[name]
            matrix = weight.reshape(block.groups, weight.shape[0] // block.groups, -1)
            if block.bias:
                matrix = torch.cat([matrix, parts[block.bias].reshape(block.groups, -1, 1)], dim=-1)
            prior = e["eig_b"].unsqueeze(-1) * e["eig_a"].unsqueeze(-2) + kfac.damping * e["eig_a"].mean() * e["eig_b"].mean()
            rotated = e["basis_b"].transpose(-1, -2) @ matrix @ e["basis_a"] / (diagonal[name] + ridge * prior)
            solved = e["basis_b"] @ rotated @ e["basis_a"].transpose(-1, -2)
            if block.bias:
                result[block.bias] = solved[..., -1].reshape(parts[block.bias].shape)
                solved = solved[..., :-1]
            result[name] = solved.reshape(weight.shape)
        for name, d in kfac.diag_eig.items():
            result[name] = parts[name] / (d + ridge * (d + kfac.damping * d.mean()))
        return data.flat.flatten(result)

    return apply


CONVERGED = 1e-2
"""A Ritz pair is used by the spectral preconditioner once ``‖A y − θ y‖ ≤ CONVERGED · θ``."""


def spectral_preconditioner(metric, ritz: np.ndarray, vectors: torch.Tensor, residuals: np.ndarray, ridge: float):
    """``r ↦ M^-½ C⁻¹ M^-½ r`` with ``C⁻¹ = I + Σ_i (μ / (θ_i + λ) − 1) y_i y_iᵀ`` over the converged Ritz pairs
    (``vectors [k, P]``, orthonormal, in ``u = M^½ δ``), ``μ = θ + λ`` of the largest pair left out; and how many
    pairs it deflates."""
    order = np.argsort(-ritz)
    used = [i for i in order if residuals[i] <= CONVERGED * ritz[i]]
    left = [i for i in order if i not in used]
    level = (ritz[left[0]] if left else 0.0) + ridge
    directions = vectors[used]
    scale = torch.from_numpy(level / (ritz[used] + ridge) - 1).to(vectors.dtype)

    def apply(vector: torch.Tensor) -> torch.Tensor:
        u = metric.power(vector, 0.5)
        return metric.power(u + ((directions @ u) * scale) @ directions, 0.5)

    return apply, len(used)


def certified(data: DataTerm, metric, ridge: float, start: torch.Tensor | None, preconditioner=None):
    """Products to a relative gradient of 1e-4 and the relative gradient after each product."""
    history = []
    _, certificate = solve(data, metric, ridge, tolerance=1e-4, start=start, preconditioner=preconditioner,
                           callback=history.append)
    return certificate.iterations, history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--remove", type=int, nargs="+", default=[20, 849])
    parser.add_argument("--ritz", type=int, nargs="+", default=[20, 40], help="Ritz vectors recycled.")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = LQFModel.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as cache:
        session = DemoSession(model, cache)
        data, metric, ridge = session.explainer.data, session.explainer.metric, model.config.ridge
        if metric.kfac is None:
            raise SystemExit(f"{args.model} was solved with the {metric.kind} prior; this benchmark needs a K-FAC one.")
        delta = data.flat.flatten(dict(model.linearized_parameters))
        rest = session.trunk.select([i for i in range(data.count) if i not in set(args.remove)])
        without = DataTerm(model, rest.values, rest.labels, rest.digests, batch_size=data.batch_size)
        rows = [("preconditioned by M, as `forget` does", 0, *certified(without, metric, ridge, delta))]
        extremes, spectral = {}, {}
        for k in args.ritz:
            probe = torch.randn(sum(data.flat.sizes), generator=torch.Generator().manual_seed(0)).to(data.flat.dtype)
            lanczos = KrylovPath(data, metric, [ridge], tolerance=1e-12, max_iterations=k, start=probe)
            ritz, vectors = np.linalg.eigh(lanczos.tridiagonal())
            extremes[k] = (float(ritz.min()), float(ritz.max()))
            basis = torch.from_numpy(vectors.T).to(data.flat.dtype) @ torch.stack(lanczos.basis)  # Ritz vectors [k, P]
            lifted = torch.stack([metric.power(u, 0.5) for u in basis])  # M^-½ u, in δ's coordinates
            residual = without.rhs - without.gauss_newton(delta) - ridge * metric.power(delta, -1.0)
            start = delta + ((lifted @ residual) / torch.from_numpy(ritz + ridge).to(data.flat.dtype)) @ lifted
            rows.append((f"Galerkin start on {k} Ritz vectors", lanczos.iterations + 1,
                         *certified(without, metric, ridge, start)))
            residuals = np.abs(lanczos.betas[-1] * vectors[-1])  # ‖A y − θ y‖ of each Ritz pair
            preconditioner, deflated = spectral_preconditioner(metric, ritz, basis, residuals, ridge)
            spectral[k] = (preconditioner, deflated, lanczos.iterations)
            rows.append((f"preconditioned by M and the {deflated} converged of {k} Ritz pairs", lanczos.iterations,
                         *certified(without, metric, ridge, delta, preconditioner)))
        refits = [("preconditioned by M", 0, *certified(data, metric, ridge, None))]
        for k, (preconditioner, deflated, built) in spectral.items():
            refits.append((f"preconditioned by M and the {deflated} converged of {k} Ritz pairs", built,
                           *certified(data, metric, ridge, None, preconditioner)))
        for exact, text in ((True, "every output"), (False, "one Gaussian output vector per image")):
            diagonal = corrected_diagonal(model, without, metric.kfac, exact)
            passes = model.num_classes if exact else 1
            preconditioner = corrected_preconditioner(without, metric.kfac, diagonal, ridge)
            rows.append((f"preconditioned by EKFAC, S from {text}", f"{passes} backward",
                         *certified(without, metric, ridge, delta, preconditioner)))
            preconditioner = corrected_preconditioner(data, metric.kfac, corrected_diagonal(model, data, metric.kfac, exact),
                                                      ridge)
            refits.append((f"preconditioned by EKFAC, S from {text}", f"{passes} backward",
                           *certified(data, metric, ridge, None, preconditioner)))
    lines = [f"# A forget's conjugate gradients: a recycled subspace, a corrected preconditioner ({args.model}, "
             f"without {args.remove})", "",
             "```bash", f"python benchmarks/forget_deflation.py --model {args.model} --remove "
             f"{' '.join(map(str, args.remove))} --ritz {' '.join(map(str, args.ritz))}", "```", "",
             f"{data.count} training images, prior {metric.kind}, λ = {ridge:g}; M kept (only the data term changes). "
             "Products with the data by `solve` (a fresh gradient at the start, CG, the certificate's product).", "",
             "## The forget, from the model's δ", "",
             "| solve | passes to build it | products to 1e-4 | relative gradient: start, then after 1, 2 |",
             "|---|---:|---:|---|"]
    table = lambda entries: [f"| {name} | {built} | {used} | {', '.join(f'{h:.1e}' for h in history[:3])} |"
                             for name, built, used, history in entries]
    lines += table(rows)
    lines += ["", "## The refit, from δ = 0 (all images)", "",
              "| solve | passes to build it | products to 1e-4 | relative gradient: start, then after 1, 2 |",
              "|---|---:|---:|---|", *table(refits)]
    lines += ["", "Extreme Ritz values of A = M^-½ G M^-½ (Lanczos from a random vector): "
              + "; ".join(f"{k} steps: {low:.2g} … {high:.4g}" for k, (low, high) in extremes.items()) + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
