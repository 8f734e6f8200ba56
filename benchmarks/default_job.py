"""The default job's time: `lqf-hub train` as a user runs it, wall clock from process start to exit.

Each run is one `lqf-hub train` process (start-up, data loading, caching, the solver, the probe, saving),
with optional extra options; its metrics and wall time are appended to a JSON-lines file, and the report
tabulates them. Run it on an otherwise idle machine: times are only comparable between runs that had the
machine to themselves.

    python benchmarks/default_job.py run --out benchmarks/results/default_job.jsonl
    python benchmarks/default_job.py run --out benchmarks/results/default_job.jsonl -- --linearize last:3
    python benchmarks/default_job.py report benchmarks/results/default_job.jsonl \\
        --report benchmarks/results/default_job.md
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_SECONDS = 300


def run(args) -> None:
    with tempfile.TemporaryDirectory() as out:
        command = ["lqf-hub", "train", "--output-dir", out, *args.options]
        started = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - started
        metrics = json.loads((Path(out) / "metrics.json").read_text())
    row = {"options": args.options, "wall_seconds": wall, "cpus": os.cpu_count(), **metrics}
    with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


def report(args) -> None:
    rows = [json.loads(line) for line in args.results.open()]
    lines = [
        "# The default job's time",
        "",
        "Made by `benchmarks/default_job.py` (commands in its docstring): `lqf-hub train` as a user runs it, wall "
        f"clock from process start to exit, on a {rows[0]['cpus']}-CPU machine; the budget is {BUDGET_SECONDS} s.",
        "",
        "| options | wall s | solver s | within budget | test accuracy % | probe % | λ | relative gradient | "
        "suboptimality bound | products (path + refit) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {' '.join(r['options']) or '(defaults)'} | {r['wall_seconds']:.0f} | {r['seconds']:.0f} | "
            f"{'yes' if r['wall_seconds'] <= BUDGET_SECONDS else 'no'} | {100 * r['test_accuracy']:.2f} | "
            f"{100 * r['probe_accuracy']:.2f} | {r['ridge']:g} | {r['relative_gradient_norm']:.1e} | "
            f"{r['suboptimality_bound']:.1e} | {r['path_iterations']} + {r['iterations']} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.report:
        args.report.write_text(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("run", help="one `lqf-hub train` run, timed")
    one.add_argument("--out", type=Path, required=True)
    one.add_argument("options", nargs="*", help="extra `lqf-hub train` options (after --)")
    table = commands.add_parser("report")
    table.add_argument("results", type=Path)
    table.add_argument("--report", type=Path)
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()
