"""``lqf-hub compare``: LQF against fine-tuning, a linear probe and ablations on shared draws — the methods, the
runner, the baselines and the report."""

from .methods import METHODS, Method
from .report import write_report
from .runner import PRESETS, CompareSettings, run_comparison

__all__ = ["METHODS", "PRESETS", "CompareSettings", "Method", "run_comparison", "write_report"]
