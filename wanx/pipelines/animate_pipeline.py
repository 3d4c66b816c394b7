"""`AnimatePipeline`: Animate-14B's loaded model set and its `generate()` (see :mod:`wanx.pipelines.animate`)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .animate import (AnimateInputs, SegmentCallback, bf16_round, check_animate_inputs, read_animate_folder,
                      run_segments, to_pixels)
from .pipeline import PipelineOptions, WanPipeline

log = logging.getLogger("wanx")


class AnimatePipeline(WanPipeline):
    """A loaded Animate-14B model set: text encoder, VAE, the Animate DiT and the CLIP visual tower."""

    def __init__(self, spec, text_encoder, vae, dit, clip, *, device: torch.device,
                 options: PipelineOptions | None = None, checkpoint: dict | None = None):
        super().__init__(spec, text_encoder, vae, [dit], device=device, options=options, checkpoint=checkpoint)
        self.clip = clip

    @torch.no_grad()
    def encode_reference(self, ref: np.ndarray) -> torch.Tensor:
        """CLIP features ``[1, 257, 1280]`` of the letterboxed reference image (rounded to bf16 as the official)."""
        self.clip.to(self.device)
        pixels = to_pixels(ref[None])[:, 0][None]  # [1, 3, H, W]
        return bf16_round(self.clip.encode_images(pixels.to(self.device)).float())

    def read_inputs(self, src_root=None, *, replace: bool = False, inputs: AnimateInputs | None = None
                    ) -> AnimateInputs:
        """The preprocessed folder's frames (or ``inputs`` given in memory), checked."""
        if inputs is None and src_root is None:
            raise InputError("src_root", "give {arg} (the preprocessed folder) or inputs=AnimateInputs(...)")
        if inputs is not None:
            return check_animate_inputs(inputs.ref, inputs.pose, inputs.face, inputs.bg, inputs.mask,
                                        replace=replace, face_size=self.dit_config.face_size, fps=inputs.fps)
        return read_animate_folder(src_root, replace=replace, face_size=self.dit_config.face_size)

    @torch.no_grad()
    def generate(self, prompt: str = "", negative_prompt: str | None = None, *, src_root=None,
                 inputs: AnimateInputs | None = None, replace: bool = False, refert_num: int = 1,
                 sample_steps: int | None = None, sample_shift: float | None = None, guide_scale=None,
                 sample_solver: str | None = None, seed: int = -1, callback=None,
                 on_segment: SegmentCallback | None = None, save_file=None, overwrite: bool = False):
        """Animate (``replace=False``) or replace the person (``replace=True``); returns a :class:`Video`.

        Defaults are the official ones (the config prompt, UniPC, 20 steps, shift 5, guidance 1,
        30 fps). ``refert_num`` is 1 or 5 (the official CLI's default 77 fails its own check).
        """
        from ..media import Video
        from ..request import resolve_animate_request
        from .reporting import recipe_for

        inputs = self.read_inputs(src_root, replace=replace, inputs=inputs)
        req = resolve_animate_request(
            self.facts, prompt, negative_prompt, num_frames=inputs.num_frames, video_size=inputs.size,
            replace=replace, refert_num=refert_num, sample_steps=sample_steps, sample_shift=sample_shift,
            guide_scale=guide_scale, sample_solver=sample_solver, seed=seed, save_file=save_file,
            overwrite=overwrite, source=None if src_root is None else Path(src_root).name)
        ctx, ctx_null = self.encode_prompts(req.prompt, req.negative_prompt)
        clip_fea = self.encode_reference(inputs.ref)
        dit = self.residency.activate(self.experts, 0)
        try:
            video = run_segments(dit, self.vae, self.decode, inputs, clip_fea, req, self.facts, ctx, ctx_null,
                                 self.device, callback=callback, on_segment=on_segment)
        finally:
            self.residency.leave_denoise(self.experts)
        out = Video(tensor=video, fps=self.spec.sample_fps, metadata=recipe_for(self, req))
        if req.output is not None:
            out.save(req.output, overwrite=overwrite)
        return out


def load_animate_pipeline(ckpt_dir, device=None, dtype=None, *, offload_model: bool = False,
                          t5_cpu: bool = False, convert_model_dtype: bool = False,
                          use_relighting_lora: bool = False) -> AnimatePipeline:
    """Load an official-layout Animate-14B folder (T5, VAE, CLIP, the Animate DiT at the root).

    ``use_relighting_lora`` fuses the folder's ``relighting_lora.ckpt`` into the DiT (the official
    flag of the same name; meant for replacement mode).
    """
    from ..device import dit_dtype, resolve_device, resolve_dtype
    from ..loading.animate import load_animate_dit
    from ..loading.animate_clip import CLIP_CHECKPOINT, load_clip_visual
    from ..loading.animate_lora import RELIGHTING_LORA, fuse_relighting_lora
    from ..loading.layout import _official_layout
    from ..loading.safe import CheckpointError
    from .loader import _load_text_encoder, _load_vae

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {root}")
    layout = _official_layout(root, "animate-14B")  # names every missing T5/VAE/DiT file
    need = [(CLIP_CHECKPOINT, "CLIP weights")] + ([(RELIGHTING_LORA, "relighting LoRA")] if use_relighting_lora else [])
    missing = [f"{root / name} ({what})" for name, what in need if not (root / name).is_file()]
    if missing:
        raise CheckpointError("checkpoint folder is incomplete; missing:\n  " + "\n  ".join(missing))
    options = PipelineOptions(offload_model=offload_model, t5_cpu=t5_cpu, convert_model_dtype=convert_model_dtype)
    home = torch.device("cpu") if offload_model else device
    dit = load_animate_dit(root, dtype=dit_dtype(dtype, convert_model_dtype), device=home)
    if use_relighting_lora:
        log.info("fused %d relighting LoRA layers", fuse_relighting_lora(dit, root / RELIGHTING_LORA))
    clip = load_clip_visual(root / CLIP_CHECKPOINT, dtype=dtype, device=home)
    identity = {"name": root.resolve().name, "layout": "official", "relighting_lora": use_relighting_lora}
    return AnimatePipeline(layout.spec, _load_text_encoder(layout, dtype), _load_vae(layout, device), dit, clip,
                           device=device, options=options, checkpoint=identity)
