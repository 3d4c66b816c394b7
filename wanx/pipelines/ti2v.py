"""TI2V-5B conditioning: optional first-frame image latent with per-token timesteps (0 on its tokens)."""

from __future__ import annotations

import torch

from ..geometry import best_output_size
from ..images import pil_to_tensor


def prepare_ti2v_image(img, max_area: int, multiple: int) -> torch.Tensor:
    """PIL image -> [3,1,oh,ow] in [-1,1]: LANCZOS resize to cover, then centre crop (official recipe)."""
    from PIL import Image

    ow, oh = best_output_size(img.width, img.height, multiple, multiple, max_area)
    scale = max(ow / img.width, oh / img.height)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
    x1, y1 = (img.width - ow) // 2, (img.height - oh) // 2
    img = img.crop((x1, y1, x1 + ow, y1 + oh))
    return pil_to_tensor(img).unsqueeze(1)  # [3, 1, oh, ow]


def first_frame_keep_mask(latent_shape, device=None) -> torch.Tensor:
    """mask2 of the official ``masks_like(zero=True)``: 0 on latent frame 0, 1 elsewhere ([C,T,h,w])."""
    mask = torch.ones(latent_shape, device=device)
    mask[:, 0] = 0
    return mask


def per_token_timesteps(mask: torch.Tensor, t: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[1, L] timesteps, one per patch token in (T, h/2, w/2) order: t scaled by the keep-mask."""
    # parity: the official samples the mask with a [:, ::2, ::2] stride (the 2x2 patch) on channel 0.
    tokens = mask[0][:: patch[0], :: patch[1], :: patch[2]]  # [T, h/2, w/2]
    return (tokens * t.to(mask.dtype)).flatten()[None]  # [1, L]
