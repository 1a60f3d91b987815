"""Bad operator input on the ops surface: nginx/render.sh, python -m bootstrap, scripts/rollout.sh.

The rule: a bad setting or bad operator input gets one clear line saying what is wrong (exit status
non-zero), never a traceback, never a half-working service, never lost data. Each test below is a
regression test for a bug found by an exploratory pass; most accept any reasonable fix (refuse with a
clear line, or make the input work correctly).
"""
import json
import os
import subprocess
import uuid

import pytest
import requests

pytest.register_assert_rewrite("tests.support.s3")  # before the import below

from .support.gateway import RENDER, render, render_env, start_gateway
from .support.procs import REPO_ROOT, free_port
from .support.s3 import bootstrap_env, make_model, run_bootstrap

pytest_plugins = ["tests.support.s3"]

KEY = "vbx_AbCdEfGhIjKlMnOpQrStUvWxYz0123"
USERS = "u:p"


# -- helpers --------------------------------------------------------------------------------------
def _gateway_refused(r, variable: str) -> None:
    """render.sh refused: non-zero, and its last stderr line is its own, naming the variable."""
    assert r.returncode != 0, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("gateway: ") and variable in last, r.stderr


def _dead_upstream() -> str:
    # Authenticated requests then get the gateway's 503 JSON, unauthenticated ones its 401.
    return f"127.0.0.1:{free_port()}"


def _fatal(r) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("bootstrap: fatal: "), r.stderr[-2000:]
    assert sum(line.startswith("bootstrap: fatal: ") for line in lines) == 1
    return lines[-1]


# == gateway: nginx/render.sh ======================================================================
@pytest.mark.parametrize("password", ["-salt", "x" * 300], ids=["leading-dash", "over-256-chars"])
def test_every_configured_basic_auth_user_can_log_in_or_render_refuses(tmp_path, password):
    # Bug: `openssl passwd -apr1 "$pass"` takes "-salt" as an option (and fails, unchecked) so the
    # htpasswd line is "u:" with no hash; passwords over 256 characters are silently truncated. In
    # both cases render succeeds and the user can never log in.
    users = f"u:{password}"
    r = render(tmp_path / "ngx", "127.0.0.1:9", free_port(), {"BASIC_AUTH_USERS": users})
    if r.returncode != 0:
        _gateway_refused(r, "BASIC_AUTH_USERS")
        return
    line = (tmp_path / "ngx" / "generated" / "htpasswd").read_text().strip()
    assert line.startswith("u:$apr1$"), line
    with start_gateway(tmp_path / "gw", _dead_upstream(), {"BASIC_AUTH_USERS": users}) as gw:
        assert requests.get(f"{gw.url}/info", auth=("u", password), timeout=10).status_code != 401


def test_api_keys_are_case_sensitive(tmp_path):
    # Bug: nginx `map` matches strings case-insensitively, so "Bearer <KEY with its case flipped>"
    # is accepted: every key is far weaker than its length suggests.
    with start_gateway(tmp_path, _dead_upstream(), {"API_KEYS": KEY}) as gw:
        assert requests.get(f"{gw.url}/info", headers={"Authorization": f"Bearer {KEY}"}).status_code == 503
        for variant in (KEY.swapcase(), KEY.lower(), KEY.upper()):
            r = requests.get(f"{gw.url}/info", headers={"Authorization": f"Bearer {variant}"})
            assert r.status_code == 401, variant


def test_api_key_with_embedded_newline_is_refused_or_both_keys_work(tmp_path):
    # Bug: the key check greps line by line, so "key1\nkey2" passes as ONE key; render says
    # "1 API key(s)" and neither key works.
    k1, k2 = "vbx_first_key_0123456789", "vbx_second_key_0123456789"
    env = {"API_KEYS": f"{k1}\n{k2}"}
    r = render(tmp_path / "ngx", "127.0.0.1:9", free_port(), env)
    if r.returncode != 0:
        _gateway_refused(r, "API key")
        return
    with start_gateway(tmp_path / "gw", _dead_upstream(), env) as gw:
        for k in (k1, k2):
            assert requests.get(f"{gw.url}/info", headers={"Authorization": f"Bearer {k}"}).status_code == 503, k


def test_duplicate_api_keys_do_not_break_nginx(tmp_path):
    # Bug: a key listed twice (API_KEYS and API_KEYS_FILE, say) renders fine, then nginx dies with
    # `[emerg] conflicting parameter "bearer …"` (echoing the key itself) in a generated file.
    keys_file = tmp_path / "keys"
    keys_file.write_text(KEY + "\n")
    r = render(tmp_path / "ngx", "127.0.0.1:9", free_port(), {"API_KEYS": KEY, "API_KEYS_FILE": str(keys_file)},
               mode="--test")
    if r.returncode != 0:
        _gateway_refused(r, "API")
    else:
        assert "test is successful" in r.stderr


@pytest.mark.parametrize("variable,value", [
    ("RATE_LIMIT_RPS", "abc"), ("RATE_LIMIT_RPS", "0"), ("RATE_LIMIT_BURST", "x"),
    ("MAX_STREAMS_PER_CLIENT", "many"), ("MAX_JSON_BODY", "lots"), ("MAX_UPLOAD_BODY", "1m; include /etc/passwd"),
    ("PROXY_READ_TIMEOUT", "forever"), ("ALLOW_CIDRS", "10.0.0.0/33"), ("ALLOW_CIDRS", "abc"),
])
def test_bad_numeric_and_cidr_settings_are_refused_at_render_naming_the_variable(tmp_path, variable, value):
    # Bug: render.sh substitutes these unchecked (`--render-only` exits 0, "gateway: rendered …");
    # nginx then fails with `[emerg] invalid rate "rate=abcr/s" in …/conf.d/voxbox.conf:42`,
    # which names neither the setting nor the fix (and ';' injects directives).
    r = render(tmp_path / "ngx", "127.0.0.1:9", free_port(), {"BASIC_AUTH_USERS": USERS, variable: value})
    _gateway_refused(r, variable)


def test_allow_cidrs_is_not_glob_expanded(tmp_path):
    # Bug: `for cidr in $(echo "$ALLOW_CIDRS" | tr …)` is unquoted: "*" expands to the file names
    # in the working directory and the error names a file, not what the operator wrote.
    (tmp_path / "some-file").write_text("")
    env = {**os.environ, **render_env(tmp_path / "ngx", "127.0.0.1:9", free_port(),
                                      {"BASIC_AUTH_USERS": USERS, "ALLOW_CIDRS": "*"})}
    r = subprocess.run(["sh", str(RENDER), "--render-only"], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    _gateway_refused(r, "ALLOW_CIDRS")
    assert "some-file" not in r.stderr and "'*'" in r.stderr


def test_tls_paths_with_spaces_work(tmp_path):
    # Bug: listen.conf writes `ssl_certificate $TLS_CERT;` unquoted: a readable certificate at a
    # path with a space passes render's check and then nginx fails "invalid number of arguments".
    d = tmp_path / "my certs"
    d.mkdir()
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    r = render(tmp_path / "ngx", "127.0.0.1:9", free_port(),
               {"BASIC_AUTH_USERS": USERS, "TLS_CERT": str(cert), "TLS_KEY": str(key)}, mode="--test")
    if r.returncode != 0:
        _gateway_refused(r, "TLS_CERT")
    else:
        assert "test is successful" in r.stderr


# == bootstrap: bad manifests ======================================================================
def _bucket_with(s3_server, manifest, objects: dict | None = None) -> str:
    bucket = f"bad-{uuid.uuid4().hex[:10]}"
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)
    for key, body in (objects or {}).items():
        client.put_object(Bucket=bucket, Key=f"m/{key}", Body=body)
    raw = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    client.put_object(Bucket=bucket, Key="m/manifest.json", Body=raw)
    return f"s3://{bucket}/m/"


def _entry(path: str, data: bytes = b"weights\n", size: int | None = None) -> dict:
    import hashlib

    return {"path": path, "size": len(data) if size is None else size, "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("files,objects", [
    ([_entry("a.bin"), _entry("a.bin")], {"a.bin": b"weights\n"}),
    ([_entry("a"), _entry("a/b")], {"a": b"weights\n", "a/b": b"weights\n"}),
    ([_entry("a\x00b")], {}),
], ids=["duplicate-path", "file-and-dir-same-name", "nul-byte"])
def test_malformed_manifest_paths_are_one_line_fatal(s3_server, tmp_path, files, objects):
    # Bug: duplicate paths -> FileNotFoundError traceback in _promote; "a" and "a/b" ->
    # IsADirectoryError traceback; a NUL byte -> ValueError traceback (status stuck at "downloading").
    uri = _bucket_with(s3_server, {"name": "x", "version": "1", "files": files}, objects)
    models = tmp_path / "m"
    line = _fatal(run_bootstrap(bootstrap_env(s3_server, models, uri, PULL_RETRIES=1), "pull"))
    assert "manifest" in line
    assert not (models / "current").exists()
    assert json.loads((models / ".voxbox" / "status.json").read_text())["phase"] == "failed"


def test_negative_size_in_manifest_is_refused_as_such(s3_server, tmp_path):
    # Bug: accepted, downloaded, then reported as "checksum mismatch … differ from its manifest.json"
    # (progress shows "-0.0 MB (600%)"); the manifest itself is what is wrong.
    uri = _bucket_with(s3_server, {"files": [_entry("a.bin", size=-5)]}, {"a.bin": b"weights\n"})
    line = _fatal(run_bootstrap(bootstrap_env(s3_server, tmp_path / "m", uri, PULL_RETRIES=1), "pull"))
    assert "size" in line and "manifest" in line


def test_manifest_with_no_files_never_replaces_a_good_model(s3_server, published, tmp_path):
    # Bug: {"files": []} is accepted: `current` switches to an empty version and, with
    # KEEP_VERSIONS=1, the good model that was serving is pruned (deleted).
    good_uri, _ = published
    models = tmp_path / "m"
    ok = run_bootstrap(bootstrap_env(s3_server, models, good_uri), "pull")
    assert ok.returncode == 0, ok.stderr
    good = (models / "current").resolve()
    empty_uri = _bucket_with(s3_server, {"name": "x", "version": "2", "files": []})
    line = _fatal(run_bootstrap(bootstrap_env(s3_server, models, empty_uri, KEEP_VERSIONS=1), "pull"))
    assert "no files" in line or "empty" in line
    assert (models / "current").resolve() == good and (good / "model.safetensors").exists()


# == bootstrap: bad settings and unreachable stores ================================================
@pytest.mark.parametrize("extra", [
    {"S3_ENDPOINT_URL": "UNREACHABLE"},
    {"S3_ENDPOINT_URL": "not-a-url"},
    {"S3_REGION": "bad region"},
    {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
     "AWS_CONFIG_FILE": "/nonexistent"},
], ids=["unreachable-endpoint", "endpoint-not-a-url", "bad-region", "no-credentials"])
def test_store_misconfiguration_is_one_line_fatal(s3_server, tmp_path, extra):
    # Bug: _fetch_manifest catches ClientError only: EndpointConnectionError, NoCredentialsError
    # (which explain() even has a message for), ValueError("Invalid endpoint") and
    # InvalidRegionError all escape as tracebacks.
    extra = dict(extra)
    if extra.get("S3_ENDPOINT_URL") == "UNREACHABLE":
        extra["S3_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    env = {**bootstrap_env(s3_server, tmp_path / "m", "s3://some-bucket/m/", PULL_RETRIES=1), **extra}
    line = _fatal(run_bootstrap(env, "pull", timeout=120))
    if "AWS_ACCESS_KEY_ID" in extra:
        assert "no S3 credentials" in line


def test_models_dir_that_is_a_file_is_one_line_fatal(s3_server, published, tmp_path):
    # Bug: NotADirectoryError traceback from the lock's mkdir.
    uri, _ = published
    not_a_dir = tmp_path / "models"
    not_a_dir.write_text("oops")
    line = _fatal(run_bootstrap(bootstrap_env(s3_server, not_a_dir, uri), "pull"))
    assert "MODELS_DIR" in line
    assert not_a_dir.read_text() == "oops"


# == bootstrap publish ==============================================================================
def _publish_src(s3_server, tmp_path):
    bucket = f"pub-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=bucket)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    return bucket, src


def test_publish_includes_a_symlinked_directory_or_refuses(s3_server, tmp_path):
    # Bug: a symlinked sub-directory (tokenizer -> ../shared/tokenizer) is skipped without a word
    # (Path.rglob does not follow directory links): publish exits 0 with an incomplete model.
    bucket, src = _publish_src(s3_server, tmp_path)
    shared = make_model(tmp_path / "shared")
    (src / "tokenizer").symlink_to(shared / "tokenizer")
    r = run_bootstrap(s3_server.env(), "publish", str(src), f"s3://{bucket}/linked/")
    if r.returncode != 0:
        assert "tokenizer" in _fatal(r)
        return
    manifest = json.loads(s3_server.client().get_object(Bucket=bucket, Key="linked/manifest.json")["Body"].read())
    assert "tokenizer/nested/tokenizer.json" in {f["path"] for f in manifest["files"]}


def test_publish_refuses_a_dangling_symlink(s3_server, tmp_path):
    # Bug: a dangling symlink (an HF snapshot whose blob is missing) is skipped without a word:
    # publish exits 0 and the model is published without that file.
    bucket, src = _publish_src(s3_server, tmp_path)
    (src / "model.safetensors").symlink_to(tmp_path / "missing-blob")
    line = _fatal(run_bootstrap(s3_server.env(), "publish", str(src), f"s3://{bucket}/dangling/"))
    assert "model.safetensors" in line


# == scripts/rollout.sh ============================================================================
SCRIPT = REPO_ROOT / "scripts" / "rollout.sh"


def _rollout(tmp_path, *args, env_text=None, state=None, fake_docker=False):
    env_file, state_file = tmp_path / ".env", tmp_path / ".rollout-state"
    if env_text is not None:
        env_file.write_bytes(env_text.encode())
    if state is not None:
        state_file.write_text(state)
    env = {**os.environ, "ENV_FILE": str(env_file), "STATE_FILE": str(state_file), "COMPOSE": "true"}
    if fake_docker:
        # A docker/compose stand-in: one running old worker, a second one created by --scale tts=2 on
        # the image compose names, always healthy; every other command succeeds.
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        ids = tmp_path / "ids"
        ids.write_text("old1\n")
        (bin_dir / "compose").write_text(
            f'#!/bin/sh\ncase "$*" in\n "ps -q -a --status running tts"|"ps -q -a tts") cat {ids} ;;\n'
            f' "config --images tts") echo ghcr.io/voxbox/voxbox-worker:new ;;\n'
            f' *"--scale tts=2"*) echo new1 >> {ids} ;;\nesac\n')
        (bin_dir / "docker").write_text(
            '#!/bin/sh\ncase "$*" in\n *.Config.Image*) echo ghcr.io/voxbox/voxbox-worker:new ;;\n'
            ' *.State.Health.Status*) echo healthy ;;\n *.NetworkSettings.Networks*) echo voxbox_default ;;\nesac\n'
            'exit 0\n')
        for f in bin_dir.iterdir():
            f.chmod(0o755)
        env.update(COMPOSE=str(bin_dir / "compose"), PATH=f"{bin_dir}:{env['PATH']}", HEALTH_TIMEOUT_S="5",
                   SWITCH_WAIT_S="0")
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=30)


def test_rollout_never_corrupts_an_env_without_a_final_newline(tmp_path):
    # Bug: `echo "VOXBOX_TAG=…" >> .env` glues the tag onto the last line when .env does not end in
    # a newline: "BASIC_AUTH_USERS=alice:pwVOXBOX_TAG=1.1.0" (the password silently changes).
    r = _rollout(tmp_path, "1.1.0", env_text="REGISTRY=ghcr.io/voxbox\nBASIC_AUTH_USERS=alice:pw", fake_docker=True)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = (tmp_path / ".env").read_text().splitlines()
    assert "BASIC_AUTH_USERS=alice:pw" in lines and "VOXBOX_TAG=1.1.0" in lines, lines


@pytest.mark.parametrize("env_text", ['VOXBOX_TAG="1.0.0"\n', "VOXBOX_TAG='1.0.0'\n", "VOXBOX_TAG=1.0.0\r\n",
                                      "VOXBOX_TAG=1.0.0 # pinned\n"],
                         ids=["double-quoted", "single-quoted", "crlf", "inline-comment"])
def test_rollback_works_after_a_rollout_from_any_valid_env_syntax(tmp_path, env_text):
    # Bug: current_tag() takes everything after "=" verbatim, so the previous tag is recorded as
    # '"1.0.0"', "1.0.0\r" or "1.0.0 # pinned", and `rollout.sh rollback` then refuses it
    # ("is not a valid image tag"): no way back.
    r = _rollout(tmp_path, "1.1.0", env_text=env_text, fake_docker=True)
    assert r.returncode == 0, r.stdout + r.stderr
    back = _rollout(tmp_path, "rollback", "--dry-run")
    assert back.returncode == 0 and "rolling back to 1.0.0" in back.stdout, back.stdout + back.stderr


def test_tag_with_a_newline_is_refused(tmp_path):
    # Bug: the tag check greps line by line, so "1.1.0\nx" passes; a real rollout then fails its
    # sed ("unterminated `s' command"), leaves .env alone, and still exits 0 "now serving 1.1.0\nx".
    r = _rollout(tmp_path, "1.1.0\nx", "--dry-run", env_text="VOXBOX_TAG=1.0.0\n")
    assert r.returncode == 2 and "not a valid image tag" in r.stderr, r.stdout + r.stderr
    r = _rollout(tmp_path, "1.1.0\nx", env_text="VOXBOX_TAG=1.0.0\n", fake_docker=True)
    assert r.returncode != 0 and (tmp_path / ".env").read_text() == "VOXBOX_TAG=1.0.0\n"


def test_rollback_with_a_corrupt_state_file_is_refused(tmp_path):
    r = _rollout(tmp_path, "rollback", "--dry-run", env_text="VOXBOX_TAG=1.1.0\n", state="1.0.0\n0.9.0\n")
    assert r.returncode != 0 and "rollout:" in r.stderr, r.stdout + r.stderr


def test_duplicate_users_and_a_directory_as_auth_file_are_refused(tmp_path):
    r = render(tmp_path / "a", "127.0.0.1:9", free_port(), {"BASIC_AUTH_USERS": "u:a,u:b"})
    _gateway_refused(r, "BASIC_AUTH_USERS")
    r = render(tmp_path / "b", "127.0.0.1:9", free_port(), {"BASIC_AUTH_USERS": "u:a, bob:b"})  # " bob"
    _gateway_refused(r, "BASIC_AUTH_USERS")
    r = render(tmp_path / "c", "127.0.0.1:9", free_port(), {"API_KEYS": KEY, "BASIC_AUTH_FILE": str(tmp_path)})
    _gateway_refused(r, "BASIC_AUTH_FILE")


@pytest.mark.parametrize("path", ["manifest.json", "model.bin.part"])
def test_manifest_paths_the_puller_reserves_are_refused(s3_server, tmp_path, path):
    uri = _bucket_with(s3_server, {"name": "x", "version": "1", "files": [_entry(path)]}, {path: b"weights\n"})
    assert "reserves" in _fatal(run_bootstrap(bootstrap_env(s3_server, tmp_path / "m", uri, PULL_RETRIES=1), "pull"))


def test_rollout_without_an_env_file_is_refused(tmp_path):
    r = _rollout(tmp_path, "1.1.0", "--dry-run")
    assert r.returncode == 1 and "cp .env.example .env" in r.stderr, r.stdout + r.stderr
    assert not (tmp_path / ".env").exists()
