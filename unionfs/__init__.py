"""strata: a union filesystem for layered container images."""

from unionfs.native import extend_path

__version__ = "0.1.0"
# The request path's modules compiled, where setup built them (unionfs.native).
__path__ = extend_path(__path__, __name__)
