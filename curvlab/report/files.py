"""Deprecated: netCDF files are in :mod:`curvlab.io`, the summary in
:mod:`curvlab.app.report.summary` (curvlab 0.2)."""

from curvlab.app.report.summary import summary_markdown, write_summary  # noqa: F401
from curvlab.io import read_netcdf, write_netcdf  # noqa: F401

__all__ = ["read_netcdf", "summary_markdown", "write_netcdf", "write_summary"]
