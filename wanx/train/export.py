"""Stage 5 of the demo training: the official-layout folder ``load_pipeline`` reads, and the loss curve.

The folder is assembled in a temporary next to ``out`` and published in one rename
(:func:`wanx.atomic.atomic_output_dir`), so ``out`` holds either a complete model or what was
there before; an existing ``out`` is replaced only when the caller allows it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..atomic import atomic_output, atomic_output_dir
from .recipe import DemoRecipe


def write_json(path: Path, obj: Any, *, overwrite: bool = False) -> Path:
    """``obj`` as indented JSON, published atomically (replacing a file only with ``overwrite``)."""
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
    return path


def export_folder(out: Path, recipe: DemoRecipe, vae, t5, experts, summary: dict, *,
                  overwrite: bool = False) -> Path:
    """Publish the official t2v-A14B layout (tiny sizes), ``wanx.json`` and ``training_summary.json``
    as the folder ``out`` (see ``wanx.testing`` for the layout); returns ``out``."""
    with atomic_output_dir(out, overwrite=overwrite) as folder:
        write_model_files(folder, recipe, vae, t5, experts)
        write_json(folder / "training_summary.json", summary)
    return out


def write_model_files(folder: Path, recipe: DemoRecipe, vae, t5, experts) -> None:
    """The checkpoint files of the demo model, written into the (fresh) ``folder``."""
    from ..configs import get_task
    from ..loading.dit import save_dit
    from ..loading.t5 import save_t5
    from ..loading.vae import save_vae
    from ..text.demo_vocab import save_demo_tokenizer

    spec = get_task("t2v-A14B")
    save_demo_tokenizer(folder / spec.t5_tokenizer, model_max_length=recipe.text_len)
    save_t5(t5.float(), folder / spec.t5_checkpoint)
    save_vae(vae.float(), folder / spec.vae_checkpoint)
    for sub, model in zip(spec.expert_dirs, experts):
        save_dit(model.float(), folder / sub, layout="official")
    size = f"{recipe.size}*{recipe.size}"
    task = {"base": "t2v-A14B", "supported_sizes": [size], "default_size": size,
            "frame_num": recipe.frames, "sample_steps": recipe.sample_steps, "sample_shift": recipe.shift,
            "guide_scale": [recipe.guide_scale, recipe.guide_scale], "sample_fps": recipe.sample_fps,
            "boundary": recipe.boundary, "text_len": recipe.text_len,
            # The empty caption is what caption dropout trained as "unconditional".
            "negative_prompt": ""}
    write_json(folder / "wanx.json", {"t5": t5.cfg.to_dict(), "vae": vae.cfg.to_dict(), "task": task})


# ------------------------------------------------------------------------------------- loss curve

_COLOURS = {"vae": (40, 90, 200), "decoder": (230, 140, 20), "dit shared": (90, 90, 90),
            "dit high": (210, 60, 40), "dit low": (30, 150, 60)}


def write_loss_curve(log_path: Path, png: Path, width: int = 900, height: int = 360, *,
                     overwrite: bool = False) -> Path:
    """Two panels (VAE, DiT per expert), log-scale loss against step, smoothed; drawn with PIL.

    Published atomically; an existing ``png`` is replaced only with ``overwrite``.
    """
    from PIL import Image, ImageDraw

    series = loss_series(log_path)
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    panels = [("VAE reconstruction loss (then decoder fine-tuning)", ["vae", "decoder"]),
              ("DiT flow-matching loss", [k for k in series if k.startswith("dit")])]
    pw = width // 2
    for p, (title, keys) in enumerate(panels):
        _draw_panel(draw, (p * pw + 50, 30, (p + 1) * pw - 15, height - 35), p * pw + 2, title,
                    {k: series.get(k, []) for k in keys})
    with atomic_output(png, overwrite=overwrite) as tmp:
        img.save(tmp)
    return png


def loss_series(log_path: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, loss) per curve of ``log.jsonl``: "vae", "decoder" (continuing the VAE's steps), "dit <expert>"."""
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    series: dict[str, list[tuple[int, float]]] = {}
    vae_steps = max((r["step"] for r in rows if r["stage"] == "vae"), default=0)
    for r in rows:
        if r["stage"] in ("vae", "decoder"):  # decoder fine-tuning continues the VAE's curve
            key, step = r["stage"], r["step"] + (vae_steps if r["stage"] == "decoder" else 0)
        else:
            key, step = f"dit {r.get('expert', '')}".strip(), r["step"]
        series.setdefault(key, []).append((step, r["loss"]))
    return series


def _draw_panel(draw, box: tuple[int, int, int, int], label_x: int, title: str,
                curves: dict[str, list[tuple[int, float]]]) -> None:
    """One framed panel: log-scale y axis with three labels, each curve smoothed over 10 points."""
    x0, y0, x1, y1 = box
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    draw.text((x0, 8), title, fill=(0, 0, 0))
    pts = [pt for data in curves.values() for pt in data]
    if not pts:
        return
    smax = max(s for s, _ in pts)
    vals = [math.log10(max(v, 1e-6)) for _, v in pts]
    lo, hi = min(vals), max(vals)
    hi = hi if hi > lo else lo + 1
    for frac in (0.0, 0.5, 1.0):
        y = y1 - frac * (y1 - y0)
        draw.text((label_x, y - 6), f"{10 ** (lo + frac * (hi - lo)):.3g}", fill=(0, 0, 0))
    draw.text((x1 - 60, y1 + 5), f"step {smax}", fill=(0, 0, 0))
    for i, (k, data) in enumerate(curves.items()):
        if not data:
            continue
        win = 10
        smooth = [(s, sum(math.log10(max(v, 1e-6)) for _, v in data[max(0, j - win):j + 1])
                   / len(data[max(0, j - win):j + 1])) for j, (s, _) in enumerate(data)]
        xy = [(x0 + (x1 - x0) * s / max(smax, 1), y1 - (y1 - y0) * (v - lo) / (hi - lo)) for s, v in smooth]
        if len(xy) > 1:
            draw.line(xy, fill=_COLOURS.get(k, (0, 0, 0)), width=2)
        draw.text((x0 + 8, y0 + 6 + 12 * i), k, fill=_COLOURS.get(k, (0, 0, 0)))
