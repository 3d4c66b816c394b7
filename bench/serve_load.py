"""Load test of ``wanx serve`` on loopback: M clients submit, poll, download and delete for a while.

    python -m bench.serve_load [--clients 8] [--duration 180] [--out bench/out/serve_load.json]

The server is a child process (``python -m wanx.serve``, the demo model, a fresh data folder on
127.0.0.1 and a free port) so its memory is measured alone. Reported: jobs completed per minute,
API latency (p50/p99/max per route) while jobs run, errors, and the server's resident memory
after loading, after a warm-up job and at the end (plus a sample every 10 s). Bounded: the clients
stop at the deadline, the server is stopped (SIGTERM, then SIGKILL), the folder removed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx

from wanx.serve.process import ServerProcess, wait_until

PROMPTS = ("a red circle moving left", "a blue square moving up", "a green triangle moving right",
           "a yellow circle moving down on a white background")


class Stats:
    """Latency samples per route and outcome counts, shared by the client threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.status: dict[str, int] = defaultdict(int)
        self.completed = 0

    def record(self, route: str, seconds: float, status: int | str) -> None:
        with self.lock:
            self.latency[route].append(seconds)
            self.status[str(status)] += 1


def _timed(stats: Stats, route: str, call):
    start = time.perf_counter()
    try:
        r = call()
    except httpx.HTTPError as e:
        stats.record(route, time.perf_counter() - start, type(e).__name__)
        return None
    stats.record(route, time.perf_counter() - start, r.status_code)
    return r


def client_loop(url: str, deadline: float, stats: Stats, seed: int) -> None:
    """Submit one job, poll it (and the list) until done, download it, delete every other one; repeat."""
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=30) as c:
        while time.monotonic() < deadline:
            r = _timed(stats, "create", lambda: c.post("/v1/videos", data={
                "prompt": rng.choice(PROMPTS), "seed": str(rng.randrange(1 << 31))}))
            if r is None or r.status_code != 200:
                time.sleep(0.5)  # 429 (queue full) or an error: back off
                continue
            job_id = r.json()["id"]
            while time.monotonic() < deadline:
                time.sleep(rng.uniform(0.1, 0.3))
                r = _timed(stats, "retrieve", lambda: c.get(f"/v1/videos/{job_id}"))
                _timed(stats, "list", lambda: c.get("/v1/videos", params={"limit": 20}))
                if r is not None and r.status_code == 200 and r.json()["status"] in ("completed", "failed"):
                    break
            else:
                return
            with stats.lock:
                stats.completed += r.json()["status"] == "completed"
            _timed(stats, "content", lambda: c.get(f"/v1/videos/{job_id}/content"))
            if rng.random() < 0.5:
                _timed(stats, "delete", lambda: c.delete(f"/v1/videos/{job_id}"))


def summarize(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"n": len(s), "p50_ms": round(1000 * statistics.median(s), 1), "p99_ms": round(1000 * pick(0.99), 1),
            "max_ms": round(1000 * s[-1], 1)}


def run(clients: int = 8, duration: float = 180.0, max_queue: int = 32, threads: int | None = None) -> dict:
    """Run the load test; returns the report (also what ``main`` prints and writes)."""
    with tempfile.TemporaryDirectory(prefix="wanx-serve-load-") as tmp:
        server = ServerProcess(Path(tmp) / "data", "--max_queue", str(max_queue), threads=threads)
        url = server.start()
        try:
            return _measure(server, url, clients, duration)
        finally:
            server.stop()


def _measure(server: ServerProcess, url: str, clients: int, duration: float) -> dict:
    wait_until(lambda: httpx.get(f"{url}/health").json()["status"] == "ok", 120, 0.2, "model loaded")
    rss_loaded = server.rss_mib()
    with httpx.Client(base_url=url, timeout=30) as c:  # warm-up: the first job allocates the working buffers
        job = c.post("/v1/videos", json={"prompt": PROMPTS[0]}).json()["id"]
        wait_until(lambda: c.get(f"/v1/videos/{job}").json()["status"] == "completed", 120, 0.2, "warm-up job")
        c.delete(f"/v1/videos/{job}")
    rss_warm = server.rss_mib()
    stats, rss_series = Stats(), [rss_warm]
    start = time.monotonic()
    deadline = start + duration
    workers = [threading.Thread(target=client_loop, args=(url, deadline, stats, i), daemon=True) for i in range(clients)]
    for w in workers:
        w.start()
    while time.monotonic() < deadline:
        time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
        rss_series.append(server.rss_mib())
    for w in workers:
        w.join(60)
    wall = time.monotonic() - start
    return {"clients": clients, "duration_s": round(wall, 1), "cpus": os.cpu_count(),
            "jobs_completed": stats.completed, "jobs_per_min": round(60 * stats.completed / wall, 1),
            "requests": sum(len(v) for v in stats.latency.values()), "status_counts": dict(stats.status),
            "latency": {route: summarize(v) for route, v in stats.latency.items()},
            "rss_mib": {"after_load": round(rss_loaded, 1), "after_warmup": round(rss_warm, 1),
                        "end": round(rss_series[-1], 1), "series_every_10s": [round(x, 1) for x in rss_series]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--duration", type=float, default=180.0, help="seconds of load after the warm-up")
    p.add_argument("--max_queue", type=int, default=32, help="the server's queue limit (429 beyond)")
    p.add_argument("--threads", type=int, default=None, help="the server's CPU threads (default: all)")
    p.add_argument("--out", default=None, help="write the report as JSON here too")
    args = p.parse_args(argv)
    report = run(args.clients, args.duration, args.max_queue, args.threads)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
