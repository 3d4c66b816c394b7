"""Load S2V's wav2vec2 folder (``<ckpt>/wav2vec2-large-xlsr-53-english``, a transformers
``Wav2Vec2ForCTC`` + processor) into wanx's own :class:`wanx.audio.Wav2Vec2`, without transformers.

Weights come from ``model.safetensors`` or ``pytorch_model.bin`` (``torch.load(weights_only=True)``).
The CTC head and the training-only ``masked_spec_embed`` are dropped; every other tensor must
match (strict), with the weight-normed positional conv read in either of transformers' spellings.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..audio.wav2vec2 import Wav2Vec2, Wav2Vec2Config
from .safe import CheckpointError, StateDict, build_on_meta, load_weights_file

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_UNUSED = ("lm_head.", "masked_spec_embed", "quantizer.", "project_hid.", "project_q.")
_RENAMES = {"encoder.pos_conv_embed.conv.parametrizations.weight.original0": "encoder.pos_conv_embed.conv.weight_g",
            "encoder.pos_conv_embed.conv.parametrizations.weight.original1": "encoder.pos_conv_embed.conv.weight_v"}


@dataclass
class SpeechEncoder:
    """The loaded wav2vec2 and its processor settings."""

    model: Wav2Vec2
    normalize: bool  # the processor's do_normalize (zero mean, unit variance per utterance)
    sample_rate: int


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"wav2vec2 folder is incomplete: {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def wav2vec2_state_dict(sd: StateDict) -> StateDict:
    """transformers ``Wav2Vec2ForCTC`` / ``Wav2Vec2Model`` keys -> :class:`Wav2Vec2` keys."""
    out = {}
    for key, value in sd.items():
        key = key.removeprefix("wav2vec2.")
        if key.startswith(_UNUSED):
            continue
        out[_RENAMES.get(key, key)] = value
    return out


def read_wav2vec2_config(folder: str | os.PathLike) -> tuple[Wav2Vec2Config, dict]:
    """The model config and the feature extractor's settings ({} when the folder has none)."""
    folder = Path(folder)
    try:
        cfg = Wav2Vec2Config.from_hf_json(_json(folder / "config.json"))
        cfg.check()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    return cfg, _processor_settings(folder)


def _processor_settings(folder: Path) -> dict:
    """The feature extractor's settings: ``preprocessor_config.json`` (transformers 4, the released
    folder) or the ``feature_extractor`` entry of ``processor_config.json`` (transformers 5); {} if neither."""
    if (folder / "preprocessor_config.json").is_file():
        return _json(folder / "preprocessor_config.json")
    if (folder / "processor_config.json").is_file():
        entry = _json(folder / "processor_config.json").get("feature_extractor", {})
        return entry if isinstance(entry, dict) else {}
    return {}


def load_wav2vec2(folder: str | os.PathLike, device: str | torch.device = "cpu") -> SpeechEncoder:
    """Read the folder (config, processor settings, weights) into a float32 :class:`SpeechEncoder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"wav2vec2 folder not found: {folder}")
    cfg, pre = read_wav2vec2_config(folder)
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder} has no wav2vec2 weights ({' or '.join(WEIGHT_FILES)})")
    sd = wav2vec2_state_dict(load_weights_file(weights))
    model = build_on_meta(lambda: Wav2Vec2(cfg), sd, dtype=torch.float32, device=device,
                          what=f"wav2vec2 {folder}")
    rate = pre.get("sampling_rate", 16000)
    if rate != 16000:
        raise CheckpointError(f"{folder}: the processor expects {rate} Hz audio; S2V's wav2vec2 runs at 16000 Hz")
    return SpeechEncoder(model, bool(pre.get("do_normalize", True)), rate)


def save_wav2vec2(model: Wav2Vec2, folder: str | os.PathLike, vocab_size: int = 32) -> Path:
    """Write ``model`` as a transformers ``Wav2Vec2ForCTC`` folder (config.json, model.safetensors with
    ``wav2vec2.`` keys and a zero CTC head, preprocessor_config.json), as the S2V checkpoint ships it."""
    from safetensors.torch import save_file

    from ..atomic import atomic_output

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {f"wav2vec2.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    hidden = model.cfg.hidden_size
    sd["lm_head.weight"], sd["lm_head.bias"] = torch.zeros(vocab_size, hidden), torch.zeros(vocab_size)
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in model.cfg.__dict__.items() if k != "extras"}
    files = {"config.json": dict(cfg, model_type="wav2vec2", architectures=["Wav2Vec2ForCTC"], vocab_size=vocab_size),
             "preprocessor_config.json": {"do_normalize": True, "feature_extractor_type": "Wav2Vec2FeatureExtractor",
                                          "feature_size": 1, "padding_side": "right", "padding_value": 0.0,
                                          "return_attention_mask": True, "sampling_rate": 16000}}
    for name, data in files.items():
        with atomic_output(folder / name, overwrite=True) as tmp:
            tmp.write_text(json.dumps(data, indent=2) + "\n")
    with atomic_output(folder / WEIGHT_FILES[0], overwrite=True) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    return folder
