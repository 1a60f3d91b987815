"""scripts/rollout.sh without a Docker engine: argument handling and the planned command sequence."""
import os
import subprocess

from .support.procs import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "rollout.sh"


def rollout(tmp_path, *args, env_text="VOXBOX_TAG=1.0.0\n", state=None):
    env_file = tmp_path / ".env"
    env_file.write_text(env_text)
    state_file = tmp_path / ".rollout-state"
    if state is not None:
        state_file.write_text(state)
    # COMPOSE=true: `docker compose ps` would need an engine; in a dry run it only lists old ids.
    env = {**os.environ, "ENV_FILE": str(env_file), "STATE_FILE": str(state_file), "COMPOSE": "true"}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=30)


def test_dry_run_plans_start_wait_switch_drain(tmp_path):
    r = rollout(tmp_path, "1.1.0", "--dry-run")
    assert r.returncode == 0, r.stderr
    # `mkdir -p secrets` shows up only where ./secrets does not exist yet
    steps = [line[2:] for line in r.stdout.splitlines() if line.startswith("+ ") and "mkdir" not in line]
    assert steps[0] == "true pull tts gateway"
    assert steps[1].startswith("remove tts containers that are not running")  # never reused as "the new one"
    # one more than the running workers (none in a dry run), so compose creates exactly one new container
    assert steps[2] == "true up --no-start --no-deps --no-recreate --scale tts=1 tts"
    # the gateway re-resolves `tts`: the new worker takes that name only once it is healthy
    assert steps[3].startswith("check the new tts container(s) run") and "without the name tts" in steps[3]
    assert steps[4] == "wait until their health status is healthy; then give them the name tts"
    reload = "true exec -T gateway sh /opt/voxbox-gateway/render.sh --reload"
    assert steps[5] == reload and steps[-3] == reload  # a reload in place, never `kill` (a "manual stop")
    assert steps[6] == "sleep 7"  # every gateway process has re-resolved the name before the old worker stops
    assert steps[7].startswith("docker stop --timeout 45 ") or steps[7] == reload
    assert steps[-2] == "true up -d --no-deps gateway"
    assert "record 1.0.0" in steps[-1] and "VOXBOX_TAG=1.1.0" in steps[-1]
    assert not any("kill" in s or "--time " in s for s in steps)
    assert (tmp_path / ".env").read_text() == "VOXBOX_TAG=1.0.0\n"  # a dry run changes nothing


def test_a_scaled_service_is_replaced_by_as_many_new_workers(tmp_path):
    """`up --scale tts=3`: three new workers start beside the three running, then the three old ones stop."""
    fake = tmp_path / "compose"
    # Lists three running tts containers (and none in any other state), like `docker compose ps` would.
    fake.write_text('#!/bin/sh\ncase "$*" in *"--status running tts"*) printf "aaa\\nbbb\\nccc\\n" ;; esac\n')
    fake.chmod(0o755)
    env_file = tmp_path / ".env"
    env_file.write_text("VOXBOX_TAG=1.0.0\n")
    env = {**os.environ, "ENV_FILE": str(env_file), "STATE_FILE": str(tmp_path / "state"), "COMPOSE": str(fake)}
    r = subprocess.run(["bash", str(SCRIPT), "1.1.0", "--dry-run"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    steps = [line[2:] for line in r.stdout.splitlines() if line.startswith("+ ")]
    assert f"{fake} up --no-start --no-deps --no-recreate --scale tts=6 tts" in steps
    stops = [s for s in steps if s.startswith("docker stop")]
    assert stops == [f"docker stop --timeout 45 {i}" for i in ("aaa", "bbb", "ccc")]
    assert steps.index("sleep 7") < steps.index(stops[0])
    # One at a time: the gateway forgets each stopped worker (reload) and its caches expire before the next.
    reload = f"{fake} exec -T gateway sh /opt/voxbox-gateway/render.sh --reload"
    for first, second in zip(stops, stops[1:]):
        between = steps[steps.index(first) + 1:steps.index(second)]
        assert between == [f"docker rm {first.split()[-1]}", reload, "sleep 7"], between


def test_compose_command_adds_the_cpu_file_without_an_nvidia_runtime(tmp_path):
    """No COMPOSE given: a host whose engine has no nvidia runtime gets compose.cpu.yaml too."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "docker"
    fake.write_text('#!/bin/sh\n[ "$1" = info ] && echo \'{"runc":{"path":"runc"}}\'; exit 0\n')
    fake.chmod(0o755)
    env_file = tmp_path / ".env"
    env_file.write_text("VOXBOX_TAG=1.0.0\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ENV_FILE": str(env_file),
           "STATE_FILE": str(tmp_path / "state")}
    env.pop("COMPOSE", None)
    env.pop("COMPOSE_FILE", None)
    r = subprocess.run(["bash", str(SCRIPT), "1.1.0", "--dry-run"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "+ docker compose -f compose.yaml -f compose.cpu.yaml pull tts gateway" in r.stdout
    fake.write_text('#!/bin/sh\n[ "$1" = info ] && echo \'{"nvidia":{"path":"nvidia-container-runtime"}}\'; exit 0\n')
    r = subprocess.run(["bash", str(SCRIPT), "1.1.0", "--dry-run"], env=env, capture_output=True, text=True, timeout=30)
    assert "+ docker compose pull tts gateway" in r.stdout


def test_rollback_uses_the_recorded_tag(tmp_path):
    r = rollout(tmp_path, "rollback", "--dry-run", env_text="VOXBOX_TAG=1.1.0\n", state="1.0.0")
    assert r.returncode == 0 and "rolling back to 1.0.0" in r.stdout


def test_rollback_without_state_fails_clearly(tmp_path):
    r = rollout(tmp_path, "rollback", "--dry-run")
    assert r.returncode == 1 and "nothing to roll back to" in r.stderr


def test_invalid_tag_and_usage(tmp_path):
    r = rollout(tmp_path, "bad tag;rm", "--dry-run")
    assert r.returncode == 2 and "not a valid image tag" in r.stderr
    assert rollout(tmp_path).returncode == 2


def test_same_tag_is_a_no_op(tmp_path):
    r = rollout(tmp_path, "1.0.0", "--dry-run")
    assert r.returncode == 0 and "already running" in r.stdout
