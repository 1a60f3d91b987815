"""GPU sizing: detect GPUs and pick the device and the worker's request threads and queue.

Explicit environment settings always win; the decision is logged and exported to the worker.
"""
from __future__ import annotations

import glob
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass

log = logging.getLogger("bootstrap")

GIB = 1024 ** 3
# Request threads for the worker. The batch itself is the engine's decision, made after the model is
# loaded from the GPU memory then free (TTS_MAX_BATCH=auto); these numbers only make room for it:
# the worker runs at most GUNICORN_THREADS - QUEUE_SIZE - WS_MAX_CONNECTIONS (auto: threads / 8)
# - 4 requests at once (service/settings.py, batch_capacity), i.e. 256 - 64 - 32 - 4 = 156 on a GPU,
# room for a batch of 128, and 16 - 8 - 2 - 4 = 2 on CPU, where VoxCPM runs one request at a time.
GPU_THREADS, GPU_QUEUE = 256, 64
CPU_THREADS, CPU_QUEUE = 16, 8


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int


def detect_gpus(env: dict | None = None) -> list[Gpu]:
    """The GPUs the worker will see. nvidia-smi first: it answers in milliseconds, while importing
    torch here costs about 2 s of every start and is thrown away by the exec into gunicorn."""
    visible = (env or {}).get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return []  # the operator hid every GPU from CUDA
    if shutil.which("nvidia-smi"):
        cmd = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]
        if visible:
            cmd.append(f"--id={visible.split(',')[0].strip()}")  # the GPU torch will call cuda:0
        try:
            gpus = parse_nvidia_smi(subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout)
            if gpus:
                return gpus
        except (OSError, subprocess.SubprocessError):
            pass
    if not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd")):
        return []  # no GPU device node (NVIDIA, or AMD for ROCm builds): torch would find none either
    try:
        import torch

        if torch.cuda.is_available():
            return [Gpu(torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory)
                    for i in range(torch.cuda.device_count())]
    except Exception:  # torch missing or broken CUDA: no GPU we can use
        pass
    return []


def parse_nvidia_smi(out: str) -> list[Gpu]:
    gpus = []
    for line in out.strip().splitlines():
        name, _, mib = line.rpartition(",")
        if name and mib.strip().isdigit():
            gpus.append(Gpu(name.strip(), int(mib.strip()) * 1024 * 1024))
    return gpus


def decide(gpus: list[Gpu], env: dict) -> dict[str, str]:
    """Settings for the worker from the hardware; anything already set in `env` is kept as is."""
    if gpus:
        chosen = {"TTS_DEVICE": "cuda", "QUEUE_SIZE": str(GPU_QUEUE), "GUNICORN_THREADS": str(GPU_THREADS)}
        why = f"{gpus[0].name} with {gpus[0].memory_bytes / GIB:.0f} GiB"
    else:
        chosen = {"TTS_DEVICE": "cpu", "QUEUE_SIZE": str(CPU_QUEUE), "GUNICORN_THREADS": str(CPU_THREADS)}
        why = "no GPU visible"
    # "auto" (the .env.example default) asks us to choose; any other value is an operator's decision.
    explicit = {k: env[k] for k in chosen if env.get(k, "").strip().lower() not in ("", "auto")}
    final = {**chosen, **explicit}
    overridden = sorted(explicit)
    log.info("sizing: %s -> %s%s", why, ", ".join(f"{k}={v}" for k, v in final.items()),
             f" (set explicitly: {', '.join(overridden)})" if overridden else "")
    return final
