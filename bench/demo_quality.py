"""Demo-model quality: does a generated clip show what its caption says?

Every caption of the train and held-out splits (see wanx.train.data) is generated with a few seeds
and judged by the automatic analyser (bench/clip_analysis.py). The table gives, per split, the share
of clips whose colour, shape and motion (and all three) match, plus mean flicker figures; JSON
goes to bench/out/.

    python bench/demo_quality.py --ground-truth --degrade all --size 32 64   # analyser ceiling
    python bench/demo_quality.py --ckpt-dir PATH                             # a trained model
    python bench/demo_quality.py --ground-truth --strip bench/out/strip.png  # look at clips
    python bench/demo_quality.py --ground-truth --vae-roundtrip --size 32       # the VAE ceiling

``--ground-truth`` scores rendered clips (optionally degraded), which is the analyser's ceiling
and its validation; the default mode loads ``wanx.load_pipeline(ckpt_dir)`` (None: the built-in
demo model) and scores what it generates.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python bench/demo_quality.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.clip_analysis import DEGRADATIONS, analyze_clip, score  # noqa: E402
from wanx.train.data import (  # noqa: E402
    all_captions,
    parse_caption_full,
    render_clip,
    spec_for,
    triple_split,
)

OUT_DIR = Path(__file__).resolve().parent / "out"
SPLITS = ("train", "heldout")
SCORE_KEYS = ("colour", "shape", "motion", "all", "background")


# ---- generation: the only part that touches a model ----------------------------------------


def load_demo_pipeline(ckpt_dir: str | None = None):
    """``wanx.load_pipeline(ckpt_dir)``; exits with a clear message when nothing can be loaded."""
    try:
        import wanx

        return wanx.load_pipeline(ckpt_dir)
    except Exception as exc:  # any failure here means "no model to score": say so and stop
        what = "the built-in demo model" if ckpt_dir is None else repr(ckpt_dir)
        raise SystemExit(
            f"demo_quality: could not load {what}: {type(exc).__name__}: {exc}\n"
            "  (the demo model may not be trained yet; --ground-truth scores rendered clips)"
        ) from exc


def generate_clip(pipeline, caption: str, seed: int, **overrides) -> np.ndarray:
    """GENERATED MODE: one clip for ``caption`` from ``pipeline`` -> uint8 [F, H, W, 3].

    ``overrides`` (guide_scale, sample_steps, sample_solver...) go to ``pipeline.generate``;
    None values are dropped so the model's own defaults apply.
    """
    kw = {k: v for k, v in overrides.items() if v is not None}
    frames = np.asarray(pipeline.generate(prompt=caption, seed=seed, **kw).frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"pipeline returned frames {frames.dtype} {frames.shape}; expected uint8 [F, H, W, 3]"
        )
    return frames


# ---- ground truth: rendered clips, optionally degraded ---------------------------------------


def ground_truth_clip(
    caption: str, seed: int, size: int = 64, frames: int = 17, degrade: str = "clean"
) -> np.ndarray:
    """Render a clip matching ``caption`` (random background when unnamed), then degrade it."""
    colour, shape, motion, background = parse_caption_full(caption)
    rng = np.random.default_rng(seed)
    spec = spec_for(rng, colour, shape, motion, background, frames)
    return DEGRADATIONS[degrade](render_clip(spec, frames, size), rng)


# ---- scoring and tables -----------------------------------------------------------------------


def caption_split(caption: str) -> str:
    """"train" or "heldout", by the caption's colour×shape×motion triple."""
    return triple_split(*parse_caption_full(caption)[:3])


def score_clip(frames: np.ndarray, caption: str) -> dict:
    """One result row: the caption, its split, the analysis and the per-field verdicts."""
    analysis = analyze_clip(frames)
    return {
        "caption": caption,
        "split": caption_split(caption),
        "seen": {k: getattr(analysis, k) for k in ("colour", "shape", "motion", "background")},
        "found": analysis.object_found,
        "area_flicker": analysis.area_flicker,
        "colour_flicker": analysis.colour_flicker,
        **score(analysis, caption),
    }


def score_clips(items) -> list[dict]:
    """Score an iterable of (frames, caption) pairs into result rows."""
    return [score_clip(frames, caption) for frames, caption in items]


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(values)) if values else None


def summarise(rows: list[dict]) -> dict:
    """Per split: clip count, % correct per field (background only over captions naming one),
    % of clips with an object found, and mean flicker figures over clips with an object."""
    out = {}
    for split in SPLITS:
        sel = [r for r in rows if r["split"] == split]
        if not sel:
            continue
        summary = {"n": len(sel), "found": 100.0 * _mean([r["found"] for r in sel])}
        for key in SCORE_KEYS:
            pct = _mean([None if r[key] is None else float(r[key]) for r in sel])
            summary[key] = None if pct is None else 100.0 * pct
        summary["area_flicker"] = _mean([r["area_flicker"] for r in sel if r["found"]])
        summary["colour_flicker"] = _mean([r["colour_flicker"] for r in sel if r["found"]])
        out[split] = summary
    return out


PCT_COLUMNS = ("colour", "shape", "motion", "all", "background", "found")
FLICKER_COLUMNS = ("area_flicker", "colour_flicker")


def markdown_table(results: list[tuple[str, dict]]) -> str:
    """Markdown table of (label, summarise() output) pairs: one row per label and split."""
    names = ["clips", "split", "n", *PCT_COLUMNS, *(c.replace("_", " ") for c in FLICKER_COLUMNS)]
    lines = ["| " + " | ".join(names) + " |", "|---" * len(names) + "|"]
    for label, summary in results:
        for split, s in summary.items():
            cells = [label, split, str(s["n"])]
            cells += ["—" if s[c] is None else f"{s[c]:.1f}%" for c in PCT_COLUMNS]
            cells += ["—" if s[c] is None else f"{s[c]:.4f}" for c in FLICKER_COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(payload: dict, name: str, out_dir: Path = OUT_DIR) -> Path:
    """Write ``payload`` to out_dir/name.json (NaN becomes null) and return the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_json_default, allow_nan=False) + "\n")
    return path


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _clean_nan(rows: list[dict]) -> list[dict]:
    """NaN flicker figures (no object found) become None: strict JSON has no NaN."""
    def fix(v):
        return None if isinstance(v, float) and np.isnan(v) else v

    return [{k: fix(v) for k, v in r.items()} for r in rows]


# ---- filmstrips ---------------------------------------------------------------------------------


def write_strip(
    clips: list[np.ndarray], captions: list[str], path: str | Path, every: int = 2, scale: int = 2
) -> Path:
    """PNG, one row per clip: every ``every``-th frame, upscaled ``scale``×, under its caption."""
    from PIL import Image, ImageDraw

    rows = []
    for clip, text in zip(clips, captions):
        gap = np.full((clip.shape[1], 1, 3), 160, np.uint8)  # a gray line between frames
        pieces = [x for frame in clip[::every] for x in (frame, gap)][:-1]
        strip = np.concatenate(pieces, axis=1)  # [H, W', 3]
        img = Image.fromarray(strip).resize((strip.shape[1] * scale, strip.shape[0] * scale),
                                            Image.NEAREST)
        row = Image.new("RGB", (img.width, img.height + 14), (255, 255, 255))
        row.paste(img, (0, 14))
        ImageDraw.Draw(row).text((2, 1), text, fill=(0, 0, 0))
        rows.append(row)
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), (255,) * 3)
    y = 0
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


# ---- command line -------------------------------------------------------------------------------


def eval_captions(with_background: bool) -> list[str]:
    """Every train caption, then every held-out caption."""
    return [c for split in SPLITS for c in all_captions(split, with_background)]


def vae_roundtrip(vae, frames: np.ndarray) -> np.ndarray:
    """uint8 [F, H, W, 3] -> the same clip encoded and decoded by ``vae`` (the VAE's ceiling)."""
    import torch

    from wanx.train.data import from_model_output, to_model_input

    with torch.no_grad():
        video = to_model_input(frames)[None].to(vae.device)
        return from_model_output(vae.decode(vae.encode(video))[0])


def run_ground_truth(args) -> dict:
    """Score rendered clips for every caption × seed, per size and degradation (optionally after a
    round trip through a model's VAE: ``--vae-roundtrip``)."""
    names = list(DEGRADATIONS) if args.degrade == ["all"] else args.degrade
    captions = eval_captions(args.with_background)
    results, payload = [], {"mode": "ground-truth", "runs": []}
    vae = load_demo_pipeline(args.ckpt_dir).vae if args.vae_roundtrip else None
    through = (lambda clip: vae_roundtrip(vae, clip)) if vae is not None else (lambda clip: clip)
    for size in args.size:
        for name in names:
            t0 = time.perf_counter()
            items = ((through(ground_truth_clip(c, seed, size, args.frames, name)), c)
                     for c in captions for seed in range(args.seeds))
            rows = score_clips(items)
            summary = summarise(rows)
            results.append((f"{size}px {name}" + (" via VAE" if vae is not None else ""), summary))
            payload["runs"].append({"size": size, "degrade": name, "summary": summary,
                                    "seconds": time.perf_counter() - t0, "rows": _clean_nan(rows)})
    payload["table"] = markdown_table(results)
    return payload


def run_generated(args) -> dict:
    """Generate every caption × seed with the pipeline and score the clips."""
    pipeline = load_demo_pipeline(args.ckpt_dir)
    captions = eval_captions(args.with_background)
    rows, t0 = [], time.perf_counter()
    for c in captions:
        for seed in range(args.seeds):
            rows.append(score_clip(generate_clip(pipeline, c, seed, **generate_overrides(args)), c))
    summary = summarise(rows)
    return {"mode": "generated", "ckpt_dir": args.ckpt_dir, "overrides": generate_overrides(args),
            "summary": summary,
            "seconds_per_clip": (time.perf_counter() - t0) / max(len(rows), 1),
            "table": markdown_table([("generated", summary)]), "rows": _clean_nan(rows)}


def strip_clips(args) -> tuple[list[np.ndarray], list[str]]:
    """A few clips to look at: four train captions (each colour, varied motions), two held out."""
    train, heldout = all_captions("train"), all_captions("heldout")
    captions = [train[11 * i] for i in range(4)] + heldout[::4]
    if args.ground_truth:
        name = args.degrade[0] if args.degrade != ["all"] else "clean"
        return [ground_truth_clip(c, i, args.size[0], args.frames, name)
                for i, c in enumerate(captions)], captions
    pipeline = load_demo_pipeline(args.ckpt_dir)
    return [generate_clip(pipeline, c, i, **generate_overrides(args))
            for i, c in enumerate(captions)], captions


def generate_overrides(args) -> dict:
    """Sampling settings given on the command line (None: the model's default)."""
    guide = args.guide_scale
    return {"guide_scale": None if guide is None else (guide[0] if len(guide) == 1 else tuple(guide)),
            "sample_steps": args.sample_steps, "sample_solver": args.sample_solver,
            "sample_shift": args.sample_shift}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ground-truth", action="store_true",
                   help="score rendered clips (the analyser's ceiling)")
    p.add_argument("--degrade", nargs="+", default=["clean"], choices=[*DEGRADATIONS, "all"],
                   help="ground-truth degradations to apply (default clean)")
    p.add_argument("--size", nargs="+", type=int, default=[64], help="ground-truth frame sizes")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--seeds", type=int, default=2, help="clips per caption")
    p.add_argument("--with-background", action="store_true",
                   help="use captions naming the background (also scores it)")
    p.add_argument("--ckpt-dir", default=None, help="model folder (default: built-in demo model)")
    p.add_argument("--vae-roundtrip", action="store_true",
                   help="ground truth: pass each clip through the model's VAE (its ceiling)")
    p.add_argument("--guide-scale", type=float, nargs="+", default=None,
                   help="CFG scale (one value, or low high) instead of the model's default")
    p.add_argument("--sample-steps", type=int, default=None)
    p.add_argument("--sample-shift", type=float, default=None)
    p.add_argument("--sample-solver", default=None, choices=["unipc", "dpm++", "euler"])
    p.add_argument("--strip", default=None, help="also write a PNG filmstrip of a few clips here")
    p.add_argument("--out", default=None, help="JSON name under bench/out/ (default by mode)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.strip:
        print(f"strip: {write_strip(*strip_clips(args), args.strip)}")
    payload = run_ground_truth(args) if args.ground_truth else run_generated(args)
    path = write_json(payload, args.out or f"demo_quality_{payload['mode']}")
    print(payload["table"])
    print(f"\njson: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
