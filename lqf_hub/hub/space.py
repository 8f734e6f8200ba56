"""A Hugging Face Space that serves ``lqf-hub demo`` for a model on the Hub: ``app.py``, ``requirements.txt`` and a
README whose front matter tells the Hub it is a Gradio app (https://huggingface.co/docs/hub/spaces-config-reference)."""

from importlib.metadata import PackageNotFoundError, version

from huggingface_hub import CommitOperationAdd, HfApi

from .._version import __version__

APP = '''"""The lqf-hub demo page of {model_id}: why it says what it says, and what forgetting changes."""

from lqf_hub import LQFModel
from lqf_hub.demo import DemoSession
from lqf_hub.demo.page import build_page

model = LQFModel.from_pretrained({model_id!r})
build_page(DemoSession(model, "demo-cache", progress=True), title={model_id!r}).launch()
'''

README = '''---
title: {title}
emoji: 🔍
colorFrom: blue
colorTo: green
sdk: gradio
{sdk_version}app_file: app.py
models:
- {model_id}
tags:
- lqf
- lqf-hub
---

# {model_id}: why it says what it says

The `lqf-hub demo` page of [{model_id}](https://huggingface.co/{model_id}), an LQF model: upload an image to see its
calibrated prediction split exactly over the training images, and forget training images to see the certified
optimum without them.
'''


def space_files(model_id: str) -> dict[str, str]:
    """The files of a Space serving the demo page of the Hub model ``model_id``: path -> text."""
    try:
        sdk_version = f"sdk_version: {version('gradio')}\n"  # the Gradio this page was built with
    except PackageNotFoundError:
        sdk_version = ""
    requirement = "lqf-hub[demo]" if __version__.startswith("0+") else f"lqf-hub[demo]=={__version__}"
    title = model_id.split("/")[-1][:30]  # the Hub shows at most 30 characters
    return {"app.py": APP.format(model_id=model_id), "requirements.txt": requirement + "\n",
            "README.md": README.format(title=title, sdk_version=sdk_version, model_id=model_id)}


def push_space(model_id: str, space_id: str, *, private: bool | None = None, token: str | None = None) -> str:
    """Create the Space ``space_id`` (Gradio) if needed and commit ``space_files(model_id)`` to it; returns the
    commit URL."""
    api = HfApi(token=token)
    space_id = api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True).repo_id
    operations = [CommitOperationAdd(path, text.encode()) for path, text in space_files(model_id).items()]
    return str(api.create_commit(space_id, operations, commit_message=f"The lqf-hub demo page of {model_id}",
                                 repo_type="space"))
