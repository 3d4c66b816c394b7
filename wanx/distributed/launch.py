"""One generation over many processes: ``torchrun --nproc_per_node N -m wanx generate ... --ulysses_size N``.

Every rank loads the (sharded) models, receives rank 0's resolved request (so a random seed and
the prompt are the same everywhere), draws the same noise and steps the same sampler; only the
DiT (and, with ``--t5_fsdp``, the text encoder) is split. A cancellation on rank 0 is agreed on
by all ranks between steps, and only rank 0 decodes and saves.

This module sits above :mod:`wanx.pipelines` (it builds a pipeline); the rest of
``wanx.distributed`` acts on models only.
"""

from __future__ import annotations

import os
from dataclasses import asdict, replace

import torch
import torch.distributed as dist

from ..errors import Cancelled, InputError
from .flags import FLAGS, add_distributed_flags, distributed_requested  # noqa: F401 - re-exported
from .groups import (ParallelConfig, build_mesh, check_parallel, env_world, init_process_group, is_main_process,
                     world_mesh)


def parallel_config(args) -> ParallelConfig:
    if getattr(args, "expert_parallel", False) and (args.cfg_parallel or args.dit_fsdp or args.t5_fsdp
                                                    or args.ulysses_size > 1):
        raise InputError("expert_parallel", "{arg} splits the processes into two stages, each splitting its "
                                            "tokens over its half; it takes no --ulysses_size, --cfg_parallel, "
                                            "--dit_fsdp or --t5_fsdp")
    return ParallelConfig(ulysses_size=args.ulysses_size, cfg_parallel=args.cfg_parallel,
                          dit_fsdp=args.dit_fsdp, t5_fsdp=args.t5_fsdp)


def setup(config: ParallelConfig, num_heads: int, device=None):
    """Check ``config`` against the launch and the model (before any weight is read), join the group.

    Returns ``(device, mesh)``; the mesh is None in a single process.
    """
    world = env_world()[1]
    check_parallel(config, world, num_heads)
    device = init_process_group(device)
    return device, (build_mesh(config, device) if world > 1 else None)


def broadcast_request(req):
    """Rank 0's resolved request on every rank (its seed, prompt, image and output name)."""
    if not dist.is_initialized():
        return req
    box = [req if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _load_expert(path, cfg, config: ParallelConfig, mesh, device, dtype):
    """One DiT expert, parallelized; with ``dit_fsdp`` built on meta and filled shard by shard."""
    from ..loading.dit import load_dit
    from ..model import WanDiT
    from .fsdp import dit_source, load_shards
    from .parallelize import parallelize

    if mesh is None:
        return load_dit(path, dtype=dtype, device=device)
    if not config.dit_fsdp:
        return parallelize(load_dit(path, dtype=dtype, device=device), mesh, config)
    with torch.device("meta"):
        model = WanDiT(cfg).to(dtype)
    parallelize(model, mesh, config, fsdp_mesh=world_mesh(device))
    model.to_empty(device=device)
    load_shards(model, dit_source(path), dtype, f"DiT {path}")
    return model.eval().requires_grad_(False)


def _text_encoder(layout, dtype, device, config: ParallelConfig):
    from ..pipelines.loader import _load_text_encoder as load_whole
    from ..text import TextEncoder, Tokenizer
    from ..text.umt5 import UMT5Encoder
    from .fsdp import load_shards, shard_blocks, t5_source

    if not (config.t5_fsdp and dist.is_initialized()):
        return load_whole(layout, dtype)
    from ..loading.t5 import infer_t5_config

    source = t5_source(layout.t5_path)
    cfg = layout.t5_config or infer_t5_config({k: torch.empty(s, device="meta") for k, s in source.shapes.items()})
    with torch.device("meta"):
        model = UMT5Encoder(cfg).to(dtype)
    shard_blocks(model, world_mesh(device))
    model.to_empty(device=device)
    load_shards(model, source, dtype, f"T5 encoder {layout.t5_path}")
    tokenizer = Tokenizer.from_folder(layout.tokenizer_dir, text_len=layout.spec.text_len)
    return TextEncoder(tokenizer, model.eval().requires_grad_(False), text_len=layout.spec.text_len)


def load_parallel_pipeline(ckpt_dir=None, task: str | None = None, config: ParallelConfig = ParallelConfig(), *,
                           device=None, dtype=None, mesh=None, **options):
    """:func:`wanx.load_pipeline` for one rank of a multi-process run (call on every rank).

    ``options`` are :class:`~wanx.pipelines.pipeline.PipelineOptions` fields; CFG-parallel needs
    (and sets) ``batch_cfg=True``. ``mesh`` from :func:`setup`, else set up here.
    """
    from ..device import dit_dtype, resolve_dtype
    from ..pipelines.loader import _load_vae, checkpoint_identity, describe_checkpoint
    from ..pipelines.pipeline import PipelineOptions, WanPipeline

    layout, facts = describe_checkpoint(ckpt_dir, task)
    if mesh is None:
        device, mesh = setup(config, facts.dit.num_heads, device)
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    opts = PipelineOptions(**options)
    if config.cfg_parallel:
        opts = replace(opts, batch_cfg=True)
    text_encoder = _text_encoder(layout, dtype, device, config)
    vae = _load_vae(layout, device)
    wdtype = dit_dtype(dtype, opts.convert_model_dtype)
    experts = [_load_expert(p, facts.dit, config, mesh, device, wdtype) for p in layout.dit_paths]
    pipe = WanPipeline(layout.spec, text_encoder, vae, experts, device=device, options=opts,
                       checkpoint=checkpoint_identity(layout))
    pipe.parallel = config
    return pipe


def agreed_callback(callback, device):
    """A step callback every rank calls: rank 0's callback decides, and all ranks stop together."""
    def on_step(step: int, total: int, entry) -> None:
        flag = torch.zeros(1, device=device)
        error = None
        if callback is not None and is_main_process():
            try:
                callback(step, total, entry)
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the ranks agree
                error, flag[0] = e, 1.0
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # a rank that stopped alone would hang the rest
        if error is not None:
            raise error
        if flag.item():
            raise Cancelled(f"cancelled by rank 0 after step {step}")
    return on_step


@torch.no_grad()
def run_parallel(pipe, req, *, callback=None, progress: bool = False):
    """Execute ``req`` on every rank; rank 0 returns the :class:`~wanx.media.Video`, the others None."""
    from ..media import Video
    from ..pipelines.denoise import run_plan
    from ..pipelines.reporting import progress_bar, recipe_for

    main = is_main_process()
    ctx, ctx_null = pipe.encode_prompts(req.prompt, req.negative_prompt)
    condition = pipe.prepare_condition(req)
    plan = pipe.plan(req)
    with progress_bar(progress and main, len(plan), "denoise") as bar:
        latent = run_plan(plan, pipe.initial_noise(req, req.latent_grid), condition, pipe.experts, pipe.residency,
                          ctx, ctx_null, batch_cfg=pipe.options.batch_cfg,
                          callback=agreed_callback(bar.chain(callback), pipe.device))
    if not main:
        return None
    video = pipe.decode(latent, progress=progress)
    config = getattr(pipe, "parallel", ParallelConfig())
    metadata = dict(recipe_for(pipe, req), parallel={**asdict(config), "world_size": env_world()[1]})
    return Video(tensor=video, fps=pipe.spec.sample_fps, metadata=metadata)


UNSUPPORTED = ("dit_files", "quantize", "t5_quantize", "lora")


def _threads_per_rank(threads: int | None) -> int | None:
    """CPU runs: the cores shared among the ranks of this machine unless ``--threads`` says otherwise."""
    if threads is not None:
        return threads
    local = int(os.environ.get("LOCAL_WORLD_SIZE", env_world()[1]))
    return max(1, (os.cpu_count() or 1) // local) if local > 1 else None


def generate_cli(args, layout, req) -> int:
    """``wanx generate`` under torchrun: what ``cmd_generate`` calls when :func:`distributed_requested`.

    ``layout`` and ``req`` are what the CLI resolved from flags and configs (on every rank; rank
    0's request wins). Rank 0 saves and prints; every rank returns 0 on success.
    """
    import sys
    import time

    from ..device import configure_cpu_threads
    from ..model import set_attention_backend
    from ..pipelines.loader import describe_checkpoint

    for name in UNSUPPORTED:  # flags whose loaders do not build sharded/split models yet
        if getattr(args, name, None):
            raise InputError(name, "{arg} is not supported in multi-process runs yet")
    config = parallel_config(args)
    if args.expert_parallel:
        return _generate_expert_parallel(args, layout, req)
    if config.t5_fsdp and args.t5_cpu:
        raise InputError("t5_fsdp", "{arg} shards the text encoder over the processes' devices; drop --t5_cpu")
    if args.offload_model and (config.dit_fsdp or config.t5_fsdp):
        raise InputError("offload_model", "{arg} cannot move sharded (FSDP) models; each rank keeps only its "
                                          "shard on its device anyway")
    facts = describe_checkpoint(layout.root, layout.spec.name)[1]
    device, mesh = setup(config, facts.dit.num_heads, args.device)
    if device.type == "cpu":
        configure_cpu_threads(_threads_per_rank(args.threads))
    if args.attention:
        set_attention_backend(args.attention)
    t0 = time.perf_counter()
    req = broadcast_request(req)
    pipe = load_parallel_pipeline(layout.root, layout.spec.name, config, device=device, dtype=args.dtype, mesh=mesh,
                                  offload_model=bool(args.offload_model), t5_cpu=args.t5_cpu,
                                  convert_model_dtype=args.convert_model_dtype, vae_tiling=args.vae_tiling,
                                  compile=args.compile)
    load_s = time.perf_counter() - t0
    video = run_parallel(pipe, req, progress=sys.stderr.isatty())
    if video is not None:
        path = video.save(req.output, overwrite=args.overwrite)
        print(f"saved {path} ({video.num_frames} frames, {video.size[0]}x{video.size[1]}, seed "
              f"{video.metadata['seed']}) on {env_world()[1]} processes | load {load_s:.2f}s, "
              f"total {time.perf_counter() - t0:.2f}s")
    if dist.is_initialized():
        dist.barrier()  # nobody leaves (and tears the group down) before rank 0 has saved
    return 0


def _generate_expert_parallel(args, layout, req) -> int:
    """``--expert_parallel``: the first rank of the low-noise stage decodes and saves."""
    from .experts import load_stage_pipeline, run_expert_parallel

    pipe, _ = load_stage_pipeline(layout.root, layout.spec.name, device=args.device, dtype=args.dtype,
                                  t5_cpu=args.t5_cpu, convert_model_dtype=args.convert_model_dtype,
                                  vae_tiling=args.vae_tiling)
    if pipe.device.type == "cpu":
        from ..device import configure_cpu_threads

        configure_cpu_threads(_threads_per_rank(args.threads))
    req = broadcast_request(req)

    def save(index: int, video) -> None:
        path = video.save(req.output, overwrite=args.overwrite)
        print(f"saved {path} ({video.num_frames} frames, seed {video.metadata['seed']}) on "
              f"{env_world()[1]} processes, expert-parallel")

    run_expert_parallel(pipe, [req], on_video=save)
    dist.barrier()
    return 0
