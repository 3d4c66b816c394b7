"""wanx: a faithful, fast runtime for the Wan 2.2 video generation models.

Importing this package touches no GPU, no disk and no network; heavy modules load on first use.
"""

from .errors import Cancelled, GenerationError, InputError
from .version import __version__

__all__ = ["load_pipeline", "InputError", "Cancelled", "GenerationError", "__version__"]


def load_pipeline(ckpt_dir=None, task=None, device=None, dtype=None, **options):
    """Load a pipeline from an official or diffusers folder (None: the built-in demo model)."""
    from .pipelines import load_pipeline as _load

    return _load(ckpt_dir, task=task, device=device, dtype=dtype, **options)
