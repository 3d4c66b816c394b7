"""The Wan 2.1 / 2.2 causal video VAEs (official state-dict keys), with tiling and streaming decode."""

from .causal import CACHE_T, CausalCache, CausalConv3d
from .model import WanVAE, check_frames
from .tiling import TileSpec
from .wan22 import patchify, unpatchify

__all__ = ["WanVAE", "TileSpec", "CausalCache", "CausalConv3d", "CACHE_T", "check_frames",
           "patchify", "unpatchify"]
