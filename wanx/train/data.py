"""Synthetic clips for the built-in demo model: one coloured shape moving over a plain background.

Every clip is described by a :class:`ClipSpec`; rendering is a pure function of the spec, so a
seed fixes a whole dataset. Positions, sizes and speeds are fractions of the frame, so one spec
renders at 32×32 and 64×64 alike. Shapes are anti-aliased; size varies per clip, not within one.

Caption template (canonical, documented here once):

    short: "a {colour} {shape} moving {motion}"           e.g. "a red circle moving left"
    long:  "a {colour} {shape} moving {motion} on a {background} background"

The short form is the prompt users type (README: ``wanx generate "a red circle moving left"``),
so training mixes both: a random share of samples (``background_share``, default 0.5) carries the
long caption and the rest the short one, which teaches the model that an unnamed background
means "any".

Held-out split: 8 of the 48 colour×shape×motion triples never occur in training. They were picked
so that no two of them share a (colour, shape), (colour, motion) or (shape, motion) pair; hence
every single attribute *and every pair of attributes* is still seen in training, and the held-out
captions test composition rather than unseen words.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

# Saturated, well-separated hues (red 0°, yellow ~54°, green 120°, blue ~234°), so the analyser
# can classify by hue even after a blurry VAE washes them towards the background. Green is bright on
# purpose: (30, 200, 30) has the luma of mid-gray, and luma-heavy codecs (JPEG) then lose it.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (60, 240, 60),
    "blue": (40, 60, 230),
    "yellow": (240, 220, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "white": (255, 255, 255),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
MOTIONS: dict[str, tuple[int, int]] = {  # unit step (dx, dy) in image coordinates (y points down)
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}

# An object must differ from its background by at least this RGB distance and this luma (BT.601)
# difference; below them a tiny VAE (and the analyser) could lose the object's edges. With the
# palette above every pair passes (min distance ≈ 140, min luma gap ≈ 38), so all 12
# colour×background pairs are used; the check guards future palette edits.
MIN_CONTRAST = 100.0
MIN_LUMA_CONTRAST = 25.0

# Chosen by hand to the rule in the module docstring; the README prompt (red circle left) is a
# training triple so that the first thing users try is in-distribution.
HELDOUT_TRIPLES: tuple[tuple[str, str, str], ...] = (
    ("red", "triangle", "left"),
    ("red", "square", "up"),
    ("green", "triangle", "right"),
    ("green", "circle", "down"),
    ("blue", "square", "left"),
    ("blue", "triangle", "up"),
    ("yellow", "circle", "right"),
    ("yellow", "square", "down"),
)
ALL_TRIPLES: tuple[tuple[str, str, str], ...] = tuple(
    itertools.product(COLOURS, SHAPES, MOTIONS)
)
TRAIN_TRIPLES: tuple[tuple[str, str, str], ...] = tuple(
    t for t in ALL_TRIPLES if t not in HELDOUT_TRIPLES
)

# Half width and half height of each shape's bounding box, in units of the spec's radius ``size``.
# The square is a little smaller and the triangle a little wider than the circle, so their areas
# are alike (circle 3.1 r², square 2.9 r², triangle 2.3 r²); the triangle fills its box by 1/2.
HALF_EXTENT = {"circle": (1.0, 1.0), "square": (0.85, 0.85), "triangle": (1.15, 1.0)}
# Object radius as a fraction of the frame: 0.22 .. 0.27, i.e. a 14–17 px wide object at 32×32,
# two latent pixels of a VAE with an 8× spatial stride, about four at the demo VAE's 4×. At
# 0.16 .. 0.20 (1.4 latent pixels at 8×) a tiny VAE turned every shape into the same blob
# (analyser shape accuracy 35% ≈ chance after a VAE round trip, see the model card), so the
# objects grew; at 8× squares still came back with round corners, so the demo VAE lost a stage.
SIZE_RANGE = (0.22, 0.27)
# Share of the free room along the motion axis that the object travels during the clip: at
# least 25% of the frame even for the widest shape at its largest size (1 - 2·1.15·0.27 - 2/32
# = 0.316 of room, times 0.8).
TRAVEL_RANGE = (0.8, 1.0)
DEFAULT_FRAMES = 17
DEFAULT_SIZE = 64


def _rgb_distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


def luma(rgb: tuple[int, int, int]) -> float:
    """BT.601 luma of an RGB triple (what JPEG keeps at full resolution)."""
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def allowed_backgrounds(colour: str) -> tuple[str, ...]:
    """Backgrounds an object of this colour may be drawn on (enough contrast to stay visible)."""
    fg = COLOURS[colour]
    return tuple(
        b for b, bg in BACKGROUNDS.items()
        if _rgb_distance(fg, bg) >= MIN_CONTRAST and abs(luma(fg) - luma(bg)) >= MIN_LUMA_CONTRAST
    )


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines one clip; geometry in fractions of the frame side.

    ``start`` is the object's centre (x, y) at frame 0, ``speed`` the centre's displacement per
    frame along ``motion``, ``size`` the object's radius (its bounding box reaches
    ``HALF_EXTENT[shape] * size`` either side of the centre).
    """

    colour: str
    shape: str
    motion: str
    background: str
    start: tuple[float, float]
    speed: float
    size: float

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.motion)

    def centres(self, frames: int = DEFAULT_FRAMES) -> np.ndarray:
        """Object centre per frame, [F, 2] as (x, y) frame fractions."""
        step = np.array(MOTIONS[self.motion], dtype=np.float64) * self.speed
        return np.asarray(self.start, dtype=np.float64) + np.arange(frames)[:, None] * step

    def fits(self, frames: int = DEFAULT_FRAMES) -> bool:
        """True if the whole object stays inside the frame for all ``frames``."""
        c = self.centres(frames)
        half = np.array(HALF_EXTENT[self.shape]) * self.size  # (x, y)
        return bool(np.all(c - half >= 0.0) and np.all(c + half <= 1.0))


def split_triples(split: str) -> tuple[tuple[str, str, str], ...]:
    """The colour×shape×motion triples of a split: "train", "heldout" or "all"."""
    table = {"train": TRAIN_TRIPLES, "heldout": HELDOUT_TRIPLES, "all": ALL_TRIPLES}
    if split not in table:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(table)}")
    return table[split]


def sample_spec(
    rng: np.random.Generator, split: str = "train", frames: int = DEFAULT_FRAMES
) -> ClipSpec:
    """Draw one clip spec from ``split``; the object stays fully inside for ``frames`` frames."""
    triples = split_triples(split)
    colour, shape, motion = triples[rng.integers(len(triples))]
    return spec_for(rng, colour, shape, motion, frames=frames)


def spec_for(
    rng: np.random.Generator,
    colour: str,
    shape: str,
    motion: str,
    background: str | None = None,
    frames: int = DEFAULT_FRAMES,
) -> ClipSpec:
    """Draw background (unless given), size, start and speed for one colour/shape/motion."""
    if background is None:
        backgrounds = allowed_backgrounds(colour)
        background = backgrounds[rng.integers(len(backgrounds))]
    size = float(rng.uniform(*SIZE_RANGE))
    dx, dy = MOTIONS[motion]
    # Free room for the centre per axis; a one-pixel-at-32 margin beyond the shape's extent keeps
    # anti-aliased edges off the border (the analyser reads the background from the border).
    room_x, room_y = ((h * size + 1 / 32, 1 - h * size - 1 / 32) for h in HALF_EXTENT[shape])
    (lo, hi), room_across = (room_x, room_y) if dx else (room_y, room_x)
    travel = float(rng.uniform(*TRAVEL_RANGE)) * (hi - lo)
    along = float(rng.uniform(lo, hi - travel))  # lowest coordinate visited along the motion axis
    across = float(rng.uniform(*room_across))
    start_along = along + travel if (dx + dy) < 0 else along
    start = (start_along, across) if dx != 0 else (across, start_along)
    return ClipSpec(colour, shape, motion, background, start, travel / (frames - 1), size)


def triple_split(colour: str, shape: str, motion: str) -> str:
    """"heldout" if the triple is held out of training, else "train"."""
    return "heldout" if (colour, shape, motion) in HELDOUT_TRIPLES else "train"


def _coverage(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape of radius ``r`` centred at the origin.

    ``x``, ``y`` are pixel-centre offsets in pixels. Coverage is 0.5 - (signed distance), clipped,
    which is the exact area fraction for straight edges and a close one for the circle.
    """
    if shape == "circle":
        sdf = np.hypot(x, y) - r
    elif shape == "square":
        half = HALF_EXTENT["square"][0] * r
        sdf = np.maximum(np.abs(x), np.abs(y)) - half
    elif shape == "triangle":
        sdf = _triangle_sdf(x, y, r)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.clip(0.5 - sdf, 0.0, 1.0)


def _triangle_sdf(x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (exact inside, a lower bound outside) to an upward isosceles triangle.

    Apex (0, -r), base from (-1.15 r, r) to (1.15 r, r): bounding box 2.3r × 2r, so the fill ratio
    of its box is exactly 1/2, far from the circle's π/4 and the square's 1.
    """
    half_base, height = HALF_EXTENT["triangle"][0] * r, 2.0 * r
    norm = np.hypot(height, half_base)
    # Both slanted edges pass through the apex; (±height, -half_base)/norm are their outward
    # normals.
    right = (height * x - half_base * (y + r)) / norm
    left = (-height * x - half_base * (y + r)) / norm
    # The bounding box is a second lower bound of the distance; it stops the slanted planes from
    # spilling faint coverage past the sharp corners (and hence onto the frame border).
    box = np.maximum(np.abs(x) - half_base, np.abs(y) - r)
    return np.maximum.reduce([right, left, y - r, box])


def render_clip(
    spec: ClipSpec, frames: int = DEFAULT_FRAMES, size: int = DEFAULT_SIZE
) -> np.ndarray:
    """Render a spec to uint8 [F, S, S, 3]."""
    centres = spec.centres(frames) * size  # [F, 2] in pixels
    pix = np.arange(size, dtype=np.float64) + 0.5  # pixel centres
    x = pix[None, None, :] - centres[:, 0, None, None]  # [F, 1, S]
    y = pix[None, :, None] - centres[:, 1, None, None]  # [F, S, 1]
    x, y = np.broadcast_arrays(x, y)  # [F, S, S]
    alpha = _coverage(spec.shape, x, y, spec.size * size)[..., None]  # [F, S, S, 1]
    fg = np.asarray(COLOURS[spec.colour], dtype=np.float64)
    bg = np.asarray(BACKGROUNDS[spec.background], dtype=np.float64)
    return np.rint(alpha * fg + (1.0 - alpha) * bg).astype(np.uint8)


def format_caption(colour: str | None, shape: str | None, motion: str | None,
                   background: str | None = None) -> str:
    """The canonical caption: short form, or long form when ``background`` is given. A ``None``
    colour or motion is left out and a ``None`` shape reads "shape" (training-only partial captions)."""
    text = "a " + " ".join(w for w in (colour, shape or "shape") if w)
    if motion:
        text += f" moving {motion}"
    return f"{text} on a {background} background" if background else text


def partial_caption(colour: str, shape: str, motion: str, background: str | None, omit: str) -> str:
    """A caption with one attribute left unnamed (``omit`` in colour/shape/motion), as used for
    training only: "a square moving left", "a blue shape moving left", "a blue square"."""
    fields = dict(colour=colour, shape=shape, motion=motion)
    if omit not in fields:
        raise ValueError(f"omit must be colour, shape or motion, not {omit!r}")
    return format_caption(**{**fields, omit: None}, background=background)


def caption(spec: ClipSpec, with_background: bool = False) -> str:
    """The canonical caption of a spec (short form unless ``with_background``)."""
    return format_caption(*spec.triple, spec.background if with_background else None)


_CAPTION_RE = re.compile(
    r"^(?:an? )?(?P<colour>\w+) (?P<shape>\w+) moving (?P<motion>\w+)"
    r"(?: on (?:an? |the )?(?P<background>\w+) background)?$"
)


def parse_caption_full(text: str) -> tuple[str, str, str, str | None]:
    """Parse a caption into (colour, shape, motion, background or None); ValueError if not one."""
    norm = " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())
    m = _CAPTION_RE.match(norm)
    if m is None:
        raise ValueError(f"not a demo caption: {text!r} (e.g. 'a red circle moving left')")
    colour, shape, motion, background = m.group("colour", "shape", "motion", "background")
    background = "gray" if background == "grey" else background
    for word, vocab in ((colour, COLOURS), (shape, SHAPES), (motion, MOTIONS)):
        if word not in vocab:
            raise ValueError(f"unknown word {word!r} in caption {text!r}")
    if background is not None and background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r} in caption {text!r}")
    return colour, shape, motion, background


def parse_caption(text: str) -> tuple[str, str, str]:
    """Parse a short or long caption into (colour, shape, motion)."""
    return parse_caption_full(text)[:3]


def all_captions(split: str = "all", with_background: bool = False) -> list[str]:
    """Short captions (or long ones, one per allowed background) of every triple in ``split``."""
    out = []
    for colour, shape, motion in split_triples(split):
        backgrounds = allowed_backgrounds(colour) if with_background else (None,)
        out.extend(format_caption(colour, shape, motion, bg) for bg in backgrounds)
    return out


def make_specs(
    n: int, seed: int, split: str = "train", frames: int = DEFAULT_FRAMES
) -> list[ClipSpec]:
    """``n`` specs drawn deterministically from ``seed``."""
    rng = np.random.default_rng(seed)
    return [sample_spec(rng, split, frames) for _ in range(n)]


def make_dataset(
    n: int,
    seed: int,
    split: str = "train",
    frames: int = DEFAULT_FRAMES,
    size: int = DEFAULT_SIZE,
    background_share: float = 0.5,
) -> tuple[np.ndarray, list[str]]:
    """``n`` clips uint8 [N, F, S, S, 3] and their captions, deterministic in ``seed``.

    A ``background_share`` of the captions name the background; the rest use the short form.
    About 0.2 MB per clip at 64×64×17: for long training runs draw batches with fresh seeds.
    """
    specs = make_specs(n, seed, split, frames)
    # A separate stream for caption forms, so changing the share never changes the clips.
    long_form = np.random.default_rng([seed, 1]).random(n) < background_share
    clips = np.zeros((n, frames, size, size, 3), np.uint8)
    for i, spec in enumerate(specs):
        clips[i] = render_clip(spec, frames, size)
    return clips, [caption(s, bool(lf)) for s, lf in zip(specs, long_form)]


def to_model_input(clips):
    """uint8 [..., F, S, S, 3] (numpy or torch) -> float32 torch [..., 3, F, S, S] in [-1, 1]."""
    import torch

    t = torch.as_tensor(np.asarray(clips)).float() / 127.5 - 1.0
    return t.movedim(-1, -4).contiguous()  # channels ahead of the frame axis


def from_model_output(video) -> np.ndarray:
    """float [..., 3, F, S, S] in [-1, 1] (torch or numpy) -> uint8 numpy [..., F, S, S, 3]."""
    import torch

    t = torch.as_tensor(video).detach().float().cpu().movedim(-4, -1)
    return ((t.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).numpy()
