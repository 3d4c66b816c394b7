"""Pipelines: one shared `generate()` for T2V-A14B, I2V-A14B and TI2V-5B."""

from .common import GenerateRequest, PipelineOptions, WanPipeline
from .loader import demo_checkpoint_dir, load_pipeline

__all__ = ["WanPipeline", "PipelineOptions", "GenerateRequest", "load_pipeline", "demo_checkpoint_dir"]
