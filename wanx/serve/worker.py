"""One worker per device: holds the loaded pipeline and runs queued jobs one after another.

A job's life here: claim (committed in_progress) -> optional prompt extension -> re-resolve the
stored arguments (the seed was fixed at submission, so a re-run after a crash makes the same
video) -> run with a step callback that reports progress and stops the run between two steps when
the job is deleted or the server stops -> stills, then the mp4, each published atomically and
never over an existing file -> completed. The mp4 is the commit point: if it exists, the job's
work is done, whatever the queue said when the server died.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import atomic_output
from ..errors import Cancelled, GenerationError, InputError
from .config import IMAGE_NAME

if TYPE_CHECKING:
    from .service import VideoService
    from .store import Job

log = logging.getLogger("wanx.serve")

DENOISE_SHARE = 95  # progress % at the last denoising step; decoding and saving take the rest
IDLE_WAIT_S = 0.5


class Worker(threading.Thread):
    """Runs jobs on ``device`` until the service stops."""

    def __init__(self, service: "VideoService", device: str | None, pipeline=None):
        super().__init__(name=f"wanx-worker-{device or 'default'}", daemon=True)
        self.service, self.device, self.pipe = service, device, pipeline
        self.ready = threading.Event()  # set once the model is loaded (or failed to load)
        self.load_error: str | None = None
        self.current: str | None = None

    def run(self) -> None:
        if not self._load():
            return
        svc = self.service
        while not svc.stopping.is_set():
            job = svc.store.claim()
            if job is None:
                svc.wake.wait(IDLE_WAIT_S)
                svc.wake.clear()
                continue
            self.process(job)

    def _load(self) -> bool:
        try:
            if self.pipe is None:
                self.pipe = self.service.load_pipeline(self.device)
            return True
        except Exception as e:  # noqa: BLE001 - reported by /health and the log, not a crash of the server
            self.load_error = f"{type(e).__name__}: {e}"
            log.exception("loading the model failed")
            return False
        finally:
            self.ready.set()

    def process(self, job: "Job") -> None:
        """Run one claimed job to a final state (or back to the queue if the server is stopping)."""
        svc, self.current = self.service, job.id
        log.info("job %s: run %d", job.id, job.attempts)
        try:
            video_path = svc.data.job_path(job.id, "video")
            if video_path.exists():  # an earlier run published it, then the server died before recording it
                svc.store.complete(job.id, read_recipe(video_path))
                return
            req, extend = self.prepare(job)
            video = self.pipe.run(req, callback=self.step_callback(job.id), progress=False)
            self.publish(job.id, video, extend)
        except Cancelled:
            if svc.stopping.is_set() and job.id not in svc.cancelled:
                svc.store.requeue(job.id)  # a clean shutdown is not the job's fault: not an attempt
                log.info("job %s: back in the queue (server stopping)", job.id)
        except InputError as e:
            svc.store.fail(job.id, "invalid_request", str(e), param=e.argument)
        except GenerationError as e:
            svc.store.fail(job.id, "generation_failed", str(e))
        except Exception as e:  # noqa: BLE001 - one bad job must not stop the worker
            log.exception("job %s failed", job.id)
            svc.store.fail(job.id, "internal_error", f"the server failed while generating ({type(e).__name__}); "
                                                     f"see the server log")
        finally:
            self.current = None
            svc.live.pop(job.id, None)
            svc.after_run(job.id)

    def prepare(self, job: "Job"):
        """(request, prompt-extension result or None) from the stored arguments."""
        svc = self.service
        params = dict(job.params)
        image = svc.data.job_path(job.id, "uploads") / IMAGE_NAME if params.pop("image", False) else None
        wants_extension = params.pop("prompt_extend", False)
        params.pop("loras", None)  # refused at submission until the pipeline can apply LoRAs
        extend = None
        if wants_extension:
            from ..prompts import extend_prompt

            extend = extend_prompt(svc.backend, params["prompt"], svc.facts.model_type, image=image,
                                   lang=svc.config.prompt_extend_lang, seed=params["seed"])
            svc.store.set_extend(job.id, extend.recipe())
            params["prompt"] = extend.prompt
        req = self.pipe.resolve(image=image, allow_any_size=svc.config.allow_any_size, **params)
        return req, extend

    def step_callback(self, job_id: str):
        svc = self.service

        def on_step(step: int, total: int, _plan_step) -> None:
            svc.live[job_id] = DENOISE_SHARE * step // total
            if job_id in svc.cancelled or svc.stopping.is_set():
                raise Cancelled(job_id)
        return on_step

    def publish(self, job_id: str, video, extend) -> None:
        svc = self.service
        video.metadata["job_id"] = job_id
        if extend is not None:
            video.metadata["prompt_extend"] = extend.recipe()
        frames = video.frames
        write_stills(svc.data.job_path(job_id, "thumbnail"), svc.data.job_path(job_id, "spritesheet"), frames)
        try:
            video.save(svc.data.job_path(job_id, "video"))  # atomic, exclusive: the commit point
        except FileExistsError:
            log.warning("job %s: its video was already published; keeping that one", job_id)
        svc.store.complete(job_id, json.loads(json.dumps(video.metadata, default=str)))


def write_stills(thumbnail: Path, spritesheet: Path, frames) -> None:
    """The middle frame, and up to 16 frames in a grid, as WebP (skipped if an earlier run wrote them)."""
    from PIL import Image

    n = len(frames)
    if not thumbnail.exists():
        _save_webp(thumbnail, Image.fromarray(frames[n // 2]))
    if not spritesheet.exists():
        picks = [frames[round(i * (n - 1) / max(1, min(n, 16) - 1))] for i in range(min(n, 16))]
        cols = 4 if len(picks) > 4 else len(picks)
        rows = -(-len(picks) // cols)
        h, w = picks[0].shape[:2]
        sheet = Image.new("RGB", (cols * w, rows * h))
        for i, frame in enumerate(picks):
            sheet.paste(Image.fromarray(frame), ((i % cols) * w, (i // cols) * h))
        _save_webp(spritesheet, sheet)


def _save_webp(path: Path, image) -> None:
    try:
        with atomic_output(path) as tmp:
            image.save(tmp, format="WEBP", quality=90)
    except FileExistsError:  # a concurrent writer of the same deterministic still won: fine
        pass


def read_recipe(path: Path) -> dict[str, Any]:
    """The recipe stored in an mp4's metadata, without decoding its frames."""
    import av

    from ..media import RECIPE_KEY

    with av.open(str(path)) as container:
        raw = container.metadata.get(RECIPE_KEY, "")
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}
