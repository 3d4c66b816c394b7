"""One `generate()` for every task: text -> noise -> two-expert denoising -> VAE decode -> Video."""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from ..configs import NUM_TRAIN_TIMESTEPS, TaskSpec
from ..media import Video, load_image, pil_to_tensor
from ..sampling import make_sampler
from ..sampling.guidance import cfg
from . import i2v as i2v_cond
from . import ti2v as ti2v_cond

log = logging.getLogger("wanx")

SOLVERS = ("unipc", "dpm++", "euler")


@dataclass
class PipelineOptions:
    """Memory/speed options with the official meanings (plus wanx's batched CFG)."""

    offload_model: bool = False  # keep the inactive expert (and finished models) on the CPU
    t5_cpu: bool = False  # encode text on the CPU
    convert_model_dtype: bool = False  # DiT in bf16
    batch_cfg: bool = True  # cond and uncond in one forward (same numbers, one pass)
    vae_tiling: bool = False  # decode in overlapping spatial tiles (bounded memory at 720p)
    compile: bool = False  # torch.compile the DiT blocks (first step pays the compile time)


@dataclass
class GenerateRequest:
    """Fully resolved settings of one generation (every None replaced by the task default)."""

    prompt: str
    negative_prompt: str
    image: Any
    size: tuple[int, int]
    frame_num: int
    sample_steps: int
    sample_shift: float
    guide_scale: tuple[float, float]  # (low_noise, high_noise)
    boundary: float | None
    sample_solver: str
    seed: int

    def recipe(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt,
                "image": getattr(self.image, "filename", None) or (None if self.image is None else "<image>"),
                "size": f"{self.size[0]}*{self.size[1]}", "frame_num": self.frame_num,
                "sample_steps": self.sample_steps, "sample_shift": self.sample_shift,
                "sample_guide_scale": list(self.guide_scale), "boundary": self.boundary,
                "sample_solver": self.sample_solver, "seed": self.seed}


@dataclass
class StageTimer:
    """Wall time per stage, for the CLI's summary line."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, start: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _as_pair(guide_scale) -> tuple[float, float]:
    """A float or the official (low_noise, high_noise) tuple -> (low, high)."""
    if isinstance(guide_scale, (int, float)):
        return float(guide_scale), float(guide_scale)
    low, high = guide_scale
    return float(low), float(high)


class WanPipeline:
    """A loaded Wan 2.2 model set (text encoder, VAE, one or two DiT experts) for one task."""

    def __init__(self, spec: TaskSpec, text_encoder, vae, experts: Sequence[torch.nn.Module], *,
                 device: torch.device, options: PipelineOptions | None = None,
                 checkpoint: dict[str, Any] | None = None):
        vae_strides = getattr(getattr(vae, "cfg", None), "strides", None)
        if vae_strides is not None and vae_strides != spec.vae_stride:
            spec = replace(spec, vae_strides=vae_strides)  # latent grids follow the VAE actually loaded
        self.spec = spec
        self.text_encoder = text_encoder
        self.vae = vae
        self.experts = tuple(experts)  # (high_noise, low_noise) for MoE, else (model,)
        self.device = torch.device(device)
        self.options = options or PipelineOptions()
        self.checkpoint = checkpoint or {}
        if self.options.compile:
            for expert in {id(e): e for e in self.experts}.values():
                expert.compile_blocks()

    # ----------------------------------------------------------------------------------- checks
    @property
    def task(self) -> str:
        return self.spec.name

    @property
    def dit_config(self):
        return self.experts[0].cfg

    @property
    def size_multiple(self) -> int:
        """Pixel sizes must be divisible by the loaded VAE's stride x the loaded DiT's patch."""
        return self.spec.vae_stride[1] * self.dit_config.patch_size[1]

    @property
    def needs_image(self) -> bool:
        return self.dit_config.model_type == "i2v"

    @property
    def takes_image(self) -> bool:
        return self.dit_config.model_type in ("i2v", "ti2v")

    def resolve(self, prompt: str, negative_prompt=None, image=None, size=None, frame_num=None,
                sample_steps=None, sample_shift=None, guide_scale=None, boundary=None,
                sample_solver="unipc", seed=-1) -> GenerateRequest:
        """Fill defaults from the task and reject bad input before any heavy work."""
        spec = self.spec
        if not isinstance(prompt, str):
            raise TypeError("prompt must be a string")
        size = size if size is not None else spec.default_size
        if isinstance(size, str):
            from ..configs import parse_size
            size = parse_size(size)
        w, h = (int(v) for v in size)
        frame_num = spec.frame_num if frame_num is None else int(frame_num)
        if frame_num < 1 or (frame_num - 1) % 4 != 0:
            raise ValueError(f"frame_num must be 4n+1 (1, 5, 9, ..., 81, 121), got {frame_num}")
        if image is None and self.needs_image:
            raise ValueError(f"task {spec.name} needs an input image (image=...)")
        if image is not None and not self.takes_image:
            raise ValueError(f"task {spec.name} is text-to-video and takes no image")
        if image is None or self.dit_config.model_type == "ti2v":
            multiple = self.size_multiple
            if w % multiple or h % multiple or w <= 0 or h <= 0:
                raise ValueError(f"size {w}*{h} is not divisible by {multiple} (VAE stride x patch) "
                                 f"for task {spec.name}")
        if sample_solver not in SOLVERS:
            raise ValueError(f"unknown sample_solver {sample_solver!r}; choose from {', '.join(SOLVERS)}")
        steps = spec.sample_steps if sample_steps is None else int(sample_steps)
        if steps < 1:
            raise ValueError(f"sample_steps must be >= 1, got {steps}")
        boundary = spec.boundary if boundary is None else float(boundary)
        if boundary is not None and not 0.0 <= boundary <= 1.0:
            raise ValueError(f"boundary is a ratio of {NUM_TRAIN_TIMESTEPS} timesteps in [0, 1], got {boundary}")
        if isinstance(image, str) or hasattr(image, "__fspath__"):
            image = load_image(image)
        seed = int(seed) if seed is not None and int(seed) >= 0 else random.randint(0, sys.maxsize)
        negative = negative_prompt if negative_prompt else spec.negative_prompt
        return GenerateRequest(
            prompt=prompt, negative_prompt=negative, image=image, size=(w, h), frame_num=frame_num,
            sample_steps=steps, sample_shift=float(spec.sample_shift if sample_shift is None else sample_shift),
            guide_scale=_as_pair(spec.guide_scale if guide_scale is None else guide_scale),
            boundary=boundary if self.spec.is_moe or len(self.experts) > 1 else None,
            sample_solver=sample_solver, seed=seed)

    # ----------------------------------------------------------------------------------- stages
    def encode_prompts(self, prompt: str, negative: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, context_null), each [1, L_i, text_dim] on the DiT device, trimmed to true length."""
        enc = self.text_encoder
        target = torch.device("cpu") if self.options.t5_cpu else self.device
        enc.model.to(target)
        with torch.no_grad():
            # parity: the official encodes each prompt alone (batch 1): padding never changes the numbers.
            (ctx,), (ctx_null,) = enc.encode([prompt]), enc.encode([negative])
        if self.options.offload_model and not self.options.t5_cpu:
            enc.model.to("cpu")
        return ctx[None].to(self.device), ctx_null[None].to(self.device)

    def _latent_grid(self, req: GenerateRequest) -> tuple[int, int, int]:
        stride_t, stride_s = self.spec.vae_stride[0], self.spec.vae_stride[1]
        w, h = req.size
        return (req.frame_num - 1) // stride_t + 1, h // stride_s, w // stride_s

    def prepare_condition(self, req: GenerateRequest) -> dict[str, Any]:
        """Task-specific inputs: latent grid, i2v ``y``, or the ti2v first-frame latent and mask."""
        model_type = self.dit_config.model_type
        stride_s = self.spec.vae_stride[1]
        patch = self.dit_config.patch_size
        if model_type == "i2v":
            img = req.image if isinstance(req.image, torch.Tensor) else pil_to_tensor(req.image)
            lat_h, lat_w = i2v_cond.i2v_latent_size(img.shape[1], img.shape[2], req.size[0] * req.size[1],
                                                    stride_s, patch[1])
            y = i2v_cond.i2v_condition(self.vae, img, req.frame_num, lat_h, lat_w, stride_s)
            return {"grid": (y.shape[1], lat_h, lat_w), "y": y[None].to(self.device)}
        if model_type == "ti2v" and req.image is not None:
            img = ti2v_cond.prepare_ti2v_image(req.image, req.size[0] * req.size[1], self.size_multiple)
            with torch.no_grad():
                z = self.vae.encode(img[None].to(self.device))[0].float()  # [C, 1, h, w]
            t_lat = (req.frame_num - 1) // self.spec.vae_stride[0] + 1
            return {"grid": (t_lat, z.shape[2], z.shape[3]), "first_frame": z}
        return {"grid": self._latent_grid(req)}

    def initial_noise(self, req: GenerateRequest, grid: tuple[int, int, int]) -> torch.Tensor:
        """[1, C, T, h, w] fp32 noise drawn exactly as the official (Generator on the device)."""
        gen = torch.Generator(device=self.device).manual_seed(req.seed)
        channels = self.vae.cfg.z_dim
        noise = torch.randn(channels, *grid, dtype=torch.float32, device=self.device, generator=gen)
        return noise[None]

    def pick_expert(self, t: torch.Tensor, boundary: float | None) -> int:
        """Index into self.experts: 0 (high noise) while t >= boundary*1000, else 1 (low noise)."""
        if len(self.experts) == 1 or boundary is None:
            return 0
        return 0 if t.item() >= boundary * NUM_TRAIN_TIMESTEPS else 1

    def _activate(self, index: int) -> torch.nn.Module:
        """Move the active expert to the device and, when offloading, the others to the CPU."""
        model = self.experts[index]
        if self.options.offload_model and self.device.type != "cpu":
            for j, other in enumerate(self.experts):
                if j != index:
                    other.to("cpu")
        model.to(self.device)
        return model

    def predict(self, model, latent, t, ctx, ctx_null, scale: float, y=None) -> torch.Tensor:
        """Guided velocity: v_uncond + g (v_cond - v_uncond); cond/uncond batched when enabled."""
        if scale == 1.0:  # guidance is a no-op: skip the unconditional pass
            return model(latent, t, ctx, y=y).float()
        if self.options.batch_cfg:
            pad = self.dit_config.text_len
            both = torch.zeros(2, pad, ctx.shape[-1], dtype=ctx.dtype, device=ctx.device)
            both[0, : ctx.shape[1]] = ctx[0]  # parity: zero padding == the DiT's own padding
            both[1, : ctx_null.shape[1]] = ctx_null[0]
            ys = None if y is None else y.expand(2, *y.shape[1:])
            v = model(latent.expand(2, *latent.shape[1:]), t.expand(2, *t.shape[1:]), both, y=ys).float()
            v_cond, v_uncond = v[:1], v[1:]
        else:
            v_cond = model(latent, t, ctx, y=y).float()
            v_uncond = model(latent, t, ctx_null, y=y).float()
        return cfg(v_cond, v_uncond, scale)

    def denoise(self, req: GenerateRequest, cond: dict[str, Any], ctx, ctx_null,
                progress: Callable | None = None) -> torch.Tensor:
        """The sampling loop; returns the final latent [1, C, T, h, w]."""
        latent = self.initial_noise(req, cond["grid"])
        first = cond.get("first_frame")
        keep = None
        if first is not None:
            keep = ti2v_cond.first_frame_keep_mask(latent.shape[1:], device=self.device)[None]
            latent = (1.0 - keep) * first[None] + keep * latent
        sampler = make_sampler(req.sample_solver, req.sample_steps, req.sample_shift)
        per_token = self.dit_config.model_type == "ti2v"
        low, high = req.guide_scale
        for t in sampler.timesteps:
            t = t.to(self.device)
            index = self.pick_expert(t, req.boundary)
            model = self._activate(index)
            # parity: the official picks guide_scale[1] (high) iff t >= boundary, whatever the expert count.
            use_high = req.boundary is not None and t.item() >= req.boundary * NUM_TRAIN_TIMESTEPS
            scale = high if use_high else low
            if per_token:
                mask = keep[0] if keep is not None else torch.ones(latent.shape[1:], device=self.device)
                t_in = ti2v_cond.per_token_timesteps(mask, t, self.dit_config.patch_size)
            else:
                t_in = t.reshape(1)
            v = self.predict(model, latent, t_in, ctx, ctx_null, scale, y=cond.get("y"))
            latent = sampler.step(v, latent)
            if keep is not None:  # parity: the clean first frame is re-imposed after every step
                latent = (1.0 - keep) * first[None] + keep * latent
            if progress is not None:
                progress(1)
        if self.options.offload_model and self.device.type != "cpu":
            for m in self.experts:
                m.to("cpu")
        return latent

    def decode(self, latent: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """[1, C, T, h, w] latent -> [3, F, H, W] video in [-1, 1], streamed one latent frame at a time."""
        tile = True if self.options.vae_tiling else None
        bar = _progress_bar(progress, latent.shape[2], "decode")
        chunks = []
        with torch.no_grad():
            for chunk in self.vae.decode_stream(latent.float(), tile=tile):  # [1, 3, n, H, W]
                chunks.append(chunk[0].float().cpu())
                if bar:
                    bar.update(1)
        if bar:
            bar.close()
        return torch.cat(chunks, dim=1)  # [3, F, H, W]

    # ----------------------------------------------------------------------------------- main
    @torch.no_grad()
    def generate(self, prompt: str, negative_prompt: str | None = None, image=None, size=None,
                 frame_num: int | None = None, sample_steps: int | None = None,
                 sample_shift: float | None = None, guide_scale=None, boundary: float | None = None,
                 sample_solver: str = "unipc", seed: int = -1, progress: bool = False) -> Video:
        """Generate one video with the task's official recipe (None = the task default)."""
        req = self.resolve(prompt, negative_prompt, image, size, frame_num, sample_steps, sample_shift,
                           guide_scale, boundary, sample_solver, seed)
        timer = StageTimer()
        t0 = time.perf_counter()
        ctx, ctx_null = self.encode_prompts(req.prompt, req.negative_prompt)
        timer.add("text", t0)
        t0 = time.perf_counter()
        cond = self.prepare_condition(req)
        timer.add("condition", t0)
        t0 = time.perf_counter()
        bar = _progress_bar(progress, req.sample_steps, "denoise")
        latent = self.denoise(req, cond, ctx, ctx_null, progress=bar.update if bar else None)
        if bar:
            bar.close()
        timer.add("denoise", t0)
        t0 = time.perf_counter()
        video = self.decode(latent, progress=progress)
        timer.add("decode", t0)
        recipe = {"task": self.spec.name, **req.recipe(), "checkpoint": self.checkpoint,
                  "options": vars(self.options), "wanx_version": _version()}
        if isinstance(req.image, torch.Tensor):
            recipe["image"] = "<tensor>"
        out = Video(tensor=video, fps=self.spec.sample_fps, metadata=recipe)
        out.stats = {"seconds": timer.seconds, "latent_shape": list(latent.shape)}
        return out


def _progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False)


def _version() -> str:
    from .. import __version__

    return __version__
