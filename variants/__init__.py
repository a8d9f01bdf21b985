"""Built-in attention variants, one module per family. Importing this package registers them."""

from variants import cascade, dense, distributed, flex, inference, layers, linear, local, lowrank, paged, quantised, sparse, tiled, triton_fused  # noqa: F401,E501
from variants import peers  # noqa: F401  (FlashAttention, FlashInfer, xformers: optional libraries)
