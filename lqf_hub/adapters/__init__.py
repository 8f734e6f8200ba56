"""Bring backbones from different libraries into one common form: :class:`Backbone`."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

STEM, NECK = "<stem>", "<neck>"


@dataclass
class Segment:
    """One step of the backbone's forward pass.

    ``name`` is the module that runs (a block) or ``STEM`` / ``NECK`` for the code before the first block
    and after the last one; those own the parameters registered before / after the blocks.
    """

    name: str
    run: Callable[[Tensor], Tensor]


@dataclass
class Backbone:
    """A pretrained network without its classifier, plus what LQF needs to know about it.

    ``network(x)`` maps pixels ``[B, C, H, W]`` to pre-logits ``[B, num_features]``. ``segments`` split that
    forward pass: running them in order gives exactly ``network(x)``; a family without a known split has
    a single segment. ``blocks`` are the module names that ``linearize='last:N'`` counts, in order.
    """

    network: nn.Module
    num_features: int
    segments: list[Segment]
    blocks: list[str]
    data_config: dict[str, Any]
    spec: dict[str, Any]
    pretrained_head: nn.Linear | None = None
    pretrained_labels: dict[int, str] | None = None
    fixed_input_size: bool = False


def whole(network: nn.Module) -> list[Segment]:
    """The trivial split: one segment that runs the whole network."""
    return [Segment(STEM, network)]


def build_base(spec: dict[str, Any], **hub_kwargs: Any) -> Backbone:
    """Fetch the pretrained backbone recorded in ``spec["source"]`` again (checkpoints storing only δ)."""
    source = spec.get("source") or {}
    if spec.get("library") == "timm" and "timm_name" in source:
        from .timm import timm_backbone

        return timm_backbone(source["timm_name"], pretrained=True, model_args=spec.get("model_args"))
    if spec.get("library") == "transformers" and "repo_id" in source:
        from .transformers import transformers_backbone

        hub_kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
        return transformers_backbone(
            source["repo_id"], data_config=spec.get("data_config"), revision=source.get("revision"), **hub_kwargs
        )
    raise ValueError("The config records no source to fetch the base model from; it must be saved with base='full'.")


def build_from_spec(spec: dict[str, Any]) -> Backbone:
    """Rebuild a backbone's architecture (random weights) from the ``spec`` an adapter recorded."""
    library = spec.get("library")
    if library == "timm":
        from .timm import timm_backbone_from_spec

        return timm_backbone_from_spec(spec)
    if library == "transformers":
        from .transformers import transformers_backbone_from_spec

        return transformers_backbone_from_spec(spec)
    raise ValueError(
        f"Unknown backbone library {library!r} in the config; expected 'timm' or 'transformers'. "
        "Was this checkpoint written by lqf-hub?"
    )
