"""The shipped demo model (wanx/demo/wanx-demo): it loads like a real checkpoint and generates."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wanx.pipelines.loader import DEMO_DIR

PROMPT = "a red circle moving left"


@pytest.fixture(scope="module")
def pipe():
    import wanx

    return wanx.load_pipeline()  # no folder: the built-in demo model


def test_demo_folder_is_an_official_layout_checkpoint():
    from wanx.loading.layout import find_checkpoint

    layout = find_checkpoint(DEMO_DIR)
    assert layout.kind == "official" and layout.spec.name == "t2v-A14B" and layout.spec.is_moe
    assert [p.name for p in layout.dit_paths] == ["high_noise_model", "low_noise_model"]
    assert layout.spec.default_size == "32*32" and layout.spec.frame_num == 17
    assert layout.spec.negative_prompt == ""  # the caption-dropout condition, not the Chinese default
    total = sum(f.stat().st_size for f in DEMO_DIR.rglob("*") if f.is_file())
    assert total < 30 * 2**20, f"demo folder is {total / 2**20:.1f} MiB"
    assert (DEMO_DIR / "MODEL_CARD.md").is_file()


def test_demo_vae_latent_statistics_are_set():
    meta = json.loads((DEMO_DIR / "wanx.json").read_text())
    std = meta["vae"]["latents_std"]
    assert len(std) == 16 and len(meta["vae"]["latents_mean"]) == 16
    assert not all(s == 1.0 for s in std)  # measured on the trained encoder, not the identity


def test_load_pipeline_without_a_folder_loads_the_demo(pipe):
    assert pipe.checkpoint["name"] == DEMO_DIR.name == "wanx-demo"  # folder name only, never the path
    assert len(pipe.experts) == 2
    assert pipe.experts[0] is not pipe.experts[1]


def test_demo_generates_the_readme_prompt(pipe):
    from bench.clip_analysis import analyze_clip

    video = pipe.generate(PROMPT, seed=0)
    assert video.frames.shape == (17, 32, 32, 3)
    seen = analyze_clip(np.asarray(video.frames))
    # Colour, shape and motion of circles are right on every measured prompt (MODEL_CARD.md).
    assert seen.object_found and (seen.colour, seen.shape, seen.motion) == ("red", "circle", "left"), seen


def test_wanx_generate_without_ckpt_dir_writes_an_mp4(tmp_path):
    from wanx.cli import main
    from wanx.media import read_mp4

    path = tmp_path / "demo.mp4"
    assert main(["generate", PROMPT, "--save_file", str(path), "--base_seed", "3"]) == 0
    frames, fps, meta = read_mp4(path)
    assert frames.shape == (17, 32, 32, 3)
    assert fps == pytest.approx(8.0)
    assert meta["prompt"] == PROMPT and meta["seed"] == 3 and meta["size"] == "32*32"
    assert meta["checkpoint"]["name"] == "wanx-demo" and str(DEMO_DIR) not in str(meta)


def test_shipped_model_was_trained_with_the_documented_recipe():
    """The one documented command (``DemoRecipe`` defaults) is what trained the shipped weights, and
    the shipped sampling defaults are the recipe's."""
    from dataclasses import asdict

    from wanx.train.recipe import DemoRecipe

    shipped = json.loads((DEMO_DIR / "training_summary.json").read_text())
    recipe = json.loads(json.dumps(asdict(DemoRecipe())))  # tuples -> lists, as stored
    assert shipped["recipe"] == recipe and shipped["seed"] == 0
    task = json.loads((DEMO_DIR / "wanx.json").read_text())["task"]
    assert task["guide_scale"] == [recipe["guide_scale"]] * 2
    assert (task["sample_steps"], task["sample_shift"], task["boundary"]) == (
        recipe["sample_steps"], recipe["shift"], recipe["boundary"])
