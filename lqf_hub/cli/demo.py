"""``lqf-hub demo``."""

import argparse
from typing import Any

from .common import CLIError, checkpoint_source, model_arguments


def add_parser(commands: argparse._SubParsersAction) -> None:
    """``lqf-hub demo``'s options."""
    demo = commands.add_parser(
        "demo", help="Serve a page that splits predictions over the training images and forgets images (Gradio).")
    model_arguments(demo, "lqf-output/model", "LQF checkpoint (directory or Hub repo). Default: lqf-output/model")
    demo.add_argument("--cache-dir", default="demo-cache",
                      help="Keeps the training images' trunk outputs, the example images and the forgotten models. "
                           "An `lqf-hub explain --output-dir` of the same model works: its kept trunk outputs and "
                           "training-set ranking are reused. Default: demo-cache.")
    demo.add_argument("--host", default="127.0.0.1", help="Address to serve on (0.0.0.0: every interface). "
                      "Default: 127.0.0.1.")
    demo.add_argument("--port", type=int, default=7860, help="Default: 7860.")
    demo.add_argument("--share", action="store_true", help="Also a temporary public link (gradio.live).")


def run(args: argparse.Namespace) -> dict[str, Any]:
    try:
        from ..demo.page import launch
    except ImportError as err:
        raise CLIError(f"`lqf-hub demo` needs Gradio ({err}): pip install 'lqf-hub[demo]'.") from None
    from ..demo.session import DemoSession
    from ..modeling.model import LQFModel

    model = LQFModel.from_pretrained(checkpoint_source(args.model, args.revision, args.token) or args.model,
                                     revision=args.revision, token=args.token)
    launch(DemoSession(model, args.cache_dir, progress=True), title=args.model, host=args.host, port=args.port,
           share=args.share)
    return {"model": args.model, "served": f"http://{args.host}:{args.port}"}
