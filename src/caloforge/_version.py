"""The package version (its own module: modules import it without importing the package)."""

__version__ = "0.1.0"
