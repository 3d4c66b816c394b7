"""`wanx generate | convert | train`: the command line. Every flag is defined once, in `build_parser()`.

The CLI only parses arguments: checking them is the resolver's job (`wanx.request`), done before
any weight is read; every user-facing error is printed as ``wanx: error: ...`` with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .configs import TASKS, get_task
from .errors import Cancelled, GenerationError, InputError
from .version import __version__

log = logging.getLogger("wanx")

SOLVERS = ("unipc", "dpm++", "euler", "flow_euler")  # wanx.sampling.SAMPLERS; --help needs no torch
RECIPES = ("lightning",)  # wanx.request.RECIPES
QUANT = ("int8", "fp8")
LORA_MODES = ("fuse", "live")
LORA_TARGETS = ("diffusers", "comfy", "official")  # wanx.lora.cli.CONVERT_TARGETS
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION = ("sdpa", "math", "flash2", "flash3", "sage")
# Resolver argument -> the flag a CLI user typed, for error messages.
FLAGS = {"prompt": "--prompt", "negative_prompt": "--negative_prompt", "image": "--image", "size": "--size",
         "frame_num": "--frame_num", "sample_steps": "--sample_steps", "sample_shift": "--sample_shift",
         "guide_scale": "--sample_guide_scale", "boundary": "--boundary", "sample_solver": "--sample_solver",
         "seed": "--base_seed", "save_file": "--save_file", "device": "--device", "dtype": "--dtype",
         "threads": "--threads", "recipe": "--recipe", "timesteps": "--timesteps",
         "boundary_step": "--boundary_step", "cfg_first_steps": "--cfg_first_steps",
         "cfg_first_scale": "--cfg_first_scale", "quantize": "--quantize", "t5_quantize": "--t5_quantize",
         "dit_files": "--dit_files", "lora": "--lora", "cache": "--cache", "out": "--out"}


def _flag_names() -> dict[str, str]:
    from .batch.cli import FLAGS as BATCH
    from .distributed.flags import FLAGS as DISTRIBUTED

    return {**FLAGS, **DISTRIBUTED, **BATCH}


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {v!r}")


def _guide(v: str):
    """'5.0' -> 5.0; '3.0,4.0' -> (3.0, 4.0) as the official (low_noise, high_noise) tuple."""
    try:
        parts = [float(p) for p in v.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'low,high', got {v!r}") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return tuple(parts)
    raise argparse.ArgumentTypeError("guide scale is one float or 'low,high'")


def _floats(v: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in v.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {v!r}") from None


def add_generate_flags(p: argparse.ArgumentParser) -> None:
    """Flags mirroring the official generate.py, plus wanx's own (device, dtype, overrides)."""
    p.add_argument("prompt_pos", nargs="?", metavar="PROMPT", help="the prompt (same as --prompt)")
    p.add_argument("--task", default=None, choices=sorted(TASKS), metavar="TASK",
                   help=f"one of {', '.join(TASKS)}; default: read from the checkpoint folder")
    p.add_argument("--size", default=None, help="W*H, e.g. 1280*720 (the pixel budget for i2v); default: the task's")
    p.add_argument("--frame_num", type=int, default=None, help="number of frames, 4n+1; default: the task's")
    p.add_argument("--ckpt_dir", default=None, help="checkpoint folder (official or diffusers); default: the demo model")
    p.add_argument("--prompt", default=None, help="the prompt")
    p.add_argument("--negative_prompt", default="", help="negative prompt; empty: the official default")
    p.add_argument("--image", default=None, help="input image file: required for i2v-A14B, optional for ti2v-5B")
    p.add_argument("--sample_solver", default=None, choices=SOLVERS,
                   help=f"one of {', '.join(SOLVERS)} (default: unipc, or the recipe's)")
    p.add_argument("--recipe", default=None, choices=RECIPES,
                   help="lightning: the 4-step distilled preset (flow_euler, shift 5, guidance 1, 2+2 experts); "
                        "explicit flags override its settings")
    p.add_argument("--timesteps", type=_floats, default=None,
                   help="explicit timesteps the DiT sees, e.g. 1000,937.5,833.33,625 (Euler solvers; no shift applied)")
    p.add_argument("--boundary_step", type=int, default=None,
                   help="switch to the low-noise expert at this step index instead of by timestep")
    p.add_argument("--cfg_first_steps", type=int, default=0,
                   help="real guidance for this many first steps, live LoRAs off (against slow 4-step motion)")
    p.add_argument("--cfg_first_scale", type=_guide, default=None,
                   help="guidance of those first steps: one float or 'low,high' (default: the task's official)")
    p.add_argument("--sample_steps", type=int, default=None, help="denoising steps; default: the task's")
    p.add_argument("--sample_shift", type=float, default=None, help="noise-schedule shift (> 0); default: the task's")
    p.add_argument("--sample_guide_scale", type=_guide, default=None,
                   help="classifier-free guidance: one float, or 'low,high' per expert")
    p.add_argument("--boundary", type=float, default=None,
                   help="expert switch as a ratio of 1000 timesteps in [0, 1] (0.875: high-noise while t >= 875)")
    p.add_argument("--base_seed", type=int, default=-1, help="seed in [0, 2^64); -1 picks a random one")
    add_memory_flags(p)
    p.add_argument("--save_file", default=None,
                   help="output .mp4; default: <task>_<W>x<H>_<prompt>_<time>.mp4 in the current folder")
    p.add_argument("--overwrite", action="store_true", help="replace --save_file if it exists")
    p.add_argument("--allow_any_size", action="store_true",
                   help="accept sizes outside the task's official list (must still divide the stride)")
    p.add_argument("--cache", default=None, metavar="magcache[:THRESH][,K=..,R=..,ratios=FILE]|fbcache[:THRESH]",
                   help="step cache: skip the DiT block stack on steps whose residual barely changes (off by default)")
    p.add_argument("--lora", action="append", default=None, metavar="PATH[:STRENGTH][@high|@low]",
                   help="apply a LoRA file (any format in the wild); repeat for several; @high/@low: one expert")
    p.add_argument("--lora_mode", default="fuse", choices=LORA_MODES,
                   help="fuse (merged into the weights) or live (unmerged: switchable per step, quantized weights)")
    from .prompts import add_prompt_extend_flags

    add_prompt_extend_flags(p)


def add_memory_flags(p: argparse.ArgumentParser) -> None:
    """Where models live, which precision, which kernels: the speed and memory flags of ``generate``."""
    p.add_argument("--offload_model", type=_bool, default=None,
                   help="True/False: keep inactive models on the CPU (default: True on a single GPU)")
    p.add_argument("--t5_cpu", action="store_true", help="run the text encoder on the CPU")
    p.add_argument("--convert_model_dtype", action="store_true", help="convert the DiT to bfloat16")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if present)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="DiT/text-encoder compute dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: all cores; idle threads sleep: OMP_WAIT_POLICY=PASSIVE)")
    p.add_argument("--attention", default=None, choices=ATTENTION, help=f"attention backend: {', '.join(ATTENTION)}")
    p.add_argument("--dit_files", nargs="+", default=None, metavar="FILE",
                   help="the DiT as single files (two-expert tasks: high-noise then low-noise): GGUF, fp8/int8 "
                        "or plain safetensors; umT5, VAE and tokenizer from --ckpt_dir")
    p.add_argument("--quantize", default=None, choices=QUANT, help="weight-only quantize the DiT while loading: int8, fp8")
    p.add_argument("--t5_quantize", default=None, choices=QUANT, help="weight-only quantize the umT5 encoder: int8, fp8")
    p.add_argument("--vae_tiling", action="store_true", help="decode in spatial tiles to bound memory")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the DiT blocks (slower first step, faster after; needs a C++ compiler on CPU)")
    from .distributed.flags import add_distributed_flags  # torch-free

    add_distributed_flags(p)


def _verbose_parent() -> argparse.ArgumentParser:
    """``-v`` accepted before or after the subcommand (SUPPRESS: a later default cannot undo an earlier -v)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log what happens and show tracebacks on errors")
    return parent


def build_parser() -> argparse.ArgumentParser:
    verbose = _verbose_parent()
    parser = argparse.ArgumentParser(prog="wanx", description="Run the Wan 2.2 video models.", parents=[verbose])
    parser.add_argument("--version", action="version", version=f"wanx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_flags(sub.add_parser("generate", help="generate a video", parents=[verbose]))
    from .train.cli import add_train_flags

    add_train_flags(sub.add_parser("train", help="train the built-in demo model", parents=[verbose]))
    conv = sub.add_parser("convert", help="rewrite a checkpoint as safetensors with official key names",
                          parents=[verbose])
    conv.add_argument("kind", choices=["dit", "vae", "t5", "lora"], help="which component: dit, vae, t5 or lora")
    conv.add_argument("src", help="official .pth/.safetensors, diffusers folder or single file")
    conv.add_argument("dst", help="output .safetensors file (dit: output folder)")
    conv.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
    conv.add_argument("--num_heads", type=int, default=None,
                      help="dit single files: head count when the width is not a multiple of 128")
    conv.add_argument("--quantize", default=None, choices=("int8", "fp8", "q8_0"),
                      help="dit: write a quantized single file (int8/fp8 .safetensors, q8_0 .gguf)")
    conv.add_argument("--to", default=None, choices=LORA_TARGETS,
                      help=f"lora: the key format to write: {', '.join(LORA_TARGETS)}")
    from .batch.cli import add_batch_flags  # torch-free

    add_batch_flags(sub.add_parser("batch", help="generate many videos from a .jsonl (in-process or on Ray)",
                                   parents=[verbose]))
    from .cache import add_calibrate_parser

    add_calibrate_parser(sub)
    from .serve import add_serve_parser

    add_serve_parser(sub, parents=[verbose])
    from .lora.cli import add_lora_inspect_parser

    lora = sub.add_parser("lora", help="inspect LoRA files", parents=[verbose])
    add_lora_inspect_parser(lora.add_subparsers(dest="lora_command", required=True, help="what to do: inspect"))
    return parser


class UsageError(ValueError):
    """Bad command-line input, reported before anything is loaded."""


def _peak_memory(device) -> str:
    import resource

    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    text = f"peak RSS {rss:.0f} MiB"
    if device.type == "cuda":
        text += f", peak GPU {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    return text


def _resolve_generate(args):
    """Everything checked from flags and config files alone: (layout, request, device)."""
    from dataclasses import replace

    from .device import resolve_device, resolve_dtype
    from .pipelines.loader import describe_checkpoint
    from .request import check_output, default_output_name, resolve_request

    prompt = args.prompt if args.prompt is not None else args.prompt_pos
    if prompt is None:
        raise UsageError("a prompt is required: wanx generate \"a red circle moving left\"")
    if args.task is not None and not get_task(args.task).runnable:
        raise UsageError(f"task {args.task} is not runnable yet: {get_task(args.task).note}")
    device = resolve_device(args.device)
    resolve_dtype(args.dtype, device)
    layout, facts = describe_checkpoint(args.ckpt_dir, args.task, dit_files=args.dit_files)
    req = resolve_request(facts, prompt, args.negative_prompt or None, args.image, args.size, args.frame_num,
                          args.sample_steps, args.sample_shift, args.sample_guide_scale, args.boundary,
                          args.sample_solver, args.base_seed, allow_any_size=args.allow_any_size,
                          save_file=args.save_file, overwrite=args.overwrite, recipe=args.recipe,
                          timesteps=args.timesteps, boundary_step=args.boundary_step,
                          cfg_first_steps=args.cfg_first_steps, cfg_first_scale=args.cfg_first_scale)
    loras = _lora_args(args, layout, facts)
    from .cache import resolve_cache

    args.step_cache = resolve_cache(args.cache, facts, image=req.image is not None)  # checked before loading
    if req.output is None:
        name = default_output_name(facts.spec.name, req.video_size, req.prompt, time.strftime("%Y%m%d_%H%M%S"))
        req = replace(req, output=check_output(name, args.overwrite))
    return layout, _extend_prompt(args, req, facts), device, loras


def _extend_prompt(args, req, facts):
    """--prompt_extend: rewrite the prompt last, after every other check (it may wait on a server)."""
    from dataclasses import replace

    from .prompts import extend_for_cli

    try:
        extension = extend_for_cli(args, req.prompt, facts.model_type, image=args.image, seed=args.base_seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if extension is None:
        return req
    args.prompt_extension = extension  # recorded in the video's recipe by cmd_generate
    return replace(req, prompt=extension.prompt)


def _lora_args(args, layout, facts) -> list[tuple[str, float, str]]:
    """Every --lora parsed and checked against the checkpoint's configs, before any weight is read."""
    from .lora.cli import fits_checkpoint
    from .lora.spec import parse_lora_arg

    loras = [parse_lora_arg(value) for value in args.lora or []]
    for path, _, expert in loras:
        if expert != "both" and not facts.two_experts:
            raise UsageError(f"--lora {path}@{expert}: {facts.spec.name} has one expert; drop @{expert}")
        if not Path(path).is_file():
            raise UsageError(f"--lora file not found: {path}")
        problems = [f"{label}: {problem}" for label, problem, _ in fits_checkpoint(path, layout.root) if problem]
        if problems:
            raise UsageError(f"--lora {path} does not fit {layout.root.name}: " + "; ".join(problems))
    return loras


def cmd_generate(args) -> int:
    import torch

    from . import load_pipeline
    from .device import configure_cpu_threads
    from .model import set_attention_backend

    layout, req, device, loras = _resolve_generate(args)
    from .distributed.flags import distributed_requested

    if distributed_requested(args):
        from .distributed.launch import generate_cli

        return generate_cli(args, layout, req)
    configure_cpu_threads(args.threads)
    if args.attention:
        set_attention_backend(args.attention)
    t0 = time.perf_counter()
    offload = args.offload_model
    if offload is None:  # official default: offload on a single GPU
        offload = device.type == "cuda" and torch.cuda.is_available()
    pipe = load_pipeline(layout.root, task=layout.spec.name, device=device, dtype=args.dtype,
                         offload_model=offload, t5_cpu=args.t5_cpu,
                         convert_model_dtype=args.convert_model_dtype, vae_tiling=args.vae_tiling,
                         compile=args.compile, dit_files=args.dit_files, quantize=args.quantize,
                         t5_quantize=args.t5_quantize)
    for path, strength, expert in loras:
        report = pipe.load_lora(path, strength=strength, expert=expert, mode=args.lora_mode)
        log.info("%s", report.summary())
    load_s = time.perf_counter() - t0
    with _logs_above_progress_bars():
        video = pipe.run(req, progress=sys.stderr.isatty() or None, cache=args.step_cache)
    extension = getattr(args, "prompt_extension", None)
    if extension is not None:
        video.metadata["prompt_extend"] = extension.recipe()  # the original and the extended prompt
    path = video.save(req.output, overwrite=args.overwrite)
    secs = video.stats.get("seconds", {})
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in {"load": load_s, **secs}.items())
    from .cache import summary_line

    cached = summary_line(video.stats.get("cache"))
    print(f"saved {path} ({video.num_frames} frames, {video.size[0]}x{video.size[1]} @ {video.fps} fps, "
          f"seed {video.metadata['seed']}) | {stages} | {_peak_memory(pipe.device)}" + (f" | {cached}" if cached else ""))
    return 0


@contextmanager
def _logs_above_progress_bars():
    """Route log records and warnings through tqdm so they never overwrite a bar."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(loggers=[logging.getLogger("wanx"), logging.getLogger("py.warnings")]):
        yield


def cmd_convert(args) -> int:
    from .atomic import atomic_output, atomic_output_dir

    src, dst = Path(args.src), Path(args.dst)
    if not src.exists():
        raise UsageError(f"src not found: {src}")
    if dst.exists() and (src.resolve() == dst.resolve() or os.path.samefile(src, dst)):
        raise UsageError(f"src and dst are the same path ({src}); converting in place would destroy the source")
    if args.kind == "lora":
        from .lora.cli import cmd_convert_lora

        if args.to is None:
            raise UsageError(f"convert lora needs --to ({', '.join(LORA_TARGETS)})")
        return cmd_convert_lora(src, dst, args.to, args.overwrite)
    if args.quantize is not None:
        if args.kind != "dit":
            raise UsageError(f"--quantize converts a dit, not a {args.kind}")
        from .quant import convert_quantized

        convert_quantized(src, dst, args.quantize, overwrite=args.overwrite)
    elif args.kind == "dit":
        from .loading.dit import load_dit, save_dit

        model = load_dit(src, num_heads=args.num_heads)
        with atomic_output_dir(dst, overwrite=args.overwrite) as tmp:
            save_dit(model, tmp, layout="official")
    else:
        with atomic_output(dst, overwrite=args.overwrite) as tmp:
            _convert_file(args.kind, src, tmp)
    print(f"wrote {dst}")
    return 0


def _convert_file(kind: str, src: Path, tmp: Path) -> None:
    if kind == "vae":
        from .loading.vae import convert_vae

        convert_vae(src, tmp)
    else:
        from .loading.t5 import load_t5, save_t5

        save_t5(load_t5(src), tmp)


def _cmd_calibrate(args) -> int:
    from .cache import cmd_calibrate

    return cmd_calibrate(args)


def _cmd_batch(args) -> int:
    from .batch.cli import cmd_batch

    return cmd_batch(args)


def _cmd_serve(args) -> int:
    from .serve import cmd_serve

    return cmd_serve(args)


def _cmd_train(args) -> int:
    from .train.cli import cmd_train

    return cmd_train(args)


def _user_error(e: BaseException) -> str | None:
    """The message for an error the user can fix, or None for a bug (which gets a traceback hint)."""
    from .loading.safe import CheckpointError

    from .lora.errors import LoraError

    if isinstance(e, InputError):
        return e.message_for(_flag_names())
    if isinstance(e, LoraError):
        return str(e)
    if isinstance(e, (UsageError, CheckpointError, GenerationError, FileExistsError, FileNotFoundError,
                      IsADirectoryError, NotADirectoryError, PermissionError)):
        return str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)
    handlers = {"generate": cmd_generate, "convert": cmd_convert, "train": _cmd_train, "serve": _cmd_serve, "batch": _cmd_batch,
                "calibrate": lambda a: _cmd_calibrate(a),
                "lora": lambda a: a.lora_handler(a)}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Cancelled:
        print("cancelled", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns errors into exit codes
        if verbose and _user_error(e) is not None:
            log.exception("traceback")
        message = _user_error(e)
        if message is None:
            raise  # a bug, not a user error: the traceback is what a report needs
        print(f"wanx: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
