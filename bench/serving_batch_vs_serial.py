"""The service under load, side by side in one run: requests serialised (TTS_MAX_BATCH=1) vs
continuous batching (TTS_MAX_BATCH=N), same model, same texts, same seeds, same fixed length.

Starts the real worker (gunicorn + service.app) twice on a VoxCPM checkpoint (its architecture, voxcpm or
voxcpm2, picks the engine), drives each with
bench/tts_load.py's levels over HTTP streaming (or --ws), and prints both tables and, per
concurrency level, the batched/serial ratio of audio-seconds per wall-second and of p95 TTFA.
Every sentence chunk generates exactly --fixed-tokens tokens (VOXCPM_FIXED_TOKENS), so random
weights do the work of real speech of that length.

Usage: python bench/serving_batch_vs_serial.py --model-dir DIR [--batch 8] [--levels 1,4,16,64]
       [--requests-per-level 32] [--fixed-tokens 32] [--device auto] [--json out.json]
       (python -m tests.support.voxcpm_checkpoint DIR --size full [--family voxcpm2] builds a full-size
        random checkpoint)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from service.engines.registry import FAMILIES, checkpoint_architecture  # noqa: E402
from service.settings import THREAD_RESERVE  # noqa: E402
from tests.support.worker import start_worker  # noqa: E402
from tts_load import describe, max_level_below_rtf_1, run_level, table  # noqa: E402


def measure(model_dir: str, batch: str, args, tmp: Path) -> tuple[dict, list[dict]]:
    # Every client of the top level waits (nothing shed), and the threads hold the queue, the batch
    # (auto: up to 128), the WebSockets and the reserve, as the worker's start-up check requires.
    queue, rows = max(64, 2 * max(args.levels)), int(batch) if batch.isdigit() else 128
    websockets = max(args.levels) if args.ws else 1
    arch = checkpoint_architecture(Path(model_dir)) or "voxcpm"
    engine = next(f.name for f in FAMILIES.values() if arch in f.architectures)
    env = {"TTS_ENGINE": engine, "MODEL_DIR": model_dir, "TTS_DEVICE": args.device, "TTS_MAX_BATCH": batch,
           "VOXCPM_FIXED_TOKENS": str(args.fixed_tokens), "QUEUE_SIZE": str(queue),
           "WS_MAX_CONNECTIONS": str(websockets), "GUNICORN_THREADS": str(queue + rows + websockets + THREAD_RESERVE),
           "REQUEST_TIMEOUT_S": str(args.timeout)}
    with start_worker(tmp / f"batch-{batch}", env, timeout=args.start_timeout) as worker:
        info = requests.get(f"{worker.url}/info", timeout=30).json()
        run_level(worker.url, {}, 2, 2, args.ws, args.timeout)  # untimed: first-request costs (allocator, caches)
        rows = [run_level(worker.url, {}, level, args.requests_per_level, args.ws, args.timeout)
                for level in args.levels]
    return info, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--batch", default="8", help="TTS_MAX_BATCH of the batched run (a number or auto)")
    ap.add_argument("--levels", default="1,4,16,64", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--requests-per-level", type=int, default=32)
    ap.add_argument("--fixed-tokens", type=int, default=32, help="tokens per sentence chunk (6.25 per second)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--ws", action="store_true", help="drive the WebSocket endpoint instead of HTTP streaming")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--start-timeout", type=float, default=900, help="seconds to load and warm up the model")
    ap.add_argument("--json")
    args = ap.parse_args()

    results = {}
    with tempfile.TemporaryDirectory(prefix="voxbox-bench-") as tmp:
        for name, batch in (("serialised", "1"), ("batched", args.batch)):
            info, rows = measure(str(Path(args.model_dir).resolve()), batch, args, Path(tmp))
            results[name] = {"info": info, "levels": rows}
            print(f"### {name}: {describe(info, args.ws, args.requests_per_level)}\n")
            print(table(rows))
            print(f"\nlargest concurrency with p95 RTF < 1: {max_level_below_rtf_1(rows) or 'none'}\n", flush=True)

    print("| concurrency | audio-s/s batched / serialised | TTFA p95 serialised / batched |\n|---|---|---|")
    for s, b in zip(results["serialised"]["levels"], results["batched"]["levels"]):
        thr = b["audio_s_per_wall_s"] / s["audio_s_per_wall_s"] if s["audio_s_per_wall_s"] else float("nan")
        print(f"| {s['concurrency']} | {thr:.2f}x | {s['ttfa_p95'] / b['ttfa_p95']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
