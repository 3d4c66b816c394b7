"""wanx: a faithful, fast runtime for the Wan 2.2 video generation models.

Importing this package touches no GPU, no disk and no network; heavy modules load on first use.
"""

import os as _os

# Idle OpenMP threads sleep instead of spinning: on a shared CPU spinning made denoising 5-30x slower
# (bench/threads.py). Read when torch loads OpenMP, so it only helps if wanx is imported first (the
# CLI always is); an explicit OMP_WAIT_POLICY wins.
if not _os.environ.get("WANX_KEEP_OMP_DEFAULT"):
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import Cancelled, GenerationError, InputError
from .version import __version__

__all__ = ["load_pipeline", "InputError", "Cancelled", "GenerationError", "__version__"]


def load_pipeline(ckpt_dir=None, task=None, device=None, dtype=None, **options):
    """Load a pipeline from an official or diffusers folder (None: the built-in demo model)."""
    from .pipelines import load_pipeline as _load

    return _load(ckpt_dir, task=task, device=device, dtype=dtype, **options)
