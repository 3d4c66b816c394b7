"""The demo model's tokenizer: word level over the caption vocabulary, laid out like umT5's.

Special ids match the HF umT5 tokenizer (``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2) and the
post-processor appends ``</s>`` with the same TemplateProcessing ("$A </s>"), so the demo goes
through exactly the code path of the real model's tokenizer.

Ids are a function of the word list only: the trainer sees every word once, and the
WordLevelTrainer orders equal counts alphabetically after the special tokens. The shipped demo
folder must still carry its ``tokenizer.json`` (written by :func:`save_demo_tokenizer`) and the
runtime must load that file rather than rebuild, because the text encoder's embeddings are tied
to these ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from .data import BACKGROUNDS, COLOURS, MOTIONS, SHAPES

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in umT5
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
# Words of the caption templates (see wanx.train.data) ...
TEMPLATE_WORDS = ("a", "an", "moving", "on", "background")
# ... and a few generic ones, so near-miss prompts ("A red circle moving left.", "grey", "the")
# tokenise to known ids instead of <unk>. Words never seen in training get untrained embeddings,
# so the list stays short on purpose.
GENERIC_WORDS = ("the", "grey", "video", "of", "shape", "object", "and", ".", ",")


def demo_words() -> list[str]:
    """Every non-special word of the demo vocabulary, sorted (id order after the specials)."""
    words = {*COLOURS, *SHAPES, *MOTIONS, *BACKGROUNDS, *TEMPLATE_WORDS, *GENERIC_WORDS}
    return sorted(words)


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


def save_demo_tokenizer(folder: str | Path, model_max_length: int = 512) -> Path:
    """Write tokenizer.json plus the two small configs transformers' AutoTokenizer reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_demo_tokenizer().save(str(folder / "tokenizer.json"))
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "padding_side": "right",
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return folder / "tokenizer.json"
