"""The web UI in a real browser: headless Chromium (the system's, driven by selenium) against a loopback server.

It enters the API key, extends a prompt (loopback fake chat server), gets a 400 shown on the right
field, submits, watches the queue, waits for the video in the gallery and checks that it plays
(the <video> element has the clip's duration and its time advances), reuses the settings, and takes
a screenshot (``WANX_UI_SCREENSHOT=docs/serve-ui.png`` also copies it there).
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra (wanx[serve]) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (wanx[serve]) is not installed")
pytest.importorskip("multipart", reason="the serve extra (wanx[serve]) is not installed")
webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                reason="no chromium + chromedriver on this machine (Debian: chromium chromium-driver)")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

import wanx  # noqa: E402
from wanx.serve.cli import BackgroundServer  # noqa: E402
from wanx.serve.config import ServeConfig  # noqa: E402


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1366,860"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=DRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def until(driver, predicate, timeout=60, what="the page"):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: predicate(d), message=what)


def test_form_queue_gallery_playback_reuse_in_chromium(browser, tmp_path):
    from test_prompt_extend import FakeChat

    chat = FakeChat()
    chat.reply = "a red circle moving left on a black background"
    chat.thread.start()
    config = ServeConfig(data=tmp_path / "data", api_key="ui-key", prompt_extend="openai", max_steps=400,
                         prompt_extend_url=chat.url, prompt_extend_model="fake-chat")
    try:
        with BackgroundServer(config, pipeline=wanx.load_pipeline(None)) as url:
            _drive(browser, url, tmp_path)
    finally:
        chat.server.shutdown()
        chat.server.server_close()


def _drive(d, url, tmp_path):
    d.get(url)
    key = until(d, lambda d: d.find_element(By.ID, "apikey") if d.find_element(By.ID, "keybar").is_displayed() else None,
                30, "the key bar")
    key.send_keys("ui-key")
    d.find_element(By.ID, "savekey").click()
    until(d, lambda d: len(Select(d.find_element(By.ID, "size")).options) == 1, 30, "the task-aware form")
    assert d.find_element(By.ID, "model").text == "wanx-demo · t2v-A14B"
    assert not d.find_element(By.ID, "keybar").is_displayed()
    assert not d.find_element(By.ID, "image-box").is_displayed()  # t2v: no image input
    assert d.find_element(By.ID, "frame_num").get_attribute("value") == "17"

    prompt = d.find_element(By.ID, "prompt")
    prompt.send_keys("a red circle moving left")
    d.find_element(By.ID, "extend").click()
    until(d, lambda d: prompt.get_attribute("value") == "a red circle moving left on a black background", 30,
          "the extended prompt")
    assert "fake-chat" in d.find_element(By.ID, "extend-note").text

    frames = d.find_element(By.ID, "frame_num")
    frames.clear()
    frames.send_keys("6")
    d.find_element(By.ID, "submit").click()
    error = until(d, lambda d: d.find_element(By.ID, "error") if d.find_element(By.ID, "error").is_displayed() else None,
                  30, "the error")
    assert "4n+1" in error.text and "invalid" in frames.get_attribute("class")

    frames.clear()
    frames.send_keys("17")
    steps = d.find_element(By.ID, "sample_steps")
    steps.clear()
    steps.send_keys("60")  # ~2-3 s of denoising: long enough to see it in the queue
    d.find_element(By.ID, "dice").click()
    seed = d.find_element(By.ID, "seed").get_attribute("value")
    assert seed.isdigit()
    d.find_element(By.ID, "submit").click()
    until(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#queue li[data-id] .bar"), 30, "the job in the queue")
    _wait_for_playing_video(d, 1)

    d.find_element(By.CSS_SELECTOR, "#gallery .card button").click()  # "Reuse settings"
    assert prompt.get_attribute("value") == "a red circle moving left on a black background"
    assert d.find_element(By.ID, "seed").get_attribute("value") == seed
    prompt.clear()
    prompt.send_keys("a blue square moving up")
    steps.clear()
    steps.send_keys("25")
    d.find_element(By.ID, "submit").click()
    _wait_for_playing_video(d, 2)
    cards = d.find_elements(By.CSS_SELECTOR, "#gallery .card")
    assert "a blue square moving up" in cards[0].text and f"seed {seed}" in cards[0].text  # newest first

    # A long job: live progress in the queue (the screenshot shows it), then "Cancel" stops it.
    prompt.clear()
    prompt.send_keys("a green triangle moving right")
    steps.clear()
    steps.send_keys("300")
    d.find_element(By.ID, "submit").click()
    # Read and click through JS: the queue is redrawn on every poll, so element handles go stale.
    progress = ("const t = document.querySelector('#queue li[data-id] .tag.running');"
                "return t ? parseInt(t.textContent.split(' ')[1], 10) : -1;")
    until(d, lambda d: d.execute_script(progress) >= 20, 60, "live progress")
    shot = tmp_path / "serve-ui.png"
    assert d.save_screenshot(str(shot)) and shot.stat().st_size > 20_000
    if os.environ.get("WANX_UI_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["WANX_UI_SCREENSHOT"])
    d.execute_script("document.querySelector('#queue li[data-id] button').click();")
    until(d, lambda d: not d.find_elements(By.CSS_SELECTOR, "#queue li[data-id]"), 30, "the cancelled job gone")
    assert len(d.find_elements(By.CSS_SELECTOR, "#gallery .card")) == 2


def _wait_for_playing_video(d, count):
    """``count`` videos in the gallery; the newest has the clip's duration (17 frames at 8 fps) and plays."""
    probe = ("const v = document.querySelectorAll('#gallery video'); if (v.length < arguments[0]) return null;"
             "return v[0].readyState >= 1 ? [v[0].duration, v[0].currentTime, v[0].paused] : null;")
    duration, t0, _ = until(d, lambda d: d.execute_script(probe, count), 90, f"{count} video(s) in the gallery")
    assert abs(duration - 17 / 8) < 0.2, duration
    time.sleep(0.6)
    _, t1, paused = d.execute_script(probe, count)
    assert not paused and t1 != t0  # it is playing (looping, so the time may also have wrapped)
