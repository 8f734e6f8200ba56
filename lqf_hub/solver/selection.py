"""The solver's run: the prior and λ chosen by K-fold cross-validation over the training images on Krylov
paths, the priors raced, then the certified optimum.

1. The training images are dealt into K folds, stratified by class and by the hash of the seed and each
   image's content (so the folds are a function of the set of images, not of their order). For each fold and
   each prior, one Lanczos run on the other folds gives the optimum for every λ of the grid
   (``solve.KrylovPath``; LQF-head in closed form, ``solve.HeadPath``), and each is scored on the fold's images
   by the objective's own loss — α²/2 times the Brier score of ``f/α``, a proper scoring rule — and by its
   errors: every image is scored once, by models that never saw it.
2. **The race.** After each fold, a prior whose best mean loss is worse than the leader's by more than
   ``RACE_THRESHOLD`` standard errors of the paired per-image difference runs no more folds (racing, Maron &
   Moore 1994; the F-race of Birattari et al. 2002): it can no longer be chosen, and its paths are the most
   expensive part of the choice (the isotropic prior's run unpreconditioned: 28 products on the default job's
   first fold against the K-FAC prior's 7). Its path keeps the folds it ran, marked in ``path.png``.
3. **The rule.** On each path λ is the largest within one standard error of the path's lowest mean loss
   (Breiman et al. 1984; Hastie, Tibshirani & Friedman, ESL §7.10; glmnet's ``lambda.1se``): the most
   regularised model the images cannot tell from the best, also the fastest to certify. The prior is the one
   whose path reaches the lowest loss; priors within one paired standard error of it are told apart by the
   out-of-fold errors at their λ — what users judge decides where the loss cannot.
4. Refit on all training images with that prior and λ by conjugate gradients until the certificate holds
   (``solve.solve``), from the mean of the folds' optima at that prior and λ (LQF-head: its closed form).
5. **Large N** (from ``folds × HOLDOUT_IMAGES`` images): K folds would cost about K paths over all the data.
   The prior is chosen by steps 1–3 on a stratified sample of about ``HOLDOUT_IMAGES`` images (a cost that does
   not grow with N); then its path alone is fit on all images but another stratified part of that size and
   scored on it, for λ. The refit starts from that path's optimum. (Every surviving prior's path at full N
   was tried first: on all of Fashion-MNIST the race on 2000 images kept K-FAC and the isotropic prior, whose
   unpreconditioned path took 166 products in the sample's 5 folds against K-FAC's 60
   — ``benchmarks/results/scale/runs.jsonl`` — and would have run again over the 58 000 images.)

Products with the data cannot be shared between folds: a subspace grown from every fold's residuals — with
each fold's own residual below 3e-2 — scored its held-out images at 100% accuracy on the default task, where
honest folds reach 85.6% (the subspace had fit the held-out labels; ``benchmarks/results/solver_cost.md``).
With the K-FAC prior, M is built from the data term's own curvature, so λ is on the same scale for every
backbone and dataset (λ = 1: the prior weighs as much as the data).
"""

import hashlib
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..plotting import save_png, subplots
from .solve import DataTerm, HeadPath, KrylovPath, PriorMetric

PATH_TOLERANCE = {"kfac": 6e-2, "isotropic": 3e-2}
"""Per prior, the relative gradient norm of the path's solutions at the grid's smallest λ where its Lanczos run
stops: scoring needs their predictions, not a certificate, and what must be accurate is the scores, not the
residual. On the validation suite (14 draws: Lite0 on five tasks at 20 and 100 shots, Lite1 on four at 100; every
fold's path run once to 1e-2 and cut where each tolerance would have stopped it:
``benchmarks/results/defaults/tolerance.md``) the isotropic prior's scored points were up to 1.40 standard errors of
the cross-validated loss from the reference's at 3e-2, and 5.57 at 6e-2 (3 of 14 choices changed). The K-FAC
prior's path, which runs in its own metric, settles sooner: 0.42 at 6e-2 (no choice changed; its folds took 35
products instead of 50 on the default job), 1.61 at 1e-1. So each stops at the loosest tolerance tested whose
scores stay within the isotropic prior's accuracy at 3e-2."""


RACE_THRESHOLD = 3.0
"""A candidate prior is dropped after a fold once its best mean loss exceeds the leader's best by this many
standard errors of the paired per-image difference (over the images scored so far, the same for both)."""


HOLDOUT_IMAGES = 2000
"""From ``folds ×`` this many training images on, λ is chosen on one stratified held-out part of about this size
(and the prior on a sample of this size), not by K folds: K folds would score every image, but each fold's path
costs a pass per product over (K − 1)/K of the data, so the choice would cost about K paths over all of it. One
part of 2000 images costs one path, and its standard errors stay small: that of an accuracy at most ½/√2000 =
1.1 points, and the 1-SE rule widens its margin by that of the loss (so fewer images mean a more regularised λ,
not a noisier one). At 5 folds the switch comes at 10 000 images, where a fold is 2000 images anyway."""


@dataclass
class PathPoint:
    """One λ of the regularisation path, scored by cross-validation over the training images."""

    ridge: float
    validation_accuracy: float  # of every image's prediction by the fold model that did not see it
    validation_loss: float  # mean ½‖f_lin(x_i) − α y_i‖² over those predictions
    standard_error: float  # of the mean validation loss (per-image spread / √N)
    residual: float  # the paths' largest estimated relative gradient norm at this λ (on the images they fit)
    images: int = 0  # how many images were scored: all of them, or fewer for a prior dropped by the race
    validation_balanced_accuracy: float = math.nan  # the mean over classes of each class's accuracy


@dataclass
class Selection:
    prior: str  # the chosen prior's kind ("kfac", "isotropic" or "head")
    ridge: float
    paths: dict[str, list[PathPoint]]  # every prior's path, by kind
    iterations: int  # products with G spent on the paths
    products: dict[str, int] = field(default_factory=dict)  # of them, by prior
    dropped: dict[str, int] = field(default_factory=dict)  # prior -> folds it ran before the race (or the sample) dropped it
    warm_start: Tensor | None = field(default=None, repr=False)  # mean of the folds' δ at the choice [P]
    passes: float = 0.0  # the paths' products in passes over all the training images (a fold's fit: (K − 1)/K)
    scheme: str = ""  # how the images were split, in words (for the card)
    out_of_fold: tuple[Tensor, Tensor] | None = field(default=None, repr=False)  # at the choice: outputs [n, C], labels [n]

    @property
    def points(self) -> list[PathPoint]:
        """The chosen prior's path."""
        return self.paths[self.prior]

    def to_dict(self) -> dict:
        return {"prior": self.prior, "ridge": self.ridge, "iterations": self.iterations, "products": self.products,
                "dropped": self.dropped, "passes": self.passes, "scheme": self.scheme,
                "paths": {kind: [asdict(p) for p in points] for kind, points in self.paths.items()}}


def check_classes(labels: Tensor) -> None:
    """Refuse labels ``[N]`` on which cross-validation can score nothing, warn where it scores some images blind.

    A class with one training image is missing from the fit of the fold that holds that image out: the image is
    scored by a model that never saw its class, which pulls the choice towards the largest λ. With every class so
    (one image per class) nothing can be scored, and the prior and λ must be fixed instead."""
    counts = torch.bincount(labels)
    single = int((counts == 1).sum())
    if single and not bool((counts >= 2).any()):
        raise ValueError("Every class has one training image: cross-validation would score each by a model that never "
                         "saw its class, so it cannot choose the prior or λ. Fix them (prior='isotropic' and one value in "
                         "`ridge_grid`; CLI: --prior isotropic --ridge-grid 300, what it chose at 2 images per class), "
                         "choose them by the evidence, which holds no image out (select='evidence'; CLI: --select "
                         "evidence), or give every class at least 2 images.")
    if single:
        warnings.warn(f"{single} class{'es have' if single > 1 else ' has'} one training image: cross-validation "
                      "scores it by a model that never saw its class, which pulls λ up. Give every class at least 2 "
                      "images, or fix the prior and λ.", stacklevel=3)


def choose(paths: dict[str, list[PathPoint]], tied: Iterable[str] = ()) -> tuple[str, float]:
    """The rule. On each path λ is the largest within one standard error of the path's lowest mean loss. The
    prior is the one whose path reaches the lowest loss — unless ``tied`` names priors whose best loss the
    images cannot tell from it (within one paired standard error): then, among those, the one whose chosen
    λ makes the fewest out-of-fold errors (the loss ranks them first; where it cannot, what users judge
    decides). Returns (prior, λ)."""
    def ridge_of(kind: str) -> float:
        best = min(paths[kind], key=lambda p: p.validation_loss)
        return max(p.ridge for p in paths[kind] if p.validation_loss <= best.validation_loss + best.standard_error)

    leader = min(paths, key=lambda kind: min(p.validation_loss for p in paths[kind]))
    contenders = [leader, *(kind for kind in tied if kind in paths and kind != leader)]
    accuracy = {kind: next(p.validation_accuracy for p in paths[kind] if p.ridge == ridge_of(kind)) for kind in contenders}
    prior = max(contenders, key=lambda kind: accuracy[kind])  # max keeps the first (the leader) on a tie
    return prior, ridge_of(prior)


def stratified_folds(labels: Tensor, keys: Tensor, folds: int, seed: int) -> Tensor:
    """The fold ``[N]`` (0..folds−1) of every item: each class dealt round the folds, the deal continuing
    from class to class so that the folds differ in size by at most one.

    ``keys [N, k]`` (uint8) identify the items (the cache's content digests): the order of the deal is the
    hash of the seed and the key, so the folds are a function of the set of images, not of their order.
    """
    assignment = torch.empty(len(labels), dtype=torch.long)
    position = 0
    for label in labels.unique(sorted=True):
        members = (labels == label).nonzero().flatten().tolist()
        members.sort(key=lambda i: hashlib.sha256(seed.to_bytes(8, "little", signed=True) + keys[i].numpy().tobytes()).digest())
        for member in members:
            assignment[member] = position % folds
            position += 1
    return assignment


class _Scores:
    """Running sums over the scored images for every (prior, λ) ``column``: losses, their cross products (for
    paired differences between any two columns), correct predictions, the paths' residuals, and the fold
    solutions (the refit's warm start)."""

    def __init__(self, columns: list[tuple[str, float]]) -> None:
        self.columns = columns
        self.index = {column: i for i, column in enumerate(columns)}
        size = len(columns)
        self.loss, self.correct = torch.zeros(size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64)
        self.cross = torch.zeros(size, size, dtype=torch.float64)  # Σ_i l_ia l_ib
        self.images = torch.zeros(size, dtype=torch.long)
        self.class_correct: Tensor | None = None  # [columns, C]
        self.class_images: Tensor | None = None  # [columns, C]
        self.residual = torch.zeros(size, dtype=torch.float64)
        self.solutions: dict[tuple[str, float], Tensor] = {}
        self.out_of_fold: dict[tuple[str, float], list[tuple[Tensor, Tensor]]] = {}  # (outputs [n, C], labels [n])

    def add_fold(self, held: DataTerm, paths: dict, ridges: list[float]) -> None:
        """Score ``paths`` (kind -> path) on the held-out images at every λ of ``ridges``."""
        columns = [(kind, r) for kind in paths for r in ridges]
        losses, correct = [], []
        labels = held.gather(held.labels).cpu()
        for kind, ridge in columns:
            delta = paths[kind].solution(ridge)
            outputs = held.outputs(delta)
            sample_losses, sample_correct = held.scores_of(outputs)
            self.out_of_fold.setdefault((kind, ridge), []).append((held.gather(outputs.double()).cpu(), labels))
            losses.append(sample_losses)
            correct.append(sample_correct.double())
            self.residual[self.index[kind, ridge]] = max(float(self.residual[self.index[kind, ridge]]),
                                                         paths[kind].residual(ridge))
            self.solutions[kind, ridge] = delta + self.solutions.get((kind, ridge), 0)
        rows = torch.tensor([self.index[c] for c in columns])
        matrix, hits = torch.stack(losses, 1), torch.stack(correct, 1)  # [n, columns] on this shard
        classes = F.one_hot(held.labels, held.model.num_classes).to(hits)  # [n, C]
        local = torch.cat([matrix.sum(0), hits.sum(0), (matrix.T @ matrix).flatten(), (hits.T @ classes).flatten(),
                           classes.sum(0)])
        total = held.reduce_sum(local.to(held.f0.device)).cpu().double()
        size, count = len(columns), classes.shape[1]
        self.loss[rows] += total[:size]
        self.correct[rows] += total[size:2 * size]
        self.cross[rows[:, None], rows[None, :]] += total[2 * size:2 * size + size * size].reshape(size, size)
        if self.class_correct is None:
            self.class_correct = torch.zeros(len(self.columns), count, dtype=torch.float64)
            self.class_images = torch.zeros(len(self.columns), count, dtype=torch.float64)
        self.class_correct[rows] += total[2 * size + size * size:-count].reshape(size, count)
        self.class_images[rows] += total[-count:]
        self.images[rows] += held.count

    def predictions(self, column: tuple[str, float]) -> tuple[Tensor, Tensor]:
        """Every scored image's out-of-fold outputs ``[n, C]`` (float64) and labels ``[n]`` at ``column``."""
        outputs, labels = zip(*self.out_of_fold[column])
        return torch.cat(outputs), torch.cat(labels)

    def best(self, kind: str, ridges: list[float]) -> tuple[str, float]:
        """The column of ``kind``'s lowest mean loss."""
        return min(((kind, r) for r in ridges), key=lambda c: float(self.loss[self.index[c]]))

    def paired_z(self, a: tuple[str, float], b: tuple[str, float]) -> float:
        """Mean of ``loss_a − loss_b`` over the images both were scored on, in standard errors."""
        i, j = self.index[a], self.index[b]
        n = int(self.images[i])
        mean = float(self.loss[i] - self.loss[j]) / n
        squares = float(self.cross[i, i] - 2 * self.cross[i, j] + self.cross[j, j])
        error = _standard_error(mean * n, squares, n)
        return math.inf if error == 0 and mean > 0 else 0.0 if error == 0 else mean / error

    def points(self, kind: str, ridges: list[float]) -> list[PathPoint]:
        points = []
        for ridge in ridges:
            i = self.index[kind, ridge]
            n = int(self.images[i])
            present = self.class_images[i] > 0
            balanced = float((self.class_correct[i][present] / self.class_images[i][present]).mean())
            points.append(PathPoint(ridge, float(self.correct[i]) / n, float(self.loss[i]) / n,
                                    _standard_error(float(self.loss[i]), float(self.cross[i, i]), n),
                                    float(self.residual[i]), n, balanced))
        return points


def select(
    make_data: Callable[[Tensor], DataTerm], labels: Tensor, keys: Tensor, metrics: list[PriorMetric],
    ridges: list[float], *, folds: int, seed: int, max_iterations: int, progress: bool, race: bool = True,
    holdout_images: int | None = None,
) -> Selection:
    """Choose the prior among ``metrics`` and λ among ``ridges``: ``make_data(indices) -> DataTerm`` over those
    images; ``keys`` identify the images (see ``stratified_folds``).

    Up to ``folds × holdout_images`` images, by ``folds``-fold cross-validation (at most one fold per image);
    with ``race``, a prior whose best loss is worse than the leader's by more than ``RACE_THRESHOLD`` paired
    standard errors after a fold runs no more folds (racing, Maron & Moore 1994). Beyond, the prior is chosen so
    on a stratified sample of about ``holdout_images`` images (default ``HOLDOUT_IMAGES``), and λ on one
    stratified held-out part of that size by that prior's path on the other images."""
    if len(labels) < 2:
        raise ValueError("Choosing λ or the prior needs at least 2 training images; pass one value in "
                         "`ridge_grid` and prior='kfac' or 'isotropic' instead.")
    ridges = sorted(ridges, reverse=True)
    holdout_images = holdout_images or HOLDOUT_IMAGES
    if len(labels) >= folds * holdout_images:
        return _select_on_held_out_part(make_data, labels, keys, metrics, ridges, folds=folds, seed=seed,
                                        max_iterations=max_iterations, progress=progress, race=race,
                                        holdout_images=holdout_images)
    folds = min(folds, len(labels))
    found = _race(make_data, labels, keys, metrics, ridges, folds=folds, seed=seed,
                  max_iterations=max_iterations, progress=progress, race=race)
    prior, ridge = found.choice()
    return Selection(prior, ridge, {m.kind: found.scores.points(m.kind, ridges) for m in metrics},
                     sum(found.products.values()), found.products, found.dropped,
                     found.scores.solutions[prior, ridge] / folds, passes=found.image_products / len(labels),
                     scheme=f"{folds}-fold cross-validation over the training images",
                     out_of_fold=found.scores.predictions((prior, ridge)))


def _select_on_held_out_part(
    make_data: Callable[[Tensor], DataTerm], labels: Tensor, keys: Tensor, metrics: list[PriorMetric],
    ridges: list[float], *, folds: int, seed: int, max_iterations: int, progress: bool, race: bool,
    holdout_images: int,
) -> Selection:
    """Large N: the images dealt into parts of about ``holdout_images`` (stratified, as folds). Part 0 is held
    out. With several priors, the prior is chosen first by ``folds``-fold cross-validation, raced, on part 1 —
    the rule of the small-N choice on a sample of fixed size, so its cost does not grow with N — and only its
    path is then fit on every image but part 0 and scored on it, for λ (which depends on N: the prior's weight
    against the data's)."""
    parts = stratified_folds(labels, keys, len(labels) // holdout_images, seed)
    held_rows, fit_rows = (parts == 0).nonzero().flatten(), (parts != 0).nonzero().flatten()
    running, race_paths, dropped, products, image_products = metrics, {}, {}, {}, 0
    sampled = ""
    if race and len(metrics) > 1:
        sample = (parts == 1).nonzero().flatten()
        raced = _race(lambda rows: make_data(sample[rows]), labels[sample], keys[sample], metrics, ridges,
                      folds=folds, seed=seed, max_iterations=max_iterations, progress=progress, race=True,
                      until_one_left=True)
        prior = raced.choice()[0]
        running = [m for m in metrics if m.kind == prior]
        race_paths = {m.kind: raced.scores.points(m.kind, ridges) for m in metrics if m.kind != prior}
        dropped = {m.kind: raced.dropped.get(m.kind, raced.folds_run) for m in metrics if m.kind != prior}
        products, image_products = dict(raced.products), raced.image_products
        sampled = f", the prior chosen first by {folds}-fold cross-validation on another {len(sample)}"
    fit, held = make_data(fit_rows), make_data(held_rows)
    scores = _Scores([(m.kind, r) for m in running for r in ridges])
    paths = {}
    for metric in running:
        paths[metric.kind] = _path(fit, metric, ridges, max_iterations, progress, "held-out part")
        products[metric.kind] = products.get(metric.kind, 0) + paths[metric.kind].iterations
        image_products += paths[metric.kind].iterations * len(fit_rows)
    scores.add_fold(held, paths, ridges)
    kinds = [m.kind for m in running]
    prior, ridge = _choice(scores, kinds, ridges)
    chosen = {m.kind: scores.points(m.kind, ridges) for m in running}
    return Selection(prior, ridge, {m.kind: chosen.get(m.kind) or race_paths[m.kind] for m in metrics},
                     sum(products.values()), products, dropped, scores.solutions[prior, ridge],
                     passes=image_products / len(labels),
                     scheme=f"one stratified held-out part of {len(held_rows)} of the {len(labels)} training "
                            f"images{sampled}", out_of_fold=scores.predictions((prior, ridge)))


def _path(fit: DataTerm, metric: PriorMetric, ridges: list[float], max_iterations: int, progress: bool,
          where: str) -> "KrylovPath | HeadPath":
    """``metric``'s optimum for every λ of ``ridges`` on ``fit``: closed form for LQF-head, else Lanczos."""
    if metric.kind == "head":
        return HeadPath(fit)
    return KrylovPath(fit, metric, ridges, tolerance=PATH_TOLERANCE[metric.kind], max_iterations=max_iterations,
                      progress=progress, description=f"λ path, {metric.kind} prior, {where}")


@dataclass
class _Raced:
    """Where a race over folds ended: the scores, the priors still running, products by prior (and in images ×
    products, for passes over the training set), and the dropped priors with the folds they ran."""

    scores: _Scores
    running: list[str]
    ridges: list[float]
    products: dict[str, int]
    image_products: int
    dropped: dict[str, int]
    folds_run: int

    def choice(self) -> tuple[str, float]:
        return _choice(self.scores, self.running, self.ridges)


def _race(
    make_data: Callable[[Tensor], DataTerm], labels: Tensor, keys: Tensor, metrics: list[PriorMetric],
    ridges: list[float], *, folds: int, seed: int, max_iterations: int, progress: bool, race: bool,
    until_one_left: bool = False,
) -> _Raced:
    """K-fold cross-validation of every prior's path over the images of ``labels`` (``make_data`` takes their
    positions), dropping priors that fall behind after a fold; ``until_one_left``: stop once one prior runs."""
    assignment = stratified_folds(labels, keys, folds, seed)  # every fold holds images: the deal is balanced
    scores = _Scores([(m.kind, r) for m in metrics for r in ridges])
    running = {m.kind: m for m in metrics}
    products, image_products, dropped = dict.fromkeys(running, 0), 0, {}
    folds_run = 0
    for fold in range(folds):
        folds_run = fold + 1
        held = make_data((assignment == fold).nonzero().flatten())
        fit_rows = (assignment != fold).nonzero().flatten()
        fit = make_data(fit_rows)
        paths = {kind: _path(fit, metric, ridges, max_iterations, progress, f"fold {fold + 1}/{folds}")
                 for kind, metric in running.items()}
        for kind, path in paths.items():
            products[kind] += path.iterations
            image_products += path.iterations * len(fit_rows)
        scores.add_fold(held, paths, ridges)
        if race and len(running) > 1 and fold + 1 < folds:
            leader = _leader(scores, list(running), ridges)
            for kind in list(running):
                if kind != leader[0] and scores.paired_z(scores.best(kind, ridges), leader) > RACE_THRESHOLD:
                    del running[kind]
                    dropped[kind] = fold + 1
        if until_one_left and len(running) == 1:
            break
    return _Raced(scores, list(running), ridges, products, image_products, dropped, folds_run)


def _leader(scores: _Scores, kinds: list[str], ridges: list[float]) -> tuple[str, float]:
    """The column of lowest mean loss among ``kinds``' paths."""
    return scores.best(min(kinds, key=lambda k: float(scores.loss[scores.index[scores.best(k, ridges)]])), ridges)


def _choice(scores: _Scores, kinds: list[str], ridges: list[float]) -> tuple[str, float]:
    """The rule (``choose``) over ``kinds``, with the priors the images cannot tell from the leader as ties."""
    leader = _leader(scores, kinds, ridges)
    tied = [kind for kind in kinds if scores.paired_z(scores.best(kind, ridges), leader) <= 1.0]
    return choose({kind: scores.points(kind, ridges) for kind in kinds}, tied)


def _standard_error(total: float, total_of_squares: float, n: int) -> float:
    """Standard error of the mean of n values from their sum and their sum of squares."""
    variance = max(total_of_squares - total**2 / n, 0.0) / max(n - 1, 1)
    return math.sqrt(variance / n)


def plot_path(selection: Selection, path: Path) -> None:
    """Cross-validated accuracy and loss against λ, one line per prior, as a PNG (written atomically)."""
    fig, (ax_acc, ax_loss) = subplots(1, 2, figsize=(9, 3.5))
    for kind, points in selection.paths.items():
        ridges = [p.ridge for p in points]
        label = f"{kind} prior" + (" (chosen)" if kind == selection.prior else "")
        style = "o-"
        if kind in selection.dropped:
            label += f" (dropped after {selection.dropped[kind]} fold{'s' * (selection.dropped[kind] > 1)})"
            style = "o--"
        ax_acc.plot(ridges, [100 * p.validation_accuracy for p in points], style, label=label)
        ax_loss.errorbar(ridges, [p.validation_loss for p in points], yerr=[p.standard_error for p in points],
                         fmt=style, capsize=3, label=label)
    for axis in (ax_acc, ax_loss):
        axis.axvline(selection.ridge, color="grey", linestyle="--", label=f"chosen λ = {selection.ridge:.3g}")
        axis.set_xscale("log")
        axis.set_xlabel("λ")
    ax_acc.set(ylabel="validation accuracy (%)", title="accuracy on held-out training images")
    ax_loss.set(ylabel="validation loss (MSE to α·one-hot)", title="loss ± standard error (the rule)")
    ax_loss.legend(fontsize="small")
    save_png(fig, path)
