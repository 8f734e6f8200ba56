"""Python API quickstart: linearize the embedded ImageNet EfficientNet-Lite0, train it with LQF on
20 images per class of MNIST (the trainer saves it), reload, predict. Offline; about a minute on a laptop CPU.

    python examples/quickstart.py
"""

from lqf_hub import (
    LQFConfig,
    LQFModel,
    LQFTrainer,
    LQFTrainingArguments,
    class_names,
    load_image_dataset,
    sample_shots,
    with_transform,
)


def main() -> None:
    train = sample_shots(load_image_dataset("mnist-5k", "train"), shots=20)
    test = sample_shots(load_image_dataset("mnist-5k", "test"), shots=30, seed=1)
    labels = dict(enumerate(class_names(train)))

    # f(x; w0) + J(w - w0): the last two blocks and the new head are linearized, the rest is frozen.
    model = LQFModel.from_timm("tf_efficientnet_lite0", num_classes=10,
                               config=LQFConfig(linearize="last:2", id2label=labels))
    model.set_image_size(96)
    print(f"{len(model.delta)} tensors linearized ({sum(d.numel() for d in model.delta.values()) / 1e6:.2f}M weights)")

    # the certified optimum of the LQF objective, with λ chosen on held-out training images
    args = LQFTrainingArguments(output_dir="quickstart-output", dataset_name="mnist-5k", eval_split_name="test")
    trainer = LQFTrainer(model, with_transform(train, model.data_config), with_transform(test, model.data_config), args)
    result = trainer.train()[-1]
    print(f"λ = {result['ridge']:g}, relative gradient {result['relative_gradient_norm']:.1e}, "
          f"test accuracy: {result['eval_accuracy']:.1%}")

    # train() saved the model with its card to output_dir/model
    reloaded = LQFModel.from_pretrained("quickstart-output/model")
    first = with_transform(test, reloaded.data_config)[0]
    predicted = reloaded(first["pixel_values"].unsqueeze(0)).argmax(-1).item()
    print(f"first test image: label {labels[first['label']]}, predicted {reloaded.config.id2label[predicted]}")


if __name__ == "__main__":
    main()
