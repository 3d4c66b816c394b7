"""Before/after check for refactors: generate every task x solver on fixed tiny checkpoints, compare.

    python scripts/compare_outputs.py build  DIR          # write the tiny checkpoints once
    python scripts/compare_outputs.py record DIR out.pt   # videos of the code checked out now
    python scripts/compare_outputs.py compare a.pt b.pt   # bit-identical? (max abs difference per case)

Uses only the public API (`wanx.load_pipeline(...).generate(...)`), so any two commits compare.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TASKS = ("t2v-A14B", "i2v-A14B", "ti2v-5B")
SOLVERS = ("unipc", "dpm++", "euler")


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(80, 96, 3), dtype=np.uint8))


def build(root: Path) -> None:
    from wanx.testing import build_tiny_checkpoint

    for i, task in enumerate(TASKS):
        build_tiny_checkpoint(root / task, task, seed=i)


def _cases(root: Path):
    for task in TASKS:
        images = {"t2v-A14B": [None], "i2v-A14B": [_image()], "ti2v-5B": [None, _image()]}[task]
        for solver in SOLVERS:
            for image in images:
                name = f"{task}/{solver}/{'image' if image is not None else 'text'}"
                yield name, root / task, dict(image=image, sample_solver=solver)
    for solver in SOLVERS:
        yield f"demo/{solver}", None, dict(sample_solver=solver)
    # Non-default knobs: per-expert guidance, a moved boundary, more steps and frames, a shift.
    yield "t2v-A14B/knobs", root / "t2v-A14B", dict(guide_scale=(2.0, 6.0), boundary=0.5, sample_steps=7,
                                                    sample_shift=3.0, frame_num=9)
    yield "ti2v-5B/knobs", root / "ti2v-5B", dict(image=_image(), guide_scale=1.0, sample_steps=5,
                                                  size=(128, 64), frame_num=9)


def record(root: Path, out: Path) -> None:
    import wanx

    results = {}
    for name, folder, kw in _cases(root):
        pipe = wanx.load_pipeline(folder, device="cpu")
        video = pipe.generate("a red circle moving left", seed=42, **kw)
        results[name] = video.tensor.clone()
        print(name, tuple(video.tensor.shape))
    torch.save(results, out)


def compare(a: Path, b: Path) -> int:
    ra, rb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    bad = 0
    for name in sorted(set(ra) | set(rb)):
        if name not in ra or name not in rb:
            print(f"{name}: only in one run")
            bad += 1
            continue
        same = torch.equal(ra[name], rb[name])
        diff = (ra[name] - rb[name]).abs().max().item() if ra[name].shape == rb[name].shape else float("nan")
        print(f"{name:28s} {'identical' if same else 'DIFFERENT'}  max|diff| {diff:.3g}")
        bad += not same
    print(f"{len(ra)} cases, {bad} different")
    return 1 if bad else 0


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    if cmd == "build":
        build(Path(rest[0]))
    elif cmd == "record":
        record(Path(rest[0]), Path(rest[1]))
    else:
        sys.exit(compare(Path(rest[0]), Path(rest[1])))
