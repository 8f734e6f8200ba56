"""The evidence against cross-validation as the rule that chooses the prior and λ (issue #25, deliverable 3).

Per draw of a task of the validation suite (``defaults.py``; the balanced tasks), with the default settings:

* cross-validation: the solver's own choice (``LQFTrainer.select``: raced 5-fold paths, one-SE rule);
* the evidence: ``lqf_hub.solver.evidence.evidence_path`` of every prior over all the training images, the
  (prior, λ) of the largest evidence;

each choice refit to the certificate on the training images and scored on validation images: a stratified fifth
of the task's train split held out before the training images are drawn from the rest. No test image is read.
Products with G (passes over the training images) are counted for each rule.

    python benchmarks/evidence.py run --tasks fashion-mnist mnist-5k fashion-upper digits --shots 20 --seeds 0 \\
        --out benchmarks/results/evidence.jsonl          # the committed rows: --seeds 0, then --seeds 1
    python benchmarks/evidence.py summary benchmarks/results/evidence.jsonl --report benchmarks/results/evidence.md
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from defaults import build, load_task

from lqf_hub import LQFTrainer, LQFTrainingArguments
from lqf_hub.data import class_names, sample_shots, split_validation, with_transform
from lqf_hub.files import atomic_write_text
from lqf_hub.solver.evidence import EVIDENCE_TOLERANCE, evidence_path
from lqf_hub.solver.solve import solve
from lqf_hub.training.objective import trunk_outputs

VARIANT = "linearize=last:1"  # the defaults
VALIDATION_PER_CLASS = 100


def score_draw(task: str, model_name: str, shots: int, seed: int, probes: int) -> dict:
    pool, held = split_validation(load_task(task, "train"), 0.2, seed=seed)
    train = sample_shots(pool, shots, seed=seed)
    validation = sample_shots(held, VALIDATION_PER_CLASS, seed=1000 + seed, at_most=True)
    classes = len(class_names(train))
    model = build(model_name, VARIANT, classes)
    row = {"task": task, "model": model_name, "shots": shots, "seed": seed, "images": len(train),
           "validation_images": len(validation)}
    with tempfile.TemporaryDirectory() as out:
        args = LQFTrainingArguments(output_dir=out, seed=seed, progress=False)
        trainer = LQFTrainer(model, with_transform(train, model.data_config), None, args)
        trainer.inputs("train")
        started = time.perf_counter()
        selection = trainer.select()
        cv_seconds = time.perf_counter() - started
        data, metrics = trainer.data_term(), trainer.priors()
        started = time.perf_counter()
        paths = {kind: evidence_path(data, metric, args.ridge_grid, probes=probes, seed=seed,
                                     tolerance=EVIDENCE_TOLERANCE, max_iterations=args.max_iterations)
                 for kind, metric in metrics.items()}
        evidence_seconds = time.perf_counter() - started
        best = max(((kind, path.best) for kind, path in paths.items()),
                   key=lambda choice: dict(zip(paths[choice[0]].ridges, paths[choice[0]].log_evidence))[choice[1]])
        z = trunk_outputs(model, with_transform(validation, model.data_config)).values
        labels = torch.as_tensor([int(label) for label in validation["label"]])
        for rule, (kind, ridge), products, seconds in (
                ("cross-validation", (selection.prior, selection.ridge), sum(selection.products.values()), cv_seconds),
                ("evidence", best, sum(p.products for p in paths.values()), evidence_seconds)):
            delta, certificate = solve(data, metrics[kind], ridge, tolerance=args.tolerance,
                                       max_iterations=args.max_iterations)
            with torch.no_grad():
                for name, part in data.flat.unflatten(delta).items():
                    model.linearized_parameters[name].copy_(part)
                outputs = model(trunk_output=torch.as_tensor(z).to(data.dtype))
            targets = model.config.target_scale * torch.nn.functional.one_hot(labels, classes)
            row[rule] = {"prior": kind, "ridge": ridge, "products": products, "passes": products if rule == "evidence"
                         else selection.passes, "seconds": seconds, "refit_iterations": certificate.iterations,
                         "validation_accuracy": 100 * float((outputs.argmax(-1) == labels).double().mean()),
                         "validation_loss": float(0.5 * (outputs.double() - targets).square().sum(-1).mean())}
        row["evidence_paths"] = {kind: path.to_dict() for kind, path in paths.items()}
    return row


def run(args) -> None:
    done = set()
    if args.out.exists():
        done = {(r["task"], r["model"], r["shots"], r["seed"]) for r in map(json.loads, args.out.open())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for shots in args.shots:
        for seed in args.seeds:
            for task in args.tasks:
                if (task, args.model, shots, seed) in done:
                    continue
                row = score_draw(task, args.model, shots, seed, args.probes)
                print(json.dumps({k: v for k, v in row.items() if k != "evidence_paths"}), flush=True)
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")


def summary(args) -> None:
    rows = [json.loads(line) for path in args.results for line in path.open()]
    lines = ["# The evidence against cross-validation: the choice of the prior and λ", "",
             "Made by `benchmarks/evidence.py` (commands in its docstring). Each rule's choice refit to the "
             "certificate on the same training images and scored on held-out validation images of the task's train "
             "split (no test image). Passes: the rule's products with G, in passes over all the training images (a "
             "fold's product covers 4/5 of them).", "",
             "| task | shots | seed | cross-validation: prior, λ | evidence: prior, λ "
             "| validation accuracy % (CV / evidence) | validation loss (CV / evidence) | passes (CV / evidence) |",
             "|---|---:|---:|---|---|---|---|---|"]
    differences = []
    for r in rows:
        cv, ev = r["cross-validation"], r["evidence"]
        differences.append(ev["validation_accuracy"] - cv["validation_accuracy"])
        lines.append(f"| {r['task']} | {r['shots']} | {r['seed']} | {cv['prior']} {cv['ridge']:g} | {ev['prior']} "
                     f"{ev['ridge']:g} | {cv['validation_accuracy']:.1f} / {ev['validation_accuracy']:.1f} | "
                     f"{cv['validation_loss']:.2f} / {ev['validation_loss']:.2f} | {cv['passes']:.0f} / "
                     f"{ev['passes']:.0f} |")
    if len(differences) > 1:
        mean, error = statistics.mean(differences), statistics.stdev(differences) / len(differences) ** 0.5
        noise = " (within noise)" if abs(mean) < 2 * error else ""
        lines += ["", f"Evidence − cross-validation, validation accuracy: {mean:+.2f} ± {error:.2f} points (mean ± "
                      f"standard error over {len(differences)} draws){noise}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.report:
        atomic_write_text(args.report, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("run")
    one.add_argument("--tasks", nargs="+", default=["fashion-mnist", "mnist-5k", "fashion-upper", "digits"])
    one.add_argument("--model", default="tf_efficientnet_lite0")
    one.add_argument("--shots", type=int, nargs="+", default=[20, 100])
    one.add_argument("--seeds", type=int, nargs="+", default=[0])
    one.add_argument("--probes", type=int, default=2, help="Hutchinson probes of the log-determinant. Default: 2.")
    one.add_argument("--out", type=Path, required=True)
    table = commands.add_parser("summary")
    table.add_argument("results", type=Path, nargs="+")
    table.add_argument("--report", type=Path)
    args = parser.parse_args()
    {"run": run, "summary": summary}[args.command](args)


if __name__ == "__main__":
    main()
