"""Loading the S2V transformer: an official save_pretrained folder loads strictly and runs the same."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from wanx.configs import S2VConfig
from wanx.loading.s2v import load_s2v, read_s2v_config, s2v_config_to_json, save_s2v
from wanx.loading.safe import CheckpointError
from wanx.model import attention_backend
from wanx.model.s2v import WanS2VDiT

from helpers_s2v import make_inputs, official_kwargs, official_s2v_modules, randomize_, rel_err, run_official, run_ours


@pytest.fixture(scope="module")
def official_folder(tmp_path_factory):
    """An S2V folder written by the official class itself (diffusers save_pretrained), and the model."""
    official = official_s2v_modules()
    cfg = S2VConfig.tiny()
    torch.manual_seed(0)
    ref = official.model_s2v.WanModel_S2V(**official_kwargs(cfg)).eval()
    randomize_(ref, seed=4)
    folder = tmp_path_factory.mktemp("s2v") / "official"
    ref.save_pretrained(folder)
    return folder, ref


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_official_folder_loads_strictly_and_matches(official_folder):
    folder, ref = official_folder
    saved = json.loads((folder / "config.json").read_text())
    assert saved["_class_name"] == "WanModel_S2V"
    assert read_s2v_config(folder) == S2VConfig.tiny(text_dim=4096)  # a real config.json has no text_dim ...
    with pytest.raises(CheckpointError, match=r"text_embedding\.0\.weight: checkpoint \(64, 32\)"):
        load_s2v(folder)
    ours = load_s2v(folder, config=S2VConfig.tiny())  # ... so a tiny model needs it said
    inp = make_inputs(ours.cfg)
    t = torch.tensor([400.0])
    with torch.no_grad(), attention_backend("math"):
        err = rel_err(run_ours(ours, inp, t, pose=True, drop=False)[0],
                      run_official(ref, inp, t, pose=True, drop=False))
    print(f"official folder -> wanx forward rel err {err:.2e}")
    assert err <= 1e-5


def test_our_config_json_is_the_official_one(official_folder):
    folder, _ = official_folder
    official = {k: v for k, v in json.loads((folder / "config.json").read_text()).items()
                if not k.startswith("_")}
    ours = {k: v for k, v in s2v_config_to_json(S2VConfig.tiny()).items() if not k.startswith("_")}
    ours.pop("text_dim")  # not the default: written so that the tiny folder describes itself
    assert ours == official


def test_save_load_round_trip_with_shards(tmp_path):
    torch.manual_seed(1)
    model = WanS2VDiT(S2VConfig.tiny())
    randomize_(model)
    save_s2v(model, tmp_path / "m", max_shard_bytes=200_000)
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    back = load_s2v(tmp_path / "m")
    assert back.cfg == model.cfg
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_missing_or_unexpected_tensors_are_named(tmp_path):
    model = WanS2VDiT(S2VConfig.tiny())
    save_s2v(model, tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(path))
    sd.pop("frame_packer.proj_4x.weight")
    sd["audio_injector.injector.2.q.weight"] = torch.zeros(1)
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"missing keys.*frame_packer\.proj_4x\.weight") as info:
        load_s2v(tmp_path)
    assert "audio_injector.injector.2.q.weight" in str(info.value)


@pytest.mark.parametrize("change, message", [
    ({"_class_name": "WanModel"}, "not an S2V transformer"),
    ({"enable_motioner": True, "enable_framepack": False}, "frame packer"),
    ({"audio_inject_layers": "all"}, "audio_inject_layers"),
])
def test_bad_configs_are_refused_before_weights(tmp_path, change, message):
    d = s2v_config_to_json(S2VConfig.tiny())
    d.update(change)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=message):
        read_s2v_config(tmp_path)
