"""gunicorn settings for the worker, from the same environment as the app (see .env.example).

One worker process per model (each loads its own copy onto the device); concurrency comes from
threads, which only wait on the scheduler's queue while the inference thread works.
"""
from service.settings import Settings

_s = Settings()

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


def when_ready(server):
    host, _, port = _s.bind.rpartition(":")
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    server.log.info("VoxBox worker listening: http://%s:%s/  (engine %s; /readyz turns 200 once the model "
                    "is warm)", shown, port, _s.tts_engine)
