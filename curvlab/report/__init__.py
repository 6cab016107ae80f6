"""Reports of a comparison: netCDF and Markdown files, figures, and the end-to-end run."""

from curvlab.report.figures import PALETTE, plot_all, plot_errors, plot_network, plot_spectra
from curvlab.report.files import read_netcdf, summary_markdown, write_netcdf, write_summary
from curvlab.report.run import ReportError, run_report

__all__ = [
    "PALETTE",
    "ReportError",
    "plot_all",
    "plot_errors",
    "plot_network",
    "plot_spectra",
    "read_netcdf",
    "run_report",
    "summary_markdown",
    "write_netcdf",
    "write_summary",
]
