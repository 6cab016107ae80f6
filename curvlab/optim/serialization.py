"""The optimizers' per-block state as named tensors, and the layout curvlab 0.1 wrote.

:meth:`KroneckerOptimizer.state_dict` stores ``state_dict()["curvlab"]["blocks"]``: block name →
``{"curvature": CurvatureState.tensors(), "momentum": buffer}`` — only tensors, strings and
numbers, so ``torch.load(..., weights_only=True)`` reads it.  curvlab 0.1 kept the same numbers
in torch's per-parameter state of each block's weight under its own keys; those are converted
by :data:`LEGACY_KEYS`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor

from curvlab.optim.state import EKFACBasis, RunningFactors, RunningTraces, TEKFACBasis

if TYPE_CHECKING:
    from curvlab.optim.base import BlockState, KroneckerOptimizer

#: curvlab 0.1's per-parameter keys → the typed state's tensor names, per state class.
LEGACY_KEYS: dict[type, dict[str, str]] = {
    RunningFactors: {"A": "A", "G": "G", "inv_A": "approximation.A", "inv_G": "approximation.G"},
    RunningTraces: {
        "delta": "delta", "delta_phi": "delta_phi", "delta_psi": "delta_psi",
        "inv_delta": "approximation.delta", "inv_delta_phi": "approximation.delta_phi",
        "inv_delta_psi": "approximation.delta_psi",
    },
    EKFACBasis: {
        "A": "factors.A", "G": "factors.G", "u_out": "approximation.u_out", "u_in": "approximation.u_in",
        "scaling": "approximation.scaling", "lam_out": "approximation.lam_out", "lam_in": "approximation.lam_in",
    },
    TEKFACBasis: {
        "delta": "traces.delta", "delta_phi": "traces.delta_phi", "delta_psi": "traces.delta_psi",
        "A": "factors.A", "G": "factors.G", "u_out": "approximation.u_out", "u_in": "approximation.u_in",
        "scaling": "approximation.scaling", "basis_delta": "approximation.delta",
        "psi_ev": "approximation.psi_eigenvalues", "phi_ev": "approximation.phi_eigenvalues",
    },
}


def save_block_states(states: Mapping[str, "BlockState"]) -> dict[str, dict[str, Any]]:
    """Block name → ``{"curvature": {name: tensor}, "momentum": tensor}`` (absent parts left out)."""
    out = {}
    for name, state in states.items():
        entry: dict[str, Any] = {"curvature": dict(state.curvature.tensors())}
        if state.momentum is not None:
            entry["momentum"] = state.momentum
        out[name] = entry
    return out


def load_block_states(
    fresh: dict[str, "BlockState"],
    saved: Mapping[str, Mapping[str, Any]] | None,
    torch_state: Mapping[Any, Mapping[str, Any]],
    optimizer: "KroneckerOptimizer",
    dormant: set[str],
) -> tuple[dict[Any, Mapping[str, Any]], dict[str, Mapping[str, Any]]]:
    """Fill the empty states ``fresh`` from a state dict; return torch's per-parameter state
    without curvlab 0.1's block entries, and the saved entries of the blocks in ``dormant`` (the
    layers that are not preconditioned now, e.g. frozen, whose state waits for them).

    Raises:
        ValueError: the state dict's blocks are not this optimizer's (other model or method).
    """
    who = type(optimizer).__name__
    if saved is None:  # curvlab 0.1: the block state sits in torch's state of each block weight
        saved, torch_state = _from_legacy(fresh, torch_state, optimizer)
    if set(saved) - set(fresh) - dormant:
        raise ValueError(
            f"{who}.load_state_dict: the state dict holds blocks {sorted(saved)}, this optimizer "
            f"has {sorted(fresh)} (another model, or param groups that differ)"
        )
    blocks = {b.name: b for b in optimizer.blocks()}
    for name, state in fresh.items():
        if name in saved:  # else saved before its first statistics (no step yet, or frozen then): it starts afresh
            load_block_state(state, saved[name], blocks[name].weight.device, f"{who}.load_state_dict: block {name!r}")
    return dict(torch_state), {name: entry for name, entry in saved.items() if name not in fresh}


def load_block_state(state: "BlockState", entry: Mapping[str, Any], device: Any, who: str) -> None:
    """Fill the empty ``state`` from copies of its saved ``entry``'s tensors (as torch's
    ``load_state_dict`` copies: later steps update some in place, which must not reach the caller's
    state dict)."""
    try:
        state.curvature.load({k: v.to(device, copy=True) for k, v in entry.get("curvature", {}).items()})
        momentum = entry.get("momentum")
        state.momentum = None if momentum is None else momentum.to(device, copy=True)
    except ValueError as err:  # e.g. torch.optim.SGD's momentum buffer of the weight alone, without the bias column
        raise ValueError(f"{who}: {err} (a state dict of another method or optimizer, or of a changed layer?)") from None


def _from_legacy(
    fresh: dict[str, "BlockState"], torch_state: Mapping[Any, Mapping[str, Any]], optimizer: "KroneckerOptimizer"
) -> tuple[dict[str, dict[str, Any]], dict[Any, Mapping[str, Any]]]:
    params = list(itertools.chain.from_iterable(g["params"] for g in optimizer.param_groups))
    index = {id(p): i for i, p in enumerate(params)}
    saved: dict[str, dict[str, Any]] = {}
    rest = dict(torch_state)
    for block in optimizer.blocks():
        old = rest.pop(index[id(block.weight)], None)
        if old is None:
            continue
        keys = LEGACY_KEYS[type(fresh[block.name].curvature)]
        unknown = set(old) - set(keys) - {"momentum_buffer"}
        if unknown:
            raise ValueError(
                f"{type(optimizer).__name__}.load_state_dict: block {block.name!r} holds {sorted(unknown)}, "
                "which this method does not keep (a state dict of another optimizer?)"
            )
        entry: dict[str, Tensor | dict] = {"curvature": {keys[k]: v for k, v in old.items() if k in keys}}
        if "momentum_buffer" in old:
            entry["momentum"] = old["momentum_buffer"]
        saved[block.name] = entry
    for name in fresh:
        saved.setdefault(name, {})
    return saved, rest
