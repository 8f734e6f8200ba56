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
4. Labels of ``--flip`` of the training images changed to another class; the model solved on them (λ as
   ``lqf-hub train`` chooses it); precision at k = number flipped of the label-margin ranking against the
   ranking by training loss.
The test images are only read for (1)-(3), which choose nothing.
"""

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lqf_hub import LQFConfig, LQFModel, LQFTrainer, LQFTrainingArguments, load_image_dataset, sample_shots, with_transform
from lqf_hub.explain import Explainer
from lqf_hub.files import atomic_write_text
from lqf_hub.forget import forget
from lqf_hub.linearize import linearized
from lqf_hub.solve import DataTerm, solve


def build(args, images, output: str, **training) -> tuple[LQFModel, LQFTrainer, dict]:
    model = LQFModel.from_timm("tf_efficientnet_lite0", 10, LQFConfig())
    model.set_image_size(args.image_size)
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
    parser.add_argument("--leave-out", type=int, default=50, help="Training images removed one at a time.")
    parser.add_argument("--subsets", type=int, default=5, help="Random 10%% subsets removed at once.")
    parser.add_argument("--effect-images", type=int, default=5, help="Test images whose change is predicted.")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="Solver tolerance of the leave-out section.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    train = sample_shots(load_image_dataset("fashion-mnist", "train"), args.shots, seed=args.seed)
    test = sample_shots(load_image_dataset("fashion-mnist", "test"), 200, seed=1000 + args.seed, at_most=True)
    lines = [f"# Attribution and forgetting on Fashion-MNIST ({args.shots} shots, {args.image_size} px, seed {args.seed})",
             "", f"`{shlex.join(['python', *sys.argv])}`", ""]
    with tempfile.TemporaryDirectory() as tmp:
        model, trainer, record = build(args, train, f"{tmp}/full")
        data, metric = trainer.objective()
        explainer = Explainer(model, data, metric, model.config.ridge)
        test_items = with_transform(test, model.data_config)
        rng = np.random.default_rng(args.seed)
        worst, seconds = 0.0, []
        for i in rng.choice(len(test_items), args.test_images, replace=False):
            started = time.perf_counter()
            explanation = explainer.explain(model.encode_trunk(test_items[int(i)]["pixel_values"][None]))
            seconds.append(time.perf_counter() - started)
            change = (explanation.output - explanation.base).abs().max()
            worst = max(worst, float(explanation.gap.abs().max() / change))
        lines += ["## Exactness", "", f"{record['prior']} prior, λ = {model.config.ridge:g}, certificate: relative gradient "
                  f"{record['relative_gradient_norm']:.1e}. Over {args.test_images} test images the largest "
                  f"|f_lin − f0 − Σ c_i| / max |f_lin − f0| is {worst:.1e}; {np.mean(seconds):.1f} s per image.", ""]

        removed = sorted(rng.choice(len(train), args.forget, replace=False).tolist())
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
                  f"{args.forget} training images removed: test predictions identical on {100 * float((a == b).double().mean()):.2f}% "
                  f"of {len(test_items)} test images; products {forget_record['iterations']} (warm start) against "
                  f"{scratch_record['iterations']} (from zero); {forget_seconds:.0f} s against {scratch_seconds:.0f} s "
                  "(both rebuild the cache and the prior).", ""]

        lines += leave_out(args, train, test_items, rng, f"{tmp}/leave-out")

        labels = np.array(train["label"])
        flipped = sorted(rng.choice(len(train), max(1, round(args.flip * len(train))), replace=False).tolist())
        noisy = labels.copy()
        noisy[flipped] = (labels[flipped] + rng.integers(1, 10, len(flipped))) % 10
        dirty = train.map(lambda row, i: {"label": int(noisy[i])}, with_indices=True)
        model, trainer, _ = build(args, dirty, f"{tmp}/dirty")
        data, metric = trainer.objective()
        margins = Explainer(model, data, metric, model.config.ridge).label_margins()
        losses, _ = data.sample_scores(data.flat.flatten(dict(model.linearized_parameters)))
        k = len(flipped)
        by_margin = set(margins.argsort()[:k].tolist())
        by_loss = set(losses.argsort(descending=True)[:k].tolist())
        lines += ["## Mislabelled images", "",
                  f"{k} of {len(train)} labels changed; precision at k = {k}: label margins "
                  f"{len(by_margin & set(flipped)) / k:.2f}, training loss {len(by_loss & set(flipped)) / k:.2f}.", ""]
    atomic_write_text(args.out, "\n".join(lines))
    print("\n".join(lines))


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
