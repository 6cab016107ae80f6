"""The Markdown summary of a comparison dataset (written atomically)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import xarray as xr

from curvlab.io import PathLike, atomic_write


#: Per-approximation metrics of the summary, in order: (variable, title, what it means).
SUMMARY_METRICS: tuple[tuple[str, str, str], ...] = (
    (
        "rel_frobenius_error",
        "Relative Frobenius error",
        "‖F − F̂‖_F / ‖F‖_F (0 is exact; 1 is as far as the zero matrix).",
    ),
    (
        "trace_ratio",
        "Trace ratio",
        "tr F̂ / tr F (1 preserves the total curvature).",
    ),
    (
        "ng_cosine",
        "Natural-gradient cosine",
        "cos∠((F+λI)⁻¹g, F̂_λ⁻¹g), each approximation damped by its own strategy (1 is best).",
    ),
    (
        "projection_error",
        "Projection error",
        "‖off-diagonal part of F in F̂'s eigenbasis‖_F / ‖F‖_F: the error no rescaling of "
        "F̂'s eigenvalues can remove.",
    ),
    (
        "scaling_error",
        "Scaling error",
        "‖s − s*‖ / ‖F‖_F: F̂'s eigenvalues s against the best ones s* in its own eigenbasis.",
    ),
    (
        "ng_rel_error",
        "Natural-gradient relative error",
        "‖F̂_λ⁻¹g − (F+λI)⁻¹g‖ / ‖(F+λI)⁻¹g‖.",
    ),
    (
        "subspace_overlap",
        "Top-k subspace overlap",
        "‖U_kᵀ Û_k‖_F² / k between the top-k eigenvectors of F and of F̂ (1 is best); k at most "
        "F's rank, F̂'s directions only those of nonzero eigenvalues (a rank-r F̂ overlaps at most r/k).",
    ),
)

#: Layers of a long list the header names before it says where the rest are.
SHOWN = 6

#: Header lines: (attribute, label); attributes missing from the dataset are skipped.
_HEADER_ATTRS: tuple[tuple[str, str], ...] = (
    ("model", "Model"),
    ("model_options", "Model options"),
    ("data", "Data"),
    ("num_examples", "N (examples in the batch)"),
    ("world_size", "Processes (the batch split over them)"),
    ("model_mode", "Model mode while measured"),
    ("engine", "Extraction engine"),
    ("kfac_approx", "KFAC weight-sharing convention"),
    ("flavour", "Fisher flavour (F, what every approximation is measured against)"),
    ("built_from", "Each approximation built from (the flavour of its statistics: KFAC's MC labels and KFLR's exact "
                   "GGN are fixed, the others follow F's)"),
    ("mc_samples", "MC samples"),
    ("damping", "Damping λ"),
    ("damping_strategies", "Damping strategies"),
    ("tkfac_conv", "TKFAC conv statistics"),
    ("factor_eigh", "Eigenbases of the Kronecker factors"),
    ("measured_up_to", "Measured only on blocks up to (NaN above; P = d_out·r where a batch's r input rows are fewer than D/2)"),
    ("skipped_parameters", "Parameters left out (unsupported layers, --skip-unsupported)"),
    ("ng_unresolved", "Natural gradients not measured (–) on (λ_max(F)/damping beyond float64's reach: raise --damping)"),
    ("ng_damping_dominated", "Natural gradients set by the damping, not the curvature, on (λ_max(F) < damping/100: every "
                             "damped natural gradient is the gradient over the damping, so their cosines near 1 say "
                             "nothing of the approximation; lower --damping, or train longer: a barely trained "
                             "network's curvature is small)"),
    ("basis_dependent", "EKFAC, and KFAC's projection/scaling split, set by eigh's arbitrary basis of a null space (reduce with fewer examples than the layer's width, or a convolution whose every tap covers the same pixels: use --kfac-approx expand) or of a repeated eigenvalue's eigenspace (a ConvTranspose2d whose kernel equals its stride) on"),
    ("top_k", "top-k (subspace overlap)"),
    ("weights", "Weights measured"),
    ("train_steps", "Training steps before measuring"),
    ("train_optimizer", "Training optimizer"),
    ("loss", "Loss (the one measured; training steps before measuring, if any, minimise it)"),
    ("train_loss", "Training loss (last step)"),
    ("batch_loss", "Loss on the measured batch"),
    ("seed", "Seed"),
    ("device", "Device"),
    ("elapsed_seconds", "Time to load the data, train and measure (s; start-up and writing the files not counted)"),
    ("created", "Created"),
    ("run_id", "Run id (manifest.json)"),
)


# ------------------------------------------------------------------------------------ summary


def _fmt(value: object, digits: int = 4) -> str:
    """A number to ``digits`` significant digits, an integer exactly (a seed must reproduce the
    run, a parameter count be the count); NaN as an en dash."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return "–"
    if v == 0:
        return "0"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    return f"{v:.{digits}g}"


def _table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    align = align or ["l"] + ["r"] * (len(header) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _escape(text: object) -> str:
    return str(text).replace("|", "\\|")


def _weights_line(attrs: Mapping[str, object]) -> str:
    """``--weights``: the file, its SHA-256 and what it is, then the Adam steps taken from it."""
    steps = int(attrs.get("train_steps", 0))
    then = f"then {steps} Adam step{'s' if steps != 1 else ''}" if steps else "as loaded (no training steps)"
    return f"{attrs['weights']} (sha256 {attrs.get('weights_sha256', '?')}; {attrs.get('weights_source', '?')}), {then}"


def _title(ds: xr.Dataset) -> str:
    model = ds.attrs.get("model")
    data = ds.attrs.get("data")
    parts = [f"`{model}`" if model else None, f"on {data}" if data else None]
    what = " ".join(p for p in parts if p)
    return f"# Fisher approximation report{': ' + what if what else ''}"


def summary_markdown(ds: xr.Dataset, figures: Mapping[str, str] | None = None) -> str:
    """A Markdown summary of a comparison dataset.

    Sections: the setting (model, data, N, flavour, damping and its strategies, ...); the layers
    (type, P, tr F, ‖F‖_F); one table per metric (layers as rows, approximations as columns);
    the whole-network table with the block-diagonal floor. Numbers have 4 significant digits.

    Args:
        ds: the dataset of :func:`curvlab.compare.compare`.
        figures: optional caption → relative path of figures to link at the end.
    """
    layers = [str(v) for v in ds["layer"].values]
    approx = [str(v) for v in ds["approximation"].values]
    out = [_title(ds), ""]
    for key, label in _HEADER_ATTRS:
        if key in ds.attrs and not (key in ("model_options", "skipped_parameters", "ng_unresolved", "ng_damping_dominated",
                                            "basis_dependent", "weights", "measured_up_to")
                                    and ds.attrs[key] == "none"):
            value = ds.attrs[key]
            if key == "damping_strategies":
                value = ", ".join(f"{s.partition('=')[0]}: {s.partition('=')[2]}" for s in str(value).split(";") if s)
            elif key == "model" and "num_trainable_params" in ds.attrs:  # what the blocks cover
                frozen = ds.attrs["num_model_params"] - ds.attrs["num_trainable_params"]
                value = (f"{value} ({_fmt(ds.attrs['num_trainable_params'])} trainable parameters"
                         + (f"; {_fmt(frozen)} frozen, requires_grad=False, not measured)" if frozen else ")"))
            elif key == "model" and "num_model_params" in ds.attrs:  # (a report.nc written before)
                value = f"{value} ({_fmt(ds.attrs['num_model_params'])} parameters)"
            elif key == "data" and "num_train_examples" in ds.attrs:
                value = f"{value}; batch drawn from {_fmt(ds.attrs['num_train_examples'])} training examples"
            elif key == "ng_damping_dominated":  # often most of a network: counted, the first few named
                named = str(value).split(",")
                value = f"{len(named)} of {len(layers)} blocks: " + ", ".join(named[:SHOWN]) + (
                    f", … (report.nc's attribute {key} lists them all)" if len(named) > SHOWN else "")
            elif key == "top_k":
                value = f"{_fmt(value)} (in a block of lower rank, all its eigenvectors of nonzero eigenvalues)"
            elif key == "world_size":
                value = (f"{value} ({ds.attrs.get('backend', '?')}; examples per process "
                         f"{ds.attrs.get('shard_examples', '?')}; MC samples drawn with {ds.attrs.get('mc_seeds', '?')}, "
                         "so MC-based approximations differ from one process's)")
            elif key == "weights":
                value = _weights_line(ds.attrs)
            elif key == "seed":  # as --seed takes it
                value = str(int(value))
            elif key == "engine" and ds.attrs.get("engine_reason", "none") != "none":
                value = f"{value} (BackPACK cannot run this model: {ds.attrs['engine_reason']})"
            out.append(f"- **{label}:** {_escape(_fmt(value) if not isinstance(value, str) else value)}")
    out.append("")

    out += ["## Layers", ""]
    if "block_kind" in ds.coords and (ds["block_kind"] == "parameter").any():
        out += [
            "Parameter blocks (kind `parameter`: norm layers' affine parameters, position embeddings, depthwise or "
            "grouped convolutions, LSTMs, …) are measured exactly against their diagonal, the only approximation "
            "that applies; "
            "curvlab's optimizers update them first order.",
            "",
        ]
        if "module_type" in ds.coords and (ds["module_type"] == "MultiheadAttention").any():
            out += [
                "nn.MultiheadAttention applies its projections in torch's functional attention, out of reach of "
                "module hooks, so they are parameter blocks here; `curvlab.kronecker_attention(model)` (in the "
                "function `--model` names) makes them `nn.Linear` modules holding the same tensors, measured with "
                "every Kronecker approximation and preconditioned by the optimizers.",
                "",
            ]
    coupled = bool(ds.attrs.get("coupled")) and "coupling_error" in ds
    rows = []
    for i, layer in enumerate(layers):
        row = [
            f"`{_escape(layer)}`",
            _escape(ds["module_type"].values[i]) if "module_type" in ds.coords else "",
            _escape(ds["block_kind"].values[i]) if "block_kind" in ds.coords else "kronecker",
            _fmt(int(ds["num_params"].values[i])) if "num_params" in ds.coords else "",
            _fmt(ds["exact_trace"].values[i]) if "exact_trace" in ds else "–",
            _fmt(ds["exact_frobenius"].values[i]) if "exact_frobenius" in ds else "–",
        ]
        if coupled:
            row += [_fmt(ds["coupling_error"].values[i]), _fmt(ds["coupling_trace_ratio"].values[i])]
        rows.append(row)
    header = ["layer", "type", "kind", "P", "tr F", "‖F‖_F"]
    if coupled:
        header += ["coupling error", "tr F_conv / tr F"]
    out += [_table(header, rows, ["l", "l", "l"] + ["r"] * (len(header) - 3)), ""]
    if coupled:
        out += [
            "The batch couples its examples (train-mode BatchNorm): F is the exact block with the "
            "coupling; the Kronecker statistics ignore it (per-example layer inputs and output "
            "gradients of the batch computation, as kfac-pytorch, ASDL and curvlinops). *coupling "
            "error* = ‖F − F_conv‖_F / ‖F‖_F for the block F_conv those statistics describe.",
            "",
        ]

    out += ["## Per-layer metrics", "", "Rows are layers, columns approximations.", ""]
    for var, title, meaning in SUMMARY_METRICS:
        if var not in ds:
            continue
        table = ds[var].transpose("layer", "approximation").values
        rows = [[f"`{_escape(layer)}`"] + [_fmt(table[i, j]) for j in range(len(approx))] for i, layer in enumerate(layers)]
        out += [f"### {title}", "", meaning, "", _table(["layer", *approx], rows), ""]

    net = [
        ("network_rel_frobenius_error", "rel. Frobenius error"),
        ("network_ng_cosine", "NG cosine"),
        ("network_ng_rel_error", "NG rel. error"),
        ("network_trace_ratio", "trace ratio"),
    ]
    net = [(v, label) for v, label in net if v in ds]
    if net:
        kronecker_only = ds.attrs.get("network_blocks") == "kronecker"
        out += [
            "## Whole network",
            "",
            "The full Fisher (with its cross-layer blocks) against the block-diagonal matrix of "
            "each approximation's blocks; NG = damped natural gradient of the whole network."
            + (" Over the Kronecker layers' blocks only: the parameter blocks (norm layers' affine parameters, "
               "…), which no Kronecker approximation covers, are left out of every entry here, tr F included."
               if kronecker_only else ""),
            "",
        ]
        rows = [[f"**{a}**"] + [_fmt(ds[v].values[j]) for v, _ in net] for j, a in enumerate(approx)]
        if "network_blockdiag_error" in ds:
            rows.append(
                ["F's own block diagonal (floor)", _fmt(ds["network_blockdiag_error"].values)]
                + ["–"] * (len(net) - 1)
            )
        out += [_table(["approximation", *[label for _, label in net]], rows), ""]
        if "network_blockdiag_error" in ds and np.isfinite(ds["network_blockdiag_error"].values):
            out += [
                f"No block-diagonal approximation can have a network Frobenius error below that of F's "
                f"own block diagonal, {_fmt(ds['network_blockdiag_error'].values)}.",
                "",
            ]
        if "network_exact_trace" in ds:
            what = "the Kronecker layers" if kronecker_only else "whole network"
            out += [f"tr F ({what}): {_fmt(ds['network_exact_trace'].values)}", ""]
            if float(ds["network_exact_trace"]) == 0.0:  # (a diverged or dead network)
                out += ["F is zero on this batch: every error relative to it is undefined (–), and every damped "
                        "natural gradient is the gradient over the damping, whatever the approximation.", ""]

    if figures:
        out += ["## Figures", ""]
        for caption, rel in figures.items():
            out += [f"![{caption}]({rel})", ""]
    if "conventions" in ds.attrs:
        out += ["## Conventions", "", str(ds.attrs["conventions"]), ""]
    return "\n".join(out).rstrip() + "\n"


def write_summary(ds: xr.Dataset, path: PathLike, figures: Mapping[str, str] | None = None) -> Path:
    """Write :func:`summary_markdown` to ``path`` atomically (UTF-8); returns the path."""
    text = summary_markdown(ds, figures)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return atomic_write(path, write)
