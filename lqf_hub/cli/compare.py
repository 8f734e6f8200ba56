"""``lqf-hub compare``."""

import argparse
from pathlib import Path
from typing import Any

from .common import OUTPUT_MARKER, add_dataclass_options, check_output_dir, dataclass_values


def add_parser(commands: argparse._SubParsersAction) -> None:
    """``lqf-hub compare``'s options."""
    compare = commands.add_parser(
        "compare", help="LQF against fine-tuning, a linear probe and ablations over shots and seeds, on one dataset.")
    compare.add_argument("--preset", default="cpu", choices=["cpu", "cpu128", "gpu"],
                         help="Defaults of the sweep: 'cpu' (2 cores, 64 px, 2/5/10 shots, 3 seeds; fine-tuning, the "
                              "probe, lqf and lqf-head: about 15 minutes of runs per dataset, the ablations with "
                              "--methods 25-40 more), 'cpu128' (2 cores, the default job's 128 px, 5/20/100 shots: "
                              "a working day per dataset) or 'gpu'. Default: cpu.")
    compare.add_argument("--output-dir", default="compare-output", help="Runs, report and plot. Default: compare-output.")
    compare.add_argument("--overwrite", action="store_true", help="Allow writing into a directory that is not an lqf output.")
    from ..compare.runner import CompareSettings

    add_dataclass_options(compare, CompareSettings, "compare.")


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    import dataclasses
    import shlex

    from ..compare.runner import PRESETS, run_comparison

    settings = dataclasses.replace(PRESETS[args.preset], **dataclass_values(args, "compare."))
    output = Path(args.output_dir)
    check_output_dir(output, args.overwrite, None)
    output.mkdir(parents=True, exist_ok=True)
    (output / OUTPUT_MARKER).write_text("written by lqf-hub compare\n")
    run_comparison(settings, output, command="lqf-hub " + shlex.join(argv))
    print((output / "results.md").read_text().split("\n## ")[0])
    return {"report": str(output / "results.md"), "plot": str(output / "error_vs_shots.png"),
            "runs": str(output / "runs.jsonl")}
