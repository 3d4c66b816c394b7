"""A batch file: one JSON object per line, each one video, checked before any model is loaded.

A line holds :meth:`WanPipeline.generate` arguments (``prompt``, ``size``, ``seed``, ...; the CLI
spellings ``sample_guide_scale`` and ``base_seed`` are accepted too), optionally ``id`` (the output
file stem; default ``job-<line>``, so give ids when lines may move between reruns), ``ckpt_dir``
and ``task`` (default: the batch's), so one batch can mix tasks and checkpoints. Relative image paths are read from the batch file's folder.
Each line is resolved by :func:`wanx.request.resolve_request` against its checkpoint's configs;
a line that does not resolve becomes a failed job and the others go on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

GENERATE_KEYS = ("prompt", "negative_prompt", "image", "size", "frame_num", "sample_steps", "sample_shift",
                 "guide_scale", "boundary", "sample_solver", "seed", "recipe", "timesteps", "boundary_step",
                 "cfg_first_steps", "cfg_first_scale", "allow_any_size")
ALIASES = {"sample_guide_scale": "guide_scale", "base_seed": "seed"}
JOB_KEYS = ("id", "ckpt_dir", "task")
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass
class Job:
    """One line of the batch: its id, its model and either a resolved request or why it has none."""

    id: str
    line: int
    model: tuple[str | None, str | None]  # (ckpt_dir, task): jobs with the same model share a pipeline
    request: Any = None  # a GenerationRequest
    error: str | None = None


def _parse_line(text: str, line: int, base: Path, default_model: tuple) -> tuple[str, tuple, dict]:
    """(id, model, generate kwargs) of one line; InputError for anything malformed."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError("jobs", f"{{arg}} line {line} is not JSON: {e.msg}") from None
    if not isinstance(obj, dict):
        raise InputError("jobs", f"{{arg}} line {line} must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(k for k in obj if k not in GENERATE_KEYS + JOB_KEYS and k not in ALIASES)
    if unknown:
        raise InputError("jobs", f"{{arg}} line {line}: unknown key(s) {', '.join(unknown)}; accepted: "
                                 f"{', '.join(JOB_KEYS + GENERATE_KEYS)}")
    job_id = str(obj.get("id", f"job-{line:05d}"))
    if not ID_PATTERN.fullmatch(job_id):
        raise InputError("jobs", f"{{arg}} line {line}: id {job_id!r} must be letters, digits, '.', '_' or '-' "
                                 f"(it names the output files)")
    kwargs = {ALIASES.get(k, k): v for k, v in obj.items() if k not in JOB_KEYS}
    if isinstance(kwargs.get("image"), str) and not Path(kwargs["image"]).is_absolute():
        kwargs["image"] = str(base / kwargs["image"])
    ckpt = obj.get("ckpt_dir", default_model[0])
    if ckpt is not None and not Path(ckpt).is_absolute():
        ckpt = str(base / ckpt)
    return job_id, (ckpt, obj.get("task", default_model[1])), kwargs


def read_jobs(path: str | Path, *, ckpt_dir=None, task: str | None = None) -> list[Job]:
    """Every non-blank line of ``path`` as a :class:`Job`, resolved (or failed with its reason)."""
    from ..pipelines.loader import describe_checkpoint
    from ..request import resolve_request

    path = Path(path)
    if not path.is_file():
        raise InputError("jobs", f"{{arg}} file {path} not found")
    jobs, seen, facts = [], set(), {}
    default = (None if ckpt_dir is None else str(ckpt_dir), task)
    for line, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        job = Job(id=f"job-{line:05d}", line=line, model=default)
        try:
            job.id, job.model, kwargs = _parse_line(text, line, path.parent, default)
            if job.id in seen:
                raise InputError("jobs", f"{{arg}} line {line}: id {job.id!r} is used by an earlier line")
            if job.model not in facts:
                facts[job.model] = describe_checkpoint(*job.model)[1]
            prompt = kwargs.pop("prompt", None)
            job.request = resolve_request(facts[job.model], prompt, **kwargs)
        except (InputError, ValueError, TypeError, OSError, RuntimeError) as e:
            job.error = f"{type(e).__name__}: {e}"
        seen.add(job.id)
        jobs.append(job)
    return jobs
