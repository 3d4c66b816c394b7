"""LoRA files for the Wan DiT: every common format normalised to official module names."""

from .entries import Entry, FullDelta, LoHa, LoKr, LowRank
from .errors import LoraError
from .names import KeySpace
from .reader import LoraContents, LoraFile, normalise, read_lora_file

__all__ = ["Entry", "FullDelta", "KeySpace", "LoHa", "LoKr", "LoraContents", "LoraError", "LoraFile",
           "LowRank", "normalise", "read_lora_file"]
