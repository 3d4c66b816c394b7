"""Offline tiny umT5-style tokenizer for tests (no download, no sentencepiece file).

Built with transformers 5.x's tokenizers-backed ``T5Tokenizer(vocab=[(piece, score), ...])`` and
saved with ``save_pretrained``, so the folder holds the same kinds of files as ``google/umt5-xxl``
(tokenizer.json, tokenizer_config.json). Ids: ``<pad>``=0, ``</s>``=1, ``<unk>``=2.
"""

from __future__ import annotations

from pathlib import Path

_WORDS = ("a", "the", "cat", "dog", "sits", "on", "mat", "runs", "in", "park", "red", "car", "city",
          "night", "café", "video", "of", "and", "with", "slow", "motion", "é", "中文", "猫")
_SUBWORDS = ("ing", "er", "ed", "s", "ly", "an", "on", "at", "in", "中", "文", "猫", "é", "ü", "ß")
_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?;:'\"-()<>/&"

TINY_SPECIAL = {"pad": 0, "eos": 1, "unk": 2}


def tiny_vocab() -> list[tuple[str, float]]:
    """(piece, log-probability) pairs; whole words score higher than their letters."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -4.0 - 0.1 * i) for i, w in enumerate(_WORDS)]
    vocab += [(p, -6.0 - 0.1 * i) for i, p in enumerate(_SUBWORDS)]
    seen = {p for p, _ in vocab}
    vocab += [(c, -9.0) for c in _CHARS if c not in seen]
    return vocab


def make_tiny_tokenizer(folder: str | Path) -> Path:
    """Write a tiny T5-style tokenizer folder (vocab < 256, fits ``T5Config.tiny()``) and return it."""
    from transformers import T5Tokenizer

    folder = Path(folder)
    tok = T5Tokenizer(vocab=tiny_vocab(), extra_ids=0)
    tok.save_pretrained(str(folder))
    return folder
