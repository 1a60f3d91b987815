"""gunicorn settings for the worker, from the same environment as the app (see .env.example).

One worker process per model (each loads its own copy onto the device); concurrency comes from
threads, which only wait on the scheduler's queue while the inference thread works.
"""
import json

from gunicorn import util as gunicorn_util

from service.settings import load_settings

_s = load_settings()

bind = _s.bind
workers = 1
worker_class = "gthread"
threads = _s.gunicorn_threads
timeout = _s.gunicorn_timeout
graceful_timeout = _s.graceful_timeout
keepalive = 75  # longer than the gateway's upstream keepalive, so nginx closes first
loglevel = _s.log_level
accesslog = "-"
errorlog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(B)s %(M)sms rid=%({x-request-id}i)s'
preload_app = False  # the model is loaded in the worker, by its inference thread
# gunicorn's control socket defaults to one path per user ($XDG_RUNTIME_DIR or ~/.gunicorn/gunicorn.ctl):
# every instance on a host would replace it at start and delete another's at stop. Nothing here uses it.
control_socket_disable = True


def post_worker_init(worker):
    # gunicorn's SIGTERM stops accepting at once; ours drains first (readiness 503, new requests 503).
    from service.draining import drain_on_sigterm

    drain_on_sigterm(worker, worker.wsgi.extensions["voxbox"].models, _s.graceful_timeout)


def when_ready(server):
    host, _, port = _s.bind.rpartition(":")
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    server.log.info("VoxBox worker listening: http://%s:%s/  (models %s; /readyz turns 200 once they are "
                    "warm)", shown, port, ", ".join(s.name for s in _s.model_specs))


_ERROR_CODES = {400: "bad_request", 403: "forbidden", 414: "uri_too_long", 417: "expectation_failed",
                431: "headers_too_large", 500: "internal_error"}


def _write_json_error(sock, status_int, reason, mesg):
    """gunicorn's own refusals (request line or headers too large, malformed HTTP), which happen
    before Flask sees the request, in the same JSON shape as every other error instead of HTML."""
    body = json.dumps({"error": {"code": _ERROR_CODES.get(status_int, "bad_request"),
                                 "message": f"{reason}: {mesg}" if mesg else reason}}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    gunicorn_util.write_nonblock(sock, head + body)


# gunicorn has no hook for these; its workers call util.write_error, so that is what is replaced.
gunicorn_util.write_error = _write_json_error
