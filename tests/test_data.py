"""The data layer: stratified sampling, validation splits, built-in datasets, column detection."""

import datasets
import numpy as np
import pytest

from lqf_hub.data import load_image_dataset, sample_shots, split_validation


def _labelled(counts: list[int]) -> datasets.Dataset:
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    features = datasets.Features({"label": datasets.ClassLabel(names=[f"c{c}" for c in range(len(counts))]),
                                  "index": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"label": labels, "index": list(range(len(labels)))}, features=features)


def test_sample_shots_is_stratified_seeded_and_checks_class_sizes():
    data = _labelled([10, 7, 12])
    picked = sample_shots(data, 5, seed=3)
    assert np.bincount(picked["label"]).tolist() == [5, 5, 5]
    assert picked["index"] == sample_shots(data, 5, seed=3)["index"] != sample_shots(data, 5, seed=4)["index"]
    with pytest.raises(ValueError, match="class 'c1' has only 7 images; use --shots 7 or fewer"):
        sample_shots(data, 8)
    assert np.bincount(sample_shots(data, 8, at_most=True)["label"]).tolist() == [8, 7, 8]


def test_split_validation_keeps_every_class_on_both_sides():
    data = _labelled([10, 2, 5])
    train, held = split_validation(data, 0.2, seed=0)
    assert np.bincount(held["label"]).tolist() == [2, 1, 1]
    assert np.bincount(train["label"]).tolist() == [8, 1, 4]
    assert sorted([*train["index"], *held["index"]]) == list(range(17))


def test_mnist_5k_builtin_is_a_fixed_stratified_split():
    train, test = load_image_dataset("mnist-5k", "train"), load_image_dataset("mnist-5k", "test")
    assert (len(train), len(test)) == (4000, 1000)
    assert train.features["label"].names == [str(d) for d in range(10)]
    assert np.asarray(train[0]["image"]).shape == (28, 28)
    assert np.bincount(test["label"]).tolist() == [n // 5 for n in np.bincount(
        np.concatenate([train["label"], test["label"]]))]


def test_columns_are_detected_or_named(tmp_path):
    features = datasets.Features({"photo": datasets.Image(), "kind": datasets.Value("string")})
    data = datasets.Dataset.from_dict({"photo": [np.zeros((4, 4), np.uint8)] * 2, "kind": ["a", "b"]}, features)
    data.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="has no label column .*columns: photo, kind.*--label-column"):
        load_image_dataset(str(tmp_path / "saved"))
    loaded = load_image_dataset(str(tmp_path / "saved"), label_column="kind")
    assert loaded.column_names == ["image", "label"] and loaded.features["label"].names == ["a", "b"]
