"""``curvlab report``: a comparison end to end, its Markdown summary and its figures.

The names below are imported at their first use: the command line builds its parser from
:mod:`.run` alone, and the figures' matplotlib and seaborn (1.6 s) wait until a figure is drawn.
"""

from __future__ import annotations

from curvlab._lazy import lazy_names

_WHERE = {
    "ReportConfig": "run",
    "ReportError": "run",
    "plot_errors": "figures",
    "plot_network": "figures",
    "plot_spectra": "figures",
    "run_report": "run",
    "summary_markdown": "summary",
    "write_summary": "summary",
}

__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_names(__name__, _WHERE)
