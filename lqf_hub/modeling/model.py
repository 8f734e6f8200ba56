"""LQFModel: a pretrained backbone and a new head, linearized around their weights w0.

``model(x) = f(x; w0) + J·δ``. The trainable state is δ (one ``nn.Parameter`` per linearized tensor,
including the new head's). The backbone's own parameters hold w0 and never change. Parts of the
forward pass before the first linearized parameter (the *trunk*) run once without gradients, and
their output can be cached (``encode_trunk`` / ``forward(trunk_output=...)``).
"""

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from .. import hub
from ..adapters import NECK, STEM, Backbone, backbone_from_spec
from ..config import MIN_IMAGE_SIZE, Activation, HeadInit, LQFConfig
from .activations import ActivationMode, count_relu_modules
from .linearize import NetworkCall, forward_mode_attention, linearized, nonlinear
from .posterior import Posterior, layer_gradients


class _Network(nn.Module):
    """Backbone (w0, frozen) followed by the head: runs the backbone's segments from ``start`` on."""

    def __init__(self, backbone: Backbone, head: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone.network
        self.head = head
        self.segments = backbone.segments

    def forward(self, x: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        for segment in self.segments[start:stop]:
            x = segment.run(x)
        return x if stop is not None else self.head(x)


class LQFModel(nn.Module):
    """A linearized image classifier. Build with ``from_timm``, ``from_transformers`` or
    ``from_pretrained`` (an LQF checkpoint, local or on the Hub); save with ``save_pretrained`` /
    ``push_to_hub`` (the checkpoint format lives in ``lqf_hub.hub``).

    Shapes: ``pixel_values [B, C, H, W] -> logits [B, num_classes]``.
    """

    def __init__(self, config: LQFConfig, backbone: Backbone | None = None, head: nn.Linear | None = None) -> None:
        super().__init__()
        if not config.num_classes:
            raise ValueError("`config.num_classes` must be set (>= 1); from_timm/from_transformers set it for you.")
        if config.backbone is None:
            if backbone is None:
                raise ValueError("`config.backbone` is empty; build with LQFModel.from_timm / from_transformers.")
            config = dataclasses.replace(config, backbone=backbone.spec)
        if backbone is None:
            backbone = backbone_from_spec(config.backbone)
        self.config = config
        self.training_summary: dict[str, Any] = {}  # dataset and metrics of the run that trained δ (model card)
        self.posterior: Posterior | None = None  # set by the solver: predict_uncertainty's covariance
        self._fixed_input_size = backbone.fixed_input_size
        head = head if head is not None else _new_head(config, backbone)
        self.net = _Network(backbone, head).requires_grad_(False).eval()
        names = _linearized_names(config.linearize, backbone, self.net)
        self.delta = nn.ParameterDict()  # filled in network order (a plain dict would be sorted by key)
        network_params = dict(self.net.named_parameters())
        for name in names:
            self.delta[_delta_key(name)] = nn.Parameter(torch.zeros_like(network_params[name]))
        self._names = {_delta_key(n): n for n in names}
        self._start = _first_segment(names, backbone)
        self._relu_modules = count_relu_modules(backbone.network)
        self._interceptor: ActivationMode | None = None

    # ----------------------------------------------------------------------------------------- build
    @classmethod
    def from_timm(
        cls,
        name_or_model: str | nn.Module,
        num_classes: int | None = None,
        config: LQFConfig | None = None,
        *,
        pretrained: bool = True,
        checkpoint_path: str | os.PathLike | None = None,
        **model_args: Any,
    ) -> "LQFModel":
        """Linearize a timm classifier (by name, or an instance used in place).

        ``checkpoint_path``: your own weights instead of the pretrained ones, a ``.safetensors`` timm state dict
        or a legacy EfficientNet-Lite ``.pth``; checkpoints record the file's sha256 as the weights' origin.
        """
        from ..adapters.timm import timm_backbone

        backbone = timm_backbone(
            name_or_model, pretrained=pretrained, checkpoint_path=checkpoint_path, model_args=model_args
        )
        return cls.from_backbone(backbone, num_classes, config)

    @classmethod
    def from_transformers(
        cls,
        repo_id_or_model: str | nn.Module,
        num_classes: int | None = None,
        config: LQFConfig | None = None,
        *,
        data_config: dict[str, Any] | None = None,
        **from_pretrained_kwargs: Any,
    ) -> "LQFModel":
        """Linearize a Hugging Face ``AutoModelForImageClassification`` (repo id, or an instance used in place)."""
        from ..adapters.transformers import transformers_backbone

        backbone = transformers_backbone(repo_id_or_model, data_config=data_config, **from_pretrained_kwargs)
        return cls.from_backbone(backbone, num_classes, config)

    @classmethod
    def from_backbone(
        cls, backbone: Backbone, num_classes: int | None = None, config: LQFConfig | None = None
    ) -> "LQFModel":
        """Linearize a backbone any adapter built (e.g. ``adapters.backbone_from_name``)."""
        config = config or LQFConfig()
        keep_head = config.head_init == HeadInit.PRETRAINED.value and backbone.pretrained_head is not None
        if num_classes is None:
            num_classes = config.num_classes or (backbone.pretrained_head.out_features if keep_head else None)
        if num_classes is None:
            raise ValueError("Pass `num_classes` (>= 1), the number of classes of the new head.")
        labels = config.id2label or (backbone.pretrained_labels if keep_head else None)
        config = config.with_classes(num_classes, labels)
        return cls(dataclasses.replace(config, backbone=backbone.spec), backbone)

    def __deepcopy__(self, memo: dict) -> "LQFModel":
        raise TypeError("An LQFModel cannot be deep-copied: its backbone's segments are closures over the original "
                        "modules, so a copy would run them. Copy it with save_pretrained + from_pretrained.")

    # ----------------------------------------------------------------------------- save and load
    def save_pretrained(
        self, save_directory: str | os.PathLike, *, base: str = "full", push_to_hub: bool = False,
        repo_id: str | None = None, **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Write config, safetensors and model card to ``save_directory`` (atomically).

        ``base="full"`` stores the linearization point too; ``base="reference"`` only δ and the head, plus
        the base model's origin and the sha256 of its weights (as small as the linearized part: under 5% of a
        full checkpoint for a head, about 20% for EfficientNet-Lite0's last block).
        """
        hub.save_checkpoint(self, save_directory, base)
        if push_to_hub:
            return self.push_to_hub(repo_id or Path(save_directory).name, base=base, **push_to_hub_kwargs)
        return None

    def push_to_hub(
        self, repo_id: str, *, base: str = "full", private: bool | None = None, token: str | None = None,
        commit_message: str = "Upload LQF model", branch: str | None = None, create_pr: bool | None = None,
    ) -> str:
        """Create ``repo_id`` if needed and upload the checkpoint in one commit; returns the commit URL."""
        return hub.push_checkpoint(self, repo_id, base=base, private=private, token=token,
                                   commit_message=commit_message, branch=branch, create_pr=create_pr)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *, revision: str | None = None,
        token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False, force_download: bool = False,
    ) -> "LQFModel":
        """Load an LQF checkpoint from a directory or a Hub repo; everything is validated before use."""
        return hub.load_checkpoint(
            cls, pretrained_model_name_or_path, revision=revision, token=token, cache_dir=cache_dir,
            local_files_only=local_files_only, force_download=force_download,
        )

    def checkpoint_state(self) -> dict[str, dict[str, Tensor]]:
        """The tensors a checkpoint holds, by part: ``base`` (the backbone at w0, parameters and buffers),
        ``head`` (the new head at its linearization point), ``delta`` (network parameter name -> δ)."""
        return {"base": self.net.backbone.state_dict(), "head": self.net.head.state_dict(),
                "delta": dict(self.linearized_parameters)}

    def load_checkpoint_state(self, state: Mapping[str, Mapping[str, Tensor]]) -> None:
        """Copy in tensors shaped like ``checkpoint_state``'s, strictly; without ``base`` the backbone's
        weights stay as they are (a checkpoint that references its base)."""
        deltas = self.linearized_parameters
        if set(state["delta"]) != set(deltas):
            raise ValueError(f"`state['delta']` must name exactly the linearized parameters; these differ: "
                             f"{sorted(set(state['delta']) ^ set(deltas))[:5]}.")
        with torch.no_grad():
            if "base" in state:
                self.net.backbone.load_state_dict(state["base"], strict=True)
            self.net.head.load_state_dict(state["head"], strict=True)
            for name, delta in deltas.items():
                delta.copy_(state["delta"][name])

    def posterior_state(self) -> tuple[dict[str, Tensor], dict[str, str]] | None:
        """The posterior's tensors (K-FAC's eigendecompositions at w0) and scalars (strings), or None."""
        return None if self.posterior is None else (self.posterior.curvature, self.posterior.metadata())

    def load_posterior_state(self, tensors: Mapping[str, Tensor], scalars: Mapping[str, str]) -> None:
        """Set the posterior from ``posterior_state``'s output, checked against the linearized tensors first."""
        self.posterior = Posterior.from_state(tensors, scalars, self.linearization_point)

    # --------------------------------------------------------------------------------------- forward
    def encode_trunk(self, pixel_values: Tensor) -> Tensor:
        """The frozen part of the network, before the first linearized parameter (cacheable).

        ``pixel_values [B, C, H, W] -> trunk output`` (its shape depends on where the trunk ends).
        """
        with self._activations(check=False):
            return self._encode(pixel_values)

    def forward(self, pixel_values: Tensor | None = None, *, trunk_output: Tensor | None = None) -> Tensor:
        """``f(x; w0) + J·δ``: ``pixel_values [B, C, H, W]`` (or a cached ``trunk_output``) -> ``[B, K]``."""
        with self._activations(check=trunk_output is None):
            z = self._trunk(pixel_values, trunk_output)
            return linearized(self.tail_function(z), self.linearization_point, self.linearized_parameters)

    @torch.no_grad()
    def predict_proba(self, pixel_values: Tensor | None = None, *, trunk_output: Tensor | None = None) -> Tensor:
        """Calibrated class probabilities ``softmax(f / T)`` with the temperature the solver fitted on its
        out-of-fold predictions (``config.temperature``): ``[B, C, H, W]`` (or a ``trunk_output``) -> ``[B, K]``."""
        return (self(pixel_values, trunk_output=trunk_output) / self.config.temperature).softmax(-1)

    @torch.no_grad()
    def predict_uncertainty(self, pixel_values: Tensor | None = None, *, trunk_output: Tensor | None = None,
                            chunk: int = 8) -> Tensor:
        """How sure the model is of each output: the posterior predictive's standard deviation of ``f_lin``, in
        output units (the targets are α·one-hot), from ``σ²/N · J(x)(G + λM)⁻¹J(x)ᵀ`` (``modeling.posterior``):
        ``[B, C, H, W]`` (or a ``trunk_output``) -> ``[B, K]``. ``chunk`` images' Jacobians ``[chunk, K, P]`` are
        held at a time."""
        return self.predictive_covariance(pixel_values, trunk_output=trunk_output, chunk=chunk).diagonal(
            dim1=-2, dim2=-1).sqrt()

    @torch.no_grad()
    def predictive_covariance(self, pixel_values: Tensor | None = None, *, trunk_output: Tensor | None = None,
                              chunk: int = 8) -> Tensor:
        """The posterior predictive covariance of ``f_lin`` per image: ``[B, C, H, W]`` (or a ``trunk_output``)
        -> ``[B, K, K]``."""
        if self.posterior is None:
            raise ValueError("This model has no posterior: only models solved by the certified solver (`lqf-hub "
                             "train`, method 'solve') carry one, and checkpoints saved before it was stored lack it. "
                             "Train it again to get its uncertainty.")
        with self._activations(check=trunk_output is None):
            z = self._trunk(pixel_values, trunk_output)
        point = self.linearization_point
        layers = self.posterior.layer_names()
        diagonal = {name: point[name] for name in self.posterior.diagonal_names()}
        tracked = {name: point[name].detach().requires_grad_() for name in layers}

        def outputs(params: dict[str, Tensor], image: Tensor) -> Tensor:  # one image's [K]
            return self.tail_function(image[None])(params)[0]

        per_image = vmap(jacrev(outputs), in_dims=(None, 0))  # J(x) of each image: no cross-image products
        parts = []
        for rows in z.split(chunk):
            with torch.enable_grad():
                gradients = layer_gradients(self.tail_function(rows), tracked, layers)
                jacobians = per_image(diagonal, rows) if diagonal else {}  # name -> [chunk, K, *shape]
            parts.append(self.posterior.covariance(gradients, jacobians))
        return torch.cat(parts)

    def base_forward(self, pixel_values: Tensor | None = None, *, trunk_output: Tensor | None = None) -> Tensor:
        """The network at the linearization point, ``f(x; w0)``, with the same head: ``[B, K]``."""
        with torch.no_grad(), self._activations(check=trunk_output is None):
            z = self._trunk(pixel_values, trunk_output)
            with forward_mode_attention():
                return self.net(z, self._start)

    def nonlinear_forward(self, pixel_values: Tensor) -> Tensor:
        """The network itself at ``w0 + δ`` (no linearization), for comparison: ``[B, K]``."""
        with self._activations(check=True):
            z = self._encode(pixel_values)
            return nonlinear(self.tail_function(z), self.linearization_point, self.linearized_parameters)

    def features(self, pixel_values: Tensor | None = None, *, trunk_output: Tensor | None = None) -> Tensor:
        """Pre-logit features of the backbone at w0 (what the head sees): ``[B, num_features]``."""
        with torch.no_grad(), self._activations(check=trunk_output is None):
            z = self._trunk(pixel_values, trunk_output)
            with forward_mode_attention():
                return self.net(z, self._start, len(self.net.segments))

    def tail_function(self, trunk_output: Tensor) -> NetworkCall:
        """The network from ``trunk_output`` on, as a function of parameters ``{network name: tensor}``
        (the others stay at w0), under the model's activation and attention treatment. Building block of
        the linearized forward, of K-FAC and of per-sample gradients."""
        def call(params: Mapping[str, Tensor]) -> Tensor:
            with self._activations(check=False), forward_mode_attention():
                return functional_call(self.net, dict(params), (trunk_output, self._start))

        return call

    # ---------------------------------------------------------------------------------------- state
    @property
    def linearized_parameters(self) -> dict[str, nn.Parameter]:
        """Network parameter name (``backbone.…`` / ``head.…``) -> its δ."""
        return {self._names[k]: p for k, p in self.delta.items()}

    @property
    def linearization_point(self) -> dict[str, Tensor]:
        """Network parameter name -> its w0, for the linearized parameters."""
        params = dict(self.net.named_parameters())
        return {name: params[name] for name in self._names.values()}

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def data_config(self) -> dict[str, Any]:
        """The backbone's preprocessing in timm's form (``input_size``, ``mean``, ``std``, ...), as saved."""
        return self.config.backbone.data_config

    def set_image_size(self, size: int) -> None:
        """Train and predict at ``size`` x ``size`` pixels (recorded in checkpoints); not for fixed-size models."""
        channels, height, width = self.data_config["input_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < MIN_IMAGE_SIZE:
            raise ValueError(f"The image size must be an int >= {MIN_IMAGE_SIZE} pixels, got {size!r}.")
        if self._fixed_input_size and (height, width) != (size, size):
            raise ValueError(f"This backbone needs {height}x{width} inputs; it cannot run at {size}x{size}.")
        try:  # one blank image: strided stems and windowed attention fail on some small sizes
            with torch.no_grad():
                weight = self.net.head.weight  # the model's device and dtype (a CUDA model, a float64 one)
                self(pixel_values=torch.zeros(1, channels, size, size, device=weight.device, dtype=weight.dtype))
        except RuntimeError as err:
            raise ValueError(f"This backbone cannot run at {size}x{size} pixels ({err}); choose a larger size.") from None
        self.data_config["input_size"] = [channels, size, size]

    def train(self, mode: bool = True) -> "LQFModel":
        """Only δ trains; BatchNorm statistics and dropout of the network stay in eval mode."""
        super().train(mode)
        self.net.eval()
        return self

    # -------------------------------------------------------------------------------------- helpers
    def _trunk(self, pixel_values: Tensor | None, trunk_output: Tensor | None) -> Tensor:
        if (pixel_values is None) == (trunk_output is None):
            raise ValueError("Pass exactly one of `pixel_values` and `trunk_output`.")
        if trunk_output is None:
            return self._encode(pixel_values)
        return trunk_output.to(self.net.head.weight.dtype)  # a float16 trunk cache into a float32 model

    def _encode(self, pixel_values: Tensor) -> Tensor:
        self._check_pixels(pixel_values)
        dtype = self.net.head.weight.dtype  # float32 pixels into a float64 / bfloat16 model
        with torch.no_grad():  # channels-last pixels: the default job's trunk ran 1.6× faster (trunk_layout.md)
            pixels = pixel_values.to(dtype).contiguous(memory_format=torch.channels_last)
            return self.net(pixels, 0, self._start).contiguous()

    @contextlib.contextmanager
    def _activations(self, check: bool) -> Iterator[None]:
        """ReLU treatment for one pass (re-entrant); ``check``: the pass runs the whole network, so it
        must have seen the ReLUs."""
        mode = Activation(self.config.activation)
        if mode is Activation.NONE or self._interceptor is not None:
            yield
            return
        self._interceptor = ActivationMode(mode, self.config.leaky_slope)
        try:
            with self._interceptor:
                yield
            calls = self._interceptor.calls
        finally:
            self._interceptor = None
        if check and calls == 0 and self._relu_modules:
            raise RuntimeError(
                f"The backbone has {self._relu_modules} ReLU modules but none was called through F.relu / "
                f"F.hardtanh, so activation={mode.value!r} cannot apply; use activation='none'."
            )

    def _check_pixels(self, x: Tensor) -> None:
        channels, height, width = self.data_config["input_size"]
        if not isinstance(x, Tensor):
            raise TypeError(f"`pixel_values` must be a torch.Tensor, got {type(x).__name__}.")
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(
                f"`pixel_values` must have shape [batch, {channels}, height, width], got {list(x.shape)}. "
                "Add a batch dimension with x.unsqueeze(0); repeat grayscale images to 3 channels."
            )
        if self._fixed_input_size and tuple(x.shape[-2:]) != (height, width):
            raise ValueError(
                f"This backbone needs {height}x{width} inputs, got {x.shape[-2]}x{x.shape[-1]}; "
                "resize with the model's transforms (model.data_config)."
            )
        if not x.is_floating_point():
            raise TypeError(f"`pixel_values` must be a float tensor (normalised), got {x.dtype}.")
        if not torch.isfinite(x).all():
            raise ValueError("`pixel_values` contain NaN or Inf; check the data pipeline (decoding, normalisation).")


def _delta_key(name: str) -> str:
    """Parameter names contain dots, which nn.ParameterDict keys may not."""
    return name.replace(".", "/")


def _new_head(config: LQFConfig, backbone: Backbone) -> nn.Linear:
    like = next(backbone.network.parameters())
    head = nn.Linear(backbone.num_features, config.num_classes, dtype=like.dtype, device=like.device)
    init = HeadInit(config.head_init)
    with torch.no_grad():
        if init is HeadInit.PRETRAINED:
            pretrained = backbone.pretrained_head
            if pretrained is None or pretrained.out_features != config.num_classes:
                found = None if pretrained is None else pretrained.out_features
                raise ValueError(
                    f"head_init='pretrained' keeps the backbone's classifier, which has {found} classes, "
                    f"but num_classes={config.num_classes}; use head_init='random'."
                )
            head.load_state_dict(pretrained.state_dict())
        elif init is HeadInit.ZEROS:
            head.weight.zero_()
            head.bias.zero_()
        else:
            generator = torch.Generator().manual_seed(config.seed)
            bound = 1.0 / math.sqrt(backbone.num_features)
            head.weight.copy_(torch.rand(head.weight.shape, generator=generator, dtype=torch.float64) * 2 * bound - bound)
            head.bias.zero_()
    return head


def _linearized_names(spec: str | list[str], backbone: Backbone, net: _Network) -> list[str]:
    """Network parameter names (``backbone.*``, ``head.*``) that get a δ, in registration order."""
    names = [n for n, _ in backbone.network.named_parameters()]
    if spec == "head":
        chosen = []
    elif spec == "all":
        chosen = names
    elif isinstance(spec, str):  # last:N
        n = int(spec.split(":")[1])
        if not backbone.blocks:
            raise ValueError(
                f"No block list is known for {type(backbone.network).__name__}, so linearize={spec!r} is "
                "undefined; use 'head', 'all' or a list of module-name prefixes."
            )
        if n > len(backbone.blocks):
            raise ValueError(f"linearize={spec!r} but {type(backbone.network).__name__} has {len(backbone.blocks)} blocks.")
        first = next(i for i, name in enumerate(names) if _under(name, backbone.blocks[-n]))
        chosen = names[first:]
    else:
        for prefix in spec:
            if not any(_under(name, prefix) for name in names):
                raise ValueError(
                    f"linearize prefix {prefix!r} matches no parameter of {type(backbone.network).__name__}; "
                    f"parameter names look like {names[0]!r} ... {names[-1]!r}."
                )
        chosen = [name for name in names if any(_under(name, p) for p in spec)]
    return [f"backbone.{n}" for n in chosen] + [n for n, _ in net.named_parameters() if n.startswith("head.")]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _first_segment(names: list[str], backbone: Backbone) -> int:
    """Index of the first segment that uses a linearized backbone parameter (len(segments) if none)."""
    segments = backbone.segments
    position = {n: k for k, (n, _) in enumerate(backbone.network.named_parameters())}
    modules = [(i, s.name) for i, s in enumerate(segments) if s.name not in (STEM, NECK)]
    first_block = min((k for n, k in position.items() if any(_under(n, m) for _, m in modules)), default=len(position))
    start = len(segments)
    for name in (n.removeprefix("backbone.") for n in names if n.startswith("backbone.")):
        owner = next((i for i, m in modules if _under(name, m)), None)
        if owner is None:  # stem owns what is registered before the blocks, neck what comes after
            owner = 0 if position[name] < first_block else len(segments) - 1
        start = min(start, owner)
    return start
