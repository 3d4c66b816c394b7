"""Output sizes of the image-conditioned tasks, exactly as the official pipelines compute them.

Pure arithmetic on sizes, shared by the resolver (which checks a request before loading) and the
condition classes (which prepare the model inputs).
"""

from __future__ import annotations

import math


def i2v_latent_size(img_h: int, img_w: int, max_area: int, vae_stride: int, patch: int) -> tuple[int, int]:
    """I2V-A14B: (lat_h, lat_w) keeping the image's aspect ratio within ``max_area`` pixels.

    # parity: the official rounds sqrt(area*aspect) down to a multiple of (stride*patch) via floor
    # division on floats, then round() — reproduced exactly so sizes match the official pipeline.
    """
    aspect = img_h / img_w
    lat_h = round(math.sqrt(max_area * aspect) // vae_stride // patch * patch)
    lat_w = round(math.sqrt(max_area / aspect) // vae_stride // patch * patch)
    if lat_h == 0 or lat_w == 0:
        raise ValueError(f"size area {max_area} is too small for a {img_w}x{img_h} image")
    return lat_h, lat_w


def best_output_size(w: int, h: int, dw: int, dh: int, expected_area: int) -> tuple[int, int]:
    """TI2V-5B: (ow, oh), multiples of (dw, dh) with area <= expected_area and the aspect closest to w/h.

    Tries rounding the width first and the height first and keeps the better one, as the official.
    """
    ratio = w / h
    ow = (expected_area * ratio) ** 0.5
    oh = expected_area / ow
    ow1 = int(ow // dw * dw)
    oh1 = int(expected_area / ow1 // dh * dh) if ow1 > 0 else 0
    oh2 = int(oh // dh * dh)
    ow2 = int(expected_area / oh2 // dw * dw) if oh2 > 0 else 0
    if min(ow1, oh1, ow2, oh2) <= 0:
        raise ValueError(f"size area {expected_area} is too small for a {w}x{h} image")
    r1, r2 = ow1 / oh1, ow2 / oh2
    if max(ratio / r1, r1 / ratio) < max(ratio / r2, r2 / ratio):
        return ow1, oh1
    return ow2, oh2
