"""Test helpers for S2V: the official S2V modules loaded by file path, and tiny random weights.

The official ``wan`` package (unpacked from the ``wan22`` wheel) cannot be imported as a package
here: its ``__init__`` pulls in every pipeline (decord, librosa, easydict, flash-attn ...). Its S2V
modules are loaded file by file under a private package name instead, with the few imports they
make that are not installed replaced by stubs (never used on the paths the tests run).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from wanx.configs import S2VConfig
from wanx.model import attention

OFFICIAL_SRC_DEFAULT = Path(__file__).resolve().parents[1] / ".venv" / "reference" / "wan"
PKG = "_wan_s2v_official"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference over the reference's max magnitude."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def randomize_(module: torch.nn.Module, seed: int = 1) -> None:
    """Every parameter (zero-initialised ones included) random, at a scale that keeps activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.dim() >= 2 and "modulation" not in name and "padding_tokens" not in name:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.2 * noise)


# ------------------------------------------------------------------------------ einops stand-in

def _groups(side: str) -> list[list[str]]:
    """'b (n c) t' -> [['b'], ['n', 'c'], ['t']]."""
    out, group = [], None
    for tok in side.replace("(", " ( ").replace(")", " ) ").split():
        if tok == "(":
            group = []
        elif tok == ")":
            out.append(group)
            group = None
        elif group is not None:
            group.append(tok)
        else:
            out.append([tok])
    return out


def _rearrange(x: torch.Tensor, pattern: str, **sizes: int) -> torch.Tensor:
    """The subset of ``einops.rearrange`` the official S2V modules use (reshape/permute patterns)."""
    left, right = (_groups(s) for s in pattern.split("->"))
    known = dict(sizes)
    for group, dim in zip(left, x.shape):
        unknown = [n for n in group if n not in known]
        rest = math.prod(known[n] for n in group if n in known)
        if len(unknown) == 1:
            known[unknown[0]] = dim // rest
    names = [n for g in left for n in g]
    x = x.reshape([known[n] for n in names])
    order = [n for g in right for n in g]
    x = x.permute([names.index(n) for n in order])
    return x.reshape([math.prod(known[n] for n in g) for g in right])


@contextlib.contextmanager
def _stubbed_imports():
    """Stand-ins, while the official modules are executed, for packages they import at the top but
    this environment need not have (einops: reshapes; librosa: only its load(), which tests bypass).

    They are removed again afterwards so that other libraries probing for the packages see none.
    """
    added = []
    for name, stub in (("einops", types.SimpleNamespace(rearrange=_rearrange, repeat=None)),
                       ("librosa", types.SimpleNamespace())):
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        sys.modules[name] = stub
        added.append(name)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def _package(name: str, path: Path | None) -> None:
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(path)] if path is not None else []
        sys.modules[name] = pkg


def _exec(name: str, path: Path):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _key_bias(k_lens, num_keys):
    """The official varlen ``k_lens`` as an additive key bias (0 kept, -inf masked)."""
    if k_lens is None:
        return None
    keep = torch.arange(num_keys)[None, :] < k_lens.cpu()[:, None]  # [B, Lk]
    return torch.where(keep, 0.0, float("-inf"))[:, None, None, :]


def _official_attention(q, k, v, k_lens=None, **_):
    return attention(q, k, v, bias=_key_bias(k_lens, k.shape[1]))


def official_s2v_modules() -> types.SimpleNamespace:
    """The official ``model_s2v``, ``audio_utils``, ``motioner``, ``s2v_utils`` and ``audio_encoder`` modules.

    Their flash attention is replaced by wanx's ``attention`` (official ``k_lens`` as a key bias);
    the sequence-parallel helpers they import are stubs (context parallel is never switched on).
    """
    root = Path(os.environ.get("WANX_OFFICIAL_SRC", OFFICIAL_SRC_DEFAULT))
    if not (root / "modules" / "s2v" / "model_s2v.py").is_file():
        message = f"official Wan source not found at {root} (`bash scripts/setup.sh all` fetches it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    pytest.importorskip("diffusers")
    _package(PKG, root)
    _package(f"{PKG}.modules", root / "modules")
    _package(f"{PKG}.modules.s2v", root / "modules" / "s2v")
    _package(f"{PKG}.distributed", root / "distributed")
    _package(f"{PKG}.utils", root / "utils")
    sp = types.ModuleType(f"{PKG}.distributed.sequence_parallel")
    for fn in ("distributed_attention", "gather_forward", "get_rank", "get_world_size", "sp_attn_forward",
               "sp_dit_forward"):
        setattr(sp, fn, None)
    sys.modules.setdefault(sp.__name__, sp)
    import diffusers.models.modeling_utils  # noqa: F401 - before any stub is in place
    import transformers  # noqa: F401

    with _stubbed_imports():
        _exec(f"{PKG}.modules.attention", root / "modules" / "attention.py")
        model = _exec(f"{PKG}.modules.model", root / "modules" / "model.py")
        mods = {}
        for name in ("s2v_utils", "auxi_blocks", "audio_utils", "motioner", "model_s2v", "audio_encoder"):
            mods[name] = _exec(f"{PKG}.modules.s2v.{name}", root / "modules" / "s2v" / f"{name}.py")
    for mod in (model, mods["model_s2v"], mods["motioner"]):
        mod.flash_attention = _official_attention
    return types.SimpleNamespace(model=model, **mods)


# ------------------------------------------------------------------------- the official S2V loop

class _PyAVVideoReader:
    """decord's VideoReader, as the official pose reading uses it, on PyAV (decord is not installed)."""

    def __init__(self, path):
        import av

        with av.open(str(path)) as c:
            self.fps = float(c.streams.video[0].average_rate)
            self.frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])

    def get_avg_fps(self):
        return self.fps

    def __len__(self):
        return len(self.frames)

    def get_batch(self, indices):
        return types.SimpleNamespace(asnumpy=lambda: self.frames[list(indices)])


def _same_size(check):
    """A torchvision transform stand-in that only accepts inputs it would leave unchanged."""
    def transform(x):
        size = (x.height, x.width) if hasattr(x, "height") else tuple(x.shape[-2:])
        assert check(size), f"the official resize/crop would change a {size} input: use a matching size"
        return x
    return transform


def _torchvision_stub():
    """Resize/CenterCrop at identity (the tests give images and pose frames already at the output
    size: wanx's own resize/crop is tested separately) and ToTensor."""
    def to_tensor(img):
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0

    tf = types.SimpleNamespace(
        Resize=lambda n: _same_size(lambda hw: min(hw) == n),
        CenterCrop=lambda hw: _same_size(lambda size: tuple(size) == tuple(hw)),
        ToTensor=lambda: to_tensor, functional=types.SimpleNamespace())
    return types.SimpleNamespace(transforms=tf), tf


def official_speech2video():
    """The official ``wan/speech2video.py`` module (its ``WanS2V.generate`` is the reference loop)."""
    mods = official_s2v_modules()
    root = Path(sys.modules[PKG].__path__[0])
    name = f"{PKG}.speech2video"
    if name not in sys.modules:
        tv, tf = _torchvision_stub()
        stubs = {"decord": types.SimpleNamespace(VideoReader=_PyAVVideoReader), "torchvision": tv,
                 "torchvision.transforms": tf, "torchvision.transforms.functional": tf.functional,
                 f"{PKG}.modules.t5": types.SimpleNamespace(T5EncoderModel=None),
                 f"{PKG}.modules.vae2_1": types.SimpleNamespace(Wan2_1_VAE=None)}
        saved = {k: sys.modules.get(k) for k in stubs}
        sys.modules.update(stubs)
        try:
            _exec(name, root / "speech2video.py")
        finally:
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v
    return sys.modules[name], mods


class OfficialVAE:
    """wanx's VAE behind the official ``Wan2_1_VAE`` interface (lists of per-video tensors)."""

    def __init__(self, vae):
        self.vae, self.dtype, self.device = vae, torch.float32, torch.device("cpu")

    def encode(self, videos):
        return [self.vae.encode(u[None].float())[0] for u in videos]

    def decode(self, zs):
        return [self.vae.decode(u[None].float())[0] for u in zs]


class OfficialText:
    """wanx's text encoder behind the official ``T5EncoderModel`` call (t5_cpu path)."""

    def __init__(self, encoder):
        self.encoder = encoder

    def __call__(self, prompts, device):
        return [c.to(device) for c in self.encoder.encode(prompts)]


# --------------------------------------------------------------------------------- audio fixtures

def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Voice-like test signal at 16 kHz: harmonics with a moving pitch and some noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    x = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
    return (0.3 * x + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def write_audio(path, samples: np.ndarray, rate: int, codec: str, channels: int = 1, container=None):
    """Encode float samples with PyAV (a test fixture, the way users' files are made)."""
    import av

    layout = "mono" if channels == 1 else "stereo"
    data = np.repeat(samples[None], channels, axis=0).astype(np.float32)  # [channels, n]
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        fmt = stream.codec_context.codec.audio_formats[0].name
        resampler = av.AudioResampler(format=fmt, layout=layout, rate=rate)
        for start in range(0, data.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data[:, start:start + 1024]), format="fltp",
                                               layout=layout)
            frame.sample_rate = rate
            for f in resampler.resample(frame):
                for packet in stream.encode(f):
                    out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def tiny_wav2vec2_folder(folder, num_layers: int = 3, seed: int = 0):
    """A transformers Wav2Vec2ForCTC (stable layer norm, as xlsr-53) with random weights + processor."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4, intermediate_size=64,
        conv_dim=[16] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2],
        conv_bias=True, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        do_stable_layer_norm=True, feat_extract_norm="layer", vocab_size=8)
    model = transformers.Wav2Vec2ForCTC(cfg).eval()
    with torch.no_grad():  # transformers zero-inits some biases; make every tensor matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    model.save_pretrained(folder)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "a": 5, "b": 6, "c": 7}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tok = transformers.Wav2Vec2CTCTokenizer(str(folder / "vocab.json"))
    fe = transformers.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    transformers.Wav2Vec2Processor(feature_extractor=fe, tokenizer=tok).save_pretrained(folder)
    return folder, model


def official_encoder(folder, samples: np.ndarray):
    """The official AudioEncoder on the tiny folder, librosa.load returning ``samples``, and its
    wav2vec2's last state layer-normed as under the official transformers pin (if this
    transformers leaves it un-normed)."""
    transformers = pytest.importorskip("transformers")
    mods = official_s2v_modules()
    mods.audio_encoder.librosa = types.SimpleNamespace(load=lambda path, sr: (samples, sr))
    enc = mods.audio_encoder.AudioEncoder(model_id=str(folder))
    forward = enc.model.forward
    norm = enc.model.wav2vec2.encoder.layer_norm
    unnormed_last = int(transformers.__version__.split(".")[0]) >= 5

    def pinned(*args, **kw):
        out = forward(*args, **kw)
        if unnormed_last:
            out.hidden_states = (*out.hidden_states[:-1], norm(out.hidden_states[-1]))
        return out

    enc.model.forward = pinned
    return enc


# ------------------------------------------------------------------------------- model fixtures

GRID = (3, 8, 16)  # latent T, h, w (h, w multiples of 8 for the 4x motion bucket)
CTX_LEN = 7


def official_kwargs(cfg: S2VConfig) -> dict:
    d = cfg.to_dict()
    d["audio_inject_layers"] = list(d["audio_inject_layers"])
    return d


def make_inputs(cfg: S2VConfig, motion_frames: int = 19, seed: int = 3, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    t_, h, w = GRID
    return dict(
        x=torch.randn(batch, 16, t_, h, w, generator=g),
        context=torch.randn(batch, CTX_LEN, cfg.text_dim, generator=g),
        ref_latents=torch.randn(1, 16, 1, h, w, generator=g),
        motion_latents=torch.randn(1, 16, motion_frames, h, w, generator=g),
        cond_states=torch.randn(batch, 16, t_, h, w, generator=g),
        audio_input=torch.randn(batch, 25, cfg.audio_dim, 4 * t_, generator=g))


def run_official(ref, inp, t, *, pose: bool, drop: bool):
    cond = inp["cond_states"] if pose else torch.zeros_like(inp["cond_states"])
    return ref([inp["x"][0]], t=t, context=[inp["context"][0]], seq_len=None,
               ref_latents=inp["ref_latents"], motion_latents=inp["motion_latents"], cond_states=cond,
               audio_input=inp["audio_input"], motion_frames=[73, 19], drop_motion_frames=drop)[0]


def run_ours(ours, inp, t, *, pose: bool, drop: bool):
    return ours(inp["x"], t, inp["context"], ref_latents=inp["ref_latents"],
                motion_latents=inp["motion_latents"], audio_input=inp["audio_input"],
                cond_states=inp["cond_states"] if pose else None, motion_frames=(73, 19),
                drop_motion_frames=drop)
