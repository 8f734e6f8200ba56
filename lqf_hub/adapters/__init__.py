"""Bring backbones from different libraries into one common form: ``Backbone``.

One table, ``ADAPTERS``, names the libraries; each adapter module offers the same three functions:
``from_name`` (pretrained weights by model name or repo id), ``from_spec`` (the architecture of a
``BackboneSpec``, random weights) and ``from_source`` (the spec's pretrained weights, fetched again).
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor, nn

from .spec import BackboneSpec, WeightsKind, WeightsSource

STEM, NECK = "<stem>", "<neck>"
ADAPTERS = {"timm": "lqf_hub.adapters.timm", "transformers": "lqf_hub.adapters.transformers"}
"""Library -> the module that adapts its models (imported on first use: transformers is slow to import)."""

__all__ = [
    "ADAPTERS", "NECK", "STEM", "Adapter", "Backbone", "BackboneSpec", "Segment", "WeightsKind", "WeightsSource",
    "backbone_from_name", "backbone_from_source", "backbone_from_spec", "get_adapter", "library_of", "whole",
]


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
    segments: list[Segment]
    blocks: list[str]
    spec: BackboneSpec
    pretrained_head: nn.Linear | None = None
    pretrained_labels: dict[int, str] | None = None
    fixed_input_size: bool = False

    @property
    def num_features(self) -> int:
        return self.spec.num_features

    @property
    def data_config(self) -> dict[str, Any]:
        return self.spec.data_config


class Adapter(Protocol):
    """What every module in ``ADAPTERS`` provides."""

    def from_name(self, name: str, *, revision: str | None = None, token: str | bool | None = None) -> Backbone: ...

    def from_spec(self, spec: BackboneSpec) -> Backbone: ...

    def from_source(self, spec: BackboneSpec, **hub_kwargs: Any) -> Backbone: ...


def whole(network: nn.Module) -> list[Segment]:
    """The trivial split: one segment that runs the whole network."""
    return [Segment(STEM, network)]


def get_adapter(library: str) -> Adapter:
    if library not in ADAPTERS:
        raise ValueError(
            f"Unknown backbone library {library!r}; expected one of {', '.join(map(repr, ADAPTERS))}. "
            "Was this checkpoint written by lqf-hub?"
        )
    return importlib.import_module(ADAPTERS[library])


def library_of(name: str) -> str:
    """The library a model name belongs to: Hugging Face repo ids are ``org/name``, timm names have no slash."""
    return "transformers" if "/" in name else "timm"


def backbone_from_name(name: str, *, revision: str | None = None, token: str | bool | None = None) -> Backbone:
    """A pretrained backbone by timm name or Hugging Face repo id (``--model`` on the command line)."""
    return get_adapter(library_of(name)).from_name(name, revision=revision, token=token)


def backbone_from_spec(spec: BackboneSpec) -> Backbone:
    """Rebuild the architecture ``spec`` describes, with random weights (a checkpoint fills them)."""
    return get_adapter(spec.library).from_spec(spec)


def backbone_from_source(spec: BackboneSpec, **hub_kwargs: Any) -> Backbone:
    """Fetch the pretrained weights ``spec.source`` records again (checkpoints that store only δ)."""
    if not spec.source.refetchable:
        raise ValueError(
            f"The base weights came from {spec.source.describe()}, which cannot be fetched again; "
            "the checkpoint must be saved with base='full'."
        )
    return get_adapter(spec.library).from_source(spec, **hub_kwargs)
