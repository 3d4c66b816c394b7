"""LoRA files for the Wan DiT: every common format normalised to official module names, applied
to one or both experts by fusing into the weights or live (unmerged), and undone exactly.

    stack = LoraStack(pipe.experts)
    report = stack.load("style.safetensors", strength=0.8, expert="both", mode="fuse")
    print(report.summary()); stack.unload_all()
"""

from .entries import Entry, FullDelta, LoHa, LoKr, LowRank
from .errors import LoraError
from .names import KeySpace
from .reader import LoraContents, LoraFile, normalise, read_lora_file
from .spec import parse_lora_arg
from .stack import AppliedLora, ExpertCoverage, LoraReport, LoraStack, load_lora_contents

__all__ = ["AppliedLora", "Entry", "ExpertCoverage", "FullDelta", "KeySpace", "LoHa", "LoKr", "LoraContents",
           "LoraError", "LoraFile", "LoraReport", "LoraStack", "LowRank", "load_lora_contents", "normalise",
           "parse_lora_arg", "read_lora_file"]
