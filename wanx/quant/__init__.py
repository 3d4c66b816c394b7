"""Quantized DiT and text-encoder weights, applied to a model from outside (module replacement).

- :class:`QuantLinear` / :class:`QuantizedWeight`: a Linear whose weight stays encoded (int8,
  float8 or GGUF blocks with their scales) and is dequantized to the compute dtype per call;
- :func:`quantize_model_`: weight-only int8 or fp8 of a model's block Linear layers.
"""

from .linear import ON_THE_FLY_KINDS, QuantLinear, check_kind, quantize_model_, quantize_weight, stored_bytes
from .tensor import QuantizedWeight

__all__ = ["QuantLinear", "QuantizedWeight", "quantize_model_", "quantize_weight", "check_kind", "stored_bytes",
           "ON_THE_FLY_KINDS"]
