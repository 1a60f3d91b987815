"""Stand-ins for the worker behind the gateway where a test must see exactly what nginx sends upstream
(headers, raw path) or steer where a name points: a recording HTTP server and a one-name DNS server."""
from __future__ import annotations

import json
import socket
import struct
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator, Optional


class _Recording(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # the gateway keeps upstream connections alive

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        server: RecordingServer = self.server.owner  # type: ignore[attr-defined]
        seen = {"method": self.command, "path": self.path, "body_bytes": len(body),
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "all_headers": [(k.lower(), v) for k, v in self.headers.items()]}
        with server.lock:
            server.seen.append(seen)
        # A slow upstream, on request: how the tests hold requests open to count concurrent ones.
        time.sleep(float(self.headers.get("X-Test-Delay") or 0))
        out = json.dumps({"served_by": server.name, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = _handle

    def log_message(self, *args) -> None:
        pass


class RecordingServer:
    """Answers every request with 200 {"served_by": name, "path": raw path} and records what it got."""

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0):
        self.name, self.lock, self.seen = name, threading.Lock(), []
        self._httpd = ThreadingHTTPServer((host, port), _Recording)
        self._httpd.owner = self  # type: ignore[attr-defined]
        self.host, self.port = self._httpd.server_address[:2]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def by_request_id(self, rid: str) -> dict:
        with self.lock:
            found = [s for s in self.seen if s["headers"].get("x-request-id") == rid]
        assert len(found) == 1, f"{len(found)} upstream requests with X-Request-ID {rid}: {self.seen[-5:]}"
        return found[0]

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@contextmanager
def recording_server(name: str, host: str = "127.0.0.1", port: int = 0) -> Iterator[RecordingServer]:
    server = RecordingServer(name, host, port)
    try:
        yield server
    finally:
        server.stop()


class DnsServer:
    """A UDP DNS server on 127.0.0.1 that knows one name: A queries get `address` (None: NXDOMAIN, as a
    stopped container's name), AAAA queries an empty answer. TTL 0; counts the queries it answers."""

    def __init__(self, name: str, address: Optional[str]):
        self.name, self.address, self.queries = name.lower().rstrip("."), address, 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(512)
            except socket.timeout:
                continue
            reply = self._answer(data)
            if reply:
                self._sock.sendto(reply, peer)

    def _answer(self, query: bytes) -> Optional[bytes]:
        if len(query) < 17:
            return None
        labels, i = [], 12
        while i < len(query) and query[i]:
            labels.append(query[i + 1:i + 1 + query[i]].decode("ascii", "replace"))
            i += 1 + query[i]
        question = query[12:i + 5]  # name, its terminating zero, type, class
        qtype = struct.unpack("!H", query[i + 1:i + 3])[0]
        known = ".".join(labels).lower() == self.name
        address = self.address
        self.queries += 1
        answers = b""
        if known and qtype == 1 and address:
            answers = struct.pack("!HHHIH", 0xC00C, 1, 1, 0, 4) + socket.inet_aton(address)
        rcode = 0 if known and (qtype != 1 or address) else 3
        flags = 0x8180 | rcode  # a response, recursion desired and available
        return query[:2] + struct.pack("!HHHHH", flags, 1, 1 if answers else 0, 0, 0) + question + answers

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()


@contextmanager
def dns_server(name: str, address: Optional[str]) -> Iterator[DnsServer]:
    server = DnsServer(name, address)
    try:
        yield server
    finally:
        server.stop()
