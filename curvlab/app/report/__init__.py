"""``curvlab report``: a comparison end to end, its Markdown summary and its figures."""

from curvlab.app.report.figures import plot_errors, plot_network, plot_spectra
from curvlab.app.report.run import ReportConfig, ReportError, run_report
from curvlab.app.report.summary import summary_markdown, write_summary

__all__ = [
    "ReportConfig",
    "ReportError",
    "plot_errors",
    "plot_network",
    "plot_spectra",
    "run_report",
    "summary_markdown",
    "write_summary",
]
