"""Reading a user's input image safely: exists, is an image, not a decompression bomb, decodes whole."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError

MAX_IMAGE_PIXELS = 8192 * 8192  # 64 Mpx: far above any Wan size, far below a decompression bomb
MAX_IMAGE_BYTES = 256 << 20


@dataclass(frozen=True)
class ImageInput:
    """A checked input image: RGB PIL image or [3, H, W] tensor in [-1, 1], and a name for the recipe."""

    image: Any
    name: str
    width: int
    height: int


def read_image(image: Any, argument: str = "image") -> ImageInput:
    """A path, PIL image or [3, H, W] tensor in [-1, 1] -> :class:`ImageInput`; bad input is an InputError."""
    if isinstance(image, (str, os.PathLike)):
        return _read_file(Path(image), argument)
    if isinstance(image, torch.Tensor):
        return _check_tensor(image, argument)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a core dependency
        raise
    if isinstance(image, Image.Image):
        _check_pixels(image.width, image.height, argument, "the image")
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        return ImageInput(rgb, getattr(image, "filename", None) and Path(image.filename).name or "<image>",
                          image.width, image.height)
    raise InputError(argument, f"{{arg}} must be a file path, a PIL image or a [3, H, W] tensor, "
                               f"got {type(image).__name__}")


def _check_pixels(width: int, height: int, argument: str, what: str) -> None:
    if width < 1 or height < 1:
        raise InputError(argument, f"{{arg}} {what} is empty ({width}x{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(argument, f"{{arg}} {what} is {width}x{height} = {width * height / 1e6:.0f} Mpx; "
                                   f"the limit is {MAX_IMAGE_PIXELS / 1e6:.0f} Mpx (resize it first)")


def _read_file(path: Path, argument: str) -> ImageInput:
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise InputError(argument, f"{{arg}} not found: {path}")
    if not path.is_file():
        raise InputError(argument, f"{{arg}} {path} is not a file")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise InputError(argument, f"{{arg}} {path} is {path.stat().st_size >> 20} MiB; the limit is "
                                   f"{MAX_IMAGE_BYTES >> 20} MiB")
    try:
        with Image.open(path) as im:  # reads the header only
            _check_pixels(im.width, im.height, argument, str(path))
            im.verify()
        with Image.open(path) as im:  # verify() leaves the file unusable: decode a second handle
            rgb = im.convert("RGB")
    except UnidentifiedImageError:
        raise InputError(argument, f"{{arg}} {path} is not an image file PIL can read") from None
    except Image.DecompressionBombError as e:  # PIL's own guard fires in open() before ours can
        raise InputError(argument, f"{{arg}} {path} is too large: {e} (limit {MAX_IMAGE_PIXELS / 1e6:.0f} Mpx)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(argument, f"{{arg}} {path} is corrupt or truncated ({e})") from None
    return ImageInput(rgb, path.name, rgb.width, rgb.height)


def _check_tensor(image: torch.Tensor, argument: str) -> ImageInput:
    if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise InputError(argument, f"{{arg}} tensor must be float [3, H, W] in [-1, 1], "
                                   f"got {image.dtype} {tuple(image.shape)}")
    _check_pixels(image.shape[2], image.shape[1], argument, "the tensor")
    if not torch.isfinite(image).all() or image.abs().max() > 1 + 1e-6:
        raise InputError(argument, "{arg} tensor must hold finite values in [-1, 1]")
    return ImageInput(image, "<tensor>", int(image.shape[2]), int(image.shape[1]))


def pil_to_tensor(img) -> torch.Tensor:
    """PIL RGB -> [3,H,W] float in [-1,1] (as the official TF.to_tensor().sub_(0.5).div_(0.5))."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
