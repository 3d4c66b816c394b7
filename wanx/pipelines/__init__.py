"""Pipelines: one shared `generate()` for T2V-A14B, I2V-A14B and TI2V-5B."""

from .loader import demo_checkpoint_dir, describe_checkpoint, load_pipeline
from .pipeline import PipelineOptions, WanPipeline

__all__ = ["WanPipeline", "PipelineOptions", "load_pipeline", "describe_checkpoint", "demo_checkpoint_dir"]
