"""Expert-parallel for the two-expert (A14B) models: a two-stage pipeline over a queue of videos.

The ranks form two stages of equal size: stage 0 holds only the high-noise expert, stage 1 only
the low-noise one, so neither is ever offloaded. For each video, stage 0 runs the high-noise
steps and hands the latent and the solver's state (multistep solvers carry history) to stage 1,
which runs the low-noise steps and decodes. The hand-over is asynchronous, so stage 0 starts the
next video while stage 1 finishes this one: with a queue, both experts work at once. Inside a
stage of several ranks the tokens are split with Ulysses.

Each video is computed exactly as one process computes it (same steps, same solver state).
"""

from __future__ import annotations

import io

import torch
import torch.distributed as dist
from torch import nn

from ..errors import GenerationError
from .groups import env_world, init_process_group


class AbsentExpert(nn.Module):
    """Stands for the expert the other stage holds: it answers ``cfg``/``dtype`` and refuses to run."""

    def __init__(self, cfg, dtype: torch.dtype, index: int):
        super().__init__()
        self.cfg, self._dtype, self.index = cfg, dtype, index

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"expert {self.index} is resident on the other stage of the expert-parallel run")


def _isend_object(obj, dst: int) -> list:
    """Start sending a picklable object (tensors included); returns what must be kept until sent."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64)
    return [(dist.isend(size, dst), size), (dist.isend(data, dst), data)]


def _recv_object(src: int):
    size = torch.empty(1, dtype=torch.int64)
    dist.recv(size, src)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(data, src)
    return torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=False)  # from our own peer rank


def load_stage_pipeline(ckpt_dir=None, task: str | None = None, *, device=None, dtype=None, **options):
    """This rank's pipeline: text encoder, VAE and only its stage's expert. Returns ``(pipe, stage)``.

    Needs an even number of processes and a two-expert checkpoint; each stage of ``world / 2``
    ranks splits its tokens with Ulysses (so ``world / 2`` must divide the head count).
    """
    from ..device import dit_dtype, resolve_dtype
    from ..errors import InputError
    from ..loading.dit import load_dit
    from ..pipelines.loader import _load_text_encoder, _load_vae, checkpoint_identity, describe_checkpoint
    from ..pipelines.pipeline import PipelineOptions, WanPipeline
    from .groups import ParallelConfig, check_parallel
    from .ulysses import apply_ulysses

    layout, facts = describe_checkpoint(ckpt_dir, task)
    world = env_world()[1]
    if len(layout.dit_paths) != 2 or world % 2:
        raise InputError("expert_parallel", f"{{arg}} needs a two-expert checkpoint and an even number of "
                                            f"processes (got {len(layout.dit_paths)} expert(s), {world} processes)")
    per_stage = world // 2
    check_parallel(ParallelConfig(ulysses_size=per_stage), per_stage, facts.dit.num_heads)
    device = init_process_group(device)
    dtype = resolve_dtype(dtype, device)
    stage = dist.get_rank() // per_stage
    groups = [dist.new_group(list(range(s * per_stage, (s + 1) * per_stage))) for s in (0, 1)]
    opts = PipelineOptions(**options)
    wdtype = dit_dtype(dtype, opts.convert_model_dtype)
    model = load_dit(layout.dit_paths[stage], dtype=wdtype, device=device)
    if per_stage > 1:
        apply_ulysses(model, groups[stage])
    experts = [model if i == stage else AbsentExpert(facts.dit, wdtype, i) for i in (0, 1)]
    pipe = WanPipeline(layout.spec, _load_text_encoder(layout, dtype), _load_vae(layout, device), experts,
                       device=device, options=opts, checkpoint=checkpoint_identity(layout))
    pipe.stage, pipe.stage_group, pipe.stage_size = stage, groups[stage], per_stage
    return pipe, stage


def _run_steps(pipe, plan, expert: int, sampler, latent, condition, ctx, ctx_null):
    """The plan's steps of one expert (the body of :func:`wanx.pipelines.denoise.run_plan`)."""
    from ..pipelines.denoise import guided_velocity

    model = pipe.experts[expert]
    for step in plan:
        if step.expert != expert:
            continue
        t = condition.timestep(step.timestep.to(pipe.device), latent)
        v = guided_velocity(model, latent, t, ctx, ctx_null, step.guide_scale, pipe.options.batch_cfg,
                            **condition.dit_inputs())
        latent = condition.after_step(sampler.step(v, latent))
    return latent


def _prepare(pipe, req):
    ctx, ctx_null = pipe.encode_prompts(req.prompt, req.negative_prompt)
    condition = pipe.prepare_condition(req)
    plan = pipe.plan(req)
    order = [s.expert for s in plan]
    if order != sorted(order):
        raise GenerationError("expert-parallel hands each video over once: the plan must run the high-noise "
                              "expert's steps first, then the low-noise expert's")
    return ctx, ctx_null, condition, plan


@torch.no_grad()
def run_expert_parallel(pipe, requests, on_video=None) -> list:
    """Generate ``requests`` (the same list on every rank) through the two stages.

    The first rank of stage 1 decodes; it calls ``on_video(i, video)`` for each (e.g. to save it)
    and returns the videos; every other rank returns an empty list.
    """
    stage, size = pipe.stage, pipe.stage_size
    leader, peer = stage * size, (1 - stage) * size
    me = dist.get_rank()
    pending, videos = [], []
    for i, req in enumerate(requests):
        ctx, ctx_null, condition, plan = _prepare(pipe, req)
        if stage == 0:
            sampler = plan.make_sampler()
            latent = condition.start(pipe.initial_noise(req, req.latent_grid))
            latent = _run_steps(pipe, plan, 0, sampler, latent, condition, ctx, ctx_null)
            if me == leader:  # asynchronous: the next video starts while stage 1 works on this one
                pending += _isend_object((latent, sampler), peer)
            continue
        box = [_recv_object(peer) if me == leader else None]
        if size > 1:
            dist.broadcast_object_list(box, src=leader, group=pipe.stage_group)
        latent, sampler = box[0]
        latent = _run_steps(pipe, plan, 1, sampler, latent.to(pipe.device), condition, ctx, ctx_null)
        if me == leader:
            videos.append(_finish(pipe, req, latent, i, on_video))
    for work, _ in pending:
        work.wait()
    return videos


def _finish(pipe, req, latent, index: int, on_video):
    from ..media import Video
    from ..pipelines.reporting import recipe_for

    if not torch.isfinite(latent).all():
        raise GenerationError(f"video {index}: the sampler produced NaN/inf values; nothing was decoded")
    video = Video(tensor=pipe.decode(latent), fps=pipe.spec.sample_fps,
                  metadata=dict(recipe_for(pipe, req), parallel={"expert_parallel": True,
                                                                 "world_size": env_world()[1]}))
    if on_video is not None:
        on_video(index, video)
    return video
