"""`WanPipeline`: one loaded model set and the one `generate()` every task and front end shares.

One generation flows one way: arguments -> :func:`wanx.request.resolve_request` (checked, before
any work) -> prompts encoded to a :class:`TextContext` -> the task's condition prepared ->
a :class:`SamplingPlan` executed by :func:`run_plan` under the residency policy -> VAE decode ->
:class:`Video` with the recipe.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from ..configs import TaskSpec
from ..media import Video
from ..request import GenerationRequest, ModelFacts, resolve_request
from ..residency import WholeModelOffload
from ..sampling.plan import SamplingPlan, build_plan
from ..text import TextContext
from .conditions import Condition, make_condition
from .denoise import StepCallback, run_plan
from .reporting import StageTimer, progress_bar, recipe_for, warn_unknown_words

@dataclass
class PipelineOptions:
    """Memory/speed options with the official meanings (plus wanx's batched CFG)."""

    offload_model: bool = False  # keep the inactive expert (and finished models) on the CPU
    t5_cpu: bool = False  # encode text on the CPU
    convert_model_dtype: bool = False  # DiT in bf16
    batch_cfg: bool = True  # cond and uncond in one forward (same numbers, one pass)
    vae_tiling: bool = False  # decode in overlapping spatial tiles (bounded memory at 720p)
    compile: bool = False  # torch.compile the DiT blocks (first step pays the compile time)


class WanPipeline:
    """A loaded Wan 2.2 model set (text encoder, VAE, one or two DiT experts) for one task."""

    def __init__(self, spec: TaskSpec, text_encoder, vae, experts: Sequence[torch.nn.Module], *,
                 device: torch.device, options: PipelineOptions | None = None,
                 checkpoint: dict[str, Any] | None = None, residency=None):
        vae_strides = getattr(getattr(vae, "cfg", None), "strides", None)
        if vae_strides is not None and vae_strides != spec.vae_stride:
            spec = replace(spec, vae_strides=vae_strides)  # latent grids follow the VAE actually loaded
        self.spec, self.text_encoder, self.vae = spec, text_encoder, vae
        self.experts = tuple(experts)  # (high_noise, low_noise) for MoE, else (model,)
        self.device = torch.device(device)
        self.options = options or PipelineOptions()
        self.checkpoint = checkpoint or {}
        self.residency = residency or WholeModelOffload(self.device, offload_model=self.options.offload_model,
                                                        t5_cpu=self.options.t5_cpu)
        from ..lora import LoraStack

        self._loras = LoraStack(self.experts)  # applied from outside; nothing until load_lora
        if self.options.compile:
            for expert in {id(e): e for e in self.experts}.values():
                expert.compile_blocks()

    def load_lora(self, path, strength=1.0, expert: str = "both", mode: str = "fuse", strict: bool = True):
        """Apply a LoRA file (any format) to ``expert`` "both" | "high" | "low"; returns what it patched."""
        return self._loras.load(path, strength=strength, expert=expert, mode=mode, strict=strict)

    def unload_loras(self) -> None:
        """Every LoRA off; the weights are back bit for bit."""
        self._loras.unload_all()

    @property
    def loras(self):
        return self._loras.applied

    @property
    def task(self) -> str:
        return self.spec.name

    @property
    def dit_config(self):
        return self.experts[0].cfg

    @property
    def facts(self) -> ModelFacts:
        return ModelFacts(spec=self.spec, dit=self.dit_config, num_experts=len(self.experts))

    def resolve(self, prompt: str, *args, **kwargs) -> GenerationRequest:
        """:func:`wanx.request.resolve_request` for this checkpoint (same arguments as :meth:`generate`)."""
        kwargs.setdefault("allow_any_size", None)  # the API warns about unofficial sizes
        return resolve_request(self.facts, prompt, *args, **kwargs)

    def encode_prompts(self, prompt: str, negative: str) -> tuple[TextContext, TextContext]:
        """(context, context_null) on the DiT's device; unknown words in what the user typed are warned about."""
        warn_unknown_words(self.text_encoder.tokenizer, (prompt, negative), skip=self.spec.negative_prompt)
        self.residency.enter_text(self.text_encoder.model)
        with torch.no_grad():
            ctx, ctx_null = self.text_encoder.context(prompt), self.text_encoder.context(negative)
        self.residency.leave_text(self.text_encoder.model)
        return ctx.to(self.device), ctx_null.to(self.device)

    def prepare_condition(self, req: GenerationRequest) -> Condition:
        condition = make_condition(req, self.facts, self.device)
        condition.prepare(self.vae)
        return condition

    def initial_noise(self, req: GenerationRequest, grid: tuple[int, int, int]) -> torch.Tensor:
        """[1, C, T, h, w] fp32 noise drawn exactly as the official (Generator on the device)."""
        gen = torch.Generator(device=self.device).manual_seed(req.seed)
        noise = torch.randn(self.vae.cfg.z_dim, *grid, dtype=torch.float32, device=self.device, generator=gen)
        return noise[None]

    def plan(self, req: GenerationRequest) -> SamplingPlan:
        return build_plan(req.sample_solver, req.sample_steps, req.sample_shift, req.guide_scale,
                          req.boundary, len(self.experts), timesteps=req.timesteps,
                          boundary_step=req.boundary_step, cfg_first_steps=req.cfg_first_steps,
                          cfg_first_scale=req.cfg_first_scale)

    def decode(self, latent: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """[1, C, T, h, w] latent -> [3, F, H, W] video in [-1, 1], streamed one latent frame at a time."""
        tile = True if self.options.vae_tiling else None
        with torch.no_grad(), progress_bar(progress, latent.shape[2], "decode") as bar:
            chunks = [bar.tick(chunk[0].float().cpu()) for chunk in self.vae.decode_stream(latent.float(), tile=tile)]
        return torch.cat(chunks, dim=1)  # [3, F, H, W]

    @torch.no_grad()
    def generate(self, prompt: str, negative_prompt: str | None = None, image=None, size=None,
                 frame_num: int | None = None, sample_steps: int | None = None, sample_shift: float | None = None,
                 guide_scale=None, boundary: float | None = None, sample_solver: str | None = None, seed: int = -1,
                 *, allow_any_size: bool | None = None, callback: StepCallback | None = None,
                 progress: bool | None = None, cache=None, **schedule) -> Video:
        """Generate one video with the task's official recipe (None = the task default).

        A size outside the task's official list is warned about (``allow_any_size=False``
        refuses it, as the CLI does; True accepts it silently). ``schedule``: ``recipe="lightning"``
        (the 4-step distilled preset), ``timesteps=[...]``, ``boundary_step=k``,
        ``cfg_first_steps=k`` / ``cfg_first_scale=g`` (see :func:`wanx.request.resolve_request`).
        ``cache``: a step cache, e.g. ``"magcache"`` or ``"magcache:0.08"`` (:func:`wanx.cache.resolve_cache`).
        ``callback(step, total, plan_step)`` runs after each step and may raise
        :class:`wanx.Cancelled`; ``progress`` (default: when stderr is a terminal) shows bars.
        """
        req = self.resolve(prompt, negative_prompt, image, size, frame_num, sample_steps, sample_shift,
                           guide_scale, boundary, sample_solver, seed, allow_any_size=allow_any_size, **schedule)
        from ..cache import resolve_cache

        cache = resolve_cache(cache, self.facts, image=req.image is not None)
        return self.run(req, callback=callback, progress=progress, cache=cache)

    @torch.no_grad()
    def run(self, req: GenerationRequest, *, callback: StepCallback | None = None,
            progress: bool | None = None, cache=None) -> Video:
        """Execute a request resolved for this checkpoint (see :meth:`generate`)."""
        progress = sys.stderr.isatty() if progress is None else progress
        timer = StageTimer()
        with timer("text"):
            ctx, ctx_null = self.encode_prompts(req.prompt, req.negative_prompt)
        with timer("condition"):
            condition = self.prepare_condition(req)
        plan = self.plan(req)
        with timer("denoise"), progress_bar(progress, len(plan), "denoise") as bar:
            latent = run_plan(plan, self.initial_noise(req, req.latent_grid), condition, self.experts,
                              self.residency, ctx, ctx_null, batch_cfg=self.options.batch_cfg,
                              callback=bar.chain(callback), before_step=self._loras.step_switch(plan), cache=cache)
        with timer("decode"):
            video = self.decode(latent, progress=progress)
        out = Video(tensor=video, fps=self.spec.sample_fps, metadata=recipe_for(self, req, cache))
        out.stats = {"seconds": timer.seconds, "latent_shape": list(latent.shape),
                     "cache": None if cache is None else cache.last_stats}
        return out
