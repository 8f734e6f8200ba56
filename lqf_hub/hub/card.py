"""The model card of an LQF checkpoint: Hub metadata, where the base weights came from, settings, training."""

import importlib.resources
from collections.abc import Mapping
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .protocol import Checkpointable


def model_card(model: Checkpointable, config: Mapping[str, Any], repo_id: str) -> ModelCard:
    """The model card: Hub metadata (``base_model`` only when the weights are that Hub repo's; model-index
    results when metrics are known), where the base weights came from, settings, training, usage."""
    lqf, training = model.config, dict(model.training_summary or {})
    dataset, metrics = training.get("dataset"), training.get("metrics") or {}
    title = training.get("name") or f"LQF {lqf.backbone_name} ({lqf.num_classes} classes)"
    results = [
        EvalResult(task_type="image-classification", dataset_type=dataset, dataset_name=dataset,
                   dataset_split=training.get("eval_split", "test"), metric_type=name, metric_value=value)
        for name, value in metrics.items() if dataset and _is_number(value)
    ]
    source = lqf.backbone.source
    card_data = ModelCardData(
        library_name="lqf-hub", tags=["lqf", "linearized", "image-classification"], pipeline_tag="image-classification",
        base_model=source.hub_repo, datasets=[dataset] if dataset and "/" in dataset else None,
        eval_results=results or None, model_name=title, license=training.get("license"),
    )
    settings = {
        "backbone": f"{lqf.backbone_name} ({lqf.backbone.library})",
        "linearized": lqf.linearize, "activation": lqf.activation, "leaky slope": lqf.leaky_slope,
        "target scale α": lqf.target_scale, "ridge λ": lqf.ridge, "temperature T": lqf.temperature,
        "head init": lqf.head_init,
        "classes": lqf.num_classes, "weights stored": "full (base + delta)" if config["base"] == "full"
        else f"delta only; base sha256 {config['base_sha256'][:16]}…",
    }
    shown = {"name", "dataset", "eval_split", "train_samples", "eval_samples", "metrics", "license", "selection",
             "evidence"}
    template = importlib.resources.files("lqf_hub.model_cards").joinpath("lqf.md").read_text(encoding="utf-8")
    return ModelCard.from_template(
        card_data, template_str=template, title=title, weights=source.describe(), settings=settings,
        metrics={k: _format(v) for k, v in metrics.items()}, training=training,
        details=_scalars({k: v for k, v in training.items() if k not in shown}),
        selection=training.get("selection") or [], evidence=training.get("evidence") or [],
        posterior=_posterior_summary(model),
        labels=list((lqf.id2label or {}).values()), repo_id=repo_id,
    )


def _posterior_summary(model: Checkpointable) -> str:
    """The posterior's scalars in words, or "" when the model has none."""
    state = model.posterior_state()
    if state is None:
        return ""
    scalars = state[1]
    return (f"{scalars['prior']} prior, λ = {float(scalars['ridge']):g}, N = {scalars['count']} training images, "
            f"σ² = {float(scalars['noise_variance']):.4g}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _format(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Training facts the template does not know by name (e.g. a solver certificate), flattened to
    ``name.sub`` -> text; lists of scalars (e.g. forgotten images) become comma-separated text, other values
    are left out."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_scalars(value, f"{prefix}{key}."))
        elif isinstance(value, (str, int, float, bool)):
            flat[f"{prefix}{key}"] = f"{value:.4g}" if isinstance(value, float) else str(value)
        elif isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
            flat[f"{prefix}{key}"] = ", ".join(map(str, value))
    return flat
