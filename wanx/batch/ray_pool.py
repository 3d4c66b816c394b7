"""The Ray side of a batch: a pool of :class:`JobRunner` actors fed one job at a time.

One actor per GPU of the cluster (``num_gpus=1``; Ray sets its ``CUDA_VISIBLE_DEVICES``), or on
CPU-only clusters one per ``threads`` CPUs. Each actor loads its model once and keeps it. When an
actor dies (node lost, out of memory, killed), its job goes back to the front of the queue on a
fresh actor, at most ``retries`` times; a job that raises an error is recorded and not retried.
Needs the ``ray`` extra (``pip install "wanx[ray]"``).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from ..errors import InputError
from .runner import JobRunner, Outputs


def _import_ray():
    try:
        import ray
    except ImportError:
        raise InputError("ray", "{arg} needs the ray package: pip install \"wanx[ray]\"") from None
    return ray


def _actor_class(ray, runner_kwargs: dict, workers: int | None):
    """The remote JobRunner class with its resources, and how many actors to start."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    device = runner_kwargs.get("device")
    if gpus and device in (None, "cuda"):
        return ray.remote(num_gpus=1)(JobRunner), dict(runner_kwargs, device="cuda"), workers or gpus
    cpus = runner_kwargs.get("threads") or 1
    count = workers or max(1, int(resources.get("CPU", 1)) // cpus)
    return ray.remote(num_cpus=cpus)(JobRunner), dict(runner_kwargs, device=device or "cpu", threads=cpus), count


def run_on_ray(jobs: list, outputs: Outputs, *, address: str, workers: int | None, runner_kwargs: dict,
               retries: int, tick: Callable, on_dispatch: Callable | None = None) -> None:
    """Run ``jobs`` on Ray actors; results and failures go to ``outputs`` as they arrive.

    ``on_dispatch(job_id, attempt, actor)`` is called after each submission (tests kill actors there).
    """
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=None if address == "local" else address, include_dashboard=False,
                 log_to_driver=False)
    pool = []
    try:
        cls, kwargs, count = _actor_class(ray, runner_kwargs, workers)
        pool += [cls.remote(**kwargs) for _ in range(min(count, max(1, len(jobs))))]
        _drain(ray, deque((job, 1) for job in jobs), pool, lambda: cls.remote(**kwargs), outputs, retries,
               tick, on_dispatch)
    finally:
        for actor in pool:  # free the devices now, also on a cluster that outlives this batch
            if actor is not None:
                ray.kill(actor)
        if started:
            ray.shutdown()


def _drain(ray, queue: deque, pool: list, respawn: Callable, outputs: Outputs, retries: int, tick: Callable,
           on_dispatch: Callable | None) -> None:
    from ray.exceptions import RayActorError

    idle = list(range(len(pool)))
    running = {}  # object ref -> (job, attempt, actor index)
    while queue or running:
        while queue and idle:
            (job, attempt), i = queue.popleft(), idle.pop()
            if pool[i] is None:  # replaced only when there is work for it
                pool[i] = respawn()
            ref = pool[i].run.remote(job.model, job.request)
            running[ref] = (job, attempt, i)
            if on_dispatch is not None:
                on_dispatch(job.id, attempt, pool[i])
        (ref,), _ = ray.wait(list(running), num_returns=1)
        job, attempt, i = running.pop(ref)
        idle.append(i)
        try:
            outputs.success(job, ray.get(ref))
        except RayActorError as e:  # the worker died under the job: not the job's fault
            pool[i] = None
            if attempt <= retries:
                outputs.report.retried.append(job.id)
                queue.appendleft((job, attempt + 1))
                continue
            outputs.failure(job, f"worker died {attempt} times: {type(e).__name__}", attempts=attempt)
        except Exception as e:  # noqa: BLE001 - the job itself failed; record it, keep going
            cause = getattr(e, "cause", None) or e
            outputs.failure(job, f"{type(cause).__name__}: {cause}", attempts=attempt)
        tick()
