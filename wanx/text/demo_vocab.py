"""The demo model's tokenizer: word level over a fixed caption vocabulary, laid out like umT5's.

Special ids match the HF umT5 tokenizer (``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2) and the
post-processor appends ``</s>`` with the same TemplateProcessing ("$A </s>"), so the demo goes
through exactly the code path of the real model's tokenizer. Tiny test checkpoints
(``wanx.testing``) reuse it because it needs no download.

Ids are a function of the word list only: the trainer sees every word once, and the
WordLevelTrainer orders equal counts alphabetically after the special tokens. The words are
spelled out here rather than collected from the training data (``wanx.train.data``, a layer
above): the shipped demo's text embeddings are tied to these ids, so the list is frozen; tests
check that every word a training caption can contain is in it. The shipped folder still carries
its own ``tokenizer.json`` and the runtime loads that file rather than rebuilding.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from ..atomic import atomic_output

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in umT5
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
# The attributes a demo caption names (colour, shape, motion, background) ...
ATTRIBUTE_WORDS = ("red", "green", "blue", "yellow", "circle", "square", "triangle",
                   "left", "right", "up", "down", "black", "gray", "white")
# ... the words of the caption templates ...
TEMPLATE_WORDS = ("a", "an", "moving", "on", "background")
# ... and a few generic ones, so near-miss prompts ("A red circle moving left.", "grey", "the")
# tokenise to known ids instead of <unk>. Words never seen in training get untrained embeddings,
# so the list stays short on purpose.
GENERIC_WORDS = ("the", "grey", "video", "of", "shape", "object", "and", ".", ",")


def demo_words() -> list[str]:
    """Every non-special word of the demo vocabulary, sorted (id order after the specials)."""
    return sorted({*ATTRIBUTE_WORDS, *TEMPLATE_WORDS, *GENERIC_WORDS})


def build_demo_tokenizer() -> Tokenizer:
    """Train the word-level demo tokenizer (deterministic: the same ids on every call)."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # splits "left." into "left", "."
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1)
    tok.train_from_iterator([" ".join(demo_words())], trainer)  # every word once: alphabetical ids
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", EOS_ID)]
    )
    _check_special_ids(tok)
    return tok


def _check_special_ids(tok: Tokenizer) -> None:
    for token, want in zip(SPECIAL_TOKENS, (PAD_ID, EOS_ID, UNK_ID)):
        got = tok.token_to_id(token)
        if got != want:
            raise RuntimeError(f"special token {token!r} got id {got}, expected {want}")


def save_demo_tokenizer(folder: str | Path, model_max_length: int = 512, *, overwrite: bool = False) -> Path:
    """Write tokenizer.json plus the two small configs transformers' AutoTokenizer reads.

    Each file is published atomically; an existing one is replaced only with ``overwrite``.
    Returns the path of ``tokenizer.json``.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"tokenizer folder {folder} is a file")
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "padding_side": "right",
        **special,
    }
    with atomic_output(folder / "tokenizer.json", overwrite=overwrite) as tmp:
        build_demo_tokenizer().save(str(tmp))
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with atomic_output(folder / name, overwrite=overwrite) as tmp:
            tmp.write_text(json.dumps(content, indent=2) + "\n")
    return folder / "tokenizer.json"
