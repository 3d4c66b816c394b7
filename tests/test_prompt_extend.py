"""Prompt extension: the request a chat server receives, the fallbacks, determinism, the local LM path.

A loopback fake chat server (stdlib ``http.server`` on 127.0.0.1, port 0) records every request and
answers as told; a tiny random Qwen2 model with a word-level tokenizer, built here, runs the local path.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from wanx.prompts import (SYSTEM_PROMPTS, ExtendResult, add_prompt_extend_flags, clean_reply, detect_lang,
                          extend_for_cli, extend_prompt, make_backend, pick_kind, system_prompt)
from wanx.prompts.extend import ExtendFailed


class FakeChat:
    """A chat-completions server: ``mode`` decides the answer; ``requests`` keeps (headers, body)."""

    def __init__(self):
        self.requests: list[tuple[dict, dict]] = []
        self.mode = "ok"
        self.reply = "A red circle glides left across a black floor, soft light from above, static wide shot."
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((dict(self.headers), body))
                fake.answer(self, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, handler, body):
        if self.mode == "error":
            handler.send_response(500)
            handler.end_headers()
            handler.wfile.write(b'{"error": "secret upstream detail"}')
            return
        if self.mode == "slow":
            time.sleep(1.5)
        content = self.reply if self.mode != "empty" else "   "
        # Echo the seed so a test can see it travelled; a real model is deterministic at temperature 0.
        finish = "length" if self.mode == "cut" else "stop"
        data = json.dumps({"choices": [{"index": 0, "finish_reason": finish,
                                        "message": {"role": "assistant", "content": content}}]}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)


@pytest.fixture
def chat():
    fake = FakeChat()
    fake.thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def _png(path, size=(96, 64), colour=(200, 30, 30)):
    Image.new("RGB", size, colour).save(path)
    return path


# ------------------------------------------------------------------------------ system prompts

def test_prompt_kind_follows_task_image_and_empty_prompt():
    assert pick_kind("t2v", "a cat", False) == "t2v"
    assert pick_kind("ti2v", "a cat", False) == "t2v"
    assert pick_kind("ti2v", "a cat", True) == "i2v"
    assert pick_kind("i2v", "a cat", True) == "i2v"
    assert pick_kind("i2v", "  ", True) == "i2v_empty"
    assert pick_kind("s2v", "a cat", False) is None


def test_language_detection_and_every_prompt_in_both_languages():
    assert detect_lang("a cat") == "en" and detect_lang("一只猫在沙发上") == "zh" and detect_lang("cat 猫") == "zh"
    kinds = {k for k, _ in SYSTEM_PROMPTS}
    assert kinds == {"t2v", "i2v", "i2v_empty"}
    for kind in kinds:
        en, zh = system_prompt(kind, "en"), system_prompt(kind, "zh")
        assert "English" in en and "中文" in zh and en != zh


def test_clean_reply_strips_reasoning_quotes_and_line_breaks():
    assert clean_reply("<think>plan it</think>\n\"A cat\nsleeps.\"") == "A cat sleeps."
    with pytest.raises(ExtendFailed):
        clean_reply("<think>only thoughts</think>  ")
    with pytest.raises(ExtendFailed):
        clean_reply(None)


# ------------------------------------------------------------------------ the chat server path

def test_t2v_request_has_model_system_prompt_and_determinism(chat, monkeypatch):
    monkeypatch.setenv("WANX_PROMPT_EXTEND_API_KEY", "sk-test-123")
    backend = make_backend("openai", url=chat.url, model="tiny-chat")
    first = extend_prompt(backend, "a red circle moving left", "t2v", seed=7)
    second = extend_prompt(backend, "a red circle moving left", "t2v", seed=7)
    assert first == second and first.ok and first.prompt == chat.reply
    headers, body = chat.requests[0]
    assert body["model"] == "tiny-chat" and body["temperature"] == 0 and body["seed"] == 7
    assert body["stream"] is False and body["n"] == 1
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][0]["content"] == system_prompt("t2v", "en")
    assert body["messages"][1]["content"] == "a red circle moving left"
    assert headers["Authorization"] == "Bearer sk-test-123"
    assert chat.requests[0][1] == chat.requests[1][1]  # the same request twice: deterministic
    recipe = first.recipe()
    assert recipe["original"] == "a red circle moving left" and recipe["extended"] == chat.reply
    assert recipe["model"] == "tiny-chat" and recipe["seed"] == 7 and "sk-test" not in json.dumps(recipe)


def test_chinese_prompt_gets_the_chinese_system_prompt(chat):
    result = extend_prompt(make_backend("openai", url=chat.url, model="m"), "一只红色的圆向左移动", "t2v")
    assert result.ok and result.lang == "zh"
    assert chat.requests[0][1]["messages"][0]["content"] == system_prompt("t2v", "zh")


def test_i2v_sends_the_image_as_a_data_url(chat, tmp_path):
    image = _png(tmp_path / "in.png", size=(1024, 1024))
    result = extend_prompt(make_backend("openai", url=chat.url, model="vl"), "she turns her head", "i2v", image=image)
    assert result.ok and result.kind == "i2v"
    body = chat.requests[0][1]
    assert body["messages"][0]["content"] == system_prompt("i2v", "en")
    text, picture = body["messages"][1]["content"]
    assert text == {"type": "text", "text": "she turns her head"}
    url = picture["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.size == (512, 512) and decoded.getpixel((10, 10)) == (200, 30, 30)  # downsized, same picture


def test_i2v_with_an_empty_prompt_asks_for_invented_motion(chat, tmp_path):
    image = _png(tmp_path / "in.png")
    result = extend_prompt(make_backend("openai", url=chat.url, model="vl"), "", "i2v", image=image, lang="zh")
    assert result.ok and result.kind == "i2v_empty"
    body = chat.requests[0][1]
    assert body["messages"][0]["content"] == system_prompt("i2v_empty", "zh")
    assert body["messages"][1]["content"][0]["text"] == "（没有指令）"


@pytest.mark.parametrize("mode, reason", [("error", "HTTP 500"), ("cut", "finish_reason 'length'"),
                                          ("empty", "empty prompt")])
def test_failures_fall_back_to_the_original_prompt(chat, mode, reason):
    chat.mode = mode
    backend = make_backend("openai", url=chat.url, model="m", attempts=2)
    result = extend_prompt(backend, "a cat", "t2v")
    assert not result.ok and result.prompt == "a cat" and reason in result.message
    assert "secret upstream detail" not in result.message  # an upstream body is never echoed
    assert len(chat.requests) == (2 if mode == "error" else 1)  # 5xx is retried, a bad answer is not
    assert result.recipe()["extended"] is None and result.recipe()["original"] == "a cat"


def test_timeout_falls_back_within_the_time_limit(chat):
    chat.mode = "slow"
    backend = make_backend("openai", url=chat.url, model="m", timeout=0.3, attempts=1)
    start = time.monotonic()
    result = extend_prompt(backend, "a cat", "t2v")
    assert time.monotonic() - start < 1.4
    assert not result.ok and result.prompt == "a cat" and "did not answer within 0.3 s" in result.message


def test_unreachable_server_and_unsupported_task():
    backend = make_backend("openai", url="http://127.0.0.1:9/v1", model="m", attempts=1, timeout=2)
    result = extend_prompt(backend, "a cat", "t2v")
    assert not result.ok and "cannot reach" in result.message
    skipped = extend_prompt(backend, "a cat", "s2v")
    assert not skipped.ok and "does not apply to s2v" in skipped.message


def test_bad_settings_are_refused_up_front():
    with pytest.raises(ValueError, match="model name"):
        make_backend("openai", url="http://127.0.0.1:1/v1", model=None)
    with pytest.raises(ValueError, match="http"):
        make_backend("openai", url="file:///etc/passwd", model="m")
    with pytest.raises(ValueError, match="config.json"):
        make_backend("local", model="/nonexistent")
    with pytest.raises(ValueError, match="mode"):
        make_backend("dashscope")


def test_cli_helper_tells_the_user(chat):
    parser = argparse.ArgumentParser()
    add_prompt_extend_flags(parser)
    assert extend_for_cli(parser.parse_args([]), "a cat", "t2v") is None
    args = parser.parse_args(["--prompt_extend", "openai", "--prompt_extend_url", chat.url,
                              "--prompt_extend_model", "m"])
    out = io.StringIO()
    result = extend_for_cli(args, "a cat", "t2v", seed=3, stream=out)
    assert isinstance(result, ExtendResult) and result.ok and result.seed == 3
    assert "extended prompt (openai m)" in out.getvalue()
    chat.mode = "error"
    out = io.StringIO()
    result = extend_for_cli(args, "a cat", "t2v", stream=out)
    assert result.prompt == "a cat" and "warning: prompt extension failed" in out.getvalue()
    assert all(action.help for action in parser._actions)


# ------------------------------------------------------------------------------ the local path

WORDS = ("a red green blue circle square moving left right slowly across the frame soft light camera "
         "static wide shot you turn short video ideas into prompts").split()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _greedy(folder, system: str, user: str, max_new_tokens: int) -> tuple[str, str]:
    """(rendered chat text, greedy continuation) computed directly with transformers."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    lm = transformers.AutoModelForCausalLM.from_pretrained(folder)
    text = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = lm.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return text, " ".join(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).split())


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A random 2-layer Qwen2 with a word-level tokenizer and a ChatML template, saved as safetensors.

    The first init seed whose greedy answers to the test prompt (t2v and i2v system prompts) are not
    empty (a random model may end at once), so the tests below compare real text.
    """
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tiny-lm")
    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)) + ["system", "user", "assistant"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                                eos_token="<|im_end|>", additional_special_tokens=specials[2:])
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    cfg = transformers.Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<pad>"])
    for seed in range(20):
        torch.manual_seed(seed)
        transformers.Qwen2ForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
        if all(_greedy(folder, system_prompt(kind, "en"), LOCAL_PROMPT, 8)[1] for kind in ("t2v", "i2v")):
            return folder
    pytest.fail("no init seed in 0..19 gave a non-empty greedy answer")


LOCAL_PROMPT = "a red circle moving left"


def test_local_lm_extends_deterministically_from_its_own_template(tiny_lm):
    backend = make_backend("local", model=str(tiny_lm), max_new_tokens=8)
    first = extend_prompt(backend, LOCAL_PROMPT, "t2v", seed=1)
    second = extend_prompt(backend, LOCAL_PROMPT, "t2v", seed=1)
    assert first == second and first.ok and first.backend == "local" and first.model == tiny_lm.name
    text, expected = _greedy(tiny_lm, system_prompt("t2v", "en"), LOCAL_PROMPT, 8)
    assert first.prompt == expected != LOCAL_PROMPT  # the model's own greedy words, from wanx's system prompt
    assert text.startswith("<|im_start|>system\nYou turn short video ideas")


def test_local_lm_on_an_image_task_says_it_read_the_text_only(tiny_lm, tmp_path):
    backend = make_backend("local", model=str(tiny_lm), max_new_tokens=8)
    result = extend_prompt(backend, LOCAL_PROMPT, "i2v", image=_png(tmp_path / "x.png"), seed=0)
    expected = _greedy(tiny_lm, system_prompt("i2v", "en"), LOCAL_PROMPT, 8)[1]
    assert result.kind == "i2v" and result.ok and result.prompt == expected
    assert "text only" in result.message  # the local model never saw the picture, and says so
