"""The package version, in a leaf module so that any module may record it without importing
the package's public API (which imports everything)."""

__version__ = "0.1.0"
