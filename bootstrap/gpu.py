"""GPU sizing: detect GPUs and pick device, concurrency and batch settings from memory.

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
# VoxCPM-1.5 in bf16: ~1.6 GB of LM weights + 0.35 GB VAE + activations; the rest of the card feeds
# KV caches. A batch row needs roughly this much (two LMs' KV at max length, DiT/VAE activations).
_MODEL_BYTES = 4 * GIB
_ROW_BYTES = int(0.6 * GIB)


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
        mem = gpus[0].memory_bytes
        batch = max(1, min(64, (mem - _MODEL_BYTES) // _ROW_BYTES))
        chosen = {"TTS_DEVICE": "cuda", "TTS_MAX_BATCH": str(batch), "QUEUE_SIZE": str(max(32, 4 * batch)),
                  "GUNICORN_THREADS": str(min(256, max(16, 2 * batch)))}
        why = f"{gpus[0].name} with {mem / GIB:.0f} GiB"
    else:
        chosen = {"TTS_DEVICE": "cpu", "TTS_MAX_BATCH": "1", "QUEUE_SIZE": "16", "GUNICORN_THREADS": "16"}
        why = "no GPU visible"
    # "auto" (the .env.example default) asks us to choose; any other value is an operator's decision.
    explicit = {k: env[k] for k in chosen if env.get(k, "").strip().lower() not in ("", "auto")}
    final = {**chosen, **explicit}
    overridden = sorted(explicit)
    log.info("sizing: %s -> %s%s", why, ", ".join(f"{k}={v}" for k, v in final.items()),
             f" (set explicitly: {', '.join(overridden)})" if overridden else "")
    return final
