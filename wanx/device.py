"""One place that decides the device, the compute dtypes and the CPU threading."""

from __future__ import annotations

import torch

from .errors import InputError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else CUDA when present, else the CPU; a device this machine lacks is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError("device", f"{{arg}} {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device", f"{{arg}} {device!r}: this machine has no CUDA device "
                                       f"(torch {torch.__version__}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError("device", f"{{arg}} {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("device", f"{{arg}} {device!r}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise InputError("device", f"{{arg}} {device!r} is not supported; use cpu or cuda")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The DiT/text-encoder compute dtype: as given, else bfloat16 on CUDA and float32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise InputError("dtype", f"{{arg}} {dtype} is not supported; use one of float32, bfloat16, float16")
        return dtype
    try:
        return DTYPES[dtype]
    except (KeyError, TypeError):
        raise InputError("dtype", f"unknown {{arg}} {dtype!r}; use one of float32, bfloat16, float16") from None


def dit_dtype(compute: torch.dtype, convert_model_dtype: bool) -> torch.dtype:
    """The DiT weight dtype: bfloat16 under the official ``--convert_model_dtype``, else the compute dtype."""
    return torch.bfloat16 if convert_model_dtype else compute


# parity: the official VAE wrappers run in float32 whatever the DiT dtype.
VAE_DTYPE = torch.float32


def configure_cpu_threads(threads: int | None) -> None:
    """Set the intra-op thread count (None: torch's default, all cores).

    Idle threads sleep rather than spin because ``import wanx`` sets ``OMP_WAIT_POLICY=PASSIVE``
    (unless set): spinning slowed denoising 5-30x on a shared CPU (bench/threads.py).
    """
    if threads is not None:
        if threads < 1:
            raise InputError("threads", f"{{arg}} must be at least 1, got {threads}")
        torch.set_num_threads(threads)

