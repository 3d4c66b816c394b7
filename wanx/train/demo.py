"""Train the built-in demo model: a tiny Wan 2.2 t2v-A14B-style model set on synthetic clips.

Stages (each resumable; state lives in a work folder), one module each:

1. ``vae``   – a tiny Wan 2.1-style causal VAE on whole 17-frame clips (unclamped decode,
   foreground-weighted L1+L2, a small noise/L2 latent regulariser), then a per-frame PSNR check;
   ``decoder`` – the decoder alone fine-tuned on whole clips with the encoder frozen (sharper
   shapes; the latents, hence every later stage, are unchanged by it)  (:mod:`.vae_stage`);
2. ``stats`` – per-channel latent mean/std of the trained encoder -> ``VAEConfig.latents_mean/std``;
3. ``cache`` – encode a fixed set of clips to normalised latents (their specs are kept, captions are
   drawn per sample: short or long form, 10% dropped to the empty caption for CFG)  (:mod:`.latents`);
4. ``dit``   – flow matching, a shared DiT forked into the two Wan 2.2 experts, against the umT5
   encoder (frozen at its initialisation unless ``t5_lr`` > 0); EMA weights are shipped
   (:mod:`.dit_stage`);
5. ``export`` – the official-layout folder ``load_pipeline`` reads, published atomically
   (:mod:`.export`; see ``wanx.testing``).

The training stages share one optimiser loop (:mod:`.loop`). Every random draw is a function of
(seed, stage, step), so a resumed run continues exactly.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .dit_stage import train_dit
from .export import export_folder, write_json, write_loss_curve
from .latents import build_cache, latent_stats, normalised_vae
from .loop import Logger, save_checkpoint
from .recipe import DemoRecipe
from .vae_stage import finetune_decoder, train_vae, vae_psnr

__all__ = ["DemoRecipe", "STAGES", "check_run_paths", "run_demo"]

STAGES = ("vae", "decoder", "stats", "cache", "dit", "export")
# Files whose presence shows that a work folder holds a run.
RUN_FILES = ("vae_ckpt.pt", "dit_ckpt.pt", "latents.pt")


def check_run_paths(out: Path, work: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse, before any training, an ``out``/``work`` that cannot be used or would be replaced unasked.

    Raises NotADirectoryError (a path or one of its parents is a file) or FileExistsError (a
    non-empty ``out``, or a ``work`` folder holding a run, without ``resume`` or ``overwrite``).
    """
    for flag, path in (("--out", out), ("--work", work)):
        blocker = next((p for p in (path, *path.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            where = "" if blocker == path else f" ({blocker} is a file)"
            raise NotADirectoryError(f"{flag} {path}{where}: a folder is written there, not a file")
    if overwrite or resume:
        return
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} already holds files; pass --overwrite to replace them "
                              f"(or --resume to continue the run in --work)")
    used = [name for name in RUN_FILES if (work / name).is_file()]
    if used:
        raise FileExistsError(f"--work {work} holds a previous run ({', '.join(used)}); pass --resume to "
                              f"continue it or --overwrite to start over")


@dataclass
class _Run:
    """One call of :func:`run_demo`: its settings, log and summary, and whether it should stop."""

    recipe: DemoRecipe
    out: Path
    work: Path
    seed: int
    device: torch.device
    resume: bool
    stop_after: str
    progress: bool
    ckpt_seconds: float
    replace_out: bool  # whether the export may replace an existing ``out``
    minutes: dict = field(default_factory=dict)  # wall-time cap per stage ("vae", "dit"), 0: none
    summary: dict = field(default_factory=dict)
    stopped: bool = False
    log: Logger = field(init=False)

    def __post_init__(self):
        self.log = Logger(self.work / "log.jsonl")

    def record(self, name: str, **info) -> None:
        self.summary.setdefault("stages", {})[name] = info

    def save_summary(self) -> None:
        write_json(self.work / "summary.json", self.summary, overwrite=True)

    def done(self, name: str, **info) -> None:
        """Record a finished stage, save the summary, and stop here if it is ``stop_after``."""
        self.record(name, **info)
        self.save_summary()
        self.stopped = name == self.stop_after


def run_demo(recipe: DemoRecipe, out: Path, work: Path, *, seed: int = 0, device: str = "cpu",
             minutes_vae: float = 0.0, minutes_dit: float = 0.0, resume: bool = False,
             stop_after: str = "export", progress: bool = True, ckpt_seconds: float = 120.0,
             overwrite: bool = False) -> dict:
    """Run every stage (skipping finished ones when ``resume``) and publish the demo folder as ``out``.

    ``minutes_*`` cap a stage's wall time (0 = no cap); the LR schedule then follows whichever of
    steps and time runs out first, so an uncapped run is exactly reproducible from its seed. The
    paths are checked first (:func:`check_run_paths`); an existing non-empty ``out`` is replaced
    only with ``overwrite`` or ``resume``. Returns the run summary (also written to ``work/summary.json``).
    """
    if stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {', '.join(STAGES)}, got {stop_after!r}")
    check_run_paths(out, work, resume=resume, overwrite=overwrite)
    empty_out = out.is_dir() and not any(out.iterdir())  # nothing to lose by replacing it
    work.mkdir(parents=True, exist_ok=True)
    run = _Run(recipe, out, work, seed, torch.device(device), resume, stop_after, progress, ckpt_seconds,
               replace_out=overwrite or resume or empty_out, minutes={"vae": minutes_vae, "dit": minutes_dit})
    summary_path = work / "summary.json"
    run.summary = json.loads(summary_path.read_text()) if resume and summary_path.is_file() else {}
    run.summary.update(recipe=asdict(recipe), seed=seed, device=str(run.device), threads=torch.get_num_threads())
    vae = _vae_stage(run)
    for vae_step in (_decoder_stage, _stats_stage):
        if run.stopped:
            return run.summary
        vae = vae_step(run, vae)
    if run.stopped:
        return run.summary
    cache = _cache_stage(run, vae)
    if run.stopped:
        return run.summary
    result = _dit_stage(run, cache)
    if not run.stopped:
        _export_stage(run, vae, result)
    return run.summary


def _finish_vae_stage(run: _Run, name: str, vae, path: Path, steps: int, seconds: float) -> None:
    """Per-frame PSNR on held-out clips, the weights saved to ``path``, a report line, the stage done."""
    psnr = vae_psnr(vae, run.recipe, run.seed, n=run.recipe.psnr_clips)
    save_checkpoint(vae.state_dict(), path)
    print(f"{name}: {steps} steps in {seconds / 60:.1f} min; per-frame PSNR (held-out clips) "
          f"min {min(psnr):.1f} dB, mean {sum(psnr) / len(psnr):.1f} dB", flush=True)
    run.done(name, steps=steps, seconds=seconds, psnr_per_frame=psnr)


def _vae_stage(run: _Run):
    """1. The VAE, trained or (resuming) read from ``vae_final.pt``; returned in eval mode."""
    from ..vae import WanVAE

    final = run.work / "vae_final.pt"
    if run.resume and final.is_file():
        vae = WanVAE(run.recipe.vae_config()).to(run.device)
        vae.load_state_dict(torch.load(final, map_location=run.device, weights_only=True))
        return vae.eval()
    vae, steps, secs = train_vae(run.recipe, run.work, run.seed, run.device, run.minutes["vae"] * 60, run.resume,
                                 run.log, run.progress, run.ckpt_seconds)
    _finish_vae_stage(run, "vae", vae.eval(), final, steps, secs)
    return vae


def _decoder_stage(run: _Run, vae):
    """1b. Decoder fine-tuning (encoder frozen: the later stages see the same latents)."""
    final = run.work / "vae_decoder.pt"
    if run.resume and final.is_file():
        vae.load_state_dict(torch.load(final, map_location=run.device, weights_only=True))
    elif run.recipe.decoder_steps > 0:
        vae, steps, secs = finetune_decoder(vae, run.recipe, run.work, run.seed, run.device, run.resume, run.log,
                                            run.progress, run.ckpt_seconds)
        _finish_vae_stage(run, "decoder", vae, final, steps, secs)
    return vae


def _stats_stage(run: _Run, vae):
    """2. Latent statistics; returns the VAE under a config that normalises with them."""
    t0 = time.perf_counter()
    mean, std = latent_stats(vae, run.recipe, run.seed, n=run.recipe.stat_clips)
    vae = normalised_vae(vae, run.recipe, mean, std)
    run.done("stats", seconds=time.perf_counter() - t0, mean=mean, std=std)
    return vae


def _cache_stage(run: _Run, vae) -> dict:
    """3. The latent cache, built or (resuming) read from ``latents.pt``."""
    path = run.work / "latents.pt"
    cache = torch.load(path, weights_only=True) if run.resume and path.is_file() else None
    if cache is None or "masks" not in cache:  # (caches written before the DiT loss used masks)
        t0 = time.perf_counter()
        cache = build_cache(vae, run.recipe, run.seed)
        save_checkpoint(cache, path)
        run.done("cache", seconds=time.perf_counter() - t0, clips=run.recipe.clips)
    return cache


def _dit_stage(run: _Run, cache: dict) -> dict:
    """4. Text encoder + two DiT experts (continued from ``dit_ckpt.pt`` when resuming)."""
    from ..text.demo_vocab import save_demo_tokenizer

    tok_dir = run.work / "tokenizer"
    save_demo_tokenizer(tok_dir, model_max_length=run.recipe.text_len, overwrite=True)
    result = train_dit(run.recipe, cache, tok_dir, run.work, run.seed, run.device, run.minutes["dit"] * 60,
                       run.resume, run.log, run.progress, run.ckpt_seconds)
    run.done("dit", steps=result["step"], seconds=result["elapsed"], final_loss=result["final_loss"])
    return result


def _export_stage(run: _Run, vae, result: dict) -> None:
    """5. The loss curve in ``work``, then the model folder (with the summary) published as ``out``."""
    write_loss_curve(run.work / "log.jsonl", run.work / "loss.png", overwrite=True)
    run.record("export", folder=str(run.out))
    export_folder(run.out, run.recipe, vae, result["t5"], result["experts"], run.summary,
                  overwrite=run.replace_out)
    run.done("export", folder=str(run.out))
