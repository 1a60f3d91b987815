"""VoxCPM throughput (1.5 or VoxCPM2, as config.json's architecture says): N requests one after another
(the package's own generation) vs continuous batching.

Also the prefill of N requests arriving at once: joined one after another vs in one padded pass.

Both sides run in one process on the same model, with a fixed generated length (min_len = max_len,
so each request does the same work as real speech of that length). Prints seconds, audio-seconds
per wall-second and the speed-up.
Usage: python bench/batch_vs_serial.py --model-dir DIR [--n 4] [--tokens 32] [--device auto]
       [--no-warmup] [--no-prefill]   (short CPU runs of a full-size model: no warm-up pass, no prefill table)
       (build a random full-size checkpoint with:
        python -m tests.support.voxcpm_checkpoint DIR --size full [--family voxcpm2])
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.engines.voxcpm.batch import BatchedGenerator, Join  # noqa: E402
from service.engines.voxcpm.engine import pick_device  # noqa: E402
from service.engines.voxcpm.family import Family  # noqa: E402
from service.engines.registry import checkpoint_architecture  # noqa: E402
from service.engines.voxcpm.load import model_classes  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog near the river bank.",
         "VoxBox serves speech to many users at once on one machine.",
         "Continuous batching lets requests join and leave between steps.",
         "Each request here generates exactly the same number of tokens."]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32, help="tokens per request (6.25 per second of audio)")
    ap.add_argument("--timesteps", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                    help="run both paths once before timing them")
    ap.add_argument("--prefill", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the prefill of N requests arriving at once")
    args = ap.parse_args()
    # The package's own model class for the checkpoint's family (it defaults to VoxCPM-1.5 without the key).
    architecture = checkpoint_architecture(Path(args.model_dir)) or "voxcpm"
    model_class = model_classes(architecture)[1]

    device, why = pick_device(args.device)
    model = model_class.from_local(args.model_dir, optimize=False, device=device)
    texts = [TEXTS[i % len(TEXTS)] for i in range(args.n)]
    audio_s = args.n * args.tokens * Family(model).samples_per_token / model.sample_rate

    def serial():
        for i, text in enumerate(texts):
            torch.manual_seed(i)
            for _ in model.generate_with_prompt_cache_streaming(
                    target_text=text, prompt_cache=None, min_len=args.tokens, max_len=args.tokens,
                    inference_timesteps=args.timesteps, retry_badcase=False):
                pass

    def batched():
        gen = BatchedGenerator(model, max_batch=args.n, max_length=512)
        for i, text in enumerate(texts):
            gen.add(text, None, max_len=args.tokens, min_len=args.tokens, inference_timesteps=args.timesteps, seed=i)
        while gen.active():
            gen.step()

    if args.warmup:
        serial()
        batched()
    times, cpu = {}, {}
    for name, fn in (("serial", serial), ("batched", batched)):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        times[name], cpu[name] = time.perf_counter() - t0, time.process_time() - c0
    print(f"{architecture} on device={device} ({why}); {args.n} requests x {args.tokens} tokens ({audio_s / args.n:.2f} s audio each), "
          f"{args.timesteps} DiT steps, dtype={model.config.dtype}")
    # CPU seconds of this process too: on a shared machine wall time also measures the neighbours.
    print("| path | seconds | audio-s per wall-s | CPU-s of this process |\n|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t:.2f} | {audio_s / t:.3f} | {cpu[name]:.1f} |")
    print(f"speed-up (serial / batched): {times['serial'] / times['batched']:.2f}x wall, "
          f"{cpu['serial'] / cpu['batched']:.2f}x CPU time")
    if not args.prefill:
        return

    def prefill_one_by_one():
        gen = BatchedGenerator(model, max_batch=args.n, max_length=512)
        for i, text in enumerate(texts):
            gen.add(text, None, seed=i, inference_timesteps=args.timesteps)

    def prefill_together():
        gen = BatchedGenerator(model, max_batch=args.n, max_length=512)
        gen.add_many([Join(text, None, seed=i, inference_timesteps=args.timesteps) for i, text in enumerate(texts)])

    prefill = {}
    for name, fn in (("one by one", prefill_one_by_one), ("together", prefill_together)):
        fn()  # warm-up
        runs = []
        for _ in range(3):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            runs.append(time.perf_counter() - t0)
        prefill[name] = min(runs)
    print(f"\nprefill of {args.n} requests arriving at once (min of 3): "
          + ", ".join(f"{k} {v:.3f}s" for k, v in prefill.items())
          + f"; speed-up {prefill['one by one'] / prefill['together']:.2f}x")


if __name__ == "__main__":
    main()
