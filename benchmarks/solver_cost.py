"""What the certified solve costs on the default job's training images, and what did or did not make it cheaper.

    python benchmarks/solver_cost.py --report benchmarks/results/solver_cost.md

Sections (``--sections``, all by default), each on the default job's 1000 Fashion-MNIST training images
(EfficientNet-Lite0, 128 px, ``last:1``; the trunk outputs cached once):

* ``selection``: the choice of the prior and λ without the race (every prior runs every fold) and with it,
  then the refit at the chosen prior and λ from zero and from the mean of the folds' optima; products with
  the data and seconds, side by side.
* ``isotropic``: preconditioners for the isotropic prior's refit at one λ: none, K-FAC + λI (the prior's
  eigenbases, damping 0), K-FAC damped as the K-FAC prior is + λI, and a scalar per tensor (its mean Gauss-Newton
  curvature, Hutchinson) + λ.
* ``shared``: one subspace shared by every fold (grown from the worst fold's residual, K-FAC preconditioned,
  until every fold's own relative residual is below the K-FAC prior's path tolerance) and the held-out scores it
  gives — against the honest folds' (a check that sharing products between folds leaks the held-out labels).
* ``settle``: how each fold's held-out losses settle along its Lanczos path — for every iteration k, every λ's
  held-out loss from the first k basis vectors (``J_held M^-½ q_j`` once per vector) — against a path run to
  1e-2 (``SETTLE_TOLERANCES``): whether a path could stop earlier, or be dropped by the race before it
  converges, without changing what it scores.
* ``trunk``: images per second of the frozen trunk (the caching stage) on the default job's first 256 training
  images, its input in the default (NCHW) memory layout and channels-last (what ``LQFModel.encode_trunk`` does).
* ``product``: images per second of a product with G over the cached trunk outputs, by batch size and memory
  layout, and whether ``torch.compile`` takes it.
"""

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lqf_hub import LQFConfig, LQFModel, LQFTrainer, LQFTrainingArguments
from lqf_hub.data import load_image_dataset, sample_shots, with_transform
from lqf_hub.solver.curvature import gauss_newton_batch
from lqf_hub.solver.kfac import KFAC
from lqf_hub.solver.selection import PATH_TOLERANCE, select, stratified_folds
from lqf_hub.solver.solve import KrylovPath, solve
from lqf_hub.training.cache import TrunkCache

MODEL, IMAGE_SIZE, SHOTS = "tf_efficientnet_lite0", 128, 100
SETTLE_TOLERANCES = (6e-2, 3e-2, 1e-2)  # the paths' stops compared by ``settle``; the last is its reference


def default_job(linearize: str, directory: Path) -> tuple[LQFModel, LQFTrainer, TrunkCache]:
    """The default job's model and its training images' trunk outputs (cached in ``directory``)."""
    model = LQFModel.from_timm(MODEL, 10, LQFConfig(linearize=linearize))
    model.set_image_size(IMAGE_SIZE)
    path, key = directory / f"trunk-{linearize}.safetensors", f"{MODEL}-{IMAGE_SIZE}-{SHOTS}-{linearize}"
    cache = TrunkCache.load(path, key) if path.exists() else None
    if cache is None:
        train = sample_shots(load_image_dataset("fashion-mnist", "train"), SHOTS, seed=0)
        trainer = LQFTrainer(model, with_transform(train, model.data_config), None,
                             LQFTrainingArguments(output_dir=str(directory), progress=False))
        cache = trainer.inputs("train")
        directory.mkdir(parents=True, exist_ok=True)
        cache.save(path, key)
    return model, LQFTrainer(model, cache, None, LQFTrainingArguments(output_dir=str(directory), progress=False)), cache


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.double(), b.double()))


# --------------------------------------------------------------------------------------- sections
def selection_section(trainer: LQFTrainer, cache: TrunkCache) -> list[str]:
    data, metrics = trainer.data_term(), trainer.priors("auto")
    lines = ["## The choice of the prior and λ, and the refit", "",
             "| run | prior, λ | path products (K-FAC / isotropic / head) | dropped after | refit products | "
             "total products | selection s | refit s |", "|---|---|---|---|---:|---:|---:|---:|"]
    args = trainer.args
    for race in (False, True):
        started = time.perf_counter()
        found = select(trainer.data_term, cache.labels, cache.digests, list(metrics.values()),
                       args.ridge_grid, folds=args.validation_folds, seed=args.seed,
                       max_iterations=args.max_iterations, progress=False, race=race)
        chosen = time.perf_counter() - started
        metric = metrics[found.prior]
        for start, name in ((None, "from zero"), (found.warm_start, "from the folds' mean")):
            started = time.perf_counter()
            _, certificate = solve(data, metric, found.ridge, tolerance=args.tolerance, start=start)
            refit = time.perf_counter() - started
            products = " / ".join(str(found.products.get(k, 0)) for k in ("kfac", "isotropic", "head"))
            dropped = ", ".join(f"{k}: {v} fold" for k, v in found.dropped.items()) or "—"
            lines.append(f"| {'race' if race else 'no race'}, refit {name} | {found.prior}, {found.ridge:g} | "
                         f"{products} | {dropped} | {certificate.iterations} | {found.iterations + certificate.iterations} | "
                         f"{chosen:.0f} | {refit:.0f} |")
    return lines + [""]


ISOTROPIC_PRECONDITIONERS = {"none": "none", "kfac": "K-FAC + λI", "kfac-damped": "K-FAC damped as the prior + λI",
                              "scalar": "scalar per tensor + λ"}


def isotropic_section(model: LQFModel, trainer: LQFTrainer, ridges: list[float], columns: list[str],
                      probes: int = 8) -> list[str]:
    data, metrics = trainer.data_term(), trainer.priors("kfac")
    flat, prior = data.flat, metrics["kfac"].kfac
    shifted = KFAC(model.linearization_point, model.linearized_parameters, ridge=0.0, damping=0.0)
    shifted.load_state_dict(prior.state_dict())
    damped = KFAC(model.linearization_point, model.linearized_parameters, ridge=0.0, damping=trainer.args.damping)
    damped.load_state_dict(prior.state_dict())
    generator = torch.Generator().manual_seed(0)
    curvature = dict.fromkeys(flat.names, 0.0)
    for _ in range(probes if "scalar" in columns else 0):  # Hutchinson: E[vᵢ (Gv)ᵢ] = Gᵢᵢ, summed per tensor
        v = (torch.randint(0, 2, flat.zeros().shape, generator=generator) * 2 - 1).to(flat.dtype)
        for name, a, b in zip(flat.names, flat.unflatten(v).values(), flat.unflatten(data.gauss_newton(v)).values()):
            curvature[name] += float((a * b).sum()) / probes
    sizes = dict(zip(flat.names, flat.sizes))

    def kfac_shifted(ridge: float, kfac: KFAC = shifted):
        def apply(r):
            kfac.ridge = ridge
            parts = {n: t.clone() for n, t in flat.unflatten(r).items()}
            kfac.precondition(parts)
            return flat.flatten(parts)
        return apply

    def scalar_per_tensor(ridge: float):
        scale = torch.cat([torch.full((sizes[n],), max(curvature[n], 0) / sizes[n] + ridge) for n in flat.names])
        return lambda r: r / scale.to(r)

    notes = ([f"{probes} Hutchinson probes for the scalars"] if "scalar" in columns else []) + (
        [f"the damped K-FAC's damping {trainer.args.damping:g} × each block's mean eigenvalue, as in the K-FAC prior"]
        if "kfac-damped" in columns else [])
    lines = ["## Preconditioning the isotropic prior", "",
             "Conjugate gradients on `(G + λI)δ = b` over the 1000 images to a relative residual of 1e-4"
             + (f" ({'; '.join(notes)})." if notes else "."), "",
             "| λ | " + " | ".join(ISOTROPIC_PRECONDITIONERS[c] for c in columns) + " |", "|---:|" + "---:|" * len(columns)]
    for ridge in ridges:
        made = {"none": lambda r: r, "kfac": kfac_shifted(ridge), "kfac-damped": kfac_shifted(ridge, damped),
                "scalar": scalar_per_tensor(ridge)}
        lines.append(f"| {ridge:g} | " + " | ".join(str(_pcg(data, ridge, made[c])) for c in columns) + " |")
    return lines + [""]


def _pcg(data, ridge: float, precondition, tolerance: float = 1e-4, limit: int = 300) -> int:
    """Products of preconditioned CG on ``(G + λI)x = b`` until ``‖r‖ ≤ tolerance ‖b‖``."""
    b = data.rhs
    x, r = data.flat.zeros(), b.clone()
    z = precondition(r)
    p, rz, norm, products = z.clone(), _dot(r, z), math.sqrt(_dot(b, b)), 0
    while math.sqrt(_dot(r, r)) > tolerance * norm and products < limit:
        q = data.gauss_newton(p) + ridge * p
        products += 1
        step = rz / _dot(p, q)
        x, r = x + step * p, r - step * q
        z = precondition(r)
        rz, previous = _dot(r, z), rz
        p = z + (rz / previous) * p
    return products


def shared_section(trainer: LQFTrainer, cache: TrunkCache, limit: int = 60) -> list[str]:
    """One subspace V for every fold (K-FAC prior): each pass gives G_g v per fold g, every fold's problem is
    solved in V, and V grows by the K-FAC-preconditioned residual of the worst (fold, λ)."""
    data, metrics = trainer.data_term(), trainer.priors("kfac")
    metric, args = metrics["kfac"], trainer.args
    folds = args.validation_folds
    assignment = stratified_folds(cache.labels, cache.digests, folds, args.seed)
    parts = [trainer.data_term((assignment == g).nonzero().flatten()) for g in range(folds)]
    sums = [p.rhs.double() * p.count for p in parts]
    basis, products, outputs, prior_products = [], [], [[] for _ in parts], []
    ridges = sorted(args.ridge_grid, reverse=True)
    grow = metric.power(data.rhs, 1.0)
    while len(basis) < limit:
        v = grow.double()
        for _ in range(2):
            for u in basis:
                v = v - (u @ v) * u
        v = v / v.norm()
        basis.append(v)
        products.append(torch.stack([p.gauss_newton(v.float()).double() * p.count for p in parts]))
        prior_products.append(metric.power(v.float(), -1.0).double())
        for g, p in enumerate(parts):
            outputs[g].append((p.outputs(v.float()) - p.f0).double())
        V, MV = torch.stack(basis), torch.stack(prior_products)
        B = V @ MV.T
        worst, solutions = (0.0, None, None), {}
        for f in range(folds):
            kept = [g for g in range(folds) if g != f]
            count = sum(parts[g].count for g in kept)
            b = sum(sums[g] for g in kept) / count
            GV = sum(torch.stack([products[j][g] for j in range(len(basis))]) for g in kept) / count
            A = V @ GV.T
            for ridge in ridges:
                c = torch.linalg.solve((A + A.T) / 2 + ridge * (B + B.T) / 2, V @ b)
                residual = b - GV.T @ c - ridge * (MV.T @ c)
                relative = math.sqrt(_dot(residual, metric.power(residual.float(), 1.0)) / _dot(b, metric.power(b.float(), 1.0)))
                solutions[f, ridge] = c
                if relative > worst[0]:
                    worst = (relative, residual, ridge)
        if worst[0] <= PATH_TOLERANCE["kfac"]:
            break
        grow = metric.power(worst[1].float(), 1.0)
    shared = _scores(parts, outputs, solutions, ridges, trainer.model)
    honest = select(trainer.data_term, cache.labels, cache.digests, [metric], ridges, folds=folds,
                    seed=args.seed, max_iterations=args.max_iterations, progress=False)
    lines = ["## Sharing products between folds leaks the held-out labels", "",
             f"One subspace for all {folds} folds reached every fold's relative residual ≤ {PATH_TOLERANCE['kfac']:g} "
             f"(the K-FAC prior's path tolerance) with {len(basis)} vectors (passes over all images); the honest folds spent "
             f"{honest.iterations} products over 4/5 of them. Cross-validated loss / accuracy % (K-FAC prior):", "",
             "| λ | " + " | ".join(f"{r:g}" for r in ridges) + " |", "|---|" + "---:|" * len(ridges),
             "| shared subspace | " + " | ".join(f"{shared[r][0]:.1f} / {shared[r][1]:.1f}" for r in ridges) + " |",
             "| honest folds | " + " | ".join(f"{p.validation_loss:.1f} / {100 * p.validation_accuracy:.1f}"
                                           for p in honest.points) + " |", ""]
    return lines


def _scores(parts, outputs, solutions, ridges, model) -> dict[float, tuple[float, float]]:
    results = {}
    for ridge in ridges:
        losses, correct = [], 0
        for f, part in enumerate(parts):
            prediction = part.f0.double() + torch.stack(outputs[f], -1) @ solutions[f, ridge]
            target = model.config.target_scale * F.one_hot(part.labels, model.num_classes).double()
            losses.append(0.5 * (prediction - target).square().sum(-1))
            correct += int((prediction.argmax(-1) == part.labels).sum())
        loss = torch.cat(losses)
        results[ridge] = (float(loss.mean()), 100 * correct / len(loss))
    return results


def settle_section(trainer: LQFTrainer, cache: TrunkCache, limit: int = 60) -> list[str]:
    """Fold 1 with the K-FAC and isotropic priors, folds 2–5 with the K-FAC prior: held-out loss per λ at every
    iteration of a path run to ``SETTLE_TOLERANCES[-1]``."""
    args, metrics = trainer.args, trainer.priors("auto")
    ridges = sorted(args.ridge_grid, reverse=True)
    assignment = stratified_folds(cache.labels, cache.digests, args.validation_folds, args.seed)
    reference = SETTLE_TOLERANCES[-1]
    rows, race = [], {}
    for fold in range(args.validation_folds):
        fit = trainer.data_term((assignment != fold).nonzero().flatten())
        held = trainer.data_term((assignment == fold).nonzero().flatten())
        for kind in ("kfac", "isotropic") if fold == 0 else ("kfac",):
            metric = metrics[kind]
            path = KrylovPath(fit, metric, ridges, tolerance=reference, max_iterations=limit)
            columns = [held.outputs(metric.power(q.to(held.f0.device), 0.5)) - held.f0 for q in path.basis]
            tridiagonal = path.tridiagonal()
            losses, residuals = [], []  # [k][λ]
            for k in range(1, path.iterations + 1):
                start = np.zeros(k)
                start[0] = path.beta0
                solutions = [np.linalg.solve(tridiagonal[:k, :k] + r * np.eye(k), start) for r in ridges]
                losses.append([float(held.scores_of(held.f0 + sum(float(c) * o for c, o in zip(y, columns)))[0].mean())
                               for y in solutions])
                residuals.append(path.betas[k - 1] * abs(solutions[-1][-1]) / path.beta0)
            final = losses[-1]
            for tolerance in SETTLE_TOLERANCES:
                k = next((i for i, r in enumerate(residuals) if r <= tolerance), len(residuals) - 1)
                best = min(range(len(ridges)), key=lambda j: losses[k][j])
                rows.append(f"| {fold + 1} | {kind} | {tolerance:.0e} | {k + 1} | {ridges[best]:g}: {losses[k][best]:.2f} | "
                            f"{max(abs(a - b) for a, b in zip(losses[k], final)):.2f} |")
            if fold == 0:
                race[kind] = [min(row) for row in losses]
    lines = ["## How the held-out losses settle along a path", "",
             f"Each fold's path run until the relative gradient norm at the smallest λ is {reference:.0e}, its held-out loss "
             f"at every λ recomputed from the first k basis vectors. "
             f"Per fold and prior, at the first k where that residual is below each tolerance: the lowest held-out loss "
             f"(its λ) and the largest change, over the grid's λ, still to come before the reference.", "",
             "| fold | prior | tolerance | k | lowest loss (λ: loss) | largest change still to come |",
             "|---:|---|---:|---:|---|---:|", *rows, "",
             "Fold 1, the lowest held-out loss of each prior's path after k products (what a race could compare "
             "before the paths converge):", "",
             "| k | " + " | ".join(str(k) for k in range(2, len(race["isotropic"]) + 1, 2)) + " |",
             "|---|" + "---:|" * len(range(2, len(race["isotropic"]) + 1, 2)),
             *(f"| {kind} | " + " | ".join(f"{values[min(k, len(values)) - 1]:.1f}"
                                            for k in range(2, len(race["isotropic"]) + 1, 2)) + " |"
               for kind, values in race.items()), ""]
    return lines


def trunk_section(model: LQFModel, repeats: int = 3) -> list[str]:
    train = sample_shots(load_image_dataset("fashion-mnist", "train"), SHOTS, seed=0)
    dataset = with_transform(train, model.data_config)
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(256)])
    start = model._start  # noqa: SLF001 — the trunk's end, to time it in the layout encode_trunk no longer uses

    def rate(layout: torch.memory_format) -> tuple[float, torch.Tensor]:
        with torch.no_grad(), model._activations(check=False):  # noqa: SLF001 — as encode_trunk runs it
            run = lambda: model.net(pixels.contiguous(memory_format=layout), 0, start).contiguous()  # noqa: E731
            run()
            started = time.perf_counter()
            for _ in range(repeats):
                out = run()
        return repeats * len(pixels) / (time.perf_counter() - started), out

    default, reference = rate(torch.contiguous_format)
    channels_last, out = rate(torch.channels_last)
    return ["## The frozen trunk (caching)", "", f"Images per second through the trunk, {len(pixels)} images in one "
            f"batch, {repeats} repeats after one warm-up, side by side in this run.", "",
            "| input layout | images / s |", "|---|---:|", f"| default (NCHW) | {default:.1f} |",
            f"| channels-last (`encode_trunk`) | {channels_last:.1f} |", "",
            f"Ratio {channels_last / default:.2f}×; the outputs differ by at most "
            f"{float((out - reference).abs().max()):.1e} (largest output {float(reference.abs().max()):.1f}): "
            f"float32 rounding of another convolution algorithm.", ""]


def product_section(model: LQFModel, trainer: LQFTrainer, cache: TrunkCache, repeats: int = 3) -> list[str]:
    data = trainer.data_term(None)
    vector = data.flat.unflatten(torch.randn(data.flat.zeros().shape, generator=torch.Generator().manual_seed(0)))
    count = len(cache.labels)

    def rate(batch: int, z: torch.Tensor, product=gauss_newton_batch) -> float:
        def one():
            for start in range(0, count, batch):
                product(model, z[start:start + batch], vector, data.f0[start:start + batch])
        one()
        started = time.perf_counter()
        for _ in range(repeats):
            one()
        return repeats * count / (time.perf_counter() - started)

    lines = ["## A product with G", "", f"Images per second over the {count} cached trunk outputs "
             f"({trainer.args.eval_batch_size} is the batch the solver uses: `eval_batch_size`).", "",
             "| setting | images / s |", "|---|---:|"]
    for batch in (32, 64, 128, 256, 512):
        lines.append(f"| batch {batch} | {rate(batch, data.z):.0f} |")
    lines.append(f"| batch {trainer.args.eval_batch_size}, channels_last | "
                 f"{rate(trainer.args.eval_batch_size, data.z.contiguous(memory_format=torch.channels_last)):.0f} |")
    try:
        compiled = torch.compile(gauss_newton_batch)
        lines.append(f"| batch {trainer.args.eval_batch_size}, torch.compile | {rate(trainer.args.eval_batch_size, data.z, compiled):.0f} |")
    except Exception as err:  # noqa: BLE001 — the report says why it does not compile
        lines.append(f"| torch.compile | fails: {type(err).__name__}: {str(err).splitlines()[0][:120]} |")
    return lines + [""]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["selection", "isotropic", "shared", "settle", "trunk", "product"])
    parser.add_argument("--linearize", default="last:1")
    parser.add_argument("--isotropic-ridges", type=float, nargs="+", default=[10.0, 1.0])
    parser.add_argument("--isotropic-preconditioners", nargs="+", choices=list(ISOTROPIC_PRECONDITIONERS),
                        default=list(ISOTROPIC_PRECONDITIONERS))
    parser.add_argument("--cache-dir", type=Path, default=Path("lqf-output/solver-cost"))
    parser.add_argument("--report", type=Path)
    args = parser.parse_args(argv)
    model, trainer, cache = default_job(args.linearize, args.cache_dir)
    lines = ["# What the certified solve costs", "",
             f"`python benchmarks/solver_cost.py` ({', '.join(args.sections)}; {MODEL}, {IMAGE_SIZE} px, "
             f"linearize={args.linearize}, Fashion-MNIST {SHOTS} shots per class, seed 0: the default job's "
             f"training images; {torch.get_num_threads()} threads).", ""]
    for section in args.sections:
        started = time.perf_counter()
        if section == "selection":
            lines += selection_section(trainer, cache)
        elif section == "isotropic":
            lines += isotropic_section(model, trainer, args.isotropic_ridges, args.isotropic_preconditioners)
        elif section == "shared":
            lines += shared_section(trainer, cache)
        elif section == "settle":
            lines += settle_section(trainer, cache)
        elif section == "trunk":
            lines += trunk_section(model)
        elif section == "product":
            lines += product_section(model, trainer, cache)
        print("\n".join(lines), flush=True)
        print(f"({section}: {time.perf_counter() - started:.0f} s)", flush=True)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
