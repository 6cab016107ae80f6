"""Report files (atomic netCDF and Markdown), figures, and run_report's checks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from curvlab.approx import APPROXIMATIONS
from curvlab.compare import compare
from curvlab.app.data import load_dataset
from curvlab.app.models import build_model
from curvlab.app.palette import PALETTE, colour
from curvlab.app.report import (
    ReportError,
    plot_errors,
    plot_network,
    plot_spectra,
    run_report,
    summary_markdown,
    write_summary,
)
from curvlab.io import read_netcdf, write_netcdf
from helpers import without_report_figures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ds() -> xr.Dataset:
    """A real comparison of every approximation on a tiny MLP (64-16-10) and 24 digits."""
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shape, data.num_classes, hidden=(16,))
    return compare(
        model,
        nn.CrossEntropyLoss(),
        data.train_x[:24],
        data.train_y[:24],
        approximations=APPROXIMATIONS,
        num_eigenvalues=64,
        attrs={"model": "mlp", "data": data.description, "flag": True, "nothing": None, "shape": (1, 8, 8)},
    )


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# ----------------------------------------------------------------------------------- netCDF


def test_netcdf_round_trip(ds: xr.Dataset, tmp_path: Path) -> None:
    ds = ds.copy()
    ds.attrs["raw"] = True  # (compare's own attributes are already what netCDF holds: "flag" is 1)
    path = write_netcdf(ds, tmp_path / "sub" / "report.nc")
    assert path == tmp_path / "sub" / "report.nc" and path.stat().st_size > 0
    back = read_netcdf(path)
    for name in ds.data_vars:
        np.testing.assert_array_equal(back[name].values, ds[name].values, err_msg=name)
    assert list(back["layer"].values) == list(ds["layer"].values)
    assert list(back["approximation"].values) == list(ds["approximation"].values)
    assert list(back["module_type"].values) == list(ds["module_type"].values)
    np.testing.assert_array_equal(back["num_params"].values, ds["num_params"].values)
    # attributes netCDF cannot hold are stored as numbers or strings, the rest unchanged
    assert back.attrs["flag"] == 1 and back.attrs["nothing"] == "none" and back.attrs["shape"] == "(1, 8, 8)"
    assert back.attrs["raw"] == 1 and ds.attrs["flag"] == 1
    assert back.attrs["flavour"] == ds.attrs["flavour"] and back.attrs["damping"] == ds.attrs["damping"]
    assert ds.attrs["raw"] is True  # the caller's dataset is not modified
    assert _leftovers(path.parent, {"report.nc"}) == []


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_write_keeps_old_file_and_leaves_no_temp(
    ds: xr.Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    path = tmp_path / "report.nc"
    write_netcdf(ds.isel(layer=[0]), path)
    before = path.read_bytes()
    written: list[str] = []

    def crash(self: xr.Dataset, target: str, *args: object, **kwargs: object) -> None:
        with open(target, "wb") as fh:  # a partial file, then the failure
            fh.write(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
        written.append(str(target))
        raise error

    monkeypatch.setattr(xr.Dataset, "to_netcdf", crash)
    with pytest.raises(type(error)):
        write_netcdf(ds, path)
    monkeypatch.undo()
    assert written and Path(written[0]).parent == tmp_path and written[0] != str(path)
    assert path.read_bytes() == before
    assert read_netcdf(path).sizes["layer"] == 1
    assert _leftovers(tmp_path, {"report.nc"}) == []


def test_failed_first_write_creates_nothing(ds: xr.Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(self: xr.Dataset, target: str, *args: object, **kwargs: object) -> None:
        Path(target).write_bytes(b"partial")
        raise RuntimeError("boom")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", crash)
    with pytest.raises(RuntimeError, match="boom"):
        write_netcdf(ds, tmp_path / "report.nc")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_on_success(ds: xr.Dataset, tmp_path: Path) -> None:
    path = tmp_path / "report.nc"
    write_netcdf(ds.isel(layer=[0]), path)
    os.chmod(path, 0o640)
    write_netcdf(ds, path)
    assert read_netcdf(path).sizes["layer"] == ds.sizes["layer"]
    assert path.stat().st_mode & 0o777 == 0o640  # an existing file keeps its permissions
    assert _leftovers(tmp_path, {"report.nc"}) == []


def test_read_netcdf_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.nc"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        read_netcdf(missing)
    corrupt = tmp_path / "corrupt.nc"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(ValueError, match=f"cannot read report file {corrupt}"):
        read_netcdf(corrupt)


# ---------------------------------------------------------------------------------- summary


def test_summary_prints_integers_exactly(ds: xr.Dataset) -> None:
    """Integers of 10⁷ and more were rounded to four digits: ``--seed 4294967295`` read "4.295e+09"
    (a seed that does not reproduce the run), ResNet-18 "1.117e+07 trainable parameters"."""
    big = ds.copy()
    big.attrs.update(seed=4294967295, num_trainable_params=11173962, num_model_params=11173962)
    text = summary_markdown(big)
    assert "- **Seed:** 4294967295\n" in text
    assert "(11,173,962 trainable parameters)" in text


def test_summary_lists_every_layer_and_approximation(ds: xr.Dataset, tmp_path: Path) -> None:
    text = summary_markdown(ds)
    assert text.startswith("# Fisher approximation report: `mlp` on scikit-learn digits")
    for key in ("**Model:** mlp", "**N (examples in the batch):** 24",
                "**Fisher flavour (F, what every approximation is measured against):** exact",
                "**Damping λ:** 0.001", "**Damping strategies:** kfac: factored"):
        assert key in text, key
    for layer in ds["layer"].values:
        assert f"| `{layer}` |" in text
    header = "| layer | " + " | ".join(ds["approximation"].values) + " |"
    for title in ("Relative Frobenius error", "Trace ratio", "Natural-gradient cosine"):
        section = text.split(f"### {title}", 1)[1]
        assert header in section.split("###", 1)[0], title
    for name in ds["approximation"].values:
        assert f"| **{name}** |" in text  # whole-network table
    assert "F's own block diagonal (floor)" in text
    # 4 significant digits
    value = float(ds["rel_frobenius_error"].isel(layer=0, approximation=0))
    assert f"{value:.4g}" in text
    path = write_summary(ds, tmp_path / "summary.md", figures={"Spectra": "spectra.png"})
    assert path.read_text(encoding="utf-8") == summary_markdown(ds, {"Spectra": "spectra.png"})
    assert "![Spectra](spectra.png)" in path.read_text(encoding="utf-8")
    assert _leftovers(tmp_path, {"summary.md"}) == []


# ---------------------------------------------------------------------------------- figures


def test_figures_are_written(ds: xr.Dataset, tmp_path: Path) -> None:
    for plot, name in ((plot_spectra, "spectra.png"), (plot_errors, "errors.png"), (plot_network, "network.png")):
        path = plot(ds, tmp_path / "figs" / name)
        assert path == tmp_path / "figs" / name
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 20_000, name
    assert _leftovers(tmp_path / "figs", {"spectra.png", "errors.png", "network.png"}) == []


def test_one_colour_per_approximation() -> None:
    colours = [PALETTE[a] for a in APPROXIMATIONS]
    assert len(set(colours)) == len(colours) and PALETTE["exact"] not in colours
    assert colour("kfac") == PALETTE["kfac"] and colour("someday") == colour("someday")


# ------------------------------------------------------------------------------- run_report


def test_run_report_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="unknown model 'nope'"):
        run_report(model="nope", dataset="digits", out_dir=tmp_path, train_steps=0)
    with pytest.raises(ReportError, match=r"batch size 5000 must be in \[1, 1500\]"):
        run_report(model="mlp", dataset="digits", batch_size=5000, out_dir=tmp_path, train_steps=0)
    if not torch.cuda.is_available():
        with pytest.raises(ReportError, match="CUDA is not available"):
            run_report(model="mlp", dataset="digits", device="cuda", out_dir=tmp_path)
    for name, value in (("truncate_above", -1), ("truncate_above", 2.5), ("truncate_above", True),
                        ("truncation_rank", 0)):
        with pytest.raises(ReportError, match=f"{name}={value!r} must be a (non-negative|positive) int"):
            run_report(model="mlp", dataset="digits", out_dir=tmp_path, train_steps=0, **{name: value})
    # one example in train mode through BatchNorm1d: refused before the warm-up, naming the options
    (tmp_path / "nets.py").write_text("from torch import nn\n"
                                      "def net(num_classes):\n"
                                      "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), "
                                      "nn.Linear(8, num_classes))\n")
    with pytest.raises(ReportError, match="--mode train with --batch-size 1: .* cannot take one example"):
        run_report(model=f"{tmp_path / 'nets.py'}:net", dataset="digits", batch_size=1, mode="train",
                   out_dir=tmp_path / "out")
    # a model that turns NaN on real inputs (finite on the model check's zeros): the warm-up stops at its
    # first NaN loss, naming the step (it ran every Adam step on NaN, then failed after them; QA22)
    (tmp_path / "nets.py").write_text("import torch\nfrom torch import nn\n"
                                      "class Nan(nn.Linear):\n"
                                      "    def forward(self, x):\n"
                                      "        y = super().forward(x.flatten(1))\n"
                                      "        return y if x.abs().sum() == 0 else y * float('nan')\n"
                                      "def net(num_classes):\n"
                                      "    return Nan(64, num_classes)\n")
    with pytest.raises(ReportError, match=r"the loss is nan at Adam step 1 of 50 \(lr 0.001\), before anything"):
        run_report(model=f"{tmp_path / 'nets.py'}:net", dataset="digits", train_steps=50, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "nets.py").unlink()
    # a damping the approximation does not define: refused before the data (here: none) is read
    with pytest.raises(ValueError, match="damping strategy 'nor' is not defined for approximation 'kfac'"):
        run_report(model="mlp", dataset="mnist", data_dir=tmp_path / "no-such-folder", out_dir=tmp_path / "out",
                   damping_strategies={"kfac": "nor"})
    assert list(tmp_path.iterdir()) == []


def test_run_report_takes_numpy_integers_for_the_truncation(tmp_path: Path) -> None:
    """As the option objects do (curvlab._options.is_int): np.int64 is an int."""
    paths = run_report(model="mlp", dataset="digits", batch_size=10, approximations=("kfac",), train_steps=0,
                       truncate_above=np.int64(100), truncation_rank=np.int64(8), out_dir=tmp_path, progress=False)
    assert read_netcdf(paths["report"]).attrs["factor_eigh"].startswith("truncated above 100 to rank 8")


def test_the_factor_eigh_attribute_says_what_was_applied(tmp_path: Path, monkeypatch) -> None:
    """``--truncate-above`` with only approximations that take no truncation (KFOC's and the
    diagonal's bases are always full), or with no factor wider than the threshold: report.nc and
    summary.md said "truncated above …", of bases that were all full."""
    without_report_figures(monkeypatch)
    cases = {"none-takes-it": (("kfoc", "diagonal"), 100), "none-wider": (("kflr",), 1000), "applied": (("kflr", "kfoc"), 100)}
    got = {}
    for label, (names, above) in cases.items():
        paths = run_report(model="mlp", dataset="digits", batch_size=10, approximations=names, train_steps=0,
                           truncate_above=above, truncation_rank=8, out_dir=tmp_path / label, progress=False)
        got[label] = read_netcdf(paths["report"]).attrs["factor_eigh"]
        assert got[label] in paths["summary"].read_text(encoding="utf-8"), label
    assert got["none-takes-it"].startswith("full") and "kfoc, diagonal" in got["none-takes-it"]
    assert got["none-wider"].startswith("full") and "none is wider than 1000" in got["none-wider"]
    assert got["applied"].startswith("truncated above 100 to rank 8") and got["applied"].endswith("kflr only (kfoc: full)")


def test_run_report_accepts_0_1_positional_arguments_with_a_warning(tmp_path: Path) -> None:
    with pytest.warns(DeprecationWarning, match="positional"):
        paths = run_report("mlp", "digits", None, 20, "exact", ("kfac", "tekfac"), 1e-3, "cpu", 0, tmp_path,
                           train_steps=0)
    ds = read_netcdf(paths["report"])
    assert list(ds.approximation.values) == ["kfac", "tekfac"] and ds.attrs["num_examples"] == 20


def test_a_report_folder_gets_the_permissions_of_a_plain_folder(tmp_path: Path, monkeypatch) -> None:
    """Its staging folder came from mkdtemp (0700) and became the report folder: other users of a
    shared machine could not read a report."""
    without_report_figures(monkeypatch)
    args = dict(model="mlp", dataset="digits", batch_size=10, approximations=("kfac",), train_steps=0, progress=False)
    old = os.umask(0o022)
    try:
        new = run_report(**args, out_dir=tmp_path / "new")["report"].parent
        kept = tmp_path / "kept"
        kept.mkdir(mode=0o750)
        kept.chmod(0o750)
        run_report(**args, out_dir=kept)
    finally:
        os.umask(old)
    assert new.stat().st_mode & 0o777 == 0o755  # mkdir's 0777 under the umask
    assert kept.stat().st_mode & 0o777 == 0o750  # an existing folder keeps its own


def test_a_report_with_dropout_is_reproducible_under_its_seed(tmp_path: Path) -> None:
    """Dropout's masks in the warm-up came from torch's unseeded global state: two runs with the
    same seed gave other weights, so other numbers (and the global state is left as it was)."""
    module = tmp_path / "drop.py"
    module.write_text(
        "from torch import nn\n"
        "def make(input_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, num_classes))\n"
    )
    runs = []
    for k in range(2):
        torch.manual_seed(100 + k)  # whatever the caller's state
        before = torch.get_rng_state()
        paths = run_report(model=f"{module}:make", dataset="digits", batch_size=8, train_steps=3,
                           approximations=("kflr",), mode="train", out_dir=tmp_path / f"run{k}")
        assert torch.equal(torch.get_rng_state(), before)
        runs.append(read_netcdf(paths["report"]))
    assert runs[0].attrs["train_loss"] == runs[1].attrs["train_loss"]
    for var in ("exact_trace", "rel_frobenius_error"):
        np.testing.assert_array_equal(runs[0][var].values, runs[1][var].values)


def _drawn(monkeypatch, plot, ds: xr.Dataset, tmp_path: Path):  # noqa: ANN001, ANN202
    """The Figure ``plot`` draws for ``ds`` (rendered, so text extents are known)."""
    import curvlab.app.report.figures as figures

    got = []
    save = figures._save
    monkeypatch.setattr(figures, "_save", lambda fig, path: (got.append(fig), save(fig, path))[1])
    plot(ds, tmp_path / "figure.png")
    fig = got[0]
    fig.canvas.draw()
    return fig


def test_a_bar_that_was_not_measured_is_marked_not_left_empty(ds: xr.Dataset, tmp_path: Path, monkeypatch) -> None:
    """A NaN metric (KFOC above its size limit: every ViT/ResNet-18 report's network.png) left its
    bar slot empty, which on a linear axis reads as an error of 0 — the best value."""
    edited = ds.copy(deep=True)
    layer = str(ds["layer"].values[0])
    edited["rel_frobenius_error"].loc[dict(layer=layer, approximation="kfoc")] = np.nan
    edited["network_rel_frobenius_error"].loc[dict(approximation="kfoc")] = np.nan
    for plot in (plot_errors, plot_network):
        fig = _drawn(monkeypatch, plot, edited, tmp_path)
        marks = [t for ax in fig.axes for t in ax.texts if t.get_text() == "n/a"]
        assert len(marks) == 1, plot.__name__
        assert "n/a: not measured" in fig._suptitle.get_text()
        # in KFOC's slot: the centre of where its bar would be
        ax = marks[0].axes
        labels = [t.get_text() for t in ax.get_xticklabels()]
        hues = ["KFAC", "KFLR", "EKFAC", "TKFAC", "TEKFAC", "KFOC", "diag(F)"]
        x = marks[0].get_position()[0]
        if plot is plot_network:
            assert x == labels.index("KFOC")
        else:
            assert x == pytest.approx(0 - 0.4 + (hues.index("KFOC") + 0.5) * 0.8 / len(hues))
        # measured values keep their bars and no mark
        fig = _drawn(monkeypatch, plot, ds, tmp_path)
        assert not [t for ax in fig.axes for t in ax.texts if t.get_text() == "n/a"]
        assert "n/a" not in fig._suptitle.get_text()


def test_long_layer_names_stay_inside_and_apart(ds: xr.Dataset, tmp_path: Path, monkeypatch) -> None:
    """Long module names (a torchvision ViT's ``encoder.layers.encoder_layer_11.mlp.0``; already
    vit-tiny's ``blocks.2.attn.qkv (Linear, P=111,168)``) ran past their spectra panel, into the
    next panel's title and out of the figure, and the stacked layer labels of errors.png ran into
    each other."""
    names = ["encoder.layers.encoder_layer_11.mlp.fc_in_projection",
             "encoder.layers.encoder_layer_11.self_attention.out_proj", "heads.head"]
    edited = ds.isel(layer=[0, 1, 1]).assign_coords(layer=names)

    def apart(texts, what):  # noqa: ANN001, ANN202
        boxes = [t.get_window_extent() for t in texts if t.get_text()]
        width = texts[0].figure.bbox
        for k, box in enumerate(boxes):
            assert box.x0 >= width.x0 - 1 and box.x1 <= width.x1 + 1, (what, texts[k].get_text())
            for other in boxes[k + 1:]:
                assert not box.overlaps(other), (what, [t.get_text() for t in texts])

    fig = _drawn(monkeypatch, plot_spectra, edited, tmp_path)
    titles = [ax.title for ax in fig.axes if ax.get_visible()]
    apart(titles, "spectra titles")
    assert [t.get_text().split("(")[0].replace("\n", "").strip() for t in titles] == names  # wrapped, not cut
    fig = _drawn(monkeypatch, plot_errors, edited, tmp_path)
    apart(fig.axes[-1].get_xticklabels(), "errors layer labels")


def _boxes(ax, what: str):  # noqa: ANN001, ANN202
    """Display boxes of the texts of ``ax`` (and of its legend) that contain ``what``: a text's
    frame where it has one, the whole legend where it is in one."""
    boxes = []
    legend = ax.get_legend()
    if legend is not None and any(what in t.get_text() for t in legend.get_texts()):
        boxes.append(legend.get_window_extent())
    for t in ax.texts:
        if what in t.get_text():
            frame = t.get_bbox_patch()
            boxes.append(frame.get_window_extent() if frame is not None else t.get_window_extent())
    return boxes


def _line_points(ax):  # noqa: ANN001, ANN202
    """Display coordinates of the data points of the lines of ``ax``."""
    pts = [line.get_transform().transform(line.get_xydata()) for line in ax.get_lines() if len(line.get_xdata())]
    return np.concatenate(pts) if pts else np.empty((0, 2))


def test_spectra_say_which_approximation_was_not_measured_on_a_panel(ds: xr.Dataset, tmp_path: Path,
                                                                    monkeypatch) -> None:
    """KFOC is measured on blocks of at most 2^17 parameters: above, its spectrum line was silently
    missing while the legend listed KFOC as if drawn."""
    edited = ds.copy(deep=True)
    params = edited["num_params"].values.copy()
    params[0] = 133_120  # above KFOC's limit ('measured_up_to': 'kfoc: P ≤ 131072')
    edited = edited.assign_coords(num_params=("layer", params))
    edited["approx_eigenvalues"].loc[dict(layer=str(ds["layer"].values[0]), approximation="kfoc")] = np.nan
    assert "kfoc: P ≤ 131072" in edited.attrs["measured_up_to"]
    fig = _drawn(monkeypatch, plot_spectra, edited, tmp_path)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    notes = [[t.get_text() for t in ax.texts if "KFOC" in t.get_text()] for ax in panels]
    assert notes == [["KFOC: n/a (P > 131,072)"], []]
    assert "n/a: not measured" in fig._suptitle.get_text()
    # the note covers no line of its panel
    (box,) = _boxes(panels[0], "KFOC")
    assert not box.count_contains(_line_points(panels[0])), "the note covers a spectrum"
    # the legend lists what is drawn: KFOC still has its line in the other panel
    assert "KFOC" in [t.get_text() for t in fig.legends[0].get_texts()]
    assert [line.get_label() for line in panels[1].get_lines()].count("KFOC") == 1

    # not measured on any panel: no legend entry for a line drawn nowhere
    edited["approx_eigenvalues"].loc[dict(approximation="kfoc")] = np.nan
    fig = _drawn(monkeypatch, plot_spectra, edited, tmp_path)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [[t.get_text() for t in ax.texts] for ax in panels] == [["KFOC: n/a (P > 131,072)"], ["KFOC: n/a"]]
    assert "KFOC" not in [t.get_text() for t in fig.legends[0].get_texts()]
    # everything measured: no notes, the title says nothing about n/a
    fig = _drawn(monkeypatch, plot_spectra, ds, tmp_path)
    assert not [t for ax in fig.axes for t in ax.texts]
    assert "n/a" not in fig._suptitle.get_text()


@pytest.mark.parametrize("spread", [(1.01, 1.6), (1.6, 1.01), (0.2, 0.99)])
def test_the_network_floor_label_covers_no_bar(ds: xr.Dataset, tmp_path: Path, monkeypatch, spread) -> None:
    """The "floor: exact block-diagonal F" label sat just below the floor's dashed line at the
    right of the panel, over the bars that reach past the floor there."""
    edited = ds.copy(deep=True)
    floor = float(ds["network_blockdiag_error"])
    n = edited.sizes["approximation"]
    edited["network_rel_frobenius_error"].values[:] = floor * np.linspace(*spread, n)
    edited["network_rel_frobenius_error"].values[n // 2] = np.nan  # its "n/a" mark is covered neither
    fig = _drawn(monkeypatch, plot_network, edited, tmp_path)
    ax = fig.axes[0]
    boxes = _boxes(ax, "floor")
    assert len(boxes) == 1
    bars = [p.get_window_extent() for p in ax.patches if p.get_height() > 0]
    marks = [t.get_window_extent() for t in ax.texts if t.get_text() == "n/a"]
    assert len(bars) == n - 1 and len(marks) == 1
    for other in bars + marks:
        assert not boxes[0].overlaps(other)
    # inside its panel, and the floor's line still in view
    assert ax.get_window_extent().contains(boxes[0].x0, boxes[0].y0)
    assert ax.get_window_extent().contains(boxes[0].x1, boxes[0].y1)
    assert ax.get_ylim()[0] <= floor <= ax.get_ylim()[1]


def test_a_long_errors_title_stays_inside_the_figure(ds: xr.Dataset, tmp_path: Path, monkeypatch) -> None:
    """ResNet-18's errors.png title ("Per-layer errors …; 40 parameter blocks (diagonal only) in
    summary.md; n/a: not measured") ran out of the figure at both ends."""
    extra = 40
    names = [*map(str, ds["layer"].values), *(f"bn{i}.weight" for i in range(extra))]
    kinds = [*map(str, ds["block_kind"].values), *["parameter"] * extra]
    edited = ds.isel(layer=[*range(ds.sizes["layer"]), *[0] * extra]).assign_coords(
        layer=names, block_kind=("layer", kinds))
    edited["rel_frobenius_error"].loc[dict(layer=names[0], approximation="kfoc")] = np.nan
    edited.attrs.update(model="resnet18", data="CIFAR-10 (JPEG q75 copy)")
    fig = _drawn(monkeypatch, plot_errors, edited, tmp_path)
    title = fig._suptitle
    assert f"{extra} parameter blocks" in title.get_text() and "n/a: not measured" in title.get_text()  # not cut
    box, frame = title.get_window_extent(), fig.bbox
    assert box.x0 >= frame.x0 - 1 and box.x1 <= frame.x1 + 1, title.get_text()


def test_a_cosine_rounded_past_one_is_no_negative_misalignment(ds: xr.Dataset, tmp_path: Path, monkeypatch) -> None:
    """A zero Fisher's damped natural gradients are all g/λ: cosines of 1 + 2e-16 were drawn as
    negative misalignment bars filling the panel, on an axis scaled ×1e-16 (QA12)."""
    edited = ds.copy(deep=True)
    edited["network_ng_cosine"].values[:] = 1 + 2.2e-16
    fig = _drawn(monkeypatch, plot_network, edited, tmp_path)
    panel = next(ax for ax in fig.axes if ax.get_title() == "Natural-gradient misalignment")
    heights = [p.get_height() for p in panel.patches if np.isfinite(p.get_height())]
    assert heights and min(heights) >= 0.0


def test_the_summary_of_a_zero_fisher_says_so(ds: xr.Dataset) -> None:
    """A diverged network's report (F = 0 on the batch) read as perfect natural gradients, and
    its floor sentence ended in "Fisher's, –." (QA12)."""
    edited = ds.copy(deep=True)
    edited["network_exact_trace"].values[...] = 0.0
    edited["network_blockdiag_error"].values[...] = np.nan
    text = summary_markdown(edited)
    assert "F is zero on this batch" in text and "Fisher's, –" not in text
    assert "F is zero" not in summary_markdown(ds)


def test_the_errors_panels_y_labels_stay_inside_their_own_rows(ds: xr.Dataset, tmp_path: Path, monkeypatch) -> None:
    """With more than three layers the panels are stacked 2.4 in high: the misalignment's label,
    1 − cos∠(F̂_λ⁻¹g, F_λ⁻¹g) written vertically, ran into the scaling error's label above it
    (a converted ViT's report on CIFAR-10)."""
    many = ds.isel(layer=[i % ds.sizes["layer"] for i in range(12)]).assign_coords(
        layer=[f"encoder.layers.{i}.self_attn.in_proj" for i in range(12)], block_kind=("layer", ["kronecker"] * 12))
    fig = _drawn(monkeypatch, plot_errors, many, tmp_path)
    panels = [ax for ax in fig.axes if ax.get_ylabel()]
    assert len(panels) == 4
    labels = [ax.yaxis.label.get_window_extent() for ax in panels]
    for ax, box in zip(panels, labels):  # each label within its panel's height
        frame = ax.get_window_extent()
        assert frame.y0 - 1 <= box.y0 and box.y1 <= frame.y1 + 1, ax.get_ylabel()


def test_bars_that_are_zero_are_named_not_left_to_vanish(ds: xr.Dataset, tmp_path: Path, monkeypatch) -> None:
    """EKFAC's, TEKFAC's and the diagonal's scaling error is 0 by construction: their bars have no
    height, and on the log axis of a wide panel they vanish as a missing one would (QA20)."""
    fig = _drawn(monkeypatch, plot_errors, ds, tmp_path)
    titles = {ax.get_title().split("\n")[0]: ax.get_title() for ax in fig.axes if ax.get_visible()}
    scaling = next(t for k, t in titles.items() if k.startswith("Scaling"))
    assert scaling.endswith("\n(0 for EKFAC, TEKFAC, diag(F))"), scaling
    assert all("(0 for" not in t for k, t in titles.items() if not k.startswith("Scaling")), titles


def test_figure_titles_say_train_mode_and_the_weights_measured(ds: xr.Dataset, tmp_path: Path, monkeypatch) -> None:
    """A train-mode run's and a --weights run's figures had the default run's titles (QA20)."""
    edited = ds.copy()
    edited.attrs.update(model_mode="train", weights="/runs/tekfac/checkpoint.pt")
    for plot in (plot_errors, plot_network):
        title = _drawn(monkeypatch, plot, edited, tmp_path)._suptitle.get_text()
        assert "train mode" in title and "weights tekfac/checkpoint.pt" in title, title
        plain = _drawn(monkeypatch, plot, ds, tmp_path)._suptitle.get_text()
        assert "train mode" not in plain and "weights" not in plain, plain


def test_a_figure_legend_of_many_entries_stays_within_the_canvas() -> None:
    """spectra.png's legend of every approximation in one row ran past both edges of the
    figure, the exact F's swatch and diag(F)'s name cut off (QA22): it wraps into rows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from curvlab.app.report.figures import WIDTH_IN, legend_below

    for count in (2, 8, 12):
        fig = Figure(figsize=(WIDTH_IN, 3), layout="constrained")
        fig.subplots()
        legend_below(fig, [Line2D([], [], label=f"F (exact Fisher (GGN)) {i}") for i in range(count)])
        FigureCanvasAgg(fig).draw()
        (legend,) = fig.legends
        box = legend.get_window_extent(fig.canvas.get_renderer())
        assert 0 <= box.x0 and box.x1 <= fig.bbox.width and 0 <= box.y0
        assert len(legend.get_texts()) == count
