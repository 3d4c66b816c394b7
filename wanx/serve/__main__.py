"""``python -m wanx.serve``: the server without going through the ``wanx`` command."""

import sys

from .cli import main

sys.exit(main())
