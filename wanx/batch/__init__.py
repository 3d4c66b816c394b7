"""Many videos: ``wanx batch JOBS.jsonl --out DIR [--ray [ADDRESS]]`` (in-process, or on Ray actors)."""

from __future__ import annotations

from .jobs import Job, read_jobs
from .runner import BatchReport, JobRunner, run_batch

__all__ = ["BatchReport", "Job", "JobRunner", "read_jobs", "run_batch"]
