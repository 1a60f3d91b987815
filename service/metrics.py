"""Prometheus metrics of one worker process (one registry per app, so tests can build several apps)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 13, 20, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("voxbox_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.queue_depth = Gauge("voxbox_queue_depth", "Jobs waiting for the inference thread", registry=r)
        self.in_flight = Gauge("voxbox_in_flight", "Jobs queued or being synthesised", registry=r)
        self.websockets = Gauge("voxbox_websockets_open", "WebSocket connections open on /v1/stream", registry=r)
        self.rejected = Counter("voxbox_rejected", "Jobs refused because the queue was full", registry=r)
        self.dropped = Counter("voxbox_dropped", "Queued jobs dropped because the client went away", registry=r)
        self.queue_wait = Histogram("voxbox_queue_wait_seconds", "Time a job waited in the queue",
                                    buckets=_LATENCY, registry=r)
        self.ttfa = Histogram("voxbox_time_to_first_audio_seconds", "From accepted request to first audio",
                              ["endpoint"], buckets=_LATENCY, registry=r)
        self.synthesis_seconds = Histogram("voxbox_synthesis_seconds", "Inference time per job",
                                           buckets=_LATENCY, registry=r)
        self.audio_seconds = Counter("voxbox_audio_seconds", "Seconds of audio produced", registry=r)
        self.startup_seconds = Gauge("voxbox_startup_seconds", "Worker start-up steps: model load, warm-up "
                                     "synthesis, batch allocation (the bootstrap pull is on /readyz)",
                                     ["phase"], registry=r)
        self.rtf = Histogram("voxbox_real_time_factor", "Synthesis time / audio duration per job",
                             buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5, 10), registry=r)
