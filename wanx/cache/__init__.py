"""Step caches for the Wan 2.2 DiT, applied to a generation from outside the block code."""

from .published import PUBLISHED_RATIOS
from .ratios import RatioTable, nearest_resample

__all__ = ["PUBLISHED_RATIOS", "RatioTable", "nearest_resample"]
