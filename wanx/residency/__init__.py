"""Where each component lives and when it moves, applied to a pipeline from outside.

The pipeline calls a policy at its stage boundaries (text encoding, each denoising step, the end
of denoising) and never moves a model itself. :class:`WholeModelOffload` is the official
behaviour (``--offload_model``, ``--t5_cpu``); block swap and multi-GPU placement will be other
policies with the same methods.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

CPU = torch.device("cpu")


class WholeModelOffload:
    """Whole models move between the device and the CPU, as the official ``offload_model``/``t5_cpu``.

    - ``t5_cpu``: the text encoder runs on the CPU;
    - ``offload_model`` (on a GPU): the text encoder goes back to the CPU after encoding, only the
      active expert is on the device, and the experts go back to the CPU after denoising.
    """

    def __init__(self, device: torch.device | str, *, offload_model: bool = False, t5_cpu: bool = False):
        self.device = torch.device(device)
        self.offload_model = offload_model
        self.t5_cpu = t5_cpu

    @property
    def _offloads(self) -> bool:
        return self.offload_model and self.device.type != "cpu"

    def text_device(self) -> torch.device:
        return CPU if self.t5_cpu else self.device

    def enter_text(self, encoder: nn.Module) -> None:
        """Before encoding prompts."""
        encoder.to(self.text_device())

    def leave_text(self, encoder: nn.Module) -> None:
        """After encoding prompts."""
        if self.offload_model and not self.t5_cpu:
            encoder.to(CPU)

    def activate(self, experts: Sequence[nn.Module], index: int) -> nn.Module:
        """Before a denoising step: the expert ``index`` on the device (and, offloading, only it)."""
        if self._offloads:
            for j, other in enumerate(experts):
                if j != index:
                    other.to(CPU)
        return experts[index].to(self.device)

    def leave_denoise(self, experts: Sequence[nn.Module]) -> None:
        """After the last step, or when a run stops early."""
        if self._offloads:
            for expert in experts:
                expert.to(CPU)

    def describe(self) -> dict:
        return {"policy": "whole_model_offload", "offload_model": self.offload_model, "t5_cpu": self.t5_cpu}


__all__ = ["WholeModelOffload"]
