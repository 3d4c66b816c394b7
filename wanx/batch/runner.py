"""Run a batch of videos: in this process, or on a pool of Ray actors (one per device).

Results land in the output folder as ``<id>.mp4`` (the recipe inside, as every wanx video) plus
``<id>.json`` (status, recipe, timings, which worker); a failed job leaves ``<id>.error.json``
and the others go on. Every file is published atomically, so an interrupted batch leaves no half
file, and a rerun skips the jobs whose mp4 exists. Workers send the encoded mp4 back to the
driver, which writes it: the output folder need not be shared between machines.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..atomic import atomic_output
from .jobs import Job, read_jobs


class JobRunner:
    """One worker: keeps one pipeline loaded (reloading only when a job asks for another model)."""

    def __init__(self, device=None, dtype=None, threads: int | None = None, **options):
        self.device, self.dtype, self.threads, self.options = device, dtype, threads, options
        self.key = self.pipe = None
        self.loads = 0

    def _pipeline(self, model: tuple):
        if self.key != model:
            from ..device import configure_cpu_threads
            from ..pipelines.loader import load_pipeline

            configure_cpu_threads(self.threads)
            self.pipe = None  # free the previous model before loading the next
            self.pipe = load_pipeline(model[0], task=model[1], device=self.device, dtype=self.dtype, **self.options)
            self.key = model
            self.loads += 1
        return self.pipe

    def run(self, model: tuple, request) -> dict[str, Any]:
        """Generate one resolved request; returns the mp4 bytes, the recipe and timings."""
        t0 = time.perf_counter()
        pipe = self._pipeline(model)
        video = pipe.run(request, progress=False)
        with tempfile.TemporaryDirectory(prefix="wanx-batch-") as tmp:
            path = video.save(Path(tmp) / "video.mp4")
            data = path.read_bytes()
        return {"mp4": data, "recipe": video.metadata, "seconds": time.perf_counter() - t0,
                "stages": video.stats.get("seconds", {}),
                "worker": {"host": socket.gethostname(), "pid": os.getpid(), "pipelines_loaded": self.loads}}


@dataclass
class BatchReport:
    """What a batch did: job ids per outcome."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # finished by an earlier run
    failed: dict[str, str] = field(default_factory=dict)  # id -> error
    retried: list[str] = field(default_factory=list)  # ids re-run after their worker died

    def summary(self) -> str:
        return (f"{len(self.done)} done, {len(self.skipped)} skipped (already done), {len(self.failed)} failed"
                + (f", {len(self.retried)} retried after a worker died" if self.retried else ""))


class Outputs:
    """The output folder: what is finished, and atomic writes of results and failures."""

    def __init__(self, folder: str | Path, report: BatchReport):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.report = report

    def finished(self, job: Job) -> bool:
        return (self.folder / f"{job.id}.mp4").is_file()

    def _write_json(self, name: str, obj: dict) -> None:
        with atomic_output(self.folder / name, overwrite=True) as tmp:
            tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")

    def success(self, job: Job, result: dict) -> None:
        with atomic_output(self.folder / f"{job.id}.mp4", overwrite=True) as tmp:
            tmp.write_bytes(result["mp4"])
        self._write_json(f"{job.id}.json", {"id": job.id, "line": job.line, "status": "done",
                                            **{k: v for k, v in result.items() if k != "mp4"}})
        (self.folder / f"{job.id}.error.json").unlink(missing_ok=True)
        self.report.done.append(job.id)

    def failure(self, job: Job, error: str, attempts: int) -> None:
        self._write_json(f"{job.id}.error.json", {"id": job.id, "line": job.line, "status": "failed",
                                                  "error": error, "attempts": attempts})
        self.report.failed[job.id] = error


def run_batch(jobs_path: str | Path, out_dir: str | Path, *, ckpt_dir=None, task: str | None = None,
              ray_address: str | None = None, workers: int | None = None, device=None, dtype=None,
              threads: int | None = None, retries: int = 2, progress: bool | None = None,
              on_dispatch: Callable | None = None, **options) -> BatchReport:
    """Run every job of ``jobs_path`` into ``out_dir``; returns the :class:`BatchReport`.

    ``ray_address`` None runs in this process; ``"local"`` starts a Ray cluster on this machine;
    anything else is passed to ``ray.init(address=...)`` (``"auto"``: the running cluster).
    ``retries``: how often a job is re-run after its worker died (a job that raises is not retried).
    ``options``: :func:`wanx.load_pipeline` options (offload_model, t5_cpu, ...).
    """
    import sys

    from ..pipelines.reporting import progress_bar

    jobs = read_jobs(jobs_path, ckpt_dir=ckpt_dir, task=task)
    report = BatchReport()
    outputs = Outputs(out_dir, report)
    progress = sys.stderr.isatty() if progress is None else progress
    todo = []
    with progress_bar(progress, len(jobs), "videos") as bar:
        for job in jobs:
            if outputs.finished(job):
                report.skipped.append(job.id)
            elif job.error is not None:
                outputs.failure(job, job.error, attempts=0)
            else:
                todo.append(job)
                continue
            bar.tick()
        todo.sort(key=lambda j: (str(j.model[0]), str(j.model[1])))  # one load per model and worker
        runner_kwargs = dict(device=device, dtype=dtype, threads=threads, **options)
        if ray_address is None:
            _run_local(todo, outputs, runner_kwargs, bar)
        else:
            from .ray_pool import run_on_ray

            run_on_ray(todo, outputs, address=ray_address, workers=workers, runner_kwargs=runner_kwargs,
                       retries=retries, tick=bar.tick, on_dispatch=on_dispatch)
    return report


def _run_local(jobs: list[Job], outputs: Outputs, runner_kwargs: dict, bar) -> None:
    runner = JobRunner(**runner_kwargs)
    for job in jobs:
        try:
            outputs.success(job, runner.run(job.model, job.request))
        except Exception as e:  # noqa: BLE001 - one failed video must not stop the batch
            outputs.failure(job, f"{type(e).__name__}: {e}", attempts=1)
        bar.tick()
