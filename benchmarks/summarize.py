"""Pivot the JSON lines written by transfer.py into a markdown table: one row per method and settings,
one column per dataset and shot count (test accuracy % and seconds per run; mean and spread over seeds).

    python benchmarks/summarize.py benchmarks/results/defaults_grid.jsonl benchmarks/results/tuning_grid.jsonl
"""

import json
import statistics
import sys
from collections import Counter, defaultdict


def main(paths: list[str]) -> None:
    rows = [json.loads(line) for path in paths for line in open(path) if line.strip()]
    columns = sorted({(r["dataset"], r["shots"]) for r in rows})
    # the usual LQF epoch count per shot count; other counts are named in the row
    usual = {shots: Counter(r["epochs"] for r in rows if r["method"] == "lqf" and r["shots"] == shots).most_common(1)
             for shots in sorted({r["shots"] for r in rows})}
    usual = {shots: counts[0][0] for shots, counts in usual.items() if counts}
    table: dict[str, dict] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        name = r["method"] + (" " + ", ".join(f"{k}={v}" for k, v in r["settings"].items()) if r["settings"] else "")
        if r["method"] == "lqf" and r["epochs"] != usual[r["shots"]]:
            name += f" ({r['epochs']} epochs)"
        table[name][(r["dataset"], r["shots"])].append(r)
    setup = rows[0]
    epochs = ", ".join(f"{e} at {s} shots" for s, e in usual.items())
    print(f"Backbone {setup['backbone']}, {setup['image_size']} px, test: {setup['test_per_class']} images per class "
          f"(stratified; the seed also draws the training images), batch {setup['batch_size']}, LQF epochs {epochs} "
          "unless noted; test accuracy % (seconds per run on a 2-core CPU, shared with other work: a rough guide).\n")
    print("| method | " + " | ".join(f"{d} {s}-shot" for d, s in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, cells in sorted(table.items()):
        values = []
        for column in columns:
            runs = cells.get(column, [])
            values.append(_cell(runs) if runs else "")
        print(f"| {name} | " + " | ".join(values) + " |")
    solved = [r for r in rows if "relative_gradient_norm" in r]
    if solved:
        print("\nSolver runs: the chosen λ and the certificate.\n")
        print("| dataset | shots | seed | λ | relative gradient | suboptimality bound | path + refit products | "
              "test acc % | seconds |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in solved:
            print(f"| {r['dataset']} | {r['shots']} | {r['seed']} | {r['ridge']:g} | {r['relative_gradient_norm']:.1e} | "
                  f"{r['suboptimality_bound']:.1e} | {r['path_iterations']} + {r['iterations']} | "
                  f"{100 * r['accuracy']:.1f} | {r['seconds']:.0f} |")


def _cell(runs: list[dict]) -> str:
    accuracy = [100 * r["accuracy"] for r in runs]
    seconds = statistics.mean(r.get("seconds", 0) for r in runs)
    if len(runs) == 1:
        return f"{accuracy[0]:.1f} ({seconds:.0f} s)"
    return f"{statistics.mean(accuracy):.1f} ± {statistics.stdev(accuracy):.1f} ({len(runs)} seeds, {seconds:.0f} s)"


if __name__ == "__main__":
    main(sys.argv[1:])
