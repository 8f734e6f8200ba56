"""Push a trained LQF model to the Hugging Face Hub and load it back, full and delta-only.

    lqf-hub train                                   # writes ./lqf-output/model
    python examples/push_and_reload.py USER/my-lqf-model [--token hf_...] [--endpoint http://...]

``--endpoint`` points the client at another Hub server (e.g. a self-hosted one); set it before
huggingface_hub is imported, as HF_ENDPOINT does.
"""

import argparse
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo_id")
    parser.add_argument("--checkpoint", default="lqf-output/model")
    parser.add_argument("--token", default=None)
    parser.add_argument("--endpoint", default=None)
    args = parser.parse_args()
    if args.endpoint:
        os.environ["HF_ENDPOINT"] = args.endpoint

    import torch

    from lqf_hub import LQFModel

    model = LQFModel.from_pretrained(args.checkpoint)
    x = torch.randn(2, *model.data_config["input_size"])
    print("full checkpoint:", model.push_to_hub(args.repo_id, token=args.token))
    print("delta only:", model.push_to_hub(args.repo_id + "-delta", token=args.token, base="reference"))
    for repo in (args.repo_id, args.repo_id + "-delta"):
        reloaded = LQFModel.from_pretrained(repo, token=args.token)
        print(f"{repo}: identical logits after the round trip: {torch.equal(model(x), reloaded(x))}")


if __name__ == "__main__":
    main()
