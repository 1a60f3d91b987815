"""Graceful shutdown that keeps answering: on SIGTERM the worker drains before gunicorn stops it.

gunicorn's own SIGTERM handling stops accepting connections at once; clients that connect meanwhile
(a gateway that has not noticed yet, a load balancer's next probe) sit in the listen backlog until the
process exits and then fail. Instead, SIGTERM first turns readiness to 503 and refuses new synthesis
with 503 + Retry-After (JSON, `shutting_down`), while the requests already accepted finish; once none
is left (or the grace period is nearly spent) gunicorn's handler runs and the worker exits.
"""
from __future__ import annotations

import logging
import signal
import threading
import time


log = logging.getLogger(__name__)

# Kept from GRACEFUL_TIMEOUT for gunicorn's own shutdown (responses still being written) before the
# master's SIGKILL at GRACEFUL_TIMEOUT after its SIGTERM.
_STOP_MARGIN_S = 2.0


def drain_on_sigterm(worker, scheduler, graceful_timeout_s: float) -> None:
    """Install the draining SIGTERM handler on a gunicorn worker (post_worker_init, in its main thread).
    `scheduler`: what drains (drain(), idle()): the worker's ModelSet, every model together."""
    gunicorn_stop = worker.handle_exit  # stop accepting, finish open connections, exit
    begun = threading.Event()

    def wait_then_stop() -> None:
        deadline = time.monotonic() + max(0.0, graceful_timeout_s - _STOP_MARGIN_S)
        while not scheduler.idle() and time.monotonic() < deadline:
            time.sleep(0.05)
        log.info("drained (%s); stopping", "no request in flight" if scheduler.idle() else "grace period spent")
        gunicorn_stop(signal.SIGTERM, None)

    def on_sigterm(sig, frame) -> None:
        # Sent twice when the master forwards the SIGTERM its process group got: act once.
        if begun.is_set():
            return
        begun.set()
        scheduler.drain()
        log.info("SIGTERM: draining; new requests get 503 shutting_down, accepted ones finish")
        threading.Thread(target=wait_then_stop, name="drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
