"""Bad input, as a new user or an attacker would give it: each is refused with a message naming the
argument or file, before any weight is read (the weight readers are booby-trapped)."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import wanx
from wanx import cli
from wanx.atomic import atomic_output, atomic_output_dir
from wanx.errors import Cancelled, GenerationError, InputError
from wanx.loading.safe import CheckpointError
from wanx.pipelines.loader import describe_checkpoint
from wanx.request import resolve_request
from wanx.testing import build_tiny_checkpoint


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return {task: build_tiny_checkpoint(root / task, task, seed=1) for task in ("t2v-A14B", "i2v-A14B", "ti2v-5B")}


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to read a weight file fails the test."""
    import safetensors.torch

    def boom(*a, **k):
        raise AssertionError("weights were read before the input was checked")
    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(safetensors.torch, "load_file", boom)
    monkeypatch.setattr("wanx.loading.safe.load_file", boom)
    monkeypatch.setattr(wanx, "load_pipeline", boom)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data): a decompression bomb's calling card."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _files(tmp: Path) -> dict[str, Path]:
    ok = tmp / "ok.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(ok)
    truncated = tmp / "truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    (tmp / "text.png").write_text("not an image")
    (tmp / "bomb.png").write_bytes(_png_header(100_000, 100_000))
    (tmp / "a_file").write_text("x")
    (tmp / "folder.mp4").mkdir(exist_ok=True)
    (tmp / "exists.mp4").write_bytes(b"user data")
    return {"ok": ok, "truncated": truncated, "text": tmp / "text.png", "bomb": tmp / "bomb.png",
            "file": tmp / "a_file", "dir": tmp / "folder.mp4", "exists": tmp / "exists.mp4"}


# (task, arguments, argument named in the error, words of the message)
CASES = [
    ("t2v-A14B", dict(size=(0, 64)), "size", "positive"),
    ("t2v-A14B", dict(size=(72, 64)), "size", "divisible by 16"),
    ("t2v-A14B", dict(size="big"), "size", "W*H"),
    ("t2v-A14B", dict(size=(64.5, 64)), "size", "whole numbers"),
    ("t2v-A14B", dict(size=(64, 64 * 1100), allow_any_size=True), "size", "position table"),
    ("t2v-A14B", dict(frame_num=6), "frame_num", "4n+1"),
    ("t2v-A14B", dict(frame_num=0), "frame_num", ">= 1"),
    ("t2v-A14B", dict(frame_num=4 * 1100 + 1), "frame_num", "position table"),
    ("t2v-A14B", dict(sample_steps=0), "sample_steps", ">= 1"),
    ("t2v-A14B", dict(sample_steps=2.5), "sample_steps", "whole number"),
    ("t2v-A14B", dict(sample_steps="4"), "sample_steps", "whole number"),
    ("t2v-A14B", dict(guide_scale=math.nan), "guide_scale", "finite"),
    ("t2v-A14B", dict(guide_scale=(1.0, 2.0, 3.0)), "guide_scale", "pair"),
    ("ti2v-5B", dict(guide_scale=(3.0, 5.0)), "guide_scale", "one expert"),
    ("t2v-A14B", dict(sample_shift=0), "sample_shift", "> 0"),
    ("t2v-A14B", dict(sample_shift=math.inf), "sample_shift", "finite"),
    ("t2v-A14B", dict(boundary=1.5), "boundary", "[0, 1]"),
    ("ti2v-5B", dict(boundary=0.5), "boundary", "two experts"),
    ("t2v-A14B", dict(seed=-2), "seed", "2^64"),
    ("t2v-A14B", dict(seed=2**64), "seed", "2^64"),
    ("t2v-A14B", dict(seed=True), "seed", "2^64"),
    ("t2v-A14B", dict(sample_solver="ddim"), "sample_solver", "unknown"),
    ("t2v-A14B", dict(prompt=""), "prompt", "empty"),
    ("t2v-A14B", dict(prompt=b"bytes"), "prompt", "string"),
    ("t2v-A14B", dict(prompt="bad \ud800 text"), "prompt", "UTF-8"),
    ("t2v-A14B", dict(negative_prompt=3), "negative_prompt", "string"),
    ("i2v-A14B", dict(), "image", "needs an input image"),
    ("t2v-A14B", dict(image="ok"), "image", "takes no image"),
    ("i2v-A14B", dict(image="/nonexistent/cat.png"), "image", "not found"),
    ("i2v-A14B", dict(image="text"), "image", "not an image"),
    ("i2v-A14B", dict(image="truncated"), "image", "corrupt or truncated"),
    ("i2v-A14B", dict(image="bomb"), "image", "Mpx"),
    ("i2v-A14B", dict(image="dir"), "image", "not a file"),
    ("i2v-A14B", dict(image=torch.zeros(4, 8, 8)), "image", "[3, H, W]"),
    ("ti2v-5B", dict(image=torch.zeros(3, 64, 64)), "image", "not a tensor"),
    ("t2v-A14B", dict(save_file="dir"), "save_file", "is a folder"),
    ("t2v-A14B", dict(save_file="exists"), "save_file", "already exists"),
    ("t2v-A14B", dict(save_file="file/sub/out.mp4"), "save_file", "not a folder"),
    ("t2v-A14B", dict(save_file="out.gif"), "save_file", ".mp4"),
]


@pytest.mark.parametrize("task,kwargs,argument,words", CASES,
                         ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_resolver_refuses_before_any_weight(folders, tmp_path, no_weights, task, kwargs, argument, words):
    files = _files(tmp_path)
    kwargs = {k: (files[v] if isinstance(v, str) and v in files else v) for k, v in kwargs.items()}
    if isinstance(kwargs.get("save_file"), str) and "/" in kwargs["save_file"]:
        kwargs["save_file"] = tmp_path / kwargs["save_file"].replace("file", "a_file", 1)
    elif kwargs.get("save_file") == "out.gif":
        kwargs["save_file"] = tmp_path / "out.gif"
    prompt = kwargs.pop("prompt", "a red circle moving left")
    start = time.perf_counter()
    with pytest.raises(InputError) as e:
        _, facts = describe_checkpoint(folders[task])
        resolve_request(facts, prompt, **kwargs)
    elapsed = time.perf_counter() - start
    print(f"{argument}: {e.value} ({elapsed * 1000:.0f} ms)")
    assert e.value.argument == argument and argument in str(e.value)
    assert words in str(e.value)
    assert elapsed < 1.0


def test_device_and_dtype_are_checked_before_loading(folders, no_weights, capsys):
    for flags, words in ((["--device", "cuda"], "no CUDA device"), (["--device", "tpu"], "not a device"),
                         (["--threads", "0"], None)):
        if torch.cuda.is_available() and "cuda" in flags:
            continue
        rc = cli.main(["generate", "x", "--ckpt_dir", str(folders["t2v-A14B"]), *flags])
        err = capsys.readouterr().err
        if words is None:  # --threads 0 passes the resolver and is refused right before loading
            assert rc == 2 and "--threads" in err
        else:
            assert rc == 2 and f"wanx: error: --device" in err and words in err
    with pytest.raises(InputError, match="dtype"):
        from wanx.device import resolve_dtype
        resolve_dtype("int8", torch.device("cpu"))


def test_cli_names_its_flags(folders, tmp_path, no_weights, capsys):
    rc = cli.main(["generate", "x", "--ckpt_dir", str(folders["i2v-A14B"]), "--image", str(tmp_path / "no.png")])
    assert rc == 2 and "wanx: error: --image not found" in capsys.readouterr().err
    rc = cli.main(["generate", "x", "--ckpt_dir", str(folders["t2v-A14B"]), "--base_seed", "-5"])
    assert rc == 2 and "--base_seed must be an integer in [0, 2^64)" in capsys.readouterr().err
    rc = cli.main(["generate", "x", "--ckpt_dir", str(folders["t2v-A14B"]), "--save_file", str(tmp_path / "a.webm")])
    assert rc == 2 and "--save_file" in capsys.readouterr().err


# ------------------------------------------------------------------------------ checkpoint files

def _copy(folders, task, tmp_path) -> Path:
    dst = tmp_path / task
    shutil.copytree(folders[task], dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            data[section][field] = value
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("breakage,words", [
    (lambda d: _edit_json(d / "high_noise_model" / "config.json", dim="64"), "'dim' must be int"),
    (lambda d: _edit_json(d / "wanx.json", t5__dimm=3), "unknown key(s) 'dimm'"),
    (lambda d: _edit_json(d / "wanx.json", vae__colour=1), "unknown key(s) 'colour'"),
    (lambda d: _edit_json(d / "wanx.json", task__steps=3), "unknown task field(s) ['steps']"),
    (lambda d: _edit_json(d / "wanx.json", extras={}), "unknown section(s) ['extras']"),
    (lambda d: _edit_json(d / "wanx.json", task__boundary=2.0), "boundary must be a number in [0, 1]"),
    (lambda d: _edit_json(d / "wanx.json", task__frame_num="17"), "'frame_num' must be int"),
    (lambda d: (d / "wanx.json").write_text("{not json"), "not valid JSON"),
])
def test_config_problems_name_the_file_and_field(folders, tmp_path, no_weights, breakage, words):
    folder = _copy(folders, "t2v-A14B", tmp_path)
    breakage(folder)
    with pytest.raises(CheckpointError) as e:
        describe_checkpoint(folder)
    print(e.value)
    assert words in str(e.value) and str(folder) in str(e.value)


def test_missing_shard_is_named_before_any_weight(tmp_path, no_weights):
    folder = tmp_path / "sharded"
    with torch.random.fork_rng():
        build_tiny_checkpoint(folder, "t2v-A14B", seed=2, max_shard_bytes=200_000)
    shard = sorted((folder / "low_noise_model").glob("*-of-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError) as e:
        describe_checkpoint(folder)
    assert shard.name in str(e.value) and "missing" in str(e.value)


def test_config_typo_is_warned_about(folders, tmp_path):
    folder = _copy(folders, "t2v-A14B", tmp_path)
    _edit_json(folder / "high_noise_model" / "config.json", num_layer=3)
    with pytest.warns(UserWarning, match="'num_layer'.*did you mean 'num_layers'"):
        describe_checkpoint(folder)


@pytest.mark.parametrize("breakage,words", [
    (lambda d: (d / "models_t5_umt5-xxl-enc-bf16.pth").write_bytes(
        (d / "models_t5_umt5-xxl-enc-bf16.pth").read_bytes()[:300]), "models_t5_umt5-xxl-enc-bf16.pth"),
    (lambda d: (d / "google" / "umt5-xxl" / "tokenizer.json").write_text("{\"model\": 3}"), "tokenizer.json"),
    (lambda d: torch.save({"w": torch.zeros(1), "obj": Path("x")}, d / "Wan2.1_VAE.pth"), "refuses"),
])
def test_corrupt_files_are_named_by_the_cli(folders, tmp_path, capsys, breakage, words):
    folder = _copy(folders, "t2v-A14B", tmp_path)
    breakage(folder)
    rc = cli.main(["generate", "x", "--ckpt_dir", str(folder), "--save_file", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err
    print(err)
    assert rc == 2 and err.startswith("wanx: error:") and words in err and "Traceback" not in err
    assert not (tmp_path / "o.mp4").exists()


def test_diffusers_folder_missing_transformer_2_is_an_error(tmp_path):
    root = tmp_path / "dif"
    for sub in ("transformer", "vae", "text_encoder", "tokenizer"):
        (root / sub).mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": 0.875}))
    with pytest.raises(CheckpointError, match="names 'transformer_2'"):
        describe_checkpoint(root)
    _edit_json(root / "model_index.json", transformer_2=[None, None], boundary_ratio=7)
    with pytest.raises(CheckpointError, match="boundary must be a number in \\[0, 1\\]"):
        describe_checkpoint(root)


# ------------------------------------------------------------------------------ the run itself

@pytest.fixture(scope="module")
def t2v_pipe(folders):
    return wanx.load_pipeline(folders["t2v-A14B"], device="cpu")


def _gen(pipe, **kw):
    return pipe.generate("a red circle moving left", size=(64, 64), frame_num=5, sample_steps=4, seed=3, **kw)


def test_nan_latent_raises_instead_of_saving_a_black_video(t2v_pipe, monkeypatch):
    low = t2v_pipe.experts[1]
    monkeypatch.setattr(low, "forward", lambda x, *a, **k: torch.full_like(x, math.nan))
    with pytest.raises(GenerationError, match="NaN/inf"):
        _gen(t2v_pipe)


def test_callback_sees_every_step_and_can_cancel(t2v_pipe):
    seen = []

    def callback(step, total, entry):
        seen.append((step, total, entry.describe()["expert"]))
        if step == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        _gen(t2v_pipe, callback=callback)
    assert [s[:2] for s in seen] == [(1, 4), (2, 4), (3, 4)]
    full = []
    _gen(t2v_pipe, callback=lambda s, n, e: full.append(e))
    assert [e.index for e in full] == [0, 1, 2, 3] and len({e.expert for e in full}) == 2


def test_unknown_words_are_warned_about(t2v_pipe, caplog):
    with caplog.at_level("WARNING", logger="wanx"):
        _gen(t2v_pipe, negative_prompt="a dragon")
    assert "does not know" in caplog.text and "dragon" in caplog.text


def test_api_warns_outside_the_official_sizes_and_can_refuse(t2v_pipe, caplog):
    with caplog.at_level("WARNING", logger="wanx"):
        t2v_pipe.resolve("x", size=(32, 32))
    assert "not supported" in caplog.text
    with pytest.raises(InputError, match="not supported"):
        t2v_pipe.resolve("x", size=(32, 32), allow_any_size=False)


# ------------------------------------------------------------------------------ safe outputs

def _writer(path: str, barrier, results) -> None:
    barrier.wait()
    try:
        with atomic_output(path) as tmp:
            tmp.write_bytes(b"x" * 1_000_000)
            time.sleep(0.2)  # all four are writing at once
        results.put("ok")
    except FileExistsError as e:
        results.put(f"refused: {e}")


def test_four_writers_one_path_one_success_three_refusals(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    target = tmp_path / "same.mp4"
    procs = [ctx.Process(target=_writer, args=(str(target), barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    print(outcomes)
    assert outcomes.count("ok") == 1 and sum(o.startswith("refused") for o in outcomes) == 3
    assert target.read_bytes() == b"x" * 1_000_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.mp4"]  # no temp file left


def test_interrupt_leaves_no_temp_file_and_no_output(tmp_path, monkeypatch):
    import wanx.media as media

    def interrupted(tmp, *a, **k):
        Path(tmp).write_bytes(b"half a video")
        raise KeyboardInterrupt
    monkeypatch.setattr(media, "_encode_h264", interrupted)
    with pytest.raises(KeyboardInterrupt):
        media.write_mp4(tmp_path / "v.mp4", np.zeros((1, 8, 8, 3), np.uint8), 16)
    with pytest.raises(KeyboardInterrupt), atomic_output_dir(tmp_path / "folder") as tmp:
        (tmp / "weights").write_text("partial")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_in_the_cli_says_interrupted(folders, tmp_path, monkeypatch, capsys):
    def stop(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(wanx, "load_pipeline", stop)
    rc = cli.main(["generate", "x", "--ckpt_dir", str(folders["t2v-A14B"]), "--save_file", str(tmp_path / "o.mp4")])
    assert rc == 130 and capsys.readouterr().err.strip() == "interrupted"


def test_cli_version_verbose_after_subcommand_and_convert_in_place(folders, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and wanx.__version__ in capsys.readouterr().out
    args = cli.build_parser().parse_args(["generate", "x", "-v"])
    assert args.verbose is True
    vae = folders["t2v-A14B"] / "Wan2.1_VAE.pth"
    before = vae.read_bytes()
    rc = cli.main(["convert", "vae", str(vae), str(vae), "--overwrite"])
    assert rc == 2 and "same path" in capsys.readouterr().err and vae.read_bytes() == before


def test_convert_refuses_an_existing_destination_and_publishes_atomically(folders, tmp_path, capsys):
    dst = tmp_path / "vae.safetensors"
    dst.write_bytes(b"mine")
    rc = cli.main(["convert", "vae", str(folders["t2v-A14B"] / "Wan2.1_VAE.pth"), str(dst)])
    assert rc == 2 and dst.read_bytes() == b"mine" and "--overwrite" in capsys.readouterr().err
    rc = cli.main(["convert", "dit", str(folders["t2v-A14B"] / "high_noise_model"), str(tmp_path / "dit")])
    assert rc == 0 and (tmp_path / "dit" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dit", "vae.safetensors"]
