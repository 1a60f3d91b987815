"""Several models in one worker (service/models.py, service/engines/registry.py): the MODELS setting, the
family of a checkpoint, memory shares, and a real worker serving two tiny VoxCPM checkpoints and the
embedded engine side by side, selected per request on every endpoint."""
import base64
import io
import json
import subprocess

import numpy as np
import pytest
import requests
import soundfile as sf
import websocket

from service.engines.registry import ModelConfigError, family_for
from service.models import ModelSpec, lay_out_memory, parse_models
from service.settings import Settings

from .support.procs import PYTHON, REPO_ROOT, free_port
from .support.voxcpm_checkpoint import build_checkpoint
from .support.worker import SLOW_APP, start_worker, ws_collect

TEXT = "Two models, one worker."


# -- the MODELS setting ---------------------------------------------------------------------------
def test_models_parse_from_json_or_a_file(tmp_path):
    specs = parse_models('[{"name": "a", "engine": "embedded"}, {"name": "b", "dir": "/m/b", "default": true, '
                         '"max_batch": 8, "memory_share": 2, "settings": {"cfg_value": 2.5}}]')
    assert [s.name for s in specs] == ["a", "b"] and [s.default for s in specs] == [False, True]
    assert specs[1].batch == "8" and specs[1].memory_share == 2 and specs[1].settings == {"cfg_value": 2.5}
    path = tmp_path / "models.json"
    path.write_text('[{"name": "only", "engine": "embedded"}]')
    [only] = parse_models(str(path))
    assert only.default  # the first entry is the default when none is marked


@pytest.mark.parametrize("raw, message", [
    ("[]", "non-empty JSON list"),
    ("{", "neither a JSON list nor a readable file"),
    ("[{\"name\": \"a\"}, {\"name\": \"a\"}]", "names a more than once"),
    ("[{\"name\": \"a\", \"default\": true}, {\"name\": \"b\", \"default\": true}]", "marks 2 models as default"),
    ("[{\"name\": \"tts-1\"}]", "reserved"),
    ("[{\"name\": \"a b\"}]", "entry 0: name"),
    ("[{\"name\": \"a\", \"max_batch\": 0}]", "max_batch must be auto or a positive integer"),
    ("[{\"name\": \"a\", \"colour\": \"red\"}]", "entry 0: colour: Extra inputs are not permitted"),
    ("[{\"name\": \"a\", \"memory_share\": 0}]", "memory_share"),
])
def test_bad_models_settings_say_what_is_wrong(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_models(raw)


def test_gpu_memory_is_shared_by_stated_shares_in_load_order():
    specs = [ModelSpec("a", memory_share=1), ModelSpec("fast", engine="embedded"), ModelSpec("b", memory_share=3),
             ModelSpec("c", device="cuda:1")]
    lay_out_memory(specs, "auto", {"a": True, "fast": False, "b": True, "c": True})
    # a loads first and takes 1/4 of what is free then; b takes all that is left of its device.
    assert [s.memory_fraction for s in specs] == [0.25, 1.0, 1.0, 1.0]


def test_the_thread_budget_counts_every_models_queue(monkeypatch):
    monkeypatch.setenv("MODELS", '[{"name": "a", "engine": "embedded"}, {"name": "b", "engine": "embedded"}]')
    s = Settings(gunicorn_threads=40, queue_size=4, ws_max_connections=4)
    assert s.batch_capacity == (40 - 2 * 4 - 4 - 4) // 2
    with pytest.raises(ValueError, match=r"2 x QUEUE_SIZE=5 .* shared by 2 models leaves -1 threads"):
        Settings(gunicorn_threads=16, queue_size=5, ws_max_connections=4).check()


# -- which family a checkpoint is -----------------------------------------------------------------
def _checkpoint_dir(tmp_path, config):
    d = tmp_path / "ck"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_a_checkpoint_says_its_family(tmp_path):
    d = _checkpoint_dir(tmp_path, {"architecture": "VoxCPM"})
    assert family_for(ModelSpec("m", dir=d)).name == "voxcpm"
    assert family_for(ModelSpec("m", engine="voxcpm", dir=d)).name == "voxcpm"
    assert family_for(ModelSpec("m", engine="embedded")).name == "embedded"
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "config.json").write_text(json.dumps({"architecture": "voxcpm2"}))
    assert family_for(ModelSpec("m", dir=v2)).name == "voxcpm2"


@pytest.mark.parametrize("config, spec, message", [
    ({"architecture": "voxcpm9"}, {}, "is a 'voxcpm9' model, which this worker cannot serve; served "
                                      r"architectures: voxcpm \(VoxCPM-0.5B / VoxCPM-1.5.*voxcpm2 \(VoxCPM2"),
    ({"lm_config": {}}, {}, r"does not say which model it is \(no \"architecture\"\)"),
    ({"architecture": "voxcpm"}, {"engine": "embedded"}, "engine 'embedded' cannot load the 'voxcpm' checkpoint"),
    ({"architecture": "voxcpm"}, {"engine": "piper"}, "unknown engine 'piper'; use one of voxcpm, voxcpm2, embedded"),
    ({"architecture": "voxcpm2"}, {"engine": "voxcpm"}, "engine 'voxcpm' cannot load the 'voxcpm2' checkpoint.*use "
                                                        "engine 'voxcpm2'"),
])
def test_a_checkpoint_of_another_family_is_refused(tmp_path, config, spec, message):
    d = _checkpoint_dir(tmp_path, config)
    with pytest.raises(ModelConfigError, match=message):
        family_for(ModelSpec("m", dir=d, **spec))


def test_no_checkpoint_for_a_family_that_needs_one():
    with pytest.raises(ModelConfigError, match="needs a checkpoint directory"):
        family_for(ModelSpec("m", engine="voxcpm"))


def test_the_worker_refuses_to_start_on_a_checkpoint_it_cannot_tell(tmp_path):
    """One readable line, before anything loads (gunicorn's config reads the settings)."""
    d = _checkpoint_dir(tmp_path, {"architecture": "voxcpm9"})
    env = {"TTS_ENGINE": "voxcpm", "MODEL_DIR": str(d), "BIND": f"127.0.0.1:{free_port()}", "PATH": "/usr/bin:/bin"}
    gunicorn = str(REPO_ROOT / ".venv" / "bin" / "gunicorn")
    r = subprocess.run([PYTHON, "-m", "gunicorn", "-c", str(REPO_ROOT / "service/gunicorn.conf.py"),
                        "service.app:create_app()"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    assert gunicorn and r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("voxbox: invalid settings: model 'voxcpm-1.5': the checkpoint at ")
    assert "is a 'voxcpm9' model" in lines[-1] and "Traceback" not in r.stderr


# -- one worker, three models ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    alpha = build_checkpoint(root / "alpha", size="tiny", seed=1)
    beta = build_checkpoint(root / "beta", size="tiny", seed=2)
    models = [{"name": "alpha", "dir": str(alpha), "settings": {"inference_timesteps": 2, "max_len": 16}},
              {"name": "beta", "dir": str(beta), "default": True,
               "settings": {"inference_timesteps": 3, "max_len": 20, "cfg_value": 2.5}},
              {"name": "en-fast", "engine": "embedded"}]
    env = {"MODELS": json.dumps(models), "TTS_DEVICE": "cpu", "QUEUE_SIZE": "2", "GUNICORN_THREADS": "24",
           "CROSSFADE_MS": "0"}
    with start_worker(root / "run", env) as w:
        yield w


def _audio_seconds(worker) -> dict:
    text = requests.get(f"{worker.url}/metrics").text
    out = {}
    for line in text.splitlines():
        if line.startswith("voxbox_audio_seconds_total{"):
            out[line.split('model="')[1].split('"')[0]] = float(line.split()[-1])
    return out


def _served_by(worker, call) -> set:
    """Which models made audio during `call` (their audio-seconds counters moved)."""
    before = _audio_seconds(worker)
    call()
    after = _audio_seconds(worker)
    return {m for m in after if after[m] > before.get(m, 0)}


def test_models_are_listed_in_openais_format(worker):
    body = requests.get(f"{worker.url}/v1/models").json()
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert list(by_id) == ["alpha", "beta", "en-fast"]
    assert {m["object"] for m in body["data"]} == {"model"} and {m["owned_by"] for m in body["data"]} == {"voxbox"}
    assert [by_id[m]["family"] for m in by_id] == ["voxcpm", "voxcpm", "embedded"]
    assert [by_id[m]["default"] for m in by_id] == [False, True, False]
    assert by_id["alpha"]["sample_rate"] == 44100 and by_id["en-fast"]["sample_rate"] == 22050
    assert by_id["alpha"]["supports_cloning"] and not by_id["en-fast"]["supports_cloning"]


def test_readyz_and_info_report_every_model(worker):
    ready = requests.get(f"{worker.url}/readyz").json()
    assert ready["status"] == "ready" and set(ready["models"]) == {"alpha", "beta", "en-fast"}
    assert all(m["phase"] == "ready" and m["startup"]["load_s"] >= 0 for m in ready["models"].values())
    info = requests.get(f"{worker.url}/info").json()
    assert info["engine"]["name"] == "voxcpm"  # the default model's
    details = {m["id"]: m for m in info["models"]}
    assert details["alpha"]["engine"]["inference_timesteps"] == 2 and details["beta"]["engine"]["cfg_value"] == 2.5
    # Models load one after another: each began after the one before it had finished.
    a, b = details["alpha"]["startup"], details["beta"]["startup"]
    assert b["started_at"] >= a["started_at"] + a["load_s"]


def test_each_endpoint_picks_the_named_model(worker):
    def tts(model):
        return requests.post(f"{worker.url}/tts", json={"text": TEXT, "seed": 5, **({"model": model} if model else {})})

    assert _served_by(worker, lambda: tts("alpha").raise_for_status()) == {"alpha"}
    assert _served_by(worker, lambda: tts(None).raise_for_status()) == {"beta"}  # the default
    assert _served_by(worker, lambda: tts("en-fast").raise_for_status()) == {"en-fast"}
    # Different checkpoints and settings, same seed: different audio; the same model twice: the same.
    a1, a2, b = (sf.read(io.BytesIO(base64.b64decode(tts(m).json()["audio_base64"])))[0]
                 for m in ("alpha", "alpha", "beta"))
    assert np.array_equal(a1, a2) and (a1.shape != b.shape or not np.allclose(a1, b))

    def speech(model):
        r = requests.post(f"{worker.url}/v1/audio/speech", json={"input": TEXT, "model": model,
                                                                 "response_format": "wav"})
        r.raise_for_status()

    assert _served_by(worker, lambda: speech("en-fast")) == {"en-fast"}
    assert _served_by(worker, lambda: speech("tts-1")) == {"beta"}  # OpenAI's names mean the default

    def stream(model):
        ws = websocket.create_connection(worker.ws_url, timeout=60)
        try:
            ws.send(json.dumps({"type": "synthesize", "text": TEXT, "model": model}))
            header, chunks, final = ws_collect(ws)
        finally:
            ws.close()
        assert header["type"] == "header" and chunks and final["type"] == "done", final

    assert _served_by(worker, lambda: stream("alpha")) == {"alpha"}


def test_an_unknown_model_is_a_400_naming_the_served_ones(worker):
    for path, body in (("/tts", {"text": TEXT}), ("/v1/audio/speech", {"input": TEXT})):
        r = requests.post(f"{worker.url}{path}", json={**body, "model": "gamma"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_model"
        assert "serves alpha, beta, en-fast" in r.json()["error"]["message"]
    ws = websocket.create_connection(worker.ws_url, timeout=30)
    try:
        ws.send(json.dumps({"type": "synthesize", "text": TEXT, "model": "gamma"}))
        err = json.loads(ws.recv())
    finally:
        ws.close()
    assert err["type"] == "error" and err["code"] == "unknown_model"


def test_metrics_are_per_model(worker):
    text = requests.get(f"{worker.url}/metrics").text
    for model in ("alpha", "beta", "en-fast"):
        assert f'voxbox_queue_depth{{model="{model}"}}' in text
        assert f'voxbox_startup_seconds{{model="{model}",phase="load"}}' in text


def _wav(seconds=2.5, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def test_voices_record_their_family_and_only_it_uses_them(worker):
    files = {"file": ("clip.wav", _wav(), "audio/wav")}
    r = requests.post(f"{worker.url}/v1/voices", data={"name": "Ann", "text": "A clip.", "model": "alpha"},
                      files=files)
    assert r.status_code == 201, r.text
    voice = r.json()
    assert voice["family"] == "voxcpm" and voice["sample_rate"] == 44100
    # Another model of the same family uses it; a model that cannot clone refuses it with a reason.
    ok = requests.post(f"{worker.url}/tts", json={"text": TEXT, "style": voice["id"], "model": "beta"})
    assert ok.status_code == 200, ok.text
    no = requests.post(f"{worker.url}/tts", json={"text": TEXT, "style": voice["id"], "model": "en-fast"})
    assert no.status_code == 400 and no.json()["error"]["code"] == "voice_not_supported"
    refused = requests.post(f"{worker.url}/v1/voices", data={"name": "Bo", "text": "A clip.", "model": "en-fast"},
                            files={"file": ("clip.wav", _wav(), "audio/wav")})
    assert refused.status_code == 400 and "field 'model': alpha, beta" in refused.json()["error"]["message"]
    unknown = requests.post(f"{worker.url}/v1/voices", data={"name": "Bo", "text": "A clip.", "model": "gamma"},
                            files={"file": ("clip.wav", _wav(), "audio/wav")})
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "unknown_model"


def test_a_voice_made_for_another_family_is_refused(tmp_path):
    """A voice on a shared volume made by a VoxCPM worker, used by a worker of another cloning family."""
    env = {"SLOW_CLONING": "1", "SLOW_STEPS": "2", "SLOW_STEP_S": "0.01"}
    with start_worker(tmp_path, env, app=SLOW_APP) as w:
        r = requests.post(f"{w.url}/v1/voices", data={"name": "Ann", "text": "A clip."},
                          files={"file": ("clip.wav", _wav(), "audio/wav")})
        assert r.status_code == 201 and r.json()["family"] == "slow-fake"
        voice_id = r.json()["id"]
        assert requests.post(f"{w.url}/tts", json={"text": TEXT, "style": voice_id}).status_code == 200
        meta = tmp_path / "voices" / voice_id / "voice.json"
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "family": "voxcpm"}))
        bad = requests.post(f"{w.url}/tts", json={"text": TEXT, "style": voice_id})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "voice_model_mismatch"
        assert "made for voxcpm models" in bad.json()["error"]["message"]
