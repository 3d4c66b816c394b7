"""Step caching: what MagCache (and the first-block cache) save, and what they cost in quality.

    python -m bench.cache                                  # demo model + medium wall time
    python -m bench.cache --seeds 1 --skip-medium          # quicker: demo only, one seed

Demo model (``wanx.load_pipeline(None)``, its own 25-step recipe): the ratios are first measured
by ``wanx calibrate magcache`` (run as ``python -m wanx.cache.command``); then every caption of
the quality benchmark (bench/demo_quality.py) x seed is generated uncached and under each cache,
in rotating order, and we report block-stack evaluations (computed / total), wall time per clip,
PSNR of the frames against the uncached clip, and prompt adherence as the quality benchmark's
analyser scores it. Medium (bench/common.py's random-weight "medium" DiT, 1920 tokens): the wall
and CPU time of denoising cached vs uncached at the same settings, runs alternated (the CPU time
of this process is steadier than wall time on shared cores; one VAE decode is timed for scale);
its weights are random, so it uses the published T2V-A14B ratios (the skip schedule a real A14B
would get) and says nothing about quality. Generations run as ``denoise_request`` + ``decode``, i.e.
``WanPipeline.run`` with ``run_plan(cache=...)``. JSON goes to ``bench/out/cache.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/cache.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import wanx  # noqa: E402,I001  first: it sets OMP_WAIT_POLICY=PASSIVE, read when torch loads OpenMP

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench.common import SIZES, machine  # noqa: E402
from bench.demo_quality import eval_captions, score_clip, summarise  # noqa: E402
from wanx.cache import denoise_request, resolve_cache  # noqa: E402
from wanx.media import to_uint8  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "out"
ROOT = Path(__file__).resolve().parent.parent


def calibrate_demo(path: Path) -> float:
    """``wanx calibrate magcache`` on the demo model (its default prompt and recipe); returns seconds."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "wanx.cache.command", "magcache", "--out", str(path), "--overwrite",
           "--device", "cpu"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"calibration failed:\n{done.stderr}")
    print(done.stdout.strip())
    return time.perf_counter() - t0


def generate_frames(pipe, req, cache) -> tuple[np.ndarray, float, float]:
    """uint8 frames [F, H, W, 3] and the wall and CPU seconds of one whole generation (text to frames)."""
    t0, c0 = time.perf_counter(), time.process_time()
    frames = to_uint8(pipe.decode(denoise_request(pipe, req, cache)))
    return frames, time.perf_counter() - t0, time.process_time() - c0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def demo_configs(pipe, ratios: Path, thresholds: list[float], fb_thresholds: list[float]) -> dict[str, Any]:
    configs: dict[str, Any] = {"uncached": None}
    for th in thresholds:
        configs[f"magcache {th:g}"] = resolve_cache(f"magcache:{th},ratios={ratios}", pipe.facts)
    for th in fb_thresholds:
        configs[f"fbcache {th:g}"] = resolve_cache(f"fbcache:{th}", pipe.facts)
    return configs


def run_demo(args) -> dict[str, Any]:
    ratios = Path(args.out) / "cache_demo_ratios.json"
    calibration_s = calibrate_demo(ratios)
    pipe = wanx.load_pipeline(None, device="cpu")
    configs = demo_configs(pipe, ratios, args.thresholds, args.fb_thresholds)
    names = list(configs)
    per = {n: {"rows": [], "seconds": [], "cpu_seconds": [], "psnr": [], "computed": 0, "evaluations": 0,
               "blocks_run": 0} for n in names}
    depth = len(pipe.experts[0].blocks)
    captions = eval_captions(False)[:args.captions or None]
    for k, (caption, seed) in enumerate((c, s) for c in captions for s in range(args.seeds)):
        req = pipe.resolve(caption, seed=seed)
        order = names[k % len(names):] + names[:k % len(names)]  # rotate, so no config always runs first
        frames, branch_runs = {}, sum(2 if step.uncond else 1 for step in pipe.plan(req))
        for name in order:
            frames[name], seconds, cpu_seconds = generate_frames(pipe, req, configs[name])
            per[name]["seconds"].append(seconds)
            per[name]["cpu_seconds"].append(cpu_seconds)
            stats = configs[name].last_stats if configs[name] is not None else None
            per[name]["computed"] += stats["computed"] if stats else branch_runs
            per[name]["evaluations"] += stats["evaluations"] if stats else branch_runs
            per[name]["blocks_run"] += stats["blocks_run"] if stats else branch_runs * depth
        for name in names:
            per[name]["rows"].append(score_clip(frames[name], caption))
            per[name]["psnr"].append(psnr(frames[name], frames["uncached"]))
        if (k + 1) % 24 == 0:
            print(f"demo: {k + 1} of {len(captions) * args.seeds} clips", file=sys.stderr, flush=True)
    return {"calibration_seconds": calibration_s, "ratios_file": ratios.name,
            "ratios": json.loads(ratios.read_text()), "clips": len(captions) * args.seeds,
            "configs": {n: summarise_config(per[n], per["uncached"]) for n in names},
            "describe": {n: (c.describe() if c is not None else None) for n, c in configs.items()}}


def summarise_config(mine: dict, base: dict) -> dict[str, Any]:
    rows, base_rows = mine["rows"], base["rows"]
    finite = [p for p in mine["psnr"] if math.isfinite(p)]
    agree = sum(a["all"] == b["all"] for a, b in zip(rows, base_rows)) / len(rows)
    return {"computed": mine["computed"], "evaluations": mine["evaluations"],
            "fewer": mine["evaluations"] / mine["computed"], "blocks_run": mine["blocks_run"],
            "blocks_fraction": mine["blocks_run"] / base["blocks_run"],
            "median_s": statistics.median(mine["seconds"]),
            "time_ratio": statistics.median(a / b for a, b in zip(mine["seconds"], base["seconds"])),
            "cpu_ratio": statistics.median(a / b for a, b in zip(mine["cpu_seconds"], base["cpu_seconds"])),
            "psnr_mean": statistics.fmean(finite) if finite else math.inf,
            "psnr_min": min(mine["psnr"]), "identical_clips": len(rows) - len(finite),
            "adherence": summarise(rows), "all_pct": 100.0 * statistics.fmean(float(r["all"]) for r in rows),
            "same_verdict_pct": 100.0 * agree}


def demo_table(result: dict[str, Any]) -> str:
    base = result["configs"]["uncached"]["all_pct"]
    lines = ["| demo (25 steps, CFG 1.75) | block-stack runs computed / total | fewer | blocks run | "
             "s per clip (median) | wall / CPU time vs uncached | PSNR vs uncached (mean / min) | "
             "adherence all: train / held-out / both | vs uncached | same verdict |", "|---" * 10 + "|"]
    for name, c in result["configs"].items():
        train, held = (c["adherence"].get(split, {}).get("all") for split in ("train", "heldout"))
        psnr_text = "identical" if c["identical_clips"] == result["clips"] else (
            f"{c['psnr_mean']:.1f} / {c['psnr_min']:.1f} dB")
        lines.append(f"| {name} | {c['computed']} / {c['evaluations']} | {c['fewer']:.2f}x "
                     f"| {100 * c['blocks_fraction']:.0f}% | {c['median_s']:.3f} "
                     f"| {c['time_ratio']:.2f} / {c['cpu_ratio']:.2f} | {psnr_text} | {_pct(train)} / {_pct(held)} "
                     f"/ {c['all_pct']:.1f}% | {c['all_pct'] - base:+.1f} pp | {c['same_verdict_pct']:.1f}% |")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def run_medium(args) -> dict[str, Any]:
    """Denoising wall and CPU time on the random-weight medium model, uncached vs MagCache, alternated."""
    from bench.pipeline import build_checkpoint, video_size

    size = SIZES["medium"]
    folder = build_checkpoint(size, Path(args.workdir) / "ckpt-medium")
    pipe = wanx.load_pipeline(folder, device="cpu", dtype=torch.float32)
    w, h, frames = video_size(size)
    req = pipe.resolve("a red circle moving left", size=(w, h), frame_num=frames,
                       sample_steps=args.medium_steps, seed=42)
    configs = {"uncached": None,
               "magcache": resolve_cache(f"magcache:{args.medium_threshold},ratios=t2v-A14B", pipe.facts)}
    wall: dict[str, list[float]] = {n: [] for n in configs}
    cpu: dict[str, list[float]] = {n: [] for n in configs}
    latents = {}
    for r in range(args.medium_repeats):
        for name in (list(configs) if r % 2 == 0 else list(configs)[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            latents[name] = denoise_request(pipe, req, configs[name])
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    t0 = time.perf_counter()
    pipe.decode(latents["uncached"])
    decode_s = time.perf_counter() - t0
    stats = configs["magcache"].last_stats
    med = {k: {n: statistics.median(v) for n, v in d.items()} for k, d in (("wall", wall), ("cpu", cpu))}
    return {"size": "medium", "tokens": size.tokens, "layers": size.dit.num_layers, "steps": args.medium_steps,
            "video": f"{w}x{h}x{frames}", "threshold": args.medium_threshold, "ratios": "published:t2v-A14B",
            "computed": stats["computed"], "evaluations": stats["evaluations"],
            "fewer": stats["evaluations"] / stats["computed"], "wall_s": wall, "cpu_s": cpu, "median_s": med,
            "wall_ratio": med["wall"]["magcache"] / med["wall"]["uncached"],
            "wall_ratio_per_round": statistics.median(a / b for a, b in zip(wall["magcache"], wall["uncached"])),
            "cpu_ratio": med["cpu"]["magcache"] / med["cpu"]["uncached"], "decode_s": decode_s,
            "latent_max_abs_diff": (latents["magcache"] - latents["uncached"]).abs().max().item()}


def medium_table(m: dict[str, Any]) -> str:
    wall, cpu = m["median_s"]["wall"], m["median_s"]["cpu"]
    return ("| medium (random weights), denoising only | block-stack runs computed / total | fewer | wall s "
            "uncached / magcache | wall ratio (medians / per round) | CPU s uncached / magcache | CPU ratio |\n"
            "|---|---|---|---|---|---|---|\n"
            f"| {m['tokens']} tokens, {m['layers']} layers, {m['steps']} steps, CFG, magcache {m['threshold']:g} "
            f"(T2V-A14B table) | {m['computed']} / {m['evaluations']} | {m['fewer']:.2f}x "
            f"| {wall['uncached']:.1f} / {wall['magcache']:.1f} | {m['wall_ratio']:.3f} / "
            f"{m['wall_ratio_per_round']:.3f} | {cpu['uncached']:.1f} / {cpu['magcache']:.1f} | "
            f"{m['cpu_ratio']:.3f} |")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.06, 0.1, 0.15], help="MagCache thresholds")
    p.add_argument("--fb-thresholds", type=float, nargs="*", default=[0.1], help="first-block cache thresholds")
    p.add_argument("--seeds", type=int, default=3, help="clips per caption (demo)")
    p.add_argument("--captions", type=int, default=0, help="only the first N captions (0: all 48)")
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument("--skip-medium", action="store_true")
    p.add_argument("--medium-steps", type=int, default=8)
    p.add_argument("--medium-threshold", type=float, default=0.06)
    p.add_argument("--medium-repeats", type=int, default=3)
    p.add_argument("--workdir", default=str(OUT_DIR / "work"))
    p.add_argument("--out", default=str(OUT_DIR))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"command": "python -m bench.cache " + " ".join(sys.argv[1:] if argv is None else argv),
                           "machine": machine()}
    tables = []
    if not args.skip_demo:
        doc["demo"] = run_demo(args)
        tables.append(demo_table(doc["demo"]))
        print(tables[-1], flush=True)
    if not args.skip_medium:
        doc["medium"] = run_medium(args)
        tables.append(medium_table(doc["medium"]))
        print(tables[-1], flush=True)
    path = Path(args.out) / "cache.json"
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (Path(args.out) / "cache.md").write_text(f"`{doc['command']}`\n\n" + "\n\n".join(tables) + "\n")
    print(f"\njson: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
