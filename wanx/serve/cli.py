"""``wanx serve``: its flags, and running the server (in the foreground, or in a thread for tests).

Flags are defined without importing FastAPI, so ``wanx --help`` works without the serve extra;
``cmd_serve`` says which extra to install when it is missing.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .config import ServeConfig, default_data_dir, is_loopback

log = logging.getLogger("wanx.serve")

KEY_ENV = "WANX_API_KEY"


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    from ..prompts import add_prompt_extend_flags

    d = ServeConfig(data=Path("."))
    p.add_argument("--ckpt_dir", default=None, help="checkpoint folder (official or diffusers); default: the demo model")
    p.add_argument("--task", default=None, help="task to serve; default: read from the checkpoint folder")
    p.add_argument("--host", default=d.host, help=f"address to bind (default {d.host}: this machine only)")
    p.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port}; 0 picks a free one)")
    p.add_argument("--data", default=None,
                   help="folder for the job queue, uploads and videos (default $WANX_SERVE_DATA or ./wanx-serve-data)")
    p.add_argument("--api_key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 (or set ${KEY_ENV}, which ps does not show)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, or a comma list: one worker per device")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="DiT/text-encoder compute dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for generation (default: all cores)")
    p.add_argument("--max_queue", type=int, default=d.max_queue, help="jobs waiting or running before a 429")
    p.add_argument("--max_frames", type=int, default=d.max_frames, help="largest frame count one request may ask")
    p.add_argument("--max_steps", type=int, default=d.max_steps, help="most denoising steps one request may ask")
    p.add_argument("--max_area", type=int, default=d.max_area, help="largest width x height one request may ask")
    p.add_argument("--max_image_mb", type=int, default=d.max_image_bytes >> 20, help="largest image upload, MiB")
    p.add_argument("--max_audio_mb", type=int, default=d.max_audio_bytes >> 20, help="largest audio upload, MiB")
    p.add_argument("--max_attempts", type=int, default=d.max_attempts,
                   help="runs cut short by a server crash before a job fails as interrupted")
    p.add_argument("--allow_any_size", action="store_true",
                   help="accept sizes outside the task's official list (within --max_area)")
    p.add_argument("--lora_dir", default=None, help="folder of LoRA .safetensors files offered by name")
    add_prompt_extend_flags(p)


def add_serve_parser(subparsers, parents=()) -> argparse.ArgumentParser:
    """Add ``serve`` to the CLI's subcommands (``parents``: e.g. the shared -v parser)."""
    p = subparsers.add_parser("serve", help="serve an OpenAI-compatible video API and a web UI",
                              parents=list(parents))
    add_serve_flags(p)
    return p


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(
        data=Path(args.data) if args.data else default_data_dir(), ckpt_dir=args.ckpt_dir, task=args.task,
        device=args.device, dtype=args.dtype, host=args.host, port=args.port,
        api_key=args.api_key or os.environ.get(KEY_ENV) or None, max_queue=args.max_queue,
        max_image_bytes=args.max_image_mb << 20, max_audio_bytes=args.max_audio_mb << 20,
        max_frames=args.max_frames, max_steps=args.max_steps, max_area=args.max_area,
        allow_any_size=args.allow_any_size, max_attempts=args.max_attempts,
        lora_dir=Path(args.lora_dir) if args.lora_dir else None, prompt_extend=args.prompt_extend,
        prompt_extend_url=args.prompt_extend_url, prompt_extend_model=args.prompt_extend_model,
        prompt_extend_lang=args.prompt_extend_lang, threads=args.threads)


def exposure_warning(config: ServeConfig) -> str | None:
    """The warning for a server reachable from other machines without a key (None when there is none)."""
    if is_loopback(config.host) or config.api_key is not None:
        return None
    return (f"serving on {config.host} without an API key: anyone who can reach this port can queue and delete "
            f"jobs (set --api_key or ${KEY_ENV})")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket. Made with proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on accepted
    sockets whose proto says TCP, and without it every reply waited ~40 ms for a delayed ACK."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def uvicorn_server(app, verbose: bool = False):
    import uvicorn

    class Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self):
            """SIGINT/SIGTERM only ask for a shutdown. uvicorn's own handling re-raises the signal once
            it has stopped, which killed the process before the workers put their running job back."""
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in old.items():
                    signal.signal(s, handler)

    config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose,
                            lifespan="off", timeout_keep_alive=30)
    return Server(config)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted; 2 with a message for a setting that cannot work."""
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(f"wanx: error: wanx serve needs the serve extra ({e.name} is missing): pip install 'wanx[serve]'",
              file=sys.stderr)
        return 2
    from .app import create_app
    from .service import VideoService

    config = config_from_args(args)
    warning = exposure_warning(config)
    if warning:
        print(f"wanx: warning: {warning}", file=sys.stderr)
    try:
        service = VideoService(config)
        sock = bind(config.host, config.port)
    except (OSError, RuntimeError, ValueError) as e:
        print(f"wanx: error: {e}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    service.start()
    print(f"wanx serve: {service.model_name} ({service.facts.spec.name}) on http://{_url_host(host)}:{port} "
          f"| data {service.data.root} | auth {'on' if config.api_key else 'off'}", flush=True)
    try:
        uvicorn_server(create_app(service), getattr(args, "verbose", False)).run(sockets=[sock])
    finally:
        service.stop()
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class BackgroundServer:
    """The server in a thread on 127.0.0.1 and a free port (tests, benchmarks): ``with ... as url``."""

    def __init__(self, config: ServeConfig, pipeline=None, start_timeout: float = 60.0):
        from .app import create_app
        from .service import VideoService

        self.service = VideoService(config, pipeline=pipeline)
        self.sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn_server(create_app(self.service))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.start_timeout = start_timeout

    def __enter__(self) -> str:
        self.service.start()
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.__exit__()
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        self.service.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m wanx.serve``: the same flags as ``wanx serve``."""
    parser = argparse.ArgumentParser(prog="python -m wanx.serve", description="Serve wanx over HTTP.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log requests and job runs")
    add_serve_flags(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return cmd_serve(args)
