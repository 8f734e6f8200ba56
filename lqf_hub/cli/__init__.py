"""``lqf-hub``: train, compare, eval, predict, explain, forget, demo, push, info, convert — one module per command,
each with ``add_parser`` (its options) and ``run`` (the command).

``lqf-hub train`` with no arguments fine-tunes the embedded ImageNet EfficientNet-Lite0 on a Fashion-MNIST
subset, offline, in a few minutes on a laptop CPU. Under ``accelerate launch -m lqf_hub train ...`` it
runs on every process; only the main one prints and writes. Errors are one line (``--debug`` for the
traceback) and nothing is written before the inputs have been checked.
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

from . import compare, convert, demo, evaluate, explain, forget, info, predict, push, train
from .common import DEFAULT_IMAGE_SIZE, DEFAULT_MODEL, CLIError, dataclass_values, print_table

__all__ = ["DEFAULT_IMAGE_SIZE", "DEFAULT_MODEL", "CLIError", "build_parser", "dataclass_values", "main"]

COMMANDS = {"train": train, "compare": compare, "eval": evaluate, "predict": predict, "explain": explain,
            "forget": forget, "demo": demo, "push": push, "info": info, "convert": convert}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lqf-hub", description="Linear Quadratic Fine-Tuning for vision models.")
    parser.add_argument("--debug", action="store_true", help="Show tracebacks instead of one-line errors.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for command in COMMANDS.values():
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    plain = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None) -> str:  # ours read as the errors do
        if f"{Path(__file__).parent.parent}" in str(filename):
            return f"lqf-hub {args.command}: warning: {message}\n"
        return plain(message, category, filename, lineno, line)

    warnings.formatwarning = one_line
    try:
        return _dispatch(args, argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line for the user; --debug for the traceback
        if args.debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"lqf-hub {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = plain


def _dispatch(args, argv: list[str]) -> int:
    from ..training.trainer import process_state

    if args.command == "predict":
        rows, errors = predict.run(args)
        if args.format == "json":
            print(json.dumps(rows, indent=2))
        else:
            for row in rows:
                labels = ", ".join(f"{p['label']} ({p['score']:.2f}" + (f", output ± {p['output_std']:.2f})"
                                   if "output_std" in p else ")") for p in row["predictions"])
                print(f"{row['image']}: {labels}")
        for error in errors:
            print(f"lqf-hub predict: error: {error}", file=sys.stderr)
        return 1 if errors else 0
    if args.command == "compare":
        print_table(compare.run(args, argv))
        return 0
    result = COMMANDS[args.command].run(args)
    if process_state().is_main_process:
        if getattr(args, "format", "table") == "json" or args.command == "info":
            print(json.dumps(result, indent=2))
        else:
            print_table(result)
    return 0
