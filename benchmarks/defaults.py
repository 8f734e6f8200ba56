"""Defaults chosen on validation data only: every setting scored on held-out training images.

For each dataset, shot count and seed the training images are drawn as `lqf-hub train` draws them, and
each setting is scored by the solver's own choice of λ (`LQFTrainer.select`): Krylov paths give the
optimum at every λ of a wide grid, scored on images they did not see, and the one-standard-error rule
picks λ as `lqf-hub train` does. The test split is never loaded. The recorded results were made when that
choice held out 20% of the images per class (one path); since 2026-12-03 it is 5-fold cross-validation.

    python benchmarks/defaults.py run --datasets fashion-mnist mnist-5k --shots 100 --seeds 0 1 2 \
        --variants linearize=last:1 linearize=last:2 linearize=last:3 --out benchmarks/results/defaults_validation.jsonl
    python benchmarks/defaults.py run --datasets fashion-mnist mnist-5k --shots 10 --seeds 0 1 2 \
        --variants linearize=last:1 linearize=last:3 linearize=last:3,activation=none \
        linearize=last:3,activation=leaky linearize=last:3,target_scale=5 linearize=last:3,target_scale=45 \
        --out benchmarks/results/defaults_validation.jsonl
    python benchmarks/defaults.py summary benchmarks/results/defaults_validation.jsonl \
        --report benchmarks/results/defaults_validation.md

A variant is ``key=value[,key=value]`` over LQFConfig fields and the prior's settings (``prior``,
``damping``); the others keep the library's defaults (activation tangent, α = 15, head random; the prior
``auto`` since 2026-12-04 — rows recorded before used the K-FAC prior, then the default: add ``prior=kfac`` to
reproduce them).
(The recorded file holds what these reached in the time they had; the report gives n per cell.)
Finished (dataset, shots, seed, variant) rows are skipped when ``--out`` already holds them.
"""

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from lqf_hub import LQFConfig, LQFModel, LQFTrainer, LQFTrainingArguments
from lqf_hub.cli import DEFAULT_IMAGE_SIZE, DEFAULT_MODEL
from lqf_hub.data import load_image_dataset, sample_shots, with_transform

WIDE_GRID = [1000.0, 300.0, 100.0, 30.0, 10.0, 3.0, 1.0, 0.3, 0.1]
CONFIG_KEYS = {"linearize", "activation", "target_scale", "head_init", "leaky_slope"}
TRAINING_KEYS = {"prior", "damping"}
DEPTHS = {f"linearize=last:{n}": f"last:{n}" for n in (1, 2, 3)}  # shallowest first


def variant_settings(variant: str) -> tuple[dict, dict]:
    """``"key=value,key=value"`` over ``CONFIG_KEYS`` and ``TRAINING_KEYS``: (config, training) settings."""
    config, training = {}, {}
    for part in variant.split(","):
        key, _, value = part.partition("=")
        if key not in CONFIG_KEYS | TRAINING_KEYS:
            raise SystemExit(f"variant {variant!r}: {key!r} is not one of {sorted(CONFIG_KEYS | TRAINING_KEYS)}")
        target = training if key in TRAINING_KEYS else config
        target[key] = float(value) if key in ("target_scale", "leaky_slope", "damping") else value
    return config, training


def score(dataset: str, shots: int, seed: int, variant: str, image_size: int, grid: list[float]) -> dict:
    train = sample_shots(load_image_dataset(dataset, "train"), shots, seed=seed)
    config, training = variant_settings(variant)
    model = LQFModel.from_timm(DEFAULT_MODEL, 10, LQFConfig(**config))
    model.set_image_size(image_size)
    with tempfile.TemporaryDirectory() as out:
        training = LQFTrainingArguments(output_dir=out, seed=seed, progress=False, ridge_grid=grid, **training)
        trainer = LQFTrainer(model, with_transform(train, model.data_config), None, training)
        started = time.perf_counter()
        selection = trainer.select()
    return {"dataset": dataset, "shots": shots, "seed": seed, "variant": variant, "image_size": image_size,
            "chosen_prior": selection.prior, "chosen_ridge": selection.ridge,
            "path_iterations": selection.iterations, "seconds": time.perf_counter() - started,
            "path": [vars(p) for p in selection.points]}


def run(args) -> None:
    done = set()
    if args.out.exists():
        done = {(r["dataset"], r["shots"], r["seed"], r["variant"], r.get("image_size", DEFAULT_IMAGE_SIZE))
                for r in map(json.loads, args.out.open())}
    for dataset in args.datasets:
        for shots in args.shots:
            for seed in args.seeds:
                for variant in args.variants:
                    if (dataset, shots, seed, variant, args.image_size) in done:
                        continue
                    row = score(dataset, shots, seed, variant, args.image_size, args.grid)
                    print(json.dumps({k: v for k, v in row.items() if k != "path"}), flush=True)
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")


def _at_chosen(row: dict) -> dict:
    return next(p for p in row["path"] if p["ridge"] == row["chosen_ridge"])


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def summary(args) -> None:
    rows = [json.loads(line) for path in args.results for line in path.open()]
    tasks = sorted({(r["dataset"], r["shots"]) for r in rows})
    seen = list(dict.fromkeys(r["variant"] for r in rows))
    variants = [v for v in DEPTHS if v in seen] + [v for v in seen if v not in DEPTHS]
    cells = defaultdict(list)
    for r in rows:
        cells[(r["variant"], r["dataset"], r["shots"])].append(r)
    sizes = "/".join(str(n) for n in sorted({r.get("image_size", DEFAULT_IMAGE_SIZE) for r in rows}))
    grid = sorted({p["ridge"] for r in rows for p in r["path"]}, reverse=True)
    lines = [
        "# Defaults chosen on validation data",
        "",
        f"Made by `benchmarks/defaults.py` ({DEFAULT_MODEL}, {sizes} px; training images drawn as "
        "`lqf-hub train` draws them; scored by the solver's choice of λ of the time of the run — before 2026-12-03 "
        "20% of them per class held out, since then 5-fold cross-validation; **no test image is read**). Each "
        "cell: held-out accuracy % at the λ the one-standard-error rule picks from the grid "
        f"{grid}, mean ± sd over seeds (n = seeds), then the mean held-out loss (MSE to α·one-hot; "
        "comparable only between variants with the same α). Commands: the docstring of `benchmarks/defaults.py`.",
        "",
        "| variant | " + " | ".join(f"{d} {s}-shot" for d, s in tasks) + " |",
        "|---|" + "---:|" * len(tasks),
    ]
    for variant in variants:
        row = [variant]
        for dataset, shots in tasks:
            runs = cells.get((variant, dataset, shots), [])
            if not runs:
                row.append("")
                continue
            accuracy = [100 * _at_chosen(r)["validation_accuracy"] for r in runs]
            loss = statistics.mean(_at_chosen(r)["validation_loss"] for r in runs)
            row.append(f"{_mean_sd(accuracy)} (n={len(runs)}; loss {loss:.1f})")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## λ chosen by the one-standard-error rule", "",
              "| task | depth | seeds: chosen λ | best-loss λ | path products | seconds |", "|---|---|---|---|---:|---:|"]
    for dataset, shots in tasks:
        for variant, depth in DEPTHS.items():
            runs = cells.get((variant, dataset, shots), [])
            if runs:
                chosen = ", ".join(f"{r['chosen_ridge']:g}" for r in runs)
                best = ", ".join(f"{min(r['path'], key=lambda p: p['validation_loss'])['ridge']:g}" for r in runs)
                products = statistics.mean(r["path_iterations"] for r in runs)
                lines.append(f"| {dataset} {shots}-shot | {depth} | {chosen} | {best} | {products:.0f} | "
                             f"{statistics.mean(r['seconds'] for r in runs):.0f} |")
    lines += _depth_rule(cells, tasks)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.report:
        args.report.write_text(report)


def _depth_rule(cells: dict, tasks: list) -> list[str]:
    """The one-standard-error rule across depths of the linearized tail, per draw: the shallowest depth (fewest
    linearized weights, cheapest pass) whose held-out loss is within one standard error of the best depth's."""
    lines = ["", "## Depth of the linearized tail: the one-standard-error rule across depths", "",
             "Per draw, held-out loss ± standard error at each depth's chosen λ (same held-out images for every "
             "depth); the rule keeps the shallowest depth within one standard error of the best — as for λ.", "",
             "| task | seed | " + " | ".join(DEPTHS.values()) + " | rule picks |", "|---|---:|" + "---:|" * (len(DEPTHS) + 1)]
    for dataset, shots in tasks:
        by_seed = defaultdict(dict)
        for variant in DEPTHS:
            for r in cells.get((variant, dataset, shots), []):
                by_seed[r["seed"]][variant] = _at_chosen(r)
        for seed, points in sorted(by_seed.items()):
            if len(points) < len(DEPTHS):
                continue
            best = min(points.values(), key=lambda p: p["validation_loss"])
            pick = next(v for v in DEPTHS if points[v]["validation_loss"] <= best["validation_loss"] + best["standard_error"])
            cells_text = [f"{points[v]['validation_loss']:.1f} ± {points[v]['standard_error']:.1f}" for v in DEPTHS]
            lines.append(f"| {dataset} {shots}-shot | {seed} | " + " | ".join(cells_text) + f" | {DEPTHS[pick]} |")
    return lines


def paths(args) -> None:
    """One line per row: the λ the rule chose, the λ of lowest held-out loss and that loss ± standard error,
    path products and seconds; then the held-out loss / accuracy % at every λ of the row's grid."""
    for r in (json.loads(line) for path in args.results for line in path.open()):
        best = min(r["path"], key=lambda p: p["validation_loss"])
        print(f"{r['dataset']} {r['shots']}-shot seed {r['seed']} {r['variant']}: chosen {r['chosen_ridge']:g}, "
              f"best {best['ridge']:g} ({best['validation_loss']:.1f} ± {best['standard_error']:.1f}), "
              f"{r['path_iterations']} products, {r['seconds']:.0f} s")
        print("    " + " ".join(f"{p['ridge']:g}:{p['validation_loss']:.1f}/{100 * p['validation_accuracy']:.0f}"
                                for p in r["path"]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("run")
    one.add_argument("--datasets", nargs="+", default=["fashion-mnist", "mnist-5k"])
    one.add_argument("--shots", type=int, nargs="+", default=[10, 100])
    one.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    one.add_argument("--variants", nargs="+", required=True)
    one.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    one.add_argument("--grid", type=float, nargs="+", default=WIDE_GRID, help="λ values (default: %(default)s)")
    one.add_argument("--out", type=Path, required=True)
    table = commands.add_parser("summary")
    table.add_argument("results", type=Path, nargs="+")
    table.add_argument("--report", type=Path)
    each = commands.add_parser("paths")
    each.add_argument("results", type=Path, nargs="+")
    args = parser.parse_args(argv)
    {"run": run, "summary": summary, "paths": paths}[args.command](args)


if __name__ == "__main__":
    main()
