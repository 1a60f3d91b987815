"""The service layer's errors: what went wrong, as a kind, and what to do, as a message.

Lower layers (synthesis, voices) say *what kind* of failure it is; only service/api/ turns a kind into
an HTTP status (api/errors.py: one table) or a WebSocket error frame. The `code` is the stable,
machine-readable reason clients see (e.g. unknown_voice, overloaded).
"""
from __future__ import annotations

import enum
from typing import Optional


class ErrorKind(enum.Enum):
    INVALID = "invalid"  # the request cannot be served as asked; the message says what to change
    NOT_FOUND = "not_found"  # it names something that does not exist (a deleted voice)
    TOO_LARGE = "too_large"  # text or a file beyond a stated limit
    UNSUPPORTED_MEDIA = "unsupported_media"  # a file that is not audio this server decodes
    QUOTA = "quota"  # the client's own allowance (characters per day) is spent: retry after the stated seconds
    OVERLOADED = "overloaded"  # the queue is full: retry after the stated seconds
    UNAVAILABLE = "unavailable"  # not ready yet, or shutting down: retry, maybe elsewhere
    DEADLINE = "deadline"  # the request's own time limit passed
    CLIENT_GONE = "client_gone"  # the client went away; nobody is listening for an answer
    FAILED = "failed"  # a fault of ours while serving an accepted request


class ServiceError(Exception):
    def __init__(self, kind: ErrorKind, code: str, message: str, retry_after: Optional[int] = None):
        super().__init__(message)
        self.kind, self.code, self.message, self.retry_after = kind, code, message, retry_after
