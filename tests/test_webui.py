"""The web UI in real headless Chromium against real gunicorn (and through real nginx with basic auth)."""
import base64
import io
import json
import os
import shutil
import time

import numpy as np
import pytest
import requests
import soundfile as sf
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from .support.browser import chromium
from .support.gateway import start_gateway
from .support.procs import REPO_ROOT
from .support.worker import SLOW_APP, start_worker
from service.voices import VoiceStore

ARTIFACTS = REPO_ROOT / "artifacts"
# The screenshots in docs/ (desktop, phone, desktop in dark mode), refreshed by test_docs_screenshots.
DOCS_SCREENSHOTS = {"ui": REPO_ROOT / "docs" / "screenshot-ui.png",
                    "ui-phone": REPO_ROOT / "docs" / "screenshot-ui-phone.png",
                    "ui-dark": REPO_ROOT / "docs" / "screenshot-ui-dark.png"}
AUTH = ("ui", "secret-password")


def tone_wav(seconds: float = 3.0, rate: int = 22050) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 150 * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    # A voice uploaded while this server ran VoxCPM: the embedded engine lists it but cannot use it.
    store = VoiceStore(tmp / "voices", 10 << 20, 2.0, 30.0)
    old = store.create("Old VoxCPM voice", "A clip uploaded under another engine.", tone_wav())
    with start_worker(tmp, {"MAX_TEXT_CHARS": "1000"}) as w:
        w.unusable_voice = old
        yield w


@pytest.fixture(scope="module")
def gateway(worker, tmp_path_factory):
    # Rate limits out of the way: one user's pages load a dozen files at once (the API docs page's
    # bundle, styles, script and document) right after the other tests' pages; they are not under test here.
    env = {"BASIC_AUTH_USERS": ":".join(AUTH), "RATE_LIMIT_RPS": "200", "RATE_LIMIT_BURST": "400"}
    with start_gateway(tmp_path_factory.mktemp("ui-gw"), f"127.0.0.1:{worker.port}", env) as gw:
        yield gw


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
    assert "Generate · joe" in browser.find_element(By.ID, "history").text
    # The embedded engine has no VoxCPM knobs: they are hidden, not silently sent.
    assert not browser.find_element(By.ID, "cfg").is_enabled()
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "ui-desktop.png"))


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


def test_stream_starts_playing_before_generate_would_have_finished(browser, worker):
    """Issue 17, item 7: for a short text the UI's Stream is heard before Generate has its audio. Both are
    timed by the page itself (performance.now()), alternating in one page so that a busy machine slows both;
    the medians of three rounds are compared. Measured on a 2-core VM: Stream is heard after about 0.3-0.4 of
    Generate's time; with the first chunk as long as any other (STREAM_SHORT_FIRST_CHUNK=0) after about 0.9,
    which the two-thirds bound below refuses."""
    open_page(browser, worker.url + "/")
    set_text(browser, "Streaming starts with the first sentence, while the rest is made. Generate has to wait "
                      "for the whole text before it can play anything at all.")
    Select(browser.find_element(By.ID, "format")).select_by_value("wav")
    played, generated = [], []
    for _ in range(3):
        before = browser.execute_script("return window.voxbox.generations")
        browser.find_element(By.ID, "generate").click()
        wait(browser, lambda b: b.execute_script("return window.voxbox.generations") == before + 1)
        vb = browser.execute_script("return window.voxbox")
        generated.append((vb["generateDoneAt"] - vb["generateStartedAt"]) / 1000)
        browser.find_element(By.ID, "stream").click()
        wait(browser, lambda b: b.execute_script("return window.voxbox.streamDone"))
        vb = browser.execute_script("return window.voxbox")
        assert vb["lastError"] is None and vb["chunksReceived"] >= 2, vb
        # Scheduled on a running AudioContext: the time it is due is when it is heard.
        assert vb["playState"] == "running", vb
        played.append((vb["playStartAt"] - vb["streamStartedAt"]) / 1000)
    play, gen = sorted(played)[1], sorted(generated)[1]
    print(f"stream first sound {played} s; generate audio in hand {generated} s; medians {play:.3f} / {gen:.3f}")
    assert play < 2 / 3 * gen, (played, generated)


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
    # Esc does what Stop does, from the keyboard.
    browser.find_element(By.ID, "stream").click()
    wait(browser, lambda b: b.execute_script("return window.voxbox.chunksReceived >= 1"))
    browser.find_element(By.ID, "text").send_keys(Keys.ESCAPE)
    wait(browser, lambda b: b.execute_script("return window.voxbox.streamDone"), timeout=10)
    assert "Stream stopped" in browser.find_element(By.ID, "result-info").text


def test_upload_voice_appears_in_picker(browser, cloning_worker, tmp_path):
    worker = cloning_worker
    open_page(browser, worker.url + "/", presets=1)
    t = np.arange(22050 * 3) / 22050
    wav = tmp_path / "reference.wav"
    sf.write(wav, (0.3 * np.sin(2 * np.pi * 150 * t)).astype(np.float32), 22050)
    browser.find_element(By.ID, "voice-name").send_keys("Browser voice")
    browser.find_element(By.ID, "voice-file").send_keys(str(wav))
    assert browser.find_element(By.ID, "voice-file-name").text == "reference.wav"
    # Without the transcript the API refuses, and the page says why.
    browser.find_element(By.ID, "upload").click()
    wait(browser, lambda b: b.find_element(By.ID, "error").is_displayed())
    assert "Upload failed: transcript" in browser.find_element(By.ID, "error").text
    browser.find_element(By.ID, "voice-text").send_keys("A reference clip uploaded from the browser.")
    browser.find_element(By.ID, "upload").click()
    wait(browser, lambda b: "Added" in b.find_element(By.ID, "voice-msg").text)
    assert not browser.find_element(By.ID, "error").is_displayed()
    # The form is ready for the next voice.
    assert [browser.find_element(By.ID, f).get_attribute("value") for f in ("voice-name", "voice-text", "voice-file")] \
        == ["", "", ""]
    assert browser.find_element(By.ID, "voice-file-name").text == "No file chosen"
    picker = Select(browser.find_element(By.ID, "voice"))
    assert picker.first_selected_option.text.startswith("Browser voice")
    # Deleting it from the list removes it from the picker and from the server.
    item = next(li for li in browser.find_elements(By.CSS_SELECTOR, "#voice-list li") if "Browser voice" in li.text)
    item.find_element(By.XPATH, ".//button[contains(., 'Delete')]").click()
    wait(browser, lambda b: not any(o.text.startswith("Browser voice")
                                    for o in Select(b.find_element(By.ID, "voice")).options))
    names = [v["name"] for v in requests.get(f"{worker.url}/v1/voices").json()["voices"]]
    assert "Browser voice" not in names


def test_engine_that_cannot_clone_offers_no_upload_and_never_selects_a_cloned_voice(browser, worker):
    open_page(browser, worker.url + "/")
    help_text = browser.find_element(By.ID, "voice-help").text
    assert "cannot clone" in help_text and "TTS_ENGINE=voxcpm" in help_text, help_text
    # Uploads would only be refused (400 cloning_not_supported): the form is off, not a trap.
    assert not browser.find_element(By.ID, "upload").is_enabled()
    assert not browser.find_element(By.ID, "voice-name").is_enabled()
    old = worker.unusable_voice
    picker = Select(browser.find_element(By.ID, "voice"))
    option = next(o for o in picker.options if o.get_attribute("value") == old.id)
    assert not option.is_enabled() and picker.first_selected_option.get_attribute("value") == "joe"
    assert "Old VoxCPM voice" in browser.find_element(By.ID, "voice-list").text
    # Should a request still name it (a stale selection), the error names the voice, not its id.
    browser.execute_script("const s = document.getElementById('voice'); s.querySelector(`option[value='${arguments[0]}']`)"
                           ".disabled = false; s.value = arguments[0];", old.id)
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda b: b.find_element(By.ID, "error").is_displayed())
    error = browser.find_element(By.ID, "error").text
    assert "voice “Old VoxCPM voice” is a cloned voice" in error and old.id not in error and "use a preset" in error, error


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


def test_a_failure_removes_the_previous_audio(browser, worker):
    open_page(browser, worker.url + "/")
    set_text(browser, "First a result that works.")
    before = browser.execute_script("return window.voxbox.generations")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda b: b.execute_script("return window.voxbox.generations") == before + 1)
    assert browser.find_element(By.ID, "download").is_displayed()
    set_text(browser, "word " * 201)
    assert "over" in browser.find_element(By.ID, "counter").get_attribute("class")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda b: b.find_element(By.ID, "error").is_displayed())
    assert "has 1005 characters; the limit is 1000" in browser.find_element(By.ID, "error").text
    # No stale answer under "Failed.": the player is empty and hidden, the download link gone.
    assert browser.find_element(By.ID, "result-info").text == "Failed."
    assert not browser.find_element(By.ID, "player").is_displayed()
    assert not browser.find_element(By.ID, "download").is_displayed()
    assert browser.execute_script("return document.getElementById('player').getAttribute('src')") is None


def test_history_survives_a_reload_bounded_and_regenerates(browser, worker):
    open_page(browser, worker.url + "/")
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    open_page(browser, worker.url + "/")
    # Empty state: no player and no "Recent" until something was made.
    assert not browser.find_element(By.ID, "player").is_displayed()
    assert not browser.find_element(By.ID, "recent").is_displayed()
    # 25 older entries in storage (and some junk): the list keeps the newest 20.
    browser.execute_script("""
        const old = [...Array(25).keys()].map((i) => ({id: `old-${i}`, kind: 'Generate', text: `Old entry ${i}`,
          voice: 'joe', voiceName: 'joe', format: 'wav', sample_rate: 44100, speed: 1, duration: 1, latency: 1,
          at: new Date(2026, 0, 1).toISOString()}));
        // Junk under the key (another version, a hand edit) is skipped, not fatal.
        localStorage.setItem('voxbox.history.v1', JSON.stringify([null, {text: 5}, {id: 'x', text: 'no numbers'}, ...old]));""")
    browser.refresh()
    open_page(browser, worker.url + "/")
    Select(browser.find_element(By.ID, "voice")).select_by_value("joe-calm")
    Select(browser.find_element(By.ID, "format")).select_by_value("flac")
    set_text(browser, "Kept in the browser across a reload.")
    before = browser.execute_script("return window.voxbox.generations")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda b: b.execute_script("return window.voxbox.generations") == before + 1)
    browser.refresh()
    open_page(browser, worker.url + "/")
    items = browser.find_elements(By.CSS_SELECTOR, "#history li")
    assert len(items) == 20 and "Kept in the browser across a reload." in items[0].text
    assert "joe-calm" in items[0].text and "Old entry 0" in items[1].text
    # Audio is not kept across pages (explained on the page); ↻ makes it again with the same settings.
    assert not items[0].find_elements(By.XPATH, ".//button[contains(., 'Play')]")
    set_text(browser, "Something else.")
    Select(browser.find_element(By.ID, "format")).select_by_value("wav")
    items[0].find_element(By.XPATH, ".//button[contains(., 'Regenerate')]").click()
    wait(browser, lambda b: b.execute_script("return window.voxbox.generations") == 1)
    assert browser.find_element(By.ID, "text").get_attribute("value") == "Kept in the browser across a reload."
    assert Select(browser.find_element(By.ID, "voice")).first_selected_option.get_attribute("value") == "joe-calm"
    assert browser.find_element(By.ID, "download").get_attribute("download") == "voxbox.flac"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#history li")) == 20
    browser.find_element(By.ID, "clear-history").click()
    assert not browser.find_element(By.ID, "recent").is_displayed()
    assert browser.execute_script("return localStorage.getItem('voxbox.history.v1')") == "[]"


def test_voice_preview_plays_a_preset_sample_and_an_uploaded_clip(browser, worker):
    open_page(browser, worker.url + "/")
    Select(browser.find_element(By.ID, "voice")).select_by_value("joe-lively")
    lively = next(v for v in requests.get(f"{worker.url}/v1/voices").json()["voices"] if v["id"] == "joe-lively")
    assert browser.find_element(By.ID, "voice-note").text == lively["description"]
    browser.find_element(By.ID, "preview").click()
    wait(browser, lambda b: b.execute_script("return window.voxbox.previews") == 1)
    played = wait(browser, lambda b: b.execute_script(
        "const a = window.voxboxPreview; return a && a.readyState >= 1 && isFinite(a.duration) ? a.duration : null"))
    assert 1.0 < played < 6.0
    # The uploaded voice's own clip (3 s), although this engine cannot speak with it.
    item = next(li for li in browser.find_elements(By.CSS_SELECTOR, "#voice-list li") if "Old VoxCPM voice" in li.text)
    item.find_element(By.XPATH, ".//button[contains(., 'Play')]").click()
    wait(browser, lambda b: b.execute_script("return window.voxbox.previews") == 2)
    clip = wait(browser, lambda b: b.execute_script(
        "const a = window.voxboxPreview; return a && a.readyState >= 1 && isFinite(a.duration) ? a.duration : null"))
    assert abs(clip - 3.0) < 0.05
    assert not browser.find_element(By.ID, "error").is_displayed()


def test_controls_are_labelled_for_assistive_technology(browser, worker):
    open_page(browser, worker.url + "/")
    controls = [el for el in browser.find_elements(By.CSS_SELECTOR, "input, select, textarea, button, a, summary")
                if el.is_displayed()]
    assert len(controls) > 15
    # Every control a person can reach has a name a screen reader says (Chromium's computed label).
    unnamed = [el.get_attribute("outerHTML")[:80] for el in controls if not el.accessible_name.strip()]
    assert unnamed == []
    assert browser.find_element(By.ID, "text").accessible_name == "Text"
    assert browser.find_element(By.ID, "rate").accessible_name == "Sample rate"
    assert browser.find_element(By.ID, "preview").accessible_name == "Preview voice"
    assert browser.find_element(By.ID, "error").get_attribute("role") == "alert"  # hidden until an error: no computed role
    assert browser.find_element(By.ID, "status").aria_role == "status"
    assert "Control+Enter" in browser.find_element(By.ID, "generate").get_attribute("aria-keyshortcuts")


def test_ctrl_enter_generates_with_a_busy_button_that_keeps_its_size(browser, worker):
    open_page(browser, worker.url + "/")
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    open_page(browser, worker.url + "/")
    # What the busy state did, recorded as it happened (the request is too quick to catch by polling).
    browser.execute_script("""
        window.busySeen = [];
        const gen = document.getElementById('generate');
        new MutationObserver(() => window.busySeen.push([gen.getAttribute('aria-busy'), gen.disabled,
            gen.getBoundingClientRect().width, document.getElementById('stream').disabled,
            document.getElementById('stop').disabled])).observe(gen, {attributes: true, attributeFilter: ['aria-busy']});
        window.widthBefore = gen.getBoundingClientRect().width;""")
    set_text(browser, "Made with the keyboard.")
    browser.find_element(By.ID, "text").send_keys(Keys.CONTROL, Keys.ENTER)
    wait(browser, lambda b: b.execute_script("return window.voxbox.generations") == 1)
    seen, before = browser.execute_script("return [window.busySeen, window.widthBefore]")
    # Busy, then idle again: Generate spins (its width unchanged) while Stream is off and Stop is on.
    assert [s[0] for s in seen] == ["true", "false"], seen
    assert seen[0][1:] == [True, before, True, False] and seen[1][1:] == [False, before, False, True], seen
    assert browser.find_element(By.ID, "text").get_attribute("value") == "Made with the keyboard."  # no newline typed
    # The result's waveform is drawn (bars on the canvas), and a click on it seeks.
    painted = wait(browser, lambda b: b.execute_script("""
        const c = document.getElementById('waveform'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n > 200 ? n : null;"""))
    assert painted
    player = browser.find_element(By.ID, "player")
    browser.execute_script("arguments[0].pause()", player)
    wave = browser.find_element(By.ID, "waveform")
    browser.execute_script("""
        const c = arguments[0], r = c.getBoundingClientRect();
        c.dispatchEvent(new MouseEvent('click', {clientX: r.left + r.width * 0.75, clientY: r.top + 5, bubbles: true}));""", wave)
    at = browser.execute_script("return arguments[0].currentTime / arguments[0].duration", player)
    assert 0.7 < at < 0.8
    # A history entry can be deleted on its own.
    items = browser.find_elements(By.CSS_SELECTOR, "#history li")
    assert len(items) == 1
    items[0].find_element(By.XPATH, ".//button[contains(., 'Delete')]").click()
    assert not browser.find_element(By.ID, "recent").is_displayed()
    assert browser.execute_script("return localStorage.getItem('voxbox.history.v1')") == "[]"


def test_dark_mode_follows_the_system_setting(worker):
    def colours(b):
        return b.execute_script("""
            const lum = (c) => { const [r, g, bl] = c.match(/[0-9.]+/g).map(Number); return (0.2126 * r + 0.7152 * g + 0.0722 * bl) / 255; };
            const s = (id) => getComputedStyle(id ? document.getElementById(id) : document.body);
            return {page: lum(s().backgroundColor), text: lum(s().color), field: lum(s('text').backgroundColor),
                    fieldText: lum(s('text').color)};""")

    with chromium() as b:
        open_page(b, worker.url + "/")
        light = colours(b)
        b.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
        dark = colours(b)
    assert light["page"] > 0.8 and light["text"] < 0.3 and light["field"] > 0.8
    assert dark["page"] < 0.15 and dark["text"] > 0.7 and dark["field"] < 0.15 and dark["fieldText"] > 0.7, dark


def test_instructions_box_only_for_models_that_apply_instructions(browser, worker):
    open_page(browser, worker.url + "/")
    entry = requests.get(f"{worker.url}/v1/models").json()["data"][0]
    # The page follows GET /v1/models; a model without the field does not apply instructions.
    applies = entry.get("supports_instructions") is True
    assert browser.find_element(By.ID, "instructions-field").is_displayed() == applies
    if not applies:
        # Text left in a hidden box is not sent: this model takes the request as ever.
        browser.execute_script("document.getElementById('instructions').value = 'Whisper it.'")
        set_text(browser, "Instructions are not sent to this model.")
        before = browser.execute_script("return window.voxbox.generations")
        browser.find_element(By.ID, "generate").click()
        wait(browser, lambda b: b.execute_script("return window.voxbox.generations") == before + 1)
        assert browser.execute_script("return window.voxbox.lastError") is None
    # The same entry saying it applies them (as a VoxCPM2 model's does): the box shows, and what is typed
    # goes with Generate and Stream and is kept with the history entry.
    browser.execute_script("state.models = state.models.map((m) => ({...m, supports_instructions: true})); applyModel();")
    assert browser.find_element(By.ID, "instructions-field").is_displayed()
    box = browser.find_element(By.ID, "instructions")
    assert box.accessible_name.startswith("Instructions")
    box.clear()
    box.send_keys("  Speak in a cheerful tone.  ")
    body = browser.execute_script("return requestBody()")
    assert body["instructions"] == "Speak in a cheerful tone."
    assert browser.execute_script("return streamRequest(requestBody())")["instructions"] == "Speak in a cheerful tone."
    assert browser.execute_script("return settingsOf(requestBody())")["instructions"] == "Speak in a cheerful tone."
    box.clear()
    assert "instructions" not in browser.execute_script("return streamRequest(requestBody())")


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
        box = lambda el_id: phone.execute_script(  # noqa: E731
            "const r = document.getElementById(arguments[0]).getBoundingClientRect(); "
            "return {top: r.top, left: r.left, width: r.width};", el_id)
        # Format and sample rate share a row; the voice picker has its own, full width.
        assert abs(box("format")["top"] - box("rate")["top"]) < 1 and box("rate")["left"] > box("format")["left"]
        assert box("voice")["top"] < box("format")["top"] and box("voice")["width"] > 200
        # The file picker's label is whole, and it says which file was chosen.
        label = phone.find_element(By.CSS_SELECTOR, ".file-button")
        assert phone.execute_script("return arguments[0].scrollWidth <= arguments[0].clientWidth", label)
        assert label.text == "Choose a clip…"
        ARTIFACTS.mkdir(exist_ok=True)
        phone.save_screenshot(str(ARTIFACTS / "ui-phone.png"))


@pytest.mark.parametrize("name, width, height, dark", [("ui", 1280, 1000, False), ("ui-phone", 390, 0, False),
                                                       ("ui-dark", 1280, 1000, True)])
def test_docs_screenshots(worker, name, width, height, dark):
    """The screenshots in docs/, of the page as a user has it after a Stream and a Generate, with the real
    Chromium and the embedded engine. They land in artifacts/ every run; VOXBOX_UPDATE_SCREENSHOT=1 copies them
    over docs/ (height 0: the whole page)."""
    with chromium(width, height or 844) as b:
        if dark:
            b.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
        open_page(b, worker.url + "/")
        b.execute_script("localStorage.clear()")
        b.refresh()
        open_page(b, worker.url + "/")
        set_text(b, "Welcome to VoxBox. Type anything here and it is read aloud in a moment.")
        b.find_element(By.ID, "stream").click()
        wait(b, lambda x: x.execute_script("return window.voxbox.streamDone"))
        set_text(b, "Streaming starts with the first sentence. Generate makes the whole file, "
                    "ready to download in the format you picked.")
        Select(b.find_element(By.ID, "voice")).select_by_value("joe-lively")
        b.find_element(By.ID, "generate").click()
        wait(b, lambda x: x.execute_script("return window.voxbox.generations") == 2)
        # A still moment: paused a third of the way through, the waveform drawn up to there.
        wait(b, lambda x: x.execute_script("""
            const p = document.getElementById('player');
            if (!(p.readyState >= 1 && isFinite(p.duration)) || !wave.data) return false;
            p.pause(); p.currentTime = p.duration / 3; paintWaveform(); return true;"""))
        b.execute_script("document.activeElement.blur()")
        if not height:
            b.set_window_size(width, b.execute_script("return document.documentElement.scrollHeight") + 140)
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / f"{name}.png"
        b.save_screenshot(str(shot))
    assert 10_000 < shot.stat().st_size < 250_000  # a page, not a blank; small enough to keep in git
    if os.environ.get("VOXBOX_UPDATE_SCREENSHOT") == "1":  # refresh the committed copies on request only
        shutil.copyfile(shot, DOCS_SCREENSHOTS[name])


def test_through_the_gateway_with_basic_auth(gateway):
    with chromium() as b:
        b.execute_cdp_cmd("Network.enable", {})
        b.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {
            "Authorization": "Basic " + base64.b64encode(":".join(AUTH).encode()).decode()}})
        open_page(b, gateway.url + "/")
        set_text(b, "Through the gateway.")
        b.find_element(By.ID, "stream").click()
        wait(b, lambda x: x.execute_script("return window.voxbox.streamDone"))
        assert b.execute_script("return window.voxbox.chunksReceived") >= 1
        assert not b.find_element(By.ID, "error").is_displayed()


def test_page_opened_with_credentials_in_the_url(gateway):
    """http://user:pass@host/: relative fetch() URLs would carry the credentials, which fetch() refuses."""
    with chromium() as b:
        b.get(gateway.url.replace("http://", "http://{}:{}@".format(*AUTH)) + "/")
        wait(b, lambda x: x.find_element(By.ID, "status").text.endswith("ready"))
        wait(b, lambda x: len(Select(x.find_element(By.ID, "voice")).options) >= 3)
        assert len(Select(b.find_element(By.ID, "rate")).options) == 7
        assert b.find_element(By.ID, "counter").text.endswith("/ 1000 characters")
        set_text(b, "Credentials in the address bar.")
        b.find_element(By.ID, "generate").click()
        wait(b, lambda x: x.execute_script("return window.voxbox.generations") == 1)
        b.find_element(By.ID, "stream").click()
        wait(b, lambda x: x.execute_script("return window.voxbox.streamDone"))
        vb = b.execute_script("return window.voxbox")
        assert vb["lastError"] is None and vb["streamHeader"]["sample_rate"] == 44100
        # The favicon is served (no 404), with a type browsers accept.
        icon = b.execute_script("return document.querySelector('link[rel=icon]').href")
        resp = requests.get(icon.replace("{}:{}@".format(*AUTH), ""), auth=AUTH)
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("image/svg+xml")


def test_docs_and_voice_clips_are_behind_the_gateway(gateway, worker):
    clip = f"/v1/voices/{worker.unusable_voice.id}/audio"
    for path in ("/docs", "/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css", clip):
        assert requests.get(gateway.url + path).status_code == 401, path
        assert requests.get(gateway.url + path, auth=AUTH).status_code == 200, path


def test_api_docs_page_works_offline_through_the_gateway(gateway, worker):
    page = requests.get(gateway.url + "/docs", auth=AUTH)
    assert page.status_code == 200 and "openapi.json" in page.text
    slash = requests.get(gateway.url + "/docs/", auth=AUTH)
    assert slash.url == gateway.url + "/docs" and slash.text == page.text
    js = requests.get(gateway.url + "/docs/swagger-ui-bundle.js", auth=AUTH)
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    with chromium() as b:
        b.get(gateway.url.replace("http://", "http://{}:{}@".format(*AUTH)) + "/docs")
        # Rendered from /openapi.json under the gateway's Content-Security-Policy (no inline script).
        wait(b, lambda x: "VoxBox TTS" in x.find_element(By.CSS_SELECTOR, "#swagger-ui").text)
        wait(b, lambda x: "/v1/audio/speech" in x.find_element(By.CSS_SELECTOR, "#swagger-ui").text)
        assert "/v1/voices/{voice_id}/audio" in b.find_element(By.CSS_SELECTOR, "#swagger-ui").text
        # Everything it loaded came from the gateway itself: nothing from a CDN or a validator badge.
        origins = b.execute_script("return [...new Set(performance.getEntriesByType('resource')"
                                   ".map((e) => new URL(e.name).origin))]")
        assert origins == [gateway.url], origins
        assert b.find_element(By.ID, "spec").get_attribute("href") == gateway.url + "/openapi.json"
        ARTIFACTS.mkdir(exist_ok=True)
        b.save_screenshot(str(ARTIFACTS / "api-docs.png"))


def generate_then_stream(browser, text):
    """Generate `text` once, then stream it, each to its end."""
    set_text(browser, text)
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda b: b.execute_script("return window.voxbox.generations") == 1)
    browser.find_element(By.ID, "stream").click()
    wait(browser, lambda b: b.execute_script("return window.voxbox.streamDone"))


def test_the_model_picker_sends_requests_to_the_model_picked(browser, tmp_path_factory):
    """A worker with several models shows a picker (hidden with one model, as elsewhere here); Generate
    and Stream go to the model picked, which its per-model metrics show."""
    models = [{"name": "en-a", "engine": "embedded"}, {"name": "en-b", "engine": "embedded"}]
    env = {"MODELS": json.dumps(models), "GUNICORN_THREADS": "32"}  # two queues and batches to carry
    with start_worker(tmp_path_factory.mktemp("ui-models"), env) as w:
        open_page(browser, w.url + "/")
        assert browser.find_element(By.ID, "model-field").is_displayed()
        picker = Select(browser.find_element(By.ID, "model"))
        assert [o.get_attribute("value") for o in picker.options] == ["en-a", "en-b"]
        assert picker.first_selected_option.get_attribute("value") == "en-a"  # the default
        picker.select_by_value("en-b")
        generate_then_stream(browser, "Picked the second model.")
        text = requests.get(f"{w.url}/metrics").text
        served = {m: float(line.split()[-1]) for m in ("en-a", "en-b") for line in text.splitlines()
                  if line.startswith(f'voxbox_audio_seconds_total{{model="{m}"}}')}
        assert served["en-a"] == 0 and served["en-b"] > 1


def test_one_model_shows_no_picker(browser, worker):
    open_page(browser, worker.url + "/")
    assert not browser.find_element(By.ID, "model-field").is_displayed()


def test_instructions_box_for_models_that_apply_them(browser, tmp_path_factory):
    """VoxCPM2 applies instructions (its /v1/models entry says supports_instructions): the page shows the box
    for it, sends what is typed on Generate and Stream, and hides the box for a model that would ignore it."""
    from .support.voxcpm_checkpoint import build_checkpoint

    ckpt = build_checkpoint(tmp_path_factory.mktemp("ui-v2") / "voxcpm2-tiny", size="tiny", seed=0, family="voxcpm2")
    models = [{"name": "vox2", "dir": str(ckpt), "settings": {"inference_timesteps": 2, "max_len": 16}},
              {"name": "en", "engine": "embedded"}]
    env = {"MODELS": json.dumps(models), "TTS_DEVICE": "cpu", "GUNICORN_THREADS": "32"}
    with start_worker(tmp_path_factory.mktemp("ui-v2-run"), env) as w:
        open_page(browser, w.url + "/", presets=1)
        # What the page sends, recorded on the way out (the requests themselves still go to the worker).
        browser.execute_script("""
            window.sent = [];
            const fetch0 = window.fetch;
            window.fetch = (u, o) => { if (o && o.body) window.sent.push(JSON.parse(o.body)); return fetch0(u, o); };
            const send0 = WebSocket.prototype.send;
            WebSocket.prototype.send = function (d) { window.sent.push(JSON.parse(d)); return send0.call(this, d); };
        """)
        box = browser.find_element(By.ID, "instructions")
        assert box.is_displayed()
        box.send_keys("a calm older woman, slow pace")
        generate_then_stream(browser, "Designed.")
        sent = browser.execute_script("return window.sent")
        assert [s.get("instructions") for s in sent] == ["a calm older woman, slow pace"] * 2, sent
        assert browser.execute_script("return window.voxbox.lastError") is None
        Select(browser.find_element(By.ID, "model")).select_by_value("en")
        assert not box.is_displayed()
