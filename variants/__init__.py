"""Built-in attention variants, one module per family. Importing this package registers them."""

from variants import dense, linear, local  # noqa: F401
