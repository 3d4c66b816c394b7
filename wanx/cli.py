"""`wanx generate | convert`: the command line. Every flag is defined once, in `build_parser()`."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

from .configs import TASKS, get_task, parse_size

log = logging.getLogger("wanx")


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {v!r}")


def _guide(v: str):
    """'5.0' -> 5.0; '3.0,4.0' -> (3.0, 4.0) as the official (low_noise, high_noise) tuple."""
    parts = [float(p) for p in v.split(",")]
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return tuple(parts)
    raise argparse.ArgumentTypeError("guide scale is one float or 'low,high'")


def add_generate_flags(p: argparse.ArgumentParser) -> None:
    """Flags mirroring the official generate.py, plus wanx's own (device, dtype, overrides)."""
    p.add_argument("prompt_pos", nargs="?", metavar="PROMPT", help="the prompt (same as --prompt)")
    p.add_argument("--task", default=None, choices=sorted(TASKS),
                   help="task; default: read from the checkpoint folder (t2v-A14B for the demo)")
    p.add_argument("--size", default=None, help="W*H, e.g. 1280*720 (max area for image-to-video)")
    p.add_argument("--frame_num", type=int, default=None, help="number of frames, 4n+1")
    p.add_argument("--ckpt_dir", default=None, help="checkpoint folder; default: the built-in demo model")
    p.add_argument("--prompt", default=None, help="the prompt")
    p.add_argument("--negative_prompt", default="", help="negative prompt; empty: the official default")
    p.add_argument("--image", default=None, help="input image (i2v-A14B; optional for ti2v-5B)")
    p.add_argument("--sample_solver", default="unipc", choices=["unipc", "dpm++", "euler"])
    p.add_argument("--sample_steps", type=int, default=None, help="denoising steps (task default)")
    p.add_argument("--sample_shift", type=float, default=None, help="noise-schedule shift (task default)")
    p.add_argument("--sample_guide_scale", type=_guide, default=None,
                   help="classifier-free guidance: one float, or 'low,high' per expert")
    p.add_argument("--boundary", type=float, default=None,
                   help="expert switch as a ratio of 1000 timesteps (0.875: high-noise while t >= 875)")
    p.add_argument("--base_seed", type=int, default=-1, help="seed; -1 picks a random one")
    p.add_argument("--offload_model", type=_bool, default=None,
                   help="keep inactive models on the CPU (default: True on a single GPU)")
    p.add_argument("--t5_cpu", action="store_true", help="run the text encoder on the CPU")
    p.add_argument("--convert_model_dtype", action="store_true", help="convert the DiT to bfloat16")
    p.add_argument("--save_file", default=None, help="output .mp4 (default: an auto-generated name)")
    p.add_argument("--overwrite", action="store_true", help="replace --save_file if it exists")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="DiT/text-encoder compute dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--allow_any_size", action="store_true",
                   help="accept sizes outside the task's official list (must still divide the stride)")
    p.add_argument("--attention", default=None, help="attention backend: sdpa, flash2, flash3, sage")
    p.add_argument("--vae_tiling", action="store_true", help="decode in spatial tiles to bound memory")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the DiT blocks (slower first step, faster after; needs a C++ compiler on CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wanx", description="Run the Wan 2.2 video models.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_flags(sub.add_parser("generate", help="generate a video"))
    from .train.cli import add_train_flags

    add_train_flags(sub.add_parser("train", help="train the built-in demo model"))
    conv = sub.add_parser("convert", help="rewrite a checkpoint as safetensors with official key names")
    conv.add_argument("kind", choices=["dit", "vae", "t5"], help="which component")
    conv.add_argument("src", help="official .pth/.safetensors, diffusers folder or single file")
    conv.add_argument("dst", help="output .safetensors file (dit: output folder)")
    conv.add_argument("--overwrite", action="store_true")
    conv.add_argument("--num_heads", type=int, default=None,
                      help="dit single files: head count when the width is not a multiple of 128")
    return parser


class UsageError(ValueError):
    """Bad command-line input, reported before anything is loaded."""


def _check_generate(args) -> tuple:
    """Validate everything cheap (flags, files, folder layout) and return (layout, prompt, size)."""
    from .loading.layout import find_checkpoint
    from .loading.safe import CheckpointError
    from .pipelines.loader import demo_checkpoint_dir

    prompt = args.prompt if args.prompt is not None else args.prompt_pos
    if not prompt:
        raise UsageError("a prompt is required: wanx generate \"a red circle moving left\"")
    if args.task is not None and not get_task(args.task).runnable:
        raise UsageError(f"task {args.task} is not runnable yet: {get_task(args.task).note}")
    if args.frame_num is not None and (args.frame_num < 1 or (args.frame_num - 1) % 4):
        raise UsageError(f"--frame_num must be 4n+1 (e.g. 17, 81, 121), got {args.frame_num}")
    if args.image is not None and not Path(args.image).is_file():
        raise UsageError(f"--image not found: {args.image}")
    try:
        layout = find_checkpoint(args.ckpt_dir or demo_checkpoint_dir(), task=args.task)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    spec = layout.spec
    if spec.dit.model_type == "i2v" and args.image is None:
        raise UsageError(f"task {spec.name} needs --image")
    if spec.dit.model_type == "t2v" and args.image is not None:
        raise UsageError(f"task {spec.name} is text-to-video; --image is not used (did you mean i2v-A14B?)")
    size = args.size or spec.default_size
    w, h = parse_size(size)
    if f"{w}*{h}" not in spec.supported_sizes and not args.allow_any_size:
        raise UsageError(f"size {size} is not supported by {spec.name}; supported: "
                         f"{', '.join(spec.supported_sizes)} (or pass --allow_any_size)")
    if w % spec.size_multiple or h % spec.size_multiple:
        raise UsageError(f"size {size}: width and height must be divisible by {spec.size_multiple}")
    if args.save_file and Path(args.save_file).exists() and not args.overwrite:
        raise UsageError(f"{args.save_file} exists; pass --overwrite to replace it")
    return layout, prompt, (w, h)


def _default_save_file(task: str, size: tuple[int, int], prompt: str) -> str:
    stem = re.sub(r"[^\w\-]+", "_", prompt[:50]).strip("_")
    return f"{task}_{size[0]}*{size[1]}_{stem}_{time.strftime('%Y%m%d_%H%M%S')}.mp4"


def _peak_memory(device) -> str:
    import resource

    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    text = f"peak RSS {rss:.0f} MiB"
    if device.type == "cuda":
        text += f", peak GPU {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    return text


def cmd_generate(args) -> int:
    import torch

    from . import load_pipeline
    from .model import set_attention_backend

    layout, prompt, size = _check_generate(args)
    if args.attention:
        set_attention_backend(args.attention)
    t0 = time.perf_counter()
    device = torch.device(args.device) if args.device else None
    offload = args.offload_model
    if offload is None:  # official default: offload on a single GPU
        offload = torch.cuda.is_available() and (device is None or device.type == "cuda")
    pipe = load_pipeline(layout.root, task=layout.spec.name, device=device, dtype=args.dtype,
                         offload_model=offload, t5_cpu=args.t5_cpu,
                         convert_model_dtype=args.convert_model_dtype, vae_tiling=args.vae_tiling,
                         compile=args.compile)
    load_s = time.perf_counter() - t0
    video = pipe.generate(prompt, negative_prompt=args.negative_prompt or None, image=args.image,
                          size=size, frame_num=args.frame_num, sample_steps=args.sample_steps,
                          sample_shift=args.sample_shift, guide_scale=args.sample_guide_scale,
                          boundary=args.boundary, sample_solver=args.sample_solver,
                          seed=args.base_seed, progress=True)
    save_file = args.save_file or _default_save_file(pipe.task, video.size, prompt)
    path = video.save(save_file, overwrite=args.overwrite)
    secs = video.stats.get("seconds", {})
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in {"load": load_s, **secs}.items())
    print(f"saved {path} ({video.num_frames} frames, {video.size[0]}x{video.size[1]} @ {video.fps} fps, "
          f"seed {video.metadata['seed']}) | {stages} | {_peak_memory(pipe.device)}")
    return 0


def cmd_convert(args) -> int:
    dst = Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise UsageError(f"{dst} exists; pass --overwrite to replace it")
    if args.kind == "vae":
        from .loading.vae import convert_vae

        convert_vae(args.src, dst)
    elif args.kind == "dit":
        from .loading.dit import load_dit, save_dit

        save_dit(load_dit(args.src, num_heads=args.num_heads), dst, layout="official")
    else:
        from .loading.t5 import load_t5, save_t5

        save_t5(load_t5(args.src), dst)
    print(f"wrote {dst}")
    return 0


def _cmd_train(args) -> int:
    from .train.cli import cmd_train

    return cmd_train(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    handlers = {"generate": cmd_generate, "convert": cmd_convert, "train": _cmd_train}
    try:
        return handlers[args.command](args)
    except (UsageError, FileExistsError) as e:
        print(f"wanx: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
