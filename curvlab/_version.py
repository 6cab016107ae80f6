"""The package version (read by the library without importing the package root)."""

__version__ = "0.2.0"
