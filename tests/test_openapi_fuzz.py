"""The OpenAPI document against the real worker: schemathesis (pinned in requirements/test.txt) fuzzes a
gunicorn worker on the embedded engine from its own /openapi.json and finds no 5xx, no schema-valid request
refused, no schema-violating request accepted, and no answer (status, content type, headers, body) that the
document does not list. Bounded: a fixed seed, a few examples per operation, a short MAX_TEXT_CHARS.

Left out, with reasons: /v1/stream (a WebSocket handshake, not a request/response exchange; tests/test_ws.py)
and ignored_auth (credentials are the gateway's: tests/test_gateway.py; the bare worker has none).
"""
import subprocess
import time
from pathlib import Path

import pytest
import requests

from .support.procs import PYTHON, REPO_ROOT
from .support.worker import start_worker

SCHEMATHESIS = str(Path(PYTHON).with_name("schemathesis"))


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    with start_worker(tmp_path_factory.mktemp("fuzz"), {"MAX_TEXT_CHARS": "30"}) as w:
        yield w


def test_document_states_the_limits_the_worker_enforces(worker):
    doc = requests.get(f"{worker.url}/openapi.json", timeout=30).json()
    schemas = doc["components"]["schemas"]
    speech, tts = schemas["SpeechRequest"]["properties"], schemas["TTSRequest"]["properties"]
    assert speech["speed"]["minimum"] == 0.25 and speech["speed"]["maximum"] == 4.0 and "ge" not in speech["speed"]
    cfg = next(s for s in speech["cfg_value"]["anyOf"] if s.get("type") == "number")
    assert cfg["minimum"] == 0.5 and cfg["maximum"] == 5.0
    assert tts["text"]["minLength"] == 1 and tts["text"]["maxLength"] == 30
    assert speech["lang"]["enum"] == ["auto", "en"]  # the embedded engine speaks English only
    assert next(s for s in tts["seed"]["anyOf"] if s.get("type") == "integer")["maximum"] == 2**31 - 1
    assert {"401", "403", "413", "429"} <= set(doc["paths"]["/v1/audio/speech"]["post"]["responses"])
    # OpenAI's instructions (bounded) and aac; the header that says instructions were ignored; captions.
    instructions = next(s for s in speech["instructions"]["anyOf"] if s.get("type") == "string")
    assert instructions["maxLength"] == 1000 and "instructions" in tts
    assert "aac" in speech["response_format"]["enum"]
    assert "audio/aac" in doc["paths"]["/v1/audio/speech"]["post"]["responses"]["200"]["content"]
    for path in ("/tts", "/v1/audio/speech"):
        assert "X-Instructions-Ignored" in doc["paths"][path]["post"]["responses"]["200"]["headers"]
    assert "captions" in schemas["TTSResponse"]["properties"] and "captions" in schemas["SpeechAudioDone"]["properties"]
    # mp3 (the default) cannot be streamed: the document says so, the worker refuses it.
    assert "allOf" in schemas["SpeechRequest"]
    r = requests.post(f"{worker.url}/v1/audio/speech", json={"input": "Hi.", "stream_format": "sse"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "format_not_streamable"
    # 40.0 is an integer in JSON Schema, so the worker takes it as one (40.5 is not).
    assert requests.post(f"{worker.url}/tts", json={"text": "Hi.", "seed": 40.0}, timeout=30).status_code == 200
    assert requests.post(f"{worker.url}/tts", json={"text": "Hi.", "seed": 40.5}, timeout=30).status_code == 400


def test_synthesis_answers_list_the_workers_own_failure():
    """A model that fails on a request answers 500 synthesis_failed (test_usage.py makes one): a client
    generated from the document must know that answer."""
    from service.api.openapi import build_openapi
    from service.settings import Settings

    from .support.slow_engine import SlowEngine

    doc = build_openapi("test", Settings(), SlowEngine(0.001, 1), ["slow-fake"])
    for path in ("/tts", "/v1/audio/speech"):
        answer = doc["paths"][path]["post"]["responses"]["500"]
        assert "synthesis_failed" in answer["description"] and answer["content"]["application/json"]


def test_schemathesis_finds_nothing_the_document_does_not_say(worker, tmp_path):
    requests.get(f"{worker.url}/openapi.json", timeout=30)  # built once (a pass over Unicode), not on the clock
    cmd = [SCHEMATHESIS, "--config-file", str(REPO_ROOT / "tests" / "schemathesis.toml"), "run",
           f"{worker.url}/openapi.json", "--checks", "all", "--exclude-checks", "ignored_auth",
           "--exclude-path", "/v1/stream", "--phases", "coverage,fuzzing", "--max-examples", "5", "--seed", "20261204",
           "--workers", "1", "--no-color", "--report-dir", str(tmp_path)]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    took = time.monotonic() - t0
    summary = r.stdout[-3000:]
    assert r.returncode == 0, summary
    assert " passed" in summary and "failures" not in summary.split("SUMMARY")[-1].lower(), summary
    print(f"\nschemathesis: {summary.strip().splitlines()[-1]} ({took:.0f}s)")
