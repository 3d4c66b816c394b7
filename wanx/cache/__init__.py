"""Step caches for the Wan 2.2 DiT, applied to a generation from outside the block code."""

from .fbcache import FirstBlockCache
from .magcache import MagCache, protected_steps
from .published import PUBLISHED_RATIOS
from .ratios import RatioTable, nearest_resample
from .session import StepCache, StepRun, summary_line
from .spec import CacheSpec, parse_cache_spec, resolve_cache

__all__ = ["CacheSpec", "FirstBlockCache", "MagCache", "PUBLISHED_RATIOS", "RatioTable", "StepCache", "StepRun",
           "nearest_resample", "parse_cache_spec", "protected_steps", "resolve_cache", "summary_line"]
