"""Shared benchmark machinery: sizes, interleaved timing, peak-memory probes, random twins, output.

Honesty rules (design.md §5): wanx and the reference run in the SAME process on IDENTICAL weights,
their calls are alternated (A B A B ...), we keep every sample and report medians and the
wanx/reference ratio. Peak memory is measured in a fresh subprocess per (component, implementation),
see :func:`peak_memory`.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from wanx.configs import DiTConfig, T5Config

# ----------------------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Size:
    """One benchmark size: the DiT and umT5 geometry and the latent grid of one video."""

    name: str
    dit: DiTConfig
    t5: T5Config
    latent: tuple[int, int, int]  # latent (T, H, W) before patching
    ctx_lens: tuple[int, int]  # real token counts of (prompt, negative prompt); the rest is zero padding
    text_tokens: int  # real tokens of the prompts fed to the text encoders (padded to text_len)
    dtype: torch.dtype = torch.float32
    note: str = ""

    @property
    def tokens(self) -> int:
        p = self.dit.patch_size
        return (self.latent[0] // p[0]) * (self.latent[1] // p[1]) * (self.latent[2] // p[2])


SIZES: dict[str, Size] = {
    # The test-suite size: overhead-dominated, tells us about per-call Python cost, not GEMMs.
    "tiny": Size("tiny", DiTConfig.tiny("t2v", text_dim=32), T5Config.tiny(), latent=(3, 8, 8),
                 ctx_lens=(7, 12), text_tokens=12),
    # "medium": the geometry of one real block scaled so a CFG step takes seconds on 2 CPU cores.
    # head_dim 128 and text_dim 4096 / text_len 512 as the real models; ffn 3x dim (A14B: 2.7x);
    # latent 5 x 32 x 48 (17 frames of 256 x 384 px with the 2.1 VAE) -> 1920 video tokens.
    "medium": Size("medium", DiTConfig(model_type="t2v", in_dim=16, out_dim=16, dim=1024, ffn_dim=3072,
                                       num_heads=8, num_layers=8, text_dim=4096),
                   T5Config(vocab_size=32128, dim=1024, dim_attn=1024, dim_ffn=2816, num_heads=16,
                            num_layers=8, num_buckets=32),
                   latent=(5, 32, 48), ctx_lens=(80, 126), text_tokens=80),
    # "real" runs only on a GPU (bf16): the two production geometries, one step each.
    "real-ti2v-5B": Size("real-ti2v-5B", DiTConfig(model_type="ti2v", in_dim=48, out_dim=48, dim=3072,
                                                   ffn_dim=14336, num_heads=24, num_layers=30),
                         T5Config(), latent=(31, 44, 80), ctx_lens=(80, 126), text_tokens=80,
                         dtype=torch.bfloat16, note="1280x704, 121 frames, Wan2.2 VAE (16x)"),
    "real-a14b": Size("real-a14b", DiTConfig(model_type="t2v", in_dim=16, out_dim=16, dim=5120, ffn_dim=13824,
                                             num_heads=40, num_layers=40),
                      T5Config(), latent=(21, 60, 104), ctx_lens=(80, 126), text_tokens=80,
                      dtype=torch.bfloat16, note="one A14B expert, 832x480, 81 frames, Wan2.1 VAE (8x)"),
}


def sizes_for(name: str) -> list[Size]:
    """``real`` expands to both production geometries."""
    if name == "real":
        return [SIZES["real-ti2v-5B"], SIZES["real-a14b"]]
    return [SIZES[name]]


# ---------------------------------------------------------------------------------------- timing


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                device: str = "cpu") -> dict[str, list[float]]:
    """Seconds per call of every function, calls alternated (a b a b ...) so load drift hits all."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        # Alternate the order too, so neither side always runs right after the other's cache warm-up.
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for k in order:
            gc.collect()
            sync(device)
            t0 = time.perf_counter()
            fns[k]()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def summarize(times: dict[str, list[float]], ours: str = "wanx", ref: str = "ref") -> dict[str, Any]:
    med = {k: statistics.median(v) for k, v in times.items()}
    # The ratio of medians, plus the median of per-round ratios (robust to a slow round).
    per_round = [a / b for a, b in zip(times[ours], times[ref])]
    return {"median_s": med, "samples_s": times, "ratio": med[ours] / med[ref],
            "ratio_per_round_median": statistics.median(per_round)}


# ---------------------------------------------------------------------------------------- memory


def proc_status(field_name: str) -> int:
    """A /proc/self/status field in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process; False when not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> None:
    """glibc ``malloc_trim(0)`` where available (no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_call_memory(fn: Callable[[], Any], device: str = "cpu") -> dict[str, Any]:
    """Run ``fn`` once; peak memory during the call and its increase over the memory before it.

    CPU: the kernel's RSS high-water mark (VmHWM), reset just before the call, so it counts every
    page the process touches (torch's allocator, MKL scratch, Python) and nothing from model building;
    ``malloc_trim`` first, so pages the allocator kept from building don't hide the call's own needs.
    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, not the caching slack or the context).
    """
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"method": "torch.cuda.max_memory_allocated", "before_bytes": before, "peak_bytes": peak,
                "call_bytes": peak - before}
    malloc_trim()  # hand freed heap pages back first, so "before" is live memory, not allocator slack
    before = proc_status("VmRSS")
    ok = reset_peak_rss()
    fn()
    peak = proc_status("VmHWM")
    return {"method": "VmHWM (reset via clear_refs)" if ok else "VmHWM since process start",
            "before_bytes": before, "peak_bytes": peak, "call_bytes": peak - before}


def peak_memory(component: str, impl: str, size: str, extra: list[str] | None = None) -> dict[str, Any]:
    """Run one measurement in a fresh ``python -m bench --mem-child`` subprocess; returns its JSON."""
    cmd = [sys.executable, "-m", "bench", "--mem-child", component, impl, "--size", size, *(extra or [])]
    env = dict(os.environ)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    if out.returncode != 0:
        return {"error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------- random twins


def randomize_(module: torch.nn.Module, seed: int = 1) -> None:
    """Every parameter nonzero at a sensible scale (zero-init heads would make outputs trivial)."""
    gens: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, p in module.named_parameters():
            # Draw on the parameter's device (a 14B model is not randomised on the CPU).
            g = gens.setdefault(p.device, torch.Generator(p.device).manual_seed(seed))
            noise = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.dim() >= 2 and "scale_shift_table" not in name and "modulation" not in name:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.2 * noise)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (the test suite's measure)."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# ----------------------------------------------------------------------------------------- output


def machine() -> dict[str, Any]:
    import diffusers
    import transformers

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def fmt_bytes(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


@dataclass
class Report:
    """Collects result rows and writes ``results.json`` and ``results.md`` to the out dir."""

    out: Path
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        print(self.row_md(row), flush=True)

    @staticmethod
    def row_md(r: dict[str, Any]) -> str:
        med = r.get("median_s", {})
        mem = r.get("memory", {})
        wm, rm = mem.get("wanx", {}), mem.get("ref", {})
        mem_ratio = (f"{wm['call_bytes'] / rm['call_bytes']:.2f}"
                     if wm.get("call_bytes") and rm.get("call_bytes") else "-")
        err = r.get("max_rel_diff", r.get("max_abs_video_diff"))
        return (f"| {r['size']} | {r['what']} | {med.get('wanx', float('nan')):.4f} | {med.get('ref', float('nan')):.4f} "
                f"| **{r.get('ratio', float('nan')):.3f}** | {fmt_bytes(wm.get('peak_bytes'))} / "
                f"{fmt_bytes(wm.get('call_bytes'))} | {fmt_bytes(rm.get('peak_bytes'))} / "
                f"{fmt_bytes(rm.get('call_bytes'))} | {mem_ratio} | {'-' if err is None else f'{err:.1e}'} |")

    def write(self, meta: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        doc = {"meta": meta, "rows": self.rows}
        (self.out / "results.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        (self.out / f"results-{stamp}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        lines = [f"# wanx bench ({stamp})", "", f"`{meta.get('command', '')}`", "",
                 "machine: " + ", ".join(f"{k}={v}" for k, v in meta.get("machine", {}).items()), "",
                 "| size | what | wanx s (median) | ref s (median) | wanx/ref | wanx peak / call | "
                 "ref peak / call | call-mem ratio | max diff |",
                 "|---|---|---|---|---|---|---|---|---|"]
        lines += [self.row_md(r) for r in self.rows]
        lines += ["", "peak = RSS high-water during the call (fresh subprocess, VmHWM reset before the call); "
                  "call = peak minus RSS just before the call. On CUDA: torch.cuda.max_memory_allocated. "
                  "max diff: DiT/umT5 rows max relative diff of the outputs (max|a-b|/max|b|); whole generation "
                  "rows max absolute diff of the [-1, 1] videos."]
        (self.out / "results.md").write_text("\n".join(lines) + "\n")
