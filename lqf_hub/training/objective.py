"""The LQF objective, built from the frozen trunk's outputs: the data term over the training images, the priors'
metrics and K-FAC — for the trainer, and for ``explain``, ``forget`` and ``eval``, which need the objective or
the trunk outputs of a trained model without a training run.

``reduce_sum`` / ``rank`` / ``world`` split the data term over processes (the trainer passes Accelerate's); the
defaults are one process.
"""

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data import collate
from ..modeling.calibration import probability_metrics
from ..modeling.loss import data_loss
from ..modeling.model import LQFModel
from ..solver.kfac import KFAC
from ..solver.solve import DataTerm, Flat, PriorMetric
from .arguments import KFACOutputs, LQFTrainingArguments, Prior, objective_settings
from .cache import TrunkCache, cache_trunk_outputs


def trunk_outputs(model: LQFModel, dataset: Dataset, *, batch_size: int = 256, progress: bool = False,
                  dtype: str | None = None) -> TrunkCache:
    """The frozen trunk's outputs over ``dataset`` (items ``{"pixel_values", "label"}``) in this process, in
    memory, stored as ``dtype`` (default: as the model's card records it was solved, else "float32"); a
    ``TrunkCache`` is returned as it is."""
    if isinstance(dataset, TrunkCache):
        return dataset
    dtype = dtype or (model.training_summary or {}).get("cache_dtype", LQFTrainingArguments.cache_dtype)
    return cache_trunk_outputs(model, dataset, None, batch_size=batch_size, progress=progress, dtype=dtype)


def prior_kinds(prior: str) -> list[str]:
    """The priors a ``prior`` setting stands for: "auto" chooses between all three."""
    return [Prior.KFAC.value, Prior.ISOTROPIC.value, Prior.HEAD.value] if prior == Prior.AUTO.value else [prior]


def build_kfac(model: LQFModel, batches: Callable[[], Iterable[tuple[Tensor, Tensor | None]]], *, ridge: float,
               damping: float, outputs: str, seed: int, saved: dict[str, Tensor] | None = None,
               reduce_sum: Callable[[Tensor], Tensor] | None = None, progress: bool = False) -> KFAC:
    """K-FAC at w0 damped by ``ridge`` and ``damping``: restored from ``saved`` (keys ``kfac/...``), or computed
    once from ``batches()`` (pairs of trunk outputs ``[B, ...]`` and content keys or None) and summed over
    processes with ``reduce_sum``."""
    kfac = KFAC(model.linearization_point, model.linearized_parameters, ridge=ridge, damping=damping,
                outputs=outputs, seed=seed)
    if saved:
        kfac.load_state_dict({k[5:]: v for k, v in saved.items() if k.startswith("kfac/")})
    else:
        for z, keys in tqdm(batches(), desc="K-FAC at w0", disable=not progress):
            kfac.accumulate(model.tail_function(z), z.shape[0], keys)
        kfac.finalize(reduce_sum or (lambda t: t))
    return kfac


class Objective:
    """The objective of ``model`` over the trunk outputs ``cache`` of its training images, with the prior
    settings of ``args`` (``damping``, ``kfac_outputs``; ``eval_batch_size`` batches the data term)."""

    def __init__(self, model: LQFModel, cache: TrunkCache, args: LQFTrainingArguments, *,
                 reduce_sum: Callable[[Tensor], Tensor] | None = None, rank: int = 0, world: int = 1,
                 progress: bool = False) -> None:
        self.model, self.cache, self.args = model, cache, args
        self.reduce_sum, self.rank, self.world, self.progress = reduce_sum, rank, world, progress

    @classmethod
    def of_solved_model(cls, model: LQFModel, cache: TrunkCache) -> tuple[DataTerm, PriorMetric]:
        """The data term and prior metric a solved checkpoint minimised (at its λ), rebuilt from the settings its
        card records and the trunk outputs of its training images — one process."""
        settings = objective_settings(model.training_summary)
        objective = cls(model, cache, LQFTrainingArguments(output_dir=".", progress=False, **settings))
        return objective.data_term(), objective.priors([settings["prior"]])[settings["prior"]]

    def data_term(self, rows: Tensor | None = None) -> DataTerm:
        """The data term over the training images ``rows`` (default all), each process holding its shard."""
        cache = self.cache
        values, labels, keys = ((cache.values, cache.labels, cache.digests) if rows is None else
                                (cache.values[rows.numpy()], cache.labels[rows], cache.digests[rows]))
        return DataTerm(self.model, values, labels, keys, batch_size=self.args.eval_batch_size,
                        reduce_sum=self.reduce_sum or (lambda t: t), rank=self.rank, world=self.world)

    def priors(self, kinds: list[str], saved: dict[str, Tensor] | None = None,
               data: DataTerm | None = None) -> dict[str, PriorMetric]:
        """The metric of each prior in ``kinds``, by kind; the K-FAC prior's curvature from every training image
        (no ridge; a function of the set of images only), or restored from ``saved``."""
        kfac = None
        if Prior.KFAC.value in kinds:
            kfac = build_kfac(self.model, (data or self.data_term()).trunk_batches, **self._kfac_settings(), saved=saved,
                              reduce_sum=self.reduce_sum, progress=self.progress)
        flat = Flat(self.model.linearization_point)
        return {kind: PriorMetric(flat, kfac if kind == Prior.KFAC.value else None, head_only=kind == Prior.HEAD.value)
                for kind in kinds}

    def kfac_without(self, curvature: Mapping[str, Tensor], count: int) -> dict[str, Tensor]:
        """The prior's K-FAC over ``count`` training images (``curvature``: its finalized state) without this
        objective's images, which must be some of them: their share is accumulated over them alone and taken out
        (``KFAC.remove``), instead of a pass over the others. Returns the finalized state."""
        model = self.model
        kfac = KFAC(model.linearization_point, model.linearized_parameters, **self._kfac_settings())
        kfac.load_state_dict(curvature)
        share = KFAC(model.linearization_point, model.linearized_parameters, **self._kfac_settings())
        for z, keys in self.data_term().trunk_batches():
            share.accumulate(model.tail_function(z), z.shape[0], keys)
        kfac.remove(share, count, self.reduce_sum)
        return kfac.state_dict()

    def _kfac_settings(self) -> dict[str, Any]:
        # one random output vector per image, drawn from its content digest, unless "exact": C times cheaper
        outputs = "exact" if self.args.kfac_outputs == KFACOutputs.EXACT.value else "sampled"
        return {"ridge": 0.0, "damping": self.args.damping, "outputs": outputs, "seed": 0}


def model_inputs(items: list, cache_trunk: bool) -> tuple[dict[str, Tensor], Tensor]:
    """Batch items for the model: ``({"trunk_output" | "pixel_values": [B, ...]}, labels [B])``."""
    values, labels = collate(items)
    return {"trunk_output" if cache_trunk else "pixel_values": values}, labels


@torch.no_grad()
def predictions(model: LQFModel, batches: Iterator[tuple[dict[str, Tensor], Tensor]],
                gather: Callable[[Any], Any] | None = None) -> tuple[Tensor, Tensor]:
    """The linearized model's outputs ``[N, K]`` and the labels ``[N]`` over ``batches`` (``(inputs, labels)``), on
    the CPU; ``gather`` collects each batch's outputs and labels from every process."""
    outputs, labels = [], []
    for inputs, batch_labels in batches:
        logits = model(**inputs)
        logits, batch_labels = gather((logits, batch_labels)) if gather is not None else (logits, batch_labels)
        outputs.append(logits.cpu())
        labels.append(batch_labels.cpu())
    return torch.cat(outputs), torch.cat(labels)


def scores(model: LQFModel, outputs: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy, MSE loss, and NLL, ECE and Brier score of the calibrated probabilities ``softmax(f / T)``."""
    probabilities = (outputs.double() / model.config.temperature).softmax(-1)
    return {"accuracy": float((outputs.argmax(-1) == labels).double().mean()),
            "loss": float(data_loss(outputs, labels, model.config.target_scale)),
            **probability_metrics(probabilities, labels)}


def evaluate(model: LQFModel, batches: Iterator[tuple[dict[str, Tensor], Tensor]],
             gather: Callable[[Any], Any] | None = None) -> dict[str, float]:
    """``scores`` of the linearized model over ``batches`` (``(inputs, labels)``); ``gather`` collects each
    batch's outputs and labels from every process."""
    return scores(model, *predictions(model, batches, gather))


def evaluate_dataset(model: LQFModel, dataset: Dataset, *, batch_size: int = 64) -> dict[str, float]:
    """``scores`` of ``model`` on ``dataset`` (items ``{"pixel_values", "label"}``), one process."""
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=lambda items: model_inputs(items, False))
    return evaluate(model, (({k: v.to(device) for k, v in x.items()}, y.to(device)) for x, y in loader))
