"""``wanx serve`` on a loopback port with the demo model: the real ``openai`` client end to end,
400s that name the field, auth, upload limits, caps, the queue limit, cancellation, paths.

Servers run in a thread on 127.0.0.1 and a free port (``BackgroundServer``) and share one loaded
demo pipeline; every wait is bounded.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import struct
import time
import wave
import zlib

import pytest

pytest.importorskip("fastapi", reason="the serve extra (wanx[serve]) is not installed")
pytest.importorskip("multipart", reason="the serve extra (wanx[serve]) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (wanx[serve]) is not installed")
httpx = pytest.importorskip("httpx")

import wanx  # noqa: E402
from wanx.media import read_mp4  # noqa: E402
from wanx.serve.cli import BackgroundServer  # noqa: E402
from wanx.serve.config import ServeConfig  # noqa: E402

PROMPT = "a red circle moving left"


@pytest.fixture(scope="module")
def demo_pipe():
    return wanx.load_pipeline(None)


@pytest.fixture
def serve(tmp_path, demo_pipe):
    """``serve(**config)`` -> base URL of a running server; all of them stop at the end of the test."""
    started = []

    def start(**overrides):
        server = BackgroundServer(ServeConfig(data=tmp_path / "data", **overrides), pipeline=demo_pipe)
        url = server.__enter__()
        started.append(server)
        return url, server.service

    yield start
    for server in started:
        server.__exit__()


def wait_for(client: httpx.Client, video_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        video = client.get(f"/v1/videos/{video_id}").json()
        if video["status"] in ("completed", "failed"):
            return video
        time.sleep(0.1)
    raise AssertionError(f"{video_id} did not finish within {timeout} s")


def png_bytes(size=(32, 32), colour=(10, 200, 10)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A valid 1x1 PNG whose header claims ``width`` x ``height`` (a decompression bomb's first line)."""
    raw = png_bytes((1, 1))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return raw[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[33:]


def wav_bytes(seconds=0.5, rate=16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\0\0" * int(seconds * rate))
    return buf.getvalue()


# -------------------------------------------------------------------------- the openai client

@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # openai marks the Videos API deprecated
def test_openai_client_creates_polls_downloads_lists_and_deletes(serve, tmp_path):
    openai = pytest.importorskip("openai")
    url, service = serve(api_key="test-key")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="test-key", max_retries=0, timeout=30)

    created = client.videos.create(prompt=PROMPT, model="wanx-demo", seconds="2", size="32x32",
                                   extra_body={"seed": 42, "sample_steps": 10, "negative_prompt": "blurry"})
    assert created.status in ("queued", "in_progress") and created.model == "wanx-demo"
    assert created.size == "32x32" and created.seconds == "2.125"  # 2 s at 8 fps -> 17 frames (4n+1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the client's poll loop has no deadline of its own
        done = pool.submit(client.videos.poll, created.id).result(timeout=120)
    assert done.status == "completed" and done.progress == 100 and done.completed_at >= done.created_at
    extra = done.model_extra
    assert extra["seed"] == 42 and extra["recipe"]["sample_steps"] == 10 and extra["recipe"]["job_id"] == created.id

    path = tmp_path / "out.mp4"
    client.videos.download_content(created.id).write_to_file(path)
    frames, fps, recipe = read_mp4(path)
    assert frames.shape == (17, 32, 32, 3) and fps == 8
    assert recipe["prompt"] == PROMPT and recipe["seed"] == 42 and recipe["negative_prompt"] == "blurry"
    assert recipe["job_id"] == created.id and recipe["checkpoint"]["name"] == "wanx-demo"

    from PIL import Image

    thumb = client.videos.download_content(created.id, variant="thumbnail").content
    assert Image.open(io.BytesIO(thumb)).size == (32, 32)

    listed = client.videos.list(limit=10)
    assert [v.id for v in listed.data] == [created.id]
    deleted = client.videos.delete(created.id)
    assert deleted.deleted and deleted.id == created.id
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(created.id)
    assert not service.data.job_path(created.id, "video").exists()
    assert client.videos.list().data == []


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_openai_client_sees_a_400_naming_the_field(serve):
    openai = pytest.importorskip("openai")
    url, service = serve()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.BadRequestError) as err:
        client.videos.create(prompt=PROMPT, size="1280x720")
    assert err.value.body["param"] == "size" and "32*32" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.videos.create(prompt=PROMPT, model="sora-2")
    assert err.value.body["param"] == "model"
    assert service.store.page()[0] == []  # nothing was queued


# ------------------------------------------------------------------------ malformed requests

@pytest.mark.parametrize("fields, param, words", [
    ({"frame_num": "6"}, "frame_num", "4n+1"),
    ({"num_frames": "6"}, "num_frames", "4n+1"),  # a peer's alias is named as sent
    ({"seed": "abc"}, "seed", "whole number"),
    ({"sample_steps": "0"}, "sample_steps", ">= 1"),
    ({"guidance_scale": "nan"}, "guidance_scale", "number"),
    ({"sample_solver": "ddim"}, "sample_solver", "unipc"),
    ({"sampel_steps": "3"}, "sampel_steps", "unknown field"),
    ({"seconds": "2", "frame_num": "17"}, "seconds", "not both"),
    ({"seconds": "-1"}, "seconds", "positive"),
    ({"task": "i2v-A14B"}, "task", "t2v-A14B"),
    ({"prompt_extend": "true"}, "prompt_extend", "no prompt extender"),
    ({"recipe": "turbo"}, "recipe", "lightning"),
])
def test_bad_field_is_a_400_naming_it_before_anything_is_queued(serve, fields, param, words):
    url, service = serve()
    with httpx.Client(base_url=url, timeout=30) as c:
        body = {"prompt": PROMPT, **fields}
        # Every value as a text part of a multipart form (what the openai client sends), then as JSON.
        multipart = c.post("/v1/videos", files={k: (None, v) for k, v in body.items()})
        assert multipart.request.headers["content-type"].startswith("multipart/form-data")
        as_json = c.post("/v1/videos", json=body)
        for r in (multipart, as_json):
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == param and words in error["message"], error
            assert error["type"] == "invalid_request_error"
    assert service.store.page()[0] == []


def test_missing_prompt_wrong_content_type_and_bad_json(serve):
    url, _ = serve()
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/videos", json={"seed": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = c.post("/v1/videos", content=b"prompt=x", headers={"Content-Type": "text/plain"})
        assert r.status_code == 415
        r = c.post("/v1/videos", content=b"{nope", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        r = c.get("/v1/no-such-route")
        assert r.status_code == 404 and "error" in r.json()


def test_per_request_caps(serve):
    url, _ = serve(max_steps=8, max_frames=9)
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/videos", json={"prompt": PROMPT, "sample_steps": 9, "frame_num": 9})
        assert r.status_code == 400 and r.json()["error"]["param"] == "sample_steps" and "limit of 8" in r.text
        r = c.post("/v1/videos", json={"prompt": PROMPT})  # the demo's default 17 frames are over 9
        assert r.status_code == 400 and r.json()["error"]["param"] == "frame_num"
        r = c.post("/v1/videos", json={"prompt": PROMPT, "seconds": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seconds"
        r = c.post("/v1/videos", json={"prompt": "x" * 5000, "frame_num": 5})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = c.post("/v1/videos", json={"prompt": PROMPT, "frame_num": 9, "sample_steps": 8})
        assert r.status_code == 200


# ---------------------------------------------------------------------------------------- auth

def test_auth_on(serve):
    url, _ = serve(api_key="s3cret")
    with httpx.Client(base_url=url, timeout=30) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.get("/v1/videos", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert "s3cret" not in r.text
        r = c.post("/v1/videos", json={"prompt": PROMPT})
        assert r.status_code == 401
        assert c.get("/v1/videos", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200  # the page asks for the key


def test_auth_off(serve):
    url, _ = serve()
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/v1/videos").status_code == 200
        assert c.get("/v1/server").json()["auth_required"] is False


# ------------------------------------------------------------------------------------- uploads

def test_upload_limits_and_types(serve):
    url, service = serve(max_image_bytes=50_000, max_audio_bytes=40_000)
    noise = io.BytesIO()
    from PIL import Image
    import numpy as np

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(noise, "PNG")
    cases = [
        ({"input_reference": ("big.png", noise.getvalue(), "image/png")}, 413, "input_reference", "larger than"),
        ({"input_reference": ("x.png", b"not an image at all", "image/png")}, 400, "input_reference", "not an image"),
        ({"image": ("bomb.png", bomb_png(), "image/png")}, 400, "image", "limit"),
        ({"input_reference": ("../../evil.png", png_bytes(), "image/png")}, 400, "input_reference", "takes no image"),
        ({"audio": ("a.wav", b"RIFF garbage", "audio/wav")}, 400, "audio", "not an audio file"),
        ({"audio": ("a.wav", wav_bytes(), "audio/wav")}, 400, "audio", "takes no audio"),
        ({"audio": ("a.wav", wav_bytes(seconds=2), "audio/wav")}, 413, "audio", "larger than"),
    ]
    with httpx.Client(base_url=url, timeout=30) as c:
        for files, status, param, words in cases:
            r = c.post("/v1/videos", data={"prompt": PROMPT}, files=files)
            assert r.status_code == status, (files.keys(), r.text)
            error = r.json()["error"]
            assert error["param"] == param and words in error["message"], error
            assert "/tmp" not in error["message"] and str(service.data.root) not in error["message"]
        r = c.post("/v1/videos", json={"prompt": PROMPT, "input_reference": {"image_url": "https://example.com/a.png"}})
        assert r.status_code == 400 and "does not fetch" in r.json()["error"]["message"]
    assert service.store.page()[0] == []
    leftovers = [p for p in service.data.root.rglob("*") if p.is_file() and p.parent.name in ("tmp", "uploads")]
    assert leftovers == [] and not list((service.data.root / "uploads").iterdir())  # refused uploads are gone


def test_body_over_the_cap_is_refused_declared_or_streamed(serve):
    import socket

    from starlette.testclient import TestClient

    from wanx.serve.app import create_app

    url, service = serve(max_image_bytes=50_000, max_audio_bytes=40_000)
    limit = service.config.max_body_bytes
    # Declared: refused from the header alone (no body byte is sent, so the 413 cannot be the body's doing).
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  f"Content-Length: {limit + 1}\r\n\r\n".encode())
        reply = b""
        while b"payload_too_large" not in reply and (part := s.recv(4096)):
            reply += part
        head = reply.decode()
    assert head.startswith("HTTP/1.1 413") and "payload_too_large" in head

    # Streamed without a length (chunked): cut off once the count passes the cap.
    def chunks():
        for _ in range(limit // 65536 + 2):
            yield b"x" * 65536

    with TestClient(create_app(service)) as client:
        r = client.post("/v1/videos", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert service.store.page()[0] == []


def test_image_task_takes_an_upload_through_the_openai_client(tmp_path):
    """A tiny ti2v checkpoint: the client's ``input_reference`` file becomes the job's image."""
    openai = pytest.importorskip("openai")
    from wanx.testing import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(tmp_path / "ti2v", "ti2v-5B", seed=1)
    image = tmp_path / "in.png"
    image.write_bytes(png_bytes((64, 64), (250, 0, 0)))
    with BackgroundServer(ServeConfig(data=tmp_path / "data", ckpt_dir=str(ckpt))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        with pytest.warns(DeprecationWarning):
            created = client.videos.create(prompt="a red square", input_reference=image, size="64x64",
                                           extra_body={"frame_num": 5, "sample_steps": 2, "seed": 1})
        with httpx.Client(base_url=url, timeout=30) as c:
            done = wait_for(c, created.id, timeout=120)
        assert done["status"] == "completed", done
        assert done["recipe"]["image"] == "input.png"  # the server's own name, never the client's
        r = httpx.get(f"{url}/v1/videos/{created.id}/content", timeout=30)
        path = tmp_path / "o.mp4"
        path.write_bytes(r.content)
        frames, _, recipe = read_mp4(path)
        assert frames.shape[0] == 5 and recipe["image"] == "input.png"


# ----------------------------------------------------------------------- queue, cancel, delete

def test_queue_limit_429_and_delete_cancels_a_running_job_between_steps(serve):
    url, service = serve(max_queue=2, max_steps=400)
    with httpx.Client(base_url=url, timeout=30) as c:
        slow = c.post("/v1/videos", json={"prompt": PROMPT, "sample_steps": 300}).json()  # ~10 s on 2 cores
        quick = c.post("/v1/videos", json={"prompt": PROMPT, "sample_steps": 2}).json()
        full = c.post("/v1/videos", json={"prompt": PROMPT})
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
        assert full.headers["Retry-After"]
        deadline = time.monotonic() + 60
        while c.get(f"/v1/videos/{slow['id']}").json()["progress"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = c.delete(f"/v1/videos/{slow['id']}")
        assert r.json() == {"id": slow["id"], "object": "video.deleted", "deleted": True}
        assert c.get(f"/v1/videos/{slow['id']}").status_code == 404  # gone at once
        assert wait_for(c, quick["id"])["status"] == "completed"
    events = {(e["job_id"], e["kind"]): e["at"] for e in service.store.events()}
    assert (slow["id"], "completed") not in events
    # The quick job started right after the delete: the slow one stopped at its next step, not after 300.
    assert events[(quick["id"], "started")] - events[(slow["id"], "deleted")] < 2.0
    assert not any(p.name.startswith(slow["id"]) for p in service.data.root.rglob("*"))
    assert service.store.get(slow["id"], include_deleted=True) is None  # row purged


def test_list_is_paginated_and_content_waits_for_completion(serve):
    url, _ = serve()
    with httpx.Client(base_url=url, timeout=30) as c:
        ids = [c.post("/v1/videos", json={"prompt": PROMPT, "sample_steps": 2, "seed": i}).json()["id"]
               for i in range(3)]
        early = c.get(f"/v1/videos/{ids[2]}/content")
        assert early.status_code == 409 and early.json()["error"]["code"] == "video_not_ready"
        first = c.get("/v1/videos", params={"limit": 2, "order": "asc"}).json()
        assert [v["id"] for v in first["data"]] == ids[:2] and first["has_more"] and first["last_id"] == ids[1]
        rest = c.get("/v1/videos", params={"limit": 2, "order": "asc", "after": first["last_id"]}).json()
        assert [v["id"] for v in rest["data"]] == ids[2:] and not rest["has_more"]
        newest = c.get("/v1/videos", params={"limit": 1}).json()
        assert newest["data"][0]["id"] == ids[2]
        assert c.get("/v1/videos", params={"limit": 0}).json()["error"]["param"] == "limit"
        for i in ids:
            assert wait_for(c, i)["status"] == "completed"
        sheet = c.get(f"/v1/videos/{ids[0]}/content", params={"variant": "spritesheet"})
        assert sheet.status_code == 200 and sheet.headers["content-type"] == "image/webp"
        assert c.get(f"/v1/videos/{ids[0]}/content", params={"variant": "../x"}).json()["error"]["param"] == "variant"


def test_no_request_path_reaches_outside_the_data_folder(serve, tmp_path):
    url, service = serve()
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve")
    with httpx.Client(base_url=url, timeout=30) as c:
        for path in ("/v1/videos/..%2F..%2Fsecret.txt", "/v1/videos/..%2F..%2Fsecret.txt/content",
                     "/v1/videos/video_0000/content", "/v1/videos/%2e%2e/content",
                     "/static/..%2F..%2F..%2Fsecret.txt", "/static/../cli.py"):
            r = c.get(path)
            assert r.status_code == 404 and "do not serve" not in r.text, path
        assert c.delete("/v1/videos/..%2Fsecret.txt").status_code == 404
    assert secret.exists()


# ---------------------------------------------------------------------------- prompt extension

def test_prompt_extension_through_the_api(serve):
    from test_prompt_extend import FakeChat

    chat = FakeChat()
    chat.reply = "a red circle moving left slowly"
    chat.thread.start()
    try:
        url, service = serve(prompt_extend="openai", prompt_extend_url=chat.url, prompt_extend_model="fake")
        with httpx.Client(base_url=url, timeout=30) as c:
            button = c.post("/v1/prompts/extend", json={"prompt": PROMPT}).json()
            assert button["ok"] and button["prompt"] == chat.reply and button["original"] == PROMPT
            job = c.post("/v1/videos", data={"prompt": PROMPT, "prompt_extend": "true", "sample_steps": "3"}).json()
            done = wait_for(c, job["id"])
            assert done["status"] == "completed" and done["prompt"] == PROMPT  # what the user typed
            assert done["recipe"]["prompt"] == chat.reply  # what was generated
            assert done["prompt_extend"]["original"] == PROMPT and done["prompt_extend"]["extended"] == chat.reply
            assert done["recipe"]["prompt_extend"]["model"] == "fake"
            chat.mode = "error"
            job = c.post("/v1/videos", json={"prompt": PROMPT, "prompt_extend": True, "sample_steps": 3}).json()
            done = wait_for(c, job["id"])
            assert done["status"] == "completed" and done["recipe"]["prompt"] == PROMPT  # fell back
            assert done["prompt_extend"]["ok"] is False and "HTTP 500" in done["prompt_extend"]["message"]
        assert chat.requests[0][1]["messages"][0]["content"].startswith("You turn short video ideas")
    finally:
        chat.server.shutdown()
        chat.server.server_close()


def test_json_data_url_image_reaches_the_extender(serve):
    url, _ = serve()
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/videos", json={"prompt": PROMPT, "input_reference": {"image_url": data_url}})
        assert r.status_code == 400 and "takes no image" in r.json()["error"]["message"]  # decoded, then refused


def test_server_facts_for_the_page(serve):
    url, _ = serve()
    facts = httpx.get(f"{url}/v1/server", timeout=30).json()
    assert facts["task"] == "t2v-A14B" and facts["sizes"] == ["32*32"] and not facts["takes_image"]
    assert facts["defaults"]["frame_num"] == 17 and facts["defaults"]["fps"] == 8
    assert httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"] == "wanx-demo"


def test_a_second_server_on_the_same_data_folder_is_refused(serve, tmp_path):
    serve()
    with pytest.raises(RuntimeError, match="another wanx server"):
        BackgroundServer(ServeConfig(data=tmp_path / "data"))


def test_serve_flags_have_help_and_bind_loopback_by_default():
    import argparse

    from wanx.serve import add_serve_flags

    p = argparse.ArgumentParser()
    add_serve_flags(p)
    assert all(a.help for a in p._actions)
    args = p.parse_args([])
    assert args.host == "127.0.0.1" and args.port == 8000  # loopback by default


def test_warning_when_reachable_from_other_machines_without_a_key(tmp_path):
    from wanx.serve.cli import exposure_warning

    assert exposure_warning(ServeConfig(data=tmp_path)) is None  # loopback by default
    assert exposure_warning(ServeConfig(data=tmp_path, host="0.0.0.0", api_key="k")) is None
    warning = exposure_warning(ServeConfig(data=tmp_path, host="0.0.0.0"))
    assert "without an API key" in warning and "WANX_API_KEY" in warning


def test_missing_serve_extra_is_a_clear_error(monkeypatch, capsys, tmp_path):
    import argparse
    import sys

    from wanx.serve import add_serve_flags, cmd_serve

    p = argparse.ArgumentParser()
    add_serve_flags(p)
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the extra were not installed
    assert cmd_serve(p.parse_args(["--data", str(tmp_path / "d")])) == 2
    assert "pip install 'wanx[serve]'" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # refused before touching anything


def test_a_model_that_fails_to_load_is_a_503_not_a_stuck_queue(tmp_path):
    from wanx.testing import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(tmp_path / "t2v", "t2v-A14B", seed=1)
    for weights in (ckpt / "high_noise_model").glob("*.safetensors"):
        weights.write_bytes(b"\0" * 64)  # configs stay valid (requests are checked), the weights do not load
    with BackgroundServer(ServeConfig(data=tmp_path / "data", ckpt_dir=str(ckpt))) as url:
        with httpx.Client(base_url=url, timeout=30) as c:
            deadline = time.monotonic() + 60
            while c.get("/health").json()["status"] != "error":
                assert time.monotonic() < deadline
                time.sleep(0.1)
            r = c.post("/v1/videos", json={"prompt": PROMPT})
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"
            assert str(tmp_path) not in r.text


def test_page_is_served_with_a_strict_content_security_policy(serve):
    url, _ = serve()
    r = httpx.get(url + "/", timeout=30)
    assert r.status_code == 200 and "<form id=\"form\"" in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert httpx.get(url + "/static/app.js", timeout=30).headers["content-type"].startswith(("text/javascript",
                                                                                             "application/javascript"))
