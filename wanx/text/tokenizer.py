"""Prompt cleaning and the umT5 tokenizer, read from ``tokenizer.json`` with the ``tokenizers`` library.

The result matches ``AutoTokenizer.from_pretrained(folder)(texts, padding="max_length",
max_length=text_len, truncation=True, add_special_tokens=True)`` without importing transformers.
"""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path
from typing import Iterable

import torch

__all__ = ["Tokenizer", "clean_prompt"]

# The official code uses the `regex` module; its \s differs from Python's only on U+001C..U+001F,
# which ftfy.fix_text and html.unescape both drop, so `re` gives the same result.
_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """The official "whitespace" cleaning: ftfy, html-unescape twice, strip, collapse whitespace runs."""
    import ftfy  # imported here so that importing wanx stays light

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


def _token_content(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _configured_token(folder: Path, name: str) -> str | None:
    """``name`` ("pad_token", "eos_token") from tokenizer_config.json or special_tokens_map.json."""
    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / fname
        if path.is_file():
            try:
                token = _token_content(json.loads(path.read_text(encoding="utf-8")).get(name))
            except (json.JSONDecodeError, AttributeError):
                continue
            if token:
                return token
    return None


class Tokenizer:
    """umT5 tokenizer: ``tok(texts) -> (ids [B, text_len] long, mask [B, text_len] long)``.

    Each text is cleaned with :func:`clean_prompt`, encoded with the special tokens of the
    tokenizer.json post-processor (an EOS for umT5), truncated to ``text_len`` keeping that EOS,
    and right-padded with the pad token.
    """

    def __init__(self, backend, text_len: int = 512, pad_token: str = "<pad>", eos_token: str = "</s>"):
        from tokenizers import processors

        if text_len < 1:
            raise ValueError(f"text_len must be at least 1, got {text_len}")
        self.text_len = text_len
        self.backend = backend
        self.pad_id = backend.token_to_id(pad_token)
        if self.pad_id is None:
            raise ValueError(f"the tokenizer has no pad token {pad_token!r}")
        self.pad_token = pad_token
        if backend.post_processor is None:
            # The HF T5 tokenizer appends its EOS even when the file carries no post-processor.
            eos_id = backend.token_to_id(eos_token)
            if eos_id is None:
                raise ValueError(f"tokenizer.json has no post-processor and no EOS token {eos_token!r}")
            backend.post_processor = processors.TemplateProcessing(
                single=["$A", eos_token], pair=["$A", eos_token, "$B", eos_token],
                special_tokens=[(eos_token, eos_id)])
        # Settings baked into the file are replaced by ours (the call arguments win in transformers too).
        backend.no_padding()
        backend.no_truncation()

    @classmethod
    def from_folder(cls, path: str | os.PathLike, text_len: int = 512) -> "Tokenizer":
        """Read ``<path>/tokenizer.json`` (``path`` may also be the json file itself)."""
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        file = path if path.suffix == ".json" else path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer found: {file} does not exist (wanx reads the tokenizers-library "
                f"tokenizer.json, e.g. google/umt5-xxl/tokenizer.json)")
        folder = file.parent
        pad = _configured_token(folder, "pad_token") or "<pad>"
        eos = _configured_token(folder, "eos_token") or "</s>"
        return cls(Backend.from_file(str(file)), text_len=text_len, pad_token=pad, eos_token=eos)

    def unknown_words(self, text: str, unk_token: str = "<unk>") -> list[str]:
        """The words of ``text`` the vocabulary lacks (each becomes the unknown token), in order, once each."""
        unk = self.backend.token_to_id(unk_token)
        if unk is None:
            return []
        cleaned = clean_prompt(text)
        self.backend.no_padding()
        self.backend.no_truncation()
        enc = self.backend.encode(cleaned, add_special_tokens=False)
        words = [cleaned[a:b].strip() for i, (a, b) in zip(enc.ids, enc.offsets) if i == unk]
        return list(dict.fromkeys(w for w in words if w))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __call__(self, texts: str | Iterable[str], text_len: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both ``[B, text_len]`` long (a str counts as one text)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = self.text_len if text_len is None else text_len
        # truncation counts the post-processor's special tokens, so the EOS survives as in HF.
        self.backend.enable_truncation(max_length=length, strategy="longest_first", direction="right")
        self.backend.enable_padding(length=length, pad_id=self.pad_id, pad_token=self.pad_token,
                                    direction="right")
        encodings = self.backend.encode_batch([clean_prompt(t) for t in texts], add_special_tokens=True)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long).view(len(texts), length)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long).view(len(texts), length)
        return ids, mask
