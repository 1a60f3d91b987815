"""Voice uploads over HTTP: validation of every bad case, persistence across a worker restart."""
import io

import numpy as np
import pytest
import requests
import soundfile as sf

from .support.worker import start_worker


def clip(seconds=3.0, rate=22050, fmt="WAV", amplitude=0.3):
    t = np.arange(int(rate * seconds)) / rate
    audio = (amplitude * np.sin(2 * np.pi * 160 * t) * (1 + 0.5 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, np.stack([audio, audio], axis=1), rate, format=fmt)  # stereo: the server mono-mixes
    return buf.getvalue()


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("voices-store")


@pytest.fixture(scope="module")
def worker(tmp_path_factory, voices_dir):
    env = {"VOICES_DIR": str(voices_dir), "VOICE_MAX_BYTES": str(1_500_000), "VOICE_MAX_SECONDS": "8"}
    with start_worker(tmp_path_factory.mktemp("vw"), env) as w:
        yield w


def upload(worker, data=None, name="Narrator", text="This is what the clip says.", filename="ref.wav", field="file"):
    """POST /v1/voices; a None name or text leaves that form field out."""
    files = {field: (filename, data if data is not None else clip(), "application/octet-stream")}
    form = {k: v for k, v in (("name", name), ("text", text)) if v is not None}
    return requests.post(f"{worker.url}/v1/voices", files=files, data=form)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG"])
def test_upload_list_get_delete(worker, fmt):
    r = upload(worker, clip(fmt=fmt), name=f"Voice {fmt}")
    assert r.status_code == 201, r.text
    voice = r.json()
    assert voice["id"].startswith("v_") and voice["name"] == f"Voice {fmt}"
    assert abs(voice["duration"] - 3.0) < 0.05 and voice["sample_rate"] == 44100
    listed = requests.get(f"{worker.url}/v1/voices").json()
    assert voice["id"] in [v["id"] for v in listed["voices"] if v["type"] == "uploaded"]
    assert {"joe", "joe-calm", "joe-lively"} <= {v["id"] for v in listed["voices"] if v["type"] == "preset"}
    assert requests.get(f"{worker.url}/v1/voices/{voice['id']}").json()["transcript"] == "This is what the clip says."
    assert requests.delete(f"{worker.url}/v1/voices/{voice['id']}").json() == {"id": voice["id"], "deleted": True}
    assert requests.get(f"{worker.url}/v1/voices/{voice['id']}").status_code == 404


def test_embedded_engine_says_it_cannot_clone(worker):
    voice = upload(worker).json()
    for path, body in (("/tts", {"text": "hi", "style": voice["id"]}),
                       ("/v1/audio/speech", {"input": "hi", "voice": voice["id"], "response_format": "wav"}),
                       ("/v1/audio/speech", {"input": "hi", "voice": voice["id"], "response_format": "pcm",
                                             "stream": True})):
        r = requests.post(f"{worker.url}{path}", json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "voice_not_supported", (path, r.text)
        assert "cannot clone" in r.json()["error"]["message"]
    assert requests.get(f"{worker.url}/info").json()["engine"]["supports_cloning"] is False
    assert requests.get(f"{worker.url}/v1/voices").json()["supports_cloning"] is False


BAD = [
    ("missing file", dict(field="other"), 400, "missing_file"),
    ("not audio", dict(data=b"this is not audio at all" * 100), 415, "unsupported_audio"),
    ("empty file", dict(data=b""), 400, "empty_file"),
    ("too short", dict(data=clip(seconds=1.0)), 400, "bad_duration"),
    ("too long", dict(data=clip(seconds=9.0, rate=8000)), 400, "bad_duration"),
    ("too large", dict(data=clip(seconds=7.9, rate=48000)), 413, "file_too_large"),
    ("silent", dict(data=clip(amplitude=0.0)), 400, "silent_audio"),
    ("no transcript field", dict(text=None), 400, "invalid_transcript"),
    ("empty transcript", dict(text=""), 400, "invalid_transcript"),
    ("blank transcript", dict(text="  \n "), 400, "invalid_transcript"),
    ("control chars in transcript", dict(text="bad\x00text"), 400, "invalid_transcript"),
    ("no name field", dict(name=None), 400, "invalid_name"),
    ("empty name", dict(name=""), 400, "invalid_name"),
    ("blank name", dict(name="   "), 400, "invalid_name"),
    ("name with a newline", dict(name="two\nlines"), 400, "invalid_name"),
    ("long name", dict(name="n" * 65), 400, "invalid_name"),
]


@pytest.mark.parametrize("name,kwargs,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_uploads(worker, name, kwargs, status, code):
    r = upload(worker, **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


@pytest.mark.parametrize("voice_id", ["nope", "v_0000000000000000", "..", "v_../../etc", "%2e%2e%2fetc"])
def test_unknown_or_path_like_ids_are_404(worker, voice_id):
    assert requests.get(f"{worker.url}/v1/voices/{voice_id}").status_code == 404
    assert requests.delete(f"{worker.url}/v1/voices/{voice_id}").status_code == 404


def test_names_never_become_paths(worker, voices_dir):
    r = upload(worker, name="../../evil")
    assert r.status_code == 201
    assert not (voices_dir.parent / "evil").exists()
    assert (voices_dir / r.json()["id"] / "audio.wav").exists()


def test_upload_far_over_the_request_limit_is_413(worker):
    # Bigger than the whole request may be (VOICE_MAX_BYTES + multipart allowance): refused before parsing.
    r = upload(worker, data=b"\0" * 3_000_000)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_voices_survive_a_restart(tmp_path):
    """Stop the worker, start a new one on the same VOICES_DIR: the voice is still there, usable by id."""
    store = tmp_path / "store"
    with start_worker(tmp_path / "first", {"VOICES_DIR": str(store)}) as first:
        kept = upload(first, name="Survivor").json()
        gone = upload(first, name="Deleted").json()
        assert requests.delete(f"{first.url}/v1/voices/{gone['id']}").status_code == 200
    with start_worker(tmp_path / "second", {"VOICES_DIR": str(store)}) as again:
        got = requests.get(f"{again.url}/v1/voices/{kept['id']}")
        assert got.status_code == 200 and got.json() == kept
        uploaded = [v["id"] for v in requests.get(f"{again.url}/v1/voices").json()["voices"] if v["type"] == "uploaded"]
        assert uploaded == [kept["id"]]
        assert requests.get(f"{again.url}/v1/voices/{gone['id']}").status_code == 404
    assert sorted(p.name for p in store.iterdir()) == [kept["id"]]  # no half-written or half-deleted voices


def test_concurrent_deletes_of_one_voice_one_wins_the_rest_404(worker):
    from concurrent.futures import ThreadPoolExecutor

    voice_id = upload(worker, name="Raced").json()["id"]
    with ThreadPoolExecutor(8) as pool:
        codes = sorted(pool.map(lambda _: requests.delete(f"{worker.url}/v1/voices/{voice_id}").status_code, range(8)))
    assert codes == [200] + [404] * 7
    assert requests.get(f"{worker.url}/v1/voices/{voice_id}").status_code == 404
