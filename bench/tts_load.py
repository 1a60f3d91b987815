"""Load test of a running VoxBox service over HTTP (streamed PCM) and optionally WebSocket.

For each concurrency level, `--requests-per-level` requests (short and long texts alternating) are
sent by that many concurrent clients. Reports time to first audio p50/p95/p99, per-request real-time
factor p50/p95, aggregate audio-seconds per wall-second, requests/s, errors by status, and the
largest level whose p95 RTF stays below 1. Prints a markdown table; --json writes the numbers.
Usage: python bench/tts_load.py --url http://127.0.0.1:8000 [--levels 1,4,16,64] [--requests-per-level 32]
       [--user U --password P | --api-key K] [--ws]
"""
from __future__ import annotations

import argparse
import base64
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import requests

SHORT = "Hello, this is a short request."
LONG = ("VoxBox turns a GPU machine into a text to speech service. It streams audio while it is still "
        "being generated, so a listener hears the first words quickly. Long answers are split into "
        "sentences, and every sentence is spoken in turn with a short crossfade between them.")


def pct(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def one_http(url, headers, text, seed, timeout):
    t0 = time.perf_counter()
    first, nbytes, rate = None, 0, 44100
    with requests.post(f"{url}/v1/audio/speech", json={"input": text, "response_format": "pcm", "stream": True,
                                                       "seed": seed}, headers=headers, stream=True,
                       timeout=timeout) as r:
        if r.status_code != 200:
            return {"status": r.status_code}
        rate = int(r.headers.get("X-Sample-Rate", rate))
        for chunk in r.iter_content(chunk_size=None):
            if chunk and first is None:
                first = time.perf_counter() - t0
            nbytes += len(chunk)
    total = time.perf_counter() - t0
    audio = nbytes / 2 / rate
    return {"status": 200, "ttfa": first, "total": total, "audio": audio, "rtf": total / audio if audio else None}


def one_ws(url, headers, text, seed, timeout):
    import websocket

    t0 = time.perf_counter()
    ws = websocket.create_connection(url.replace("http", "ws", 1) + "/v1/stream", timeout=timeout,
                                     header=[f"{k}: {v}" for k, v in headers.items()])
    try:
        ws.send(json.dumps({"text": text, "seed": seed}))
        first, nbytes, rate = None, 0, 44100
        while True:
            msg = ws.recv()
            if isinstance(msg, bytes):
                if first is None:
                    first = time.perf_counter() - t0
                nbytes += len(msg)
                continue
            body = json.loads(msg)
            if body["type"] == "header":
                rate = body["sample_rate"]
            elif body["type"] == "error":
                return {"status": body["code"]}
            elif body["type"] == "done":
                break
    finally:
        ws.close()
    total = time.perf_counter() - t0
    audio = nbytes / 2 / rate
    return {"status": 200, "ttfa": first, "total": total, "audio": audio, "rtf": total / audio if audio else None}


def run_level(url, headers, level, n_requests, ws=False, timeout=600.0):
    """n_requests (short and long texts alternating, seeded) sent by `level` concurrent clients."""
    fn = one_ws if ws else one_http
    jobs = [(LONG if i % 2 else SHORT, i) for i in range(n_requests)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(level) as pool:
        results = list(pool.map(lambda j: _safe(fn, url, headers, j[0], j[1], timeout), jobs))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    ttfa = [r["ttfa"] for r in ok if r["ttfa"] is not None]
    rtf = [r["rtf"] for r in ok if r["rtf"] is not None]
    return {"concurrency": level, "requests": len(results), "ok": len(ok),
            "errors": dict(Counter(str(r["status"]) for r in results if r["status"] != 200)),
            "ttfa_p50": pct(ttfa, 50), "ttfa_p95": pct(ttfa, 95), "ttfa_p99": pct(ttfa, 99),
            "rtf_p50": pct(rtf, 50), "rtf_p95": pct(rtf, 95),
            "audio_s_per_wall_s": sum(r["audio"] for r in ok) / wall, "requests_per_s": len(ok) / wall,
            "wall_s": wall}


def _safe(fn, *a):
    try:
        return fn(*a)
    except Exception as e:  # a refused or broken connection is a result, not a crash of the benchmark
        return {"status": type(e).__name__}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--requests-per-level", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--user")
    ap.add_argument("--password")
    ap.add_argument("--api-key")
    ap.add_argument("--ws", action="store_true", help="use the WebSocket endpoint instead of HTTP streaming")
    ap.add_argument("--json")
    args = ap.parse_args()
    headers = {}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    elif args.user:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{args.user}:{args.password}".encode()).decode()
    info = requests.get(f"{args.url}/info", headers=headers, timeout=30).json()
    rows = [run_level(args.url, headers, int(level), args.requests_per_level, args.ws, args.timeout)
            for level in args.levels.split(",")]
    print(describe(info, args.ws, args.requests_per_level) + "\n")
    print(table(rows))
    best = max_level_below_rtf_1(rows)
    print(f"\nlargest concurrency with p95 RTF < 1: {best or 'none'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"engine": info["engine"], "batch_size": info["limits"].get("batch_size"), "levels": rows,
                       "max_concurrency_rtf_below_1": best}, f, indent=2)


def describe(info: dict, ws: bool, n_requests: int) -> str:
    e = info["engine"]
    fixed = f", fixed {e['fixed_tokens']} tokens per chunk" if e.get("fixed_tokens") else ""
    return (f"engine {e['name']} on {e['device']}, batch size {info['limits'].get('batch_size')}{fixed}; "
            f"{'WebSocket' if ws else 'HTTP streaming'}; {n_requests} requests per level")


def table(rows: list[dict]) -> str:
    lines = ["| concurrency | TTFA p50 | p95 | p99 | RTF p50 | RTF p95 | audio-s/s | req/s | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['ttfa_p50']:.3f} | {r['ttfa_p95']:.3f} | {r['ttfa_p99']:.3f} | "
                     f"{r['rtf_p50']:.3f} | {r['rtf_p95']:.3f} | {r['audio_s_per_wall_s']:.2f} | "
                     f"{r['requests_per_s']:.2f} | {r['errors'] or '-'} |")
    return "\n".join(lines)


def max_level_below_rtf_1(rows: list[dict]):
    ok = [r["concurrency"] for r in rows if r["ok"] == r["requests"] and r["rtf_p95"] < 1]
    return max(ok) if ok else None


if __name__ == "__main__":
    main()
