"""Model pull throughput against a loopback S3 server (SeaweedFS), measured side by side in one run.

(a) boto3's default `download_file`, one file after another (what a hand-written entrypoint does);
(b) the bootstrap puller (transfer manager across files, ranged GETs, sha256 verification included);
(c) the bootstrap puller's warm start (everything already verified on the volume);
(d) the ceiling: the same ranged GETs (same transfer settings) with the bytes thrown away, no disk,
    no hashing: what this server, link and client can deliver at most.
With --per-connection-mbps N the requests go through a proxy that limits each connection to N MiB/s,
as remote object stores do; that is where concurrency across files and ranges pays off.
Each path runs --repeat times, alternating, on a fresh volume; the median is reported (a small
shared VM is noisy). Usage: python bench/pull.py [--size-gb 1] [--files 6] [--repeat 3] [--per-connection-mbps 40]
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bootstrap.manifest import sha256_file  # noqa: E402
from bootstrap.publish import publish  # noqa: E402
from bootstrap.s3client import transfer_config  # noqa: E402
from bootstrap.puller import pull  # noqa: E402
from bootstrap.settings import BootstrapSettings  # noqa: E402
from bootstrap.status import Status  # noqa: E402
from tests.support.faultproxy import FaultProxy  # noqa: E402
from tests.support.s3 import seaweedfs  # noqa: E402

MB = 1024 * 1024


class _Discard(io.RawIOBase):
    """A seekable sink that keeps nothing, so the transfer manager's ranged GETs are all we time."""

    def __init__(self) -> None:
        self._pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = offset if whence == 0 else self._pos + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def write(self, b) -> int:
        self._pos += len(b)
        return len(b)


def ceiling_seconds(client, settings, keys: list[str]) -> float:
    from s3transfer.manager import TransferManager

    t0 = time.perf_counter()
    with TransferManager(client, transfer_config(settings)) as manager:
        futures = [manager.download("bench", key, _Discard()) for key in keys]
        for f in futures:
            f.result()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--files", type=int, default=6, help="the model is split into this many files (uneven)")
    ap.add_argument("--per-connection-mbps", type=float, default=0.0)
    ap.add_argument("--repeat", type=int, default=3, help="runs per path; the median is reported")
    args = ap.parse_args()
    total = int(args.size_gb * 1024 * MB)

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        with seaweedfs(tmp / "s3") as s3, FaultProxy(s3.endpoint) as proxy:
            proxy.per_connection_mbps = args.per_connection_mbps
            endpoint = proxy.url if args.per_connection_mbps else s3.endpoint
            for k, v in s3.env(endpoint).items():
                os.environ[k] = v
            src = tmp / "model"
            src.mkdir()
            weights = [2 ** i for i in range(args.files)]  # uneven sizes, like a real checkpoint
            for i, w in enumerate(weights):
                (src / f"part-{i}.bin").write_bytes(os.urandom(max(1, total * w // sum(weights))))
            client = s3.client(endpoint)
            client.create_bucket(Bucket="bench")
            uri = "s3://bench/model/"
            settings = BootstrapSettings(model_uri=uri, models_dir=tmp / "volume", s3_endpoint_url=endpoint,
                                         s3_addressing_style="path")
            publish(src, uri, settings, "bench", "v1")
            files = sorted(p.name for p in src.iterdir())
            size = sum((src / f).stat().st_size for f in files)

            base_dir = tmp / "baseline"
            baselines, hashed, ours_runs, ceilings = [], [], [], []
            for _ in range(args.repeat):
                shutil.rmtree(base_dir, ignore_errors=True)
                base_dir.mkdir()
                t0 = time.perf_counter()
                for name in files:
                    client.download_file("bench", f"model/{name}", str(base_dir / name))
                baselines.append(time.perf_counter() - t0)
                for name in files:  # what checking them against the manifest then costs
                    sha256_file(base_dir / name)
                hashed.append(time.perf_counter() - t0)
                shutil.rmtree(base_dir)  # free the page cache and disk for the next path

                shutil.rmtree(settings.models_dir, ignore_errors=True)
                t0 = time.perf_counter()
                result = pull(settings, Status(tmp / "status.json"))
                ours_runs.append(time.perf_counter() - t0)
                assert result.downloaded_bytes == size and not result.warm
                ceilings.append(ceiling_seconds(client, settings, [f"model/{name}" for name in files]))
            baseline, ours = statistics.median(baselines), statistics.median(ours_runs)
            baseline_hashed = statistics.median(hashed)
            ceiling = statistics.median(ceilings)

            t0 = time.perf_counter()
            warm = pull(settings, Status(tmp / "status.json"))
            warm_s = time.perf_counter() - t0
            assert warm.warm

    mb = size / 1e6
    link = f"{args.per_connection_mbps:g} MiB/s per connection" if args.per_connection_mbps else "unthrottled"
    print(f"model: {mb:.0f} MB in {len(files)} files, loopback SeaweedFS ({link}), {os.cpu_count()} CPU cores, "
          f"median of {args.repeat}")
    print("| path | seconds | MB/s |\n|---|---|---|")
    print(f"| (a) boto3 download_file, per file, default config | {baseline:.2f} | {mb / baseline:.0f} |")
    print(f"| (a') the same, then sha256 of each file (no fsync) | {baseline_hashed:.2f} | {mb / baseline_hashed:.0f} |")
    print(f"| (b) bootstrap pull (sha256 verified, fsynced) | {ours:.2f} | {mb / ours:.0f} |")
    print(f"| (c) bootstrap warm start | {warm_s:.3f} | - |")
    print(f"| (d) ceiling: the same ranged GETs, bytes discarded | {ceiling:.2f} | {mb / ceiling:.0f} |")
    print(f"runs (s): default {' '.join(f'{t:.2f}' for t in baselines)}; "
          f"bootstrap {' '.join(f'{t:.2f}' for t in ours_runs)}; ceiling {' '.join(f'{t:.2f}' for t in ceilings)}")
    print(f"ratio (bootstrap MB/s / default MB/s): {baseline / ours:.2f}x; bootstrap at {ceiling / ours:.0%} of "
          f"the ceiling's MB/s; warm start {warm_s * 1000:.0f} ms")


if __name__ == "__main__":
    main()
