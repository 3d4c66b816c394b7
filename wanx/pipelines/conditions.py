"""What each task adds to the denoising loop, behind one interface (no `if model_type` in the loop).

A condition is made per request. ``prepare`` encodes whatever the task conditions on (the i2v
image channels, the ti2v first frame); then the loop asks it for the starting latent, the
timestep tensor the DiT sees, the extra DiT inputs, and what to do after each step.
S2V's (clip by clip, :mod:`.s2v`) and Animate's (segment by segment, :mod:`.animate`) classes live
in their own modules, which register themselves in :data:`CONDITIONS` (imported late: they
subclass :class:`Condition`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..images import pil_to_tensor
from ..request import GenerationRequest, ModelFacts
from .i2v import i2v_condition
from .ti2v import first_frame_keep_mask, per_token_timesteps, prepare_ti2v_image


class Condition:
    """Text only (T2V-A14B): noise in, the step's timestep for every token, no extra inputs."""

    def __init__(self, req: GenerationRequest, facts: ModelFacts, device: torch.device):
        self.req, self.facts, self.device = req, facts, torch.device(device)
        self.patch_size = tuple(facts.dit.patch_size)

    def prepare(self, vae) -> None:
        """Encode the task's inputs with the VAE (nothing for text-to-video)."""

    def start(self, noise: torch.Tensor) -> torch.Tensor:
        """The latent the first step starts from, given the seeded noise ``[1, C, T, h, w]``."""
        return noise

    def timestep(self, t: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """What the DiT receives as ``t``: one value per sample here."""
        return t.reshape(1)

    def dit_inputs(self) -> dict[str, Any]:
        """Extra keyword inputs of the DiT (``y`` for i2v)."""
        return {}

    def after_step(self, latent: torch.Tensor) -> torch.Tensor:
        return latent


class ImageToVideo(Condition):
    """I2V-A14B: the image as first frame, VAE-encoded with zeros after it, plus a 4-channel mask as ``y``."""

    def prepare(self, vae) -> None:
        image = self.req.image
        img = image if isinstance(image, torch.Tensor) else pil_to_tensor(image)
        _, lat_h, lat_w = self.req.latent_grid
        stride = self.facts.spec.vae_stride[1]
        self.y = i2v_condition(vae, img, self.req.frame_num, lat_h, lat_w, stride)[None].to(self.device)

    def dit_inputs(self) -> dict[str, Any]:
        return {"y": self.y}


class TextImageToVideo(Condition):
    """TI2V-5B: per-token timesteps; with an image, its latent is frame 0 at t = 0, re-imposed every step."""

    first = keep = None

    def prepare(self, vae) -> None:
        if self.req.image is None:
            return
        w, h = self.req.size
        img = prepare_ti2v_image(self.req.image, w * h, self.facts.size_multiple)
        with torch.no_grad():
            self.first = vae.encode(img[None].to(self.device))[0].float()  # [C, 1, h, w]
        if tuple(self.first.shape[2:]) != tuple(self.req.latent_grid[1:]):
            raise RuntimeError(f"ti2v image latent {tuple(self.first.shape[2:])} does not match the "
                               f"planned grid {self.req.latent_grid[1:]}")

    def start(self, noise: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            return noise
        self.keep = first_frame_keep_mask(noise.shape[1:], device=self.device)[None]
        return self.after_step(noise)

    def timestep(self, t: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        mask = self.keep[0] if self.keep is not None else torch.ones(latent.shape[1:], device=self.device)
        return per_token_timesteps(mask, t, self.patch_size)

    def after_step(self, latent: torch.Tensor) -> torch.Tensor:
        if self.keep is None:
            return latent
        # parity: the clean first frame is re-imposed after every step (and before the first).
        return (1.0 - self.keep) * self.first[None] + self.keep * latent


CONDITIONS: dict[str, type[Condition]] = {"t2v": Condition, "i2v": ImageToVideo, "ti2v": TextImageToVideo}


def make_condition(req: GenerationRequest, facts: ModelFacts, device) -> Condition:
    """The condition of the checkpoint's DiT model type, for one request."""
    if facts.model_type == "animate" and "animate" not in CONDITIONS:
        from . import animate  # noqa: F401  (registers AnimateCondition)
    if facts.model_type == "s2v" and "s2v" not in CONDITIONS:
        from . import s2v  # noqa: F401  (registers SpeechToVideo)
    try:
        cls = CONDITIONS[facts.model_type]
    except KeyError:
        raise ValueError(f"no condition for model type {facts.model_type!r}; known: {', '.join(CONDITIONS)}") from None
    return cls(req, facts, device)

