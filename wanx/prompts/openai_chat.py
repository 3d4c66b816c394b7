"""The OpenAI-compatible chat backend: ``POST {base_url}/chat/completions`` with the stdlib only.

Works with any server that speaks the chat-completions shape: a local Ollama
(``http://127.0.0.1:11434/v1``), vLLM, LM Studio, DashScope's compatible mode or OpenAI itself.
The key comes from an environment variable (never a flag, which ``ps`` would show) and is never
logged; an upstream error body is not echoed either (it may quote the request).
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from .extend import ExtendFailed

DEFAULT_URL = "http://127.0.0.1:11434/v1"  # Ollama's OpenAI-compatible endpoint on this machine
KEY_ENV = "WANX_PROMPT_EXTEND_API_KEY"
MAX_REPLY_BYTES = 1 << 20
_RETRY_STATUS = (408, 429, 500, 502, 503, 504)
_FINISHED = ("stop", "eos", "end_turn")  # "length" means the rewrite was cut off


class ChatBackend:
    """One OpenAI-compatible model; deterministic requests (temperature 0, a seed)."""

    name = "openai"

    def __init__(self, base_url: str = DEFAULT_URL, model: str | None = None, *, key_env: str = KEY_ENV,
                 timeout: float = 60.0, attempts: int = 2, max_tokens: int = 512, sees_images: bool = True):
        parts = urlsplit(base_url or "")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"prompt extension URL must be http(s)://host[:port]/..., got {base_url!r}")
        if not model:
            raise ValueError("prompt extension with an OpenAI-compatible server needs a model name "
                             "(--prompt_extend_model, e.g. the name Ollama or vLLM serves)")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.key_env, self.timeout = model, key_env, float(timeout)
        self.attempts, self.max_tokens, self.sees_images = max(1, int(attempts)), int(max_tokens), sees_images

    def body(self, system: str, user: str, image_url: str | None, seed: int) -> dict:
        """The request: [system, user] messages, the image (if any) as a data URL in the user turn."""
        content: str | list = user
        if image_url is not None:
            content = [{"type": "text", "text": user}, {"type": "image_url", "image_url": {"url": image_url}}]
        return {"model": self.model, "messages": [{"role": "system", "content": system},
                                                  {"role": "user", "content": content}],
                "temperature": 0, "seed": int(seed) % 2**31, "max_tokens": self.max_tokens, "n": 1, "stream": False}

    def complete(self, system: str, user: str, image_url: str | None, seed: int) -> str:
        payload = json.dumps(self.body(system, user, image_url, seed)).encode()
        last = "no attempt made"
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(min(2.0, 0.25 * 2**attempt))
            try:
                return _reply_text(self._post(payload))
            except _Retry as e:
                last = str(e)
        raise ExtendFailed(f"{last} after {self.attempts} attempt(s)")

    def _post(self, payload: bytes) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read(MAX_REPLY_BYTES + 1)
        except urllib.error.HTTPError as e:
            if e.code in _RETRY_STATUS:
                raise _Retry(f"the chat server answered HTTP {e.code}") from None
            raise ExtendFailed(f"the chat server answered HTTP {e.code}") from None
        except (socket.timeout, TimeoutError):
            raise _Retry(f"the chat server did not answer within {self.timeout:g} s") from None
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise _Retry(f"the chat server did not answer within {self.timeout:g} s") from None
            raise _Retry(f"cannot reach the chat server ({reason})") from None
        if len(raw) > MAX_REPLY_BYTES:
            raise ExtendFailed("the chat server's reply is larger than 1 MiB")
        try:
            return json.loads(raw)
        except ValueError:
            raise ExtendFailed("the chat server's reply is not JSON") from None


class _Retry(ExtendFailed):
    """A failure that another attempt may not repeat (timeouts, 5xx, refused connections)."""


def _reply_text(reply: dict) -> str:
    try:
        choice = reply["choices"][0]
        text = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ExtendFailed("the chat server's reply has no choices[0].message.content") from None
    finish = choice.get("finish_reason")
    if finish not in _FINISHED:
        raise ExtendFailed(f"the model stopped early (finish_reason {finish!r})")
    return text
