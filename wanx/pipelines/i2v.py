"""I2V-A14B conditioning: the image as first frame, VAE-encoded with zeros after it, plus a 4-channel mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..geometry import i2v_latent_size  # noqa: F401  (re-exported: the size rule lives in wanx.geometry)


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
