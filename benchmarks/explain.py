"""Attribution and forgetting on a real task (issue #11): exactness, forgetting against retraining, and
mislabelled images found by the label margins.

    python benchmarks/explain.py --out benchmarks/results/explain.md            # the default job's task
    python benchmarks/explain.py --shots 10 --test-images 3 --forget 3 --out /tmp/explain.md   # minutes

1. Solve the default task (λ by the solver's cross-validation); for ``--test-images`` test images, the split
   ``f0(x) + Σ_i c_i(x)`` against ``f_lin(x)``: the largest unexplained part relative to ``|f_lin − f0|``.
2. ``forget`` of ``--forget`` random training images against a from-scratch solve on the rest at the same
   λ: agreement of test predictions, δ distance, products and seconds side by side.
3. Leaving images out: the first-order change of ``--effect-images`` test images' outputs
   (``Explainer.removal_effects``) for ``--leave-out`` random training images removed one at a time, and for
   ``--subsets`` random 10% subsets removed at once, against the actual optimum without them — warm-started
   solves at ``--tolerance``, once with the prior's metric M kept and once as ``forget`` does it (M rebuilt
   from the remaining images, which the first-order change leaves out) — and, as a baseline, minus the
   images' shares of the split (``−c_j(x)``). Pearson correlation over every (removal, image, class).
4. For ``--flip-draws`` draws, labels of ``--flip`` of the training images changed to another class; the
   model solved on them (prior and λ as ``lqf-hub train`` chooses them); precision at k = number flipped of
   the exact leave-one-out label margins (``Explainer.leave_one_out``), the leave-one-out loss, the margins
   from a kernel of ``--projections`` random projections, the first-order margins and the training loss.
5. The fast mode against the exact one: for the ``--test-images`` of (1), the split from the first k of
   ``--projections`` random features (k = 1/10, 1/4, 1/2 and all of them) against the exact split of the
   predicted class: relative error, Pearson correlation and the share of the exact top 5 supporting and
   opposing training images found.
``--sections`` runs some of them (the draws of 1-3 stay the same). ``--model DIR`` runs (1) and (5) on a
checkpoint made by ``lqf-hub train`` instead (the default job's: ``lqf-hub train --output-dir out`` then
``--model out/model``), on its own training images; ``--features-dir`` keeps the random features there
(``lqf-hub explain --projections`` of that model into the same directory computes them once for both).
The test images are only read for (1)-(3) and (5), which choose nothing.
"""

import argparse
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lqf_hub import (
    LQFConfig,
    LQFModel,
    LQFTrainer,
    LQFTrainingArguments,
    load_image_dataset,
    sample_shots,
    with_transform,
)
from lqf_hub.analysis.explain import Explainer, RandomFeatures, training_images
from lqf_hub.analysis.forget import forget
from lqf_hub.files import atomic_write_text
from lqf_hub.modeling.linearize import linearized
from lqf_hub.solver.solve import DataTerm, solve


def build_model(args) -> LQFModel:
    model = LQFModel.from_timm("tf_efficientnet_lite0", 10, LQFConfig())
    model.set_image_size(args.image_size)
    return model


def build(args, images, output: str, **training) -> tuple[LQFModel, LQFTrainer, dict]:
    model = build_model(args)
    trainer = LQFTrainer(model, with_transform(images, model.data_config), None,
                         LQFTrainingArguments(output_dir=output, progress=False, **training))
    return model, trainer, trainer.train()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--test-images", type=int, default=20)
    parser.add_argument("--forget", type=int, default=10, help="Training images to forget at once.")
    parser.add_argument("--flip", type=float, default=0.05, help="Share of training labels changed.")
    parser.add_argument("--flip-draws", type=int, default=3, help="Draws of changed labels.")
    parser.add_argument("--projections", type=int, default=500, help="Random projections of the fast kernel.")
    parser.add_argument("--sections", nargs="+", default=["exactness", "forget", "leave-out", "mislabelled"],
                        choices=["exactness", "forget", "leave-out", "mislabelled", "fast"], help="Sections to run.")
    parser.add_argument("--model", type=Path, help="A checkpoint of `lqf-hub train` to explain (sections exactness, fast).")
    parser.add_argument("--features-dir", type=Path, help="Where the fast section keeps its random features.")
    parser.add_argument("--leave-out", type=int, default=50, help="Training images removed one at a time.")
    parser.add_argument("--subsets", type=int, default=5, help="Random 10%% subsets removed at once.")
    parser.add_argument("--effect-images", type=int, default=5, help="Test images whose change is predicted.")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="Solver tolerance of the leave-out section.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.model and not set(args.sections) <= {"exactness", "fast"}:
        parser.error("--model runs the sections exactness and fast only.")
    torch.manual_seed(args.seed)
    if args.model:
        model = LQFModel.from_pretrained(str(args.model))
        train, images = training_images(model)
        dataset, size = model.training_summary["train_data"]["dataset"], model.data_config["input_size"][-1]
        task = f"`{args.model}` ({len(train)} training images of {dataset}"
    else:
        model, dataset, size = None, "fashion-mnist", args.image_size
        train = sample_shots(load_image_dataset(dataset, "train"), args.shots, seed=args.seed)
        task = f"Fashion-MNIST ({args.shots} shots"
    test = sample_shots(load_image_dataset(dataset, "test"), 200, seed=1000 + args.seed, at_most=True)
    lines = [f"# Attribution and forgetting on {task}, {size} px, seed {args.seed})", "",
             f"`{shlex.join(['python', *sys.argv])}`", ""]
    rng = np.random.default_rng(args.seed)  # sections 1-3 draw in this order whichever run
    explained = rng.choice(len(test), args.test_images, replace=False)
    removed = sorted(rng.choice(len(train), args.forget, replace=False).tolist())
    with tempfile.TemporaryDirectory() as tmp:
        if model:
            explainer, record = Explainer.from_model(model, images), model.training_summary
        elif {"exactness", "forget", "fast"} & set(args.sections):
            model, trainer, record = build(args, train, f"{tmp}/full")
            explainer = Explainer(model, *trainer.objective(), model.config.ridge)
        if {"exactness", "forget", "fast"} & set(args.sections):
            test_items = with_transform(test, model.data_config)
            x = torch.cat([model.encode_trunk(test_items[int(i)]["pixel_values"][None]) for i in explained])
        if {"exactness", "fast"} & set(args.sections):
            worst, seconds, exact = 0.0, [], []
            for t in range(len(x)):
                started = time.perf_counter()
                exact.append(explainer.explain(x[t:t + 1]))
                seconds.append(time.perf_counter() - started)
                change = (exact[-1].output - exact[-1].base).abs().max()
                worst = max(worst, float(exact[-1].gap.abs().max() / change))
        if "exactness" in args.sections:
            lines += ["## Exactness", "", f"{record['prior']} prior, λ = {model.config.ridge:g}, certificate: relative "
                      f"gradient {record['relative_gradient_norm']:.1e}. Over {args.test_images} test images the largest "
                      f"|f_lin − f0 − Σ c_i| / max |f_lin − f0| is {worst:.1e}; {np.mean(seconds):.1f} s per image.", ""]
        if "fast" in args.sections:
            lines += fast(args, explainer, x, exact, np.mean(seconds))
        if "forget" in args.sections:
            started = time.perf_counter()
            forgotten, forget_record = forget(model, with_transform(train, model.data_config), removed,
                                              LQFTrainingArguments(output_dir=f"{tmp}/forget", progress=False))
            forget_seconds = time.perf_counter() - started
            kept = train.select([i for i in range(len(train)) if i not in set(removed)])
            started = time.perf_counter()
            scratch, _, scratch_record = build(args, kept, f"{tmp}/scratch", ridge_grid=[model.config.ridge],
                                               prior=model.training_summary["prior"])
            scratch_seconds = time.perf_counter() - started
            with torch.no_grad():
                pixels = torch.stack([test_items[i]["pixel_values"] for i in range(len(test_items))])
                a, b = forgotten(pixels).argmax(-1), scratch(pixels).argmax(-1)
            lines += ["## Forgetting against retraining", "",
                      f"{args.forget} training images removed: test predictions identical on "
                      f"{100 * float((a == b).double().mean()):.2f}% of {len(test_items)} test images; products "
                      f"{forget_record['iterations']} (warm start) against {scratch_record['iterations']} (from zero); "
                      f"{forget_seconds:.0f} s against {scratch_seconds:.0f} s (both rebuild the cache and the prior).", ""]
        if "leave-out" in args.sections:
            lines += leave_out(args, train, with_transform(test, build_model(args).data_config), rng, f"{tmp}/leave-out")
        if "mislabelled" in args.sections:
            lines += mislabelled(args, train, f"{tmp}/dirty")
    atomic_write_text(args.out, "\n".join(lines))
    print("\n".join(lines))


def fast(args, explainer: Explainer, x: torch.Tensor, exact: list, exact_seconds: float) -> list[str]:
    """Section 5: the split from the first k of ``--projections`` random features against the exact ``exact``
    splits of the images ``x [T, ...]``, for the predicted class."""
    started = time.perf_counter()
    features = explainer.random_features(args.projections, progress=True, cache_dir=args.features_dir)
    feature_seconds = time.perf_counter() - started
    rows = []
    for k in sorted({max(1, args.projections // 10), max(1, args.projections // 4), max(1, args.projections // 2),
                     args.projections}):
        # R's columns are drawn in order, so the first k (rescaled from 1/√K to 1/√k) are k projections' features
        subset = RandomFeatures(features.train[..., :k] * math.sqrt(args.projections / k), features.seed)
        errors, pearson, found, gaps, seconds = [], [], [], [], []
        for t, reference in enumerate(exact):
            started = time.perf_counter()
            estimate = explainer.explain(x[t:t + 1], features=subset)
            seconds.append(time.perf_counter() - started)
            c = reference.predicted
            a, b = estimate.contributions[:, c].double(), reference.contributions[:, c].double()
            errors.append(float((a - b).norm() / b.norm()))
            pearson.append(float(torch.corrcoef(torch.stack([a, b]))[0, 1]))
            found += [len(set(a.argsort(descending=side)[:5].tolist()) & set(b.argsort(descending=side)[:5].tolist())) / 5
                      for side in (True, False)]
            gaps.append(float(estimate.gap[c].abs() / (reference.output[c] - reference.base[c]).abs()))
        rows.append(f"| {k} | {np.median(errors):.3f} | {np.median(pearson):.3f} | {np.mean(found):.2f} | "
                    f"{np.median(gaps):.3f} | {np.mean(seconds):.2f} |")
    return ["## The fast mode against the exact split", "",
            f"{len(exact)} test images, the predicted class's contributions of the {explainer.data.count} training images "
            f"from k random projections against the exact ones (medians over the images; top 5: the share of the exact "
            f"5 most supporting and 5 most opposing found by the estimate, mean). Gap: |f_lin − f0 − Σ c_i| / |f_lin − f0| "
            "of the estimate.", "",
            "| k | relative error | Pearson | top 5 found | gap | seconds per image |", "|---:|---:|---:|---:|---:|---:|",
            *rows, "",
            f"The training images' features: {feature_seconds:.0f} s for {args.projections} projections (once per model; "
            f"0 when read from `--features-dir`); the exact split: {exact_seconds:.1f} s per image (2-core CPU).", ""]


def mislabelled(args, train, output: str) -> list[str]:
    """Section 4: for ``--flip-draws`` draws, ``--flip`` of the labels changed; precision at k = number changed
    of four rankings: the exact leave-one-out label margins, the same from a kernel of ``--projections`` random
    projections (and its error against the exact kernel), the first-order margins (fitted minus the image's
    own share) and the training loss."""
    rows, seconds = [], {}
    for draw in range(args.flip_draws):
        rng = np.random.default_rng([args.seed, draw])
        labels = np.array(train["label"])
        flipped = sorted(rng.choice(len(train), max(1, round(args.flip * len(train))), replace=False).tolist())
        noisy = labels.copy()
        noisy[flipped] = (labels[flipped] + rng.integers(1, 10, len(flipped))) % 10
        dirty = train.map(lambda row, i: {"label": int(noisy[i])}, with_indices=True)
        model, trainer, record = build(args, dirty, f"{output}/{draw}")
        data, metric = trainer.objective()
        explainer = Explainer(model, data, metric, model.config.ridge)
        timed = {}

        def timing(name, compute):
            started = time.perf_counter()
            value = compute()
            timed[name] = time.perf_counter() - started
            return value

        exact = timing("exact", explainer.training_kernel)
        projected = timing("projected", lambda: explainer.training_kernel(
            explainer.random_features(args.projections, seed=draw)))
        without = explainer.leave_one_out(exact)
        targets = model.config.target_scale * torch.nn.functional.one_hot(data.labels, model.num_classes)
        scores = {  # lowest first: the likeliest mislabelled
            "leave-one-out margins (exact kernel)": explainer.label_margins(without),
            "leave-one-out loss (exact kernel)": -(targets.double() - without).square().sum(-1),
            f"leave-one-out margins ({args.projections} projections)":
                explainer.label_margins(explainer.leave_one_out(projected)),
            "first-order margins (fitted − own share)": timing("shares", lambda: _margins(explainer)),
            "training loss (baseline)": -data.sample_scores(data.flat.flatten(dict(model.linearized_parameters)))[0],
        }
        k = len(flipped)
        row = {"draw": draw, "prior": record["prior"], "ridge": model.config.ridge, "k": k,
               "kernel_error": float((projected - exact).norm() / exact.norm()),
               **{name: len(set(score.argsort()[:k].tolist()) & set(flipped)) / k for name, score in scores.items()}}
        rows.append(row)
        for name, value in timed.items():
            seconds[name] = seconds.get(name, 0.0) + value / args.flip_draws
    names = [n for n in rows[0] if n not in ("draw", "prior", "ridge", "k", "kernel_error")]
    table = ["| draw | prior, λ | k | " + " | ".join(names) + " | projected kernel error |",
             "|---:|---|---:|" + "---:|" * (len(names) + 1)]
    table += [f"| {r['draw']} | {r['prior']}, {r['ridge']:g} | {r['k']} | " + " | ".join(f"{r[n]:.2f}" for n in names)
              + f" | {r['kernel_error']:.3f} |" for r in rows]
    table.append("| mean | | | " + " | ".join(f"{np.mean([r[n] for r in rows]):.2f}" for n in names) +
                 f" | {np.mean([r['kernel_error'] for r in rows]):.3f} |")
    return ["## Mislabelled images", "",
            f"{args.flip:.0%} of {len(train)} training labels changed to another class, {args.flip_draws} draws; each "
            "model solved on the changed labels (prior and λ by cross-validation); precision at k = number changed "
            "of each ranking. Kernel error: ‖K_projected − K‖/‖K‖.", "", *table, "",
            f"Seconds per draw: exact kernel {seconds['exact']:.0f}, projected kernel {seconds['projected']:.0f}, "
            f"own shares {seconds['shares']:.0f} (2-core CPU).", ""]


def _margins(explainer: Explainer) -> torch.Tensor:
    """The first-order label margins: the fitted outputs minus each image's own share of them."""
    return explainer.label_margins(explainer.fitted.double() - explainer.self_influence().double())


def leave_out(args, train, test_items, rng, output: str) -> list[str]:
    """Section 3: predicted against actual changes of test outputs when training images are left out."""
    model, trainer, record = build(args, train, f"{output}/full", tolerance=args.tolerance)
    prior, ridge = model.training_summary["prior"], model.config.ridge
    data, metric = trainer.objective()
    cache = trainer.inputs("train")
    explainer = Explainer(model, data, metric, ridge)
    shown = rng.choice(len(test_items), args.effect_images, replace=False)
    x = torch.cat([model.encode_trunk(test_items[int(i)]["pixel_values"][None]) for i in shown])
    started = time.perf_counter()
    effects = explainer.removal_effects(x)
    effect_seconds = time.perf_counter() - started
    shares = torch.stack([explainer.explain(x[t:t + 1]).contributions for t in range(len(x))], dim=1)  # [N, T, C]
    delta = data.flat.flatten(dict(model.linearized_parameters))
    with torch.no_grad():
        before = model(trunk_output=x)
    n = len(train)
    removals = [[int(i)] for i in rng.choice(n, args.leave_out, replace=False)]
    removals += [sorted(rng.choice(n, n // 10, replace=False).tolist()) for _ in range(args.subsets)]
    rows = {"predicted": [], "shares": [], "metric kept": [], "metric rebuilt (forget)": []}
    products = []
    for removed in removals:
        kept = np.array([i for i in range(n) if i not in set(removed)])
        term = DataTerm(model, cache.values[kept], cache.labels[kept], cache.digests[kept], batch_size=256)
        without, certificate = solve(term, metric, ridge, tolerance=args.tolerance, start=delta)
        products.append(certificate.iterations)
        with torch.no_grad():
            outputs = linearized(model.tail_function(x), model.linearization_point, data.flat.unflatten(without))
        rows["metric kept"].append(outputs - before)
        forgotten, _ = forget(model, with_transform(train, model.data_config), removed,
                              LQFTrainingArguments(output_dir=f"{output}/forget", progress=False, tolerance=args.tolerance))
        with torch.no_grad():
            rows["metric rebuilt (forget)"].append(forgotten(trunk_output=x) - before)
        rows["predicted"].append(effects.predicted_change(removed))
        rows["shares"].append(-shares[removed].sum(0))

    def pearson(a: str, b: str, which: slice) -> float:
        first, second = (torch.cat([t.flatten() for t in rows[k][which]]).double() for k in (a, b))
        return float(torch.corrcoef(torch.stack([first, second]))[0, 1])

    lines = ["## Leaving images out", "",
             f"{n} training images, {prior} prior, λ = {ridge:g}, solved to a relative gradient of "
             f"{record['relative_gradient_norm']:.1e}; the first-order changes of {len(x)} test images' outputs took "
             f"{effect_seconds:.0f} s ({len(x)} × C solves with the Hessian); each actual re-solve "
             f"{np.mean(products):.0f} products from the old optimum. Pearson correlation over every (removal, image, class):",
             "", "| removed | predicted vs M kept | predicted vs forget (M rebuilt) | −shares vs forget |",
             "|---|---:|---:|---:|"]
    for label, which in ((f"{args.leave_out} single images", slice(0, args.leave_out)),
                         (f"{args.subsets} random 10% subsets", slice(args.leave_out, None))):
        lines.append(f"| {label} | {pearson('predicted', 'metric kept', which):.4f} | "
                     f"{pearson('predicted', 'metric rebuilt (forget)', which):.4f} | "
                     f"{pearson('shares', 'metric rebuilt (forget)', which):.4f} |")
    return lines + [""]


if __name__ == "__main__":
    main()
