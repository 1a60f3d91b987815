"""The worker on the voxcpm engine: the package's own model code on a tiny random-weight VoxCPM-1.5
checkpoint built by the test, served by real gunicorn. Random weights make noise, not speech, so
these tests check rates, lengths, streaming, determinism and plumbing, not intelligibility."""
import base64
import io
import subprocess
import time

import numpy as np
import pytest
import requests
import soundfile as sf

from .support.procs import PYTHON, REPO_ROOT, free_port
from .support.voxcpm_checkpoint import build_checkpoint
from .support.worker import start_worker

TOKEN_SAMPLES = 4 * 1764  # patch size x VAE hop: one 6.25 Hz token = 160 ms at 44.1 kHz


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "voxcpm-tiny", size="tiny", seed=0)


@pytest.fixture(scope="module", params=["1", "3"], ids=["serial", "batched"])
def worker(request, checkpoint, tmp_path_factory):
    """The same tests run one request at a time and through continuous batching (TTS_MAX_BATCH=3). QUEUE_SIZE=6:
    the six concurrent requests below all wait, and 16 threads still leave room for a batch of 4."""
    env = {"TTS_ENGINE": "voxcpm", "MODEL_DIR": str(checkpoint), "TTS_DEVICE": "auto", "TTS_MAX_BATCH": request.param,
           "QUEUE_SIZE": "6", "VOXCPM_MAX_LEN": "24", "VOXCPM_INFERENCE_TIMESTEPS": "2", "CROSSFADE_MS": "0"}
    with start_worker(tmp_path_factory.mktemp("vox"), env) as w:
        w.batched = request.param != "1"
        yield w


def wav(body: dict):
    return sf.read(io.BytesIO(base64.b64decode(body["audio_base64"])), dtype="float32")


def test_info_reports_voxcpm_on_cpu_and_why(worker):
    info = requests.get(f"{worker.url}/info").json()["engine"]
    assert info["name"] == "voxcpm" and info["device"] == "cpu" and info["sample_rate"] == 44100
    assert "auto: no CUDA device visible to torch" in worker.log_text()
    assert ("continuous batching: up to 3 requests" in worker.log_text()) == worker.batched
    # The batched path ran once before "ready", so a broken one would have failed the start.
    startup = requests.get(f"{worker.url}/readyz").json()["startup"]
    assert ("batch_warmup_s" in startup) == worker.batched == ("batched warm-up passed" in worker.log_text())


def test_concurrent_requests_are_all_served(worker):
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        r = requests.post(f"{worker.url}/v1/audio/speech", json={
            "input": f"Concurrent request number {i}." * (1 + i % 3), "response_format": "pcm", "seed": i,
            "stream": i % 2 == 0})
        return r.status_code, len(r.content) // 2

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    assert all(code == 200 and n > 0 and n % TOKEN_SAMPLES == 0 for code, n in results), results
    metrics = requests.get(f"{worker.url}/metrics").text
    assert 'voxbox_requests_total{endpoint="/v1/audio/speech",status="200"}' in metrics


def test_tts_is_44k1_audio_in_whole_tokens(worker):
    r = requests.post(f"{worker.url}/tts", json={"text": "Hello world.", "seed": 1})
    assert r.status_code == 200, r.text
    audio, rate = wav(r.json())
    assert rate == 44100 and audio.size > 0 and np.isfinite(audio).all()
    assert audio.size % TOKEN_SAMPLES == 0
    assert float(np.abs(audio).max()) > 0


def test_captions_fall_on_token_boundaries_and_instructions_are_said_ignored(worker):
    """Without a crossfade, each chunk's audio is whole 160 ms tokens: every caption edge is on one, serial or
    batched. VoxCPM-1.5 has no control text, so instructions are ignored, and said so."""
    text = ("The first chunk of this request is a sentence long enough that the second one cannot join it here. "
            "The second chunk is another sentence of over a hundred characters, so the two stay separate chunks.")
    r = requests.post(f"{worker.url}/tts", json={"text": text, "seed": 3, "max_len": 8, "timestamps": "sentence",
                                                 "instructions": "Whisper it."})
    assert r.status_code == 200, r.text
    assert r.headers["X-Instructions-Ignored"] == "true"
    body = r.json()
    audio, rate = wav(body)
    captions = body["captions"]
    assert len(captions) == 2 and captions[0]["start"] == 0 and captions[0]["end"] == captions[1]["start"]
    assert captions[1]["end"] == round(audio.size / rate, 3)
    token_s = TOKEN_SAMPLES / 44100
    for edge in (captions[0]["end"], captions[1]["end"]):
        assert edge > 0 and abs(edge / token_s - round(edge / token_s)) < 1e-2, captions
    model = requests.get(f"{worker.url}/v1/models").json()["data"][0]
    assert model["supports_instructions"] is False


def test_same_seed_same_audio(worker):
    body = {"text": "Determinism check.", "seed": 7, "sample_rate": 16000}
    a, _ = wav(requests.post(f"{worker.url}/tts", json=body).json())
    b, _ = wav(requests.post(f"{worker.url}/tts", json=body).json())
    assert a.size == b.size and np.array_equal(a, b)


def test_chinese_text_is_accepted(worker):
    r = requests.post(f"{worker.url}/tts", json={"text": "你好，世界。", "lang": "zh"})
    assert r.status_code == 200, r.text


def test_streaming_uses_generate_streaming_chunks(worker):
    with requests.post(f"{worker.url}/v1/audio/speech", stream=True,
                       json={"input": "Streaming test sentence.", "response_format": "pcm", "stream": True,
                             "max_len": 12}) as r:
        assert r.status_code == 200 and r.headers["X-Sample-Rate"] == "44100"
        chunks = [c for c in r.iter_content(chunk_size=None)]
    samples = sum(len(c) for c in chunks) // 2
    assert len(chunks) >= 2  # one HTTP chunk per generated 160 ms token, not one blob at the end
    assert samples % TOKEN_SAMPLES == 0 and samples >= 2 * TOKEN_SAMPLES


def test_knobs_and_normalisation(worker):
    r = requests.post(f"{worker.url}/v1/audio/speech",
                      json={"input": "It costs $25 on 3/4/2024.", "response_format": "wav", "cfg_value": 1.5,
                            "inference_timesteps": 3, "normalize": True, "max_len": 8})
    assert r.status_code == 200, r.text
    audio, rate = sf.read(io.BytesIO(r.content))
    assert audio.size <= 9 * TOKEN_SAMPLES


def test_voice_cloning_with_uploaded_voice(worker):
    rate = 22050
    t = np.arange(rate * 3) / rate
    clip = (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, clip, rate, format="WAV")
    up = requests.post(f"{worker.url}/v1/voices", files={"file": ("ref.wav", buf.getvalue(), "audio/wav")},
                       data={"name": "Tester", "text": "This is my reference voice."})
    assert up.status_code == 201, up.text
    voice_id = up.json()["id"]
    t0 = time.monotonic()
    first = requests.post(f"{worker.url}/tts", json={"text": "Cloned.", "style": voice_id, "seed": 3})
    t_first = time.monotonic() - t0
    assert first.status_code == 200, first.text
    t0 = time.monotonic()
    second = requests.post(f"{worker.url}/tts", json={"text": "Cloned.", "style": voice_id, "seed": 3})
    assert second.status_code == 200
    assert np.array_equal(wav(first.json())[0], wav(second.json())[0])  # cached prompt = same conditioning
    assert time.monotonic() - t0 < t_first * 3
    assert requests.delete(f"{worker.url}/v1/voices/{voice_id}").status_code == 200
    gone = requests.post(f"{worker.url}/tts", json={"text": "Cloned.", "style": voice_id})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "voice_not_found"


def test_a_request_that_cannot_start_fails_alone(worker):
    """A stored voice whose audio was damaged on the volume: its request fails with a JSON error; the
    requests arriving with it (prefilled together when batched) and the one running are served."""
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(np.arange(22050 * 3) / 22050 * 2 * np.pi * 180)).astype(np.float32), 22050,
             format="WAV")
    voice_id = requests.post(f"{worker.url}/v1/voices", files={"file": ("ref.wav", buf.getvalue(), "audio/wav")},
                             data={"name": "Damaged", "text": "A reference."}).json()["id"]
    (Path(worker.env["VOICES_DIR"]) / voice_id / "audio.wav").write_bytes(b"not audio any more" * 100)

    def one(body):
        r = requests.post(f"{worker.url}/v1/audio/speech", json={"response_format": "pcm", **body})
        return r.status_code, r.headers.get("Content-Type", "")

    with ThreadPoolExecutor(4) as pool:
        running = pool.submit(one, {"input": "Keep the batch busy for a while. " * 4, "seed": 1})
        time.sleep(0.3)
        together = list(pool.map(one, [{"input": "Broken voice.", "voice": voice_id, "seed": 2},
                                       {"input": "A fine request.", "seed": 3},
                                       {"input": "Another fine one.", "seed": 4}]))
    assert running.result()[0] == 200
    (bad, bad_type), *fine = together
    assert bad >= 500 and bad_type.startswith("application/json"), together
    assert [code for code, _ in fine] == [200, 200]
    assert requests.get(f"{worker.url}/healthz").status_code == 200
    assert ("could not add a request to the batch" in worker.log_text()) == worker.batched
    requests.delete(f"{worker.url}/v1/voices/{voice_id}")


def test_broken_model_dir_fails_loudly_and_never_falls_back(tmp_path):
    (tmp_path / "empty-model").mkdir()
    env = {"TTS_ENGINE": "voxcpm", "MODEL_DIR": str(tmp_path / "empty-model")}
    with start_worker(tmp_path, env, wait_ready=False) as w:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready = requests.get(f"{w.url}/readyz")
            if ready.json()["phase"] == "failed":
                break
            time.sleep(0.2)
        assert ready.status_code == 503 and "config.json missing" in ready.json()["error"]
        assert requests.get(f"{w.url}/healthz").status_code == 503
        r = requests.post(f"{w.url}/tts", json={"text": "hello"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert requests.get(f"{w.url}/info").json()["engine"]["name"] == "voxcpm"


def test_voxcpm_without_model_dir_refuses_to_start(tmp_path):
    port = free_port()
    gunicorn = str(REPO_ROOT / "service" / "gunicorn.conf.py")
    proc = subprocess.run([PYTHON, "-m", "gunicorn", "-c", gunicorn, "service.app:create_app()"],
                          env={"PATH": "/usr/bin:/bin", "BIND": f"127.0.0.1:{port}", "TTS_ENGINE": "voxcpm"},
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "TTS_ENGINE=voxcpm needs MODEL_DIR" in proc.stdout + proc.stderr


def test_batched_worker_still_sheds_load_with_503(checkpoint, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    env = {"TTS_ENGINE": "voxcpm", "MODEL_DIR": str(checkpoint), "TTS_MAX_BATCH": "2", "QUEUE_SIZE": "1",
           "RETRY_AFTER_S": "7", "VOXCPM_MAX_LEN": "60", "VOXCPM_INFERENCE_TIMESTEPS": "2"}
    with start_worker(tmp_path, env) as w:
        def one(i):
            r = requests.post(f"{w.url}/tts", json={"text": "A long enough request to keep the batch busy. " * 3,
                                                     "max_len": 60, "seed": i})
            return r.status_code, r.headers.get("Retry-After"), r.json()
        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(one, range(10)))
    shed = [r for r in results if r[0] == 503]
    assert any(r[0] == 200 for r in results) and shed
    assert all(r[1] == "7" and r[2]["error"]["code"] == "overloaded" for r in shed)
