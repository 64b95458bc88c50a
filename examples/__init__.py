"""The SRPO LIBERO recipe (``python examples/srpo_libero.py`` or the ``srpo-libero`` console script)."""
