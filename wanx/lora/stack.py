"""Apply LoRA files to the experts of a pipeline, from outside the model code.

``LoraStack((high_noise, low_noise))`` (or ``(model,)``) loads any number of LoRA files onto one
or both experts, each with its own strength, in one of two modes:

- ``fuse``: the delta is computed in float32, added to the weight and cast back. The first time
  a parameter is touched a copy of it is kept (on the CPU), so ``unload_all`` restores it bit for bit.
- ``live``: the weights stay as they are; each Linear layer of the blocks gets a replacement
  ``forward`` (:mod:`wanx.lora.live`) computing ``W x + s * up @ (down @ x)`` (needed for quantized
  weights, and to change LoRAs or strengths without touching the weights). Parameters that are not
  the weight/bias of a block Linear (embeddings, head, norms, modulation: small and kept in float)
  are fused even in live mode, and restored the same way.

Everything a file asks for is checked against every selected expert (names, shapes, dtypes)
before the first weight changes; a failure while applying restores what that load had changed.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .entries import Entry, LowRank
from .errors import LoraError
from .live import LiveDelta, LiveLinear, WorkBuffers
from .names import KeySpace
from .reader import LoraContents, LoraFile, normalise, read_lora_file, summarize_ranks

log = logging.getLogger("wanx.lora")

MODES = ("fuse", "live")
EXPERTS = ("both", "high", "low")
_SHOW = 8  # how many keys an error or warning names


def name_list(keys, limit: int = _SHOW) -> str:
    """The first ``limit`` keys, comma separated, and how many more there are."""
    keys = list(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def owner_of(param: str) -> str:
    """The module a parameter belongs to (``blocks.0.modulation`` is its own owner)."""
    head, _, last = param.rpartition(".")
    return head if last in ("weight", "bias") else param


def module_kind(module: str) -> str:
    """A coarse category of an official module name, for coverage counts."""
    parts = module.split(".")
    if parts[0] == "blocks" and len(parts) > 2:
        rest = parts[2]
        if rest in ("self_attn", "cross_attn"):
            return "norm" if len(parts) > 3 and parts[3].startswith("norm") else rest
        return {"ffn": "ffn", "modulation": "modulation"}.get(rest, "norm" if rest.startswith("norm") else rest)
    return {"patch_embedding": "embedding", "text_embedding": "embedding", "time_embedding": "embedding",
            "time_projection": "embedding", "head": "head"}.get(parts[0], parts[0])


# ------------------------------------------------------------------------------------ records

@dataclass(frozen=True)
class AppliedLora:
    """One successful ``load``, as a video recipe records it."""

    name: str
    path: str
    sha256: str
    strength: float | tuple[float, float]
    expert: str
    mode: str
    format: str

    def to_dict(self) -> dict:
        s = list(self.strength) if isinstance(self.strength, tuple) else self.strength
        return {"name": self.name, "sha256": self.sha256, "strength": s, "expert": self.expert,
                "mode": self.mode, "format": self.format}


@dataclass
class ExpertCoverage:
    """What one load did to one expert."""

    expert: str  # "high", "low" or "model"
    strength: float
    modules: int  # LoRA modules found in this expert
    params_fused: int  # parameters changed in place
    layers_live: int  # Linear layers given a live (unmerged) forward
    by_kind: dict[str, int] = field(default_factory=dict)  # modules per category (self_attn, ffn, ...)


@dataclass
class LoraReport:
    """The outcome of ``LoraStack.load``: format, coverage per expert, what was left out."""

    file: str
    sha256: str
    format: str
    mode: str
    ranks: dict[int, int]  # rank -> number of entries
    experts: list[ExpertCoverage]
    dropped: list[str]  # keys for Wan modules this model does not have (warned)
    unknown: dict[str, str]  # keys not understood and skipped (strict=False only)

    def summary(self) -> str:
        lines = [f"LoRA {self.file} [{self.format}, {self.mode}]"]
        for c in self.experts:
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(c.by_kind.items()))
            lines.append(f"  {c.expert}: strength {c.strength:g}, {c.modules} modules ({kinds}); "
                         f"{c.params_fused} parameters fused, {c.layers_live} layers live")
        if self.dropped:
            lines.append(f"  dropped (module not in this model): {name_list(self.dropped)}")
        if self.unknown:
            lines.append(f"  skipped (not understood): {name_list(self.unknown)}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ planning

@dataclass
class _ExpertPlan:
    """What one load will do to one expert: parameters to fuse, Linear layers to run live."""

    index: int
    strength: float
    fuse: dict[str, list[Entry]] = field(default_factory=dict)  # parameter -> entries
    live: dict[str, list[Entry]] = field(default_factory=dict)  # module -> entries
    modules: set[str] = field(default_factory=set)


def _runs_live(model: torch.nn.Module, entry: Entry) -> bool:
    """Live mode covers the weight/bias of the Linear layers inside the blocks (called via forward)."""
    if not entry.module.startswith("blocks."):
        return False
    layer = model.get_submodule(entry.module)
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return False
    if isinstance(entry, LowRank) and entry.down.dim() != 2:
        return False
    return entry.param in (f"{entry.module}.weight", f"{entry.module}.bias")


def _check_shapes(model: torch.nn.Module, entries: list[Entry], what: str) -> None:
    bad = []
    for e in entries:
        p = model.get_parameter(e.param)
        if tuple(e.delta_shape()) != tuple(p.shape):
            bad.append(f"{e.param}: LoRA gives {tuple(e.delta_shape())}, model has {tuple(p.shape)}")
    if bad:
        cfg = getattr(model, "cfg", None)
        size = f" (this model: dim {cfg.dim}, {cfg.num_layers} blocks)" if cfg is not None else ""
        raise LoraError(f"{what} does not fit the {len(bad)} parameter(s){size}; is it made for another "
                        f"model size? {'; '.join(bad[:4])}" + (" ..." if len(bad) > 4 else ""))


def _plan(model: torch.nn.Module, contents: LoraContents, index: int, strength: float, mode: str,
          what: str) -> _ExpertPlan:
    _check_shapes(model, contents.entries, what)
    plan = _ExpertPlan(index, strength)
    for e in contents.entries:
        plan.modules.add(owner_of(e.param))
        if mode == "live" and _runs_live(model, e):
            plan.live.setdefault(e.module, []).append(e)
            continue
        p = model.get_parameter(e.param)
        if not p.is_floating_point():
            raise LoraError(f"{what}: cannot fuse into the {p.dtype} parameter {e.param} (quantized?); "
                            f"use mode='live'")
        plan.fuse.setdefault(e.param, []).append(e)
    return plan


def _live_delta(layer: torch.nn.Module, entries: list[Entry], strength: float) -> LiveDelta:
    """One LoRA's float32 factors for ``layer``, strength and scale folded in."""
    device = layer.weight.device
    pairs, dense, bias = [], None, None
    for e in entries:
        if isinstance(e, LowRank):
            up = e.up.to(device=device, dtype=torch.float32) * (strength * e.scale)
            pairs.append((e.down.to(device=device, dtype=torch.float32), up))
        elif e.param.endswith(".bias"):
            d = e.delta(device).mul_(strength)
            bias = d if bias is None else bias + d
        else:
            d = e.delta(device).mul_(strength)
            dense = d if dense is None else dense + d
    return LiveDelta(pairs, dense, bias)


def check_contents(lora: LoraFile, space: KeySpace, strict: bool = True) -> LoraContents:
    """Normalise ``lora`` for a model with key space ``space`` and refuse what cannot be applied."""
    contents = normalise(lora, space)
    name = lora.path.name
    if not contents.entries:
        if contents.dropped:
            raise LoraError(f"LoRA {name}: none of its modules exist in this model "
                            f"(e.g. {name_list(contents.dropped, 4)}); is it made for Wan 2.1 I2V?")
        raise LoraError(f"LoRA {name} is not a LoRA for a Wan diffusion transformer: no key names a Wan "
                        f"module (a LoRA for another architecture, e.g. SDXL or Flux?). "
                        f"Keys: {name_list(lora.tensors, 5)}")
    if contents.out_of_range:
        raise LoraError(f"LoRA {name} has keys for blocks this {space.num_layers}-block model does not have "
                        f"(made for another model size?): {name_list(contents.out_of_range, 4)}")
    if contents.unknown and strict:
        reasons = Counter(contents.unknown.values())
        raise LoraError(f"LoRA {name}: {len(contents.unknown)} keys are not understood "
                        f"({'; '.join(f'{r}: {n}' for r, n in reasons.items())}): "
                        f"{name_list(contents.unknown, 5)}. Pass strict=False to skip them.")
    return contents


def check_fit(lora: LoraFile, model: torch.nn.Module, strict: bool = True) -> LoraContents:
    """Everything ``LoraStack.load`` checks for one model (it may live on the meta device)."""
    contents = check_contents(lora, KeySpace.from_model(model), strict)
    _check_shapes(model, contents.entries, f"LoRA {lora.path.name}")
    return contents


# ------------------------------------------------------------------------------------ the stack

def _strengths(strength, expert: str, n_experts: int) -> dict[int, float]:
    """Expert index -> strength for one load; checks the arguments."""
    if expert not in EXPERTS:
        raise LoraError(f"expert must be one of {', '.join(EXPERTS)}, got {expert!r}")
    if n_experts == 1 and expert != "both":
        raise LoraError(f"expert={expert!r}: this model has a single expert (no high/low-noise split); "
                        f"use expert='both'")
    if isinstance(strength, (tuple, list)):
        if expert != "both" or n_experts != 2 or len(strength) != 2:
            raise LoraError("a (high, low) strength pair needs two experts and expert='both'")
        values = {0: strength[0], 1: strength[1]}
    else:
        chosen = range(n_experts) if expert == "both" else [{"high": 0, "low": 1}[expert]]
        values = {i: strength for i in chosen}
    for v in values.values():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise LoraError(f"strength must be a finite number, got {v!r}")
    return {i: float(v) for i, v in values.items()}


class LoraStack:
    """LoRAs applied to a pipeline's experts: ``(high_noise, low_noise)`` or ``(model,)``."""

    def __init__(self, experts: Sequence[torch.nn.Module]):
        self.experts = tuple(experts)
        if len(self.experts) not in (1, 2):
            raise LoraError(f"LoraStack takes one or two experts, got {len(self.experts)}")
        self.expert_names = ("high", "low") if len(self.experts) == 2 else ("model",)
        self._originals: list[dict[str, torch.Tensor]] = [{} for _ in self.experts]
        self._live: dict[int, LiveLinear] = {}  # id(layer) -> its live wrapper
        self._fuse_buffers = WorkBuffers()  # fp32 work space while fusing
        self._live_buffers = WorkBuffers()  # shared by the live layers of all experts
        self._applied: list[AppliedLora] = []
        self._spaces: dict[int, KeySpace] = {}

    @property
    def applied(self) -> tuple[AppliedLora, ...]:
        """The LoRAs in effect, in load order."""
        return tuple(self._applied)

    def _space(self, index: int) -> KeySpace:
        if index not in self._spaces:
            self._spaces[index] = KeySpace.from_model(self.experts[index])
        return self._spaces[index]

    def _targets(self, strengths: dict[int, float]) -> dict[int, float]:
        """Drop an expert that is the very same module as an earlier one (it is patched once)."""
        seen: dict[int, int] = {}
        out = {}
        for i, s in strengths.items():
            first = seen.setdefault(id(self.experts[i]), i)
            if first != i:
                if out[first] != s:
                    raise LoraError("both experts are the same model; they cannot take different strengths")
                continue
            out[i] = s
        return out

    def load(self, path: str | os.PathLike, strength: float | tuple[float, float] = 1.0,
             expert: str = "both", mode: str = "fuse", strict: bool = True) -> LoraReport:
        """Apply the LoRA at ``path``; on any error the experts are left exactly as they were."""
        if mode not in MODES:
            raise LoraError(f"mode must be 'fuse' or 'live', got {mode!r}")
        targets = self._targets(_strengths(strength, expert, len(self.experts)))
        lora = read_lora_file(path)
        plans, contents = [], None
        for i, s in targets.items():
            contents = check_contents(lora, self._space(i), strict)
            plans.append(_plan(self.experts[i], contents, i, s, mode, f"LoRA {lora.path.name}"))
        self._apply(plans)
        if contents.dropped:
            log.warning("LoRA %s: dropped %d keys for modules this model does not have: %s",
                        lora.path.name, len(contents.dropped), name_list(contents.dropped))
        if contents.unknown:
            log.warning("LoRA %s: skipped %d keys that are not understood: %s",
                        lora.path.name, len(contents.unknown), name_list(contents.unknown))
        self._applied.append(AppliedLora(lora.path.name, str(lora.path), lora.sha256,
                                         tuple(strength) if isinstance(strength, list) else strength,
                                         expert, mode, contents.format))
        return self._report(lora, contents, plans, mode)

    def _apply(self, plans: list[_ExpertPlan]) -> None:
        """Carry out checked plans; if anything fails midway, undo exactly what this call did."""
        undo: list[tuple[int, str, torch.Tensor | None]] = []  # (expert, param, value before; None: original)
        added: list[tuple[LiveLinear, LiveDelta]] = []
        try:
            for plan in plans:
                model = self.experts[plan.index]
                for param, entries in plan.fuse.items():
                    undo.append(self._fuse_param(plan.index, model, param, entries, plan.strength))
                for module, entries in plan.live.items():
                    layer = model.get_submodule(module)
                    delta = _live_delta(layer, entries, plan.strength)
                    added.append((self._live_linear(layer), delta))
                    added[-1][0].deltas.append(delta)
        except BaseException:
            self._fuse_buffers.clear()
            for wrapper, delta in reversed(added):
                wrapper.deltas = [d for d in wrapper.deltas if d is not delta]
                if not wrapper.deltas:
                    wrapper.uninstall()
                    self._live.pop(id(wrapper.layer), None)
            for index, param, before in reversed(undo):
                p = self.experts[index].get_parameter(param)
                with torch.no_grad():
                    p.copy_(self._originals[index].pop(param) if before is None else before)
            raise
        self._fuse_buffers.clear()

    def _live_linear(self, layer: torch.nn.Module) -> LiveLinear:
        """The layer's live wrapper, installed on first use."""
        if id(layer) not in self._live:
            wrapper = LiveLinear(layer, self._live_buffers)
            wrapper.install()
            self._live[id(layer)] = wrapper
        return self._live[id(layer)]

    def _fuse_param(self, index: int, model: torch.nn.Module, param: str, entries: list[Entry],
                    strength: float) -> tuple[int, str, torch.Tensor | None]:
        """``p <- cast(float(p) + strength * sum(deltas))``; returns how to undo it."""
        p = model.get_parameter(param)
        originals = self._originals[index]
        if param in originals:
            before = p.detach().clone()  # already changed by an earlier LoRA: keep this load's start
        else:
            # parity: the untouched tensor itself, so unload_all is bit-exact (on the CPU: no GPU memory).
            originals[param] = p.detach().to("cpu", copy=True)
            before = None
        with torch.no_grad():
            # The fp32 sum, rounded once below, in a reused buffer (fresh big ones cost page faults).
            work = p if p.dtype == torch.float32 else \
                self._fuse_buffers.get(p.shape, p.device, torch.float32).copy_(p)
            for e in entries:
                if isinstance(e, LowRank) and e.down.dim() == 2:
                    # w += (s * scale) * up @ down in one pass, without a separate delta tensor.
                    work.addmm_(e.up.to(p.device, torch.float32), e.down.to(p.device, torch.float32),
                                alpha=strength * e.scale)
                else:
                    work.add_(e.delta(p.device), alpha=strength)
            if work is not p:
                p.copy_(work)
        return index, param, before

    @property
    def has_fused(self) -> bool:
        return any(self._originals)

    def set_live_enabled(self, enabled: bool) -> None:
        """Switch every live LoRA on or off (cheap: the replacement forwards are put back or removed);
        fused LoRAs are part of the weights and stay."""
        for wrapper in self._live.values():
            if enabled:
                wrapper.install()
            elif "forward" in wrapper.layer.__dict__ and wrapper.layer.forward is wrapper:
                wrapper.uninstall()

    def step_switch(self, plan):
        """A per-step hook for the denoising loop: live LoRAs follow each plan step's ``loras`` flag
        (off in a real-guidance phase), and are back on when the run ends (step None); None if no
        step turns them off."""
        if all(step.loras for step in plan):
            return None
        if self.has_fused:
            log.warning("fused LoRAs stay on during the real-guidance steps; load them with mode='live' "
                        "to leave them out there")
        return lambda step: self.set_live_enabled(step is None or step.loras)

    def unload_all(self) -> None:
        """Remove every LoRA: live wrappers off, every fused parameter back to its original bits."""
        for wrapper in self._live.values():
            wrapper.uninstall()
        self._live.clear()
        self._live_buffers.clear()
        for index, originals in enumerate(self._originals):
            model = self.experts[index]
            with torch.no_grad():
                for param, value in originals.items():
                    model.get_parameter(param).copy_(value)
            originals.clear()
        self._applied.clear()

    def _report(self, lora: LoraFile, contents: LoraContents, plans: list[_ExpertPlan], mode: str) -> LoraReport:
        coverage = []
        for plan in plans:
            kinds = Counter(module_kind(m) for m in plan.modules)
            coverage.append(ExpertCoverage(self.expert_names[plan.index], plan.strength, len(plan.modules),
                                           len(plan.fuse), len(plan.live), dict(kinds)))
        return LoraReport(lora.path.name, lora.sha256, contents.format, mode,
                          dict(sorted(summarize_ranks(contents.entries).items())), coverage,
                          list(contents.dropped), dict(contents.unknown))


def load_lora_contents(path: str | os.PathLike, space: KeySpace | None = None) -> tuple[LoraFile, LoraContents]:
    """Read and normalise a file without a model (names resolved against the Wan DiT layout)."""
    lora = read_lora_file(path)
    return lora, normalise(lora, space or KeySpace.reference())
