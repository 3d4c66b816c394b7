"""Synthetic demo data, its analyser, the demo tokenizer and the quality harness (CPU, ~10 s)."""

import dataclasses
import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest

from bench.clip_analysis import (
    DEGRADATIONS,
    MILD,
    analyze_clip,
    classify_colour,
    gaussian_blur,
    score,
)
from wanx.train import data
from wanx.train.data import (
    ALL_TRIPLES,
    BACKGROUNDS,
    COLOURS,
    HELDOUT_TRIPLES,
    MOTIONS,
    SHAPES,
    TRAIN_TRIPLES,
    ClipSpec,
    all_captions,
    caption,
    make_dataset,
    make_specs,
    parse_caption,
    parse_caption_full,
    partial_caption,
    render_clip,
    sample_spec,
    spec_for,
)

README_PROMPT = "a red circle moving left"


def _triple_specs(seed, background=None):
    """One spec per colour×shape×motion triple (all 48), random geometry."""
    rng = np.random.default_rng(seed)
    return [spec_for(rng, *t, background=background) for t in ALL_TRIPLES]


# ---- generator -------------------------------------------------------------------------------


def test_dataset_is_deterministic_by_seed():
    clips_a, caps_a = make_dataset(6, seed=3, size=32)
    clips_b, caps_b = make_dataset(6, seed=3, size=32)
    clips_c, caps_c = make_dataset(6, seed=4, size=32)
    assert clips_a.shape == (6, 17, 32, 32, 3) and clips_a.dtype == np.uint8
    assert np.array_equal(clips_a, clips_b) and caps_a == caps_b
    assert not np.array_equal(clips_a, clips_c)


def test_splits_partition_the_triples():
    assert len(ALL_TRIPLES) == 48 and len(HELDOUT_TRIPLES) == 8 and len(TRAIN_TRIPLES) == 40
    assert set(TRAIN_TRIPLES) | set(HELDOUT_TRIPLES) == set(ALL_TRIPLES)
    assert not set(TRAIN_TRIPLES) & set(HELDOUT_TRIPLES)
    assert parse_caption(README_PROMPT) in TRAIN_TRIPLES  # the README demo is a training caption


def test_heldout_triples_never_sampled_for_training():
    rng = np.random.default_rng(0)
    train = {sample_spec(rng, "train").triple for _ in range(3000)}
    heldout = {sample_spec(rng, "heldout").triple for _ in range(500)}
    assert train == set(TRAIN_TRIPLES)  # every train triple is drawn, no held-out one
    assert heldout == set(HELDOUT_TRIPLES)


def test_every_attribute_and_attribute_pair_is_seen_in_training():
    # Held-out captions should test composition, not unseen words or unseen pairs.
    for i, j in itertools.combinations(range(3), 2):
        every_pair = {(t[i], t[j]) for t in ALL_TRIPLES}
        assert {(t[i], t[j]) for t in TRAIN_TRIPLES} == every_pair
    for k, vocab in enumerate((COLOURS, SHAPES, MOTIONS)):
        assert {t[k] for t in TRAIN_TRIPLES} == set(vocab)
    rng = np.random.default_rng(1)
    assert {sample_spec(rng).background for _ in range(300)} == set(BACKGROUNDS)


def test_objects_stay_inside_and_travel_far():
    for spec in make_specs(500, seed=2, split="all"):
        assert spec.fits(17)
        travel = spec.speed * 16
        assert 0.25 <= travel <= 0.57, spec  # a good part of the frame, never off it
        assert 0.22 <= spec.size <= 0.27  # about two latent pixels wide at 32 px (8x VAE stride)
    clips, _ = make_dataset(20, seed=5, split="all", size=32)
    for clip in clips:  # the one-pixel border ring stays pure background in every frame
        ring = np.concatenate([clip[:, 0], clip[:, -1], clip[:, :, 0], clip[:, :, -1]], axis=1)
        assert (ring == ring[0, 0]).all()


def test_render_draws_the_spec():
    spec = ClipSpec("blue", "square", "right", "white", (0.3, 0.5), 0.02, 0.18)
    clip = render_clip(spec, frames=5, size=64)
    assert clip.shape == (5, 64, 64, 3)
    assert tuple(clip[0, 0, 0]) == BACKGROUNDS["white"]
    cx = [np.nonzero((f != 255).any(-1))[1].mean() for f in clip]
    assert tuple(clip[0, 32, round(0.3 * 64)]) == COLOURS["blue"]  # object centre, frame 0
    assert np.allclose(np.diff(cx), 0.02 * 64, atol=0.3)  # moves right at the given speed
    with pytest.raises(ValueError):
        render_clip(ClipSpec("red", "hexagon", "left", "black", (0.5, 0.5), 0.0, 0.18))


def test_low_contrast_backgrounds_are_excluded(monkeypatch):
    assert all(data.allowed_backgrounds(c) == tuple(BACKGROUNDS) for c in COLOURS)
    monkeypatch.setitem(data.COLOURS, "silver", (140, 140, 140))
    assert "gray" not in data.allowed_backgrounds("silver")
    monkeypatch.setitem(data.COLOURS, "mint", (30, 200, 30))  # same luma as mid-gray
    assert "gray" not in data.allowed_backgrounds("mint")


def test_captions_parse_back():
    for spec in make_specs(50, seed=6, split="all"):
        assert parse_caption(caption(spec)) == spec.triple
        long_caption = caption(spec, with_background=True)
        assert parse_caption_full(long_caption) == (*spec.triple, spec.background)
    for c in all_captions("all", with_background=True):
        assert parse_caption(c) in ALL_TRIPLES
    assert parse_caption("A Red Circle moving LEFT.") == ("red", "circle", "left")
    assert parse_caption_full("a red circle moving left on a grey background")[3] == "gray"
    assert parse_caption_full(README_PROMPT)[3] is None
    for bad in ("a purple circle moving left", "a red circle", "red circle moving sideways"):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_partial_captions_leave_out_exactly_one_attribute():
    from wanx.text.demo_vocab import build_demo_tokenizer

    assert partial_caption("blue", "square", "left", None, "colour") == "a square moving left"
    assert partial_caption("blue", "square", "left", None, "shape") == "a blue shape moving left"
    assert partial_caption("blue", "square", "left", "gray", "motion") == "a blue square on a gray background"
    with pytest.raises(ValueError, match="omit must be"):
        partial_caption("blue", "square", "left", None, "size")
    tok = build_demo_tokenizer()
    for (colour, shape, motion), omit in itertools.product(ALL_TRIPLES, ("colour", "shape", "motion")):
        text = partial_caption(colour, shape, motion, "white", omit)
        named = {colour, shape, motion} & set(text.split())
        assert named == {colour, shape, motion} - {dict(colour=colour, shape=shape, motion=motion)[omit]}
        assert 2 not in tok.encode(text).ids  # every word is in the demo vocabulary


def test_caption_forms_mix_without_changing_clips():
    clips_half, caps_half = make_dataset(200, seed=7, size=32, background_share=0.5)
    clips_none, caps_none = make_dataset(200, seed=7, size=32, background_share=0.0)
    long_share = np.mean([parse_caption_full(c)[3] is not None for c in caps_half])
    assert 0.4 <= long_share <= 0.6
    assert all(parse_caption_full(c)[3] is None for c in caps_none)
    assert np.array_equal(clips_half, clips_none)


def test_model_tensor_helpers_round_trip():
    clips, _ = make_dataset(2, seed=8, size=32)
    x = data.to_model_input(clips)
    assert tuple(x.shape) == (2, 3, 17, 32, 32) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert tuple(data.to_model_input(clips[0]).shape) == (3, 17, 32, 32)
    assert np.array_equal(data.from_model_output(x), clips)


# ---- analyser --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_analyser_reads_every_clean_triple(size):
    for spec in _triple_specs(seed=size):
        a = analyze_clip(render_clip(spec, 17, size))
        got = (a.colour, a.shape, a.motion, a.background)
        assert got == (*spec.triple, spec.background), spec
        assert score(a, caption(spec, with_background=True)) == dict(
            colour=True, shape=True, motion=True, all=True, background=True)
        assert a.area_flicker < 0.02 and a.colour_flicker < 0.01


def test_analyser_survives_blur():
    specs = _triple_specs(seed=9)
    shape_ok = 0
    for spec in specs:
        a = analyze_clip(gaussian_blur(render_clip(spec, 17, 64), 1.5))
        assert (a.colour, a.motion) == (spec.colour, spec.motion), spec
        shape_ok += a.shape == spec.shape
    assert shape_ok >= 0.95 * len(specs)


@pytest.mark.parametrize("name", MILD)
def test_analyser_is_robust_to_mild_degradations(name):
    rng = np.random.default_rng(10)
    specs = make_specs(24, seed=11, split="all")
    ok = [score(analyze_clip(DEGRADATIONS[name](render_clip(s, 17, 64), rng)), caption(s))["all"]
          for s in specs]
    assert np.mean(ok) >= 0.95


def test_analyser_reports_static_and_missing_objects():
    still = render_clip(ClipSpec("green", "circle", "left", "black", (0.5, 0.5), 0.0, 0.18), 9, 32)
    assert analyze_clip(still).motion == "static"
    empty = np.full((9, 32, 32, 3), 128, np.uint8)
    a = analyze_clip(empty)
    assert not a.object_found and a.colour is None
    assert score(a, "a red circle moving left")["all"] is False
    assert classify_colour(np.array([120.0, 120.0, 125.0])) is None  # achromatic blob: no colour


def test_flicker_figures_react_to_flicker():
    spec = ClipSpec("red", "circle", "right", "black", (0.3, 0.5), 0.02, 0.18)
    steady = analyze_clip(render_clip(spec, 17, 64))
    big = render_clip(dataclasses.replace(spec, size=0.2), 17, 64)
    pulsing = render_clip(dataclasses.replace(spec, size=0.14), 17, 64)
    pulsing[::2] = big[::2]  # the object's size jumps every frame
    dimming = render_clip(spec, 17, 64)
    dimming[1::2] = (dimming[1::2] * 0.7).astype(np.uint8)  # its colour dims every other frame
    assert analyze_clip(pulsing).area_flicker > 10 * steady.area_flicker
    assert analyze_clip(pulsing).area_flicker > 0.3
    assert analyze_clip(dimming).colour_flicker > 10 * steady.colour_flicker


def test_score_flags_the_wrong_field():
    spec = ClipSpec("yellow", "triangle", "down", "gray", (0.5, 0.3), 0.02, 0.18)
    a = analyze_clip(render_clip(spec, 17, 32))
    assert score(a, "a yellow triangle moving up") == dict(
        colour=True, shape=True, motion=False, all=False, background=None)
    assert score(a, "a blue triangle moving down on a white background") == dict(
        colour=False, shape=True, motion=True, all=False, background=False)


# ---- tokenizer -------------------------------------------------------------------------------

CAPTIONS = [
    README_PROMPT,
    "A Blue Square moving UP on a white background.",
    "a purple hexagon dancing",
    " ".join(["red circle"] * 12),  # longer than max_length: truncated, still ends in </s>
]


def test_demo_tokenizer_ids():
    from wanx.text.demo_vocab import build_demo_tokenizer

    tok = build_demo_tokenizer()
    assert [tok.token_to_id(t) for t in ("<pad>", "</s>", "<unk>")] == [0, 1, 2]
    ids = tok.encode(README_PROMPT).ids
    assert len(ids) == 6 and ids[-1] == 1 and 2 not in ids and 0 not in ids
    assert tok.encode("a purple circle").ids[1] == 2  # unknown word
    assert tok.encode("A RED Circle").ids == tok.encode("a red circle").ids
    assert build_demo_tokenizer().get_vocab() == tok.get_vocab()
    for c in all_captions("all", with_background=True):
        assert 2 not in tok.encode(c).ids


def test_demo_vocabulary_is_the_shipped_one_and_covers_every_caption_word():
    """The text layer spells the vocabulary out; it must stay the one the shipped model was trained with."""
    import json

    from wanx.text.demo_vocab import build_demo_tokenizer

    shipped = Path(__file__).resolve().parents[1] / "wanx/demo/wanx-demo/google/umt5-xxl/tokenizer.json"
    assert json.loads(build_demo_tokenizer().to_str()) == json.loads(shipped.read_text())
    vocab = build_demo_tokenizer().get_vocab()
    assert {*COLOURS, *SHAPES, *MOTIONS, *BACKGROUNDS} <= vocab.keys()


def test_saving_the_tokenizer_never_replaces_files_unasked(tmp_path):
    from wanx.text.demo_vocab import save_demo_tokenizer

    path = save_demo_tokenizer(tmp_path / "tok", model_max_length=16)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="tokenizer.json"):
        save_demo_tokenizer(tmp_path / "tok")
    assert path.read_bytes() == before
    save_demo_tokenizer(tmp_path / "tok", overwrite=True)
    assert sorted(f.name for f in (tmp_path / "tok").iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]  # no temporaries left


def test_saved_tokenizer_matches_transformers(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from wanx.text.demo_vocab import save_demo_tokenizer

    save_demo_tokenizer(tmp_path)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="<pad>", length=16)
    tok.enable_truncation(max_length=16)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for c in CAPTIONS:
        want = tok.encode(c)
        got = hf(c, padding="max_length", max_length=16, truncation=True)
        assert got["input_ids"] == want.ids and got["attention_mask"] == want.attention_mask
        assert len(want.ids) == 16 and 1 in want.ids
    assert want.ids[-1] == 1  # the truncated caption keeps its </s>


# ---- scoring harness -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "demo_quality.py"
    spec = importlib.util.spec_from_file_location("demo_quality", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_harness_scores_ground_truth_and_wrong_captions(bench):
    caps = all_captions("train")[:4] + all_captions("heldout")[:2]
    clips = [bench.ground_truth_clip(c, seed=0, size=32) for c in caps]
    summary = bench.summarise(bench.score_clips(zip(clips, caps)))
    assert summary["train"]["n"] == 4 and summary["heldout"]["n"] == 2
    fields = ("colour", "shape", "motion", "all")
    assert all(summary[s][k] == 100.0 for s in summary for k in fields)
    assert summary["train"]["background"] is None  # short captions name no background
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    wrong = [c.rsplit(" ", 1)[0] + " " + opposite[c.rsplit(" ", 1)[1]] for c in caps]
    bad = bench.summarise(bench.score_clips(zip(clips, wrong)))
    assert all(bad[s]["motion"] == 0.0 and bad[s]["colour"] == 100.0 for s in bad)
    table = bench.markdown_table([("gt", summary)])
    assert table.count("\n") == 3 and "| gt | heldout | 2 | 100.0% |" in table


def test_harness_generated_mode_plumbing(bench, tmp_path):
    class FakePipeline:  # stands in for the demo pipeline: returns a rendered clip
        def generate(self, prompt, seed):
            frames = bench.ground_truth_clip(prompt, seed, size=32)
            return type("Video", (), {"frames": frames})()

    clip = bench.generate_clip(FakePipeline(), README_PROMPT, seed=1)
    assert score(analyze_clip(clip), README_PROMPT)["all"]
    with pytest.raises(SystemExit, match="could not load"):
        bench.load_demo_pipeline(str(tmp_path / "no-such-model"))
    png = bench.write_strip([clip, clip], [README_PROMPT] * 2, tmp_path / "s.png", every=4, scale=1)
    from PIL import Image

    assert Image.open(png).size == (5 * 32 + 4, 2 * (32 + 14))  # 5 frames + 4 separators, 2 rows
