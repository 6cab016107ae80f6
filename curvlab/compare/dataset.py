"""Assemble per-layer and whole-network metrics into an ``xarray.Dataset``."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import warnings
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from curvlab._options import check_int, check_number
from curvlab.approx import DEFAULT_DAMPING, KroneckerApproximation
from curvlab.approx.eigh import factor_eigh, is_diagonal, span_basis, within_span
from curvlab.compare.metrics import (
    NG_ROUNDING_LIMIT,
    ApproximationMetrics,
    ExactBlock,
    approximation_metrics,
    convention_error,
    cosine,
    damping_dominates,
    exact_block,
    natural_gradient_resolved,
    spectrum,
    woodbury_natural_gradient,
    woodbury_solve,
)
from curvlab.gram import GramRows, dense
from curvlab.io import netcdf_attr
from curvlab.reuse import reuse, shared_work
from curvlab.sqrt import SquareRoot
from curvlab.stats import LayerStats

PER_APPROXIMATION = (
    "trace_ratio",
    "rel_frobenius_error",
    "projection_error",
    "scaling_error",
    "ng_cosine",
    "ng_rel_error",
    "subspace_overlap",
)

CONVENTIONS = (
    "Blocks act on W̄=[W b] (bias as last input column), Kronecker products row-major "
    "(KFAC = G⊗A); flat parameter order cat(weight.flatten(), bias). F is the curvature of the "
    "loss as loss_fn computes it (mean reduction folded in). Conv KFAC factors follow KFC "
    "'expand': A averages over N·T locations, G sums over them. Errors are relative to ‖F‖_F; "
    "natural gradients are damped: exact (F+λI)⁻¹g by Woodbury vs each approximation's own "
    "damped inverse (its damping strategy). Parameter blocks (block_kind='parameter': norm "
    "layers' affine parameters, position embeddings, grouped convolutions, LSTMs, ...) are one tensor each, measured exactly "
    "against the diagonal approximation (the only one that applies; the optimizers update them "
    "first order); the network_* entries cover the Kronecker blocks when a model has both. With "
    "coupled examples (train-mode BatchNorm) F includes the coupling and the Kronecker statistics "
    "ignore it (per-example inputs and output gradients of the batch computation, as kfac-pytorch, "
    "ASDL and curvlinops): coupling_error is the relative Frobenius distance of the block those "
    "statistics describe from F."
)


#: CF attributes of the dataset's variables: name → (long_name, units); units only where they
#: are known: "1" for ratios, cosines and relative errors (the blocks' own units follow the loss's
#: and the parameters', which curvlab does not know).
VARIABLE_ATTRS: dict[str, tuple[str, str | None]] = {
    "trace_ratio": ("trace of the approximation over trace of the exact block, tr(F_hat)/tr(F)", "1"),
    "rel_frobenius_error": ("relative Frobenius error of the approximation, ||F - F_hat||_F/||F||_F", "1"),
    "projection_error": ("projection error: Frobenius norm of the off-diagonal part of F in the "
                         "approximation's eigenbasis over ||F||_F", "1"),
    "scaling_error": ("scaling error: distance of the approximation's eigenvalues from the best ones "
                      "in its eigenbasis over ||F||_F", "1"),
    "ng_cosine": ("cosine between the approximation's and the exact damped natural gradients (NaN where "
                  "undefined: a zero gradient, or lambda_max(F)/damping beyond float64's reach, see "
                  "curvlab.compare.metrics.NG_ROUNDING_LIMIT)", "1"),
    "ng_rel_error": ("relative error of the approximation's damped natural gradient (NaN as ng_cosine)", "1"),
    "subspace_overlap": ("overlap of the top-k eigenvector subspaces of the exact block and the approximation, "
                         "||U_F^T U_hat||_F^2/k: k at most the exact block's rank, raised to the end of its eigenspace at "
                         "the k-th eigenvalue (a repeated one); the approximation's "
                         "directions only those of its nonzero eigenvalues (rank r: at most r/k), an "
                         "eigenspace at the k-th eigenvalue weighted by the share of it that fits", "1"),
    "exact_trace": ("trace of the exact curvature block", None),
    "exact_frobenius": ("Frobenius norm of the exact curvature block", None),
    "exact_eigenvalues": ("eigenvalues of the exact curvature block, largest first (zeros included; "
                          "NaN-padded beyond the block's size)", None),
    "approx_eigenvalues": ("eigenvalues of the approximation, largest first (NaN-padded)", None),
    "coupling_error": ("relative Frobenius distance from F of the block the Kronecker statistics describe "
                       "(examples coupled by train-mode BatchNorm; 0 where the examples are not coupled: that "
                       "block is F)", "1"),
    "coupling_trace_ratio": ("trace of the block the Kronecker statistics describe over tr(F) (1 where the "
                             "examples are not coupled)", "1"),
    "network_rel_frobenius_error": ("relative Frobenius error of the block-diagonal approximation of the "
                                    "whole-network curvature", "1"),
    "network_ng_cosine": ("cosine between the block-diagonal approximation's and the exact whole-network "
                          "damped natural gradients", "1"),
    "network_ng_rel_error": ("relative error of the block-diagonal approximation's whole-network damped "
                             "natural gradient", "1"),
    "network_trace_ratio": ("trace of the block-diagonal approximation over the whole-network trace", "1"),
    "network_exact_eigenvalues": ("eigenvalues of the exact whole-network curvature, largest first", None),
    "network_exact_trace": ("trace of the exact whole-network curvature", None),
    "network_blockdiag_error": ("relative Frobenius error of the exact block-diagonal curvature (the floor of "
                                "every block-diagonal approximation)", "1"),
    "layer": ("curvature block (module path, or parameter path of a parameter block)", None),
    "approximation": ("curvature approximation", None),
    "eig": ("eigenvalue index, largest first", None),
    "network_eig": ("eigenvalue index of the whole-network curvature, largest first", None),
    "num_params": ("parameters in the block", "1"),
    "module_type": ("class of the block's module", None),
    "block_kind": ("kind of block: kronecker or parameter", None),
}


def check_settings(*, damping: float, top_k: int, num_eigenvalues: int) -> tuple[float, int, int]:
    """Refuse settings no comparison can use, naming the argument; return them as Python numbers
    (numpy scalars are taken, as by the option objects, and kept out of the dataset's attributes)."""
    who = "curvlab.compare"
    return (check_number(who, "damping", damping, minimum=0.0, strict=True, hint=" (blocks are rank-deficient)"),
            check_int(who, "top_k", top_k, 1), check_int(who, "num_eigenvalues", num_eigenvalues, 1))


def _pad(values: Tensor, length: int) -> np.ndarray:
    out = np.full(length, np.nan)
    v = values[:length].detach().cpu().double().numpy()
    out[: v.shape[0]] = v
    return out


def measure(
    stats: Mapping[str, LayerStats],
    approximations: Mapping[str, Mapping[str, KroneckerApproximation]],
    *,
    damping: float,
    damping_strategies: Mapping[str, str],
    top_k: int = 10,
    num_eigenvalues: int = 256,
    attrs: Mapping[str, object] | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> xr.Dataset:
    """Compare approximations with the exact blocks of one extraction.

    Args:
        stats: block name → statistics with ``sqrt`` and ``grad`` (one extraction, so every
            block's root has the same K columns).
        approximations: block name → {approximation name → object}; the objects are measured
            as they are (e.g. an optimizer's running approximation), each read once, while its
            layer is measured: a mapping that builds them when read
            (:class:`~curvlab.compare.LayerApproximations`, what :func:`~curvlab.compare.compare`
            passes) builds them in that layer's :func:`curvlab.reuse.shared_work` scope.
        damping: λ of the damped natural gradients.
        damping_strategies: approximation name → damping strategy of its inverse; an
            approximation of the registry left out takes its default (:data:`curvlab.approx.DEFAULT_DAMPING`,
            the one its optimizer inverts), any other must be named (:func:`strategies_for`).
        top_k: eigenvectors in ``subspace_overlap``.
        num_eigenvalues: length of the stored spectra (largest first, NaN-padded).
        attrs: extra dataset attributes (model, data, ...); one that would replace an attribute the
            comparison records with another value (``damping``, ``flavour``, ``seed``…) is refused.
        progress: optional wrapper for a progress bar over layers.
    """
    damping, top_k, num_eigenvalues = check_settings(damping=damping, top_k=top_k, num_eigenvalues=num_eigenvalues)
    layers = list(stats)
    kronecker_first = sorted(layers, key=lambda l: stats[l].kind != "kronecker")  # stable: model order
    names: list[str] = []  # every layer's names in its order (KFOC, measured on some layers only, in its place)
    for layer in kronecker_first:
        before = None
        for name in approximations[layer]:
            if name not in names:
                names.insert(0 if before is None else names.index(before) + 1, name)
            before = name
    damping_strategies = strategies_for(names, damping_strategies)
    for layer in layers:
        if stats[layer].sqrt is None or stats[layer].grad is None:
            raise ValueError(f"curvlab.compare: layer {layer!r} lacks its square root or gradient")
    iterator = progress(layers) if progress else layers

    exact: dict[str, ExactBlock] = {}
    results: dict[tuple[str, str], ApproximationMetrics] = {}
    grads: dict[str, Tensor] = {}
    unresolved: list[str] = []  # layers whose exact damped natural gradient float64 cannot resolve
    dominated: list[str] = []  # layers whose curvature the damping swamps
    coupling = np.zeros((len(layers), 2))
    arbitrary: list[str] = []  # layers whose EKFAC depends on eigh's basis of a null space (null_spaces_reached)
    repeated: list[str] = []  # … of a repeated eigenvalue's eigenspace (repeated_eigenspaces_unequal)
    for layer in iterator:
        # one scope per layer: the float64 root, the factors' decompositions and the rotations
        # into them are computed once for all of the layer's approximations (curvlab.reuse); the
        # input-side factors of a batch narrower than the layer are decomposed through the span
        # of its inputs (curvlab.approx.eigh.within_span)
        rows = stats[layer].sqrt.input_rows()
        with shared_work(), within_span(None if rows is None else span_basis(rows)):
            block = exact_block(stats[layer].sqrt, num_eigenvalues, top_k)
            if not block.trace > 0:
                warnings.warn(
                    f"curvlab.compare: the exact Fisher block of layer {layer!r} is zero (a dead layer whose "
                    "inputs or output gradients all vanish, e.g. ReLUs that never fire, or a saturated "
                    "softmax); its metrics relative to F are NaN",
                    RuntimeWarning,
                    stacklevel=2,
                )
            grad = stats[layer].grad.to(torch.float64)
            exact[layer], grads[layer] = block, grad
            convention = stats[layer].convention_sqrt
            if stats[layer].kind != "kronecker":
                coupling[layers.index(layer)] = np.nan
            elif convention is not None:
                coupling[layers.index(layer)] = convention_error(block, convention)
            else:  # the Kronecker statistics describe the exact block itself
                coupling[layers.index(layer)] = (0.0, 1.0)
            if damping_dominates(block.eigenvalues, damping):
                dominated.append(layer)
            if natural_gradient_resolved(block.eigenvalues, damping):
                exact_ng = woodbury_natural_gradient(block.sqrt, block.gram, grad, damping)
            else:
                exact_ng = torch.full_like(grad, float("nan"))
                unresolved.append(layer)
                warnings.warn(
                    f"curvlab.compare: layer {layer!r}: λ_max(F)/damping = {block.eigenvalues[0].item() / damping:.2g} "
                    f"is beyond float64's reach for the exact damped natural gradient (rounding of λ_max "
                    f"above {NG_ROUNDING_LIMIT:g} of the damping); its ng_cosine and ng_rel_error are NaN. "
                    "Raise the damping, or normalise the inputs (a raw feature of size 1e9 makes F ~1e18)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            if block.trace > 0 and not grad.any():
                warnings.warn(
                    f"curvlab.compare: the gradient of layer {layer!r} is zero (e.g. a zero residual): the "
                    "natural gradients are zero and their ng_cosine and ng_rel_error NaN",
                    RuntimeWarning,
                    stacklevel=2,
                )
            for name, approx in approximations[layer].items():
                results[layer, name] = approximation_metrics(
                    block, approx, grad, damping, damping_strategies[name], top_k, exact_ng,
                    num_eigenvalues,
                )
                if name in BASIS_DEPENDENT and layer not in repeated and \
                        repeated_eigenspaces_unequal(stats[layer], block.sqrt, approx):
                    repeated.append(layer)
                # not kept while the next one is built: an object holds its own factors and bases
                # (a Linear(8192, ·)'s: 1 GiB in float64)
                del approx
            # in the layer's scope: the factors' decompositions are the approximations' own
            if BASIS_DEPENDENT & set(approximations[layer]) and null_spaces_reached(stats[layer], block.sqrt):
                arbitrary.append(layer)
                if layer in repeated:  # (said once, as the null space's)
                    repeated.remove(layer)
        # the float64 copy of the root is dropped once its layer is measured (kept for every layer,
        # ResNet-18's at N = 9 took 8 GB beside the 4 GB of the extraction's own): the network
        # terms convert the extraction's root again, one layer at a time
        exact[layer] = dataclasses.replace(block, sqrt=stats[layer].sqrt)

    if arbitrary:
        warnings.warn(
            f"curvlab.compare: under kfac_approx='reduce' the gradients of {arbitrary} reach the null spaces of "
            "their Kronecker factors (a batch with fewer examples, or root columns, than the layer's width, "
            "or inputs whose sums over the locations lose rank, as a convolution whose every tap covers the "
            "same pixels; and several locations per example): EKFAC's rescaling there, and KFAC's and KFLR's split into "
            "projection and scaling error, depend on the eigensolver's arbitrary basis of those null spaces "
            "(not on the factors: a change of A in the last bit moved a test CNN's EKFAC ng_cosine by 0.04); "
            "measure them with kfac_approx='expand', or a batch of at least the layer's width",
            RuntimeWarning,
            stacklevel=2,
        )
    if repeated:
        warnings.warn(
            f"curvlab.compare: the Kronecker factors of {repeated} have repeated eigenvalues (e.g. a "
            "ConvTranspose2d whose kernel equals its stride: every tap sees the same pixels; a Linear on one-hot "
            "inputs of equally frequent categories, with its bias) whose eigenspaces "
            "the gradients do not weigh alike: EKFAC's rescaling there, and KFAC's and KFLR's split into "
            "projection and scaling error, depend on the eigensolver's arbitrary basis of those eigenspaces "
            "(a U-Net's upsampling layer's EKFAC error moved between 0.856 and 0.865 over such bases), as "
            "the EKFAC optimizer's rescaling does",
            RuntimeWarning,
            stacklevel=2,
        )
    arbitrary = [l for l in layers if l in arbitrary or l in repeated]  # in the model's order

    length = max(min(stats[l].num_params, num_eigenvalues) for l in layers)
    data: dict[str, tuple] = {}
    for var in PER_APPROXIMATION:
        table = np.full((len(layers), len(names)), np.nan)
        for i, layer in enumerate(layers):
            for j, name in enumerate(names):
                if (layer, name) in results:
                    table[i, j] = getattr(results[layer, name], var)
        data[var] = (("layer", "approximation"), table)
    data["exact_trace"] = (("layer",), np.array([exact[l].trace.item() for l in layers]))
    data["exact_frobenius"] = (("layer",), np.array([exact[l].frobenius_sq.sqrt().item() for l in layers]))
    data["exact_eigenvalues"] = (("layer", "eig"), np.stack([_pad(exact[l].eigenvalues, length) for l in layers]))
    spectra = np.full((len(layers), len(names), length), np.nan)
    for (layer, name), res in results.items():
        spectra[layers.index(layer), names.index(name)] = _pad(res.spectrum, length)
    data["approx_eigenvalues"] = (("layer", "approximation", "eig"), spectra)
    data["coupling_error"] = (("layer",), coupling[:, 0])
    data["coupling_trace_ratio"] = (("layer",), coupling[:, 1])
    kinds = [stats[l].kind for l in layers]
    network = [l for l, k in zip(layers, kinds) if k == "kronecker"] or layers
    data.update(_network({l: exact[l] for l in network}, grads, results, names, damping, num_eigenvalues))

    coords = {
        "layer": layers,
        "approximation": names,
        "eig": np.arange(length),
        "network_eig": np.arange(len(data["network_exact_eigenvalues"][1])),
        "num_params": ("layer", np.array([stats[l].num_params for l in layers])),
        "module_type": ("layer", [stats[l].module_type for l in layers]),
        "block_kind": ("layer", kinds),
    }
    first = stats[layers[0]]
    ds = xr.Dataset(data, coords=coords)
    partial = len(network) < len(layers)  # the whole-network entries then cover the Kronecker layers only
    for name, (long_name, units) in VARIABLE_ATTRS.items():
        if partial and name.startswith("network_"):
            long_name += " (over the Kronecker layers' blocks only: the parameter blocks are left out)"
        ds[name].attrs.update({"long_name": long_name, **({"units": units} if units else {})})
    ds.attrs.update(
        {
            "flavour": first.flavour,
            "num_examples": first.num_examples,
            "num_columns": first.sqrt.num_columns,
            "damping": damping,
            "damping_strategies": ";".join(f"{k}={damping_strategies[k]}" for k in names),
            "top_k": top_k,
            "conventions": CONVENTIONS,
            "engine": first.engine,
            "kfac_approx": first.kfac_approx,
            "coupled": int(any(stats[l].coupled for l in layers)),
            "terms_per_example": first.terms_per_example,
            "network_blocks": "kronecker" if partial else "all",
            "ng_unresolved": ",".join(unresolved) or "none",
            "ng_damping_dominated": ",".join(dominated) or "none",
            "basis_dependent": ",".join(arbitrary) or "none",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **_versions(),
        }
    )
    ds.attrs = merged_attrs(ds.attrs, {k: netcdf_attr(v) for k, v in (attrs or {}).items()})
    return ds


def merged_attrs(own: Mapping[str, object], given: Mapping[str, object] | None) -> dict[str, object]:
    """``own`` attributes with the caller's ``given`` added; one that would replace an attribute
    of ``own`` with another value is refused (``attrs={"damping": 0.1}`` had replaced the damping
    measured with, silently)."""
    merged = dict(own)
    for key, value in (given or {}).items():
        if key in merged and not np.array_equal(np.asarray(merged[key]), np.asarray(value)):
            raise ValueError(f"curvlab.compare: attrs[{key!r}] = {value!r} would replace the {key} the comparison "
                             f"records ({merged[key]!r}); name your attribute otherwise")
        merged[key] = value
    return merged


def strategies_for(names: Iterable[str], given: Mapping[str, object]) -> dict[str, object]:
    """Each measured approximation's damping strategy: ``given``'s, else the approximation's
    default (:data:`curvlab.approx.DEFAULT_DAMPING`: the one its optimizer inverts).  A name
    ``given`` has but nothing measures, unless an approximation of the registry, is refused (a
    misspelt key was ignored, its approximation damped "exact"), as is a measured name without
    a default and without an entry (``"tekfac@optimizer"``)."""
    names = list(names)
    unknown = sorted(k for k in given if k not in names and k not in DEFAULT_DAMPING)
    missing = [n for n in names if n not in given and n not in DEFAULT_DAMPING]
    if unknown or missing:
        raise ValueError(
            "curvlab.compare: damping_strategies "
            + (f"names {unknown}, which nothing measured is (measured: {names})" if unknown else
               f"has no entry for {missing}, which have no default damping")
        )
    return {n: given.get(n, DEFAULT_DAMPING.get(n)) for n in names}


#: Approximations whose metrics read the eigenbases of the KFAC factors beyond their eigenvalues.
BASIS_DEPENDENT = frozenset({"ekfac", "kfac", "kflr"})


#: eigenvalues of a factor at most this fraction of its largest are numerical zeros
NULL_TOLERANCE = 1e-10


def null_spaces_reached(stats: LayerStats, root: SquareRoot) -> bool:
    """Whether a block's per-example gradients can reach the null spaces of its KFAC factors,
    whose eigenbasis is arbitrary: under ``reduce`` with several locations per example, each
    ``M_k = Σ_t g_t āᵀ_t`` lies in the span of the per-location inputs and output gradients, the
    factors in that of their sums — a smaller one where there are fewer examples than inputs
    (``A``: rank ≤ N < D) or fewer root columns than outputs (``G``: rank ≤ K < d_out), and also
    with more examples where the sums lose rank by structure (a convolution whose every tap
    covers the same pixels, as a fully padded ``k = 2`` one or a ``ConvTranspose2d(k=2,
    stride=2)``: rank ``A = C_in + 1``): then the partial traces ``Σ M_kᵀM_k``, ``Σ M_kM_kᵀ`` of
    the exact ``root`` (float64) are tested against each factor's null space.  Under ``expand``
    the factors hold every location, so the gradients stay in their ranges."""
    if stats.kind != "kronecker" or stats.kfac_approx != "reduce" or stats.num_locations <= 1:
        return False
    d_out, d_in = stats.layout.shape
    if stats.num_examples < d_in or stats.sqrt.num_columns < d_out:
        return True
    inputs, outputs = partial_traces(root)
    return any(_reaches_null_space(f.A, inputs) or _reaches_null_space(f.G, outputs) for f in stats.kfac.values())


#: eigenvalues of a factor closer than this many times its decomposition's resolution at the largest
#: are one repeated eigenvalue, whose eigenspace's basis eigh chooses freely
REPEAT_TOLERANCE = 100.0
#: EKFAC's rescaling over such an eigenspace that makes, in another orthonormal basis of it, an
#: approximation differing there by more than this fraction of tr F is visibly basis dependent (the
#: U-Net layer whose EKFAC moved by 0.01 with the basis: 0.03 of tr F)
UNEQUAL_WEIGHT = 1e-3


def repeated_eigenspaces_unequal(stats: LayerStats, root: SquareRoot, approx: KroneckerApproximation) -> bool:
    """Whether ``approx``'s Kronecker factors have a repeated nonzero eigenvalue on whose
    eigenspace EKFAC's ``s*_ij = Σ_k (u_iᵀ M_k v_j)²`` (``M_k``: the exact ``root``'s) differs
    between orthonormal bases, all equally eigh's answer (QA29: ``A = I_{k²} ⊗ A_c`` of a
    ``ConvTranspose2d(k, stride=k)``, each eigenvalue repeated ``k²`` times).  Tested by that
    definition (:func:`_rescaling_moves`): in eigh's basis of the eigenspace and in a rotation of
    it, against the other side's whole basis — it holds where every direction of the other side
    weighs the eigenspace isotropically, which the partial trace of F summed over them
    (``Σ M_kᵀM_k``) does not decide.  Read off the object's own decomposition (no second one).  A
    diagonal factor's basis is no choice (an embedding's: the unit vectors in a stable order), nor
    a truncated side's flat remainder a repeat."""
    grid = approx.factor_eigenvalues(compressed=True)
    if grid is None or approx.identity_basis or approx.truncated:
        return False
    bases = approx.eigenbasis(compressed=True)
    for side, (values, basis) in enumerate(zip(grid, bases)):
        # equal to the decomposition's own resolution (float64 here): the repeats structure makes,
        # as equal in a float32 extraction; a float32 factor's bulk of eigenvalues below its
        # rounding at the largest, spaced closer than that, is none (a 3×3 conv's 217 of 289)
        spaces = repeated_eigenspaces(values.to(torch.float64), torch.finfo(approx.dtype).eps)
        if not spaces or any(is_diagonal(dense(getattr(f, "GA"[side]))) for f in stats.kfac.values()):
            continue
        basis, other = basis.to(root.dtype), bases[1 - side].to(root.dtype)
        if any(_rescaling_moves(root, side, basis, index, other) for index in spaces):
            return True
    return False


def _rescaling_moves(root: SquareRoot, side: int, basis: Tensor, index: Tensor, other: Tensor) -> bool:
    """Whether EKFAC's rescaling over the eigenspace ``space = basis[:, index]`` (of the output
    side, ``side`` 0, or the input side, 1; ``basis``, ``other``: the two sides' whole
    orthonormal bases) makes another approximation in a rotation ``space·Q`` of that basis
    (``Q``: a fixed random orthogonal matrix): per direction ``i`` of the other side,
    ``diag(s_i)`` against ``Q diag(s'_i) Qᵀ`` in the eigenspace's coordinates, ``‖·‖²_F =
    ‖s_i‖² + ‖s'_i‖² − 2 s_iᵀ(Q∘Q)s'_i`` (no ``k × k`` matrix per direction: a repeat may span
    thousands).

    That difference is at most ``2w``, ``w = Σ_k ‖M_k space‖²_F`` the root's weight on the
    eigenspace (``s, s' ≥ 0`` and ``Σ_i ‖s_i‖₁ = Σ_i ‖s'_i‖₁ = w``): where ``2w`` is within the
    bound, it is not computed.  An eigenspace wider than the rest of its basis has ``w`` read
    off that rest, ``tr F`` minus the weight there — the complement of the inputs' span of a
    batch narrower than its layer (ResNet-18's last convolutions, 4352 of 4608 columns at 16
    examples), which no gradient reaches under ``expand``: rotating it took half of
    :func:`curvlab.compare`'s time there (20 s a layer, one thread)."""
    trace = float(root.trace())
    bound = UNEQUAL_WEIGHT * trace

    def sq_sums(u: Tensor) -> Tensor:  # s: [other's directions, u's columns]
        return (root.rotated_sq_sum(u, other).mT if side == 0 else root.rotated_sq_sum(other, u)).to(torch.float64)

    k = index.numel()
    if 2 * k > basis.shape[1]:
        rest = torch.ones(basis.shape[1], dtype=torch.bool, device=index.device)
        rest[index] = False
        if 2 * (trace - float(sq_sums(basis[:, rest]).sum())) <= bound:
            return False
    space = basis[:, index]
    s = sq_sums(space)
    if 2 * float(s.sum()) <= bound:
        return False
    gen = torch.Generator().manual_seed(0)
    turn = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))[0]
    s_turned = sq_sums(space @ turn.to(space))
    turn = turn.to(s.device)
    moved_sq = s.square().sum() + s_turned.square().sum() - 2 * ((s @ turn.square()) * s_turned).sum()
    return float(moved_sq.clamp_min(0).sqrt()) > bound


def repeated_eigenspaces(values: Tensor, eps: float) -> list[Tensor]:
    """The indices of each run of equal ``values`` above zero, two or more each: equal and zero
    both to ``REPEAT_TOLERANCE · eps`` of the largest."""
    resolution = REPEAT_TOLERANCE * eps * float(values.max().clamp_min(0))
    ordered, order = values.sort()
    repeats = (ordered.diff() <= resolution) & (ordered[:-1] > resolution)
    edges = torch.cat([repeats.new_zeros(1), repeats, repeats.new_zeros(1)]).int().diff()
    starts, ends = (edges == 1).nonzero().flatten().tolist(), (edges == -1).nonzero().flatten().tolist()
    return [order[start:end + 1] for start, end in zip(starts, ends)]


def partial_traces(root: SquareRoot) -> tuple[Tensor, Tensor]:
    """``root.partial_traces()``, once per root inside the layer's :func:`curvlab.reuse.shared_work`
    scope (the null-space and the repeated-eigenspace tests, each side of each approximation, read
    them)."""
    return reuse(("partial_traces", id(root)), lambda: (root, root.partial_traces()))[1]  # (root kept: its id)


def _reaches_null_space(factor: Tensor | GramRows, partial_trace: Tensor) -> bool:
    """Whether ``partial_trace`` (PSD) has weight on ``factor``'s numerical null space."""
    # (factor_eigh: inside the layer's shared_work scope, the decomposition its approximations made)
    lam, u = factor_eigh(dense(factor).to(torch.float64))
    null = u[:, lam <= NULL_TOLERANCE * lam.max().clamp_min(0)]
    # (weight there by rounding is ~1e-16 of the trace; a gradient that reaches it, a visible share)
    return null.shape[1] > 0 and float((null.mT @ partial_trace @ null).trace()) > 1e-8 * float(partial_trace.trace())


def _network(
    exact: Mapping[str, ExactBlock],
    grads: Mapping[str, Tensor],
    results: Mapping[tuple[str, str], ApproximationMetrics],
    names: list[str],
    damping: float,
    top: int,
) -> dict[str, tuple]:
    """Whole-network entries: the full (cross-layer) Fisher of the blocks in ``exact`` against
    block-diagonal approximations (``names``: the dataset's approximation coordinate)."""
    layers = list(exact)
    gram = sum(exact[l].gram for l in layers)
    size = sum(exact[l].sqrt.shape[0] * exact[l].sqrt.shape[1] for l in layers)
    evals = spectrum(gram, top, size, min((exact[l].sqrt.dtype for l in layers), key=lambda d: torch.finfo(d).bits))
    norm_sq = gram.square().sum()
    diag_sq = sum(exact[l].frobenius_sq for l in layers)
    trace = sum(exact[l].trace for l in layers)
    # full damped natural gradient by Woodbury on the stacked root (each in float64 while used)
    root = lambda l: exact[l].sqrt.to(dtype=torch.float64)  # noqa: E731
    if natural_gradient_resolved(evals, damping):  # (else its layers' warnings said so)
        rhs = sum(root(l).inner(grads[l]) for l in layers)
        alpha = woodbury_solve(gram, rhs, damping)
        full_vec = torch.cat([((grads[l] - root(l).combine(alpha)) / damping).flatten() for l in layers])
    else:
        full_vec = torch.cat([torch.full_like(grads[l], float("nan")).flatten() for l in layers])
    out: dict[str, tuple] = {}
    err, cos, rel, ratio = (np.full(len(names), np.nan) for _ in range(4))
    for j, name in enumerate(names):
        if not all((l, name) in results for l in layers):
            continue
        # ‖F − blockdiag(K̂)‖² = the cross-layer blocks' ‖F‖² + every layer's own error²
        blocks_sq = sum(results[l, name].error_sq for l in layers)
        err[j] = _ratio(np.sqrt(max((norm_sq - diag_sq).item(), 0.0) + blocks_sq), np.sqrt(norm_sq.item()))
        approx_vec = torch.cat([results[l, name].natural_gradient.flatten() for l in layers])
        cos[j] = cosine(approx_vec, full_vec).item()
        rel[j] = ((approx_vec - full_vec).norm() / full_vec.norm()).item()
        ratio[j] = _ratio(sum(np.nan_to_num(results[l, name].trace_ratio) * exact[l].trace.item() for l in layers), trace.item())
    out["network_rel_frobenius_error"] = (("approximation",), err)
    out["network_ng_cosine"] = (("approximation",), cos)
    out["network_ng_rel_error"] = (("approximation",), rel)
    out["network_trace_ratio"] = (("approximation",), ratio)
    out["network_exact_eigenvalues"] = (("network_eig",), evals[:top].cpu().numpy())
    out["network_exact_trace"] = ((), trace.item())
    # the error of the exact block-diagonal Fisher: the floor for every per-layer approximation
    out["network_blockdiag_error"] = ((), _ratio(np.sqrt(max((norm_sq - diag_sq).item(), 0.0)), np.sqrt(norm_sq.item())))
    return out


def _ratio(num: float, den: float) -> float:
    """``num / den``; NaN where the exact quantity is zero (a relative error is undefined there)."""
    return float(num / den) if den > 0 else float("nan")


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    from curvlab._version import __version__

    return {
        "curvlab_version": __version__,
        "torch_version": str(torch.__version__),
        "backpack_version": version("backpack-for-pytorch"),
        "xarray_version": xr.__version__,
    }
