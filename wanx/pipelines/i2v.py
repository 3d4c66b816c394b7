"""I2V-A14B conditioning: the image as first frame, VAE-encoded with zeros after it, plus a 4-channel mask."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def i2v_latent_size(img_h: int, img_w: int, max_area: int, vae_stride: int, patch: int) -> tuple[int, int]:
    """(lat_h, lat_w) keeping the image's aspect ratio within ``max_area`` pixels.

    # parity: the official rounds sqrt(area*aspect) down to a multiple of (stride*patch) via floor
    # division on floats, then round() — reproduced exactly so sizes match the official pipeline.
    """
    aspect = img_h / img_w
    lat_h = round(math.sqrt(max_area * aspect) // vae_stride // patch * patch)
    lat_w = round(math.sqrt(max_area / aspect) // vae_stride // patch * patch)
    if lat_h == 0 or lat_w == 0:
        raise ValueError(f"size area {max_area} is too small for a {img_w}x{img_h} image")
    return lat_h, lat_w


def first_frame_mask(frame_num: int, lat_h: int, lat_w: int, device=None) -> torch.Tensor:
    """[4, T, lat_h, lat_w]: channel k of latent t marks pixel frame 4t+k-3; only frame 0 is known."""
    msk = torch.zeros(1, frame_num, lat_h, lat_w, device=device)
    msk[:, 0] = 1
    # parity: frame 0 is repeated 4x so the first latent's 4 channels all mark the real frame.
    msk = torch.cat([msk[:, :1].repeat_interleave(4, dim=1), msk[:, 1:]], dim=1)  # [1, F+3, h, w]
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w)  # [1, T, 4, h, w]
    return msk.transpose(1, 2)[0]  # [4, T, h, w]


@torch.no_grad()
def i2v_condition(vae, image: torch.Tensor, frame_num: int, lat_h: int, lat_w: int,
                  vae_stride: int) -> torch.Tensor:
    """The 20 condition channels y = [mask(4) | VAE latent(16)] for an image [3,H,W] in [-1,1]."""
    h, w = lat_h * vae_stride, lat_w * vae_stride
    device = next(vae.parameters()).device
    # parity: official resizes the [-1,1] tensor bicubically on the CPU (F.interpolate, no antialias).
    first = F.interpolate(image[None].float().cpu(), size=(h, w), mode="bicubic")  # [1, 3, h, w]
    video = torch.cat([first.transpose(0, 1), torch.zeros(3, frame_num - 1, h, w)], dim=1)  # [3, F, h, w]
    latent = vae.encode(video[None].to(device))[0]  # [16, T, lat_h, lat_w]
    mask = first_frame_mask(frame_num, lat_h, lat_w, device=latent.device)
    return torch.cat([mask, latent.float()], dim=0)  # [20, T, lat_h, lat_w]
