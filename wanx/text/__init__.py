"""Text conditioning: prompt -> umT5 token ids -> context.

``TextEncoder.encode`` returns each prompt's context trimmed to its true length (EOS included),
as the official ``T5EncoderModel.__call__`` does. ``TextEncoder.context`` gives what flows on to
the DiT: a :class:`TextContext`, the contexts zero-padded to the longest one plus their lengths,
so nothing downstream has to rediscover where the padding starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .tokenizer import Tokenizer, clean_prompt
from .umt5 import UMT5Encoder

__all__ = ["UMT5Encoder", "Tokenizer", "clean_prompt", "TextEncoder", "TextContext", "pad_context"]


@dataclass(frozen=True)
class TextContext:
    """``context [B, L, dim]``, zero after each prompt's ``lengths [B]`` (long, CPU); L = the longest."""

    context: torch.Tensor
    lengths: torch.Tensor

    def to(self, device: str | torch.device) -> "TextContext":
        return TextContext(self.context.to(device), self.lengths)

    @classmethod
    def from_list(cls, contexts: Sequence[torch.Tensor]) -> "TextContext":
        """Stack per-prompt ``[L_i, dim]`` contexts."""
        lengths = torch.tensor([c.shape[0] for c in contexts], dtype=torch.long)
        return cls(pad_context(contexts, int(lengths.max())), lengths)

    @classmethod
    def cat(cls, parts: Sequence["TextContext"]) -> "TextContext":
        """One batch from several (e.g. conditional + unconditional for batched guidance)."""
        return cls.from_list([c[:n] for p in parts for c, n in zip(p.context, p.lengths.tolist())])


def pad_context(contexts: Sequence[torch.Tensor], text_len: int = 512) -> torch.Tensor:
    """Stack ``[L_i, dim]`` contexts into ``[B, text_len, dim]``, zero-filled after each ``L_i``.

    # parity: the official DiT pads with zeros, not with the encoder's outputs at pad positions.
    """
    if not contexts:
        raise ValueError("pad_context needs at least one context")
    too_long = [c.shape[0] for c in contexts if c.shape[0] > text_len]
    if too_long:
        raise ValueError(f"context lengths {too_long} exceed text_len {text_len}")
    first = contexts[0]
    out = first.new_zeros(len(contexts), text_len, first.shape[-1])  # [B, text_len, dim]
    for i, c in enumerate(contexts):
        out[i, : c.shape[0]] = c
    return out


class TextEncoder:
    """Tokenizer + :class:`UMT5Encoder`: ``encode(prompts) -> list of [L_i, dim]``.

    ``text_len`` defaults to the tokenizer's; ``device`` given moves the model there (None: the
    model stays where it is and encodes there).
    """

    def __init__(self, tokenizer: Tokenizer, model: UMT5Encoder, text_len: int | None = None,
                 device: str | torch.device | None = None):
        self.tokenizer = tokenizer
        self.model = model if device is None else model.to(device)
        self.text_len = tokenizer.text_len if text_len is None else text_len

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> list[torch.Tensor]:
        """One ``[L_i, dim]`` tensor per prompt, ``L_i`` = its token count including the EOS."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids, mask = self.tokenizer(prompts, text_len=self.text_len)
        ids, mask = ids.to(self.device), mask.to(self.device)
        context = self.model(ids, mask)  # [B, text_len, dim]
        lengths = mask.gt(0).sum(dim=1).tolist()
        return [c[:n] for c, n in zip(context, lengths)]

    __call__ = encode

    def context(self, prompts: str | Sequence[str]) -> TextContext:
        """The prompts' :class:`TextContext`, each prompt encoded alone.

        # parity: the official encodes each prompt as a batch of one; batching prompts would change
        # the GEMM shapes and with them the last bits of the result.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return TextContext.from_list([self.encode([p])[0] for p in prompts])
