"""Automatic analysis of a demo clip: which colour, shape and motion a generated video shows.

The analyser is the demo model's judge, so it is validated on rendered clips and on degraded ones
(blur, noise, JPEG, colour shift: what a tiny VAE does to a clip); `bench/demo_quality.py
--ground-truth` prints its accuracy. Pipeline per clip (uint8 [F, H, W, 3]):

1. background = per-channel median of the border pixels over all frames;
2. object = pixels far (RGB distance) from the background: threshold at half the clip's object
   contrast (99th percentile of the distance), then the largest 4-connected component per frame;
3. colour = nearest palette hue of the object's core pixels (hue survives the washing-out towards
   the background that blur causes; RGB nearest-neighbour does not: pink would read as yellow);
4. shape = rules on (fill ratio of the bounding box, vertical skewness of the mass), clean values
   square (1, 0), circle (π/4, 0), triangle (1/2, -0.57), measured on soft coverage so edges
   count fractionally and anti-aliasing or blur barely moves the figures;
5. motion = least-squares slope of the centroid over the clip; dominant axis and sign, "static"
   when the displacement is under 8% of the frame;
6. flicker = mean absolute frame-to-frame change of the object's area (relative to its mean
   area) and of its mean colour (fraction of the 0..255 range).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

from wanx.train.data import BACKGROUNDS, COLOURS, MOTIONS, parse_caption_full

# Below this 99th-percentile RGB distance from the background there is no object to speak of.
MIN_OBJECT_CONTRAST = 40.0
# A displacement under this fraction of the frame is "static" (training motions travel >= 25%).
STATIC_THRESHOLD = 0.08
# A background farther than this from every palette background is reported as "other".
BACKGROUND_TOLERANCE = 80.0
# Shape rules on (fill ratio of the soft bounding box, vertical skewness of the mass). Clean
# renders give square (1, 0), circle (π/4, 0), triangle (1/2, -0.57). Blur pushes the triangle's
# fill ratio up towards the circle's, while circles and squares keep |skew| < 0.1 even under heavy
# blur; so a clearly bottom-heavy mass is a triangle first, and the fill ratio decides the rest
# at the midpoints between prototypes.
TRIANGLE_SKEW = -0.2
TRIANGLE_FILL = (0.5 + math.pi / 4) / 2  # 0.64
SQUARE_FILL = (math.pi / 4 + 1.0) / 2  # 0.89


@dataclass
class ClipAnalysis:
    """What the analyser saw in one clip: seven headline fields, then diagnostics.

    Flicker figures are NaN and colour/shape/motion None when no object was found.
    """

    colour: str | None
    shape: str | None
    motion: str | None
    background: str
    area_flicker: float
    colour_flicker: float
    object_found: bool
    displacement: tuple[float, float] = (0.0, 0.0)  # (dx, dy) over the clip, frame fractions
    fill_ratio: float = float("nan")
    skewness: float = float("nan")
    object_rgb: tuple[float, float, float] = (float("nan"),) * 3
    contrast: float = 0.0
    found_frames: int = 0


def _border_median(frames: np.ndarray) -> np.ndarray:
    """Per-channel median of the 1-pixel border ring over all frames: [3]."""
    ring = np.concatenate(
        [frames[:, 0], frames[:, -1], frames[:, 1:-1, 0], frames[:, 1:-1, -1]], axis=1
    )  # [F, 2W + 2(H-2), 3]
    return np.median(ring.reshape(-1, 3), axis=0)


def _nearest_background(rgb: np.ndarray) -> str:
    names = list(BACKGROUNDS)
    d = [np.linalg.norm(rgb - np.asarray(BACKGROUNDS[n], np.float64)) for n in names]
    i = int(np.argmin(d))
    return names[i] if d[i] <= BACKGROUND_TOLERANCE else "other"


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 4-connected component of each frame of a [F, H, W] bool mask.

    Label propagation (each pixel takes the largest index among its neighbours) plus pointer
    jumping (take the label of the pixel one's label points at) converges in a few dozen
    vectorised passes, with no scipy dependency.
    """
    f, h, w = mask.shape
    idx = np.arange(1, f * h * w + 1).reshape(f, h, w)
    labels = np.where(mask, idx, 0)
    while True:
        p = np.pad(labels, ((0, 0), (1, 1), (1, 1)))
        nb = np.maximum.reduce(
            [labels, p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]]
        )
        nb = np.where(mask, nb, 0)
        flat = nb.ravel()
        nb = np.where(mask, flat[np.maximum(nb, 1) - 1], 0)  # jump: label of my label's pixel
        if np.array_equal(nb, labels):
            break
        labels = nb
    keep = np.zeros_like(mask)
    for t in range(f):
        ids, counts = np.unique(labels[t][labels[t] > 0], return_counts=True)
        if ids.size:
            keep[t] = labels[t] == ids[np.argmax(counts)]
    return keep


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3×3 binary dilation of a [F, H, W] mask (to take in the soft edge around the object)."""
    p = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    h, w = mask.shape[1:]
    return np.logical_or.reduce([p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)])


def _hue(rgb: np.ndarray) -> tuple[float, float]:
    """(hue in degrees, saturation) of one RGB triple in 0..255."""
    r, g, b = (float(c) for c in rgb)
    hi, lo = max(r, g, b), min(r, g, b)
    if hi - lo < 1e-6:
        return 0.0, 0.0
    if hi == r:
        h = (g - b) / (hi - lo) % 6
    elif hi == g:
        h = (b - r) / (hi - lo) + 2
    else:
        h = (r - g) / (hi - lo) + 4
    return 60.0 * h, (hi - lo) / hi


def classify_colour(rgb: np.ndarray) -> str | None:
    """Palette colour of nearest hue; None for an achromatic object (saturation < 0.15)."""
    hue, sat = _hue(rgb)
    if sat < 0.15:
        return None
    dist = {n: abs((hue - _hue(np.asarray(c))[0] + 180) % 360 - 180) for n, c in COLOURS.items()}
    return min(dist, key=dist.get)


def _shape_features(alpha: np.ndarray) -> tuple[float, float]:
    """(fill ratio, vertical skewness) of one frame's soft object coverage [H, W]."""
    area = alpha.sum()
    width = alpha.max(axis=0).sum()  # soft extents: partial edge columns count fractionally
    height = alpha.max(axis=1).sum()
    rows = alpha.sum(axis=1)
    y = np.arange(rows.size, dtype=np.float64)
    mean = (rows * y).sum() / area
    var = (rows * (y - mean) ** 2).sum() / area
    skew = (rows * (y - mean) ** 3).sum() / area / max(var, 1e-9) ** 1.5
    return float(area / max(width * height, 1e-9)), float(skew)


def classify_shape(fill: float, skew: float) -> str:
    """Shape from (fill ratio, vertical skewness); see the TRIANGLE_/SQUARE_ thresholds."""
    if skew < TRIANGLE_SKEW or fill < TRIANGLE_FILL:
        return "triangle"
    return "square" if fill >= SQUARE_FILL else "circle"


def classify_motion(dx: float, dy: float) -> str:
    """Direction of a displacement (frame fractions, y down): dominant axis and sign, or static."""
    if max(abs(dx), abs(dy)) < STATIC_THRESHOLD:
        return "static"
    step = (int(np.sign(dx)), 0) if abs(dx) >= abs(dy) else (0, int(np.sign(dy)))
    return next(name for name, v in MOTIONS.items() if v == step)


def _mean_abs_step(x: np.ndarray) -> float:
    return float(np.abs(np.diff(x, axis=0)).mean()) if len(x) > 1 else 0.0


def _not_found(background: str, contrast: float) -> ClipAnalysis:
    return ClipAnalysis(None, None, None, background, float("nan"), float("nan"), False,
                        contrast=contrast)


def analyze_clip(frames: np.ndarray) -> ClipAnalysis:
    """Analyse a uint8 [F, H, W, 3] clip: colour, shape, motion, background and flicker."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [F, H, W, 3], got shape {frames.shape}")
    f = frames.astype(np.float64)
    n, h, w, _ = f.shape
    bg_rgb = _border_median(f)
    background = _nearest_background(bg_rgb)
    dist = np.linalg.norm(f - bg_rgb, axis=-1)  # [F, H, W]
    contrast = float(np.percentile(dist, 99))
    if contrast < MIN_OBJECT_CONTRAST:
        return _not_found(background, contrast)
    mask = _largest_component(dist > contrast / 2)
    areas = mask.sum(axis=(1, 2))
    found = areas >= max(4, 0.002 * h * w)
    if found.sum() < max(2, n // 2):
        return _not_found(background, contrast)
    alpha = np.clip(dist / contrast, 0.0, 1.0) * _dilate(mask)  # soft coverage near the object
    core = mask & (dist > 0.75 * contrast)  # away from edges blended with the background
    return _describe(f, alpha, mask, core, found, background, contrast)


def _motion(a: np.ndarray, t: np.ndarray, n: int) -> tuple[float, float]:
    """Centroid displacement (dx, dy) over an ``n``-frame clip, in frame fractions.

    ``a`` is the soft coverage [T, H, W] of the frames ``t`` that show the object; the slope of a
    least-squares line through the centroids is used, so one bad frame moves it little.
    """
    h, w = a.shape[1:]
    area = a.sum(axis=(1, 2))
    cx = (a.sum(axis=1) * np.arange(w)).sum(axis=1) / area
    cy = (a.sum(axis=2) * np.arange(h)).sum(axis=1) / area
    return np.polyfit(t, cx, 1)[0] * (n - 1) / w, np.polyfit(t, cy, 1)[0] * (n - 1) / h


def _shape(a: np.ndarray, m: np.ndarray) -> tuple[float, float]:
    """Median (fill ratio, skewness) over frames of soft coverage ``a`` and mask ``m`` [T, H, W]."""
    # Objects cut by the frame edge have a misleading shape; use whole ones when there are any.
    inside = ~(m[:, 0].any(1) | m[:, -1].any(1) | m[:, :, 0].any(1) | m[:, :, -1].any(1))
    feats = np.array([_shape_features(x) for x in (a[inside] if inside.any() else a)])
    fill, skew = np.median(feats, axis=0)
    return float(fill), float(skew)


def _describe(f, alpha, mask, core, found, background, contrast) -> ClipAnalysis:
    """Turn the per-frame masks of a found object into a ClipAnalysis."""
    t = np.nonzero(found)[0]
    a = alpha[t]  # [T, H, W]
    dx, dy = _motion(a, t, f.shape[0])
    fill, skew = _shape(a, mask[t])
    core_t = np.where(core[t].any(axis=(1, 2))[:, None, None], core[t], mask[t])
    rgb_t = np.stack([f[i][c].mean(axis=0) for i, c in zip(t, core_t)])  # [T, 3]
    rgb = rgb_t.mean(axis=0)
    area = a.sum(axis=(1, 2))
    return ClipAnalysis(
        colour=classify_colour(rgb),
        shape=classify_shape(fill, skew),
        motion=classify_motion(dx, dy),
        background=background,
        area_flicker=_mean_abs_step(area) / float(area.mean()),
        colour_flicker=_mean_abs_step(rgb_t) / 255.0,
        object_found=True,
        displacement=(float(dx), float(dy)),
        fill_ratio=fill,
        skewness=skew,
        object_rgb=tuple(float(c) for c in rgb),
        contrast=contrast,
        found_frames=int(len(t)),
    )


def score(analysis: ClipAnalysis, caption: str) -> dict:
    """Compare an analysis with a caption: colour, shape, motion, all (those three) and background.

    ``background`` is None when the caption does not name one (short form).
    """
    colour, shape, motion, background = parse_caption_full(caption)
    out = {
        "colour": analysis.colour == colour,
        "shape": analysis.shape == shape,
        "motion": analysis.motion == motion,
    }
    out["all"] = all(out.values())
    out["background"] = None if background is None else analysis.background == background
    return out


# ---- degradations for validating the analyser (a stand-in for a tiny VAE's reconstruction) ----


def gaussian_blur(frames: np.ndarray, sigma: float) -> np.ndarray:
    """Spatial Gaussian blur of uint8 [F, H, W, 3] (reflect padding, separable kernel)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    out = frames.astype(np.float64)
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        p = np.pad(out, pad, mode="reflect")
        size = out.shape[axis]
        out = sum(k[i] * np.take(p, np.arange(i, i + size), axis=axis) for i in range(k.size))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def add_noise(frames: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Add i.i.d. Gaussian noise of ``sigma`` (0..255 units) to every pixel and channel."""
    noisy = frames.astype(np.float64) + rng.normal(0.0, sigma, frames.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def jpeg(frames: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip every frame through PIL's JPEG encoder (block artefacts, chroma subsampling)."""
    from PIL import Image

    out = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    return np.stack(out)


def colour_shift(frames: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Shift each channel of the whole clip by a random offset in [-amount, amount]."""
    offset = rng.uniform(-amount, amount, size=3)
    return np.clip(np.rint(frames.astype(np.float64) + offset), 0, 255).astype(np.uint8)


def vae_like(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """All mild degradations at once: blur 1 px, colour shift ±10, noise 4, JPEG quality 75."""
    x = colour_shift(gaussian_blur(frames, 1.0), 10.0, rng)
    return jpeg(add_noise(x, 4.0, rng), 75)


# name -> f(frames, rng). The analyser must score >= 95% on the MILD ones at both sizes; the
# others are reported for context (at 32×32, JPEG q30 smears a 10-pixel triangle into a blob).
DEGRADATIONS = {
    "clean": lambda x, rng: x,
    "blur1": lambda x, rng: gaussian_blur(x, 1.0),
    "blur1.5": lambda x, rng: gaussian_blur(x, 1.5),
    "noise8": lambda x, rng: add_noise(x, 8.0, rng),
    "jpeg50": lambda x, rng: jpeg(x, 50),
    "shift15": lambda x, rng: colour_shift(x, 15.0, rng),
    "vae-like": vae_like,
    "jpeg30": lambda x, rng: jpeg(x, 30),
    "blur2.5": lambda x, rng: gaussian_blur(x, 2.5),
}
MILD = ("blur1", "blur1.5", "noise8", "jpeg50", "shift15", "vae-like")
