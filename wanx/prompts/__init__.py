"""Prompt extension for ``wanx generate``, the server and the web UI.

    backend = make_backend("openai", url="http://127.0.0.1:11434/v1", model="qwen2.5:7b")
    result = extend_prompt(backend, "a cat on a sofa", "t2v", seed=42)
    result.prompt      # the rewrite, or the original prompt if anything failed
    result.recipe()    # original + extended prompt, backend, model, seed: for the video's recipe

Importing this package loads nothing heavy; the local backend imports transformers on first use.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .extend import Backend, ExtendFailed, ExtendResult, clean_reply, extend_prompt, image_data_url
from .system_prompts import LANGS, SYSTEM_PROMPTS, detect_lang, pick_kind, system_prompt

MODES = ("openai", "local")

__all__ = ["Backend", "ExtendFailed", "ExtendResult", "LANGS", "MODES", "SYSTEM_PROMPTS", "add_prompt_extend_flags",
           "backend_from_args", "clean_reply", "detect_lang", "extend_for_cli", "extend_prompt", "image_data_url",
           "make_backend", "pick_kind", "system_prompt"]


def make_backend(mode: str | None, url: str | None = None, model: str | None = None, **options: Any) -> Backend | None:
    """The backend for ``mode`` ("openai": a chat server at ``url``; "local": a model folder); None for None.

    A wrong setting (no model, a bad URL) raises ValueError here, at start-up, rather than
    falling back silently on every prompt.
    """
    if mode is None:
        return None
    if mode == "openai":
        from .openai_chat import DEFAULT_URL, ChatBackend

        return ChatBackend(url or DEFAULT_URL, model, **options)
    if mode == "local":
        from .local_lm import LocalLMBackend

        return LocalLMBackend(model, **options)
    raise ValueError(f"prompt extension mode must be one of {', '.join(MODES)}, got {mode!r}")


def add_prompt_extend_flags(p: argparse.ArgumentParser) -> None:
    """``--prompt_extend openai|local`` and its settings (shared by ``generate`` and ``serve``)."""
    from .openai_chat import DEFAULT_URL, KEY_ENV

    p.add_argument("--prompt_extend", default=None, choices=MODES,
                   help="rewrite the prompt into a detailed one first: openai (an OpenAI-compatible chat server, "
                        "e.g. Ollama or vLLM) or local (a transformers model folder); on failure the original is used")
    p.add_argument("--prompt_extend_url", default=DEFAULT_URL,
                   help=f"chat server base URL for --prompt_extend openai (default {DEFAULT_URL}, Ollama); "
                        f"its key, if any, is read from ${KEY_ENV}")
    p.add_argument("--prompt_extend_model", default=None,
                   help="model name on the chat server (openai), or the model folder (local)")
    p.add_argument("--prompt_extend_lang", default="auto", choices=("auto", *LANGS),
                   help="language of the extended prompt: auto (Chinese if the prompt is), en or zh")


def backend_from_args(args: argparse.Namespace) -> Backend | None:
    """The backend the flags ask for (None without --prompt_extend); ValueError for a bad setting."""
    return make_backend(getattr(args, "prompt_extend", None), getattr(args, "prompt_extend_url", None),
                        getattr(args, "prompt_extend_model", None))


def extend_for_cli(args: argparse.Namespace, prompt: str, model_type: str, image: Any = None,
                   seed: int | None = None, stream=None) -> ExtendResult | None:
    """What ``wanx generate`` calls before resolving: None without --prompt_extend, else the result.

    The user is told on ``stream`` (stderr) what the prompt became, or why the original is kept.
    ``seed`` (the generation's, when fixed) makes the rewrite reproducible; 0 otherwise.
    """
    backend = backend_from_args(args)
    if backend is None:
        return None
    stream = sys.stderr if stream is None else stream
    seed = 0 if seed is None or seed < 0 else seed
    result = extend_prompt(backend, prompt, model_type, image=image, lang=args.prompt_extend_lang, seed=seed)
    if result.ok:
        print(f"extended prompt ({result.backend} {result.model}): {result.prompt}", file=stream)
        if result.message:
            print(f"note: {result.message}", file=stream)
    else:
        print(f"wanx: warning: {result.message}", file=stream)
    return result
