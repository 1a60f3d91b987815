"""One batched VoxCPM generation step (1.5 or VoxCPM2, as the checkpoint's architecture says), side by side in one run: eager kernels vs CUDA graphs per batch
size, against the package's own one-request loop per token (compiled on CUDA, as it serves there).

Per batch size: wall ms per step, ms per row-step, the RTF of one row (a step makes 160 ms of audio),
kernel launches and GPU busy time per step (CUDA, from torch.profiler), and graphs/eager speed-up.
Rows generate a fixed number of tokens (stop head ignored) from a long text, attention over a KV
prefix of --context positions.

Usage: python bench/step_profile.py --model-dir DIR [--batches 1,8,64,128] [--device auto]
       [--timesteps 10] [--steps 20] [--package-tokens 96] [--compile]
       (python -m tests.support.voxcpm_checkpoint DIR --size full [--family voxcpm2] builds a full-size
        random checkpoint)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.engines.voxcpm.batch import BatchedGenerator, Join  # noqa: E402
from service.engines.registry import checkpoint_architecture  # noqa: E402
from service.engines.voxcpm.engine import pick_device  # noqa: E402
from service.engines.voxcpm.family import Family  # noqa: E402
from service.engines.voxcpm.load import load_voxcpm  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog near the river bank, and then it runs far away."


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(gen: BatchedGenerator, device: str, steps: int) -> tuple[float, float, float]:
    """(wall s per step, GPU kernel s per step, kernel launches per step) over `steps` steps."""
    for _ in range(3):  # first use of a shape: eager run + capture
        gen.step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        gen.step()
    sync(device)
    wall = (time.perf_counter() - t0) / steps
    if not device.startswith("cuda"):
        return wall, float("nan"), float("nan")
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(5):
            gen.step()
        sync(device)
    ev = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in ev) / 5 / 1e6
    launches = sum(e.count for e in ev if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch"))) / 5
    return wall, gpu, launches


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--timesteps", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--package-tokens", type=int, default=96)
    ap.add_argument("--compile", action="store_true",
                    help="also graphs of the inductor-compiled step (VOXCPM_COMPILE_STEP; compiles first)")
    args = ap.parse_args()
    device, why = pick_device(args.device)
    t0 = time.perf_counter()
    architecture = checkpoint_architecture(Path(args.model_dir)) or "voxcpm"
    model = load_voxcpm(Path(args.model_dir), device, optimize=device == "cuda", architecture=architecture)
    sync(device)
    print(f"{architecture} on device {device} ({why}); model loaded in {time.perf_counter() - t0:.1f}s", flush=True)
    budget = args.steps + 10
    audio_s = Family(model).samples_per_token / model.sample_rate

    print(f"{'batch':>5} | {'mode':>6} | {'ms/step':>8} | {'ms/row-step':>11} | {'RTF/row':>7} | "
          f"{'GPU ms':>7} | {'busy':>5} | {'launches':>8} | graphs vs eager")
    for b in (int(x) for x in args.batches.split(",")):
        results = {}
        modes = ("eager", "graphs") if device == "cuda" else ("eager",)
        for mode in modes + (("compiled",) if args.compile else ()):
            gen = BatchedGenerator(model, max_batch=b, max_length=1024, max_steps=budget,
                                   cuda_graphs=mode != "eager", compile_backend="inductor" if mode == "compiled" else None)
            gen.prepare(args.timesteps)
            gen.add_many([Join(TEXT, None, seed=i, inference_timesteps=args.timesteps, max_len=budget,
                               min_len=budget, length_ratio=None) for i in range(b)])
            wall, gpu, launches = time_steps(gen, device, args.steps)
            results[mode] = wall
            ratio = f"{results['eager'] / wall:.2f}x" if mode != "eager" else ""
            print(f"{b:5d} | {mode:>6} | {wall * 1e3:8.1f} | {wall / b * 1e3:11.2f} | {wall / audio_s:7.3f} | "
                  f"{gpu * 1e3:7.1f} | {gpu / wall * 100:4.0f}% | {launches:8.0f} | {ratio}", flush=True)
            del gen
            if device == "cuda":
                torch.cuda.empty_cache()

    # The package's own loop, one request (torch.compile'd on CUDA: the path TTS_MAX_BATCH=1 serves).
    n = args.package_tokens
    for _ in range(2 if device == "cuda" else 1):
        for _ in model.generate_with_prompt_cache_streaming(target_text=TEXT, prompt_cache=None, min_len=n, max_len=n,
                                                            inference_timesteps=args.timesteps, retry_badcase=False):
            pass
    sync(device)
    t0 = time.perf_counter()
    for _ in model.generate_with_prompt_cache_streaming(target_text=TEXT, prompt_cache=None, min_len=n, max_len=n,
                                                        inference_timesteps=args.timesteps, retry_badcase=False):
        pass
    sync(device)
    per = (time.perf_counter() - t0) / n
    print(f"package one-request loop{' (compiled)' if device == 'cuda' else ''}: {per * 1e3:.1f} ms per token "
          f"(RTF {per / audio_s:.3f})", flush=True)


if __name__ == "__main__":
    main()
