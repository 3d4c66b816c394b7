"""umT5 text encoder, tokenizer, loading and the prompt -> context wrapper (tiny, CPU, seeded)."""

from __future__ import annotations

import json

import pytest
import torch

from helpers_text import TINY_SPECIAL, make_tiny_tokenizer
from wanx.configs import T5Config
from wanx.loading.safe import CheckpointError
from wanx.loading.t5 import (OFFICIAL_T5_FILE, load_t5, save_t5, save_t5_hf, t5_config_from_hf,
                             t5_config_to_hf, t5_hf_to_official, t5_official_to_hf)
from wanx.text import TextEncoder, Tokenizer, UMT5Encoder, clean_prompt, pad_context
from wanx.text.umt5 import relative_position_bucket

torch.set_num_threads(2)

CFG = T5Config(vocab_size=128, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, num_buckets=8)
TEXT_LEN = 16


def random_encoder(cfg: T5Config = CFG, seed: int = 0) -> UMT5Encoder:
    """An encoder whose weights are large enough that positions, masks and buckets all matter."""
    torch.manual_seed(seed)
    model = UMT5Encoder(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "pos_embedding" in name:
                p.normal_(0, 1.0)
            elif name != "token_embedding.weight":
                p.normal_(0, p.shape[1] ** -0.5)
    return model


def batch(cfg: T5Config = CFG, seed: int = 1):
    """ids [3, 40] with 40, 29 and 7 real tokens (right padding, pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (3, 40), generator=g)
    mask = torch.zeros(3, 40, dtype=torch.long)
    for row, n in enumerate((40, 29, 7)):
        mask[row, :n] = 1
    return ids * mask, mask


def hf_encoder(model: UMT5Encoder, **cfg_overrides):
    """transformers' UMT5EncoderModel holding ``model``'s weights through our key map."""
    transformers = pytest.importorskip("transformers")
    c = model.cfg
    hf_cfg = transformers.UMT5Config(
        d_model=c.dim, d_kv=c.head_dim, d_ff=c.dim_ffn, num_layers=c.num_layers, num_heads=c.num_heads,
        relative_attention_num_buckets=c.num_buckets, relative_attention_max_distance=c.max_distance,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, vocab_size=c.vocab_size, **cfg_overrides)
    hf = transformers.UMT5EncoderModel(hf_cfg).eval()
    hf.load_state_dict(t5_official_to_hf(model.state_dict()), strict=True)
    return hf


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

def test_official_state_dict_keys():
    keys = set(UMT5Encoder(CFG).state_dict())
    per_block = {"norm1.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
                 "norm2.weight", "ffn.gate.0.weight", "ffn.fc1.weight", "ffn.fc2.weight",
                 "pos_embedding.embedding.weight"}
    expected = {"token_embedding.weight", "norm.weight"} | {
        f"blocks.{i}.{k}" for i in range(CFG.num_layers) for k in per_block}
    assert keys == expected
    shared = set(UMT5Encoder(CFG.replace(shared_pos=True)).state_dict())
    assert "pos_embedding.embedding.weight" in shared
    assert not any(k.startswith("blocks.") and "pos_embedding" in k for k in shared)


def test_relative_position_bucket_spec_values():
    # umT5-XXL: 32 buckets, max distance 128 -> 16 per direction, 8 exact.
    rel = torch.tensor([0, -1, -7, 7, 1, -8, 8, -16, -127, -128, -500, 500])
    got = relative_position_bucket(rel, 32, 128).tolist()
    # |rel| >= 8: 8 + floor(log(|rel|/8) / log(16) * 8), capped at 15; +16 for rel > 0.
    assert got == [0, 1, 7, 23, 17, 8, 24, 10, 15, 15, 15, 31]


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 128), (8, 16)])
def test_relative_position_bucket_matches_transformers(num_buckets, max_distance):
    model = hf_encoder(UMT5Encoder(CFG.replace(num_buckets=num_buckets, max_distance=max_distance)))
    rel = torch.arange(-600, 601)[None, :]
    hf_attn = model.encoder.block[0].layer[0].SelfAttention
    torch.testing.assert_close(relative_position_bucket(rel, num_buckets, max_distance),
                               hf_attn._relative_position_bucket(rel), rtol=0, atol=0)


@pytest.mark.parametrize("max_distance", [128, 16])
def test_fp32_parity_with_transformers(max_distance):
    model = random_encoder(CFG.replace(max_distance=max_distance))
    hf = hf_encoder(model, attn_implementation="eager")
    ids, mask = batch()
    with torch.no_grad():
        ours = model(ids, mask)
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    assert ours.shape == (3, 40, CFG.dim) and ours.dtype == torch.float32
    valid = mask.bool()
    err = rel_err(ours[valid], ref[valid])
    print(f"\nfp32 umT5 vs transformers (max_distance={max_distance}): max rel err {err:.2e}")
    assert err <= 1e-5
    assert torch.isfinite(ours[~valid]).all()


def test_bf16_close_to_transformers():
    """bf16 weights, looser check: max rel err <= 3e-2 against transformers in bf16 and against fp32.

    (On CPU transformers' bf16 softmax accumulates in fp32, so the first is in fact exact here.)
    """
    model = random_encoder().to(torch.bfloat16)
    hf = hf_encoder(random_encoder(), attn_implementation="eager").to(torch.bfloat16)
    ids, mask = batch()
    with torch.no_grad():
        ours = model(ids, mask)
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        fp32 = random_encoder()(ids, mask)
    assert ours.dtype == torch.bfloat16
    valid = mask.bool()
    err, err32 = rel_err(ours[valid], ref[valid]), rel_err(ours[valid], fp32[valid])
    print(f"\nbf16 umT5 vs transformers bf16: max rel err {err:.2e}; vs our fp32: {err32:.2e}")
    assert err <= 3e-2 and err32 <= 3e-2
    assert torch.isfinite(ours).all()


def test_padding_does_not_change_real_tokens():
    """Each row alone, unpadded, equals its rows in the padded batch (masked keys are never attended)."""
    model = random_encoder()
    ids, mask = batch()
    with torch.no_grad():
        full = model(ids, mask)
        for row, n in enumerate(mask.sum(1).tolist()):
            alone = model(ids[row:row + 1, :n], mask[row:row + 1, :n])
            torch.testing.assert_close(alone[0], full[row, :n], rtol=1e-5, atol=1e-5)
    # ... and the mask matters: without it the short rows see the pad tokens.
    with torch.no_grad():
        unmasked = model(ids, torch.ones_like(mask))
    assert not torch.allclose(unmasked[2, :7], full[2, :7], atol=1e-3)


def test_shared_pos_parity_with_transformers_t5():
    """shared_pos=True (one top-level table) is classic T5: compare with T5EncoderModel."""
    transformers = pytest.importorskip("transformers")
    cfg = CFG.replace(shared_pos=True)
    model = random_encoder(cfg)
    hf_sd = t5_official_to_hf(model.state_dict())
    hf_cfg = transformers.T5Config(**{k: v for k, v in t5_config_to_hf(cfg).items() if k != "dropout_rate"},
                                   dropout_rate=0.0)
    hf = transformers.T5EncoderModel(hf_cfg).eval()
    hf.load_state_dict(hf_sd, strict=True)
    ids, mask = batch()
    with torch.no_grad():
        err = rel_err(model(ids, mask)[mask.bool()], hf(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()])
    assert err <= 1e-5
    assert set(t5_hf_to_official(hf_sd)) == set(model.state_dict())


# --------------------------------------------------------------------------------------------
# Key maps and configs
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shared_pos", [False, True])
def test_key_map_round_trip_exact(shared_pos):
    sd = random_encoder(CFG.replace(shared_pos=shared_pos)).state_dict()
    hf = t5_official_to_hf(sd)
    assert torch.equal(hf["shared.weight"], hf["encoder.embed_tokens.weight"])
    back = t5_hf_to_official(hf)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    again = t5_official_to_hf(back)
    assert set(again) == set(hf) and all(torch.equal(again[k], hf[k]) for k in hf)
    # a file holding only one of the two embedding names still maps
    only_embed = {k: v for k, v in hf.items() if k != "shared.weight"}
    assert torch.equal(t5_hf_to_official(only_embed)["token_embedding.weight"], sd["token_embedding.weight"])


def test_key_map_rejects_unknown_keys():
    with pytest.raises(CheckpointError, match="blocks.0.attn.bogus"):
        t5_official_to_hf({"blocks.0.attn.bogus": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="encoder.block.0.layer.9"):
        t5_hf_to_official({"encoder.block.0.layer.9.x.weight": torch.zeros(1)})


def test_config_round_trip_and_xxl():
    for cfg in (CFG, CFG.replace(max_distance=64, eps=1e-5), T5Config()):
        assert t5_config_from_hf(t5_config_to_hf(cfg)) == cfg
    xxl = t5_config_from_hf({"model_type": "umt5", "d_model": 4096, "d_kv": 64, "d_ff": 10240,
                             "num_heads": 64, "num_layers": 24, "relative_attention_num_buckets": 32,
                             "relative_attention_max_distance": 128, "vocab_size": 256384,
                             "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu"})
    assert xxl == T5Config()
    with pytest.raises(CheckpointError, match="relu"):
        t5_config_from_hf({**t5_config_to_hf(CFG), "feed_forward_proj": "relu"})


# --------------------------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------------------------

def test_official_pth_and_hf_folder_load_to_same_outputs(tmp_path):
    model = random_encoder().to(torch.bfloat16)  # the official file is bf16
    ids, mask = batch()
    with torch.no_grad():
        want = model(ids, mask)
    save_t5(model, tmp_path / "ckpt" / OFFICIAL_T5_FILE)
    save_t5(model, tmp_path / "t5.safetensors")
    save_t5_hf(model, tmp_path / "diffusers" / "text_encoder")
    sources = [tmp_path / "ckpt" / OFFICIAL_T5_FILE, tmp_path / "ckpt", tmp_path / "t5.safetensors",
               tmp_path / "diffusers" / "text_encoder", tmp_path / "diffusers"]
    for src in sources:
        loaded = load_t5(src)  # config inferred from shapes / read from config.json
        assert loaded.cfg == CFG and loaded.dtype == torch.bfloat16, src
        assert not any(p.requires_grad for p in loaded.parameters())
        with torch.no_grad():
            assert torch.equal(loaded(ids, mask), want), src
    f32 = load_t5(tmp_path / "ckpt", config=CFG, dtype=torch.float32)
    assert f32.dtype == torch.float32
    with torch.no_grad():
        out = f32(ids, mask)
    assert out.dtype == torch.float32 and rel_err(out[mask.bool()], want[mask.bool()]) < 3e-2


def test_saved_hf_folder_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = random_encoder()
    save_t5_hf(model, tmp_path / "text_encoder")
    hf = transformers.UMT5EncoderModel.from_pretrained(str(tmp_path / "text_encoder")).eval()
    ids, mask = batch()
    with torch.no_grad():
        err = rel_err(model(ids, mask)[mask.bool()],
                      hf(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()])
    assert err <= 1e-5


def test_sharded_hf_folder(tmp_path):
    from safetensors.torch import save_file

    model = random_encoder()
    folder = save_t5_hf(model, tmp_path / "text_encoder")
    sd = {k: v.clone() for k, v in t5_official_to_hf(model.state_dict()).items()}  # unshared storage
    (folder / "model.safetensors").unlink()
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, str(folder / name))
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_t5(folder)
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask), model(ids, mask))


def test_load_errors_name_what_is_missing(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth"):
        load_t5(tmp_path / "nope.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=OFFICIAL_T5_FILE):
        load_t5(tmp_path / "empty")
    folder = save_t5_hf(random_encoder(), tmp_path / "text_encoder")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_t5(folder)
    sd = random_encoder().state_dict()
    del sd["blocks.1.ffn.fc2.weight"]
    save_t5(sd, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="blocks.1.ffn.fc2.weight"):
        load_t5(tmp_path / "partial.pth", config=CFG)
    with pytest.raises(CheckpointError, match="shape"):
        load_t5(save_t5(random_encoder(), tmp_path / "full.pth"), config=CFG.replace(dim_ffn=48))


class NotATensor:
    """Anything torch.load(weights_only=True) must refuse to unpickle."""


def test_unsafe_pickle_is_refused(tmp_path):
    sd = dict(random_encoder().state_dict())
    sd["payload"] = NotATensor()
    torch.save(sd, tmp_path / OFFICIAL_T5_FILE)
    with pytest.raises(CheckpointError, match="unpickling"):
        load_t5(tmp_path / OFFICIAL_T5_FILE)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

PROMPTS = [
    "A cat sits on the mat.",
    "  The   dog\t\n runs\u3000in the  park  ",           # whitespace runs, ideographic space
    "caf&amp;eacute; &lt;b&gt;中文猫&lt;/b&gt; cafÃ©",     # double html escape, mojibake
    "the red car " * 30,                                   # longer than TEXT_LEN: truncated
    "",                                                    # EOS only
    "snow ☃ and ß ü",                                      # unknown piece -> <unk>
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_clean_prompt():
    assert clean_prompt("  The   dog\t\n runs\u3000in  ") == "The dog runs in"
    assert clean_prompt("caf&amp;eacute; &lt;b&gt;") == "café <b>"
    assert clean_prompt("cafÃ©") == "café"
    assert clean_prompt("a\x1cb &#28;c") == "ab c"  # the only chars where `re` and `regex` \s differ are dropped
    assert clean_prompt("") == ""


def test_tokenizer_identical_to_transformers(tok_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    ours = Tokenizer.from_folder(tok_dir, text_len=TEXT_LEN)
    ids, mask = ours(PROMPTS)
    ref = hf([clean_prompt(p) for p in PROMPTS], padding="max_length", max_length=TEXT_LEN,
             truncation=True, add_special_tokens=True, return_tensors="pt")
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.shape == mask.shape == (len(PROMPTS), TEXT_LEN)
    assert torch.equal(ids, ref.input_ids) and torch.equal(mask, ref.attention_mask)
    # the cases really happen: truncation keeps the EOS, the empty prompt is just the EOS, unk occurs
    assert mask[3].all() and ids[3, -1] == TINY_SPECIAL["eos"]
    assert mask[4].sum() == 1 and ids[4, 0] == TINY_SPECIAL["eos"]
    assert (ids[5] == TINY_SPECIAL["unk"]).any()
    assert (ids[mask == 0] == TINY_SPECIAL["pad"]).all()
    # a longer text_len per call, still identical
    ids64, _ = ours(PROMPTS, text_len=64)
    ref64 = hf([clean_prompt(p) for p in PROMPTS], padding="max_length", max_length=64,
               truncation=True, add_special_tokens=True, return_tensors="pt")
    assert torch.equal(ids64, ref64.input_ids)


def test_tokenizer_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


# --------------------------------------------------------------------------------------------
# Prompt -> context
# --------------------------------------------------------------------------------------------

def test_text_encoder_trims_and_pad_context_zero_pads(tok_dir):
    tok = Tokenizer.from_folder(tok_dir, text_len=TEXT_LEN)
    model = random_encoder()
    enc = TextEncoder(tok, model, TEXT_LEN, device="cpu")
    prompts = ["A cat sits on the mat.", "", "the red car " * 30]
    contexts = enc.encode(prompts)
    ids, mask = tok(prompts)
    lengths = mask.sum(1).tolist()
    assert lengths[1] == 1 and lengths[2] == TEXT_LEN and 1 < lengths[0] < TEXT_LEN
    with torch.no_grad():
        full = model(ids, mask)
    for c, n, row in zip(contexts, lengths, full):
        assert c.shape == (n, CFG.dim)  # EOS included
        assert torch.equal(c, row[:n])
    padded = pad_context(contexts, TEXT_LEN)
    assert padded.shape == (3, TEXT_LEN, CFG.dim)
    for i, n in enumerate(lengths):
        assert torch.equal(padded[i, :n], contexts[i])
        assert (padded[i, n:] == 0).all()
    # What flows to the DiT: each prompt encoded alone (as the official), zero-padded to the longest,
    # with the lengths; batch-of-3 encoding above differs from it only in the last bits.
    ctx = enc.context(prompts)
    assert ctx.lengths.tolist() == lengths and ctx.context.shape == (3, max(lengths), CFG.dim)
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        assert torch.equal(ctx.context[i, :n], enc.encode([p])[0]) and (ctx.context[i, n:] == 0).all()
    assert torch.allclose(ctx.context, padded[:, : max(lengths)], atol=1e-5)
    with pytest.raises(ValueError, match="exceed"):
        pad_context(contexts, 4)
