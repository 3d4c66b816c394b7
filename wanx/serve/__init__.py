"""``wanx serve``: an OpenAI-compatible video API with a persistent queue, and a web UI.

    wanx serve                                   # the demo model on http://127.0.0.1:8000
    wanx serve --ckpt_dir Wan2.2-T2V-A14B --data /srv/wanx --api_key ...

Jobs live in SQLite in the data folder (committed before the reply, so ``kill -9`` loses none);
one worker per device keeps the model loaded. Needs the ``serve`` extra (FastAPI, uvicorn,
python-multipart); importing this package does not.
"""

from .cli import add_serve_flags, add_serve_parser, cmd_serve

__all__ = ["add_serve_flags", "add_serve_parser", "cmd_serve"]
