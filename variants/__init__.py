"""Built-in attention variants, one module per family. Importing this package registers them."""

from variants import dense, flex, linear, local, lowrank, sparse, tiled, triton_fused  # noqa: F401
