"""Built-in attention variants, one module per family. Importing this package registers them."""

from variants import (  # noqa: F401,E501
    cascade,
    dense,
    distributed,
    flex,
    inference,
    layers,
    linear,
    local,
    lowrank,
    paged,
    peers,  # noqa: F401  (FlashAttention, FlashInfer, xformers: optional libraries)
    quantised,
    sparse,
    tiled,
    triton_fused,
)
