"""Usage per client: requests, characters and audio seconds per caller, and an optional daily character quota.

Who is calling comes from the gateway: it sends `X-Client-Id: key:<first 16 hex of sha256(API key)>` for
a bearer key or `user:<name>` for basic auth, replacing whatever a client sent (nginx/templates). A bare
worker has no gateway, so requests without a well-formed id count as "anonymous".

The counts live in this worker process: with several workers (replicas) each counts and enforces its own
share, so a quota is per worker unless requests for one client always reach the same worker.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .metrics import Metrics

ANONYMOUS = "anonymous"
OTHER = "other"  # clients beyond USAGE_MAX_CLIENTS, counted together
_CLIENT_ID = re.compile(r"(?:key|user):[A-Za-z0-9._@-]{1,64}")


class QuotaExceeded(Exception):
    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


def parse_quotas(raw: str) -> dict[str, int]:
    """CLIENT_CHAR_QUOTAS: a JSON object of client id -> characters per day (0: no quota for that client)."""
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"CLIENT_CHAR_QUOTAS is not valid JSON ({e}); write "
                         '{"key:0123456789abcdef": 100000, "user:alice": 0}') from None
    if not isinstance(body, dict):
        raise ValueError('CLIENT_CHAR_QUOTAS must be a JSON object, {"key:<16 hex>" or "user:<name>": characters}')
    for client, limit in body.items():
        if not _CLIENT_ID.fullmatch(client):
            raise ValueError(f"CLIENT_CHAR_QUOTAS names '{client}', which is not a client id; use key:<the first 16 "
                             "hex digits of the key's sha256> or user:<basic-auth user>")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise ValueError(f"CLIENT_CHAR_QUOTAS['{client}'] must be a whole number of characters, 0 or more")
    return body


@dataclass
class _Today:
    requests: int = 0
    characters: int = 0
    audio_seconds: float = 0.0


class Usage:
    def __init__(self, metrics: Metrics, daily_char_quota: int = 0, quotas: Optional[dict[str, int]] = None,
                 max_clients: int = 200, clock: Callable[[], float] = time.time):
        self.metrics = metrics
        self.daily_char_quota = daily_char_quota
        self.quotas = quotas or {}
        self.max_clients = max_clients
        self.clock = clock
        self._lock = threading.Lock()
        self._named: set[str] = set()  # clients with a label of their own, kept across days
        self._day = self._today_date()
        self._today: dict[str, _Today] = {}

    def client(self, header: Optional[str]) -> str:
        """The counted client for a request's X-Client-Id: itself, "anonymous", or "other" beyond the cap."""
        client = header if header and _CLIENT_ID.fullmatch(header) else ANONYMOUS
        with self._lock:
            if client in self._named:
                return client
            if len(self._named) >= self.max_clients:
                return OTHER
            self._named.add(client)
            return client

    def limit(self, client: str) -> int:
        """Characters per UTC day for this client; 0: no quota."""
        return self.quotas.get(client, self.daily_char_quota)

    def admit(self, client: str, characters: int) -> None:
        """Take `characters` from today's quota, or raise QuotaExceeded (before anything is queued)."""
        limit = self.limit(client)
        with self._lock:
            today = self._counts(client)
            if limit and today.characters + characters > limit:
                self.metrics.client_quota_refused.labels(client).inc()
                left = max(0, limit - today.characters)
                raise QuotaExceeded(
                    f"the daily quota of {limit} characters for {client} is spent ({today.characters} used today, "
                    f"{left} left, this request has {characters}); it resets at 00:00 UTC, in "
                    f"{self._seconds_to_midnight()} s (Retry-After). Send shorter text, or ask the operator for a "
                    "larger quota (DAILY_CHAR_QUOTA / CLIENT_CHAR_QUOTAS)", self._seconds_to_midnight())
            today.characters += characters

    def refund(self, client: str, characters: int) -> None:
        """Give back what admit() took for a request that was not accepted after all (a full queue)."""
        with self._lock:
            today = self._counts(client)
            today.characters = max(0, today.characters - characters)

    def accepted(self, client: str, characters: int) -> None:
        with self._lock:
            self._counts(client).requests += 1
        self.metrics.client_requests.labels(client).inc()
        self.metrics.client_characters.labels(client).inc(characters)

    def audio(self, client: str, seconds: float) -> None:
        with self._lock:
            self._counts(client).audio_seconds += seconds
        self.metrics.client_audio_seconds.labels(client).inc(seconds)

    def report(self, client: str) -> dict:
        """This client's usage today (GET /v1/usage)."""
        limit = self.limit(client)
        with self._lock:
            today = self._counts(client)
            tomorrow = self._day + dt.timedelta(days=1)
            return {
                "client": client, "day": self._day.isoformat(), "requests": today.requests,
                "characters": today.characters, "audio_seconds": round(today.audio_seconds, 3),
                "daily_char_quota": limit or None,
                "remaining_characters": max(0, limit - today.characters) if limit else None,
                "resets_at": f"{tomorrow.isoformat()}T00:00:00Z",
            }

    def _counts(self, client: str) -> _Today:
        day = self._today_date()
        if day != self._day:  # a new UTC day: every quota starts afresh
            self._day, self._today = day, {}
        return self._today.setdefault(client, _Today())

    def _today_date(self) -> dt.date:
        return dt.datetime.fromtimestamp(self.clock(), dt.timezone.utc).date()

    def _seconds_to_midnight(self) -> int:
        now = self.clock()
        midnight = dt.datetime.combine(self._today_date() + dt.timedelta(days=1), dt.time(), dt.timezone.utc)
        return max(1, math.ceil(midnight.timestamp() - now))
