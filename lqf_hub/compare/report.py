"""The report of a comparison: test error per method and shot count (mean ± sd over seeds, relative error
against fine-tuning as in the paper, time to the final model), the targets checked against the numbers,
a PNG of error against shots, and a JSON of every run."""

import dataclasses
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from ..files import atomic_write_text
from ..plotting import save_png, subplots
from .methods import METHODS

BASELINE = "fine-tuning"
ABLATIONS = ("lqf-relu", "lqf-leaky", "lqf-cross-entropy", "lqf-no-kfac", "lqf-kfac-prior")


def shot_order(shots: int) -> float:
    """Sort key of a shot count: 0 (all the training images) last."""
    return math.inf if shots == 0 else shots


def shots_text(shots: int) -> str:
    return "all images" if shots == 0 else f"{shots} shots"


def summarize(runs: list[dict]) -> dict[str, dict[int, dict]]:
    """``{method: {shots: {"error", "sd", "n", "seconds", "relative", "errors" (by seed)}}}``; failed runs count as
    missing. ``relative`` is mean error / fine-tuning's mean error − 1 (None without fine-tuning)."""
    grouped: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        grouped[run["method"]][run["shots"]].append(run)
    table: dict[str, dict[int, dict]] = {}
    for method, by_shots in grouped.items():
        table[method] = {}
        for shots, group in sorted(by_shots.items(), key=lambda item: shot_order(item[0])):
            finished = [r for r in group if not math.isnan(r["error"])]
            errors = [r["error"] for r in finished]
            table[method][shots] = {
                "errors": {r["seed"]: r["error"] for r in finished}, "n": len(errors), "failed": len(group) - len(errors),
                "error": statistics.mean(errors) if errors else math.nan,
                "sd": statistics.stdev(errors) if len(errors) > 1 else math.nan,
                "seconds": statistics.mean(r["seconds"] for r in group),
                "images_per_class": statistics.mean(r.get("images_per_class", shots) for r in group),
            }
    for method in table:
        for shots, cell in table[method].items():
            base = table.get(BASELINE, {}).get(shots)
            cell["relative"] = cell["error"] / base["error"] - 1 if base and base["error"] > 0 else None
    return table


def paired_difference(table: dict, method: str, other: str, shots: int) -> tuple[float, float, int] | None:
    """Mean over seeds of ``method``'s error minus ``other``'s (same draws), its standard error, and n."""
    a, b = table.get(method, {}).get(shots), table.get(other, {}).get(shots)
    if not a or not b:
        return None
    diffs = [a["errors"][s] - b["errors"][s] for s in a["errors"] if s in b["errors"]]
    if not diffs:
        return None
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return statistics.mean(diffs), se, len(diffs)


def targets(table: dict) -> list[str]:
    """The issue's targets, each checked on the numbers (met / missed, with the evidence)."""
    shots = sorted({s for cells in table.values() for s in cells}, key=shot_order)
    lines = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    def diff_text(method: str, other: str, s: int) -> str:
        found = paired_difference(table, method, other, s)
        if found is None:
            return ""
        if found[2] == 1:
            return f"; paired difference {100 * found[0]:+.1f} points on one seed: its noise is not known"
        noise = "; within noise" if not abs(found[0]) > 2 * found[1] else ""
        return f"; paired difference {100 * found[0]:+.1f} ± {100 * found[1]:.1f} points (n={found[2]}){noise}"

    if "lqf" in table and BASELINE in table:
        many = [s for s in shots if shot_order(s) >= 100 and s in table["lqf"] and s in table[BASELINE]]
        if many:
            for s in many:
                rel = table["lqf"][s]["relative"]
                lines.append(f"- ≥ 100 shots, LQF within 5% relative error of fine-tuning: {shots_text(s)} "
                             f"{verdict(rel is not None and rel <= 0.05)} ({_percent(rel)}{diff_text('lqf', BASELINE, s)})")
        else:
            lines.append("- ≥ 100 shots, LQF within 5% relative error of fine-tuning: not run (no shot count ≥ 100)")
        for s in [s for s in shots if shot_order(s) <= 10 and s in table["lqf"] and s in table[BASELINE]]:
            rel = table["lqf"][s]["relative"]
            lines.append(f"- ≤ 10 shots, LQF at least as good as fine-tuning: {s} shots "
                         f"{verdict(rel is not None and rel <= 0)} ({_percent(rel)}{diff_text('lqf', BASELINE, s)})")
    if "lqf" in table:
        for ablation in [a for a in ABLATIONS if a in table]:
            common = [s for s in shots if s in table[ablation] and s in table["lqf"]]
            worse = [s for s in common if table[ablation][s]["error"] > table["lqf"][s]["error"]]
            rel = [table[ablation][s]["error"] / table["lqf"][s]["error"] - 1 for s in common if table["lqf"][s]["error"] > 0]
            mean_rel = statistics.mean(rel) if rel else None
            lines.append(f"- the ablation {ablation} costs accuracy: {verdict(len(worse) == len(common))} "
                         f"(worse than LQF at {len(worse)} of {len(common)} shot counts; relative error vs LQF "
                         f"{_percent(mean_rel)} on average)")
        for other in ("linear-probe", "plain-linearization"):
            if other in table:
                common = [s for s in shots if s in table[other] and s in table["lqf"]]
                better = [s for s in common if table["lqf"][s]["error"] < table[other][s]["error"]]
                lines.append(f"- LQF beats {other} at every shot count: {verdict(len(better) == len(common))} "
                             f"(at {len(better)} of {len(common)})")
    return lines


GRID_KEYS = ("ridge", "learning_rate", "weight_decay", "epochs")


def at_grid_edge(run: dict) -> bool:
    """Whether the chosen value, or on a λ path the one of lowest held-out loss, lies at an end of its grid
    (the grid may then be too narrow)."""
    validation = run.get("validation") or []
    key = next((k for k in GRID_KEYS if validation and k in validation[0]), None)
    if key is None or len({v[key] for v in validation}) < 3:
        return False
    ends = (min(v[key] for v in validation), max(v[key] for v in validation))
    lowest = min(validation, key=lambda v: v["loss"])[key] if key == "ridge" else None
    return run["chosen"][key] in ends or lowest in ends


def markdown(settings, runs: list[dict], command: str | None = None) -> str:
    table = summarize(runs)
    shots = sorted({r["shots"] for r in runs}, key=shot_order)
    seeds = sorted({r["seed"] for r in runs})
    methods = [m for m in METHODS if m in table]
    size = f"{settings.image_size} px" if settings.image_size else "its own resolution"
    test = f"{settings.test_per_class} per class" if settings.test_per_class else "the whole split"
    lines = [f"# LQF against fine-tuning on {settings.dataset} ({settings.model}, {size})", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    lines += [
        f"Test error % (mean ± sd over seeds {', '.join(map(str, seeds))}; the seed draws the training images; test "
        f"images: {test}, the same for every seed and method), the relative error against fine-tuning in brackets "
        "(error / fine-tuning's − 1, the paper's form) and the seconds to the final model, the choice on validation "
        "included. Every hyperparameter was chosen on the training images only: the prior and λ of the solved LQF "
        "variants by the solver's cross-validation over them, the others on a held-out part "
        f"({settings.validation_fraction:.0%} per class); the test images were read once per final model.", "",
        "| method | " + " | ".join(shots_text(s) for s in shots) + " |",
        "|---|" + "---:|" * len(shots),
    ]
    for method in methods:
        cells = []
        for s in shots:
            cell = table[method].get(s)
            if cell is None:
                cells.append("")
                continue
            text = "failed" if cell["n"] == 0 else f"{100 * cell['error']:.1f}"
            if cell["n"] > 1:
                text += f" ± {100 * cell['sd']:.1f}"
            if cell["relative"] is not None and method != BASELINE:
                text += f" ({_percent(cell['relative'])})"
            if cell["failed"]:
                text += f" [{cell['failed']} failed]"
            cells.append(f"{text} · {cell['seconds']:.0f} s")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    totals = {m: sum(r["seconds"] for r in runs if r["method"] == m) for m in methods}
    lines += probability_table(runs, shots)
    lines += ["", f"The runs' seconds add up to {sum(totals.values()) / 60:.0f} minutes (per method: "
              + ", ".join(f"{m} {totals[m] / 60:.1f}" for m in methods) + "); loading the data is not counted."]
    lines += ["", "## Targets (issue #10)", "", *targets(table), "", "## Methods", ""]
    lines += [f"- **{m}**: {METHODS[m].description}" for m in methods]
    lines += ["", "## What each method chose on validation", "",
              "\"grid edge\": the chosen value, or on a λ path the one of lowest held-out loss, lies at an end of "
              "its grid, which may then be too narrow.", "",
              "| method | shots | seed | chosen | test error % | seconds |", "|---|---:|---:|---|---:|---:|"]
    for run in sorted(runs, key=lambda r: (methods.index(r["method"]) if r["method"] in methods else 99,
                                           shot_order(r["shots"]), r["seed"])):
        chosen = ", ".join(f"{k}={v}" for k, v in run.get("chosen", {}).items()) or run.get("failed", "")
        chosen += " (grid edge)" if at_grid_edge(run) else ""
        lines.append(f"| {run['method']} | {run['shots'] or 'all'} | {run['seed']} | {chosen} | {100 * run['error']:.1f} | "
                     f"{run['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def probability_table(runs: list[dict], shots: list[int]) -> list[str]:
    """Markdown lines: test NLL, ECE and Brier score (mean ± sd over seeds) per method and way of making its
    probabilities, one column per shot count; nothing when no run recorded probabilities."""
    cells: dict[tuple[str, str], dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for made, metrics in (run.get("probabilities") or {}).items():
            cells[run["method"], made][run["shots"]].append(metrics)
    if not cells:
        return []
    order = list(METHODS)
    lines = ["", "Probabilities on the same test images: NLL · ECE (15 bins, %) · Brier score, mean ± sd over seeds "
             "(lower is better).", "", "| method | probabilities | " + " | ".join(shots_text(s) for s in shots) + " |",
             "|---|---|" + "---:|" * len(shots)]
    for method, made in sorted(cells, key=lambda key: (order.index(key[0]) if key[0] in order else 99, key[1])):
        row = []
        for s in shots:
            group = cells[method, made].get(s, [])
            row.append(" · ".join(_mean_sd([m[k] * scale for m in group], digits)
                                  for k, scale, digits in (("nll", 1, 3), ("ece", 100, 1), ("brier", 1, 3))) if group else "")
        lines.append(f"| {method} | {made} | " + " | ".join(row) + " |")
    return lines


def _mean_sd(values: list[float], digits: int) -> str:
    text = f"{statistics.mean(values):.{digits}f}"
    return text + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def plot(runs: list[dict], title: str, path: Path) -> None:
    """Test error against shots per class, one line per method with ± sd error bars, as a PNG."""
    table = summarize(runs)
    fig, ax = subplots(figsize=(7, 4.5))
    for method in [m for m in METHODS if m in table]:
        cells = sorted(((c["images_per_class"], c) for c in table[method].values() if c["n"]),  # "all": at its mean
                       key=lambda point: point[0])
        style = "-" if method in ("lqf", BASELINE, "linear-probe") else "--"
        ax.errorbar([s for s, _ in cells], [100 * c["error"] for _, c in cells],
                    yerr=[0 if math.isnan(c["sd"]) else 100 * c["sd"] for _, c in cells],
                    fmt="o" + style, capsize=3, label=method, linewidth=2 if method in ("lqf", BASELINE) else 1)
    ax.set(xscale="log", xlabel="training images per class", ylabel="test error (%)", title=title)
    ax.legend(fontsize=8)
    save_png(fig, path)


def write_report(settings, runs: list[dict], output: Path, command: str | None = None) -> None:
    """``results.md``, ``results.json`` (settings, every run, the summary) and ``error_vs_shots.png``."""
    if not runs:
        return
    atomic_write_text(output / "results.md", markdown(settings, runs, command))
    summary = {m: {str(s): {k: v for k, v in c.items() if k != "errors"} for s, c in cells.items()}
               for m, cells in summarize(runs).items()}
    atomic_write_text(output / "results.json", json.dumps(
        {"settings": dataclasses.asdict(settings), "command": command, "runs": runs, "summary": summary}, indent=1))
    plot(runs, f"{settings.dataset}, {settings.model}", output / "error_vs_shots.png")


def _percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:+.0f}%"
