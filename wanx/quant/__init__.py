"""Quantized DiT and text-encoder weights: dequantize-on-use Linear layers, readers, converters.

Everything here acts on a model from outside (module replacement); the model code knows nothing
of it. Reading GGUF files and writing ``q8_0`` needs the ``gguf`` package (the ``quant`` extra).

- :class:`QuantLinear` / :class:`QuantizedWeight`: a Linear whose weight stays encoded (int8,
  float8 or GGUF blocks with their scales) and is dequantized to the compute dtype per call;
- :func:`load_quantized_dit`: a WanDiT from a GGUF ``wan`` file, a ComfyUI ``fp8_scaled`` /
  ``comfy_quant`` file, a LightX2V int8/fp8 file, a quanto int8 file or a plain float8 file;
- :func:`quantize_model_` / :func:`load_dit_quantizing`: weight-only int8 or fp8 on the fly;
- :func:`convert_quantized`: a full-precision DiT written as int8/fp8 safetensors or Q8_0 GGUF.
"""

from .convert import CONVERT_KINDS, convert_quantized
from .dit import dit_file_config, load_dit_quantizing, load_quantized_dit
from .linear import ON_THE_FLY_KINDS, QuantLinear, check_kind, quantize_model_, quantize_weight, stored_bytes
from .readers import quantized_format
from .tensor import QuantizedWeight


def is_quantized_file(path) -> bool:
    """True when ``path`` is a DiT file only the quantized loader reads (GGUF or encoded safetensors)."""
    return quantized_format(path) != "float"


__all__ = ["QuantLinear", "QuantizedWeight", "quantize_model_", "quantize_weight", "check_kind",
           "load_quantized_dit", "load_dit_quantizing", "dit_file_config", "quantized_format",
           "is_quantized_file", "convert_quantized", "stored_bytes", "ON_THE_FLY_KINDS", "CONVERT_KINDS"]
