"""Exact attribution of predictions to training images — what only a model at its optimum offers.

At the optimum of ``L(δ) = mean_i ½‖f0(x_i) + J_i δ − α y_i‖² + (λ/2) δᵀMδ`` the gradient is zero, so
``λ M δ* = (1/N) Σ_i J_iᵀ r_i`` with the residuals ``r_i = α y_i − f_lin(x_i)``, and every prediction splits
exactly over the training images (a representer theorem):

    f_lin(x) = f0(x) + Σ_i c_i(x),      c_i(x) = (1/(Nλ)) · J(x) M⁻¹ J_iᵀ · r_i        [C]

— a C×C kernel block between x and x_i times x_i's residual. At a certified δ rather than δ* the split
misses ``J(x) M⁻¹ ∇L(δ) / λ`` (``Explanation.gap``), which vanishes with the certificate's gradient.

Removing training images S (λ kept) moves the optimum by exactly ``(1/(N−s)) H_S⁻¹ Σ_{j∈S} (λMδ* − J_jᵀ r_j)``,
with ``H_S`` the Hessian without them: one Newton step, exact because L is quadratic. With the full Hessian
``H = G + λM`` in place of ``H_S`` (a rank-Cs change of size s/N) it is the first-order prediction, linear in
the removed images: ``RemovalEffects``.

For one image, C backward passes give ``M⁻¹ J(x)ᵀ e_c`` and C forward-mode passes over the training set
give every ``J_i M⁻¹ J(x)ᵀ e_c``: exact, at the cost of C passes over the training data per image. A
training image's share of its own prediction, ``c_i(x_i)``, needs only its own C backward passes.

Which training images does the rest argue against? The problem is kernel ridge regression in disguise:
with ``K = J M⁻¹ Jᵀ`` (``[N·C, N·C]``) the fitted outputs are ``f0 + A(αY − f0)``, ``A = K(K + NλI)⁻¹``, so
the residual of image i under the optimum *without it* (same penalty Nλ/2·δᵀMδ on the sum of the others'
squares) is exactly ``(I − A_ii)⁻¹ r_i`` — leave-one-out for every image from one kernel (``Explainer.
leave_one_out``). The kernel costs N·C passes over the training set, or k with random projections.
"""

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import CheckpointError, DataUnreachable
from ..files import atomic_write_text, load_keyed_tensors, save_keyed_tensors
from ..hub import backbone_sha256
from ..modeling.linearize import linearized
from ..modeling.model import LQFModel
from ..plotting import save_png, subplots
from ..solver.solve import DataTerm, PriorMetric, inverse_hessian_product
from ..training.cache import TrunkCache
from ..training.objective import Objective, trunk_outputs


@dataclass
class Explanation:
    """One image's prediction split over the training images."""

    base: Tensor  # f0(x) [C]: the pretrained network with its head at w0
    output: Tensor  # f_lin(x) [C]: the model's prediction
    contributions: Tensor  # c_i(x) [N, C]: training image i's share of the change from f0(x)

    @property
    def predicted(self) -> int:
        return int(self.output.argmax())

    @property
    def gap(self) -> Tensor:
        """``f_lin(x) − f0(x) − Σ_i c_i(x)`` ``[C]``: zero at the exact optimum."""
        return self.output - self.base - self.contributions.sum(0)

    def ranked(self, k: int, *, supporting: bool = True) -> tuple[Tensor, Tensor]:
        """The ``k`` training images that most raise (``supporting``) or most lower the predicted class's output:
        ``(indices [k], contributions [k])``."""
        scores = self.contributions[:, self.predicted]
        values, indices = scores.topk(min(k, len(scores)), largest=supporting)
        return indices, values

    def summary(self, k: int, names: dict[int, str], train_labels: Tensor) -> dict:
        """What ``explain`` reports of it, for the predicted class: its name, output, base and unexplained
        remainder, and the ``k`` most ``supporting`` and ``opposing`` training images (index, label, contribution).
        ``names``: the model's ``id2label``; ``train_labels [N]``: the training images' labels."""
        c = self.predicted
        row = {"predicted": names[c], "output": self.output[c].item(), "base": self.base[c].item(),
               "unexplained": self.gap[c].item()}
        for kind in ("supporting", "opposing"):
            indices, values = self.ranked(k, supporting=kind == "supporting")
            row[kind] = [{"train_index": int(i), "label": names[int(train_labels[i])], "contribution": float(v)}
                         for i, v in zip(indices, values)]
        return row


@dataclass
class RemovalEffects:
    """What removing training images does to the outputs on T images, to first order.

    ``effects [N, T, C]``: ``J(x_t) H⁻¹ (λMδ* − J_jᵀ r_j)`` for every training image j.
    """

    effects: Tensor

    def predicted_change(self, removed: list[int]) -> Tensor:
        """The change of the T images' outputs ``[T, C]`` when the images ``removed`` are left out and the
        objective (same λ, mean over the N − s others) is solved again."""
        if not removed:
            raise ValueError("`removed` is empty: nothing is left out.")
        return self.effects[removed].sum(0) / (len(self.effects) - len(removed))


@dataclass
class RandomFeatures:
    """The training images' random features ``train [N, C, k]`` (float64) and the ``seed`` that drew R."""

    train: Tensor
    seed: int

    def save(self, path: str | Path, key: str) -> None:
        """Write them atomically as safetensors, with ``key`` (a digest of what they were computed from)."""
        save_keyed_tensors(path, {"train": self.train}, key, seed=str(self.seed))

    @classmethod
    def load(cls, path: str | Path, key: str) -> "RandomFeatures | None":
        """The features saved at ``path`` if they were computed from ``key``; None if absent, stale or unreadable."""
        saved = load_keyed_tensors(path, key, ("train",))
        return None if saved is None or "seed" not in saved[1] else cls(saved[0]["train"], int(saved[1]["seed"]))


def training_images(model: LQFModel) -> tuple:
    """The images ``model`` was solved on, rebuilt from its card's record, checked against its fingerprint,
    less any it forgot: ``(raw dataset, transformed dataset)``, aligned with ``Explainer``'s indices."""
    from ..data import load_image_dataset, sample_shots, split_validation, with_transform
    from ..training.cache import content_digests, digests_fingerprint

    summary = model.training_summary or {}
    source = summary.get("train_data")
    if summary.get("method") != "solve" or not source:
        raise CheckpointError("This model has no record of the images it was solved on (it was not made by "
                              "`lqf-hub train` with --method solve); build lqf_hub.analysis.explain.Explainer from its training "
                              "set instead.")
    try:
        raw = load_image_dataset(source["dataset"], source["split"], image_column=source.get("image_column"),
                                 label_column=source.get("label_column"))
    except (OSError, ValueError) as err:
        raise DataUnreachable(f"The training images ({source['dataset']}, {source['split']}) are not reachable: "
                              f"{err}") from err
    if source.get("val_fraction"):
        raw = split_validation(raw, source["val_fraction"], seed=source["seed"])[0]
    if source.get("shots"):
        raw = sample_shots(raw, source["shots"], seed=source["seed"])
    images = with_transform(raw, model.data_config)
    if digests_fingerprint(content_digests(images)) != source.get("fingerprint"):
        raise CheckpointError(f"The training images rebuilt from {source['dataset']} ({source['split']}) are not the "
                              "ones the model was solved on (another dataset version or preprocessing); nothing was "
                              "computed.")
    forgotten = set(summary.get("forgotten", {}).get("removed", []))
    if forgotten:
        raw = raw.select([i for i in range(len(raw)) if i not in forgotten])
        images = with_transform(raw, model.data_config)
    return raw, images


TRUNK_FILE = "training_trunk.safetensors"


def model_digest(model: LQFModel) -> str:
    """sha256 hex of everything a model's predictions depend on: its config and every tensor of its checkpoint
    (w0, head, δ). What kept results computed from the model (a training set's ranking) are checked against."""
    state = {f"{part}/{name}": tensor for part, tensors in model.checkpoint_state().items()
             for name, tensor in tensors.items()}
    return hashlib.sha256((backbone_sha256(state) + json.dumps(model.config.to_dict(), sort_keys=True,
                                                               default=str)).encode()).hexdigest()


def training_trunk(model: LQFModel, directory: str | Path, *, progress: bool = False) -> tuple:
    """The trunk outputs of the images ``model`` was solved on, kept in ``directory`` (``TRUNK_FILE``):
    ``(raw dataset or None, TrunkCache)`` for ``Explainer.from_model``. Computed from
    ``training_images`` and kept, or read back while the model is the one they were computed for. Where
    the images are not reachable, the kept outputs still give every score, by training index, and the raw
    dataset is None (no pictures); with none kept, ``DataUnreachable`` says so."""
    summary = model.training_summary or {}
    digest = hashlib.sha256(backbone_sha256(model.checkpoint_state()["base"]).encode())
    config = {k: v for k, v in model.config.to_dict().items() if k != "ridge"}
    stored = [summary["cache_dtype"]] if summary.get("cache_dtype", "float32") != "float32" else []  # older keys hold
    digest.update(json.dumps([config, summary.get("train_data"), summary.get("forgotten"), *stored], sort_keys=True,
                             default=str).encode())
    path, key = Path(directory) / TRUNK_FILE, digest.hexdigest()
    try:
        raw, images = training_images(model)
    except DataUnreachable as err:
        kept = TrunkCache.load(path, key)
        if kept is None:
            raise DataUnreachable(f"{err}. Nor are their trunk outputs kept in {directory} (an explain of this model "
                                  "into that directory where they were reachable keeps them); nothing was computed.") from err
        warnings.warn(f"{err}. Using their trunk outputs kept in {path}: scores by training index, no pictures.")
        return None, kept
    kept = TrunkCache.load(path, key)
    if kept is None:
        kept = trunk_outputs(model, images, progress=progress)
        Path(directory).mkdir(parents=True, exist_ok=True)
        kept.save(path, key)
    return raw, kept


RANKING_FILE = "training_set.json"


def save_ranking(directory: str | Path, model: LQFModel, kernel: str, rows: list[dict]) -> Path:
    """Keep a training set's ranking (``Explainer.disputed_labels``) in ``directory/RANKING_FILE``, atomically,
    with the ``kernel`` it came from and the model's digest."""
    path = Path(directory) / RANKING_FILE
    atomic_write_text(path, json.dumps({"model": model_digest(model), "kernel": kernel, "ranking": rows}, indent=2))
    return path


def load_ranking(directory: str | Path, model: LQFModel) -> tuple[str, list[dict]] | None:
    """``(kernel, rows)`` of the ranking kept in ``directory`` for this very model; None if absent, unreadable or
    another model's."""
    try:
        record = json.loads((Path(directory) / RANKING_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("model") != model_digest(model):
        return None
    return record.get("kernel", "unknown"), record.get("ranking", [])


class Explainer:
    """Splits an LQF model's predictions over the training images it was solved on.

    ``data`` and ``metric`` are the objective's data term (over those images, in one process) and its prior
    (``Objective.of_solved_model`` rebuilds both); ``ridge`` is the model's λ.
    """

    def __init__(self, model: LQFModel, data: DataTerm, metric: PriorMetric, ridge: float) -> None:
        if not ridge > 0:
            raise ValueError(f"Attribution needs the model's λ > 0, got {ridge}.")
        self.model, self.data, self.metric, self.ridge = model, data, metric, ridge
        self.fitted = data.outputs(data.flat.flatten(dict(model.linearized_parameters)))  # f_lin(x_i) [N, C]
        self.residuals = self._targets().to(self.fitted.dtype) - self.fitted  # r_i [N, C]

    @classmethod
    def from_model(cls, model: LQFModel, images) -> "Explainer":
        """The explainer of a solved checkpoint over its training ``images`` (``training_images``, or their
        trunk outputs: ``training_trunk``), with the objective rebuilt from the settings its card records."""
        data, metric = Objective.of_solved_model(model, trunk_outputs(model, images))
        return cls(model, data, metric, model.config.ridge)

    def explain(self, trunk_output: Tensor, *, features: RandomFeatures | None = None,
                only_predicted: bool = False) -> Explanation:
        """The split of one image's prediction: ``trunk_output [1, ...]`` (``model.encode_trunk`` of the image).
        Exact by default (C backward passes, C forward-mode passes over the training images); with the
        training images' ``features`` (``random_features``) the kernel is estimated from them instead, at
        the cost of k forward-mode passes of this one image, and ``Explanation.gap`` shows the estimate's
        error in the sum. ``only_predicted``: the split of the predicted class only (one pass over the training
        images, not C; the other columns of the contributions are NaN)."""
        data, classes = self.data, self.model.num_classes
        with torch.no_grad():
            output = self.model(trunk_output=trunk_output)[0]
        wanted = [int(output.argmax())] if only_predicted else list(range(classes))
        if features is None:
            base, _, rows = self._jacobian_rows(trunk_output)
            kernel = torch.full((data.count, classes, classes), math.nan, dtype=data.f0.dtype, device=data.f0.device)
            for c in wanted:
                kernel[..., c] = data.outputs(rows[c]) - data.f0  # J_i M⁻¹ J(x)ᵀ e_c: [N, C]
        else:
            base = self.model.base_forward(trunk_output=trunk_output)[0]  # f0(x)
            own = self._projected(trunk_output, base[None], features.train.shape[-1], features.seed)[0]  # [C, k]
            kernel = torch.einsum("nkj,cj->nkc", features.train, own)
            kernel[..., [c for c in range(classes) if c not in wanted]] = math.nan
        contributions = torch.einsum("nkc,nk->nc", kernel.to(self.residuals.dtype), self.residuals)
        return Explanation(base, output, contributions / (data.count * self.ridge))

    def random_features(self, projections: int, *, seed: int = 0, progress: bool = False,
                        cache_dir: str | Path | None = None) -> RandomFeatures:
        """The training images' random features ``Φ_i = J_i M^(-1/2) R`` ``[N, C, k]`` with ``R [P, k]`` Gaussian
        / √k drawn from ``seed``: ``Φ Φᵀ`` estimates the kernel ``J M⁻¹ Jᵀ`` without bias, with an error that
        shrinks as 1/√k. k forward-mode passes over the training images, once per model: any image's features
        come from the same R (``explain``). With ``cache_dir`` they are kept there
        (``random_features_{k}.safetensors``) and read back while w0, the tail, the training images' trunk
        outputs, the prior, k and the seed are those they were computed from (not δ or λ: they do not enter)."""
        if projections < 1:
            raise ValueError(f"`projections` must be >= 1, got {projections}.")
        path = None if cache_dir is None else Path(cache_dir) / f"random_features_{projections}.safetensors"
        key = None if path is None else self._features_key(projections, seed)
        features = None if path is None else RandomFeatures.load(path, key)
        if features is None:
            features = RandomFeatures(self._projected(self.data.z, self.data.f0, projections, seed, progress), seed)
            if path is not None:
                features.save(path, key)
        return features

    def removal_effects(self, trunk_outputs: Tensor, *, tolerance: float = 1e-6) -> RemovalEffects:
        """First-order effects of removing each training image on the outputs of ``trunk_outputs [T, ...]``:
        C solves with the Hessian (conjugate gradients to ``tolerance``) and C forward-mode passes over the
        training images per image."""
        data, metric = self.data, self.metric
        delta = data.flat.flatten(dict(self.model.linearized_parameters))
        prior_pull = self.ridge * metric.power(delta, -1.0)  # λMδ*: what every training image shares
        effects = []
        for z in trunk_outputs.split(1):
            gradients = self._jacobian_rows(z)[1]  # J(x) [C, P]
            per_class = []
            for gradient in gradients:
                u = inverse_hessian_product(data, metric, self.ridge, gradient, tolerance=tolerance)  # H⁻¹J(x)ᵀe_c
                along = ((data.outputs(u) - data.f0) * self.residuals).sum(-1)  # (J_j u)·r_j  [N]
                per_class.append(torch.dot(u, prior_pull) - along)
            effects.append(torch.stack(per_class, dim=-1))  # [N, C]
        return RemovalEffects(torch.stack(effects, dim=1))

    def self_influence(self) -> Tensor:
        """Every training image's share of its own prediction, ``c_i(x_i)`` ``[N, C]``: its own C backward
        passes. ``f_lin(x_i) − c_i(x_i)`` is what the others predict for it to first order; ``leave_one_out``
        gives that exactly."""
        shares = []
        for z, residual in zip(self.data.z.split(1), self.residuals):
            _, gradients, rows = self._jacobian_rows(z)
            shares.append((gradients @ rows.T) @ residual)  # (J_i M⁻¹ J_iᵀ)ᵀ r_i, the kernel block is symmetric
        return torch.stack(shares) / (self.data.count * self.ridge)

    def training_kernel(self, features: RandomFeatures | None = None, *, progress: bool = False) -> Tensor:
        """``K = J M⁻¹ Jᵀ`` between the training images, ``[N, C, N, C]`` (float64): exact (N·C backward passes
        of one image and N·C forward-mode passes over the training set), or ``Φ Φᵀ`` from the training images'
        random ``features`` (``random_features``: k passes)."""
        data, n, classes = self.data, self.data.count, self.model.num_classes
        if features is not None:
            return torch.einsum("ick,jdk->icjd", features.train, features.train)
        columns = []
        for z in tqdm(data.z.split(1), desc="kernel", disable=not progress):
            columns.extend(data.outputs(row) - data.f0 for row in self._jacobian_rows(z)[2])
        return torch.stack(columns, dim=-1).double().reshape(n, classes, n, classes)

    def leave_one_out(self, kernel: Tensor | RandomFeatures) -> Tensor:
        """What the optimum without each training image predicts for it, ``f₋ᵢ(x_i)`` ``[N, C]`` (float64):
        ``α y_i − (I − A_ii)⁻¹ r_i`` with the hat matrix ``A = K(K + NλI)⁻¹``. Exact for the objective without
        image i and the same total penalty Nλ/2·δᵀMδ. From the dense ``kernel [N, C, N, C]``
        (``training_kernel``: O((N·C)²) memory), or from random features ``Φ`` without forming it:
        ``A_ii = Φ_i (ΦᵀΦ + NλI)⁻¹ Φ_iᵀ``, O(N·C·k) memory — for large training sets."""
        n, classes = self.residuals.shape
        shift = n * self.ridge
        if isinstance(kernel, RandomFeatures):
            phi = kernel.train.reshape(n * classes, -1)  # [N·C, k]
            gram = phi.T @ phi + shift * torch.eye(phi.shape[1], dtype=phi.dtype, device=phi.device)
            weighted = torch.linalg.solve(gram, phi.T).T.reshape(n, classes, -1)  # Φ_i (ΦᵀΦ + NλI)⁻¹
            blocks = torch.einsum("nck,ndk->ncd", weighted, kernel.train)  # A_ii [N, C, C]
        else:
            flat = kernel.reshape(n * classes, n * classes)
            shifted = flat + shift * torch.eye(n * classes, dtype=flat.dtype, device=flat.device)
            hat = torch.linalg.solve(shifted, flat).reshape(n, classes, n, classes)  # (K + NλI)⁻¹K = A: they commute
            own = torch.arange(n)
            blocks = hat[own, :, own, :]
        eye = torch.eye(classes, dtype=blocks.dtype, device=blocks.device)
        residuals = torch.linalg.solve(eye - blocks, self.residuals.double().unsqueeze(-1))[..., 0]
        if isinstance(kernel, RandomFeatures):
            _warn_if_saturated(float(blocks.diagonal(dim1=-2, dim2=-1).sum()), kernel.train.shape[-1])
        return self._targets().double() - residuals

    def label_margins(self, without: Tensor) -> Tensor:
        """How much the optimum without each training image favours the image's own label ``[N]``: from
        ``without [N, C]`` (``leave_one_out``), the output for the label minus the largest other output.
        The lowest are the images the rest of the data argues against: the likeliest mislabelled."""
        labels = self.data.labels[:, None]
        own = without.gather(1, labels)[:, 0]
        rest = without.scatter(1, labels, float("-inf")).max(1).values
        return own - rest

    def disputed_labels(self, features: RandomFeatures | None = None, *, progress: bool = False) -> list[dict]:
        """Every training image ranked by its leave-one-out label margin, lowest (most disputed) first: its index,
        label, what the optimum without it predicts, the margin and its loss at the optimum. From the exact
        kernel (``training_kernel``: N·C passes) or the training images' random ``features``."""
        names, labels = self.model.config.id2label, self.data.labels
        without = self.leave_one_out(self.training_kernel(progress=progress) if features is None else features)
        margins = self.label_margins(without)
        return [{"train_index": i, "label": names[int(labels[i])], "others_predict": names[int(without[i].argmax())],
                 "margin": float(margins[i]), "loss": 0.5 * float(self.residuals[i].double().square().sum())}
                for i in margins.argsort().tolist()]

    def _features_key(self, projections: int, seed: int) -> str:
        """A digest of everything the random features depend on."""
        digest = hashlib.sha256()
        config = {k: v for k, v in self.model.config.to_dict().items() if k != "ridge"}
        digest.update(json.dumps([config, self.metric.kind, projections, seed], sort_keys=True, default=str).encode())
        prior = {} if self.metric.kfac is None else self.metric.kfac.state_dict()
        tensors = [*sorted(self.model.linearization_point.items()), ("z", self.data.z), *sorted(prior.items())]
        for name, tensor in tensors:
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def _targets(self) -> Tensor:
        """``α y_i`` ``[N, C]``."""
        return self.model.config.target_scale * torch.nn.functional.one_hot(self.data.labels, self.model.num_classes)

    @torch.no_grad()
    def _projected(self, trunk_outputs: Tensor, base: Tensor, projections: int, seed: int,
                   progress: bool = False) -> Tensor:
        """``J(x) M^(-1/2) R`` ``[n, C, k]`` (float64) for ``trunk_outputs [n, ...]`` with ``f0 = base [n, C]``;
        R's columns are drawn one at a time from ``seed``, so any images get the same R."""
        flat, model = self.data.flat, self.model
        generator = torch.Generator(device=flat.device).manual_seed(seed)
        columns = []
        for _ in tqdm(range(projections), desc="random features", disable=not progress):
            direction = torch.randn(sum(flat.sizes), generator=generator, device=flat.device, dtype=flat.dtype)
            deltas = flat.unflatten(self.metric.power(direction / math.sqrt(projections), 0.5))
            columns.append(torch.cat([linearized(model.tail_function(z), model.linearization_point, deltas)
                                      for z in trunk_outputs.split(self.data.batch_size)]) - base)
        return torch.stack(columns, dim=-1).double()

    def _jacobian_rows(self, trunk_output: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For one image: ``f0(x) [C]``, the rows of its Jacobian ``J(x) [C, P]`` and ``(M⁻¹ J(x)ᵀ)ᵀ [C, P]``
        (C backward passes)."""
        model, flat = self.model, self.data.flat
        zero = {n: t.requires_grad_() for n, t in flat.unflatten(flat.zeros()).items()}
        base = linearized(model.tail_function(trunk_output), model.linearization_point, zero)[0]
        gradients = []
        for c in range(model.num_classes):
            grads = torch.autograd.grad(base[c], list(zero.values()), retain_graph=c + 1 < model.num_classes,
                                        allow_unused=True)
            gradients.append(torch.cat([(g if g is not None else torch.zeros_like(t)).reshape(-1)
                                        for g, t in zip(grads, zero.values())]))
        gradients = torch.stack(gradients)
        rows = torch.stack([self.metric.power(g, 1.0) for g in gradients])
        return base.detach(), gradients, rows


def _warn_if_saturated(dof: float, projections: int) -> None:
    """Leave-one-out from k random features is that of a ridge regression on them, whose effective degrees of
    freedom ``tr A`` cannot exceed k. Near k, the features fit every direction they span and cannot show how
    much more the model itself fits: each image's own weight ``A_ii`` is underestimated."""
    if dof > projections / 2:
        warnings.warn(f"The {projections} random projections are saturated: the model on them has {dof:.0f} "
                      f"effective degrees of freedom of at most {projections}, so each image's own weight is "
                      "underestimated and the leave-one-out predictions lean towards the fitted ones. Use more "
                      "projections (until this number stays well under half of them) or the exact kernel.")


def plot_explanation(image, row: dict, train_images: list, path) -> None:
    """One explanation as a PNG (written atomically): the image and its prediction, then the training images
    of ``row["supporting"]`` (top row) and ``row["opposing"]`` (bottom row) with their labels and contributions.
    ``train_images``: those training images (PIL images or arrays; None where not reachable), supporting first."""
    columns = max(len(row["supporting"]), len(row["opposing"]), 1) + 1
    fig, axes = subplots(2, columns, figsize=(1.8 * columns, 4.9), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    axes[0, 0].imshow(image)
    axes[0, 0].set_title(f"predicted\n{row['predicted']}", fontsize=9)
    axes[1, 0].text(0.0, 0.5, f"output {row['output']:.2f}\n= base {row['base']:.2f}\n+ Σ training images\n"
                    f"(unexplained {row['unexplained']:.1e})", fontsize=8, va="center")
    shown = iter(train_images)
    for line, kind in enumerate(("supporting", "opposing")):
        for column, item in enumerate(row[kind], start=1):
            _show(axes[line, column], next(shown))
            axes[line, column].set_title(f"#{item['train_index']} {item['label']}\n{item['contribution']:+.3f}",
                                         fontsize=8, color="C2" if kind == "supporting" else "C3")
    fig.suptitle("training images that most raise (top) and lower (bottom) the predicted class's output", fontsize=9)
    save_png(fig, path)


def plot_suspects(rows: list[dict], images: list, path) -> None:
    """The training images the rest of the data argues against most, as a PNG (written atomically): each with
    its label, what the optimum without it predicts, and its leave-one-out label margin. ``rows``: the
    ranking's first entries (``train_index``, ``label``, ``others_predict``, ``margin``); ``images``: theirs
    (None where not reachable)."""
    columns = min(len(rows), 8) or 1
    lines = max(1, math.ceil(len(rows) / columns))
    fig, axes = subplots(lines, columns, figsize=(1.8 * columns, 2.6 * lines + 0.4), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, row, image in zip(axes.flat, rows, images):
        _show(axis, image)
        axis.set_title(f"#{row['train_index']} {row['label']}\nothers: {row['others_predict']}\n"
                       f"margin {row['margin']:+.2f}", fontsize=8, color="C3" if row["margin"] < 0 else "C0")
    fig.suptitle("training images the rest argues against (leave-one-out label margin, lowest first)", fontsize=9)
    save_png(fig, path)


def _show(axis, image) -> None:
    """A training image (PIL image or array) in ``axis``, or a note where it is not reachable."""
    if image is None:
        axis.text(0.5, 0.5, "image not\nreachable", ha="center", va="center", fontsize=8, color="0.4")
    else:
        axis.imshow(np.asarray(image), cmap="gray")
