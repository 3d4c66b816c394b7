"""The local backend: a transformers causal LM read from a folder, decoded greedily.

Greedy decoding (and a seeded generator, for models whose generation config would sample) makes the
rewrite reproducible, which the official local expander is not. Weights are read from
safetensors only (never unpickled) and only from the given folder (no hub access, no remote code).
Text only: an image task is extended from its prompt, and the result says so.
"""

from __future__ import annotations

import threading
from pathlib import Path

from .extend import ExtendFailed


class LocalLMBackend:
    """A causal LM folder (``config.json``, safetensors weights, tokenizer with a chat template)."""

    name = "local"
    sees_images = False

    def __init__(self, model_dir: str, *, device: str = "cpu", max_new_tokens: int = 256):
        folder = Path(model_dir or "")
        if not model_dir or not (folder / "config.json").is_file():
            raise ValueError(f"local prompt extension needs a transformers model folder with a config.json "
                             f"(--prompt_extend_model), got {model_dir!r}")
        self.folder, self.model = folder, folder.name  # the folder name only: recipes get shared
        self.device, self.max_new_tokens = device, int(max_new_tokens)
        self._loaded = None
        self._lock = threading.Lock()  # one generation at a time: the server may call from several threads

    def _load(self):
        if self._loaded is None:
            try:
                from transformers import AutoModelForCausalLM, AutoTokenizer
            except ImportError:
                raise ExtendFailed("local prompt extension needs the transformers package") from None
            tok = AutoTokenizer.from_pretrained(self.folder, local_files_only=True, trust_remote_code=False)
            lm = AutoModelForCausalLM.from_pretrained(self.folder, local_files_only=True, trust_remote_code=False,
                                                      use_safetensors=True)
            self._loaded = (tok, lm.to(self.device).eval())
        return self._loaded

    def render(self, tokenizer, system: str, user: str) -> str:
        """The model's own chat template; a plain transcript when the tokenizer has none."""
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"System: {system}\nUser: {user}\nAssistant:"

    def complete(self, system: str, user: str, image_url: str | None, seed: int) -> str:
        import torch

        with self._lock:
            tok, lm = self._load()
            text = self.render(tok, system, user)
            inputs = tok(text, return_tensors="pt", add_special_tokens=False).to(self.device)
            torch.manual_seed(int(seed))
            with torch.no_grad():
                out = lm.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
            return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
