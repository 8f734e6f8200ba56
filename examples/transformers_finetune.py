"""Fine-tune a Hugging Face transformers image classifier with LQF.

    python examples/transformers_finetune.py --model google/vit-base-patch16-224 --dataset beans  # online
    python examples/transformers_finetune.py --offline                                           # no network

Any AutoModelForImageClassification works (ViT, DeiT, ResNet, ConvNeXt, Swin, ...): the classifier's last
Linear becomes the LQF head's input, and the last blocks are linearized. ``--offline`` builds a small
ConvNeXt from its config (random weights) to show the same code path without downloads.
"""

import argparse

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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="facebook/convnext-tiny-224")
    parser.add_argument("--dataset", default="beans")
    parser.add_argument("--shots", type=int, default=20)
    parser.add_argument("--offline", action="store_true")
    args = parser.parse_args()

    if args.offline:
        from transformers import AutoModelForImageClassification, ConvNextConfig

        args.dataset = "mnist-5k"
        base = AutoModelForImageClassification.from_config(
            ConvNextConfig(num_stages=2, hidden_sizes=[32, 64], depths=[2, 2], image_size=64))
    else:
        base = args.model
    train = sample_shots(load_image_dataset(args.dataset, "train"), args.shots)
    test = sample_shots(load_image_dataset(args.dataset, "test"), args.shots, seed=1)
    config = LQFConfig(linearize="last:2", id2label=dict(enumerate(class_names(train))))
    model = LQFModel.from_transformers(base, len(class_names(train)), config)
    if args.offline:
        model.set_image_size(64)
    trainer = LQFTrainer(model, with_transform(train, model.data_config), with_transform(test, model.data_config),
                         LQFTrainingArguments(output_dir="transformers-output"))
    print(f"test accuracy: {trainer.train()[-1]['eval_accuracy']:.1%}")  # the model is in transformers-output/model


if __name__ == "__main__":
    main()
