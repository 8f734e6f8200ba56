"""The optimum of the LQF objective, reached and certified — no epochs, no step size, no early stopping.

    L(δ) = mean_i ½‖f0(x_i) + J_i δ − α y_i‖² + (λ/2) δᵀMδ,      ∇L(δ) = (G + λM)δ − b,

with ``G = mean_i J_iᵀJ_i`` and ``b = mean_i J_iᵀ(α y_i − f0(x_i))``. ``M`` is the prior's metric: the
identity (a plain ridge towards w0) or K-FAC's damped curvature at w0 (a prior shaped like the data's own
curvature — what preconditioned early stopping regularises towards implicitly).

* **Every λ at once.** In ``u = M^½ δ`` the Hessian is ``A + λI`` with ``A = M^-½ G M^-½``. Krylov
  subspaces do not change under a shift, so one Lanczos run on A from ``M^-½ b`` gives, for every λ, the
  optimum restricted to the subspace: ``u_λ = Q (T + λI)⁻¹ β₀e₁`` (``KrylovPath``).
* **A certificate, not an epoch count.** For one λ, conjugate gradients preconditioned by M, their iterates
  smoothed to the least gradient in ``M⁻¹``'s norm (the MINRES iterates, at no extra product), run until the
  gradient, recomputed from a fresh product over the data, satisfies
  ``‖∇L(δ)‖_{M⁻¹} ≤ tol · ‖∇L(0)‖_{M⁻¹}``. Then ``L(δ) − L* = ½∇ᵀ(G + λM)⁻¹∇ ≤ ‖∇L(δ)‖²_{M⁻¹} / (2λ)``
  (as ``G + λM ⪰ λM``): the suboptimality bound reported with the model (``solve``).

Each product with G is one linearized forward and one backward pass over the (cached) training set, each
process over its shard, summed across processes: the result does not depend on the number of processes
or on any data order.
"""

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..modeling.linearize import linearized
from ..modeling.model import LQFModel
from .curvature import gauss_newton_batch
from .kfac import KFAC, symmetric_eigh

ReduceSum = Callable[[Tensor], Tensor]
Preconditioner = Callable[[Tensor], Tensor]  # r ↦ P⁻¹r, [P] -> [P]
HEAD_PARAMETERS = ("head.weight", "head.bias")
"""The new head's parameters, by network name (``lqf_hub.modeling.model.LQFModel`` names its classifier ``head``)."""


# ------------------------------------------------------------------------------------------ vectors
class Flat:
    """δ as one flat vector ``[P]`` (Krylov algebra) and back to ``{network name: tensor}`` (the model)."""

    def __init__(self, like: dict[str, Tensor]) -> None:
        self.names = list(like)
        self.shapes = [like[n].shape for n in self.names]
        self.sizes = [like[n].numel() for n in self.names]
        self.dtype, self.device = next(iter(like.values())).dtype, next(iter(like.values())).device

    def flatten(self, tensors: dict[str, Tensor]) -> Tensor:
        return torch.cat([tensors[n].detach().reshape(-1) for n in self.names])

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        return {n: part.reshape(shape) for n, part, shape in zip(self.names, vector.split(self.sizes), self.shapes)}

    def zeros(self) -> Tensor:
        return torch.zeros(sum(self.sizes), dtype=self.dtype, device=self.device)


def _inner(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a.double(), b.double()))


# --------------------------------------------------------------------------------------- the metric
class PriorMetric:
    """The prior's metric M: identity, a finalized K-FAC (built with ``ridge=0`` and damping > 0), or the
    identity on the new head alone (``head_only``: LQF-head, the backbone's δ held at zero).

    For ``head_only`` every power of M is the projection onto the head's coordinates: the pseudo-inverse
    convention, under which every solver below works on the head's subspace unchanged.
    """

    def __init__(self, flat: Flat, kfac: KFAC | None = None, *, head_only: bool = False) -> None:
        if kfac is not None and kfac.ridge != 0:
            raise ValueError("The prior's K-FAC must have ridge=0 (λ scales M separately).")
        if kfac is not None and not kfac.damping > 0:
            raise ValueError("A K-FAC prior needs damping > 0, or M is singular.")
        if kfac is not None and head_only:
            raise ValueError("The head-only prior is the identity on the head; it takes no K-FAC.")
        self.flat, self.kfac = flat, kfac
        self.mask = None
        if head_only:
            self.mask = torch.cat([torch.full((size,), float(name in HEAD_PARAMETERS), dtype=flat.dtype,
                                              device=flat.device) for name, size in zip(flat.names, flat.sizes)])

    @property
    def kind(self) -> str:
        return "head" if self.mask is not None else "isotropic" if self.kfac is None else "kfac"

    def power(self, vector: Tensor, exponent: float) -> Tensor:
        """``M^-exponent · v``: ``[P] -> [P]``."""
        if self.mask is not None:
            return vector * self.mask
        if self.kfac is None:
            return vector
        parts = {n: t.clone() for n, t in self.flat.unflatten(vector).items()}
        self.kfac.precondition(parts, power=exponent)
        return self.flat.flatten(parts)


# ---------------------------------------------------------------------------------------- the data
class DataTerm:
    """``mean_i ½‖f0(z_i) + J_i δ − α y_i‖²`` over cached trunk outputs ``z [N, ...]`` and labels ``[N]``.

    ``keys [N, k]`` identify the samples (content digests). This process holds the shard ``rank::world``;
    ``reduce_sum`` adds a tensor over processes. Trunk outputs stored in half precision stay so (``z``), each
    batch converted to the model's dtype on its way in (``trunk``): the objective is that of the stored values.
    """

    def __init__(
        self, model: LQFModel, trunk_outputs: Tensor, labels: Tensor, keys: Tensor, *, batch_size: int,
        reduce_sum: ReduceSum = lambda t: t, rank: int = 0, world: int = 1,
    ) -> None:
        self.model, self.batch_size, self.reduce_sum = model, batch_size, reduce_sum
        self.count, self.rank, self.world = len(labels), rank, world
        self.flat = Flat(model.linearization_point)
        device = self.flat.device
        self.dtype = model.net.head.weight.dtype
        z = torch.as_tensor(np.asarray(trunk_outputs[rank::world]))
        self.z = z.to(device) if z.dtype in (torch.float16, torch.bfloat16) else z.to(device, self.dtype)
        self.labels = torch.as_tensor(labels[rank::world]).to(device)
        self.keys = keys[rank::world]
        targets = model.config.target_scale * F.one_hot(self.labels, model.num_classes).to(self.dtype)
        self.f0, rhs = self._base_and_rhs(targets)
        self.rhs = self._mean(rhs)  # b
        self.constant = float(self.reduce_sum(0.5 * (self.f0 - targets).double().square().sum()[None])) / self.count

    def trunk(self, rows: slice | Tensor = slice(None)) -> Tensor:
        """This shard's trunk outputs ``rows``, in the model's dtype: ``[n, ...]``."""
        return self.z[rows].to(self.dtype)

    def trunk_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """This shard's trunk outputs and keys in batches, in order."""
        for rows in self._batches():
            yield self.trunk(rows), self.keys[rows]

    def _batches(self) -> Iterator[slice]:
        for start in range(0, len(self.labels), self.batch_size):
            yield slice(start, start + self.batch_size)

    def _mean(self, local_sum: Tensor) -> Tensor:
        return self.reduce_sum(local_sum) / self.count

    def _base_and_rhs(self, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``f0 [n, C]`` of this shard and ``Σ_i J_iᵀ(α y_i − f0_i)`` (local sum) from one pass at δ = 0."""
        outputs, total = [], self.flat.zeros()
        for rows in self._batches():
            zero = {n: t.requires_grad_() for n, t in self.flat.unflatten(self.flat.zeros()).items()}
            out = linearized(self.model.tail_function(self.trunk(rows)), self.model.linearization_point, zero)
            residual = (targets[rows] - out.detach()).to(out.dtype)
            grads = torch.autograd.grad((out * residual).sum(), list(zero.values()), allow_unused=True)
            total += torch.cat([(g if g is not None else torch.zeros_like(t)).reshape(-1)
                                for g, t in zip(grads, zero.values())])
            outputs.append(out.detach())
        return torch.cat(outputs), total

    def gauss_newton(self, vector: Tensor) -> Tensor:
        """``G·v = mean_i J_iᵀJ_i v``: ``[P] -> [P]`` (one linearized forward and backward pass over the data)."""
        total = self.flat.zeros()
        for rows in self._batches():
            products = gauss_newton_batch(self.model, self.trunk(rows), self.flat.unflatten(vector), self.f0[rows])
            total += self.flat.flatten(products).to(total.dtype)
        return self._mean(total)

    @torch.no_grad()
    def outputs(self, delta: Tensor) -> Tensor:
        """``f0 + J·δ`` of this shard's samples: ``[P] -> [n, C]`` (one forward-mode pass)."""
        deltas = self.flat.unflatten(delta)
        return torch.cat([linearized(self.model.tail_function(self.trunk(rows)), self.model.linearization_point, deltas)
                          for rows in self._batches()])

    @torch.no_grad()
    def head_features(self) -> Tensor:
        """What the new head sees at w0, with a ones column for its bias: ``[n, D + 1]`` (this shard)."""
        features = torch.cat([self.model.features(trunk_output=self.trunk(rows)) for rows in self._batches()])
        return torch.cat([features, features.new_ones(len(features), 1)], dim=1)

    def sample_scores(self, delta: Tensor) -> tuple[Tensor, Tensor]:
        """Per sample of this shard, for ``f0 + J·δ``: ½‖f_lin − αy‖² ``[n]`` (float64) and correct ``[n]`` (bool)."""
        return self.scores_of(self.outputs(delta))

    def scores_of(self, out: Tensor) -> tuple[Tensor, Tensor]:
        """``sample_scores`` of this shard's outputs ``out [n, C]``."""
        targets = self.model.config.target_scale * F.one_hot(self.labels, self.model.num_classes)
        return 0.5 * (out.double() - targets).square().sum(-1), out.argmax(-1) == self.labels

    def gather(self, local: Tensor) -> Tensor:
        """This shard's rows ``[n, ...]`` in their places among all the term's samples, from every process:
        ``[N, ...]`` (in the order the term was given them)."""
        full = local.new_zeros(self.count, *local.shape[1:])
        full[self.rank::self.world] = local
        return self.reduce_sum(full)


# ------------------------------------------------------------------------------------ every λ at once
class KrylovPath:
    """Lanczos on ``A = M^-½ G M^-½`` from ``M^-½ b`` with full reorthogonalisation: the optimum on the
    Krylov subspace for every λ at once. Stops when the estimated relative gradient norm at the smallest of
    ``ridges`` is below ``tolerance``.

    The basis (``iterations × P`` numbers) is kept in host memory, one vector at a time, never stacked: on an
    accelerator it takes none of the device's memory (each reorthogonalisation streams it through once), and
    nothing it holds enters the certificate, which the refit computes from fresh products.
    """

    def __init__(
        self, data: DataTerm, metric: PriorMetric, ridges: list[float], *, tolerance: float,
        max_iterations: int, progress: bool = False, description: str = "Lanczos (every λ at once)",
        start: Tensor | None = None,
    ) -> None:
        self.metric = metric
        start = metric.power(data.rhs, 0.5) if start is None else start  # another start: a probe of A's spectrum
        self.beta0 = math.sqrt(_inner(start, start))
        basis = [(start / self.beta0).cpu()]
        self.alphas: list[float] = []
        self.betas: list[float] = []
        bar = tqdm(total=max_iterations, desc=description, disable=not progress)
        for _ in range(max_iterations):
            w = metric.power(data.gauss_newton(metric.power(basis[-1].to(start.device), 0.5)), 0.5).cpu()
            self.alphas.append(_inner(w, basis[-1]))
            for _ in range(2):  # twice is enough (Kahan): the basis stays orthogonal to working precision
                w = w - sum(torch.dot(q, w) * q for q in basis)
            beta = math.sqrt(_inner(w, w))
            self.betas.append(beta)
            bar.update()
            residual = self.residual(min(ridges))
            bar.set_postfix(residual=f"{residual:.2e}")
            if residual <= tolerance or beta <= 1e-12 * self.scale:  # converged, or an invariant subspace
                break
            basis.append(w / beta)
        bar.close()
        self.basis = basis[: len(self.alphas)]  # [P] each, on the host
        self.device = start.device

    @property
    def iterations(self) -> int:
        return len(self.alphas)

    @property
    def scale(self) -> float:
        """θ_max: the largest Ritz value, the largest curvature of the data term in the prior's metric."""
        return float(np.linalg.eigvalsh(self.tridiagonal()).max())

    def quadrature(self, function: Callable[[np.ndarray], np.ndarray]) -> float:
        """``sᵀ f(A) s`` for the start ``s`` by Gauss quadrature on the path's Ritz values (Golub & Meurant):
        ``β₀² Σ_k τ_k² f(θ_k)``, exact for polynomials of degree < 2·iterations."""
        ritz, vectors = np.linalg.eigh(self.tridiagonal())
        return self.beta0 ** 2 * float(np.sum(vectors[0] ** 2 * function(np.clip(ritz, 0.0, None))))

    def tridiagonal(self) -> np.ndarray:
        """The Lanczos tridiagonal matrix T ``[k, k]``: A restricted to the path's basis (its eigenvalues are the Ritz values)."""
        k = len(self.alphas)
        return np.diag(self.alphas) + np.diag(self.betas[: k - 1], 1) + np.diag(self.betas[: k - 1], -1)

    def _coefficients(self, ridge: float) -> np.ndarray:
        k = len(self.alphas)
        rhs = np.zeros(k)
        rhs[0] = self.beta0
        return np.linalg.solve(self.tridiagonal() + ridge * np.eye(k), rhs)

    def decrease(self, ridge: float) -> float:
        """``L(0) − L(δ_λ) = ½ bᵀ(G + λM)⁻¹b`` on the subspace: ``½ β₀ y₁`` (a start other than b: ``½ sᵀ(A + λ)⁻¹s``)."""
        return 0.5 * self.beta0 * float(self._coefficients(ridge)[0])

    def residual(self, ridge: float) -> float:
        """Estimated ``‖∇L(δ_λ)‖_{M⁻¹} / ‖∇L(0)‖_{M⁻¹}`` (Lanczos: β_k |y_k|)."""
        return self.betas[-1] * abs(self._coefficients(ridge)[-1]) / self.beta0

    def solution(self, ridge: float) -> Tensor:
        """``δ_λ = M^-½ Q (T + λI)⁻¹ β₀e₁``: ``[P]``."""
        coefficients = self._coefficients(ridge)
        combination = sum(float(c) * q for c, q in zip(coefficients, self.basis))
        return self.metric.power(combination.to(self.device), 0.5)


class HeadPath:
    """LQF-head's optimum for every λ in closed form, no products with the data: with the backbone's δ at zero
    the data term is a ridge regression on the head's features ``φ̃_i = [φ_i, 1]`` (``J_i δ = δW φ_i + δb``), so
    ``(mean_i φ̃_i φ̃_iᵀ + λI) Δ = mean_i φ̃_i r_iᵀ`` with ``r_i = α y_i − f0(x_i)``, for every λ from one
    eigendecomposition. Same interface as ``KrylovPath`` (its residuals are rounding only)."""

    iterations = 0

    def __init__(self, data: DataTerm) -> None:
        features = data.head_features().double()  # [n, D + 1]
        targets = data.model.config.target_scale * F.one_hot(data.labels, data.model.num_classes).double()
        gram = data.reduce_sum(features.T @ features) / data.count
        cross = data.reduce_sum(features.T @ (targets - data.f0.double())) / data.count  # [D + 1, C]
        self.eigenvalues, self.basis = symmetric_eigh(gram[None], "Gram matrix of the head's features")
        self.eigenvalues, self.basis = self.eigenvalues[0], self.basis[0]
        self.projected = self.basis.T @ cross
        self.flat = data.flat

    def residual(self, ridge: float) -> float:
        return 0.0

    def decrease(self, ridge: float) -> float:
        """``L(0) − L(δ_λ)``: ``½ tr(crossᵀ (gram + λ)⁻¹ cross)``."""
        return 0.5 * float((self.projected.square().sum(1) / (self.eigenvalues.clamp_min(0) + ridge)).sum())

    def solution(self, ridge: float) -> Tensor:
        """δ with the head's part at its optimum for λ = ``ridge`` and the rest zero: ``[P]``."""
        coefficients = self.basis @ (self.projected / (self.eigenvalues.clamp_min(0)[:, None] + ridge))  # [D + 1, C]
        parts = {n: torch.zeros_like(t) for n, t in self.flat.unflatten(self.flat.zeros()).items()}
        weight, bias = HEAD_PARAMETERS
        parts[weight] = coefficients[:-1].T.to(self.flat.dtype)
        parts[bias] = coefficients[-1].to(self.flat.dtype)
        return self.flat.flatten(parts)


# ------------------------------------------------------------------------------------- one λ, certified
@dataclass
class Certificate:
    """How close ``δ`` is to the optimum at ``ridge``, from a fresh product over the data."""

    ridge: float
    prior: str
    relative_gradient_norm: float  # ‖∇L(δ)‖_{M⁻¹} / ‖∇L(0)‖_{M⁻¹}
    gradient_norm: float  # ‖∇L(δ)‖_{M⁻¹}
    suboptimality_bound: float  # ≥ L(δ) − L*
    objective: float  # L(δ)
    iterations: int  # products with G spent on this solve

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def certify(data: DataTerm, metric: PriorMetric, ridge: float, delta: Tensor, iterations: int = 0,
            product: Tensor | None = None) -> tuple[Certificate, Tensor]:
    """The certificate of ``delta`` and the gradient ``∇L(δ) [P]``, from ``product = G·δ`` (default: one
    fresh product with G)."""
    product = data.gauss_newton(delta) if product is None else product
    prior = metric.power(delta, -1.0)
    gradient = product + ridge * prior - data.rhs
    dual_norm2 = max(_inner(gradient, metric.power(gradient, 1.0)), 0.0)
    rhs_norm = _dual_norm(data.rhs, metric)
    objective = 0.5 * _inner(delta, product) - _inner(data.rhs, delta) + data.constant + 0.5 * ridge * _inner(delta, prior)
    certificate = Certificate(ridge=ridge, prior=metric.kind, relative_gradient_norm=math.sqrt(dual_norm2) / rhs_norm,
                              gradient_norm=math.sqrt(dual_norm2), suboptimality_bound=dual_norm2 / (2 * ridge),
                              objective=objective, iterations=iterations)
    return certificate, gradient


def solve(
    data: DataTerm, metric: PriorMetric, ridge: float, *, tolerance: float = 1e-4, max_iterations: int = 500,
    start: Tensor | None = None, progress: bool = False, preconditioner: Preconditioner | None = None,
    callback: Callable[[float], None] | None = None,
) -> tuple[Tensor, Certificate]:
    """``argmin L`` at ``ridge`` by conjugate gradients from ``start`` (default 0), preconditioned by M or by
    ``preconditioner`` (``r ↦ P⁻¹r``, ``[P] -> [P]``, symmetric positive definite), until the certificate from a
    fresh product holds: returns ``δ [P]`` and its ``Certificate``. ``callback`` gets the relative gradient (the
    certificate's measure) after every product.

    Raises ``RuntimeError`` if ``max_iterations`` products do not reach ``tolerance``.
    """
    if not ridge > 0:
        raise ValueError(f"`ridge` must be > 0 for a certified solve, got {ridge}.")
    with tqdm(total=max_iterations, desc=f"conjugate gradients at λ={ridge:.3g}", disable=not progress) as bar:
        def report(relative: float) -> None:
            bar.update()
            bar.set_postfix(gradient=f"{relative:.2e}")
            if callback is not None:
                callback(relative)

        delta, product, spent = _solve_linear(data, metric, ridge, data.rhs, start, tolerance, max_iterations, report,
                                              preconditioner)
    return delta, certify(data, metric, ridge, delta, spent, product)[0]


def inverse_hessian_product(
    data: DataTerm, metric: PriorMetric, ridge: float, vector: Tensor, *, tolerance: float = 1e-6,
    max_iterations: int = 500,
) -> Tensor:
    """``(G + λM)⁻¹ v``: ``[P] -> [P]``, by conjugate gradients preconditioned by M until the residual from
    a fresh product is below ``tolerance`` relative to ``v`` (in M⁻¹'s norm, as the certificate's)."""
    return _solve_linear(data, metric, ridge, vector, None, tolerance, max_iterations, lambda relative: None)[0]


def _dual_norm(vector: Tensor, metric: PriorMetric) -> float:
    """``‖v‖_{M⁻¹}``, the norm the certificate measures gradients in."""
    return math.sqrt(max(_inner(vector, metric.power(vector, 1.0)), 0.0))


def _solve_linear(
    data: DataTerm, metric: PriorMetric, ridge: float, rhs: Tensor, start: Tensor | None, tolerance: float,
    max_iterations: int, report: Callable[[float], None], preconditioner: Preconditioner | None = None,
) -> tuple[Tensor, Tensor, int]:
    """``(G + λM) x = rhs`` from ``start`` (default 0) until ``‖rhs − (G + λM)x‖_{M⁻¹} ≤ tol · ‖rhs‖_{M⁻¹}``
    with the residual from a fresh product: ``x``, that product ``G·x`` and the products spent. ``report`` gets
    the relative residual after every product."""
    x = data.flat.zeros() if start is None else start.clone()
    rhs_norm = _dual_norm(rhs, metric)
    spent = 0
    while True:
        product = data.gauss_newton(x)
        residual = rhs - product - ridge * metric.power(x, -1.0)
        spent += 1
        relative = _dual_norm(residual, metric) / rhs_norm
        report(relative)
        if relative <= tolerance:
            return x, product, spent
        if spent >= max_iterations:
            raise RuntimeError(
                f"No certificate after {spent} products with the data (relative gradient {relative:.2e} > "
                f"{tolerance:.0e}); raise the iteration limit or the ridge."
            )
        # a 10% margin for the recurrence's drift, which the fresh product then checks
        x, used = _conjugate_gradients(data, metric, ridge, x, residual, 0.9 * tolerance, rhs_norm,
                                       max_iterations - spent, report, preconditioner)
        spent += used


def _conjugate_gradients(
    data: DataTerm, metric: PriorMetric, ridge: float, x: Tensor, residual: Tensor, tolerance: float,
    rhs_norm: float, budget: int, report: Callable[[float], None], preconditioner: Preconditioner | None,
) -> tuple[Tensor, int]:
    """PCG from ``x`` with ``residual = rhs − Hx``, its iterates smoothed to the least residual in the certificate's
    norm (minimal residual smoothing, Zhou & Walker 1994: no extra product; with M as the preconditioner it gives
    the MINRES iterates), until the smoothed residual, relative to ``rhs_norm``, is below ``tolerance``; then the
    caller recomputes it: recurrences drift. CG's own residual is not monotone and ends above the smoothed one."""
    precondition = preconditioner or (lambda r: metric.power(r, 1.0))
    preconditioned = precondition(residual)
    direction, rz = preconditioned, _inner(residual, preconditioned)
    # the smoothed iterate, its residual and that residual in M⁻¹ (the certificate's norm)
    smoothed, smoothed_residual = x, residual
    smoothed_dual = preconditioned if preconditioner is None else metric.power(residual, 1.0)
    used, relative = 0, math.inf
    while used < budget and relative > tolerance:
        product = data.gauss_newton(direction) + ridge * metric.power(direction, -1.0)
        used += 1
        step = rz / _inner(direction, product)
        x = x + step * direction
        residual = residual - step * product
        preconditioned = precondition(residual)
        rz, previous = _inner(residual, preconditioned), rz
        direction = preconditioned + (rz / previous) * direction
        dual = preconditioned if preconditioner is None else metric.power(residual, 1.0)
        change, dual_change = residual - smoothed_residual, dual - smoothed_dual
        squared = _inner(change, dual_change)
        weight = -_inner(smoothed_residual, dual_change) / squared if squared > 0 else 0.0
        smoothed = smoothed + weight * (x - smoothed)
        smoothed_residual = smoothed_residual + weight * change
        smoothed_dual = smoothed_dual + weight * dual_change
        relative = math.sqrt(max(_inner(smoothed_residual, smoothed_dual), 0.0)) / rhs_norm
        report(relative)
    return smoothed, used
