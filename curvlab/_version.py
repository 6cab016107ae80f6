"""The package version (read by the library without importing the package root)."""

__version__ = "0.1.0"
