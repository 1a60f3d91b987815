"""The web UI in real headless Chromium against real gunicorn (and through real nginx with basic auth)."""
import base64
import os
import shutil
import time

import numpy as np
import pytest
import requests
import soundfile as sf
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from .support.browser import chromium
from .support.gateway import start_gateway
from .support.procs import REPO_ROOT
from .support.worker import SLOW_APP, start_worker

ARTIFACTS = REPO_ROOT / "artifacts"
DOCS_SCREENSHOT = REPO_ROOT / "docs" / "screenshot-ui.png"


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    with start_worker(tmp_path_factory.mktemp("ui"), {"MAX_TEXT_CHARS": "1000"}) as w:
        yield w


@pytest.fixture(scope="module")
def cloning_worker(tmp_path_factory):
    """Voice uploads need a cloning engine (the embedded one refuses them): the timed fake, SLOW_CLONING=1."""
    with start_worker(tmp_path_factory.mktemp("ui-clone"), {"SLOW_CLONING": "1"}, app=SLOW_APP) as w:
        yield w


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def wait(browser, cond, timeout=60):
    try:
        # The page re-renders lists as data arrives: an element read mid-render is stale, so look again.
        return WebDriverWait(browser, timeout, poll_frequency=0.1,
                             ignored_exceptions=(StaleElementReferenceException,)).until(lambda b: cond(b))
    except TimeoutException:
        state = browser.execute_script(
            "return {voxbox: window.voxbox, error: document.getElementById('error').textContent, "
            "status: document.getElementById('status').textContent, "
            "info: document.getElementById('result-info').textContent}")
        try:
            logs = [e["message"] for e in browser.get_log("browser")]
        except Exception as e:  # the driver may not keep console logs
            logs = [f"(no console log: {e.__class__.__name__})"]
        raise AssertionError(f"page condition not met after {timeout}s; page state {state}; console {logs}") from None


def open_page(browser, url, presets=3):
    browser.get(url)
    wait(browser, lambda b: b.find_element(By.ID, "status").text.endswith("ready"))
    wait(browser, lambda b: len(Select(b.find_element(By.ID, "voice")).options) >= presets)


def set_text(browser, text):
    area = browser.find_element(By.ID, "text")
    area.clear()
    area.send_keys(text)


def test_generate_plays_audio_of_the_right_length(browser, worker):
    open_page(browser, worker.url + "/")
    set_text(browser, "The web page turns this sentence into speech.")
    assert browser.find_element(By.ID, "counter").text.startswith("45 / 1000")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda b: b.execute_script("return window.voxbox.generations") == 1)
    duration = wait(browser, lambda b: b.execute_script(
        "const a = document.getElementById('player'); return a.readyState >= 1 && isFinite(a.duration) ? a.duration : null"))
    shown = float(browser.find_element(By.ID, "result-info").text.split(" s of audio")[0])
    assert duration > 1.0 and abs(duration - shown) < 0.1 * shown
    assert browser.find_element(By.ID, "download").get_attribute("download") == "voxbox.wav"
    assert "45 / 1000" in browser.find_element(By.ID, "counter").text
    assert "Generate:" in browser.find_element(By.ID, "history").text
    # The embedded engine has no VoxCPM knobs: they are hidden, not silently sent.
    assert not browser.find_element(By.ID, "cfg").is_enabled()
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "ui-desktop.png"
    browser.save_screenshot(str(shot))
    assert 0 < shot.stat().st_size < 300_000
    if os.environ.get("VOXBOX_UPDATE_SCREENSHOT") == "1":  # refresh the committed copy on request only
        shutil.copyfile(shot, DOCS_SCREENSHOT)


def test_stream_receives_chunks_before_done(browser, worker):
    open_page(browser, worker.url + "/")
    set_text(browser, " ".join(f"Streamed sentence number {i} arrives while the rest is made." for i in range(4)))
    browser.find_element(By.ID, "stream").click()
    wait(browser, lambda b: b.execute_script("return window.voxbox.streamDone"))
    vb = browser.execute_script("return window.voxbox")
    # Audio arrived in several chunks, the first one before the done message (times from the page).
    assert vb["chunksReceived"] >= 2 and vb["firstChunkAt"] < vb["doneAt"]
    assert vb["streamHeader"]["sample_rate"] == 44100 and vb["lastError"] is None
    info = browser.find_element(By.ID, "result-info").text
    assert info.startswith("Streamed"), info
    streamed = float(info.split()[1])
    # Every chunk was scheduled on WebAudio: the scheduled length is the audio's length.
    assert streamed > 3 and abs(vb["scheduledSeconds"] - streamed) < 0.05 * streamed
    assert browser.find_element(By.ID, "player").get_attribute("src").startswith("blob:")
    # The stream is kept as a WAV in the player (replay, download) of the same length.
    duration = wait(browser, lambda b: b.execute_script(
        "const a = document.getElementById('player'); return a.readyState >= 1 && isFinite(a.duration) ? a.duration : null"))
    assert abs(duration - streamed) < 0.05 * streamed


def test_stop_cancels_a_stream(browser, worker):
    open_page(browser, worker.url + "/")
    set_text(browser, " ".join(f"Sentence {i} of a long stream that the user stops early." for i in range(16)))
    browser.find_element(By.ID, "stream").click()
    wait(browser, lambda b: b.execute_script("return window.voxbox.chunksReceived >= 1"))
    browser.find_element(By.ID, "stop").click()
    wait(browser, lambda b: b.execute_script("return window.voxbox.streamDone"), timeout=10)
    assert "Stream stopped" in browser.find_element(By.ID, "result-info").text
    assert browser.find_element(By.ID, "stream").is_enabled()
    assert not browser.find_element(By.ID, "error").is_displayed()


def test_upload_voice_appears_in_picker(browser, cloning_worker, tmp_path):
    worker = cloning_worker
    open_page(browser, worker.url + "/", presets=1)
    t = np.arange(22050 * 3) / 22050
    wav = tmp_path / "reference.wav"
    sf.write(wav, (0.3 * np.sin(2 * np.pi * 150 * t)).astype(np.float32), 22050)
    browser.find_element(By.ID, "voice-name").send_keys("Browser voice")
    browser.find_element(By.ID, "voice-file").send_keys(str(wav))
    # Without the transcript the API refuses, and the page says why.
    browser.find_element(By.ID, "upload").click()
    wait(browser, lambda b: b.find_element(By.ID, "error").is_displayed())
    assert "Upload failed: transcript" in browser.find_element(By.ID, "error").text
    browser.find_element(By.ID, "voice-text").send_keys("A reference clip uploaded from the browser.")
    browser.find_element(By.ID, "upload").click()
    wait(browser, lambda b: "Added" in b.find_element(By.ID, "voice-msg").text)
    assert not browser.find_element(By.ID, "error").is_displayed()
    picker = Select(browser.find_element(By.ID, "voice"))
    assert picker.first_selected_option.text.startswith("Browser voice")
    # Deleting it from the list removes it from the picker and from the server.
    item = next(li for li in browser.find_elements(By.CSS_SELECTOR, "#voice-list li") if "Browser voice" in li.text)
    item.find_element(By.TAG_NAME, "button").click()
    wait(browser, lambda b: not any(o.text.startswith("Browser voice")
                                    for o in Select(b.find_element(By.ID, "voice")).options))
    names = [v["name"] for v in requests.get(f"{worker.url}/v1/voices").json()["voices"]]
    assert "Browser voice" not in names


def test_upload_to_an_engine_that_cannot_clone_shows_what_to_do(browser, worker, tmp_path):
    open_page(browser, worker.url + "/")
    assert "uploads are refused" in browser.find_element(By.ID, "voice-help").text
    t = np.arange(22050 * 3) / 22050
    wav = tmp_path / "reference.wav"
    sf.write(wav, (0.3 * np.sin(2 * np.pi * 150 * t)).astype(np.float32), 22050)
    browser.find_element(By.ID, "voice-name").clear()
    browser.find_element(By.ID, "voice-name").send_keys("Never stored")
    browser.find_element(By.ID, "voice-text").clear()
    browser.find_element(By.ID, "voice-text").send_keys("What the clip says.")
    browser.find_element(By.ID, "voice-file").send_keys(str(wav))
    browser.find_element(By.ID, "upload").click()
    wait(browser, lambda b: b.find_element(By.ID, "error").is_displayed())
    error = browser.find_element(By.ID, "error").text
    assert "Upload failed" in error and "cannot clone" in error and "TTS_ENGINE=voxcpm" in error, error


def test_record_from_microphone_uploads_a_voice(browser, cloning_worker):
    worker = cloning_worker
    open_page(browser, worker.url + "/", presets=1)
    assert browser.find_element(By.ID, "record").is_displayed()
    # A "microphone" that plays a 220 Hz tone (headless Chromium has no audio input device).
    browser.execute_script("""
        navigator.mediaDevices.getUserMedia = async () => {
          const ctx = new AudioContext();
          const osc = ctx.createOscillator(), dst = ctx.createMediaStreamDestination();
          osc.frequency.value = 220; osc.connect(dst); osc.start();
          return dst.stream;
        };""")
    browser.find_element(By.ID, "voice-name").clear()
    browser.find_element(By.ID, "voice-name").send_keys("Recorded voice")
    browser.find_element(By.ID, "voice-text").clear()
    browser.find_element(By.ID, "voice-text").send_keys("A tone recorded in the browser.")
    browser.find_element(By.ID, "record").click()
    wait(browser, lambda b: "Stop recording" in b.find_element(By.ID, "record").text)
    time.sleep(3.5)
    browser.find_element(By.ID, "record").click()
    wait(browser, lambda b: "Added" in b.find_element(By.ID, "voice-msg").text
         or b.find_element(By.ID, "error").is_displayed())
    assert not browser.find_element(By.ID, "error").is_displayed(), browser.find_element(By.ID, "error").text
    assert Select(browser.find_element(By.ID, "voice")).first_selected_option.text.startswith("Recorded voice")
    voices = requests.get(f"{worker.url}/v1/voices").json()["voices"]
    recorded = [v for v in voices if v["name"] == "Recorded voice"]
    assert len(recorded) == 1 and 3.0 < recorded[0]["duration"] < 5.0


def test_over_limit_text_shows_the_api_error(browser, worker):
    open_page(browser, worker.url + "/")
    set_text(browser, "word " * 201)
    assert "over" in browser.find_element(By.ID, "counter").get_attribute("class")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda b: b.find_element(By.ID, "error").is_displayed())
    assert "has 1005 characters; the limit is 1000" in browser.find_element(By.ID, "error").text


def test_phone_width_layout(worker):
    with chromium(390, 844) as phone:
        open_page(phone, worker.url + "/")
        phone.find_element(By.CSS_SELECTOR, "#advanced summary").click()
        width = phone.execute_script("return document.documentElement.scrollWidth")
        assert width <= 400  # no horizontal scrolling on a phone
        # Nothing visible sticks out to the right of the viewport.
        outside = phone.execute_script("""
            return [...document.querySelectorAll('main *')].filter((el) => el.offsetParent !== null)
              .filter((el) => el.getBoundingClientRect().right > window.innerWidth + 0.5)
              .map((el) => el.id || el.tagName);""")
        assert outside == []
        ARTIFACTS.mkdir(exist_ok=True)
        phone.set_window_size(390, phone.execute_script("return document.documentElement.scrollHeight") + 140)
        phone.save_screenshot(str(ARTIFACTS / "ui-phone.png"))


def test_through_the_gateway_with_basic_auth(worker, tmp_path):
    env = {"BASIC_AUTH_USERS": "ui:secret-password"}
    with start_gateway(tmp_path, f"127.0.0.1:{worker.port}", env) as gw, chromium() as b:
        # What the browser sends after a user answers the basic-auth prompt (headless has no prompt).
        b.execute_cdp_cmd("Network.enable", {})
        b.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {
            "Authorization": "Basic " + base64.b64encode(b"ui:secret-password").decode()}})
        open_page(b, gw.url + "/")
        set_text(b, "Through the gateway.")
        b.find_element(By.ID, "stream").click()
        wait(b, lambda x: x.execute_script("return window.voxbox.streamDone"))
        assert b.execute_script("return window.voxbox.chunksReceived") >= 1
        assert not b.find_element(By.ID, "error").is_displayed()
