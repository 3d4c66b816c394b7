"""What the web page needs to draw a task-aware form: the task's inputs, defaults and the server's limits."""

from __future__ import annotations

from typing import Any

SOLVERS = ("unipc", "dpm++", "euler", "flow_euler")  # wanx.sampling.SAMPLERS, without importing torch here


def ui_facts(service) -> dict[str, Any]:
    spec, cfg = service.facts.spec, service.config
    model_type = service.facts.model_type
    from ..request import RECIPES

    backend = service.backend
    return {
        "model": service.model_name, "task": spec.name, "model_type": model_type,
        "takes_image": model_type in ("i2v", "ti2v"), "image_required": model_type == "i2v",
        "takes_audio": model_type == "s2v",
        "sizes": list(spec.supported_sizes), "default_size": spec.default_size,
        "allow_any_size": cfg.allow_any_size, "size_multiple": service.facts.size_multiple,
        "defaults": {"frame_num": spec.frame_num, "sample_steps": spec.sample_steps,
                     "sample_shift": spec.sample_shift, "guide_scale": _guide(spec.guide_scale),
                     "negative_prompt": spec.negative_prompt, "sample_solver": "unipc", "fps": spec.sample_fps},
        "limits": {"max_frames": cfg.max_frames, "max_steps": cfg.max_steps, "max_area": cfg.max_area,
                   "max_image_bytes": cfg.max_image_bytes, "max_prompt_chars": cfg.max_prompt_chars,
                   "max_queue": cfg.max_queue},
        "solvers": list(SOLVERS), "recipes": list(RECIPES), "loras": service.loras(),
        "loras_supported": False,
        "prompt_extend": {"enabled": backend is not None, "backend": getattr(backend, "name", None),
                          "model": getattr(backend, "model", None)},
        "auth_required": cfg.api_key is not None,
    }


def _guide(value) -> Any:
    if isinstance(value, (list, tuple)):
        low, high = value
        return low if low == high else [low, high]
    return value
