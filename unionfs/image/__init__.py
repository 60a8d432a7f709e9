"""Images: the store, OCI layouts, docker archives, the registry client, layer tars."""
