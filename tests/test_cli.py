"""`wanx generate` end to end on a tiny checkpoint, and its up-front input checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import wanx
from wanx import cli
from wanx.media import read_mp4
from wanx.testing import build_tiny_checkpoint

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("cli") / "t2v", "t2v-A14B", seed=5)


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if anything heavy is loaded."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr(wanx, "load_pipeline", boom)


def test_readme_flag_table_matches_the_parser():
    sub = cli.build_parser()._subparsers._group_actions[0].choices["generate"]
    flags = {s for a in sub._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
    table = README.read_text().split("### `wanx generate` flags", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(--[a-z_0-9]+)`", table, flags=re.M))
    assert documented == flags


def test_generate_writes_a_playable_mp4_with_the_recipe(ckpt, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    rc = cli.main(["generate", "a red circle moving left", "--ckpt_dir", str(ckpt), "--size", "128*64",
                   "--frame_num", "9", "--sample_steps", "3", "--base_seed", "42", "--save_file", str(out)])
    assert rc == 0
    frames, fps, recipe = read_mp4(out)
    assert frames.shape == (9, 64, 128, 3)
    assert fps == 16
    assert recipe["prompt"] == "a red circle moving left" and recipe["seed"] == 42
    assert recipe["task"] == "t2v-A14B" and recipe["sample_steps"] == 3 and recipe["size"] == "128*64"
    # The recipe names the checkpoint folder and its fingerprint, never the local path (videos get shared).
    assert recipe["checkpoint"]["name"] == ckpt.name and str(ckpt) not in str(recipe)
    assert recipe["dtype"] == "float32" and recipe["device"] == "cpu"
    line = capsys.readouterr().out
    assert "saved" in line and "denoise" in line and "peak RSS" in line


def test_existing_output_is_not_overwritten(ckpt, tmp_path, no_loading, capsys):
    out = tmp_path / "keep.mp4"
    out.write_bytes(b"user data")
    rc = cli.main(["generate", "x", "--ckpt_dir", str(ckpt), "--save_file", str(out)])
    assert rc == 2 and out.read_bytes() == b"user data"
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--frame_num", "8"], "4n+1"),
    (["--size", "1280*720"], "not supported"),
    (["--task", "i2v-A14B"], "describes a t2v model"),  # a t2v folder run as i2v (test_bad_inputs: --image)
    (["--image", "/nonexistent.png", "--task", "ti2v-5B"], "Wan2.2_VAE.pth"),
    (["--task", "s2v-14B"], "not runnable"),
])
def test_invalid_combinations_fail_before_loading(ckpt, tmp_path, no_loading, capsys, args, message):
    rc = cli.main(["generate", "x", "--ckpt_dir", str(ckpt), "--save_file", str(tmp_path / "o.mp4"), *args])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_unknown_task_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "x", "--task", "t2v-1.3B"])
    assert e.value.code == 2


def test_missing_checkpoint_folder_is_named(tmp_path, no_loading, capsys):
    rc = cli.main(["generate", "x", "--ckpt_dir", str(tmp_path / "nope")])
    assert rc == 2 and "nope" in capsys.readouterr().err


def test_speed_and_memory_flags_reach_load_pipeline(ckpt, tmp_path, monkeypatch):
    """--compile, --vae_tiling, --t5_cpu and --offload_model are passed on to load_pipeline."""
    seen = {}

    class Loaded(Exception):
        pass

    def capture(*args, **kwargs):
        seen.update(kwargs)
        raise Loaded

    monkeypatch.setattr(wanx, "load_pipeline", capture)
    with pytest.raises(Loaded):
        cli.main(["generate", "a cat", "--ckpt_dir", str(ckpt), "--compile", "--vae_tiling", "--t5_cpu",
                  "--offload_model", "True", "--save_file", str(tmp_path / "x.mp4")])
    assert seen["compile"] and seen["vae_tiling"] and seen["t5_cpu"] and seen["offload_model"]


def test_every_flag_of_every_command_has_help_and_lists_its_choices():
    sub = cli.build_parser()._subparsers._group_actions[0]
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help, f"wanx {name} {action.option_strings or action.dest} has no help text"
            if action.choices and action.option_strings:
                text = parser.format_help()
                assert all(str(c) in text for c in action.choices), f"{name} {action.option_strings}"
