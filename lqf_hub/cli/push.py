"""``lqf-hub push``."""

import argparse
from pathlib import Path
from typing import Any

from .common import CLIError, checkpoint_source, model_arguments


def add_parser(commands: argparse._SubParsersAction) -> None:
    """``lqf-hub push``'s options."""
    push = commands.add_parser("push", help="Upload an LQF checkpoint to the Hugging Face Hub.")
    model_arguments(push, "lqf-output", "Checkpoint directory. Default: lqf-output")
    push.add_argument("repo_id", help="Target repo, e.g. user/my-lqf-model.")
    push.add_argument("--private", action="store_true", help="Create the repo private.")
    push.add_argument("--base", default="full", choices=["full", "reference"],
                      help="full: with the linearization point; reference: delta only + the base's id and hash.")
    push.add_argument("--commit-message", default="Upload LQF model")
    push.add_argument("--space", nargs="?", const="", default=None, metavar="SPACE_ID",
                      help="Also create a Gradio Space serving `lqf-hub demo` for the pushed model. Default id: "
                           "REPO_ID-demo.")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..modeling.model import LQFModel

    checkpoint = checkpoint_source(args.model, args.revision, args.token)
    if checkpoint is None or not Path(checkpoint).is_dir():
        raise CLIError(f"{args.model} is not a local LQF checkpoint directory.")
    model = LQFModel.from_pretrained(checkpoint)
    url = model.push_to_hub(args.repo_id, base=args.base, private=args.private or None, token=args.token,
                            commit_message=args.commit_message)
    result = {"repo_id": args.repo_id, "commit": str(url)}
    if args.space is not None:
        from ..hub.space import push_space

        space_id = args.space or f"{args.repo_id}-demo"
        result |= {"space": space_id, "space_commit": push_space(args.repo_id, space_id, private=args.private or None,
                                                                 token=args.token)}
    return result
