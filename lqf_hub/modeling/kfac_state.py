"""K-FAC's saved form, one definition for the solver's ``KFAC`` (which writes and restores it) and the posterior
(which reads it without the solver: ``modeling`` does not import ``solver``).

Keys: ``block/<weight>/<factor>`` for each Kronecker block's eigendecomposition (``eig_a [g, d_in]``,
``basis_a [g, d_in, d_in]``, ``eig_b [g, d_out]``, ``basis_b [g, d_out, d_out]``; g groups),
``block/<weight>/groups``, ``block/<weight>/bias_index`` (the bias's position among the linearized tensors, -1
for none) and ``diag/<name>`` (the diagonal curvature of a tensor outside any block).
"""

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

FACTORS = ("eig_a", "basis_a", "eig_b", "basis_b")


@dataclass
class BlockState:
    """One Kronecker block as saved: its eigen ``factors`` (``FACTORS``), ``groups`` and ``bias`` (a name or None)."""

    factors: dict[str, Tensor]
    groups: int
    bias: str | None


def kfac_state(blocks: Mapping[str, BlockState], diagonals: Mapping[str, Tensor],
               names: list[str]) -> dict[str, Tensor]:
    """The saved form of ``blocks`` (weight name -> block) and ``diagonals`` (name -> diagonal); ``names``: the
    linearized tensors in order (a bias is stored by its index)."""
    state = {f"diag/{name}": diagonal for name, diagonal in diagonals.items()}
    for name, block in blocks.items():
        state.update({f"block/{name}/{k}": v for k, v in block.factors.items()})
        state[f"block/{name}/groups"] = torch.tensor(block.groups)
        state[f"block/{name}/bias_index"] = torch.tensor(-1 if block.bias is None else names.index(block.bias))
    return state


def parse_kfac_state(state: Mapping[str, Tensor], names: list[str]) -> tuple[dict[str, BlockState], dict[str, Tensor]]:
    """``(blocks, diagonals)`` from a saved ``state``, checked against the linearized ``names``; raises ValueError
    saying what is missing or does not belong to them."""
    parts: dict[str, dict[str, Tensor]] = {}
    diagonals: dict[str, Tensor] = {}
    for key, value in state.items():
        kind, _, rest = key.partition("/")
        if kind == "diag" and rest:
            diagonals[rest] = value
        elif kind == "block" and "/" in rest:
            name, part = rest.rsplit("/", 1)
            parts.setdefault(name, {})[part] = value
        else:
            raise ValueError(f"K-FAC state has a key {key!r} that is neither block/<name>/<part> nor diag/<name>.")
    blocks = {}
    for name, block in parts.items():
        missing = [k for k in (*FACTORS, "groups", "bias_index") if k not in block]
        if missing:
            raise ValueError(f"K-FAC state's block {name} lacks {missing}.")
        index = int(block["bias_index"])
        if not -1 <= index < len(names):
            raise ValueError(f"K-FAC state's block {name} has bias index {index}, not a linearized tensor.")
        bias = None if index < 0 else names[index]
        blocks[name] = BlockState({k: block[k] for k in FACTORS}, int(block["groups"]), bias)
    unknown = [n for n in [*blocks, *diagonals] if n not in names]
    if unknown:
        raise ValueError(f"K-FAC state names tensors this model does not linearize: {unknown[:3]}.")
    return blocks, diagonals
