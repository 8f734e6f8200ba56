"""Training LQF models with Accelerate: one CPU to many GPUs (``accelerate launch``).

Two methods: the certified optimum of the LQF objective with its prior and λ chosen by cross-validation over the
training images (``method="solve"``: ``solver/``; the default), or the paper's early-stopped loop (``method="sgd"``,
``sgd.py``). The frozen trunk's outputs are computed once and cached when the data is not augmented
(``cache.py``), so each pass costs only the linearized tail; ``objective.py`` builds the objective from them. Every process takes its slice of the
data, so results do not depend on the number of processes. The run ends with the model saved to ``output_dir/model`` (card included) and,
if asked, pushed to the Hub.
"""

import dataclasses
import json
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..errors import CheckpointError
from ..files import atomic_write_text
from ..modeling.calibration import fit_temperature, plot_reliability
from ..modeling.model import LQFModel
from ..modeling.posterior import Posterior, noise_variance
from ..solver.evidence import EVIDENCE_TOLERANCE, evidence_path, most_evident, plot_evidence
from ..solver.kfac import KFAC
from ..solver.selection import Selection, check_classes, plot_path, select
from ..solver.solve import DataTerm, HeadPath, PriorMetric, solve
from .arguments import LQFTrainingArguments, Method, Prior, Rule
from .cache import TrunkCache, cache_trunk_outputs, dataset_fingerprint
from .objective import Objective, build_kfac, model_inputs, predictions, prior_kinds, scores
from .sgd import SGDLoop
from .state import TrainerState, load_trainer_checkpoint, prune_checkpoints, save_trainer_checkpoint

EVIDENCE_PROBES = 2
"""Rademacher probes of the evidence's log-determinant (``select='evidence'``): its error is reported and drawn; on
the validation suite 2 probes were what the comparison with cross-validation used (docs/probabilities.md)."""


def process_state() -> PartialState:
    """This process's place in the run. Without an accelerator the processes must be asked to be CPU ones:
    otherwise accelerate (seen with 1.15) turns a multi-process `accelerate launch` on a CPU-only machine
    into N unconnected single-process runs."""
    return PartialState(cpu=not torch.accelerator.is_available())


class LQFTrainer:
    """Fit the δ of an ``LQFModel`` on an image dataset (items ``{"pixel_values", "label"}``).

    ``train()`` ends with the model in ``output_dir/model`` (config, safetensors, a card with the results)
    and, with ``push_to_hub``, on the Hub. ``inputs(split)`` gives what the model is fed (cached trunk
    outputs, computed once), ``features(split)`` the pre-logit features at w0 (for linear probes).
    """

    def __init__(
        self,
        model: LQFModel,
        train_dataset: Dataset,
        eval_dataset: Dataset | None = None,
        args: LQFTrainingArguments | None = None,
        train_source: dict[str, Any] | None = None,
        curvature: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.model, self.train_dataset, self.eval_dataset = model, train_dataset, eval_dataset
        self.train_source = train_source  # how to fetch the training images again (recorded in the card)
        # K-FAC at w0 over the training images when already known (a finalized ``KFAC.state_dict()``): ``forget``
        # passes the model's less the removed images' share
        self.curvature = curvature
        self._data_fingerprint: str | None = None
        self.args = args or LQFTrainingArguments()
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if dataset is not None and len(dataset) == 0:
                raise ValueError(f"`{name}` is empty; check the split and the --shots / filtering options.")
        self.accelerator = Accelerator(
            cpu=process_state().device.type == "cpu",
            mixed_precision=self.args.mixed_precision,
            gradient_accumulation_steps=self.args.gradient_accumulation_steps,
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            log_with=self.args.report_to,
            project_dir=self.args.output_dir,
        )
        if self.args.batch_size % self.accelerator.num_processes:
            raise ValueError(
                f"batch_size={self.args.batch_size} must be divisible by the {self.accelerator.num_processes} processes."
            )
        self.output_dir = Path(self.args.output_dir)
        self.history: list[dict[str, Any]] = []
        self.selection: dict[str, Any] | None = None  # the solver's choice of λ and its path, once trained
        self.stage_seconds: dict[str, float] = {}  # wall seconds of each stage of the last train()
        self._inputs: dict[str, Dataset] = {}

    # ------------------------------------------------------------------------------------- train
    def train(self) -> list[dict[str, Any]]:
        """Run (or resume) training, save the model to ``output_dir/model``; returns the metrics, one dict per
        epoch of the SGD loop or one for the solver."""
        args, acc = self.args, self.accelerator
        if args.method == Method.SOLVE.value and not args.cache_trunk:
            raise ValueError("method='solve' works on the cached trunk outputs (cache_trunk=True); for augmentation "
                             "on the fly use method='sgd'.")
        set_seed(args.seed)
        model = self.model.to(acc.device)
        settings = args.settings_fingerprint(model)
        saved, resumed = self._load_resume(settings)  # settings first: refuse before the (long) caching
        started = time.perf_counter()
        train_data = self.inputs("train")
        data = train_data.fingerprint if isinstance(train_data, TrunkCache) else dataset_fingerprint(train_data)
        self._data_fingerprint = data
        if resumed is not None and resumed.data_fingerprint != data:
            raise CheckpointError(
                f"Checkpoint {args.resume_from} was trained on another training set (other images, labels or "
                "preprocessing); resume with the same data or start a new run in another --output-dir."
            )
        if (args.method == Method.SOLVE.value and self._selects() and args.select == Rule.CROSS_VALIDATION.value
                and (resumed is None or resumed.selection is None)):
            check_classes(train_data.labels)  # before the evaluation images are cached
        eval_data = None if self.eval_dataset is None else self.inputs("eval")
        self.stage_seconds = {"caching": time.perf_counter() - started}
        if resumed is not None:
            self.history = list(resumed.history)
        if args.method == Method.SOLVE.value:
            self._solve(train_data, eval_data, settings, data, saved, resumed)
        else:
            SGDLoop(self).run(train_data, eval_data, settings, data, saved, resumed)
        self._finish()
        return self.history

    def _solve(self, train_data: TrunkCache, eval_data: Dataset | None, settings: str, data: str,
               saved: dict[str, torch.Tensor], resumed: TrainerState | None) -> None:
        """The certified optimum: the prior and λ from Krylov paths scored by cross-validation, then the refit."""
        args, acc, model = self.args, self.accelerator, self.model
        started = time.perf_counter()
        progress = args.progress and acc.is_main_process
        everything = self.data_term()
        metrics = self._objective().priors(prior_kinds(args.prior), self._known_curvature(saved), everything)
        self._stage("objective", started)  # the data term's right-hand side and K-FAC: one pass each
        selection = resumed.selection if resumed is not None else None
        if selection is None:
            if not self._selects():
                selection = {"prior": args.prior, "ridge": args.ridge_grid[0], "iterations": 0, "paths": {}}
                warm = None
            else:
                selection, warm = (self._choose_by_evidence(everything, metrics) if args.select == Rule.EVIDENCE.value
                                   else self._choose_by_cross_validation(train_data, metrics))
                if len(args.ridge_grid) >= 3 and selection["ridge"] in (min(args.ridge_grid), max(args.ridge_grid)):
                    warnings.warn(f"λ = {selection['ridge']:g} was chosen at an end of `ridge_grid` "
                                  f"({max(args.ridge_grid):g} … {min(args.ridge_grid):g}): the best λ may lie beyond "
                                  "it. Widen the grid past that end (see path.png).", stacklevel=3)
            kfac = metrics[Prior.KFAC.value].kfac if Prior.KFAC.value in metrics else None
            tensors = {f"kfac/{k}": v for k, v in kfac.state_dict().items()} if kfac is not None else {}
            if warm is not None:
                tensors["warm_start"] = warm
            self.checkpoint("selection", TrainerState(0, 0, None, settings, data, [], selection), tensors)
        else:
            warm = saved.get("warm_start")
        self._stage("selection", started)
        self.selection = selection
        metric = metrics[selection.get("prior", args.prior)]  # selections saved before priors were chosen lack it
        start = self._refit_start(everything, metric, selection["ridge"], warm)
        delta, certificate = solve(everything, metric, selection["ridge"], tolerance=args.tolerance,
                                   max_iterations=args.max_iterations, start=start, progress=progress)
        with torch.no_grad():
            for name, part in metric.flat.unflatten(delta).items():
                model.linearized_parameters[name].copy_(part)
        model.config.ridge = selection["ridge"]
        # fitted where the solver chose λ; a fixed λ (forget: the model's own) keeps the model's temperature
        model.config.temperature = selection.get("temperature", model.config.temperature)
        model.posterior = self._posterior(everything, metrics, metric.kind, selection, delta)
        self._stage("refit", started)
        self.start_log()
        selection_passes = selection.get("passes", 0.0)
        record = {"method": Method.SOLVE.value, "prior": metric.kind, "ridge": selection["ridge"],
                  "path_iterations": selection["iterations"], "path_products": selection.get("products", {}),
                  "dropped_priors": selection.get("dropped", {}), "train_loss": certificate.objective,
                  **{k: v for k, v in certificate.to_dict().items() if k not in ("ridge", "prior", "objective")},
                  "selection_passes": selection_passes, "passes": selection_passes + certificate.iterations}
        record["temperature"] = model.config.temperature
        if eval_data is not None:
            outputs, labels = self.predictions(eval_data)
            record.update({f"eval_{k}": v for k, v in scores(model, outputs, labels).items()})
            if acc.is_main_process:
                plot_reliability((outputs.double() / model.config.temperature).softmax(-1), labels,
                                 self.output_dir / "reliability.png")
            self._stage("evaluation", started)
        record.update(seconds=time.perf_counter() - started, stage_seconds=dict(self.stage_seconds))
        self.log(record)

    def _choose_by_cross_validation(self, train_data: TrunkCache, metrics: dict[str, PriorMetric]
                                    ) -> tuple[dict[str, Any], torch.Tensor | None]:
        """The prior and λ by raced K-fold cross-validation (``solver.selection``), the temperature and σ² from
        the out-of-fold outputs at the choice; path.png. Returns the selection record and the refit's start."""
        found = self._select(train_data, list(metrics.values()))
        selection = found.to_dict()
        if self.accelerator.is_main_process:
            plot_path(found, self.output_dir / "path.png")
        if found.out_of_fold is not None:
            selection["temperature"] = fit_temperature(*found.out_of_fold)
            selection["noise_variance"] = noise_variance(*found.out_of_fold, self.model.config.target_scale)
        return selection, found.warm_start

    def _choose_by_evidence(self, data: DataTerm, metrics: dict[str, PriorMetric]
                            ) -> tuple[dict[str, Any], torch.Tensor | None]:
        """The (prior, λ) of the largest evidence over all the training images (``solver.evidence``), σ² the one
        that maximises it; no image is held out, so no temperature is fitted. path.png draws the evidence.
        Returns the selection record and the refit's start: the chosen path's optimum at that λ."""
        args = self.args
        paths = {kind: evidence_path(data, metric, args.ridge_grid, probes=EVIDENCE_PROBES, seed=args.seed,
                                     tolerance=EVIDENCE_TOLERANCE, max_iterations=args.max_iterations,
                                     progress=args.progress and self.accelerator.is_main_process)
                 for kind, metric in metrics.items()}
        prior, ridge = most_evident(paths)
        chosen = paths[prior]
        products = {kind: path.products for kind, path in paths.items()}
        if self.accelerator.is_main_process:
            plot_evidence(paths, prior, ridge, self.output_dir / "path.png")
        selection = {"prior": prior, "ridge": ridge, "iterations": sum(products.values()), "products": products,
                     "dropped": {}, "passes": float(sum(products.values())), "paths": {},
                     "scheme": f"the evidence (marginal likelihood) over all {data.count} training images, "
                               f"{EVIDENCE_PROBES} log-determinant probes",
                     "evidence": {kind: path.to_dict() for kind, path in paths.items()},
                     "noise_variance": chosen.noise_variance[chosen.ridges.index(ridge)]}
        return selection, chosen.fit_path.solution(ridge)

    def _posterior(self, data: DataTerm, metrics: dict[str, PriorMetric], prior: str, selection: dict,
                   delta: torch.Tensor) -> Posterior:
        """The posterior at the optimum: K-FAC at w0 (the K-FAC prior's, else computed now: one pass), σ² from the
        out-of-fold residuals where the solver chose λ, else the model's own (forget), else the training residuals
        (in-sample: an underestimate)."""
        kfac = metrics[Prior.KFAC.value].kfac if Prior.KFAC.value in metrics else \
            self._objective().priors([Prior.KFAC.value], self._known_curvature({}), data)[Prior.KFAC.value].kfac
        variance = selection.get("noise_variance")
        if variance is None and self.model.posterior is not None:
            variance = self.model.posterior.noise_variance
        if variance is None:
            variance = noise_variance(data.gather(data.outputs(delta)), data.gather(data.labels),
                                      self.model.config.target_scale)
        return Posterior(kfac.state_dict(), list(self.model.linearization_point), self.args.damping, prior,
                         selection["ridge"], data.count, variance)

    def _known_curvature(self, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The K-FAC tensors (``kfac/...``) of a resumed run, else those passed as ``curvature``, else none."""
        if any(k.startswith("kfac/") for k in saved) or self.curvature is None:
            return saved
        return {**saved, **{f"kfac/{k}": v for k, v in self.curvature.items()}}

    def _stage(self, name: str, started: float) -> None:
        """Record the seconds of stage ``name``: the time since ``started`` less the stages recorded since."""
        since = sum(v for k, v in self.stage_seconds.items() if k != "caching")
        self.stage_seconds[name] = time.perf_counter() - started - since

    def _refit_start(self, data: DataTerm, metric: PriorMetric, ridge: float, warm: torch.Tensor | None):
        """Where the refit starts: the model's δ (``warm_start``), LQF-head's closed form, the mean of the folds'
        optima at the chosen prior and λ, or zero."""
        if self.args.warm_start:
            return metric.flat.flatten(dict(self.model.linearized_parameters))
        if metric.kind == Prior.HEAD.value:
            return HeadPath(data).solution(ridge)
        return None if warm is None else warm.to(metric.flat.device, metric.flat.dtype)

    def select(self) -> Selection:
        """Only the choice of the prior and λ: the regularisation paths over ``ridge_grid``, scored by
        cross-validation over the training images (no refit, nothing written). For studies of settings on
        validation data."""
        train_data = self.inputs("train")
        check_classes(train_data.labels)
        return self._select(train_data, list(self.priors().values()))

    def _selects(self) -> bool:
        """Whether training chooses the prior or λ (else both are fixed: one prior, one λ)."""
        return self.args.prior == Prior.AUTO.value or len(self.args.ridge_grid) > 1

    def objective(self) -> tuple[DataTerm, PriorMetric]:
        """The data term over all training images and the prior's metric: the objective 'solve' minimises (at
        the model's λ), rebuilt from the training set — for attribution (``explain.Explainer``)."""
        prior = self.selection["prior"] if self.selection is not None else self.args.prior
        if prior == Prior.AUTO.value:
            raise ValueError("With prior='auto' the objective is known once train() has chosen the prior; "
                             "train first, or pass the model's prior ('kfac' or 'isotropic').")
        return self.data_term(), self.priors(prior)[prior]

    def data_term(self, rows: torch.Tensor | None = None) -> DataTerm:
        """The data term of the objective over the training images ``rows`` (default all), each process
        holding its shard of them."""
        return self._objective().data_term(rows)

    def priors(self, prior: str | None = None) -> dict[str, PriorMetric]:
        """The metric of ``prior`` (default ``args.prior``; "auto": every prior it chooses from), by kind,
        built from all the training images."""
        return self._objective().priors(prior_kinds(prior or self.args.prior))

    def _objective(self) -> Objective:
        acc = self.accelerator
        return Objective(self.model, self.inputs("train"), self.args, reduce_sum=self._reduce_sum,
                         rank=acc.process_index, world=acc.num_processes,
                         progress=self.args.progress and acc.is_main_process)

    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor.to(self.accelerator.device), "sum")

    def _select(self, train_data: TrunkCache, metrics: list[PriorMetric]) -> Selection:
        args = self.args
        return select(self.data_term, train_data.labels, train_data.digests,
                      metrics, args.ridge_grid, folds=args.validation_folds, seed=args.seed,
                      max_iterations=args.max_iterations, progress=args.progress and self.accelerator.is_main_process)

    def _finish(self) -> None:
        """Curves, the model with its training summary, the Hub."""
        acc = self.accelerator
        self.model.training_summary = self._summary()
        self.save_model()
        if self.args.push_to_hub:
            self.push_to_hub()
        for tracker in acc.trackers:  # not end_training(): it ends the process group that evaluate() still needs
            tracker.finish()

    def _summary(self) -> dict[str, Any]:
        """What the model card and config.json say about this run."""
        final, args, model = self.history[-1], self.args, self.model
        name = model.config.backbone_name or "model"
        summary = {
            "name": f"LQF {name} on {args.dataset_name}" if args.dataset_name else f"LQF {name}",
            "dataset": args.dataset_name, "eval_split": args.eval_split_name, "train_samples": len(self.train_dataset),
            "method": args.method, "train_loss": final["train_loss"], "metrics": {},
        }
        if args.method == Method.SOLVE.value:  # the certificate
            summary.update({k: final[k] for k in ("prior", "ridge", "relative_gradient_norm", "suboptimality_bound",
                                                  "iterations", "path_iterations", "path_products", "dropped_priors")})
            summary.update(damping=args.damping, kfac_outputs=args.kfac_outputs,  # the rest of the objective
                           cache_dtype=args.cache_dtype)
            chosen_by = (self.selection.get("scheme")  # selections saved before the held-out part lack it
                         or f"{args.validation_folds}-fold cross-validation over the training images")
            summary["ridge_selection"] = chosen_by if len(args.ridge_grid) > 1 else "fixed"
            summary["prior_selection"] = chosen_by if args.prior == Prior.AUTO.value else "fixed"
            summary["selection"] = [
                {"prior": kind, **{k: point[k] for k in ("ridge", "validation_accuracy", "validation_loss",
                                                          "standard_error", "images")},
                 "chosen": (kind, point["ridge"]) == (self.selection["prior"], self.selection["ridge"])}
                for kind, path in self.selection.get("paths", {}).items() for point in path]
            if "evidence" in self.selection:  # select='evidence': every prior's evidence along λ
                summary["evidence"] = [
                    {"prior": kind, "ridge": ridge, "log_evidence": value, "noise_variance": variance,
                     "chosen": (kind, ridge) == (self.selection["prior"], self.selection["ridge"])}
                    for kind, path in self.selection["evidence"].items()
                    for ridge, value, variance in zip(path["ridges"], path["log_evidence"], path["noise_variance"])]
        else:
            summary.update({"epochs": final["epoch"], "learning_rate": final["learning_rate"]})
        if self.train_source is not None:
            summary["train_data"] = {**self.train_source, "fingerprint": self._data_fingerprint}
        if self.eval_dataset is not None and "eval_accuracy" in final:
            summary["eval_samples"] = len(self.eval_dataset)
            summary["metrics"] = {"accuracy": final["eval_accuracy"], "mse_loss": final["eval_loss"],
                                  **{k: final[f"eval_{k}"] for k in ("nll", "ece", "brier") if f"eval_{k}" in final}}
        return summary

    # ------------------------------------------------------------------------------- the artifact
    def save_model(self, output_dir: str | Path | None = None) -> Path:
        """Save the model (main process) to ``output_dir`` (default ``args.output_dir/model``); returns the path."""
        directory = Path(output_dir) if output_dir is not None else self.output_dir / "model"
        if self.accelerator.is_main_process:
            self.model.save_pretrained(directory, base=self.args.save_base)
        self.accelerator.wait_for_everyone()
        return directory

    def push_to_hub(self, repo_id: str | None = None, commit_message: str = "Upload LQF model") -> str | None:
        """Push the model to ``repo_id`` (default ``hub_model_id`` or the output directory's name); the commit URL
        on the main process, None on the others."""
        args = self.args
        url = None
        if self.accelerator.is_main_process:
            url = self.model.push_to_hub(repo_id or args.hub_model_id or self.output_dir.resolve().name,
                                         base=args.save_base, private=args.hub_private_repo or None,
                                         token=args.hub_token, commit_message=commit_message)
        self.accelerator.wait_for_everyone()
        return url

    # --------------------------------------------------------------------------------- evaluate
    def evaluate(self, dataset: Dataset | None = None) -> dict[str, float]:
        """Accuracy, MSE loss, and NLL, ECE and Brier score of the calibrated probabilities on ``dataset``
        (default: the eval set)."""
        return scores(self.model, *self.predictions(dataset))

    def predictions(self, dataset: Dataset | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The linearized model's outputs ``[N, K]`` and labels ``[N]`` on ``dataset`` (default: the eval set)."""
        dataset = self.inputs("eval") if dataset is None else dataset
        acc = self.accelerator
        loader = acc.prepare_data_loader(DataLoader(dataset, batch_size=self.args.eval_batch_size,
                                                    collate_fn=self.collate, num_workers=self.args.num_workers))
        return predictions(self.model, iter(loader), acc.gather_for_metrics)

    # ------------------------------------------------------------------------------------- data
    def inputs(self, split: str) -> Dataset:
        """What the model is fed for ``split`` ("train" or "eval"): the cached trunk outputs (items
        ``(trunk_output, label)``) when ``cache_trunk`` is on, else the dataset itself. Computed once; a
        ``TrunkCache`` given as the dataset is used as it is."""
        if split not in self._inputs:
            dataset = {"train": self.train_dataset, "eval": self.eval_dataset}[split]
            if dataset is None:
                raise ValueError("This trainer has no eval_dataset.")
            if isinstance(dataset, TrunkCache) and not self.args.cache_trunk:
                raise ValueError(f"The {split} set is a TrunkCache (trunk outputs): it needs cache_trunk=True.")
            if self.args.cache_trunk and not isinstance(dataset, TrunkCache):
                args = self.args
                dataset = cache_trunk_outputs(
                    self.model.to(self.accelerator.device), dataset, self.accelerator, batch_size=args.eval_batch_size,
                    num_workers=args.num_workers, name=split, memory_limit_gb=args.cache_in_memory_gb, dtype=args.cache_dtype,
                    spill_dir=self.output_dir / "cache", progress=args.progress,
                )
            if isinstance(dataset, TrunkCache):
                self.check_labels(dataset.labels, split)
            self._inputs[split] = dataset
        return self._inputs[split]

    @torch.no_grad()
    def features(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-logit features at w0 ``[N, D]`` and labels ``[N]`` of ``split`` (for linear probes)."""
        values, labels = [], []
        for inputs, batch_labels in DataLoader(self.inputs(split), batch_size=self.args.eval_batch_size,
                                               collate_fn=self.collate):
            values.append(self.model.features(**{k: v.to(self.accelerator.device) for k, v in inputs.items()}).cpu())
            labels.append(batch_labels)
        return torch.cat(values), torch.cat(labels)

    def collate(self, items: list) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Batch items the way the model is fed: ``({"trunk_output" | "pixel_values": [B, ...]}, labels [B])``."""
        return model_inputs(items, self.args.cache_trunk)

    def check_labels(self, labels: torch.Tensor, split: str) -> None:
        """Refuse labels outside ``0 .. num_classes - 1``."""
        bad = labels[(labels < 0) | (labels >= self.model.num_classes)]
        if len(bad):
            raise ValueError(
                f"The {split} set has label {int(bad[0])}, outside 0..{self.model.num_classes - 1}; "
                f"the model has num_classes={self.model.num_classes}."
            )

    # -------------------------------------------------------------------------------- curvature
    def kfac(self, ridge: float, saved: dict[str, torch.Tensor], batches, outputs: str, seed: int) -> KFAC:
        """K-FAC damped by ``ridge`` and ``damping`` (``objective.build_kfac``), summed over the processes."""
        return build_kfac(self.model, batches, ridge=ridge, damping=self.args.damping, outputs=outputs, seed=seed,
                          saved=saved, reduce_sum=self._reduce_sum,
                          progress=self.args.progress and self.accelerator.is_main_process)

    # ------------------------------------------------------------------------------ persistence
    def _load_resume(self, settings: str) -> tuple[dict[str, torch.Tensor], TrainerState | None]:
        """The checkpoint to resume from (tensors, state), validated against this run; ``({}, None)`` for a new run."""
        if not self.args.resume_from:
            return {}, None
        tensors, state = load_trainer_checkpoint(self.args.resume_from)
        if state.settings_fingerprint != settings:
            raise CheckpointError(
                f"Checkpoint {self.args.resume_from} was written with another model config or training options; "
                "resume with the same settings or start a new run in another --output-dir."
            )
        expected = {} if state.selection is not None else {  # the solver keeps only K-FAC and its choice of λ
            f"delta/{n}": d.shape for n, d in self.model.linearized_parameters.items()}
        wrong = [k for k, shape in expected.items() if k not in tensors or tensors[k].shape != shape]
        if wrong:
            raise CheckpointError(f"Checkpoint {self.args.resume_from} does not fit this model ({wrong[0]}).")
        return tensors, state

    def start_log(self) -> None:
        """``metrics.jsonl`` holds exactly the epochs of ``history`` (a resumed run drops what came after)."""
        acc = self.accelerator
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.output_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))
            acc.init_trackers("lqf", config={k: str(v) for k, v in dataclasses.asdict(self.args).items()
                                             if k != "hub_token"})

    def checkpoint(self, name: str, state: TrainerState, tensors: dict[str, torch.Tensor]) -> None:
        """Save ``checkpoints/<name>``; of the epoch checkpoints keep this and the previous one."""
        if self.accelerator.is_main_process:
            parent = self.output_dir / "checkpoints"
            save_trainer_checkpoint(parent / name, tensors, state)
            prune_checkpoints(parent, keep=2, protect=Path(self.args.resume_from) if self.args.resume_from else None)
        self.accelerator.wait_for_everyone()

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` (with the peak memory so far) to ``history``, ``metrics.jsonl`` and the trackers; print it."""
        record.update(peak_memory())
        self.history.append(record)
        acc = self.accelerator
        if not acc.is_main_process:
            return
        acc.log({k: v for k, v in record.items() if k != "epoch" and not isinstance(v, dict)}, step=record.get("epoch", 0))
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        summary = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float) and k != "seconds")
        tqdm.write(f"epoch {record['epoch']}: {summary}" if "epoch" in record else summary)




def peak_memory() -> dict[str, float]:
    """This process's peak resident memory so far, in GB (and the accelerator's peak allocation, if any)."""
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
    peak = {"peak_rss_gb": kilobytes / (2**30 if sys.platform == "darwin" else 2**20)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_accelerator_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return peak
