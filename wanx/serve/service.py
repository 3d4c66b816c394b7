"""The video service behind the HTTP routes: submit (checked, then committed), read, list, delete.

Everything a request asks for goes through :func:`wanx.request.resolve_request` against the
checkpoint's configs before it is queued, so a bad request is a 400 naming the field and never
a failed job. The HTTP layer (``app.py``) only moves bytes; this module makes the decisions.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import Any

from ..errors import InputError
from .config import DataDir, ServeConfig
from .errors import ApiError
from .params import Submission, collect, resolver_args
from .store import Job, JobStore
from .uploads import check_audio, remove_staged, stage_data_url, stage_file, store_image
from .worker import Worker, read_recipe

log = logging.getLogger("wanx.serve")

_LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class VideoService:
    """The queue, the data folder, the checkpoint's facts and the workers of one server."""

    def __init__(self, config: ServeConfig, pipeline=None):
        from ..pipelines.loader import describe_checkpoint
        from ..prompts import make_backend

        self.config = config
        self.layout, self.facts = describe_checkpoint(config.ckpt_dir, config.task)  # configs only: fast
        self.model_name = self.layout.root.resolve().name
        self.backend = make_backend(config.prompt_extend, config.prompt_extend_url, config.prompt_extend_model)
        self.data = DataDir(config.data)
        self.data.lock()
        self.store = JobStore(self.data.db_path)
        self.stopping, self.wake = threading.Event(), threading.Event()
        self.live: dict[str, int] = {}  # job id -> progress % of running jobs (not worth a disk write per step)
        self.cancelled: set[str] = set()  # deleted while running: the worker stops at the next step
        self.recovered = self._recover()
        devices = (config.device or "").split(",") if config.device else [None]
        self.workers = [Worker(self, d.strip() if d else None, pipeline if i == 0 else None)
                        for i, d in enumerate(devices)]

    # ----------------------------------------------------------------------------- life cycle

    def _recover(self) -> dict[str, int]:
        """Finish what a killed server left: deleted jobs' files, running jobs, half-written files."""
        for job_id in list(self.store.deleted_ids()):
            self.purge(job_id)
        running = {j.id for j in self.store.jobs_in("in_progress")}
        finished = {i: read_recipe(self.data.job_path(i, "video")) for i in running & self.data.published_videos()}
        counts = self.store.recover(self.config.max_attempts, finished)
        counts["cleaned"] = self.data.clean(self.store.all_ids())
        if any(counts.values()):
            log.warning("recovered the queue: %s", ", ".join(f"{k} {v}" for k, v in counts.items()))
        return counts

    def load_pipeline(self, device: str | None):
        from .. import load_pipeline
        from ..device import configure_cpu_threads

        configure_cpu_threads(self.config.threads)
        return load_pipeline(self.config.ckpt_dir, task=self.config.task, device=device, dtype=self.config.dtype)

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the workers (a running job goes back to the queue at its next step), close the queue."""
        self.stopping.set()
        self.wake.set()
        for w in self.workers:
            if w.is_alive():
                w.join(timeout)
        self.store.close()
        self.data.unlock()

    def health(self) -> dict[str, Any]:
        errors = [w.load_error for w in self.workers if w.load_error]
        state = "error" if errors else "ok" if all(w.ready.is_set() for w in self.workers) else "loading"
        return {"status": state, "model": self.model_name, "task": self.facts.spec.name,
                "workers": len(self.workers), "errors": errors}

    # --------------------------------------------------------------------------------- submit

    def submit(self, fields: list[tuple[str, Any]]) -> Job:
        """Check a create request completely, store its upload, commit the job; ApiError on refusal."""
        if self.workers and all(w.load_error for w in self.workers):
            raise ApiError(503, "the model failed to load, so no job could run; see the server log",
                           code="model_unavailable")
        sub = collect(fields)
        self._check_service_fields(sub)
        job_id = self.data.new_id()
        try:
            image = self._take_uploads(sub, job_id)
            args = resolver_args(sub, self.facts.spec.sample_fps)
            req = self._resolve(sub, args, image)
            params = {**args, "seed": req.seed, "image": image is not None,
                      "prompt_extend": bool(sub.values.get("prompt_extend")), "loras": []}
            job = self.store.add(job_id, params, self.summary(req), max_active=self.config.max_queue)
        except BaseException:
            self.data.remove_job_files(job_id)
            raise
        if job is None:
            self.data.remove_job_files(job_id)
            raise ApiError(429, f"the queue is full ({self.config.max_queue} jobs waiting or running); "
                                f"retry later", code="queue_full", headers={"Retry-After": "10"})
        self.wake.set()
        return job

    def _check_service_fields(self, sub: Submission) -> None:
        v = sub.values
        if not isinstance(v.get("prompt"), str):
            raise ApiError(400, "prompt is required: describe the video", param="prompt", code="missing_parameter")
        if len(v["prompt"]) > self.config.max_prompt_chars or len(v.get("negative_prompt") or "") > self.config.max_prompt_chars:
            name = "prompt" if len(v["prompt"]) > self.config.max_prompt_chars else sub.name("negative_prompt")
            raise ApiError(400, f"{name} is longer than {self.config.max_prompt_chars} characters", param=name)
        if v.get("model") not in (None, "", self.model_name, self.facts.spec.name):
            raise ApiError(400, f"this server serves {self.model_name!r} (task {self.facts.spec.name}), "
                                f"not {v['model']!r}", param="model", code="model_not_found")
        if v.get("task") not in (None, "", self.facts.spec.name):
            raise ApiError(400, f"this server runs task {self.facts.spec.name}, not {v['task']!r}", param="task")
        if v.get("prompt_extend") and self.backend is None:
            raise ApiError(400, "this server has no prompt extender (start it with --prompt_extend openai|local)",
                           param="prompt_extend", code="prompt_extend_unavailable")
        if v.get("loras"):
            self._check_loras(v["loras"], sub.name("loras"))

    def _check_loras(self, loras: Any, name: str) -> None:
        names = loras if isinstance(loras, list) else [loras]
        available = set(self.loras())
        for entry in names:
            base = str(entry).split(":", 1)[0].split("@", 1)[0]
            if not _LORA_NAME.fullmatch(base) or base not in available:
                raise ApiError(400, f"{name}: unknown LoRA {base!r}; available: {', '.join(sorted(available)) or 'none'}",
                               param=name)
        raise ApiError(400, f"{name}: this wanx cannot apply LoRAs yet (the pipeline has no LoRA loader)", param=name,
                       code="unsupported_parameter")

    def loras(self) -> list[str]:
        """Names (file stems) of the ``.safetensors`` files in ``--lora_dir``; never their paths."""
        folder = self.config.lora_dir
        if folder is None or not Path(folder).is_dir():
            return []
        return sorted(p.stem for p in Path(folder).glob("*.safetensors") if _LORA_NAME.fullmatch(p.stem))

    def _take_uploads(self, sub: Submission, job_id: str) -> Path | None:
        """Audio is probed (then refused: no runnable task takes audio yet); the image is decoded and stored."""
        cfg = self.config
        if sub.values.get("audio") is not None:
            name = sub.name("audio")
            staged = self._stage(sub.values["audio"], cfg.max_audio_bytes, name)
            try:
                check_audio(staged, name)
            finally:
                remove_staged(staged)
            raise ApiError(400, f"task {self.facts.spec.name} takes no audio ({name}); speech-to-video (s2v) is "
                                f"not runnable in this wanx yet", param=name)
        if sub.values.get("input_reference") is None:
            return None
        name = sub.name("input_reference")
        return store_image(self.data, self._stage(sub.values["input_reference"], cfg.max_image_bytes, name), job_id, name)

    def _stage(self, value: Any, limit: int, name: str) -> Path:
        if hasattr(value, "file") and hasattr(value, "filename"):  # a multipart upload
            return stage_file(self.data, value.file, limit, name)
        return stage_data_url(self.data, value, limit, name)

    def _resolve(self, sub: Submission, args: dict[str, Any], image: Path | None):
        from ..request import resolve_request

        try:
            req = resolve_request(self.facts, image=image, allow_any_size=self.config.allow_any_size, **args)
        except InputError as e:
            name = sub.name("input_reference") if e.argument == "image" else sub.name(e.argument)
            message = e.message_for({e.argument: name})
            if image is not None:
                message = message.replace(str(image), "the uploaded image")  # never show server paths
            raise ApiError(400, message, param=name) from None
        cfg = self.config
        w, h = req.video_size
        for field, value, limit in (("frame_num", req.frame_num, cfg.max_frames),
                                    ("sample_steps", req.sample_steps, cfg.max_steps), ("size", w * h, cfg.max_area)):
            if value > limit:
                name = sub.name("seconds") if field == "frame_num" and "seconds" in sub.values else sub.name(field)
                what = f"{w}x{h} = {value} pixels" if field == "size" else str(value)
                raise ApiError(400, f"{name}: {what} is over this server's limit of {limit}", param=name)
        return req

    def summary(self, req) -> dict[str, Any]:
        """What a waiting job shows: the resolved settings, the output's size and duration."""
        fps = self.facts.spec.sample_fps
        return {"task": self.facts.spec.name, **req.settings(), "video_size": f"{req.video_size[0]}x{req.video_size[1]}",
                "fps": fps, "seconds": f"{req.frame_num / fps:g}"}

    # ----------------------------------------------------------------------------- read, delete

    def get(self, job_id: str) -> Job:
        job = self.store.get(job_id) if self.data.valid_id(job_id) else None
        if job is None:
            raise ApiError(404, f"no video {job_id!r}", param="video_id")
        return job

    def delete(self, job_id: str) -> None:
        """Hide the job now; a running one stops at its next step and its worker removes the files."""
        job = self.store.mark_deleted(job_id) if self.data.valid_id(job_id) else None
        if job is None:
            raise ApiError(404, f"no video {job_id!r}", param="video_id")
        if job.status == "in_progress":
            self.cancelled.add(job_id)
        else:
            self.purge(job_id)

    def after_run(self, job_id: str) -> None:
        """Called by a worker when a job leaves it: finish a deletion that came in meanwhile."""
        job = self.store.get(job_id, include_deleted=True)
        if job is not None and job.deleted:
            self.purge(job_id)

    def purge(self, job_id: str) -> None:
        self.data.remove_job_files(job_id)
        self.store.remove(job_id)
        self.cancelled.discard(job_id)

    def progress(self, job: Job) -> int:
        if job.status == "in_progress":
            return self.live.get(job.id, job.progress)
        return 100 if job.status == "completed" else job.progress

    def poll_after_ms(self, job: Job) -> int:
        """When a client should ask again: about a tenth of a run, more for a job far back in the queue."""
        run_s = self.store.recent_run_seconds() or 2.0
        ahead = self.store.position(job) if job.status == "queued" else 0
        return int(min(5000, max(250, 1000 * run_s * (0.1 + 0.5 * ahead))))

    def extend(self, prompt: Any, image: Any = None, lang: Any = None) -> dict[str, Any]:
        """The UI's "extend prompt" button: the rewrite (or the original and why) for this task."""
        from ..prompts import extend_prompt

        if self.backend is None:
            raise ApiError(400, "this server has no prompt extender (start it with --prompt_extend openai|local)",
                           param="prompt_extend", code="prompt_extend_unavailable")
        if not isinstance(prompt, str) or len(prompt) > self.config.max_prompt_chars:
            raise ApiError(400, f"prompt must be text of at most {self.config.max_prompt_chars} characters", param="prompt")
        if lang not in (None, "auto", "en", "zh"):
            raise ApiError(400, "lang must be auto, en or zh", param="lang")
        staged = None
        if image is not None:
            staged = stage_data_url(self.data, image, self.config.max_image_bytes, "image")
        try:
            result = extend_prompt(self.backend, prompt, self.facts.model_type, image=staged,
                                   lang=lang or self.config.prompt_extend_lang, seed=0)
        except InputError as e:
            raise ApiError(400, e.message_for({"image": "image"}).replace(str(staged), "the image"), param="image") from None
        finally:
            remove_staged(staged)
        return {"prompt": result.prompt, **result.recipe()}

