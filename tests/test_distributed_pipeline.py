"""Whole generations over 2 and 4 gloo processes equal the single-process video (tiny A14B checkpoint).

A 48x48, 9-frame request gives 3x3x3 = 27 tokens, so Ulysses over 2 ranks pads one token.
CFG-parallel computes each pass alone, i.e. what one process computes with ``batch_cfg=False``;
Ulysses and FSDP keep the batched pass, i.e. the default ``batch_cfg=True``.
"""

from __future__ import annotations

import pytest
import torch

from wanx.distributed import ParallelConfig, run_local

TIMEOUT_S = 300
REQUEST = dict(prompt="a red circle moving left", size="48*48", frame_num=9, sample_steps=4, seed=42,
               allow_any_size=True)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from wanx.testing import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("dist") / "tiny-t2v", "t2v-A14B")


@pytest.fixture(scope="module")
def tiny_i2v_ckpt(tmp_path_factory):
    from wanx.testing import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("dist") / "tiny-i2v", "i2v-A14B")


def _image() -> torch.Tensor:
    return torch.linspace(-1, 1, 3 * 48 * 48).reshape(3, 48, 48)  # a [3, H, W] image in [-1, 1]


def _single_process(ckpt, batch_cfg: bool, **overrides) -> torch.Tensor:
    from wanx import load_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same GEMM blocking, so the same rounding
    try:
        pipe = load_pipeline(ckpt, device="cpu", batch_cfg=batch_cfg)
        return pipe.generate(**{**REQUEST, **overrides}, progress=False).tensor
    finally:
        torch.set_num_threads(threads)


def _generate_worker(out_path: str, ckpt: str, config: ParallelConfig, extra: dict) -> None:
    import torch.distributed as dist

    from wanx.distributed.launch import broadcast_request, load_parallel_pipeline, run_parallel

    torch.manual_seed(dist.get_rank() if dist.is_initialized() else 0)  # the pipeline must not depend on it
    pipe = load_parallel_pipeline(ckpt, config=config, device="cpu")
    req = broadcast_request(pipe.resolve(**{**REQUEST, **extra, "seed": 42 if dist.get_rank() == 0 else 7}))
    video = run_parallel(pipe, req)
    if dist.get_rank() == 0:
        torch.save({"video": video.tensor, "metadata": video.metadata}, out_path)
    else:
        assert video is None


def _compare(tmp_path, ckpt, config: ParallelConfig, ranks: int, batch_cfg: bool, **extra) -> float:
    out = tmp_path / "video.pt"
    run_local(_generate_worker, ranks, str(out), str(ckpt), config, extra, timeout_s=TIMEOUT_S)
    got = torch.load(out, weights_only=False)
    want = _single_process(ckpt, batch_cfg, **extra)
    assert got["video"].shape == want.shape == (3, 9, 48, 48)
    assert got["metadata"]["seed"] == 42  # rank 0's request reached every rank
    assert got["metadata"]["parallel"]["world_size"] == ranks
    return float((got["video"] - want).abs().max() / want.abs().max())


CASES = {  # name: (config, ranks, single-process batch_cfg it must equal)
    "cfg_parallel": (ParallelConfig(cfg_parallel=True), 2, False),
    "ulysses2": (ParallelConfig(ulysses_size=2), 2, True),
    "dit_fsdp+t5_fsdp": (ParallelConfig(dit_fsdp=True, t5_fsdp=True), 2, True),
    "ulysses2+cfg_parallel+dit_fsdp": (ParallelConfig(ulysses_size=2, cfg_parallel=True, dit_fsdp=True), 4, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parallel_generation_equals_one_process(case, tmp_path, tiny_ckpt):
    config, ranks, batch_cfg = CASES[case]
    err = _compare(tmp_path, tiny_ckpt, config, ranks, batch_cfg)
    print(f"{case} on {ranks} ranks vs one process (batch_cfg={batch_cfg}): max relative error {err:.3e}")
    assert err <= 1e-5


def test_i2v_image_channels_follow_the_cfg_split(tmp_path, tiny_i2v_ckpt):
    err = _compare(tmp_path, tiny_i2v_ckpt, ParallelConfig(cfg_parallel=True), 2, False, image=_image())
    print(f"i2v cfg_parallel on 2 ranks vs one process: max relative error {err:.3e}")
    assert err <= 1e-5


def _cancel_worker(out_dir: str, ckpt: str) -> None:
    import pathlib

    import torch.distributed as dist

    from wanx.distributed.launch import load_parallel_pipeline, run_parallel
    from wanx.errors import Cancelled

    pipe = load_parallel_pipeline(ckpt, config=ParallelConfig(cfg_parallel=True), device="cpu")
    steps = []

    def stop_after_two(step, total, entry):  # runs on rank 0 only
        steps.append(step)
        if step == 2:
            raise Cancelled("user pressed stop")

    try:
        run_parallel(pipe, pipe.resolve(**REQUEST), callback=stop_after_two)
        outcome = "finished"
    except Cancelled as e:
        outcome = f"cancelled: {e}"
    pathlib.Path(out_dir, f"rank{dist.get_rank()}.txt").write_text(f"{outcome} | steps seen {steps}")


def test_a_cancel_on_rank_0_stops_every_rank_at_the_same_step(tmp_path, tiny_ckpt):
    run_local(_cancel_worker, 2, str(tmp_path), str(tiny_ckpt), timeout_s=TIMEOUT_S)
    assert (tmp_path / "rank0.txt").read_text() == "cancelled: user pressed stop | steps seen [1, 2]"
    assert (tmp_path / "rank1.txt").read_text() == "cancelled: cancelled by rank 0 after step 2 | steps seen []"


def test_setup_refuses_an_indivisible_head_count_before_joining_or_loading(monkeypatch):
    from wanx.distributed.launch import setup
    from wanx.errors import InputError

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(InputError, match="ulysses_size 3 does not divide the model's 2 attention heads"):
        setup(ParallelConfig(ulysses_size=3), num_heads=2, device="cpu")
    import torch.distributed as dist

    assert not dist.is_initialized()


def _cli_worker(ckpt: str, out: str, flags: list) -> None:
    import argparse

    from wanx.cli import _resolve_generate, add_generate_flags
    from wanx.distributed.launch import distributed_requested, generate_cli

    parser = argparse.ArgumentParser()
    add_generate_flags(parser)  # includes the distributed flags
    args = parser.parse_args(["a red circle moving left", "--ckpt_dir", ckpt, "--size", "48*48", "--frame_num", "9",
                              "--sample_steps", "2", "--allow_any_size", "--save_file", out,
                              "--device", "cpu", *flags])
    assert distributed_requested(args)
    layout, req, *_ = _resolve_generate(args)  # (layout, req, device[, loras])
    assert generate_cli(args, layout, req) == 0


@pytest.mark.parametrize("flags,recorded", [(["--ulysses_size", "2"], {"ulysses_size": 2}),
                                            (["--expert_parallel"], {"expert_parallel": True})])
def test_the_cli_entry_point_saves_one_video_with_its_parallel_recipe(flags, recorded, tmp_path, tiny_ckpt):
    from wanx.media import read_mp4

    out = tmp_path / "v.mp4"
    run_local(_cli_worker, 2, str(tiny_ckpt), str(out), flags, timeout_s=TIMEOUT_S)
    frames, _, metadata = read_mp4(out)
    assert frames.shape == (9, 48, 48, 3)
    assert metadata["parallel"]["world_size"] == 2
    assert {k: metadata["parallel"][k] for k in recorded} == recorded
    assert not [p for p in tmp_path.iterdir() if p.name != "v.mp4"]  # no partial files left


def _expert_parallel_worker(out_path: str, ckpt: str) -> None:
    import json
    import pathlib
    import time

    import torch.distributed as dist

    from wanx.distributed import experts
    from wanx.distributed.launch import broadcast_request

    pipe, stage = experts.load_stage_pipeline(ckpt, device="cpu")
    assert isinstance(pipe.experts[1 - stage], experts.AbsentExpert)  # the other expert is not loaded here
    requests = [broadcast_request(pipe.resolve(**{**REQUEST, "seed": s})) for s in (42, 43, 44)]
    starts, done = [], {}
    prepare = experts._prepare
    experts._prepare = lambda p, r: starts.append(time.time()) or prepare(p, r)
    videos = experts.run_expert_parallel(pipe, requests, on_video=lambda i, v: done.setdefault(i, time.time()))
    pathlib.Path(out_path + f".rank{dist.get_rank()}.json").write_text(json.dumps({"starts": starts, "done": done}))
    if videos:
        torch.save([v.tensor for v in videos], out_path)


def test_expert_parallel_two_stages_equal_one_process_and_overlap(tmp_path, tiny_ckpt):
    import json

    out = tmp_path / "videos.pt"
    run_local(_expert_parallel_worker, 2, str(out), str(tiny_ckpt), timeout_s=TIMEOUT_S)
    got = torch.load(out)
    for video, seed in zip(got, (42, 43, 44), strict=True):
        want = _single_process(tiny_ckpt, True, seed=seed)
        err = float((video - want).abs().max() / want.abs().max())
        print(f"expert-parallel video seed {seed}: max relative error {err:.3e}")
        assert err <= 1e-5
    high = json.loads((tmp_path / "videos.pt.rank0.json").read_text())
    low = json.loads((tmp_path / "videos.pt.rank1.json").read_text())
    # the high-noise stage started video 1 before the low-noise stage had finished video 0
    assert high["starts"][1] < low["done"]["0"]


def test_expert_parallel_refuses_flags_it_cannot_combine_with():
    import argparse

    from wanx.distributed.launch import add_distributed_flags, parallel_config
    from wanx.errors import InputError

    parser = argparse.ArgumentParser()
    add_distributed_flags(parser)
    with pytest.raises(InputError, match="takes no --ulysses_size"):
        parallel_config(parser.parse_args(["--expert_parallel", "--cfg_parallel"]))
    assert parallel_config(parser.parse_args(["--expert_parallel"])) == ParallelConfig()


TORCHRUN_SCRIPT = """
import argparse, sys
from wanx.cli import _resolve_generate, add_generate_flags
from wanx.distributed.launch import generate_cli

parser = argparse.ArgumentParser()
add_generate_flags(parser)  # includes the distributed flags
args = parser.parse_args(sys.argv[1:])
layout, req, *_ = _resolve_generate(args)  # (layout, req, device[, loras])
sys.exit(generate_cli(args, layout, req))
"""


def test_a_real_torchrun_launch_cfg_parallel_with_fsdp(tmp_path, tiny_ckpt):
    """What ``torchrun --nproc_per_node 2 -m wanx generate ...`` will run once the CLI calls generate_cli."""
    import os
    import subprocess
    import sys

    from wanx.distributed.local import free_port
    from wanx.media import read_mp4

    script = tmp_path / "gen.py"
    script.write_text(TORCHRUN_SCRIPT)
    out = tmp_path / "v.mp4"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script),
           "a red circle moving left", "--ckpt_dir", str(tiny_ckpt), "--size", "48*48", "--frame_num", "9",
           "--sample_steps", "2", "--allow_any_size", "--save_file", str(out), "--device", "cpu",
           "--cfg_parallel", "--dit_fsdp", "--base_seed", "5"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("saved ") == 1  # rank 0 alone saves and prints
    frames, _, metadata = read_mp4(out)
    assert frames.shape == (9, 48, 48, 3) and metadata["seed"] == 5
    assert metadata["parallel"] == {"ulysses_size": 1, "cfg_parallel": True, "dit_fsdp": True, "t5_fsdp": False,
                                    "world_size": 2}


def test_flags_the_parallel_loaders_do_not_handle_yet_are_refused_before_anything(tiny_ckpt):
    import argparse

    from wanx.cli import _resolve_generate, add_generate_flags
    from wanx.distributed.launch import generate_cli
    from wanx.errors import InputError

    parser = argparse.ArgumentParser()
    add_generate_flags(parser)
    args = parser.parse_args(["x", "--ckpt_dir", str(tiny_ckpt), "--ulysses_size", "2", "--quantize", "int8",
                              "--save_file", "unused.mp4"])
    layout, req, *_ = _resolve_generate(args)  # (layout, req, device[, loras])
    with pytest.raises(InputError, match="^quantize is not supported in multi-process runs yet"):
        generate_cli(args, layout, req)
