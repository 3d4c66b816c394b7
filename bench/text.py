"""Text encoding: wanx UMT5Encoder vs transformers UMT5EncoderModel on the same weights.

Both get what their pipelines feed them: one prompt, tokenised and padded to 512 with its mask
(the official and diffusers pipelines both pad to ``max_length=512``). Weights are shared: the HF
model is built on the meta device and the wanx tensors, renamed by ``t5_official_to_hf``, are
assigned into it. The output compared is the real tokens' states (both pipelines trim the rest).
"""

from __future__ import annotations

from typing import Any

import torch

from wanx.loading.t5 import t5_config_to_hf, t5_official_to_hf
from wanx.text import UMT5Encoder

from .common import Size, interleaved, measure_call_memory, peak_memory, rel_err, summarize

TEXT_LEN = 512


def build_wanx(size: Size, device: str) -> UMT5Encoder:
    torch.manual_seed(0)
    model = UMT5Encoder(size.t5).eval()  # reset_parameters gives the official init scales
    return model.to(device=device, dtype=size.dtype)




def build_hf_sharing(model: UMT5Encoder):
    import transformers

    with torch.device("meta"):
        hf = transformers.UMT5EncoderModel(hf_config_from_model(model))
    hf.load_state_dict(t5_official_to_hf(model.state_dict()), strict=True, assign=True)
    if hasattr(hf, "tie_weights"):
        hf.tie_weights()  # encoder.embed_tokens and shared are one tensor in HF
    return hf.eval()


def hf_config_from_model(model: UMT5Encoder):
    import transformers

    cfg = transformers.UMT5Config(**t5_config_to_hf(model.cfg))
    cfg.dropout_rate = 0.0
    return cfg


def make_inputs(size: Size, device: str, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(1, TEXT_LEN, dtype=torch.long)
    mask = torch.zeros(1, TEXT_LEN, dtype=torch.long)
    n = size.text_tokens
    ids[0, :n] = torch.randint(3, size.t5.vocab_size, (n,), generator=g)
    ids[0, n - 1] = 1  # EOS
    mask[0, :n] = 1
    return ids.to(device), mask.to(device)


def wanx_encode(model):
    def run(ids, mask):
        with torch.no_grad():
            return model(ids, mask)
    return run


def hf_encode(hf):
    def run(ids, mask):
        with torch.no_grad():
            return hf(input_ids=ids, attention_mask=mask).last_hidden_state
    return run


def run(size: Size, repeats: int, device: str, mem: bool) -> list[dict[str, Any]]:
    model = build_wanx(size, device)
    hf = build_hf_sharing(model)
    ids, mask = make_inputs(size, device)
    ours, theirs = wanx_encode(model), hf_encode(hf)
    n = size.text_tokens
    err = rel_err(ours(ids, mask)[:, :n], theirs(ids, mask)[:, :n])
    times = interleaved({"wanx": lambda: ours(ids, mask), "ref": lambda: theirs(ids, mask)},
                        repeats=repeats, warmup=1, device=device)
    row = {"size": size.name, "what": f"umT5 encode (1 prompt, {n}/{TEXT_LEN} tokens)",
           "ref_impl": f"transformers UMT5EncoderModel ({hf.config._attn_implementation})",
           "max_rel_diff": err, **summarize(times)}
    del model, hf
    if mem:
        row["memory"] = {impl: peak_memory("text", impl, size.name) for impl in ("wanx", "ref")}
    return [row]


def mem_child(size: Size, impl: str, device: str) -> dict[str, Any]:
    ids, mask = make_inputs(size, device)
    model = build_wanx(size, device)
    if impl == "wanx":
        fn = wanx_encode(model)
    else:
        fn = hf_encode(build_hf_sharing(model))
        del model
    return measure_call_memory(lambda: fn(ids, mask), device)
