"""What the demo page shows, computed without the page: one solved model, its training images' trunk outputs
and explainer built once, then per image the calibrated probabilities, the uncertainty and the exact split
over the training images, and per choice of images the certified optimum without them.

Everything that does not depend on the query is built once when the session opens (the training trunk
outputs, kept on disk in ``cache_dir`` as ``lqf-hub explain`` keeps them, and the objective); a query costs
one backward pass and one forward-mode pass over the training images' tails, a forget one warm-started
certified solve on the kept trunk outputs.
"""

import itertools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..analysis.explain import Explainer, load_ranking, save_ranking, training_trunk
from ..analysis.forget import forget
from ..data import image_transform, label_array, load_image_dataset, pil_image
from ..errors import DataUnreachable
from ..modeling.model import LQFModel
from ..training.arguments import LQFTrainingArguments


@dataclass
class Prediction:
    """One model's answer for one image."""

    probabilities: dict[str, float]  # calibrated: softmax(f / T), every class
    label: str  # the predicted class
    output: float  # f_lin(x) of the predicted class
    std: float | None  # the posterior predictive's sd of that output (None: the model has no posterior)


class DemoSession:
    """A solved LQF model ready to explain images and forget training images.

    ``cache_dir`` keeps the training images' trunk outputs (``training_trunk``) and the forgotten models. Where
    the training images are not reachable, the trunk outputs kept there still give every score by index, and
    ``pictures`` is False.
    """

    def __init__(self, model: LQFModel, cache_dir: str | Path, *, progress: bool = False) -> None:
        self.model, self.cache_dir = model, Path(cache_dir)
        self.raw, self.trunk = training_trunk(model, self.cache_dir, progress=progress)
        self.explainer = Explainer.from_model(model, self.trunk)
        self.transform = image_transform(model.data_config)
        self._forgotten: dict[tuple[int, ...], tuple[LQFModel, dict[str, Any]]] = {}
        self._ranking = load_ranking(self.cache_dir, model)  # (kernel, rows) or None

    @property
    def pictures(self) -> bool:
        """Whether the training images themselves are reachable (else only their indices and scores)."""
        return self.raw is not None

    @property
    def training_count(self) -> int:
        return self.explainer.data.count

    def picture(self, index: int) -> Image.Image | None:
        """Training image ``index`` (as ``explain`` numbers them), or None where not reachable."""
        return None if self.raw is None else pil_image(self.raw, index)

    def encode(self, image: Image.Image) -> torch.Tensor:
        """The frozen trunk's output of one image ``[1, ...]``."""
        with torch.no_grad():
            return self.model.encode_trunk(self.transform(image.convert("RGB")).unsqueeze(0))

    def predict(self, trunk_output: torch.Tensor, model: LQFModel | None = None) -> Prediction:
        """``model``'s (default: the session's) calibrated prediction for one encoded image."""
        model = model or self.model
        with torch.no_grad():
            probabilities = model.predict_proba(trunk_output=trunk_output)[0]
            output = model(trunk_output=trunk_output)[0]
        predicted = int(output.argmax())
        std = None if model.posterior is None else \
            float(model.predict_uncertainty(trunk_output=trunk_output)[0, predicted])
        names = model.config.id2label
        return Prediction({names[c]: float(p) for c, p in enumerate(probabilities)}, names[predicted],
                          float(output[predicted]), std)

    def explain(self, trunk_output: torch.Tensor, top_k: int) -> dict:
        """The predicted class's output split exactly over the training images (``Explanation.summary``): the
        base network's share, the ``top_k`` training images that most raise and most lower it, the remainder."""
        explanation = self.explainer.explain(trunk_output, only_predicted=True)
        return explanation.summary(top_k, self.model.config.id2label, self.explainer.data.labels)

    def forget(self, indices: list[int], *, progress: bool = False) -> tuple[LQFModel, dict[str, Any]]:
        """The certified optimum without the training images ``indices`` (same λ and prior), warm-started from
        the model and solved on the kept trunk outputs; kept for the session. Returns it and the solver's record."""
        key = tuple(sorted(set(int(i) for i in indices)))
        if key not in self._forgotten:
            output = Path(tempfile.mkdtemp(prefix="forget-", dir=self._directory("forgotten")))
            args = LQFTrainingArguments(output_dir=str(output), progress=progress)
            self._forgotten[key] = forget(self.model, self.trunk, list(key), args)
        return self._forgotten[key]

    def disputed_labels(self, *, progress: bool = False) -> tuple[str, list[dict]]:
        """The training images ranked by how much the rest argues against their label (``Explainer.
        disputed_labels``), and the kernel it came from: read from ``cache_dir`` where ``lqf-hub explain
        --training-set`` left it for this model (exact, or its fast mode for large sets), else computed
        exactly (N·C passes over the training images) and kept there."""
        if self._ranking is None:
            rows = self.explainer.disputed_labels(progress=progress)
            save_ranking(self.cache_dir, self.model, "exact", rows)
            self._ranking = ("exact", rows)
        return self._ranking

    def examples(self, count: int) -> list[Path]:
        """Up to ``count`` images of the test split of the model's dataset, one per class first, as PNG files in
        ``cache_dir/examples`` (none where that split is not reachable)."""
        source = (self.model.training_summary or {}).get("train_data") or {}
        try:
            test = load_image_dataset(source["dataset"], "test", image_column=source.get("image_column"),
                                      label_column=source.get("label_column"))
        except (KeyError, OSError, ValueError, DataUnreachable):
            return []
        labels = label_array(test)
        firsts = np.unique(labels, return_index=True)[1].tolist()  # one image per class, then the next ones
        taken = set(firsts)
        order = list(itertools.islice(itertools.chain(firsts, (i for i in range(len(test)) if i not in taken)), count))
        folder, names = self._directory("examples"), self.model.config.id2label
        paths = []
        for i in order:
            path = folder / f"test-{i}-{names[int(labels[i])]}.png".replace("/", "-").replace(" ", "-")
            if not path.exists():
                pil_image(test, i).convert("RGB").save(path)
            paths.append(path)
        return paths

    def _directory(self, name: str) -> Path:
        folder = self.cache_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder
