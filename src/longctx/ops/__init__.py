"""Attention operators: `attention()` is the one public entry (see longctx.ops.attention)."""

from longctx.ops.attention import attention

__all__ = ["attention"]
