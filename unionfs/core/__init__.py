"""The union core: index, layer stack, resolution. Knows nothing of FUSE."""
