"""Steady synthesis load through the gateway, for the scale-out tests: what each request got, and from
which worker (its X-Served-By header)."""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass

import requests

TOKEN_BYTES = 4 * 1764 * 2  # one 6.25 Hz VoxCPM-1.5 token of 16-bit PCM at 44.1 kHz


@dataclass
class Outcome:
    rid: str
    started: float
    ended: float
    streamed: bool
    status: int | None = None
    served_by: str | None = None
    audio_bytes: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.audio_bytes > 0 and \
            self.audio_bytes % TOKEN_BYTES == 0


class SpeechLoad:
    """`clients` clients, each sending one request after another through the gateway while it runs: short
    syntheses, every other one streamed (an interrupted stream raises; a whole one is a whole number of tokens)."""

    def __init__(self, url: str, clients: int, headers: dict, max_len: int = 6, timeout: float = 60):
        self.url, self.headers, self.max_len, self.timeout = url, headers, max_len, timeout
        self.outcomes: list[Outcome] = []
        self._streaming: dict[str, Outcome] = {}  # streams whose audio is flowing, by request id
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            out = self.one(stream=(n + i) % 2 == 0)
            with self._lock:
                self.outcomes.append(out)

    def one(self, stream: bool, **body) -> Outcome:
        rid = uuid.uuid4().hex
        out = Outcome(rid, time.monotonic(), 0.0, stream)
        try:
            with requests.post(f"{self.url}/v1/audio/speech", stream=stream, timeout=self.timeout,
                               headers={**self.headers, "X-Request-ID": rid},
                               json={"input": "Steady load.", "response_format": "pcm", "stream": stream,
                                     "max_len": self.max_len, "seed": 1, **body}) as r:
                out.status, out.served_by = r.status_code, r.headers.get("X-Served-By")
                for piece in r.iter_content(None):
                    out.audio_bytes += len(piece)
                    if stream:
                        with self._lock:
                            self._streaming[rid] = out
        except requests.RequestException as e:
            out.error = f"{type(e).__name__}: {e}"
        out.ended = time.monotonic()
        with self._lock:
            self._streaming.pop(rid, None)
        return out

    def streaming(self, timeout: float) -> Outcome:
        """A stream whose audio is flowing now (its worker is in its X-Served-By), as soon as there is one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._streaming:
                    return next(iter(self._streaming.values()))
            time.sleep(0.01)
        raise AssertionError(f"no stream had its audio flowing within {timeout:.0f}s")

    def __enter__(self) -> SpeechLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(90)

    def between(self, t0: float, t1: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if t0 <= o.started and o.ended <= t1]
