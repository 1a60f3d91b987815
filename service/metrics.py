"""Prometheus metrics of one worker process (one registry per app, so tests can build several apps).

Everything about synthesis carries a `model` label (several models can share a worker);
ModelMetrics is one model's view, with that label filled in, for its scheduler.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 13, 20, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("voxbox_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        m = ["model"]
        self.queue_depth = Gauge("voxbox_queue_depth", "Jobs waiting for the inference thread", m, registry=r)
        self.in_flight = Gauge("voxbox_in_flight", "Jobs queued or being synthesised", m, registry=r)
        self.websockets = Gauge("voxbox_websockets_open", "WebSocket connections open on /v1/stream", registry=r)
        self.rejected = Counter("voxbox_rejected", "Jobs refused because the queue was full", m, registry=r)
        self.dropped = Counter("voxbox_dropped", "Queued jobs dropped because the client went away", m,
                               registry=r)
        self.queue_wait = Histogram("voxbox_queue_wait_seconds", "Time a job waited in the queue", m,
                                    buckets=_LATENCY, registry=r)
        self.ttfa = Histogram("voxbox_time_to_first_audio_seconds", "From accepted request to first audio",
                              ["endpoint", "model"], buckets=_LATENCY, registry=r)
        self.synthesis_seconds = Histogram("voxbox_synthesis_seconds", "Inference time per job", m,
                                           buckets=_LATENCY, registry=r)
        self.audio_seconds = Counter("voxbox_audio_seconds", "Seconds of audio produced", m, registry=r)
        self.startup_seconds = Gauge("voxbox_startup_seconds", "Worker start-up steps: model load, warm-up "
                                     "synthesis, batch allocation (the bootstrap pull is on /readyz)",
                                     ["phase", "model"], registry=r)
        self.rtf = Histogram("voxbox_real_time_factor", "Synthesis time / audio duration per job", m,
                             buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5, 10), registry=r)

        # Per client (service/usage.py: the gateway's key hash or user name; "other" beyond USAGE_MAX_CLIENTS).
        c = ["client"]
        self.client_requests = Counter("voxbox_client_requests", "Synthesis requests accepted, per client", c,
                                       registry=r)
        self.client_characters = Counter("voxbox_client_characters", "Input characters accepted (SSML: its text "
                                         "without markup), per client", c, registry=r)
        self.client_audio_seconds = Counter("voxbox_client_audio_seconds", "Seconds of audio sent, per client", c,
                                            registry=r)
        self.client_quota_refused = Counter("voxbox_client_quota_refused", "Requests refused because the "
                                            "client's daily character quota was spent", c, registry=r)

    def for_model(self, model: str) -> "ModelMetrics":
        return ModelMetrics(self, model)


class _WithModel:
    """A labelled metric with the model label (the last one) fixed: .labels(other labels) adds it."""

    def __init__(self, metric, model: str):
        self._metric, self._model = metric, model

    def labels(self, *values: str):
        return self._metric.labels(*values, self._model)


class ModelMetrics:
    """One model's metrics, with the same attribute names as Metrics, for its scheduler."""

    def __init__(self, metrics: Metrics, model: str):
        self.registry, self.model = metrics.registry, model
        for name in ("queue_depth", "in_flight", "rejected", "dropped", "queue_wait", "synthesis_seconds",
                     "audio_seconds", "rtf"):
            setattr(self, name, getattr(metrics, name).labels(model))
        self.ttfa = _WithModel(metrics.ttfa, model)
        self.startup_seconds = _WithModel(metrics.startup_seconds, model)
