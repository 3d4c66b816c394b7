"""Speech-to-video (S2V-14B): a reference image and speech become a talking video, clip by clip.

The official ``WanS2V.generate`` loop on wanx's parts. Each clip is ``infer_frames`` (80) frames:

- the reference image's latent and a 73-frame pixel *motion buffer* (zeros, or ending with the
  image for ``start_from_ref``), VAE-encoded to 19 motion latents, condition every clip;
- the clip's 80 audio features (one per frame) and, optionally, its pose-video latents;
- noise seeded with ``seed + clip``; guidance with the negative prompt and *zeroed audio*;
- the clip's latents are decoded behind the motion latents (behind the reference latent on the
  first clip, whose motion tokens are dropped) and the last 80 frames kept (77 on that first clip);
- those frames slide into the motion buffer, which is re-encoded for the next clip.

:class:`SpeechToVideo` is the condition (one per request); :class:`S2VPipeline` runs the clips.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..configs import S2V_MOTION_FRAMES, S2V_WAV2VEC_DIR, S2VConfig
from ..errors import GenerationError, InputError
from ..media import Mp4Writer, Video, read_audio_track, read_video_frames, to_uint8
from ..request import GenerationRequest, ModelFacts, resolve_request
from ..sampling.guidance import cfg
from ..text import TextContext
from .conditions import CONDITIONS, Condition
from .pipeline import PipelineOptions, WanPipeline
from .reporting import StageTimer, progress_bar, recipe_for

log = logging.getLogger("wanx")

FIRST_CLIP_DROP = 3  # frames cut from the first clip when its motion context is dropped (official)
START_FROM_REF_FRAMES = 6  # buffer frames set to the image with start_from_ref (official)


# ------------------------------------------------------------------------------ image and pose frames

def short_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(H, W) after resizing the shorter side to ``size`` (torchvision ``Resize(int)``)."""
    if w <= h:
        return int(size * h / w), size
    return size, int(size * w / h)


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centre crop ``[..., h, w]`` to (height, width), zero-padding a side that is too small first
    (torchvision ``CenterCrop``: padding split floor/ceil, offsets rounded half to even)."""
    h, w = x.shape[-2:]
    if height > h or width > w:
        dw, dh = max(width - w, 0), max(height - h, 0)
        x = F.pad(x, (dw // 2, (dw + 1) // 2, dh // 2, (dh + 1) // 2))
        h, w = x.shape[-2:]
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return x[..., top:top + height, left:left + width]


def reference_pixels(image, height: int, width: int) -> torch.Tensor:
    """The RGB PIL reference image -> ``[1, 3, 1, H, W]`` in [-1, 1] (official resize, crop, ToTensor)."""
    from PIL import Image

    nh, nw = short_side_size(image.height, image.width, min(height, width))
    if (nh, nw) != (image.height, image.width):
        image = image.resize((nw, nh), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (center_crop(x, height, width) * 2 - 1)[None, :, None]


def pose_pixels(frames: np.ndarray, height: int, width: int, count: int) -> torch.Tensor:
    """uint8 ``[n, h, w, 3]`` pose frames -> ``[1, 3, count, H, W]`` in [-1, 1], padded with -1 frames.

    # parity: mapped to [-1, 1] first, then resized as a tensor (bilinear, antialiased) and cropped.
    """
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0 * 2 - 1  # [n, 3, h, w]
    size = short_side_size(x.shape[2], x.shape[3], min(height, width))
    if tuple(size) != tuple(x.shape[2:]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    x = center_crop(x, height, width).permute(1, 0, 2, 3)  # [3, n, H, W]
    pad = -torch.ones(3, count - x.shape[1], height, width)
    return torch.cat([x, pad], dim=1)[None]


# ---------------------------------------------------------------------------------------- condition

class SpeechToVideo(Condition):
    """S2V: per clip the reference latent, the motion latents, the clip's audio and pose latents.

    ``audio`` (``[1, 25, C, clips * infer_frames]``, :func:`wanx.audio.speech_features`) is set by
    the pipeline before the first clip; :meth:`begin_clip` and :meth:`finish_clip` bracket each clip.
    """

    audio: torch.Tensor | None = None

    def __init__(self, req: GenerationRequest, facts: ModelFacts, device):
        super().__init__(req, facts, device)
        if req.s2v is None:
            raise ValueError("an s2v request carries its S2VInputs (resolve it with resolve_request)")
        self.inputs = req.s2v
        self.drop_first_motion = not self.inputs.start_from_ref
        self.lat_motion = (S2V_MOTION_FRAMES + 3) // 4
        self.clip, self.pose = 0, None

    @property
    def size(self) -> tuple[int, int]:
        return self.req.video_size[1], self.req.video_size[0]  # (H, W)

    @torch.no_grad()
    def prepare(self, vae) -> None:
        """Encode the reference image and the initial motion buffer."""
        h, w = self.size
        ref = reference_pixels(self.req.image, h, w).to(self.device)
        self.ref_latents = vae.encode(ref).float()  # [1, z, 1, h/8, w/8]
        self.buffer = torch.zeros(1, 3, S2V_MOTION_FRAMES, h, w, device=self.device)
        if self.inputs.start_from_ref:
            self.buffer[:, :, -START_FROM_REF_FRAMES:] = ref
        self.motion_latents = vae.encode(self.buffer).float()  # [1, z, 19, h/8, w/8]

    @torch.no_grad()
    def begin_clip(self, index: int, vae) -> None:
        self.clip = index
        self.pose = None if self.inputs.pose_path is None else self._pose_latents(index, vae)

    def _pose_latents(self, index: int, vae) -> torch.Tensor:
        """The clip's pose frames (every round(fps/16)-th from the start), its first frame repeated
        in front for the VAE, the first latent dropped: ``[1, z, T, h/8, w/8]``."""
        n, fps = self.inputs.infer_frames, self.req_fps
        interval = max(1, round(self.inputs.pose_fps / fps))
        wanted = [(index * n + i) * interval for i in range(n)]
        try:
            frames = read_video_frames(self.inputs.pose_path, wanted)
        except ValueError:  # fewer frames than the container said: take those there are
            frames = _available_frames(self.inputs.pose_path, wanted)
        pose = pose_pixels(frames, *self.size, n).to(self.device)  # [1, 3, n, H, W]
        pose = torch.cat([pose[:, :, :1], pose], dim=2)
        return vae.encode(pose).float()[:, :, 1:]

    @property
    def req_fps(self) -> int:
        return self.facts.spec.sample_fps

    def _audio(self) -> torch.Tensor:
        n = self.inputs.infer_frames
        return self.audio[..., self.clip * n:(self.clip + 1) * n].to(self.device)  # [1, 25, C, n]

    def dit_inputs(self) -> dict:
        return {"ref_latents": self.ref_latents, "motion_latents": self.motion_latents,
                "audio_input": self._audio(), "cond_states": self.pose,
                "motion_frames": (S2V_MOTION_FRAMES, self.lat_motion),
                "drop_motion_frames": self.drop_first_motion and self.clip == 0}

    @torch.no_grad()
    def finish_clip(self, latent: torch.Tensor, vae, tile: bool | None = None, last: bool = False) -> torch.Tensor:
        """Decode the clip, keep its new frames ``[1, 3, n, H, W]`` and slide them into the motion buffer."""
        dropped = self.drop_first_motion and self.clip == 0
        prefix = self.ref_latents if dropped else self.motion_latents
        frames = decode_tail(vae, torch.cat([prefix, latent.float()], dim=2), self.inputs.infer_frames, tile)
        if dropped:
            frames = frames[:, :, FIRST_CLIP_DROP:]
        if not last:  # the next clip's motion context (the official also re-encodes after the last clip)
            overlap = min(S2V_MOTION_FRAMES, frames.shape[2])
            self.buffer = torch.cat([self.buffer[:, :, overlap:], frames[:, :, -overlap:].to(self.buffer)], dim=2)
            self.motion_latents = vae.encode(self.buffer).float()
        return frames


CONDITIONS["s2v"] = SpeechToVideo


def _available_frames(path, wanted: list[int]) -> np.ndarray:
    import av

    keep = set(wanted)
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(video=0)) if i in keep]
    return np.stack(frames) if frames else np.zeros((0, 1, 1, 3), np.uint8)


def decode_tail(vae, latents: torch.Tensor, keep: int, tile: bool | None = None) -> torch.Tensor:
    """The last ``keep`` frames of ``vae.decode(latents)`` ``[1, 3, keep, H, W]``, never holding more."""
    chunks, held = [], 0
    for chunk in vae.decode_stream(latents, tile=tile):
        chunks.append(chunk)
        held += chunk.shape[2]
        while chunks and held - chunks[0].shape[2] >= keep:
            held -= chunks.pop(0).shape[2]
    return torch.cat(chunks, dim=2)[:, :, -keep:]


def s2v_velocity(model, latent: torch.Tensor, t: torch.Tensor, ctx: TextContext, ctx_null: TextContext,
                 scale: float, batch_cfg: bool, inputs: dict) -> torch.Tensor:
    """Guided velocity; the unconditional pass has the negative prompt and zeroed audio."""
    if scale <= 1.0:  # parity: the official runs the unconditional pass only when guide_scale > 1
        return model(latent, t, ctx.context, context_lens=ctx.lengths, **inputs).float()
    audio = inputs["audio_input"]
    if batch_cfg:
        both = TextContext.cat([ctx, ctx_null])
        paired = dict(inputs, audio_input=torch.cat([audio, torch.zeros_like(audio)]))
        v = model(latent.expand(2, *latent.shape[1:]), t.expand(2), both.context, context_lens=both.lengths,
                  **paired).float()
        return cfg(v[:1], v[1:], scale)
    v_cond = model(latent, t, ctx.context, context_lens=ctx.lengths, **inputs).float()
    v_null = model(latent, t, ctx_null.context, context_lens=ctx_null.lengths,
                   **dict(inputs, audio_input=torch.zeros_like(audio))).float()
    return cfg(v_cond, v_null, scale)


# ----------------------------------------------------------------------------------------- pipeline

class S2VPipeline(WanPipeline):
    """A loaded S2V-14B model set: text encoder, VAE, the S2V transformer and the wav2vec2 speech encoder."""

    def __init__(self, spec, text_encoder, vae, model, speech, **kwargs):
        super().__init__(spec, text_encoder, vae, [model], **kwargs)
        self.speech = speech  # wanx.loading.s2v_wav2vec2.SpeechEncoder

    def resolve(self, prompt: str, *args, **kwargs) -> GenerationRequest:
        kwargs.setdefault("allow_any_size", None)
        return resolve_request(self.facts, prompt, *args, **kwargs)

    @torch.no_grad()
    def generate(self, prompt: str, negative_prompt: str | None = None, image=None, audio=None, pose_video=None,
                 size=None, num_clip: int | None = None, infer_frames: int | None = None,
                 start_from_ref: bool = False, sample_steps: int | None = None, sample_shift: float | None = None,
                 guide_scale=None, sample_solver: str | None = None, seed: int = -1, *,
                 allow_any_size: bool | None = None, callback=None, progress: bool | None = None,
                 save_file=None, overwrite: bool = False) -> Video:
        """Animate ``image`` to the speech in ``audio`` (None = the task's official default for every setting).

        ``size`` is a pixel budget (the image's aspect decides the shape, multiples of 64);
        ``num_clip`` caps the clips the audio needs; ``pose_video`` drives the body.
        With ``save_file`` each clip is written as it finishes (see :meth:`run`).
        """
        req = self.resolve(prompt, negative_prompt, image, size, None, sample_steps, sample_shift, guide_scale,
                           None, sample_solver, seed, allow_any_size=allow_any_size, audio=audio,
                           pose_video=pose_video, num_clip=num_clip, infer_frames=infer_frames,
                           start_from_ref=start_from_ref)
        return self.run(req, callback=callback, progress=progress, save_file=save_file, overwrite=overwrite)

    def speech_features(self, req: GenerationRequest) -> torch.Tensor:
        """``[1, 25, C, clips * infer_frames]``: one wav2vec2 feature per video frame (fp32, official CPU numerics)."""
        from ..audio import speech_features

        feats, clips = speech_features(self.speech.model, req.s2v.samples, self.spec.sample_fps,
                                       req.s2v.infer_frames, normalize=self.speech.normalize)
        if clips < req.s2v.num_clips:
            raise GenerationError(f"the audio gives {clips} clips, the request planned {req.s2v.num_clips}")
        return feats[None]

    @torch.no_grad()
    def run(self, req: GenerationRequest, *, callback=None, progress: bool | None = None, save_file=None,
            overwrite: bool = False, cache=None) -> Video:
        """Generate every clip. Without ``save_file`` the whole video is returned (with its audio);
        with it, each clip is encoded into ``save_file`` as it finishes (earlier clips are not kept
        in memory; after a failure the finished clips stay in ``<name>.partial.mp4``) and the
        returned :class:`Video` holds only the last clip (its ``stats`` give the saved path).

        ``cache`` must be None: the step caches wrap the Wan block stack, and S2V runs its own
        (two modulation segments, audio injection between blocks).
        """
        if cache is not None:
            raise InputError("cache", "{arg}: step caches are not supported for s2v-14B yet")
        progress = sys.stderr.isatty() if progress is None else progress
        timer = StageTimer()
        with timer("text"):
            ctx, ctx_null = self.encode_prompts(req.prompt, req.negative_prompt)
        with timer("audio"):
            features = self.speech_features(req)
            track = read_audio_track(req.s2v.audio_path)
        with timer("condition"):
            condition = self.prepare_condition(req)
            condition.audio = features
        metadata = recipe_for(self, req)
        writer = None if save_file is None else Mp4Writer(save_file, self.spec.sample_fps, metadata=metadata,
                                                          audio=track, overwrite=overwrite)
        clips = self._clips(req, condition, ctx, ctx_null, timer, callback, progress, writer)
        frames = writer.frames_written if writer is not None else sum(c.shape[2] for c in clips)
        stats = {"seconds": timer.seconds, "clips": req.s2v.num_clips, "frames": frames}
        if writer is not None:
            stats["path"] = str(writer.close())
        video = Video(tensor=torch.cat(clips, dim=2)[0], fps=self.spec.sample_fps, metadata=metadata, audio=track)
        video.stats = stats
        return video

    def _clips(self, req, condition, ctx, ctx_null, timer, callback, progress, writer) -> list[torch.Tensor]:
        """Run every clip; frames go to ``writer`` as they come (only the last clip is kept then)."""
        plan, n = self.plan(req), req.s2v.num_clips
        kept: list[torch.Tensor] = []
        try:
            with progress_bar(progress, n * len(plan), "denoise") as bar:
                for r in range(n):
                    with timer("condition"):
                        condition.begin_clip(r, self.vae)
                    with timer("denoise"):
                        latent = self._denoise_clip(req, plan, r, condition, ctx, ctx_null, bar.chain(callback))
                    with timer("decode"):
                        frames = condition.finish_clip(latent, self.vae, tile=self.options.vae_tiling or None,
                                                       last=r == n - 1).cpu()  # [1, 3, n, H, W]
                    if writer is not None:
                        writer.write(to_uint8(frames[0]))
                        kept = [frames]
                    else:
                        kept.append(frames)
        except BaseException as e:
            if writer is not None:
                partial = writer.abort(e)
                if partial is not None:
                    log.warning("generation stopped; the finished clips are in %s", partial)
            raise
        return kept

    def _denoise_clip(self, req, plan, index: int, condition, ctx, ctx_null, on_step) -> torch.Tensor:
        """One clip's sampling loop from noise seeded with ``seed + index``."""
        noise = self.clip_noise(req, index)
        sampler, latent = plan.make_sampler(), condition.start(noise)
        steps = len(plan)
        try:
            for step in plan:
                model = self.residency.activate(self.experts, step.expert)
                t = condition.timestep(step.timestep.to(self.device), latent)
                v = s2v_velocity(model, latent, t, ctx, ctx_null, step.guide_scale, self.options.batch_cfg,
                                 condition.dit_inputs())
                latent = condition.after_step(sampler.step(v, latent))
                on_step(index * steps + step.index + 1, req.s2v.num_clips * steps, step)
        finally:
            self.residency.leave_denoise(self.experts)
        if not torch.isfinite(latent).all():
            raise GenerationError(f"the sampler produced NaN/inf values in clip {index}; try float32 (--dtype float32)")
        return latent

    def clip_noise(self, req: GenerationRequest, index: int) -> torch.Tensor:
        """``[1, z, T, h, w]`` fp32 noise of clip ``index``, drawn as the official: seed + index, DiT dtype."""
        gen = torch.Generator(device=self.device).manual_seed((req.seed + index) % 2**64)
        # parity: the official draws S2V noise in its param dtype (bf16 under --convert_model_dtype).
        noise = torch.randn(self.vae.cfg.z_dim, *req.latent_grid, dtype=self.experts[0].dtype, device=self.device,
                            generator=gen)
        return noise.float()[None]


# ------------------------------------------------------------------------------------------- loading

def describe_s2v_checkpoint(ckpt_dir) -> tuple:
    """(layout, facts) of an official S2V-14B folder, from its config files only (nothing heavy read).

    The task table keeps s2v-14B marked not runnable until the CLI routes it here, so the layout is
    read directly rather than through ``find_checkpoint`` (which refuses such tasks).
    """
    from ..loading.layout import _official_layout, _require
    from ..loading.s2v import read_s2v_config
    from ..loading.safe import CheckpointError

    root = Path(ckpt_dir)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {root}")
    layout = _official_layout(root, "s2v-14B")
    _require([(root / S2V_WAV2VEC_DIR / "config.json", "wav2vec2 speech encoder")])
    cfg: S2VConfig = read_s2v_config(root)
    spec = replace(layout.spec, dit=cfg)
    return replace(layout, spec=spec), ModelFacts(spec=spec, dit=cfg, num_experts=1)


def is_s2v_checkpoint(ckpt_dir) -> bool:
    """Whether ``ckpt_dir`` holds an official S2V folder (its config.json names ``WanModel_S2V`` / model_type s2v)."""
    import json

    path = Path(ckpt_dir) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and (data.get("_class_name") == "WanModel_S2V" or data.get("model_type") == "s2v")


def load_s2v_pipeline(ckpt_dir, device=None, dtype=None, *, offload_model: bool = False, t5_cpu: bool = False,
                      convert_model_dtype: bool = False, batch_cfg: bool = True, vae_tiling: bool = False,
                      quantize: str | None = None, t5_quantize: str | None = None) -> S2VPipeline:
    """Load an official S2V-14B folder (umT5, VAE, the S2V transformer, wav2vec2) into an :class:`S2VPipeline`.

    ``dtype`` is the transformer's and text encoder's compute dtype (float32 on CPU, bfloat16 on
    CUDA by default); wav2vec2 runs in float32, as the official. ``quantize`` / ``t5_quantize``
    ("int8", "fp8") quantize the transformer's / umT5's block Linears after loading.
    """
    from ..device import dit_dtype, resolve_device, resolve_dtype
    from ..loading.s2v import load_s2v
    from ..loading.s2v_wav2vec2 import load_wav2vec2
    from .loader import _load_text_encoder, _load_vae, checkpoint_identity

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    layout, facts = describe_s2v_checkpoint(ckpt_dir)
    options = PipelineOptions(offload_model=offload_model, t5_cpu=t5_cpu, convert_model_dtype=convert_model_dtype,
                              batch_cfg=batch_cfg, vae_tiling=vae_tiling)
    text_encoder = _load_text_encoder(layout, dtype, t5_quantize)
    vae = _load_vae(layout, device)
    home = torch.device("cpu") if offload_model else device
    model = load_s2v(layout.root, config=facts.dit, dtype=dit_dtype(dtype, convert_model_dtype), device=home)
    if quantize is not None:
        from ..quant import quantize_model_

        quantize_model_(model, quantize)
    # fp32 always (the official runs it on the CPU in fp32); on the CPU too when offloading.
    speech = load_wav2vec2(layout.root / S2V_WAV2VEC_DIR, device=home)
    log.info("loaded s2v-14B from %s on %s", layout.root, device)
    return S2VPipeline(layout.spec, text_encoder, vae, model, speech, device=device, options=options,
                       checkpoint=checkpoint_identity(layout))
