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
    return subprocess.run(["bash", str(SCRIPT), *args], check=False, env=env, capture_output=True, text=True, timeout=30)


def test_dry_run_plans_start_wait_switch_drain(tmp_path):
    r = rollout(tmp_path, "1.1.0", "--dry-run")
    assert r.returncode == 0, r.stderr
    steps = [line[2:] for line in r.stdout.splitlines() if line.startswith("+ ")]
    assert steps[0] == "true pull tts gateway"
    assert steps[1] == "true up -d --no-deps --no-recreate --scale tts=2 tts"
    assert steps[2].startswith("wait until the new tts container")
    # Not `kill -s HUP`: a signalled container is no longer restarted after a reboot (moby#41302).
    assert steps[3] == "true exec -T gateway sh /opt/voxbox-gateway/render.sh --reload"
    assert not [step for step in steps if "kill" in step]
    assert "--scale tts=1" in steps[-4] and "record 1.0.0" in steps[-1] and "VOXBOX_TAG=1.1.0" in steps[-1]
    assert (tmp_path / ".env").read_text() == "VOXBOX_TAG=1.0.0\n"  # a dry run changes nothing


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
