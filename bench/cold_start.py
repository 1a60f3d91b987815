"""Time from process start to ready, cold vs warm, side by side in one run, of the real entrypoint.

COLD: `python -m bootstrap run` on an empty MODELS_DIR volume: list, check, download and verify the
published model, exec gunicorn, load the model, run the warm-up synthesis. WARM: the same command on
the same volume again, where the verified version is already there. t0 is taken at Popen; the start
is ready at the first 200 from /readyz, whose body then tells where the time went: `bootstrap.timings`
(the pull's phases, from the status file) and `startup` (the worker's load and warm-up). The rest is
process start-up and imports, split by the wall-clock `started_at` stamps into before the pull
(interpreter, bootstrap and boto3 imports) and the hand-off (GPU sizing, exec of gunicorn, the worker's
imports and app set-up).

Set-up, all on loopback: SeaweedFS, a random-weight VoxCPM-1.5 checkpoint (tests/support/voxcpm_checkpoint.py)
published with `python -m bootstrap publish`. The warm-up generates exactly --warmup-tokens tokens
(VOXCPM_FIXED_TOKENS), about the length of the real warm-up sentence, as random weights stop at random.
Before timing, one untimed process imports the worker's code, so both starts find it in the page cache
and the comparison is about the volume. Each start runs --repeat times (cold, warm, cold, warm, ...,
each cold on a fresh volume); the median of every row is reported.

Usage: python bench/cold_start.py [--size tiny|full | --model-dir DIR] [--repeat 1] [--warmup-tokens 13]
       [--device auto] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.procs import PYTHON, REPO_ROOT, free_port, running, wait_until  # noqa: E402
from tests.support.s3 import S3Server, seaweedfs  # noqa: E402

PULL_PHASES = ("list_s", "check_s", "wait_s", "download_s", "verify_s")
WORKER_STEPS = ("load_s", "warmup_s", "batch_alloc_s", "batch_warmup_s")


def _run(cmd: list[str], env: dict | None = None, what: str = "") -> str:
    r = subprocess.run(cmd, env={**os.environ, **(env or {})}, cwd=REPO_ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"cold_start: {what or cmd[0]} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def prepare_model(args, tmp: Path) -> Path:
    if args.model_dir:
        return Path(args.model_dir).resolve()
    out = tmp / f"ckpt-{args.size}"
    # A separate process, so this one does not hold a copy of the weights while the workers run.
    print(_run([PYTHON, "-m", "tests.support.voxcpm_checkpoint", str(out), "--size", args.size],
               what="building the checkpoint").strip(), flush=True)
    return out


def publish(s3: S3Server, model: Path) -> str:
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    s3.client().create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/voxcpm-1.5/v1/"
    print(_run([PYTHON, "-m", "bootstrap", "publish", str(model), uri, "--name", "voxcpm-bench", "--version", "v1"],
               s3.env(), "publishing the checkpoint").strip(), flush=True)
    return uri


def start(s3: S3Server, uri: str, models: Path, tmp: Path, args, label: str) -> dict:
    """One start of `python -m bootstrap run`: seconds from Popen to the first 200 on /readyz, and its body."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**s3.env(), "MODEL_URI": uri, "MODELS_DIR": str(models), "STATUS_FILE": str(models / "status.json"),
           "TTS_ENGINE": "voxcpm", "TTS_DEVICE": args.device, "BIND": f"127.0.0.1:{port}",
           "VOICES_DIR": str(tmp / "voices"), "VOXCPM_FIXED_TOKENS": str(args.warmup_tokens),
           "PATH": f"{Path(PYTHON).parent}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1", "LOG_LEVEL": "info"}
    seen: dict = {}

    def ready() -> bool:
        r = requests.get(f"{url}/readyz", timeout=2)
        if r.status_code == 200:
            seen.update(at=time.monotonic(), body=r.json())
            return True
        return False

    log = tmp / f"{label}-{port}.log"
    t0_wall, t0 = time.time(), time.monotonic()
    with running([PYTHON, "-m", "bootstrap", "run"], log, env=env) as proc:
        wait_until(ready, args.start_timeout, f"{label} start", proc, log, interval=0.02)
    return {"t0_wall": t0_wall, "total_s": seen["at"] - t0, "readyz": seen["body"], "log": str(log)}


def breakdown(run: dict) -> dict:
    """Seconds per row of the table, from one start's /readyz body."""
    boot, startup = run["readyz"]["bootstrap"], run["readyz"]["startup"]
    t = boot["timings"]
    row = {"total_s": run["total_s"], "pull_s": t["total_s"], **{f"pull.{k}": t[k] for k in PULL_PHASES},
           **{k: startup.get(k, 0.0) for k in WORKER_STEPS}}
    row["other_s"] = row["total_s"] - row["pull_s"] - sum(row[k] for k in WORKER_STEPS)
    pull_end = boot["started_at"] + t["total_s"]
    row["other.before_pull_s"] = boot["started_at"] - run["t0_wall"]
    row["other.handoff_s"] = startup["started_at"] - pull_end
    row["other.after_ready_s"] = row["other_s"] - row["other.before_pull_s"] - row["other.handoff_s"]
    return row


ROWS = [
    ("total_s", "**total: Popen to /readyz 200**"),
    ("pull_s", "pull (bootstrap, whole)"),
    ("pull.list_s", "↳ list (S3 client, manifest)"),
    ("pull.check_s", "↳ check (files already on the volume)"),
    ("pull.wait_s", "↳ wait (another replica's pull)"),
    ("pull.download_s", "↳ download (sha256 as bytes arrive)"),
    ("pull.verify_s", "↳ verify (final hashing, checks, fsync)"),
    ("other_s", "process start + imports (the remainder)"),
    ("other.before_pull_s", "↳ before the pull: interpreter, bootstrap imports"),
    ("other.handoff_s", "↳ hand-off: GPU sizing, exec gunicorn, worker imports, app"),
    ("other.after_ready_s", "↳ after warm-up: until /readyz answers 200"),
    ("load_s", "model load"),
    ("warmup_s", "warm-up synthesis"),
    ("batch_alloc_s", "batch allocation"),
    ("batch_warmup_s", "batched warm-up (continuous batching only)"),
]


def table(cold: dict, warm: dict) -> str:
    lines = ["| phase | cold (s) | warm (s) | cold / warm |", "|---|---|---|---|"]
    for key, name in ROWS:
        c, w = cold[key], warm[key]
        ratio = f"{c / w:.2f}x" if w >= 0.005 else "-"
        lines.append(f"| {name} | {c:.3f} | {w:.3f} | {ratio} |")
    return "\n".join(lines)


def median_rows(rows: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["tiny", "full"], default="tiny", help="random checkpoint to build")
    ap.add_argument("--model-dir", help="publish this checkpoint directory instead of building one")
    ap.add_argument("--repeat", type=int, default=1, help="cold+warm pairs; the median of each row is shown")
    ap.add_argument("--warmup-tokens", type=int, default=13,
                    help="tokens the warm-up generates (13 x 160 ms ~ the warm-up sentence spoken)")
    ap.add_argument("--device", default="auto", help="TTS_DEVICE for the worker")
    ap.add_argument("--start-timeout", type=float, default=1800, help="seconds one start may take")
    ap.add_argument("--json", help="write every start's numbers and /readyz body here")
    args = ap.parse_args()

    runs: dict[str, list] = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="voxbox-cold-start-") as tmp_s:
        tmp = Path(tmp_s)
        model = prepare_model(args, tmp)
        size_mb = sum(p.stat().st_size for p in model.rglob("*") if p.is_file()) / 1e6
        with seaweedfs(tmp / "s3") as s3:
            uri = publish(s3, model)
            # Untimed: read the worker's code into the page cache, so neither start pays for it alone.
            _run([PYTHON, "-c", "import torch, voxcpm.model.voxcpm, boto3, bootstrap.puller, service.app"],
                 what="priming imports")
            for i in range(args.repeat):
                volume = tmp / f"volume-{i}"  # empty: the cold start pulls everything
                for label in ("cold", "warm"):
                    run = start(s3, uri, volume, tmp, args, f"{label}-{i}")
                    warm = run["readyz"]["bootstrap"].get("warm")
                    if warm is not (label == "warm"):
                        sys.exit(f"cold_start: the {label} start reported warm={warm}; see {run['log']}")
                    run["rows"] = breakdown(run)
                    runs[label].append(run)
                    print(f"{label} start {i + 1}/{args.repeat}: ready in {run['total_s']:.2f}s", flush=True)

    cold, warm = median_rows([r["rows"] for r in runs["cold"]]), median_rows([r["rows"] for r in runs["warm"]])
    info = runs["cold"][0]["readyz"]
    print(f"\nmodel: {model.name} ({size_mb:.0f} MB, {info['bootstrap']['model']}), loopback SeaweedFS, "
          f"{os.cpu_count()} CPU cores, TTS_DEVICE={args.device}, warm-up {args.warmup_tokens} tokens, "
          f"{'median of ' + str(args.repeat) if args.repeat > 1 else 'one run'} per start\n")
    print(table(cold, warm))
    print(f"\ncold / warm, time to ready: {cold['total_s'] / warm['total_s']:.2f}x "
          f"({cold['total_s'] - warm['total_s']:.2f}s more for the cold start)")
    print("(the warm start's model load reads weights the cold start just wrote, from the page cache; "
          "after a reboot it would read them from disk)")
    if args.repeat > 1:
        for label in ("cold", "warm"):
            print(f"{label} runs (s):", " ".join(f"{r['total_s']:.2f}" for r in runs[label]))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "cpu_count": os.cpu_count(), "model_mb": size_mb,
            "median": {"cold": cold, "warm": warm},
            "runs": {k: [{kk: vv for kk, vv in r.items() if kk != "log"} for r in v] for k, v in runs.items()},
        }, indent=2))


if __name__ == "__main__":
    main()
