"""``wanx lora inspect FILE [--ckpt_dir DIR]`` and ``wanx convert lora SRC DST --to FORMAT``.

The main parser wires these in (see the functions' docstrings); nothing here imports ``wanx.cli``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter
from pathlib import Path

import torch

from ..atomic import atomic_output
from .convert import TARGETS, to_state_dict
from .entries import FullDelta
from .errors import LoraError
from .reader import LoraContents, LoraFile, read_lora_file, summarize_ranks
from .stack import check_fit, load_lora_contents, module_kind, name_list, owner_of

CONVERT_TARGETS = TARGETS
_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")


def add_lora_inspect_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``inspect`` to the sub-commands of ``wanx lora`` (``subparsers`` of the ``lora`` parser)."""
    p = subparsers.add_parser("inspect", help="describe a LoRA file and check that it fits a checkpoint")
    p.add_argument("file", help="LoRA file (.safetensors; .pt/.pth/.ckpt only as plain tensors)")
    p.add_argument("--ckpt_dir", default=None, help="checkpoint folder to check the LoRA against "
                   "(reads config files only, no weights)")
    p.set_defaults(lora_handler=cmd_lora_inspect)
    return p


def _made_for(lora: LoraFile) -> str:
    """Which expert the file name or metadata says the LoRA is for (Wan 2.2 A14B ships one per expert)."""
    texts = [lora.path.stem] + [v for v in lora.metadata.values() if isinstance(v, str) and len(v) < 200]
    said = set()
    for expert in ("high", "low"):
        pattern = re.compile(rf"(?<![a-z]){expert}(?:[_\- ]?noise)?(?![a-z])", re.IGNORECASE)
        if any(pattern.search(t) for t in texts):
            said.add(expert)
    if len(said) == 1:
        expert = said.pop()
        return f"the {expert}-noise expert (from its name/metadata): load it with expert='{expert}' / @{expert}"
    return "not stated (apply to both experts, or choose with @high / @low)"


def _describe(lora: LoraFile, contents: LoraContents) -> list[str]:
    entries = contents.entries
    kinds = Counter(e.kind for e in entries)
    targets = Counter(module_kind(owner_of(e.param)) for e in entries)
    blocks = sorted({int(m.group(1)) for e in entries if (m := _BLOCK_INDEX.match(e.param))})
    alphas = Counter(e.alpha for e in entries if getattr(e, "alpha", None) is not None)
    lines = [f"file:     {lora.path} ({lora.path.stat().st_size / 2**20:.1f} MiB, sha256 {lora.sha256[:16]}...)",
             f"format:   {contents.format}",
             f"entries:  {len(entries)} (" + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) + ")",
             "ranks:    " + (", ".join(f"{r} x{n}" for r, n in sorted(summarize_ranks(entries).items())) or "-"),
             "alpha:    " + (", ".join(f"{a:g} x{n}" for a, n in sorted(alphas.items())) or "none stored (scale 1)"),
             "targets:  " + ", ".join(f"{k} {n}" for k, n in sorted(targets.items()))]
    if blocks:
        lines.append(f"blocks:   {blocks[0]}-{blocks[-1]} ({len(blocks)} blocks; "
                     f"needs a model with >= {blocks[-1] + 1})")
    deltas = [e.param for e in entries if isinstance(e, FullDelta)]
    if deltas:
        lines.append(f"deltas:   {len(deltas)} whole-tensor deltas, e.g. {name_list(deltas, 4)}")
    if contents.dropped:
        lines.append(f"dropped:  {len(contents.dropped)} keys for modules Wan 2.2 lacks: "
                     f"{name_list(contents.dropped, 4)}")
    if contents.unknown:
        lines.append(f"unknown:  {len(contents.unknown)} keys not understood: {name_list(contents.unknown, 4)}")
    lines.append(f"made for: {_made_for(lora)}")
    return lines


def fits_checkpoint(lora: LoraFile | str | os.PathLike,
                    ckpt_dir: str | os.PathLike) -> list[tuple[str, str | None, int]]:
    """(expert, None if it fits else why not, entries) per DiT of a checkpoint folder.

    Reads config files only (the models are built on the meta device), so a CLI can refuse a LoRA
    that does not fit before any weight is loaded.
    """
    if not isinstance(lora, LoraFile):
        lora = read_lora_file(lora)
    from ..loading.dit import dit_config_from_json
    from ..loading.layout import find_checkpoint
    from ..loading.safe import CheckpointError
    from ..model.dit import WanDiT

    try:
        layout = find_checkpoint(ckpt_dir)
        configs = [dit_config_from_json(json.loads((p / "config.json").read_text())) for p in layout.dit_paths]
    except (CheckpointError, OSError, ValueError) as e:
        raise LoraError(f"checkpoint folder {ckpt_dir}: {e}") from None
    labels = ("high", "low") if len(configs) == 2 else ("model",)
    out = []
    for label, path, cfg in zip(labels, layout.dit_paths, configs):
        with torch.device("meta"):
            model = WanDiT(cfg)
        try:
            contents = check_fit(lora, model, strict=False)
            out.append((f"{label} ({path.name})", None, len(contents.entries)))
        except LoraError as e:
            out.append((f"{label} ({path.name})", str(e), 0))
    return out


def cmd_lora_inspect(args) -> int:
    """Print what a LoRA file holds; with ``--ckpt_dir`` also whether it fits. 1 if it does not fit."""
    lora, contents = load_lora_contents(args.file)
    for line in _describe(lora, contents):
        print(line)
    if not contents.entries:
        print("fits:     no: no key names a Wan DiT module (a LoRA for another architecture?)")
        return 1
    if not args.ckpt_dir:
        return 0
    status = 0
    for label, problem, n in fits_checkpoint(lora, args.ckpt_dir):
        print(f"fits {label}: " + (f"yes ({n} entries)" if problem is None else f"NO - {problem}"))
        status |= problem is not None
    return status


def cmd_convert_lora(src: str | os.PathLike, dst: str | os.PathLike, to: str, overwrite: bool = False) -> int:
    """Rewrite the LoRA ``src`` as ``dst`` (.safetensors) in format ``to``; published atomically."""
    src, dst = Path(src), Path(dst)
    if to not in TARGETS:
        raise LoraError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    if dst.suffix != ".safetensors":
        raise LoraError(f"{dst}: LoRA files are written as .safetensors")
    if dst.resolve() == src.resolve() or (dst.exists() and src.exists() and os.path.samefile(src, dst)):
        raise LoraError(f"source and destination are the same file ({src}); write to a new name")
    if dst.exists() and not overwrite:
        raise LoraError(f"{dst} already exists; pass --overwrite to replace it")
    lora, contents = load_lora_contents(src)
    if not contents.entries:
        raise LoraError(f"{src} is not a LoRA for a Wan diffusion transformer (keys: {name_list(lora.tensors, 5)})")
    if contents.unknown:
        raise LoraError(f"{src}: {len(contents.unknown)} keys are not understood and would be lost: "
                        f"{name_list(contents.unknown, 5)}")
    sd, metadata = to_state_dict(contents.entries, to)
    from safetensors.torch import save_file

    with atomic_output(dst, overwrite=overwrite) as tmp:
        save_file(sd, str(tmp), metadata=metadata)
    note = f"; dropped {len(contents.dropped)} keys for modules Wan 2.2 lacks" if contents.dropped else ""
    print(f"wrote {dst} ({to}, {len(contents.entries)} entries from {contents.format}){note}")
    return 0
