"""The Wan diffusion transformer, its attention backends and 3D RoPE."""

from .attention import (attention, attention_backend, available_backends, get_attention_backend,
                        set_attention_backend)
from .dit import WanDiT

__all__ = ["WanDiT", "attention", "attention_backend", "available_backends", "get_attention_backend",
           "set_attention_backend"]
