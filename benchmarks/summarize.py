"""Pivot the JSON lines written by transfer.py into a markdown table: one row per method and settings,
one column per dataset and shot count (test accuracy %, and seconds per run).

    python benchmarks/summarize.py benchmarks/results/defaults_grid.jsonl > benchmarks/results/defaults.md
"""

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    columns = sorted({(r["dataset"], r["shots"]) for r in rows})
    table: dict[str, dict] = defaultdict(dict)
    for r in rows:
        name = r["method"] + (" " + ", ".join(f"{k}={v}" for k, v in r["settings"].items()) if r["settings"] else "")
        table[name][(r["dataset"], r["shots"])] = r
    setup = rows[0]
    print(f"Backbone {setup['backbone']}, {setup['image_size']} px, test: {setup['test_per_class']} images per class "
          f"(stratified, fixed seed), training seed {setup['seed']}; accuracy % (seconds per run, 2-core CPU).\n")
    print("| method | " + " | ".join(f"{d} {s}-shot" for d, s in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, cells in sorted(table.items()):
        values = []
        for column in columns:
            r = cells.get(column)
            values.append("" if r is None else f"{100 * r['accuracy']:.1f} ({r.get('seconds', 0):.0f} s)")
        print(f"| {name} | " + " | ".join(values) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
