"""Step caches for the Wan 2.2 DiT, applied to a generation from outside the block code.

- :class:`MagCache`: skips the block stack on steps where its residual's magnitude barely changes,
  from ratios measured once (published for T2V-A14B, I2V-A14B and TI2V-5B; any checkpoint can be
  measured with :func:`calibrate_magcache` / ``wanx calibrate magcache``).
- :class:`FirstBlockCache`: calibration-free, keyed on the first block's residual.

Use: ``cache = resolve_cache("magcache:0.06", pipe.facts)`` (before any work: bad values are an
:class:`wanx.InputError`), then ``run_plan(..., cache=cache)``; ``cache.last_stats`` counts the
block-stack evaluations computed and skipped, ``cache.describe()`` goes into the recipe.
"""

from .calibrate import RatioRecorder, calibrate_magcache, calibrate_request, denoise_request, write_ratios
from .command import add_calibrate_parser, cmd_calibrate
from .fbcache import FirstBlockCache
from .magcache import MagCache, protected_steps
from .published import PUBLISHED_RATIOS
from .ratios import RatioTable, nearest_resample
from .session import StepCache, StepRun, summary_line
from .spec import CacheSpec, parse_cache_spec, resolve_cache

__all__ = ["CacheSpec", "FirstBlockCache", "MagCache", "PUBLISHED_RATIOS", "RatioRecorder", "RatioTable",
           "StepCache", "StepRun", "add_calibrate_parser", "calibrate_magcache", "calibrate_request",
           "cmd_calibrate", "denoise_request", "nearest_resample", "parse_cache_spec", "protected_steps",
           "resolve_cache", "summary_line", "write_ratios"]
