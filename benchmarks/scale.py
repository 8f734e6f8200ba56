"""What the certified default costs as the training set grows: Fashion-MNIST, 64 px, N = 1 000 … 60 000 images.

    python benchmarks/scale.py run --sizes 1000 4000 16000 60000 --out benchmarks/results/scale/runs.jsonl
    python benchmarks/scale.py run --sizes 4000 --cache-dtype float16 --out benchmarks/results/scale/runs.jsonl
    python benchmarks/scale.py fine-tune --epochs 2 --out benchmarks/results/scale/fine_tuning.jsonl
    python benchmarks/scale.py summary benchmarks/results/scale/*.jsonl --report benchmarks/results/scale/scale.md

Each size is one ``lqf-hub train`` with the defaults but ``--image-size 64``, on ``N/10`` training images per
class (``--shots 0``: all 60 000), scored on all 10 000 test images (``--eval-per-class 0``), no probe; run
under ``/usr/bin/time -v`` in its own process so that its wall time and peak RSS are its own. The command's
``metrics.json`` gives the seconds per stage (caching the trunk outputs of the training and test images, the
objective's right-hand side and K-FAC, the choice of the prior and λ, the certified refit, the evaluation),
products with the data and passes over it. ``--cold`` adds, for sizes up to 16 000, the products of one
certified solve from zero at the chosen prior and λ (the reference of the "passes ≤ 3 × one solve" target).
Beside each, fine-tuning's seconds per epoch on the same number of images: the median of timed SGD steps
(batch 32, every weight, 64 px) times the steps of an epoch. Sizes already in ``--out`` are skipped.

``fine-tune`` trains the backbone itself on all 60 000 images at 64 px (``lqf_hub.compare.baselines.fine_tune``:
SGD with momentum, cosine schedule, label smoothing 0.1, batch 32) for ``--epochs`` and reads the 10 000 test
images once. Its learning rate (0.01) is not tuned here — 2 cores afford no grid at this size: it is the rate
``lqf-hub compare`` chose on held-out images in the committed 100-shot runs (0.01 on 3 of 6 draws, 0.03 on the
other 3; the smaller one for the many more steps of 60 000 images).
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL, IMAGE_SIZE, TEST_IMAGES = "tf_efficientnet_lite0", 64, 10_000
FINE_TUNE_BATCH, FINE_TUNE_STEPS = 32, 30


def fine_tune_step_seconds(steps: int = FINE_TUNE_STEPS) -> float:
    """Median seconds of one fine-tuning step of the backbone at ``IMAGE_SIZE`` (batch 32, SGD with momentum,
    every weight; random weights and images: the cost depends on the shapes only)."""
    import timm

    network = timm.create_model(MODEL, num_classes=10).train()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(FINE_TUNE_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
    targets = torch.randint(0, 10, (FINE_TUNE_BATCH,))
    times = []
    for step in range(steps + 3):  # three warm-up steps
        started = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(network(images), targets).backward()
        optimizer.step()
        if step >= 3:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def run_size(size: int, cache_dtype: str, cold: bool, directory: Path) -> dict:
    """One ``lqf-hub train`` at ``size`` images under ``/usr/bin/time -v``: its metrics.json, wall and peak RSS."""
    shots = "0" if size == 60_000 else str(size // 10)
    command = ["/usr/bin/time", "-v", "lqf-hub", "train", "--shots", shots, "--image-size", str(IMAGE_SIZE),
               "--eval-per-class", "0", "--no-probe", "--output-dir", str(directory), "--cache-dtype", cache_dtype]
    print("$", " ".join(command[2:]), flush=True)
    done = subprocess.run(command, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"lqf-hub train failed at N = {size}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", done.stderr).group(1)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    metrics = json.loads((directory / "metrics.json").read_text())
    metrics.pop("selection", None)
    row = {"images": size, "cache_dtype": cache_dtype, "wall_seconds": _seconds(wall), "peak_rss_gb": rss_kb / 2**20,
           **{k: metrics[k] for k in ("test_accuracy", "prior", "ridge", "iterations", "path_iterations", "path_products",
                                      "dropped_priors", "selection_passes", "passes", "stage_seconds",
                                      "relative_gradient_norm")},
           "scheme": json.loads((directory / "checkpoints" / "selection" / "trainer_state.json").read_text())
           ["selection"].get("scheme", "")}
    if cold and size <= 16_000:
        row["cold_solve_products"] = cold_solve_products(directory, row["prior"], row["ridge"])
    step = fine_tune_step_seconds()
    row.update(fine_tune_step_seconds=step, fine_tune_epoch_seconds=step * size / FINE_TUNE_BATCH)
    return row


def cold_solve_products(directory: Path, prior: str, ridge: float) -> int:
    """Products of one certified solve from zero at ``prior`` and ``ridge`` over the run's training images
    (its trunk outputs recomputed: the run keeps none)."""
    from lqf_hub import LQFModel, LQFTrainer, LQFTrainingArguments
    from lqf_hub.data import load_image_dataset, sample_shots, with_transform
    from lqf_hub.solver.solve import solve

    model = LQFModel.from_pretrained(directory / "model")
    source = model.training_summary["train_data"]
    train = load_image_dataset(source["dataset"], source["split"])
    if source["shots"]:
        train = sample_shots(train, source["shots"], seed=source["seed"])
    trainer = LQFTrainer(model, with_transform(train, model.data_config), None,
                         LQFTrainingArguments(output_dir=str(directory / "cold"), prior=prior, progress=False))
    data, metric = trainer.data_term(), trainer.priors(prior)[prior]
    return solve(data, metric, ridge, tolerance=trainer.args.tolerance, max_iterations=500)[1].iterations


def fine_tune_all(args: argparse.Namespace) -> None:
    """Fine-tune every weight on all training images at ``IMAGE_SIZE``; test accuracy and seconds to ``--out``."""
    from lqf_hub.adapters import backbone_from_name
    from lqf_hub.compare.baselines import accuracy, fine_tune
    from lqf_hub.data import load_image_dataset, with_transform

    backbone = backbone_from_name(MODEL)
    data_config = {**backbone.data_config, "input_size": [3, IMAGE_SIZE, IMAGE_SIZE]}
    train = with_transform(load_image_dataset("fashion-mnist", "train"), data_config)
    test = with_transform(load_image_dataset("fashion-mnist", "test"), data_config)
    started = time.perf_counter()
    model = fine_tune(backbone.network, backbone.num_features, 10, train, epochs=args.epochs,
                      learning_rate=args.learning_rate, label_smoothing=0.1, progress=True)
    seconds = time.perf_counter() - started
    row = {"method": "fine-tuning", "images": len(train), "epochs": args.epochs, "learning_rate": args.learning_rate,
           "seconds": seconds, "test_accuracy": accuracy(model, test), "test_images": len(test)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with Path(args.out).open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


def _seconds(clock: str) -> float:
    parts = [float(p) for p in clock.split(":")]
    return sum(p * 60**i for i, p in enumerate(reversed(parts)))


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    done = set()
    if out.exists():
        done = {(r["images"], r["cache_dtype"]) for r in map(json.loads, out.read_text().splitlines())}
    for size in args.sizes:
        if (size, args.cache_dtype) in done:
            print(f"N = {size} ({args.cache_dtype}) is in {out}; skipped")
            continue
        with tempfile.TemporaryDirectory() as scratch:
            row = run_size(size, args.cache_dtype, args.cold, Path(scratch) / "run")
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


# ------------------------------------------------------------------------------------------- report
STAGES = ("caching", "objective", "selection", "refit", "evaluation")


def summary(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for path in args.files for line in Path(path).read_text().splitlines()]
    tuned = [r for r in rows if r.get("method") == "fine-tuning"]
    rows = [r for r in rows if r.get("method") != "fine-tuning"]
    main = sorted((r for r in rows if r["cache_dtype"] == "float32"), key=lambda r: r["images"])
    lines = ["| images | " + " | ".join(f"{s} s" for s in STAGES) + " | wall | peak RSS | passes (choice + refit) | "
             "products: paths / refit | one solve from zero | test accuracy | prior, λ | fine-tuning s/epoch |",
             "|" + "---|" * (len(STAGES) + 9)]
    for r in main:
        stages = " | ".join(f"{r['stage_seconds'].get(s, 0):.0f}" for s in STAGES)
        lines.append(f"| {r['images']:,} | {stages} | {_clock(r['wall_seconds'])} | {r['peak_rss_gb']:.1f} GB | "
                     f"{r['passes']:.1f} ({r['selection_passes']:.1f} + {r['iterations']}) | "
                     f"{r['path_iterations']} / {r['iterations']} | {r.get('cold_solve_products', '–')} | "
                     f"{100 * r['test_accuracy']:.2f}% | {r['prior']}, {r['ridge']:g} | "
                     f"{r['fine_tune_epoch_seconds']:.0f} |")
    lines += ["", "How each size chose the prior and λ:", ""]
    lines += [f"- {r['images']:,}: {r['scheme']}; products by prior {r['path_products']}, dropped {r['dropped_priors']}"
              for r in main]
    smallest = main[0]
    lines += ["", f"Linear in N within 1.5× (each stage at N against N / {smallest['images']:,} × its time at "
              f"{smallest['images']:,}):", ""]
    for r in main[1:]:
        factor = r["images"] / smallest["images"]
        ratios = ", ".join(f"{s} {r['stage_seconds'].get(s, 0) / (factor * smallest['stage_seconds'][s]):.2f}"
                           for s in STAGES if smallest["stage_seconds"].get(s))
        lines.append(f"- {r['images']:,}: {ratios}")
    cold = [r for r in main if r.get("cold_solve_products")]
    if cold:
        lines += ["", "Passes to the certified model against one certified solve from zero at the chosen prior and λ "
                  "(target ≤ 3× at N ≥ 10 000):", ""]
        lines += [f"- {r['images']:,}: {r['passes']:.1f} / {r['cold_solve_products']} = "
                  f"{r['passes'] / r['cold_solve_products']:.2f}×" for r in cold]
    half = [r for r in rows if r["cache_dtype"] == "float16"]
    for r in half:
        twin = next((m for m in main if m["images"] == r["images"]), None)
        if twin is not None:
            lines += ["", f"float16 trunk outputs at {r['images']:,} images: test accuracy {100 * r['test_accuracy']:.2f}% "
                      f"against {100 * twin['test_accuracy']:.2f}% (float32), prior {r['prior']} λ {r['ridge']:g} against "
                      f"{twin['prior']} λ {twin['ridge']:g}, peak RSS {r['peak_rss_gb']:.2f} against {twin['peak_rss_gb']:.2f} GB."]
    largest = main[-1]
    for r in tuned:
        error, lqf_error = 1 - r["test_accuracy"], 1 - largest["test_accuracy"]
        lines += ["", f"Fine-tuning on the same {r['images']:,} images, {r['epochs']} epochs at learning rate "
                  f"{r['learning_rate']:g}: {100 * r['test_accuracy']:.2f}% on the {r['test_images']:,} test images in "
                  f"{_clock(r['seconds'])}, against LQF's {100 * largest['test_accuracy']:.2f}% in "
                  f"{_clock(largest['wall_seconds'])} (relative test error {100 * (lqf_error / error - 1):+.0f}%)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.report:
        Path(args.report).write_text(text)
        plot(main, Path(args.report).with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    """Seconds per stage and fine-tuning's seconds per epoch against N, log-log, with the line of slope 1."""
    from lqf_hub.plotting import save_png, subplots

    sizes = [r["images"] for r in rows]
    fig, ax = subplots(figsize=(6.5, 4.5))
    for stage in STAGES:
        ax.plot(sizes, [max(r["stage_seconds"].get(stage, 0), 1e-1) for r in rows], "o-", label=stage)
    ax.plot(sizes, [r["wall_seconds"] for r in rows], "ks-", label="lqf-hub train, wall")
    ax.plot(sizes, [r["fine_tune_epoch_seconds"] for r in rows], "x--", color="grey", label="fine-tuning, one epoch")
    first = rows[0]["wall_seconds"]
    ax.plot(sizes, [first * n / sizes[0] for n in sizes], ":", color="black", label="linear in N")
    ax.set(xscale="log", yscale="log", xlabel="training images", ylabel="seconds (2 cores)",
           title="Certified LQF on Fashion-MNIST, 64 px: cost against N")
    ax.legend(fontsize="small")
    save_png(fig, path)


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run")
    runner.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000, 60000])
    runner.add_argument("--cache-dtype", default="float32", choices=["float32", "float16"])
    runner.add_argument("--cold", action="store_true", help="Also one certified solve from zero (sizes ≤ 16 000).")
    runner.add_argument("--out", required=True)
    tune = commands.add_parser("fine-tune")
    tune.add_argument("--epochs", type=int, default=2)
    tune.add_argument("--learning-rate", type=float, default=0.01)
    tune.add_argument("--out", required=True)
    report = commands.add_parser("summary")
    report.add_argument("files", nargs="+")
    report.add_argument("--report", default=None)
    args = parser.parse_args()
    {"run": run, "fine-tune": fine_tune_all, "summary": summary}[args.command](args)


if __name__ == "__main__":
    main()
