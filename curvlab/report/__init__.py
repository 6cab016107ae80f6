"""Deprecated: the report moved to :mod:`curvlab.app.report`, netCDF files to :mod:`curvlab.io`
(curvlab 0.2)."""

import warnings

from curvlab._deprecated import alias_submodules
from curvlab.app.report import figures, run, summary  # noqa: F401 (0.1 had them as attributes)
from curvlab.app.report import (  # noqa: F401
    ReportError,
    plot_errors,
    plot_network,
    plot_spectra,
    run_report,
    summary_markdown,
    write_summary,
)
from curvlab.app.palette import PALETTE  # noqa: F401
from curvlab.io import read_netcdf, write_netcdf  # noqa: F401

warnings.warn(
    "curvlab.report is deprecated since curvlab 0.2; use curvlab.app.report (and curvlab.io for netCDF)",
    DeprecationWarning,
    stacklevel=2,
)
alias_submodules(__name__, "curvlab.app.report", own=("files",))

__all__ = ["PALETTE", "ReportError", "figures", "plot_errors", "plot_network", "plot_spectra", "read_netcdf", "run",
           "run_report", "summary", "summary_markdown", "write_netcdf", "write_summary"]
