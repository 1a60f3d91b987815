"""scripts/run-stack.sh (what `make run` starts): it reports "up" only when the stack is ready."""
import os
import subprocess

from .support.procs import PYTHON, REPO_ROOT, free_port


def test_a_readiness_timeout_is_an_error_not_a_ready_message():
    # One second is shorter than the worker's start (engine load and warm-up): readiness times out.
    env = {**os.environ, "PY": PYTHON, "GATEWAY_PORT": str(free_port()), "WORKER_PORT": str(free_port()),
           "READY_TIMEOUT_S": "1", "NGINX_WORKER_PROCESSES": "1"}
    r = subprocess.run(["bash", "scripts/run-stack.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "VoxBox is up" not in r.stdout
    assert "not ready after 1s" in r.stderr
