"""An HTTP proxy in front of the S3 server that counts requests and injects faults on chosen ones.

Faults: "reset" (close the connection mid-body), "500", "503" (S3 SlowDown), "truncate" (send the
headers with the full Content-Length, then half the body, then close).
"""
from __future__ import annotations

import http.client
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

from .procs import free_port

_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b'<Message>Please reduce your request rate.</Message></Error>')


class FaultProxy:
    def __init__(self, upstream: str):
        u = urlparse(upstream)
        self.upstream = (u.hostname, u.port)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.gets: Counter = Counter()  # object key -> GET requests seen (body reads)
        self.body_bytes: Counter = Counter()  # object key -> body bytes sent in full 2xx GET answers
        self.faults: list[tuple[str, str]] = []  # (key suffix, fault), consumed in order
        self.injected: list[tuple[str, str]] = []
        self.delay_s = 0.0  # per-response delay, to make transfers slow enough to interrupt
        self.per_connection_mbps = 0.0  # emulate a WAN store's per-connection bandwidth (0: unlimited)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                key = urlparse(self.path).path
                fault = None
                if self.command == "GET":
                    with proxy._lock:
                        proxy.gets[key] += 1
                        for i, (suffix, kind) in enumerate(proxy.faults):
                            if key.endswith(suffix):
                                fault = kind
                                proxy.injected.append(proxy.faults.pop(i))
                                break
                if fault in ("500", "503"):
                    payload = _SLOWDOWN if fault == "503" else b"<Error><Code>InternalError</Code></Error>"
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items()}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # A HEAD answer has no body but must carry the object's length: clients size their
                # ranged GETs by it (boto3 fetches a "0-byte" object with one plain GET).
                head_length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", head_length or str(len(data)))
                self.end_headers()
                if fault in ("reset", "truncate") and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    if fault == "reset":
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if self.command == "GET" and 200 <= resp.status < 300:
                    with proxy._lock:
                        proxy.body_bytes[key] += len(data)
                if self.command != "HEAD":
                    if (proxy.delay_s or proxy.per_connection_mbps) and self.command == "GET":
                        import time

                        step = 256 * 1024
                        pause = proxy.delay_s or step / (proxy.per_connection_mbps * 1024 * 1024)
                        for i in range(0, len(data), step):  # trickle: a kill can land mid-body
                            self.wfile.write(data[i:i + step])
                            time.sleep(pause)
                    else:
                        self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reset_counts(self) -> None:
        with self._lock:
            self.gets.clear()
            self.body_bytes.clear()

    def body_gets(self, suffix: str = "") -> int:
        """GETs of object bodies (everything but the manifest), optionally for keys ending in `suffix`."""
        return sum(n for k, n in self.gets.items() if not k.endswith("manifest.json") and k.endswith(suffix))
