"""`fp`: plain full-precision training, no quantization: the reference of every
comparison."""

from __future__ import annotations

from qareg.methods.base import Method, register_method


@register_method("fp", post_training=True, quantizes=False)
class FullPrecisionMethod(Method):
    """Plain training; `convert` refuses (there is nothing to quantize)."""
