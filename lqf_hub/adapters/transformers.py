"""Any ``AutoModelForImageClassification`` as a ``Backbone`` (the ``transformers`` entry of the adapter table).

The final ``nn.Linear`` of the classifier becomes ``nn.Identity``, so the model's own ``logits`` are the
pre-logit features: this works for every image-classification head in transformers without knowing how
it pools. ViT, ResNet and ConvNeXt also get a stem / blocks / neck split (for caching the frozen part).
"""

import os
import re
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from . import NECK, STEM, Backbone, BackboneSpec, Segment, WeightsKind, WeightsSource

_PIL_INTERPOLATION = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def transformers_backbone(
    repo_id_or_model: str | nn.Module,
    *,
    data_config: dict[str, Any] | None = None,
    **from_pretrained_kwargs: Any,
) -> Backbone:
    """Load (or take) a Hugging Face image classifier and bring it into the common form.

    A model instance is used in place: its classifier is removed and its weights are frozen.
    """
    from transformers import AutoImageProcessor, AutoModelForImageClassification, PreTrainedModel

    if isinstance(repo_id_or_model, str):
        model = AutoModelForImageClassification.from_pretrained(repo_id_or_model, **from_pretrained_kwargs)
        source = _source(repo_id_or_model, from_pretrained_kwargs)
        if data_config is None:
            try:
                processor = AutoImageProcessor.from_pretrained(repo_id_or_model, **_hub_kwargs(from_pretrained_kwargs))
                data_config = _processor_data_config(processor, model.config)
            except (OSError, ValueError):  # repos without a preprocessor config
                data_config = None
    elif isinstance(repo_id_or_model, PreTrainedModel):
        if from_pretrained_kwargs:
            raise ValueError(f"{sorted(from_pretrained_kwargs)} apply only when a repo id is given.")
        model, source = repo_id_or_model, WeightsSource(kind=WeightsKind.UNKNOWN.value)
    else:
        raise TypeError(
            f"Expected a Hugging Face repo id or a transformers PreTrainedModel, got {type(repo_id_or_model).__name__}."
        )
    return _to_backbone(model, data_config, source)


def from_name(name: str, *, revision: str | None = None, token: str | bool | None = None) -> Backbone:
    """The pretrained model in Hub repo (or local directory) ``name``."""
    hub = {k: v for k, v in (("revision", revision), ("token", token)) if v is not None}
    return transformers_backbone(name, **hub)


def from_spec(spec: BackboneSpec) -> Backbone:
    """Rebuild the architecture recorded in ``spec`` with random weights (a checkpoint fills them)."""
    from transformers import AutoConfig, AutoModelForImageClassification

    config_dict = dict(spec.config)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    model = AutoModelForImageClassification.from_config(config)
    return _to_backbone(model, spec.data_config, spec.source)


def from_source(spec: BackboneSpec, **hub_kwargs: Any) -> Backbone:
    """The Hub repo ``spec.source`` names, at the commit it records."""
    hub_kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    return transformers_backbone(spec.source.repo_id, data_config=spec.data_config, revision=spec.source.revision,
                                 **hub_kwargs)


def _source(repo_id: str, kwargs: dict[str, Any]) -> WeightsSource:
    """Where the weights came from, pinned to a commit, so a delta-only checkpoint can fetch them again."""
    if os.path.isdir(repo_id):  # a local directory is not portable
        return WeightsSource(kind=WeightsKind.FILE.value, file=os.path.abspath(repo_id))
    from huggingface_hub import HfApi

    hub = _hub_kwargs(kwargs)
    try:
        sha = HfApi().model_info(repo_id, revision=hub.get("revision"), token=hub.get("token")).sha
    except (OSError, ValueError):  # offline: pin what was asked for
        sha = hub.get("revision")
    return WeightsSource(kind=WeightsKind.HUB.value, repo_id=repo_id, revision=sha)


def _hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    keys = ("revision", "token", "cache_dir", "local_files_only")
    return {k: kwargs[k] for k in keys if k in kwargs}


def _to_backbone(model: nn.Module, data_config: dict[str, Any] | None, source: WeightsSource) -> Backbone:
    labels = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
    head = _take_classifier(model)
    model.eval().requires_grad_(False)
    plan = _PLANS.get(model.config.model_type)
    segments = plan(model) if plan else [Segment(STEM, lambda x: model(pixel_values=x).logits)]
    spec = BackboneSpec(library="transformers", architecture=model.config.model_type, config=model.config.to_dict(),
                        data_config=data_config or _default_data_config(model.config), num_features=head.in_features,
                        source=source)
    return Backbone(
        network=model,
        segments=segments,
        blocks=_block_names(model),
        spec=spec,
        pretrained_head=head,
        pretrained_labels=labels if len(labels) == head.out_features else None,
        fixed_input_size=model.config.model_type in _FIXED_SIZE,
    )


def _take_classifier(model: nn.Module) -> nn.Linear:
    """Swap the classifier's final Linear for Identity; return that Linear (frozen)."""
    classifier = getattr(model, "classifier", None)
    if classifier is None:
        raise ValueError(
            f"{type(model).__name__} has no `classifier` to replace; use an AutoModelForImageClassification model."
        )
    parent, name = model, "classifier"
    if isinstance(classifier, nn.Sequential):  # e.g. ResNet: Sequential(Flatten, Linear)
        parent, name = classifier, str(len(classifier) - 1)
    linear = getattr(parent, name)
    if not isinstance(linear, nn.Linear):
        raise ValueError(
            f"{type(model).__name__}'s classifier ends in {type(linear).__name__}, not nn.Linear; "
            "LQF puts a new linear head on the pre-logit features."
        )
    setattr(parent, name, nn.Identity())
    return linear.requires_grad_(False)


_PLURAL_BLOCK = re.compile(r"\.(blocks|layers)\.\d+$")
_SINGULAR_BLOCK = re.compile(r"\.(layer|stages)\.\d+$")


def _block_names(model: nn.Module) -> list[str]:
    """Repeated blocks in forward order: the innermost ``*.blocks.i`` / ``*.layers.i`` (e.g. Swin's blocks
    inside its stages), else ``*.layer.i`` / ``*.stages.i`` (older layouts)."""
    names = [n for n, _ in model.named_modules()]
    for pattern in (_PLURAL_BLOCK, _SINGULAR_BLOCK):
        found = [n for n in names if pattern.search(n)]
        innermost = [n for n in found if not any(o.startswith(n + ".") for o in found)]
        if innermost:
            return innermost
    return []


def _default_data_config(config) -> dict[str, Any]:
    size = getattr(config, "image_size", 224)
    size = size if isinstance(size, int) else size[0]
    return {
        "input_size": [getattr(config, "num_channels", 3), size, size],
        "interpolation": "bicubic",
        "mean": list(IMAGENET_DEFAULT_MEAN),
        "std": list(IMAGENET_DEFAULT_STD),
        "crop_pct": 0.875,
        "crop_mode": "center",
    }


def _processor_data_config(processor, config) -> dict[str, Any]:
    data = _default_data_config(config)
    size = getattr(processor, "size", None) or {}
    size = dict(size) if not isinstance(size, dict) else size
    side = size.get("height") or size.get("shortest_edge")
    if side:
        data["input_size"] = [data["input_size"][0], side, side]
    for key, attr in (("mean", "image_mean"), ("std", "image_std")):
        if getattr(processor, attr, None) is not None:
            data[key] = list(getattr(processor, attr))
    data["interpolation"] = _PIL_INTERPOLATION.get(int(getattr(processor, "resample", 3) or 3), "bicubic")
    if getattr(processor, "crop_pct", None):
        data["crop_pct"] = float(processor.crop_pct)
    return data


def _run_all(modules: nn.Module):
    def run(x: Tensor) -> Tensor:
        for module in modules:
            x = module(x)
        return x

    return run


def _vit(model) -> list[Segment]:
    base = model.base_model
    prefix = model.base_model_prefix
    blocks = [f"{prefix}.layers.{i}" for i in range(len(base.layers))]
    def stem(x: Tensor) -> Tensor:  # ViTModel casts pixels to the weight dtype first
        return base.embeddings(x.to(base.embeddings.patch_embeddings.projection.weight.dtype))

    return [
        Segment(STEM, stem),
        *(Segment(b, model.get_submodule(b)) for b in blocks),
        Segment(NECK, lambda h: model.classifier(base.layernorm(h)[:, 0, :])),
    ]


def _staged(model, downsample: str | None, neck) -> list[Segment]:
    """ResNet / ConvNeXt: embedder, then stages of (optional downsampling, layers), then pooling."""
    prefix = model.base_model_prefix
    stem = model.base_model.embedder if hasattr(model.base_model, "embedder") else model.base_model.embeddings
    segments = [Segment(STEM, stem)]
    for i, stage in enumerate(model.base_model.encoder.stages):
        if downsample is not None:
            name = f"{prefix}.encoder.stages.{i}.{downsample}"
            segments.append(Segment(name, _run_all(model.get_submodule(name))))
        for j in range(len(stage.layers)):
            name = f"{prefix}.encoder.stages.{i}.layers.{j}"
            segments.append(Segment(name, model.get_submodule(name)))
    segments.append(Segment(NECK, neck))
    return segments


def _resnet(model):
    return _staged(model, None, lambda x: model.classifier(model.base_model.pooler(x)))


def _convnext(model):
    base = model.base_model
    return _staged(model, "downsampling_layer", lambda x: model.classifier(base.layernorm(x.mean([-2, -1]))))


_PLANS = {"vit": _vit, "resnet": _resnet, "convnext": _convnext}
_FIXED_SIZE = {"vit", "deit", "beit", "dinov2", "swin"}
