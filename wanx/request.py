"""The one resolver: user arguments + a checkpoint's configs -> a frozen, checked `GenerationRequest`.

Every entry point (the CLI, ``WanPipeline.generate``, later the server and batch runner) calls
:func:`resolve_request`. It reads only configs (through :class:`ModelFacts`), never weights, so
every mistake below is reported in well under a second, before anything heavy happens, as a
:class:`wanx.InputError` naming the argument and what it accepts.
"""

from __future__ import annotations

import logging
import math
import numbers
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import check_output_path
from .configs import NUM_TRAIN_TIMESTEPS, DiTConfig, TaskSpec, parse_size
from .errors import InputError
from .geometry import best_output_size, i2v_latent_size
from .images import ImageInput, read_image

log = logging.getLogger("wanx")

ROPE_MAX_POSITIONS = 1024  # per axis (wanx.model.rope.MAX_POSITIONS, the official table size)
SEED_LIMIT = 2**64
OUTPUT_SUFFIXES = (".mp4",)


@dataclass(frozen=True)
class ModelFacts:
    """What the resolver needs to know of a checkpoint; read from its configs, never its weights."""

    spec: TaskSpec  # with wanx.json / model_index.json overrides and the loaded VAE's strides
    dit: DiTConfig  # the (first) expert's config.json
    num_experts: int

    @property
    def model_type(self) -> str:
        return self.dit.model_type

    @property
    def size_multiple(self) -> int:
        """Pixel sizes must be divisible by the VAE's spatial stride x the DiT's patch."""
        return self.spec.vae_stride[1] * self.dit.patch_size[1]

    @property
    def two_experts(self) -> bool:
        return self.num_experts > 1 or self.spec.is_moe


@dataclass(frozen=True)
class GenerationRequest:
    """Every setting of one generation, defaults filled and checked."""

    task: str
    prompt: str
    negative_prompt: str
    image: Any  # an RGB PIL image, a [3, H, W] tensor in [-1, 1], or None
    image_name: str | None  # file name for the recipe (never a full path)
    size: tuple[int, int]  # (W, H) as asked (the max area for image inputs)
    video_size: tuple[int, int]  # (W, H) of the frames that will come out
    latent_grid: tuple[int, int, int]  # (T, h, w) latent frames and pixels
    frame_num: int
    sample_steps: int
    sample_shift: float
    guide_scale: tuple[float, float]  # (low_noise, high_noise)
    boundary: float | None  # None: one expert
    sample_solver: str
    seed: int
    output: Path | None = None  # where the CLI will save, checked writable
    recipe: str | None = None  # a named preset the defaults came from (RECIPES)
    timesteps: tuple[float, ...] | None = None  # explicit schedule (what the DiT sees), Euler solvers
    boundary_step: int | None = None  # switch experts by step index instead of by timestep
    cfg_first_steps: int = 0  # a real-guidance phase: this many first steps ...
    cfg_first_scale: tuple[float, float] | None = None  # ... at this (low, high) scale, live LoRAs off
    animate: "AnimateSettings | None" = None  # Animate-14B only
    s2v: "S2VInputs | None" = None  # speech-to-video only: the speech, the clips, the pose video

    def settings(self) -> dict[str, Any]:
        """The settings that decide the frames, for the video's metadata."""
        extra = {} if self.animate is None else {"animate": self.animate.describe()}
        return {**extra, "prompt": self.prompt, "negative_prompt": self.negative_prompt, "image": self.image_name,
                "size": f"{self.size[0]}*{self.size[1]}", "frame_num": self.frame_num,
                "sample_steps": self.sample_steps, "sample_shift": self.sample_shift,
                "sample_guide_scale": list(self.guide_scale), "boundary": self.boundary,
                "sample_solver": self.sample_solver, "seed": self.seed, "recipe": self.recipe,
                "timesteps": None if self.timesteps is None else list(self.timesteps),
                "boundary_step": self.boundary_step, "cfg_first_steps": self.cfg_first_steps,
                "cfg_first_scale": None if self.cfg_first_scale is None else list(self.cfg_first_scale),
                **(self.s2v.settings() if self.s2v is not None else {})}


@dataclass(frozen=True)
class S2VInputs:
    """Speech-to-video inputs, checked: the decoded speech, how many clips, the pose video if any."""

    audio_path: Path
    audio_name: str  # file name only, for the recipe
    samples: Any = field(compare=False, repr=False)  # 16 kHz mono float32 numpy array
    num_clips: int  # clips to generate: the audio's, or fewer with num_clip
    infer_frames: int  # frames per clip
    start_from_ref: bool  # the motion context starts from the reference image (and is not dropped)
    pose_path: Path | None = None
    pose_name: str | None = None
    pose_fps: float = 0.0

    def settings(self) -> dict[str, Any]:
        return {"audio": self.audio_name, "num_clip": self.num_clips, "infer_frames": self.infer_frames,
                "start_from_ref": self.start_from_ref, "pose_video": self.pose_name}


@dataclass(frozen=True)
class AnimateSettings:
    """Animate-14B's own settings: mode, temporal guidance, segmenting of the driving video."""

    replace: bool  # replace the person in the video (True) or animate the reference image (False)
    refert_num: int  # frames of the previous segment that guide the next one (1 or 5)
    clip_len: int  # frames per segment (77)
    num_frames: int  # frames of the driving video; the output has as many
    padded_frames: int  # after ping-pong padding to a whole number of segments
    source: str | None = None  # the preprocessed folder's name, for the recipe

    @property
    def num_segments(self) -> int:
        return (self.padded_frames - self.refert_num) // (self.clip_len - self.refert_num)

    def describe(self) -> dict[str, Any]:
        return {"replace": self.replace, "refert_num": self.refert_num, "clip_len": self.clip_len,
                "num_frames": self.num_frames, "segments": self.num_segments, "source": self.source}


ANIMATE_REFERT_NUMS = (1, 5)


def animate_padded_length(num_frames: int, clip_len: int, refert_num: int) -> int:
    """Frames after padding so that segments of ``clip_len`` overlapping by ``refert_num`` tile them
    exactly: ``(padded - refert_num) % (clip_len - refert_num) == 0`` (official ``get_valid_len``)."""
    stride = clip_len - refert_num
    rest = (num_frames - refert_num) % stride
    return num_frames + (stride - rest if rest else 0)


def resolve_animate_request(facts: ModelFacts, prompt: Any = None, negative_prompt: Any = None, *,
                            num_frames: int, video_size: tuple[int, int], replace: Any = False,
                            refert_num: Any = 1, sample_steps: Any = None, sample_shift: Any = None,
                            guide_scale: Any = None, sample_solver: Any = None, seed: Any = -1,
                            save_file: Any = None, overwrite: bool = False,
                            source: str | None = None) -> GenerationRequest:
    """Animate-14B's request: the driving video's frame count and size come from the inputs.

    An empty prompt means the task's config prompt (the official default). ``refert_num`` must be
    1 or 5, as the official asserts; its CLI default of 77 fails that assertion, so wanx defaults to 1.
    """
    from .configs import ANIMATE_DEFAULT_PROMPT

    spec = facts.spec
    if not isinstance(replace, bool):
        raise InputError("replace", f"{{arg}} must be True or False, got {replace!r}")
    if refert_num not in ANIMATE_REFERT_NUMS or isinstance(refert_num, bool):
        raise InputError("refert_num", f"{{arg}} must be 1 or 5 (frames of the previous segment that guide "
                                       f"the next), got {refert_num!r}")
    clip_len = _frame_num(spec.frame_num)
    if clip_len <= refert_num:
        raise InputError("refert_num", f"{{arg}} {refert_num} leaves nothing to generate in {clip_len}-frame segments")
    if num_frames <= refert_num:
        raise InputError("src_root", f"{{arg}}: the driving video has {num_frames} frame(s); it needs more "
                                     f"than refert_num ({refert_num})")
    w, h = video_size
    stride = facts.size_multiple
    if w % stride or h % stride:
        raise InputError("src_root", f"{{arg}}: the pose video is {w}x{h}; both sides must be multiples "
                                     f"of {stride} (the preprocessing writes multiples of 16)")
    text = _text("prompt", prompt) or ANIMATE_DEFAULT_PROMPT
    steps = _positive_int("sample_steps", spec.sample_steps if sample_steps is None else sample_steps)
    shift = _finite("sample_shift", spec.sample_shift if sample_shift is None else sample_shift)
    if shift <= 0:
        raise InputError("sample_shift", f"{{arg}} must be > 0, got {shift}")
    settings = AnimateSettings(replace=replace, refert_num=int(refert_num), clip_len=clip_len,
                               num_frames=int(num_frames),
                               padded_frames=animate_padded_length(num_frames, clip_len, int(refert_num)),
                               source=source)
    grid = ((clip_len - 1) // spec.vae_stride[0] + 2, h // spec.vae_stride[1], w // spec.vae_stride[2])
    return GenerationRequest(
        task=spec.name, prompt=text, negative_prompt=_text("negative_prompt", negative_prompt) or spec.negative_prompt,
        image=None, image_name="src_ref.png", size=(w, h), video_size=(w, h), latent_grid=grid,
        frame_num=int(num_frames), sample_steps=steps, sample_shift=shift,
        guide_scale=_guide_scale(facts, spec.guide_scale if guide_scale is None else guide_scale),
        boundary=None, sample_solver=_solver("unipc" if sample_solver is None else sample_solver),
        seed=_seed(seed), output=_output(save_file, overwrite), animate=settings)


# Named presets over plain settings: they fill what the caller left as None.
RECIPES: dict[str, dict[str, Any]] = {
    # Wan2.2-Lightning / LightX2V 4-step distillation: Euler on float timesteps 1000, 937.5, 833.3, 625,
    # no unconditional pass, 2 high-noise + 2 low-noise steps (the task's boundary gives the split).
    "lightning": {"sample_solver": "flow_euler", "sample_steps": 4, "sample_shift": 5.0, "guide_scale": 1.0},
}


def resolve_request(facts: ModelFacts, prompt: Any, negative_prompt: Any = None, image: Any = None,
                    size: Any = None, frame_num: Any = None, sample_steps: Any = None,
                    sample_shift: Any = None, guide_scale: Any = None, boundary: Any = None,
                    sample_solver: Any = None, seed: Any = -1, *, allow_any_size: bool | None = False,
                    save_file: Any = None, overwrite: bool = False, recipe: Any = None, timesteps: Any = None,
                    boundary_step: Any = None, cfg_first_steps: Any = 0,
                    cfg_first_scale: Any = None, audio: Any = None, pose_video: Any = None,
                    num_clip: Any = None, infer_frames: Any = None,
                    start_from_ref: bool = False) -> GenerationRequest:
    """Fill every ``None`` with the recipe's or the task's default and check everything.

    ``audio``, ``pose_video``, ``num_clip``, ``infer_frames`` and ``start_from_ref`` are the
    speech-to-video inputs (s2v-14B only). Raises :class:`InputError` naming the argument.
    """
    _s2v_only(facts, audio=audio, pose_video=pose_video, num_clip=num_clip, infer_frames=infer_frames,
              start_from_ref=start_from_ref or None, frame_num=frame_num)
    preset = _recipe(recipe)
    if sample_solver is None:  # explicit timesteps need a solver that walks any list: plain Euler steps
        sample_solver = preset.get("sample_solver", "flow_euler" if timesteps is not None else "unipc")
    sample_steps = preset.get("sample_steps") if sample_steps is None else sample_steps
    sample_shift = preset.get("sample_shift") if sample_shift is None else sample_shift
    guide_scale = preset.get("guide_scale") if guide_scale is None else guide_scale
    base = _resolve_base(facts, prompt, negative_prompt, image, size, frame_num, sample_steps, sample_shift,
                         guide_scale, boundary, sample_solver, seed, allow_any_size, save_file, overwrite)
    if facts.model_type == "s2v":
        base = _resolve_s2v(facts, base, audio, pose_video, num_clip, infer_frames, start_from_ref)
    return _resolve_schedule(facts, base, recipe, timesteps, boundary_step, boundary, cfg_first_steps,
                             cfg_first_scale, sample_steps)


def _recipe(name: Any) -> dict[str, Any]:
    if name is None:
        return {}
    if name not in RECIPES:
        raise InputError("recipe", f"unknown {{arg}} {name!r}; choose from {', '.join(RECIPES)}")
    return RECIPES[name]


def _resolve_schedule(facts: ModelFacts, req: GenerationRequest, recipe, timesteps, boundary_step, boundary,
                      cfg_first_steps, cfg_first_scale, sample_steps) -> GenerationRequest:
    """The schedule knobs beyond steps/shift: explicit timesteps, a step-index switch, a guidance phase."""
    from dataclasses import replace

    from .sampling import EXPLICIT_TIMESTEP_SOLVERS, explicit_schedule

    changes: dict[str, Any] = {"recipe": recipe}
    if timesteps is not None:
        try:
            _, t = explicit_schedule(timesteps)
        except (TypeError, ValueError) as e:
            raise InputError("timesteps", f"{{arg}}: {e}") from None
        if req.sample_solver not in EXPLICIT_TIMESTEP_SOLVERS:
            raise InputError("timesteps", f"{{arg}} need an Euler solver ({', '.join(EXPLICIT_TIMESTEP_SOLVERS)}); "
                                          f"{req.sample_solver} assumes its own schedule")
        if sample_steps is not None and int(sample_steps) != len(t):
            raise InputError("timesteps", f"{{arg}} lists {len(t)} steps but sample_steps is {sample_steps}")
        changes.update(timesteps=tuple(t.tolist()), sample_steps=len(t))
    steps = changes.get("sample_steps", req.sample_steps)
    if boundary_step is not None:
        if not facts.two_experts:
            raise InputError("boundary_step", f"{{arg}} switches between two experts; {facts.spec.name} has one")
        if boundary is not None:
            raise InputError("boundary_step", "give {arg} or boundary (a timestep ratio), not both")
        changes["boundary_step"] = _int_in("boundary_step", boundary_step, 0, steps)
    changes["cfg_first_steps"] = _int_in("cfg_first_steps", cfg_first_steps or 0, 0, steps)
    if changes["cfg_first_steps"]:
        scale = facts.spec.guide_scale if cfg_first_scale is None else cfg_first_scale
        changes["cfg_first_scale"] = _guide_scale(facts, scale, "cfg_first_scale")
    elif cfg_first_scale is not None:
        raise InputError("cfg_first_scale", "{arg} sets the scale of a real-guidance phase: give cfg_first_steps too")
    return replace(req, **changes)


def _int_in(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value) or not low <= value <= high:
        raise InputError(name, f"{{arg}} must be a whole number in [{low}, {high}], got {value!r}")
    return int(value)


def _resolve_base(facts, prompt, negative_prompt, image, size, frame_num, sample_steps, sample_shift,
                  guide_scale, boundary, sample_solver, seed, allow_any_size, save_file, overwrite):
    spec = facts.spec
    prompt_text = _text("prompt", prompt, required=True)
    negative = _text("negative_prompt", negative_prompt) or spec.negative_prompt
    frames = _frame_num(spec.frame_num if frame_num is None else frame_num)
    img = _image_for_task(facts, image)
    w, h = _size(facts, spec.default_size if size is None else size, img is not None, allow_any_size)
    video_size, grid = _output_grid(facts, (w, h), frames, img)
    steps = _positive_int("sample_steps", spec.sample_steps if sample_steps is None else sample_steps)
    shift = _finite("sample_shift", spec.sample_shift if sample_shift is None else sample_shift)
    if shift <= 0:
        raise InputError("sample_shift", f"{{arg}} must be > 0, got {shift}")
    return GenerationRequest(
        task=spec.name, prompt=prompt_text, negative_prompt=negative, image=img.image if img else None,
        image_name=img.name if img else None, size=(w, h), video_size=video_size, latent_grid=grid,
        frame_num=frames, sample_steps=steps, sample_shift=shift,
        guide_scale=_guide_scale(facts, spec.guide_scale if guide_scale is None else guide_scale),
        boundary=_boundary(facts, boundary), sample_solver=_solver(sample_solver), seed=_seed(seed),
        output=_output(save_file, overwrite))


# ------------------------------------------------------------------------------------ scalars

def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(name: str, value: Any) -> int:
    """An integer >= 1; an integral float (5.0) is accepted, 5.5 or "5" are not."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise InputError(name, f"{{arg}} must be a whole number, got {value!r}")
    if value < 1:
        raise InputError(name, f"{{arg}} must be >= 1, got {value}")
    return int(value)


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InputError(name, f"{{arg}} must be a finite number, got {value!r}")
    return float(value)


def _text(name: str, value: Any, required: bool = False) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise InputError(name, f"{{arg}} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise InputError(name, "{arg} is empty; describe the video, e.g. \"a red circle moving left\"")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(name, f"{{arg}} is not valid text (character {e.start} cannot be encoded "
                               f"as UTF-8)") from None
    return value


def _frame_num(value: Any) -> int:
    frames = _positive_int("frame_num", value)
    if (frames - 1) % 4:
        raise InputError("frame_num", f"{{arg}} must be 4n+1 (1, 5, 9, ..., 81, 121), got {frames}")
    return frames


def _seed(value: Any) -> int:
    if value is None or (_is_int(value) and value == -1):
        return random.randint(0, sys.maxsize)  # as the official generate.py
    if not _is_int(value) or not 0 <= value < SEED_LIMIT:
        raise InputError("seed", f"{{arg}} must be an integer in [0, 2^64) or -1 (random), got {value!r}")
    return int(value)


def _solver(name: Any) -> str:
    from .sampling import SAMPLERS

    if name not in SAMPLERS:
        raise InputError("sample_solver", f"unknown {{arg}} {name!r}; choose from {', '.join(SAMPLERS)}")
    return name


def _guide_scale(facts: ModelFacts, value: Any, name: str = "guide_scale") -> tuple[float, float]:
    """A float or the official ``(low_noise, high_noise)`` pair -> (low, high)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise InputError(name, f"{{arg}} is one number or a (low_noise, high_noise) pair, "
                                   f"got {len(value)} values")
        low, high = (_finite(name, v) for v in value)
        if low != high and not facts.two_experts:
            raise InputError(name, f"{{arg}} ({low}, {high}) sets one scale per expert, but "
                                   f"{facts.spec.name} has one expert; give one number")
        return low, high
    scale = _finite(name, value)
    return scale, scale


def _boundary(facts: ModelFacts, value: Any) -> float | None:
    if not facts.two_experts:
        if value is not None:
            raise InputError("boundary", f"{{arg}} switches between two experts; {facts.spec.name} has one")
        return None
    ratio = _finite("boundary", facts.spec.boundary if value is None else value)
    if not 0.0 <= ratio <= 1.0:
        raise InputError("boundary", f"{{arg}} is a ratio of {NUM_TRAIN_TIMESTEPS} timesteps in [0, 1] "
                                     f"(0.875: the high-noise expert while t >= 875), got {ratio}")
    return ratio


def _output(save_file: Any, overwrite: bool) -> Path | None:
    return None if save_file is None else check_output(save_file, overwrite)


def check_output(save_file: Any, overwrite: bool = False) -> Path:
    """An .mp4 path that can be written (a folder or an existing file without ``overwrite`` cannot)."""
    path = Path(save_file)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InputError("save_file", f"{{arg}} {path}: wanx writes H.264 .mp4 files; "
                                      f"use a name ending in .mp4")
    try:
        return check_output_path(path, overwrite=overwrite, what="{arg}")
    except FileExistsError as e:
        raise InputError("save_file", f"{e}") from None
    except OSError as e:
        raise InputError("save_file", str(e)) from None


# ------------------------------------------------------------------------------------ geometry

def _image_for_task(facts: ModelFacts, image: Any) -> ImageInput | None:
    if image is None:
        if facts.model_type in ("i2v", "s2v"):
            raise InputError("image", f"task {facts.spec.name} needs an input image ({{arg}})")
        return None
    if facts.model_type not in ("i2v", "ti2v", "s2v"):
        raise InputError("image", f"task {facts.spec.name} is text-to-video and takes no image ({{arg}}); "
                                  f"image-to-video tasks: i2v-A14B, ti2v-5B")
    checked = read_image(image)
    if facts.model_type in ("ti2v", "s2v") and checked.name == "<tensor>":
        raise InputError("image", f"{{arg}}: {facts.model_type} resizes and crops its image as the official "
                                  f"does; give a file path or a PIL image, not a tensor")
    return checked


def _size(facts: ModelFacts, size: Any, has_image: bool, allow_any_size: bool | None) -> tuple[int, int]:
    """(W, H). Outside the task's official sizes: an error if ``allow_any_size`` is False (the CLI,
    as the official generate.py), a warning if None (the Python API's default), silent if True."""
    spec = facts.spec
    try:
        w, h = parse_size(size) if isinstance(size, str) else size
    except (TypeError, ValueError):
        raise InputError("size", f"{{arg}} must be 'W*H' or (W, H), e.g. 1280*720, got {size!r}") from None
    if not (_is_int(w) and _is_int(h)) or w <= 0 or h <= 0:
        raise InputError("size", f"{{arg}} needs two positive whole numbers, got {size!r}")
    multiple = facts.size_multiple
    # For i2v the size is a pixel budget (the image's aspect decides the shape), as in the official.
    if not (has_image and facts.model_type in ("i2v", "s2v")) and (w % multiple or h % multiple):
        raise InputError("size", f"{{arg}} {w}*{h} is not divisible by {multiple} (VAE stride x patch) "
                                 f"for task {spec.name}")
    if allow_any_size is not True and f"{w}*{h}" not in spec.supported_sizes:
        message = (f"{{arg}} {w}*{h} is not supported by {spec.name}; supported: "
                   f"{', '.join(spec.supported_sizes)} (or allow any size: allow_any_size=True, "
                   f"CLI --allow_any_size)")
        if allow_any_size is False:
            raise InputError("size", message)
        log.warning(message.replace("{arg}", "size") + "; generating anyway")
    return int(w), int(h)


def _output_grid(facts: ModelFacts, size: tuple[int, int], frames: int,
                 image: ImageInput | None) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """(video (W, H), latent grid (T, h, w)) that the model will produce; checks the RoPE limits."""
    stride_t, stride_s = facts.spec.vae_stride[0], facts.spec.vae_stride[1]
    w, h = size
    try:
        if image is not None and facts.model_type == "i2v":
            lat_h, lat_w = i2v_latent_size(image.height, image.width, w * h, stride_s, facts.dit.patch_size[1])
        elif image is not None and facts.model_type == "s2v":  # multiples of 64 within the area
            oh, ow = s2v_video_size(image.height, image.width, w * h)
            lat_h, lat_w = oh // stride_s, ow // stride_s
        elif image is not None:  # ti2v: cover-resize and centre-crop to the best size within the area
            ow, oh = best_output_size(image.width, image.height, facts.size_multiple, facts.size_multiple, w * h)
            lat_h, lat_w = oh // stride_s, ow // stride_s
        else:
            lat_h, lat_w = h // stride_s, w // stride_s
    except ValueError as e:
        raise InputError("size", f"{{arg}}: {e}") from None
    grid = ((frames - 1) // stride_t + 1, lat_h, lat_w)
    tokens = tuple(n // p for n, p in zip(grid, facts.dit.patch_size))
    for axis, name, n in zip(range(3), ("frame_num", "size", "size"), tokens):
        if n > ROPE_MAX_POSITIONS:
            what = ("frames", "height", "width")[axis]
            raise InputError(name, f"{{arg}}: the model's position table covers {ROPE_MAX_POSITIONS} "
                                   f"tokens per axis; this {what} needs {n}")
    return (lat_w * stride_s, lat_h * stride_s), grid


def default_output_name(task: str, video_size: tuple[int, int], prompt: str, stamp: str) -> str:
    """`<task>_<W>x<H>_<prompt words>_<stamp>.mp4`: no characters that shells or file systems mind."""
    import re

    stem = re.sub(r"[^\w\-]+", "_", prompt[:50], flags=re.ASCII).strip("_") or "video"
    return f"{task}_{video_size[0]}x{video_size[1]}_{stem}_{stamp}.mp4"


# ------------------------------------------------------------------------------------ speech-to-video

def s2v_video_size(height: int, width: int, max_area: int, divisor: int = 64) -> tuple[int, int]:
    """S2V's (H, W): the largest scale of the image whose size, padded up to multiples of 64, fits
    ``max_area`` (official ``get_size_less_than_area``, its 100-step search and its fallback)."""
    if height * width <= max_area:
        min_scale, max_scale = 0.1, 1.0
    else:
        d = divisor - 1
        b, a, c = d * (height + width), height * width, d**2 - max_area
        # parity: the official quadratic (with its 2*a*c) for the scale at maximum padding.
        min_scale = (-b + math.sqrt(b**2 - 2 * a * c)) / (2 * a)
        max_scale = math.sqrt(max_area / (height * width))
    for i in range(100):
        scale = max_scale - (max_scale - min_scale) * i / 100
        new_h, new_w = int(height * scale), int(width * scale)
        padded_h, padded_w = new_h + (64 - new_h % 64) % 64, new_w + (64 - new_w % 64) % 64
        if padded_h * padded_w <= max_area:
            return padded_h, padded_w
    aspect = width / height
    target_w = int((max_area * aspect) ** 0.5 // divisor * divisor)
    target_h = int((max_area / aspect) ** 0.5 // divisor * divisor)
    if target_w >= width or target_h >= height:
        target_w, target_h = int(width // divisor * divisor), int(height // divisor * divisor)
    return target_h, target_w


def _s2v_only(facts: ModelFacts, **given: Any) -> None:
    """S2V arguments for another task, or arguments S2V has no use for, are refused by name."""
    if facts.model_type == "s2v":
        if given["frame_num"] is not None:
            raise InputError("frame_num", f"{facts.spec.name} makes clips of infer_frames frames, as many as "
                                          f"the audio needs; set infer_frames / num_clip instead of {{arg}}")
        return
    for name, value in given.items():
        if name != "frame_num" and value is not None:
            raise InputError(name, f"{{arg}} is a speech-to-video input; task {facts.spec.name} does not take it")


def _resolve_s2v(facts: ModelFacts, req: GenerationRequest, audio, pose_video, num_clip, infer_frames,
                 start_from_ref) -> GenerationRequest:
    """Decode and check the speech, plan the clips, check the pose video covers them."""
    from dataclasses import replace

    from .audio import AudioError, clip_count, feature_frames, read_speech
    from .configs import S2V_AUDIO_SAMPLE_RATE, S2V_INFER_FRAMES, S2V_MOTION_FRAMES

    fps = facts.spec.sample_fps
    frames = _positive_int("infer_frames", S2V_INFER_FRAMES if infer_frames is None else infer_frames)
    if frames % 4:
        raise InputError("infer_frames", f"{{arg}} must be a multiple of 4 (e.g. 48 or 80), got {frames}")
    if audio is None:
        raise InputError("audio", "{arg} is required: S2V animates the image to a speech or singing file (wav, "
                                  "mp3, m4a, flac, or a video's audio track). Text-to-speech (the official "
                                  "--enable_tts) is not supported: synthesize the speech first")
    try:
        speech = read_speech(audio, S2V_AUDIO_SAMPLE_RATE)
    except (AudioError, TypeError) as e:
        raise InputError("audio", f"{{arg}}: {e}") from None
    if len(speech.samples) < S2V_AUDIO_SAMPLE_RATE / fps:
        raise InputError("audio", f"{{arg}} {speech.name} lasts {speech.seconds * 1000:.0f} ms, shorter than one "
                                  f"video frame ({1000 / fps:.1f} ms at {fps} fps)")
    clips = clip_count(feature_frames(len(speech.samples)), fps, frames)
    if num_clip is not None:
        clips = min(clips, _positive_int("num_clip", num_clip))
    pose = _pose_video(pose_video, frames * clips, fps, clips, frames)
    lat_motion = (S2V_MOTION_FRAMES + 3) // 4
    grid = ((frames + 3 + S2V_MOTION_FRAMES) // 4 - lat_motion, *req.latent_grid[1:])
    total = frames * clips - (0 if start_from_ref else 3)  # clip 1 drops 3 frames unless it starts from the image
    inputs = S2VInputs(Path(audio), speech.name, speech.samples, clips, frames, bool(start_from_ref), *pose)
    return replace(req, s2v=inputs, latent_grid=grid, frame_num=total)


def _pose_video(path: Any, needed: int, fps: int, clips: int, frames: int) -> tuple:
    """(path, name, fps) of a pose video that has ``needed`` frames at ``fps`` (sampled every
    round(its fps / fps) frames from the start, as the official), or () without one."""
    if path is None:
        return ()
    from .media import probe_video

    path = Path(path)
    if not path.is_file():
        what = f"{{arg}} not found: {path}" if not path.exists() else f"{{arg}} {path} is not a file"
        raise InputError("pose_video", what)
    try:
        info = probe_video(path)
    except ValueError as e:
        raise InputError("pose_video", f"{{arg}}: {e}") from None
    if info.fps <= 0 or info.frames < 1:
        raise InputError("pose_video", f"{{arg}} {path.name}: no frames or no frame rate found")
    interval = max(1, round(info.fps / fps))
    usable = -(-info.frames // interval)
    if usable < needed:
        raise InputError("pose_video", f"{{arg}} {path.name} has {info.frames} frames at {info.fps:.2f} fps "
                                       f"({info.frames / info.fps:.1f} s), {usable} at {fps} fps; {clips} clip(s) of "
                                       f"{frames} frames need {needed} ({needed / fps:.1f} s). Use a longer pose "
                                       f"video or fewer clips (num_clip)")
    return path, path.name, info.fps
