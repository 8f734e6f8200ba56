"""LQFConfig: what is linearized, how, and towards which targets — all JSON-serialisable."""

import dataclasses
import enum
import re
from dataclasses import dataclass, field
from typing import Any

from .adapters.spec import BackboneSpec, check_field_types, known_fields

FORMAT_VERSION = 2
"""Version of the saved config / checkpoint layout; a newer one is refused on load, older ones are converted
(1: the backbone was a loose dict; see ``hub.format._backbone_from_v1``)."""

MIN_IMAGE_SIZE = 16
"""Smallest input side ``LQFModel.set_image_size`` accepts: below it a 32×-strided backbone sees less than a pixel."""


class Activation(str, enum.Enum):
    """How ReLU-type activations are treated in the linearized network."""

    LEAKY = "leaky"  # ReLU/ReLU6 become leaky everywhere: changes f(x; w0)
    TANGENT = "tangent"  # primal stays the pretrained ReLU; the Jacobian uses the leaky derivative
    NONE = "none"  # the network as it is


class HeadInit(str, enum.Enum):
    """Linearization point of the new classification head."""

    RANDOM = "random"  # small seeded uniform(-1/sqrt(D), 1/sqrt(D)) weight, zero bias
    ZEROS = "zeros"  # only valid when nothing but the head is linearized (J of the trunk vanishes)
    PRETRAINED = "pretrained"  # keep the backbone's own classifier (num_classes must match it)


_LAST_N = re.compile(r"^last:(\d+)$")


def _choice(enum_cls: type[enum.Enum], name: str, value: Any) -> enum.Enum:
    try:
        return enum_cls(value)
    except ValueError:
        options = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"`{name}` must be one of {options}, got {value!r}.") from None


@dataclass
class LQFConfig:
    """Settings of a linearized model; ``to_dict()`` is plain JSON so checkpoints are readable.

    ``backbone`` is filled by the adapters (``LQFModel.from_timm`` / ``from_transformers``) and holds
    everything needed to rebuild the network without guessing; users normally leave it empty.
    """

    linearize: str | list[str] = field(
        default="last:1",
        metadata={
            "help": "Which parameters get a trainable delta: 'head' (linear probe), 'last:N' (the last N "
            "blocks and everything after them), 'all', or a list of module-name prefixes. The new head "
            "is always included."
        },
    )
    activation: str = field(
        default="tangent",
        metadata={"help": "ReLU treatment: 'leaky', 'tangent' (pretrained primal, leaky Jacobian) or 'none'.",
                  "choices": Activation},
    )
    leaky_slope: float = field(
        default=0.1, metadata={"help": "Negative slope of the leaky activation (0 < slope < 1)."}
    )
    target_scale: float = field(
        default=15.0, metadata={"help": "alpha: the MSE targets are alpha * one_hot(y) (paper: 15)."}
    )
    ridge: float = field(
        default=1e-4, metadata={"help": "lambda: (lambda/2)||w - w0||^2 pulls the weights towards w0."}
    )
    temperature: float = field(
        default=1.0, metadata={"help": "T of predict_proba's softmax(f / T); the solver fits it on its out-of-fold "
                                       "predictions."}
    )
    head_init: str = field(
        default="random",
        metadata={"help": "Head linearization point: 'random', 'zeros' or 'pretrained'.", "choices": HeadInit},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random head initialisation."})
    num_classes: int = field(default=0, metadata={"help": "Number of output classes (>= 1)."})
    id2label: dict[int, str] | None = field(
        default=None, metadata={"help": "Class index -> name; defaults to '0', '1', ..."}
    )
    backbone: BackboneSpec | None = field(
        default=None,
        metadata={"help": "Filled by the adapters: library, architecture, data config and weights' origin."},
    )

    def __post_init__(self) -> None:
        check_field_types(self)
        if isinstance(self.backbone, dict):  # from JSON
            self.backbone = BackboneSpec.from_dict(self.backbone)
        for f in dataclasses.fields(self):
            if "choices" in f.metadata:
                setattr(self, f.name, _choice(f.metadata["choices"], f.name, getattr(self, f.name)).value)
        self.linearize = _parse_linearize(self.linearize)
        if not 0.0 < self.leaky_slope < 1.0:
            raise ValueError(f"`leaky_slope` must be in (0, 1), got {self.leaky_slope}.")
        if not self.target_scale > 0:
            raise ValueError(f"`target_scale` must be > 0, got {self.target_scale}.")
        if not self.ridge >= 0:
            raise ValueError(f"`ridge` must be >= 0, got {self.ridge}.")
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature}.")
        if self.num_classes < 0:
            raise ValueError(f"`num_classes` must be >= 1, got {self.num_classes}.")
        if self.head_init == HeadInit.ZEROS.value and self.linearize != "head":
            raise ValueError(
                "`head_init='zeros'` makes the Jacobian of every backbone parameter zero, so only the head "
                f"could learn; use it with `linearize='head'` (got linearize={self.linearize!r}) or use "
                "head_init='random'."
            )
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            if self.num_classes and sorted(self.id2label) != list(range(self.num_classes)):
                raise ValueError(
                    f"`id2label` must have exactly the keys 0..{self.num_classes - 1}, "
                    f"got {sorted(self.id2label)[:10]}."
                )

    @property
    def backbone_name(self) -> str | None:
        """The base architecture: the timm name, or the transformers model type."""
        return self.backbone.architecture if self.backbone else None

    def with_classes(self, num_classes: int, id2label: dict[int, str] | None = None) -> "LQFConfig":
        """A copy with ``num_classes`` set (validated) and labels defaulting to the class index."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"`num_classes` must be an int >= 1, got {num_classes!r}.")
        labels = id2label or {i: str(i) for i in range(num_classes)}
        return dataclasses.replace(self, num_classes=num_classes, id2label=labels)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**data, "backbone": self.backbone.to_dict() if self.backbone else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LQFConfig":
        """Build from a saved dict; keys written by newer versions are dropped with a warning."""
        return cls(**known_fields(cls, data))


def linearize_from_text(text: str) -> str | list[str]:
    """``linearize`` as written on a command line: 'head', 'all', 'last:N', or comma-separated module prefixes."""
    if text in ("head", "all") or text.startswith("last:"):
        return text
    return [prefix.strip() for prefix in text.split(",") if prefix.strip()]


def _parse_linearize(spec: str | list[str] | tuple[str, ...]) -> str | list[str]:
    if isinstance(spec, str):
        if spec in ("head", "all") or _LAST_N.match(spec):
            if spec.startswith("last:") and int(spec[5:]) < 1:
                raise ValueError(f"`linearize` 'last:N' needs N >= 1, got {spec!r}.")
            return spec
        raise ValueError(
            f"`linearize` must be 'head', 'all', 'last:N' (e.g. 'last:2') or a list of module-name "
            f"prefixes, got {spec!r}."
        )
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(p, str) and p for p in spec):
        return list(spec)
    raise ValueError(f"`linearize` as a list must hold non-empty module-name prefixes, got {spec!r}.")
