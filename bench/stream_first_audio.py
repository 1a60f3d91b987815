"""Streamed time to first audio on the embedded engine, side by side in one run: a short first chunk
(STREAM_SHORT_FIRST_CHUNK=true, the default) vs the first sentence group as one chunk (false).

Starts the real worker twice and streams /v1/audio/speech (pcm) for a short text (about 150 characters,
two sentences) and a long one, --runs times each, one request at a time; prints median time to first
audio and to the last byte, and the ratio of first-audio times.
Usage: python bench/stream_first_audio.py [--runs 7]
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

from tests.support.worker import start_worker  # noqa: E402

SHORT = ("Hello! This is VoxBox, a text to speech service running on your own machine, "
         "and it starts speaking right away.")
LONG = " ".join([SHORT] + [f"Sentence number {i} follows the ones before it, at an even pace, to the end."
                           for i in range(8)])


def first_and_last(url: str, text: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    first = None
    with requests.post(f"{url}/v1/audio/speech", json={"input": text, "response_format": "pcm", "stream": True},
                       stream=True, timeout=120) as r:
        r.raise_for_status()
        for chunk in r.iter_content(chunk_size=None):
            if chunk and first is None:
                first = time.perf_counter() - t0
    return first, time.perf_counter() - t0


def measure(short_first: bool, runs: int, tmp: Path) -> dict:
    env = {"STREAM_SHORT_FIRST_CHUNK": str(short_first).lower()}
    with start_worker(tmp / f"short-first-{short_first}", env) as w:
        first_and_last(w.url, SHORT)  # untimed: first-request costs
        out = {}
        for name, text in (("short", SHORT), ("long", LONG)):
            times = [first_and_last(w.url, text) for _ in range(runs)]
            out[name] = (statistics.median(t[0] for t in times), statistics.median(t[1] for t in times))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="voxbox-bench-") as tmp:
        after = measure(True, args.runs, Path(tmp))
        before = measure(False, args.runs, Path(tmp))
    print(f"embedded engine, median of {args.runs} streamed requests, one at a time\n")
    print("| text | chars | first audio: one chunk / short first chunk | ratio | last byte: one chunk / short first |")
    print("|---|---|---|---|---|")
    for name, text in (("short", SHORT), ("long", LONG)):
        (bf, bl), (af, al) = before[name], after[name]
        print(f"| {name} | {len(text)} | {bf:.3f} s / {af:.3f} s | {bf / af:.2f}x | {bl:.3f} s / {al:.3f} s |")


if __name__ == "__main__":
    main()
