"""longctx: long-context transformer training on IO-aware exact attention kernels."""

__version__ = "0.1.0"
