"""Serving overhead: median time of an in-process engine call vs the same request through gunicorn/HTTP.

Both sides synthesise the same text with the same engine in one run, so the ratio is the cost of the
whole serving path (HTTP, validation, queue hand-off, encoding, base64).
Usage: python bench/overhead.py [--engine embedded|voxcpm] [--model-dir DIR] [--runs 15]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.engines import SynthesisParams, build_engine  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.support.worker import start_worker  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog, and then it runs away."


def median_time(fn, runs: int) -> float:
    fn()  # warm
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="embedded", choices=["embedded", "voxcpm"])
    ap.add_argument("--model-dir")
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    env = {"TTS_ENGINE": args.engine, **({"MODEL_DIR": args.model_dir} if args.model_dir else {})}

    settings = Settings(**{k.lower(): v for k, v in env.items()})
    engine = build_engine(settings)
    engine.load()
    preset = next(iter(engine.presets()))
    params = SynthesisParams(seed=0)
    in_process = median_time(lambda: engine.synthesize(TEXT, preset, None, params), args.runs)
    engine = None  # free the model before the worker loads its own copy

    with tempfile.TemporaryDirectory() as tmp, start_worker(Path(tmp), env) as w:
        session = requests.Session()

        def over_http():
            r = session.post(f"{w.url}/tts", json={"text": TEXT, "sample_rate": 44100, "seed": 0})
            r.raise_for_status()

        http = median_time(over_http, args.runs)

    print(f"engine={args.engine} runs={args.runs} text={len(TEXT)} chars")
    print(f"| path | median s |\n|---|---|\n| in-process engine call | {in_process:.4f} |\n"
          f"| gunicorn + HTTP /tts | {http:.4f} |")
    print(f"overhead ratio (http / in-process): {http / in_process:.3f}  (+{(http - in_process) * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
