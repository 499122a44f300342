"""The package version, in one place (the package, the commands and the benchmarks read it)."""
__version__ = "0.1.0"
