"""strata: a union filesystem for layered container images."""

__version__ = "0.1.0"
