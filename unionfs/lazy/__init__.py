"""Images whose layers come while they are used, over image/ (store,
registry, tar): eStargz and zstd:chunked layers read lazily by chunks
(layers.py), plain layers streamed into a mount (streaming.py), and
`strata convert` to eStargz. image/ never imports this package."""
