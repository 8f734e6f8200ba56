"""One problem, one optimum: default `lqf-hub train` runs that differ in data order or process count agree.

The default job (Lite0, 128 px, Fashion-MNIST 100 images per class, seed 0, the solver) is run with the
training images in their usual order, in another order, and on two processes; ``compare`` loads the
saved models and checks that they predict the same on the test images. On the training images the root
mean square of the logit difference is bounded by the certificates: with suboptimality ε₁, ε₂ and
``H = G + λM ⪰ G``, ``mean_i ‖J_i(δ₁ − δ₂)‖² ≤ ‖δ₁ − δ₂‖²_H ≤ (√(2ε₁) + √(2ε₂))²``.

    python benchmarks/optimum.py run --out runs/order-0
    python benchmarks/optimum.py run --order-seed 1 --out runs/order-1
    accelerate launch --multi_gpu --num_processes 2 benchmarks/optimum.py run --out runs/two-processes
    python benchmarks/optimum.py compare runs/order-0 runs/order-1 runs/two-processes \\
        --report benchmarks/results/optimum.md
"""

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lqf_hub import LQFConfig, LQFModel, LQFTrainer, LQFTrainingArguments
from lqf_hub.cli import DEFAULT_IMAGE_SIZE, DEFAULT_MODEL
from lqf_hub.data import collate, load_image_dataset, sample_shots, with_transform


def datasets(seed: int, shots: int, test_per_class: int):
    """The default job's images: the same draws as `lqf-hub train`."""
    train = sample_shots(load_image_dataset("fashion-mnist", "train"), shots, seed=seed)
    test = sample_shots(load_image_dataset("fashion-mnist", "test"), test_per_class, seed=1000 + seed, at_most=True)
    return train, test


def run(args) -> None:
    train, test = datasets(args.seed, args.shots, args.test_per_class)
    if args.order_seed is not None:  # the same images, visited in another order
        train = train.shuffle(seed=args.order_seed)
    model = LQFModel.from_timm(DEFAULT_MODEL, 10, LQFConfig())
    model.set_image_size(DEFAULT_IMAGE_SIZE)
    training = LQFTrainingArguments(output_dir=str(args.out), seed=args.seed)
    trainer = LQFTrainer(model, with_transform(train, model.data_config), with_transform(test, model.data_config),
                         training)
    started = time.perf_counter()
    final = trainer.train()[-1]
    if trainer.accelerator.is_main_process:
        summary = {**final, "wall_seconds": time.perf_counter() - started, "processes": trainer.accelerator.num_processes,
                   "order_seed": args.order_seed}
        (args.out / "run.json").write_text(json.dumps(summary, indent=2))


@torch.no_grad()
def logits(model: LQFModel, dataset) -> torch.Tensor:
    outputs = []
    for pixels, _ in DataLoader(dataset, batch_size=100, collate_fn=collate):
        outputs.append(model(trunk_output=model.encode_trunk(pixels)))
    return torch.cat(outputs).double()


def compare(args) -> None:
    train, test = datasets(args.seed, args.shots, args.test_per_class)
    runs = {}
    for directory in args.runs:
        model = LQFModel.from_pretrained(directory / "model").eval()
        summary = json.loads((directory / "run.json").read_text())
        runs[directory.name] = {"summary": summary, "test": logits(model, with_transform(test, model.data_config)),
                                "train": logits(model, with_transform(train, model.data_config))}
    lines = [
        "# One problem, one optimum",
        "",
        f"Made by the commands in `benchmarks/optimum.py` (default job: {DEFAULT_MODEL}, {DEFAULT_IMAGE_SIZE} px, "
        f"Fashion-MNIST {args.shots} images per class, seed {args.seed}; {len(test)} test images).",
        "",
        "| run | processes | order | test accuracy % | λ | relative gradient | suboptimality bound | products "
        "(path + refit) | solver s | wall s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in runs.items():
        s = r["summary"]
        order = "as drawn" if s["order_seed"] is None else f"shuffled (seed {s['order_seed']})"
        lines.append(f"| {name} | {s['processes']} | {order} | {100 * s['eval_accuracy']:.2f} | {s['ridge']:g} | "
                     f"{s['relative_gradient_norm']:.1e} | {s['suboptimality_bound']:.1e} | "
                     f"{s['path_iterations']} + {s['iterations']} | {s['seconds']:.0f} | {s['wall_seconds']:.0f} |")
    lines += ["", "| pair | same test argmax % | test max abs Δlogit | test RMS Δlogit | train RMS Δlogit | "
              "bound on train RMS Δlogit |", "|---|---:|---:|---:|---:|---:|"]
    worst = 100.0
    for (a, ra), (b, rb) in itertools.combinations(runs.items(), 2):
        same = 100 * float((ra["test"].argmax(-1) == rb["test"].argmax(-1)).double().mean())
        worst = min(worst, same)
        test_diff, train_diff = ra["test"] - rb["test"], ra["train"] - rb["train"]
        bound = math.sqrt(2 * ra["summary"]["suboptimality_bound"]) + math.sqrt(2 * rb["summary"]["suboptimality_bound"])
        train_rms = float(train_diff.square().sum(-1).mean().sqrt())
        lines.append(f"| {a} / {b} | {same:.2f} | {float(test_diff.abs().max()):.2e} | "
                     f"{float(test_diff.square().sum(-1).mean().sqrt()):.2e} | {train_rms:.2e} | {bound:.2e} |")
        if train_rms > bound:
            raise SystemExit(f"{a} / {b}: the training logits differ by more than the certificates allow")
    lines += ["", f"Lowest agreement of test predictions between two runs: {worst:.2f}%. Solver s: the prior, the "
              "λ path, the refit and the evaluation; wall s adds start-up and caching (times are only comparable "
              "between runs that had the machine to themselves)."]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.report:
        args.report.write_text(report)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("run", help="one default training run")
    one.add_argument("--out", type=Path, required=True)
    one.add_argument("--order-seed", type=int, help="shuffle the training images with this seed")
    check = commands.add_parser("compare", help="compare the saved models of some runs")
    check.add_argument("runs", type=Path, nargs="+")
    check.add_argument("--report", type=Path)
    for command in (one, check):
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--shots", type=int, default=100)
        command.add_argument("--test-per-class", type=int, default=200)
    args = parser.parse_args(argv)
    run(args) if args.command == "run" else compare(args)


if __name__ == "__main__":
    main()
