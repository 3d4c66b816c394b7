"""Frozen configuration dataclasses and the task table.

Field names follow the official constructors (``WanModel``, ``WanVAE_``, ``T5Encoder``) so that a
``config.json`` written by the official code maps onto them one to one. Defaults are the official
constructor defaults; the per-task sizes live in :data:`TASKS`.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

# The official default negative prompt (shared_config.sample_neg_prompt); used when none is given.
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

NUM_TRAIN_TIMESTEPS = 1000

# Animate-14B's config prompt ("the person in the video is doing actions"), used when none is given.
ANIMATE_DEFAULT_PROMPT = "视频中的人在做动作"

# "W*H" -> (W, H), as the official SIZE_CONFIGS.
SIZE_CONFIGS: dict[str, tuple[int, int]] = {
    "720*1280": (720, 1280),
    "1280*720": (1280, 720),
    "480*832": (480, 832),
    "832*480": (832, 480),
    "704*1280": (704, 1280),
    "1280*704": (1280, 704),
    "1024*704": (1024, 704),
    "704*1024": (704, 1024),
}


def _tuple(v: Any) -> Any:
    """JSON gives lists; our frozen configs keep tuples (hashable, immutable)."""
    if isinstance(v, list):
        return tuple(_tuple(x) for x in v)
    return v


def _matches(annotation: str, value: Any) -> bool:
    """Whether a JSON value fits a field annotation such as ``int``, ``tuple[int, ...] | None``."""
    for option in (a.strip() for a in annotation.split("|")):
        if option == "None" and value is None:
            return True
        if option == "Any":
            return True
        if option in ("int", "float", "bool", "str") and _scalar_fits(option, value):
            return True
        if option.startswith("tuple[") and isinstance(value, (list, tuple)):
            parts = [p.strip() for p in option[6:-1].split(",")]
            if parts[-1] == "...":
                if all(_matches(parts[0], v) for v in value):
                    return True
            elif len(parts) == len(value) and all(_matches(p, v) for p, v in zip(parts, value)):
                return True
    return False


def _scalar_fits(kind: str, value: Any) -> bool:
    if isinstance(value, bool):
        return kind == "bool"
    return {"int": isinstance(value, int), "float": isinstance(value, (int, float)),
            "bool": False, "str": isinstance(value, str)}[kind]


def check_config_fields(cls, d: Mapping[str, Any], *, strict: bool = False, source: str = "config") -> dict:
    """The known fields of ``d`` for dataclass ``cls``, each checked against its annotated type.

    A wrongly typed value is an error naming the field. Unknown keys are an error when ``strict``
    (files wanx owns); otherwise a key that looks like a typo of a field is warned about.
    """
    known = {f.name: str(f.type) for f in fields(cls)}
    unknown = [k for k in d if k not in known]
    if unknown and strict:
        raise ValueError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(known)}")
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
        if close:
            warnings.warn(f"{source}: unknown key {key!r} is ignored (did you mean {close[0]!r}?)", stacklevel=3)
    out = {}
    for key, value in d.items():
        if key not in known:
            continue
        if not _matches(known[key], value):
            raise ValueError(f"{source}: {key!r} must be {known[key]}, got {value!r} ({type(value).__name__})")
        out[key] = _tuple(value)
    return out


class _ConfigMixin:
    """from_dict / to_dict shared by every config."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, strict: bool = False, source: str | None = None):
        """Build from a JSON dict: types checked; unknown keys an error if ``strict``, else ignored
        (config.json files carry extras) with a warning for likely typos."""
        return cls(**check_config_fields(cls, d, strict=strict, source=source or cls.__name__))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)  # type: ignore[type-var]


@dataclass(frozen=True)
class DiTConfig(_ConfigMixin):
    """The Wan diffusion transformer (official ``WanModel`` constructor names and defaults).

    Real ``config.json`` files omit ``patch_size``, ``text_dim``, ``window_size``, ``qk_norm`` and
    ``cross_attn_norm`` (the official ``ignore_for_config``); the defaults here supply them.
    """

    model_type: str = "t2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 16
    dim: int = 2048
    ffn_dim: int = 8192
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 16
    num_layers: int = 32
    window_size: tuple[int, int] = (-1, -1)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def tiny(cls, model_type: str = "t2v", **kw) -> "DiTConfig":
        """A 2-layer model for tests (in/out channels follow the task's latent layout)."""
        in_out = {"t2v": (16, 16), "i2v": (36, 16), "ti2v": (48, 48)}[model_type]
        base = dict(model_type=model_type, in_dim=in_out[0], out_dim=in_out[1], dim=64,
                    ffn_dim=128, freq_dim=256, text_dim=32, num_heads=2, num_layers=2)
        base.update(kw)
        return cls(**base)


@dataclass(frozen=True)
class AnimateConfig(DiTConfig):
    """Animate-14B's transformer (official ``WanAnimateModel`` constructor names and defaults).

    The fields after ``motion_encoder_dim`` are fixed in the official code (CLIP width 1280 and
    257 image tokens, a 512-pixel LIA face encoder, a 4-head 1024-wide face encoder, a face
    adapter after every 5th block); they are fields here only so tests can build tiny models.
    """

    model_type: str = "animate"
    in_dim: int = 36
    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    motion_encoder_dim: int = 512
    image_dim: int = 1280
    image_tokens: int = 257
    face_size: int = 512
    motion_dim: int = 20
    face_hidden_dim: int = 1024
    face_heads: int = 4
    face_every: int = 5

    def __post_init__(self):
        if self.num_layers % self.face_every:
            # The official applies adapter i//5 after every block i with i % 5 == 0 and builds
            # num_layers // 5 adapters: any other layer count indexes past the last adapter.
            raise ValueError(f"AnimateConfig: num_layers ({self.num_layers}) must be a multiple of "
                             f"face_every ({self.face_every})")
        if self.face_size < 4 or self.face_size & (self.face_size - 1):
            raise ValueError(f"AnimateConfig: face_size must be a power of two >= 4, got {self.face_size}")

    @property
    def latent_dim(self) -> int:
        """VAE latent channels: in_dim = noise + 4 mask channels + reference/temporal latents."""
        return (self.in_dim - 4) // 2

    @classmethod
    def tiny(cls, **kw) -> "AnimateConfig":
        """A 5-layer model (one face adapter) with 8-pixel face crops, for tests."""
        base = dict(dim=64, ffn_dim=128, freq_dim=256, text_dim=32, num_heads=2, num_layers=5,
                    image_dim=32, face_size=8)
        base.update(kw)
        return cls(**base)


@dataclass(frozen=True)
class S2VConfig(DiTConfig):
    """The S2V transformer (official ``WanModel_S2V``): the Wan DiT plus audio, pose and motion inputs.

    Field names are the official constructor's. Defaults are the released S2V-14B values (the
    official ``wan_s2v_14B.py`` transformer dict; its ``config.json`` spells every field out), not
    the constructor's own defaults, which describe a motioner variant that was never released.
    ``zero_init`` only concerns training initialisation and ``enable_tsm``,
    ``trainable_token_pos_emb`` and ``motion_token_num`` only the disabled motioner.
    """

    model_type: str = "s2v"
    cond_dim: int = 16  # pose-latent channels (0: no cond_encoder)
    audio_dim: int = 1024  # wav2vec2 hidden size
    num_audio_token: int = 4
    enable_adain: bool = True
    adain_mode: str = "attn_norm"
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    zero_init: bool = True
    zero_timestep: bool = True
    enable_motioner: bool = False
    add_last_motion: bool = True
    enable_tsm: bool = False
    trainable_token_pos_emb: bool = False
    motion_token_num: int = 1024
    enable_framepack: bool = True
    framepack_drop_mode: str = "padd"

    @classmethod
    def tiny(cls, model_type: str = "s2v", **kw) -> "S2VConfig":
        """A 2-layer S2V model for tests (audio injected after both blocks; a 32-wide audio input)."""
        base = dict(in_dim=16, out_dim=16, dim=64, ffn_dim=128, freq_dim=256, text_dim=32, num_heads=2,
                    num_layers=2, audio_dim=32, audio_inject_layers=(0, 1))
        base.update(kw)
        return cls(**base)


# S2V pipeline constants (official wan_s2v_14B.py / speech2video.py), not part of the model's config.
S2V_MOTION_FRAMES = 73  # pixel frames of motion context before each clip (transformer.motion_frames)
S2V_INFER_FRAMES = 80  # pixel frames per clip (--infer_frames)
S2V_AUDIO_FPS = 30  # wav2vec2 features are resampled from 50 Hz to this rate before bucketing
S2V_AUDIO_SAMPLE_RATE = 16000
S2V_WAV2VEC_DIR = "wav2vec2-large-xlsr-53-english"
S2V_NEGATIVE_PROMPT = (
    "画面模糊，最差质量，画面模糊，细节模糊不清，情绪激动剧烈，手快速抖动，字幕，丑陋的，残缺的，多余的手指，"
    "画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)


# Official per-channel latent statistics (vae2_1.py / vae2_2.py).
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
WAN22_LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)


@dataclass(frozen=True)
class VAEConfig(_ConfigMixin):
    """A Wan video VAE (official ``WanVAE_`` constructor names, plus ``version``).

    ``version`` "2.1": z=16, 4x8x8. "2.2": z=48, 2x2 pixel patchify, residual down/up blocks,
    4x16x16, separate decoder width ``dec_dim``. ``latents_mean``/``latents_std`` default to the
    official constants of the version (None); tiny test models may set their own.
    """

    version: str = "2.1"
    dim: int = 96
    dec_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # sic: official spelling
    dropout: float = 0.0
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.version not in ("2.1", "2.2"):
            raise ValueError(f"VAEConfig.version must be '2.1' or '2.2', got {self.version!r}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"VAEConfig: temperal_downsample needs one flag per downsampling stage "
                             f"({len(self.dim_mult) - 1} for dim_mult {tuple(self.dim_mult)}), "
                             f"got {tuple(self.temperal_downsample)}")
        if self.temporal_stride != 4:
            # The frame-count rules (4n+1) and the 1 + 4 + 4 ... encode chunks assume it.
            raise ValueError(f"VAEConfig: exactly two stages must downsample in time (4x, as every "
                             f"Wan VAE), got temperal_downsample={tuple(self.temperal_downsample)}")

    @property
    def decoder_dim(self) -> int:
        return self.dec_dim if self.dec_dim is not None else self.dim

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent pixel: one halving per stage after the first (8 for the official
        (1, 2, 4, 4)); the 2.2 VAE's 2x2 pixel patchify doubles it (16)."""
        stride = 2 ** (len(self.dim_mult) - 1)
        return 2 * stride if self.version == "2.2" else stride

    @property
    def temporal_stride(self) -> int:
        """Frames per latent frame after the first (4 for the official (False, True, True))."""
        return 2 ** sum(bool(t) for t in self.temperal_downsample)

    @property
    def strides(self) -> tuple[int, int, int]:
        return (self.temporal_stride, self.spatial_stride, self.spatial_stride)

    @property
    def mean(self) -> tuple[float, ...]:
        if self.latents_mean is not None:
            return self.latents_mean
        return WAN22_LATENT_MEAN if self.version == "2.2" else WAN21_LATENT_MEAN

    @property
    def std(self) -> tuple[float, ...]:
        if self.latents_std is not None:
            return self.latents_std
        return WAN22_LATENT_STD if self.version == "2.2" else WAN21_LATENT_STD

    @classmethod
    def wan21(cls) -> "VAEConfig":
        return cls(version="2.1", dim=96, z_dim=16)

    @classmethod
    def wan22(cls) -> "VAEConfig":
        return cls(version="2.2", dim=160, dec_dim=256, z_dim=48)

    @classmethod
    def tiny(cls, version: str = "2.1", **kw) -> "VAEConfig":
        if version == "2.2":
            base = dict(version="2.2", dim=8, dec_dim=16, z_dim=48, num_res_blocks=1,
                        latents_mean=(0.0,) * 48, latents_std=(1.0,) * 48)
        else:
            base = dict(version="2.1", dim=8, z_dim=16, num_res_blocks=1)
        base.update(kw)
        return cls(**base)


@dataclass(frozen=True)
class T5Config(_ConfigMixin):
    """The umT5 encoder (official ``umt5_xxl`` sizes by default; relative-position buckets per layer)."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    shared_pos: bool = False
    eps: float = 1e-6
    max_distance: int = 128

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    @classmethod
    def tiny(cls, **kw) -> "T5Config":
        base = dict(vocab_size=256, dim=32, dim_attn=32, dim_ffn=64, num_heads=4,
                    num_layers=2, num_buckets=8)
        base.update(kw)
        return cls(**base)


@dataclass(frozen=True)
class CLIPVisionConfig(_ConfigMixin):
    """The visual tower of open-clip XLM-RoBERTa-large ViT-H/14 (official ``VisionTransformer`` names).

    ``use_layers``: how many transformer blocks run; Animate uses the output after 31 of the 32
    (``use_31_block=True``), with no post-norm.
    """

    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_ratio: float = 4.0
    num_heads: int = 16
    num_layers: int = 32
    use_layers: int = 31
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.dim % self.num_heads or not 0 < self.use_layers <= self.num_layers:
            raise ValueError(f"CLIPVisionConfig: dim {self.dim} must split into {self.num_heads} heads and "
                             f"use_layers ({self.use_layers}) must be in [1, {self.num_layers}]")

    @property
    def num_tokens(self) -> int:
        """Class token + one per patch (257 for the official 224/14)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def tiny(cls, **kw) -> "CLIPVisionConfig":
        base = dict(image_size=28, patch_size=14, dim=32, num_heads=4, num_layers=3, use_layers=2)
        base.update(kw)
        return cls(**base)


@dataclass(frozen=True)
class TaskSpec:
    """One official task: model sizes, file names and the official sampling defaults."""

    name: str
    dit: DiTConfig
    vae_version: str
    vae_checkpoint: str
    sample_steps: int
    sample_shift: float
    guide_scale: float | tuple[float, float]  # float, or the official (low_noise, high_noise) tuple
    frame_num: int
    sample_fps: int
    supported_sizes: tuple[str, ...]
    default_size: str
    boundary: float | None = None  # ratio of NUM_TRAIN_TIMESTEPS; None = one model
    expert_dirs: tuple[str, str] | None = None  # (high_noise, low_noise) subfolders
    runnable: bool = True
    # None: the official VAE's (4, 8, 8) or (4, 16, 16); set from wanx.json for other VAE shapes
    vae_strides: tuple[int, int, int] | None = None
    t5_checkpoint: str = "models_t5_umt5-xxl-enc-bf16.pth"
    t5_tokenizer: str = "google/umt5-xxl"
    text_len: int = 512
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    note: str = ""

    @property
    def is_moe(self) -> bool:
        return self.expert_dirs is not None

    @property
    def vae_stride(self) -> tuple[int, int, int]:
        if self.vae_strides is not None:
            return self.vae_strides
        return (4, 16, 16) if self.vae_version == "2.2" else (4, 8, 8)

    @property
    def size_multiple(self) -> int:
        """Pixel sizes must be divisible by VAE stride x DiT patch."""
        return self.vae_stride[1] * self.dit.patch_size[1]


_A14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
_HD_SIZES = ("720*1280", "1280*720", "480*832", "832*480")

TASKS: dict[str, TaskSpec] = {
    "t2v-A14B": TaskSpec(
        name="t2v-A14B", dit=DiTConfig(model_type="t2v", in_dim=16, out_dim=16, **_A14B),
        vae_version="2.1", vae_checkpoint="Wan2.1_VAE.pth", sample_steps=40, sample_shift=12.0,
        guide_scale=(3.0, 4.0), frame_num=81, sample_fps=16, supported_sizes=_HD_SIZES,
        default_size="1280*720", boundary=0.875,
        expert_dirs=("high_noise_model", "low_noise_model")),
    "i2v-A14B": TaskSpec(
        name="i2v-A14B", dit=DiTConfig(model_type="i2v", in_dim=36, out_dim=16, **_A14B),
        vae_version="2.1", vae_checkpoint="Wan2.1_VAE.pth", sample_steps=40, sample_shift=5.0,
        guide_scale=(3.5, 3.5), frame_num=81, sample_fps=16, supported_sizes=_HD_SIZES,
        default_size="1280*720", boundary=0.900,
        expert_dirs=("high_noise_model", "low_noise_model")),
    "ti2v-5B": TaskSpec(
        name="ti2v-5B", dit=DiTConfig(model_type="ti2v", in_dim=48, out_dim=48, dim=3072,
                                      ffn_dim=14336, num_heads=24, num_layers=30),
        vae_version="2.2", vae_checkpoint="Wan2.2_VAE.pth", sample_steps=50, sample_shift=5.0,
        guide_scale=5.0, frame_num=121, sample_fps=24, supported_sizes=("704*1280", "1280*704"),
        default_size="1280*704"),
    "s2v-14B": TaskSpec(
        name="s2v-14B", dit=S2VConfig(in_dim=16, out_dim=16, **_A14B),
        vae_version="2.1", vae_checkpoint="Wan2.1_VAE.pth", sample_steps=40, sample_shift=3.0,
        guide_scale=4.5, frame_num=81, sample_fps=16, supported_sizes=tuple(SIZE_CONFIGS),
        default_size="1280*720", runnable=False, negative_prompt=S2V_NEGATIVE_PROMPT,
        note="speech-to-video needs the S2V model (audio injection, frame packing): not yet runnable"),
    "animate-14B": TaskSpec(
        name="animate-14B", dit=AnimateConfig(),
        vae_version="2.1", vae_checkpoint="Wan2.1_VAE.pth", sample_steps=20, sample_shift=5.0,
        guide_scale=1.0, frame_num=77, sample_fps=30, supported_sizes=("720*1280", "1280*720"),
        default_size="1280*720", runnable=False,
        note="character animation needs CLIP, the face encoder and pose inputs: not yet runnable"),
}


def get_task(name: str) -> TaskSpec:
    """The task spec for ``name``; an unknown name is an error listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def parse_size(size: str) -> tuple[int, int]:
    """'W*H' (or 'WxH') -> (W, H)."""
    try:
        w, h = (int(v) for v in size.lower().replace("x", "*").split("*"))
    except (ValueError, AttributeError):
        raise ValueError(f"size must look like 'W*H' (e.g. 1280*720), got {size!r}") from None
    return w, h
