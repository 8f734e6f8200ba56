"""Pivot the JSON lines written by transfer.py into a markdown table: one row per method and settings,
one column per dataset and shot count (test accuracy % and seconds per run).

    python benchmarks/summarize.py benchmarks/results/defaults_grid.jsonl benchmarks/results/tuning_grid.jsonl
"""

import json
import sys
from collections import Counter, defaultdict


def main(paths: list[str]) -> None:
    rows = [json.loads(line) for path in paths for line in open(path) if line.strip()]
    columns = sorted({(r["dataset"], r["shots"]) for r in rows})
    # the usual LQF epoch count per shot count; other counts are named in the row
    usual = {shots: Counter(r["epochs"] for r in rows if r["method"] == "lqf" and r["shots"] == shots).most_common(1)
             for shots in sorted({r["shots"] for r in rows})}
    usual = {shots: counts[0][0] for shots, counts in usual.items() if counts}
    table: dict[str, dict] = defaultdict(dict)
    for r in rows:
        name = r["method"] + (" " + ", ".join(f"{k}={v}" for k, v in r["settings"].items()) if r["settings"] else "")
        if r["method"] == "lqf" and r["epochs"] != usual[r["shots"]]:
            name += f" ({r['epochs']} epochs)"
        table[name][(r["dataset"], r["shots"])] = r
    setup = rows[0]
    epochs = ", ".join(f"{e} at {s} shots" for s, e in usual.items())
    print(f"Backbone {setup['backbone']}, {setup['image_size']} px, test: {setup['test_per_class']} images per class "
          f"(stratified, fixed seed), training seed {setup['seed']}, batch {setup['batch_size']}, LQF epochs {epochs} "
          "unless noted; test accuracy % (seconds per run on a 2-core CPU, shared with other work: a rough guide).\n")
    print("| method | " + " | ".join(f"{d} {s}-shot" for d, s in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, cells in sorted(table.items()):
        values = []
        for column in columns:
            r = cells.get(column)
            values.append("" if r is None else f"{100 * r['accuracy']:.1f} ({r.get('seconds', 0):.0f} s)")
        print(f"| {name} | " + " | ".join(values) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
