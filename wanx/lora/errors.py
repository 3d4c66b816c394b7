"""The one error type of wanx.lora."""

from __future__ import annotations


class LoraError(ValueError):
    """A LoRA file or argument that cannot be used; raised before any weight is changed.

    A ``ValueError`` so that callers treating bad user input uniformly (the CLI, the server) catch
    it with everything else; it will derive from ``wanx.InputError`` once that exists.
    """
