"""CLIP visual tower (ViT-H/14, block-31 output): parity with the official module, preprocessing, safe loading."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch

from helpers_animate import official_module, randomize, rel_err
from wanx.configs import CLIPVisionConfig
from wanx.loading.animate_clip import load_clip_visual
from wanx.loading.safe import CheckpointError
from wanx.model.attention import attention, attention_backend
from wanx.vision import CLIPVision, clip_preprocess
from wanx.vision.clip import CLIP_MEAN, CLIP_STD

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
TOL = 1e-5


@pytest.fixture
def official_clip(monkeypatch):
    """wan/modules/animate/clip.py with wanx's attention for flash-attn.

    torchvision is imported by that file only for the PIL transforms of CLIPModel, which these
    tests replace; a stand-in is registered for the import alone (and removed afterwards).
    """
    if "_wan_official_animate.modules.animate.clip" not in sys.modules:
        pytest.importorskip("diffusers")  # these probe for torchvision: import them before the stand-in
        transformers = pytest.importorskip("transformers")
        transformers.AutoTokenizer  # noqa: B018 - resolves the lazy import now
        official_module("modules.animate.xlm_roberta")
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")
        monkeypatch.setitem(sys.modules, "torchvision", tv)
        monkeypatch.setitem(sys.modules, "torchvision.transforms", tv.transforms)
    clip = official_module("modules.animate.clip")
    monkeypatch.setattr(clip, "flash_attention", lambda q, k, v, **kw: attention(q, k, v))
    return clip


def _tiny_official(clip, cfg: CLIPVisionConfig):
    torch.manual_seed(0)
    model = clip.XLMRobertaCLIP(embed_dim=16, image_size=cfg.image_size, patch_size=cfg.patch_size,
                                vision_dim=cfg.dim, vision_heads=cfg.num_heads, vision_layers=cfg.num_layers,
                                vocab_size=50, max_text_len=12, text_dim=16, text_heads=2, text_layers=1).eval()
    randomize(model, seed=4)
    return model


def test_visual_tower_matches_official_block_31_output(official_clip):
    cfg = CLIPVisionConfig.tiny()
    ref = _tiny_official(official_clip, cfg)
    ours = CLIPVision(cfg).eval()
    sd = {k[len("visual."):]: v for k, v in ref.state_dict().items() if k.startswith("visual.")}
    unused = [k for k in sd if k.startswith(("transformer.2.", "post_norm.")) or k == "head"]
    ours.load_state_dict({k: v for k, v in sd.items() if k not in unused}, strict=True)
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad(), attention_backend("math"):
        out, expected = ours(pixels), ref.visual(pixels, use_31_block=True)
    err = rel_err(out, expected)
    print(f"CLIP visual (all but the last block): max rel err vs official = {err:.2e}")
    assert out.shape == (2, cfg.num_tokens, cfg.dim) and err <= TOL


def test_preprocessing_and_encoding_match_official_clip_model(official_clip):
    cfg = CLIPVisionConfig.tiny()
    ref = _tiny_official(official_clip, cfg)
    wrapper = official_clip.CLIPModel.__new__(official_clip.CLIPModel)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    # T.Normalize(mean, std) is (x - mean) / std per channel.
    wrapper.model = SimpleNamespace(image_size=cfg.image_size, visual=ref.visual)
    wrapper.transforms = SimpleNamespace(transforms=[lambda x: (x - mean) / std])
    wrapper.dtype = torch.float32
    ours = load_clip_visual_from(ref, cfg)
    image = torch.rand(3, 40, 60) * 2 - 1  # not square: both squash it to 28x28
    with torch.no_grad(), attention_backend("math"):
        out = ours.encode_images(image[None])
        expected = wrapper.visual([image[:, None]])
    err = rel_err(out, expected)
    print(f"CLIP preprocessing + visual: max rel err vs official CLIPModel.visual = {err:.2e}")
    assert err <= TOL


def load_clip_visual_from(ref, cfg):
    ours = CLIPVision(cfg).eval()
    sd = {k[len("visual."):]: v for k, v in ref.state_dict().items()
          if k.startswith("visual.") and not k.startswith(("visual.transformer.2.", "visual.post_norm."))
          and k != "visual.head"}
    ours.load_state_dict(sd, strict=True)
    return ours


def test_preprocess_maps_a_grey_image_to_the_normalised_grey():
    out = clip_preprocess(torch.zeros(1, 3, 30, 50), size=14)  # 0 in [-1, 1] is 0.5 in [0, 1]
    expected = (0.5 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert out.shape == (1, 3, 14, 14)
    assert torch.allclose(out[0, :, 7, 7], expected, atol=1e-6)


def test_loads_the_whole_clip_file_safely_and_skips_only_the_unused_parts(official_clip, tmp_path):
    cfg = CLIPVisionConfig.tiny(num_heads=4)
    ref = _tiny_official(official_clip, cfg)
    path = tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    torch.save(ref.state_dict(), path)
    ours = load_clip_visual(path, config=cfg)
    pixels = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        assert rel_err(ours(pixels), ref.visual(pixels, use_31_block=True)) <= TOL
    inferred = load_clip_visual(path).cfg  # shapes give everything but the heads (dim // 80, at least 1)
    assert (inferred.dim, inferred.num_layers, inferred.use_layers, inferred.image_size) == (32, 3, 2, 28)
    sd = ref.state_dict()
    sd["visual.extra.weight"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="extra"):
        load_clip_visual(path, config=cfg)
    del sd["visual.extra.weight"], sd["visual.transformer.1.attn.proj.weight"]
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="transformer.1.attn.proj.weight"):
        load_clip_visual(path, config=cfg)
