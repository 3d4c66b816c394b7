"""Animate-14B: make the reference character perform the driving video (animation), or put it in the
video in place of the person (replacement), segment by segment, as the official ``WanAnimate.generate``.

Inputs are the five files of the official preprocessing (``src_ref.png``, ``src_pose.mp4``,
``src_face.mp4`` and, for replacement, ``src_bg.mp4`` and ``src_mask.mp4``) or the same frames in
memory. The driving video is padded by ping-pong reflection to whole ``clip_len``-frame segments
that overlap by ``refert_num`` frames; each segment after the first is guided by the last
``refert_num`` frames the previous one produced. Axis letters: F pixel frames, T latent frames.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..request import GenerationRequest, ModelFacts
from ..sampling.guidance import cfg
from ..sampling.plan import build_plan
from .conditions import CONDITIONS, Condition

log = logging.getLogger("wanx")

SOURCE_FILES = {"ref": "src_ref.png", "pose": "src_pose.mp4", "face": "src_face.mp4",
                "bg": "src_bg.mp4", "mask": "src_mask.mp4"}
MASK_CHANNELS = 4  # latent frame t's mask channels mark pixel frames 4t-3 .. 4t (frame 0 repeated)

# ------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class AnimateInputs:
    """Decoded driving inputs, checked for agreement. uint8 RGB frames; the mask as float in [0, 1]."""

    ref: np.ndarray  # [H, W, 3], already letterboxed to the pose size
    pose: np.ndarray  # [F, H, W, 3] skeleton drawings
    face: np.ndarray  # [F, S, S, 3] face crops
    bg: np.ndarray | None = None  # [F, H, W, 3] replacement: the video with the person removed
    mask: np.ndarray | None = None  # [F, H, W] replacement: 1 where the person is
    fps: float | None = None  # of the pose video (the preprocessing's --fps)

    @property
    def num_frames(self) -> int:
        return int(self.pose.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(W, H) of the pose video, which is the output's."""
        return int(self.pose.shape[2]), int(self.pose.shape[1])


def letterbox(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Fit ``image [h, w, 3]`` uint8 inside ``height x width`` keeping its aspect, centred on black.

    As the official ``padding_resize``: the scaled side is truncated (``int``), the offset too.
    # parity: the official resizes with cv2 INTER_LINEAR; this is the same half-pixel bilinear in
    # float (no antialias), rounded, so pixels can differ from cv2's fixed-point result by 1 level.
    """
    h, w = image.shape[:2]
    if h / w > height / width:
        new_h, new_w = height, int(height / h * w)
    else:
        new_h, new_w = int(width / w * h), width
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    resized = F.interpolate(t, size=(new_h, new_w), mode="bilinear", align_corners=False)
    resized = resized.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    out = np.zeros((height, width, 3), dtype=np.uint8)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out[top:top + new_h, left:left + new_w] = resized
    return out


def check_animate_inputs(ref: np.ndarray, pose: np.ndarray, face: np.ndarray, bg: np.ndarray | None = None,
                         mask: np.ndarray | None = None, *, replace: bool, face_size: int,
                         fps: float | None = None) -> AnimateInputs:
    """Check shapes and lengths (naming what was found) and letterbox the reference to the pose size."""
    for name, video in (("pose", pose), ("face", face), ("bg", bg)):
        if video is not None and (video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] == 0):
            raise InputError(name, f"{{arg}} video must be RGB frames [F, H, W, 3], got shape {tuple(video.shape)}")
    if ref.ndim != 3 or ref.shape[-1] != 3:
        raise InputError("ref", f"{{arg}} image must be RGB [H, W, 3], got shape {tuple(ref.shape)}")
    if tuple(face.shape[1:3]) != (face_size, face_size):
        raise InputError("face", f"{{arg}} video frames are {face.shape[2]}x{face.shape[1]}; the face encoder "
                                 f"takes {face_size}x{face_size} crops")
    lengths = {"pose": len(pose), "face": len(face)}
    if replace:
        if bg is None or mask is None:
            missing = [n for n, v in (("bg", bg), ("mask", mask)) if v is None]
            raise InputError(missing[0], "replacement needs the background and mask videos; missing: "
                                         + ", ".join(missing))
        if mask.ndim == 4:
            mask = mask[..., 0]  # the official reads channel 0 of the mask video
        sizes = {"pose": pose.shape[1:3], "bg": bg.shape[1:3], "mask": mask.shape[1:3]}
        if len({tuple(s) for s in sizes.values()}) > 1:
            found = ", ".join(f"{n} {s[1]}x{s[0]}" for n, s in sizes.items())
            raise InputError("bg", f"the pose, background and mask videos must have one size; found {found}")
        lengths.update(bg=len(bg), mask=len(mask))
        mask = mask.astype(np.float32) / 255.0 if mask.dtype == np.uint8 else mask.astype(np.float32)
    if len(set(lengths.values())) > 1:
        found = ", ".join(f"{n} {k}" for n, k in lengths.items())
        raise InputError("face", f"the driving videos must have the same number of frames; found {found}")
    ref = letterbox(ref, pose.shape[1], pose.shape[2])
    return AnimateInputs(ref=ref, pose=pose, face=face, bg=bg if replace else None,
                         mask=mask if replace else None, fps=fps)


def read_animate_folder(src_root: str | Path, *, replace: bool, face_size: int = 512) -> AnimateInputs:
    """Read the official preprocessing's folder; a missing file is named."""
    from ..images import read_image
    from ..media import read_mp4

    root = Path(src_root)
    if not root.is_dir():
        raise InputError("src_root", f"{{arg}} {root} is not a folder")
    names = ("ref", "pose", "face") + (("bg", "mask") if replace else ())
    missing = [SOURCE_FILES[n] for n in names if not (root / SOURCE_FILES[n]).is_file()]
    if missing:
        mode = "replacement" if replace else "animation"
        raise InputError("src_root", f"{{arg}} {root} lacks {', '.join(missing)} (needed for {mode}; the "
                                     f"preprocessing writes them)")
    ref = np.asarray(read_image(str(root / SOURCE_FILES["ref"])).image.convert("RGB"))
    videos = {n: read_mp4(root / SOURCE_FILES[n])[:2] for n in names[1:]}
    return check_animate_inputs(ref, videos["pose"][0], videos["face"][0],
                                videos["bg"][0] if replace else None, videos["mask"][0] if replace else None,
                                replace=replace, face_size=face_size, fps=videos["pose"][1] or None)


# ------------------------------------------------------------------------------------ segments

def pingpong_indices(num_frames: int, target: int) -> list[int]:
    """Frame indices 0, 1, .., n-1, n-2, .., 0, 1, .. (ends not repeated) up to ``target`` (official ``inputs_padding``)."""
    if num_frames == 1:
        return [0] * target
    period = 2 * (num_frames - 1)
    return [i if i < num_frames else period - i for i in (j % period for j in range(target))]


def segment_starts(padded_frames: int, clip_len: int, refert_num: int) -> list[int]:
    """First frame of each segment (the official loop runs while ``start + refert_num < padded``)."""
    return list(range(0, padded_frames - refert_num, clip_len - refert_num))


def bf16_round(x: torch.Tensor) -> torch.Tensor:
    """Round to bfloat16 and back to float32.

    # parity: the official casts every input (pixels, masks, previous frames), the condition
    # latents ``y`` and the CLIP features to bfloat16 before use, whatever the run's precision.
    """
    return x.to(torch.bfloat16).float()


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[F, H, W, 3]`` -> ``[3, F, H, W]`` in [-1, 1] (x / 127.5 - 1 in float64, then bf16 as the official)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).double() / 127.5 - 1
    return bf16_round(x.permute(3, 0, 1, 2))


def fold_mask(known: torch.Tensor) -> torch.Tensor:
    """Per-pixel-frame mask ``[F, h, w]`` (1 = known) -> ``[4, T, h, w]``, frame 0 repeated 4x (official ``get_i2v_mask``)."""
    known = torch.cat([known[:1].repeat(MASK_CHANNELS, 1, 1), known[1:]])  # [F + 3, h, w]
    return known.view(-1, MASK_CHANNELS, *known.shape[1:]).transpose(0, 1)  # [4, T, h, w]


# ------------------------------------------------------------------------------------ condition

class AnimateCondition(Condition):
    """Animate-14B's condition, one segment at a time: :meth:`begin_segment` then :meth:`prepare`.

    The DiT input is ``[noise | y]``: latent frame 0 is the reference image (mask all ones), frames
    1.. are the temporal guidance (previous frames, then zeros or the background) with the mask
    marking which pixel frames are known. The pose latent, the CLIP features of the reference and
    the face motion tokens are the other DiT inputs; the unconditional pass sees faces of -1.
    """

    def __init__(self, req: GenerationRequest, facts: ModelFacts, device: torch.device):
        super().__init__(req, facts, device)
        if req.animate is None:
            raise ValueError("an Animate condition needs a request from resolve_animate_request")
        self.settings = req.animate
        self.inputs: AnimateInputs | None = None
        self.start_frame, self.previous = 0, None

    def attach(self, inputs: AnimateInputs, dit, clip_fea: torch.Tensor) -> None:
        """The request's inputs, the DiT (for its face encoder) and the reference's CLIP features."""
        self.inputs, self.dit, self.clip_fea = inputs, dit, clip_fea.to(self.device)
        self.frame_ids = np.asarray(pingpong_indices(inputs.num_frames, self.settings.padded_frames))

    def begin_segment(self, start: int, previous: torch.Tensor | None) -> None:
        """Segment starting at padded frame ``start``; ``previous [3, refert_num, H, W]``: the frames
        the last segment ended with (None for the first)."""
        self.start_frame, self.previous = start, previous

    @torch.no_grad()
    def prepare(self, vae) -> None:
        s, inputs = self.settings, self.inputs
        frames = self.frame_ids[self.start_frame:self.start_frame + s.clip_len]
        encode = lambda video: vae.encode(video[None].to(self.device))[0].float()  # noqa: E731 [16, T, h, w]
        self.pose_latents = encode(to_pixels(inputs.pose[frames]))[None]  # [1, 16, T, h, w]
        ref = encode(to_pixels(inputs.ref[None]))  # [16, 1, h, w]
        y_ref = torch.cat([torch.ones(MASK_CHANNELS, *ref.shape[1:], device=ref.device), ref])
        y = torch.cat([y_ref, self._temporal_guidance(encode, frames)], dim=1)  # [20, T + 1, h, w]
        self.y = bf16_round(y)[None]
        face = to_pixels(inputs.face[frames])[None].to(self.device)  # [1, 3, F, S, S]
        self.motion = self.dit.encode_face(face)
        # parity: faces of -1 on the unconditional pass, which runs only when some step guides (g > 1).
        guides = max(self.req.guide_scale) > 1
        self.motion_null = self.dit.encode_face(torch.full_like(face, -1.0)) if guides else None

    def _temporal_guidance(self, encode, frames: np.ndarray) -> torch.Tensor:
        """``[4 + 16, T, h, w]``: which pixel frames are known, and the latent of the guidance video."""
        s, inputs = self.settings, self.inputs
        n = 0 if self.previous is None else s.refert_num
        w, h = inputs.size
        stride = self.facts.spec.vae_stride[1]
        if s.replace:
            video = to_pixels(inputs.bg[frames])  # [3, F, H, W]
            person = bf16_round(torch.from_numpy(inputs.mask[frames]))  # [F, H, W]
            # parity: 1 - mask rounded to bf16, nearest-downsampled to the latent grid.
            known = F.interpolate(bf16_round(1 - person)[:, None], size=(h // stride, w // stride),
                                  mode="nearest")[:, 0]  # [F, h, w]
        else:
            video = torch.zeros(3, s.clip_len, h, w)
            known = torch.zeros(s.clip_len, h // stride, w // stride)
        if n:
            # The official bicubic resize of these frames is to their own size: an exact identity.
            video = torch.cat([self.previous[:, :n].float().cpu(), video[:, n:]], dim=1)
            known[:n] = 1
        return torch.cat([fold_mask(known).to(self.device), encode(video)])  # [20, T, h, w]

    def dit_inputs(self) -> dict[str, Any]:
        return {"clip_fea": self.clip_fea, "y": self.y, "pose_latents": self.pose_latents, "motion_vec": self.motion}

    def uncond_inputs(self) -> dict[str, Any]:
        """The unconditional pass's inputs: the same, but the motion tokens of an all -1 face video."""
        return {**self.dit_inputs(), "motion_vec": self.motion_null}


CONDITIONS["animate"] = AnimateCondition


# ------------------------------------------------------------------------------------ denoising

SegmentCallback = Callable[[int, torch.Tensor], None]


def denoise_segment(plan, noise: torch.Tensor, cond: AnimateCondition, model, ctx, ctx_null,
                    callback=None) -> torch.Tensor:
    """One segment's sampling loop, from ``noise [1, 16, T + 1, h, w]``; returns the final latent."""
    sampler = plan.make_sampler()
    latent = cond.start(noise)
    for step in plan:
        t = cond.timestep(step.timestep.to(latent.device), latent)
        v = model(latent, t, ctx.context, context_lens=ctx.lengths, **cond.dit_inputs()).float()
        # parity: the official runs the unconditional pass only for g > 1 (not for g < 1).
        if step.guide_scale > 1:
            v_null = model(latent, t, ctx_null.context, context_lens=ctx_null.lengths, **cond.uncond_inputs())
            v = cfg(v, v_null.float(), step.guide_scale)
        latent = cond.after_step(sampler.step(v, latent))
        if callback is not None:
            callback(step.index + 1, len(plan), step)
    return latent


def run_segments(dit, vae, decode, inputs: AnimateInputs, clip_fea: torch.Tensor, req: GenerationRequest,
                 facts: ModelFacts, ctx, ctx_null, device, *, callback=None,
                 on_segment: SegmentCallback | None = None) -> torch.Tensor:
    """Every segment in order; returns the video ``[3, F, H, W]`` in [-1, 1] with the driving video's F.

    ``decode(latent [1, 16, T, h, w]) -> [3, 4(T-1)+1, H, W]``. ``on_segment(k, frames)`` gets each
    segment's new frames as soon as they are decoded (the last may run past F: padding).
    """
    s = req.animate
    cond = AnimateCondition(req, facts, device)
    cond.attach(inputs, dit, clip_fea)
    plan = build_plan(req.sample_solver, req.sample_steps, req.sample_shift, req.guide_scale, None, 1)
    # parity: one generator for the whole video, drawn from segment after segment.
    gen = torch.Generator(device=device).manual_seed(req.seed)
    previous, outs = None, []
    for k, start in enumerate(segment_starts(s.padded_frames, s.clip_len, s.refert_num)):
        cond.begin_segment(start, previous)
        cond.prepare(vae)
        noise = torch.randn(facts.dit.latent_dim, *req.latent_grid, dtype=torch.float32, device=device,
                            generator=gen)[None]
        latent = denoise_segment(plan, noise, cond, dit, ctx, ctx_null, callback)
        frames = decode(latent[:, :, 1:])  # drop the reference frame -> [3, clip_len, H, W]
        previous = bf16_round(frames[:, -s.refert_num:])
        frames = frames if k == 0 else frames[:, s.refert_num:]  # the overlap was the guidance
        outs.append(frames)
        if on_segment is not None:
            on_segment(k, frames)
    return torch.cat(outs, dim=1)[:, :s.num_frames]
