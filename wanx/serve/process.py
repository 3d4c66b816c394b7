"""``python -m wanx.serve`` as a child process on 127.0.0.1 and a free port (crash tests, load benchmarks).

The child prints one line with its URL once it listens; :class:`ServerProcess` waits for it within a
deadline, and can stop the child politely (SIGTERM) or kill it outright (SIGKILL, as a crash).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import wanx

_URL = re.compile(r"on (http://127\.0\.0\.1:\d+) ")
REPO = Path(wanx.__file__).resolve().parent.parent


class ServerProcess:
    """One child server; ``start()`` returns its base URL."""

    def __init__(self, data: str | Path, *args: str, threads: int | None = None, start_timeout: float = 120.0):
        self.data, self.args, self.threads, self.start_timeout = Path(data), list(args), threads, start_timeout
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.output: list[str] = []  # everything the child printed (for a failing test's message)

    def start(self) -> str:
        cmd = [sys.executable, "-m", "wanx.serve", "--host", "127.0.0.1", "--port", "0", "--data", str(self.data),
               *(["--threads", str(self.threads)] if self.threads else []), *self.args]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                   PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        found = threading.Event()
        threading.Thread(target=self._read, args=(self.proc, found), daemon=True).start()
        if not found.wait(self.start_timeout) or self.url is None:
            self.kill()
            raise RuntimeError(f"the server did not start within {self.start_timeout} s:\n" + "".join(self.output[-30:]))
        return self.url

    def _read(self, proc: subprocess.Popen, found: threading.Event) -> None:
        for line in proc.stdout:
            self.output.append(line)
            match = _URL.search(line)
            if match and not found.is_set():
                self.url = match.group(1)
                found.set()
        found.set()  # the child exited without a URL

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as a power cut or the OOM killer would do."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then SIGKILL if the child has not exited within ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def rss_mib(self) -> float:
        """The child's resident memory now (Linux /proc)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS in /proc status")

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate()`` until it returns something truthy (returned) or ``timeout`` passes (an error)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout} s")
