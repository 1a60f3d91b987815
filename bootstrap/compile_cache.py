"""Where torch.compile / Triton keep what they compiled: on the models volume, so a restart or a
rollout on the same GPU reuses it instead of compiling for a minute again.

One folder per (torch version, GPU model, model version): kernels tuned for one GPU or compiled by
one torch release are never offered to another, and a new model version starts clean. The caches
of model versions that are pruned from the volume go with them (prune_compile_caches).
"""
from __future__ import annotations

import importlib.metadata
import re
import shutil
from pathlib import Path

from .gpu import Gpu

CACHE_DIR = "compile-cache"


def compile_cache_env(models_dir: Path, model_dir: str | None, gpus: list[Gpu], env: dict) -> dict[str, str]:
    """TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR for the worker; explicit settings win, and without a
    GPU or a pulled model there is nothing worth keeping."""
    if not gpus or not model_dir:
        return {}
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return {}
    key = "_".join(_slug(x) for x in (f"torch-{torch_version}", gpus[0].name, Path(model_dir).name[:16]))
    base = Path(models_dir) / CACHE_DIR / key
    chosen = {"TORCHINDUCTOR_CACHE_DIR": str(base / "inductor"), "TRITON_CACHE_DIR": str(base / "triton")}
    return {k: v for k, v in chosen.items() if not env.get(k)}


def prune_compile_caches(models_dir: Path, kept_versions: set[str]) -> list[Path]:
    """Remove cache folders whose model version is no longer on the volume; returns what went."""
    root = Path(models_dir) / CACHE_DIR
    if not root.is_dir():
        return []
    kept = {_slug(v[:16]) for v in kept_versions}
    gone = []
    for folder in root.iterdir():
        if folder.is_dir() and folder.name.rsplit("_", 1)[-1] not in kept:
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(folder)
    return gone


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "unknown"
