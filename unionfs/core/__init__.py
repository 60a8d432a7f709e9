"""The union core: index, layer stack, resolution. Knows nothing of FUSE."""

from unionfs.native import extend_path

# Compiled modules first, where setup built them (unionfs.native).
__path__ = extend_path(__path__, __name__)
