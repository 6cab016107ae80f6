"""The files of a report: its output folder is checked before any compute, and replaced whole.

Every file is written into a staging folder beside the output folder, ``manifest.json`` (the
run id and every file's SHA-256) last, and the staging folder then replaces the output folder in
one step (:func:`curvlab.app.outdir.publish`).  An interrupted or failed report (a full disk
included) therefore leaves the previous report exactly as it was; a report folder always holds
one complete run, which its manifest lets anyone check.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import xarray as xr

from curvlab.app.outdir import (FolderLock, OutputFolderError, check_writable, discard, foreign_entries, publish,
                                 staging_folder)
from curvlab.io import atomic_write

#: Files of a report, by key of :func:`run_report`'s result.
REPORT_FILES = {
    "report": "report.nc",
    "summary": "summary.md",
    "spectra": "spectra.png",
    "errors": "errors.png",
    "network": "network.png",
    "manifest": "manifest.json",
}
#: The figure of a report whose model couples examples (train-mode BatchNorm).
COUPLING_FIGURE = "coupling.png"


def check_report_folder(out: Path) -> Path:
    """``out`` (a link resolved), checked before any compute: a folder that can be created or
    replaced, holding nothing but an earlier report.

    Raises:
        OutputFolderError: a file in the way, no write permission, files of something else in it,
            or the current folder (which cannot be replaced).
    """
    out = out.resolve() if out.is_symlink() else out
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:  # a folder in use cannot be renamed away
        raise OutputFolderError(f"curvlab report: --out {out} is the current folder or holds it; a report replaces "
                                "its whole folder, so choose a new or empty folder, e.g. --out report")
    check_writable(out, "curvlab report")
    check_writable(out.parent, "curvlab report")
    FolderLock(out, "curvlab report").check()  # a run (a training before its first files) may hold it
    foreign = foreign_entries(out, {*REPORT_FILES.values(), COUPLING_FIGURE})
    if foreign:
        shown = ", ".join(foreign[:5]) + (", …" if len(foreign) > 5 else "")
        raise OutputFolderError(
            f"curvlab report: {out} holds files that are not part of a curvlab report ({shown}); "
            "a report replaces its whole folder, so choose an empty or new --out"
        )
    return out


def write_report(ds: xr.Dataset, out: Path) -> dict[str, Path]:
    """Write the report files of ``ds`` and publish them as the folder ``out`` in one step.

    Raises:
        OSError: a file could not be written (``[Errno 28]`` for a full disk), naming it; the
            previous content of ``out`` is unchanged.
    """
    from curvlab.app.report.coupling import plot_coupling
    from curvlab.app.report.figures import plot_errors, plot_network, plot_spectra
    from curvlab.app.report.summary import write_summary
    from curvlab.io import write_netcdf

    stage = staging_folder(out)
    try:
        staged = {key: stage / name for key, name in REPORT_FILES.items()}
        ds.attrs["run_id"] = uuid.uuid4().hex
        write_netcdf(ds, staged["report"])
        plot_spectra(ds, staged["spectra"])
        plot_errors(ds, staged["errors"])
        plot_network(ds, staged["network"])
        figures = {
            "Eigenvalues per layer": REPORT_FILES["spectra"],
            "Per-layer errors": REPORT_FILES["errors"],
            "Whole network": REPORT_FILES["network"],
        }
        if ds.attrs.get("coupled"):
            staged["coupling"] = plot_coupling(ds, stage / COUPLING_FIGURE)
            figures["What the Kronecker statistics miss of the coupled blocks"] = COUPLING_FIGURE
        write_summary(ds, staged["summary"], figures=figures)
        manifest = {
            "run_id": ds.attrs["run_id"],
            "files": {p.name: _sha256(p) for key, p in staged.items() if key != "manifest"},
        }
        atomic_write(staged["manifest"], lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1) + "\n"))
        publish(stage, out)
    except OSError as err:
        discard(stage)
        name = out / Path(err.filename).name if err.filename and str(stage) in str(err.filename) else err.filename
        raise OSError(err.errno, f"{err.strerror or err} (the report in {out} is unchanged)", str(name) if name else None) from err
    except BaseException:
        discard(stage)
        raise
    return {key: out / p.name for key, p in staged.items()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
