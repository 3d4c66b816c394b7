"""Image encoders: the CLIP ViT-H/14 visual tower Animate-14B conditions on."""

from .clip import CLIPVision, clip_preprocess

__all__ = ["CLIPVision", "clip_preprocess"]
