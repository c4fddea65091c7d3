"""The coordinator's HTTP API, over keep-alive connections (one per thread), with the
standard library only: JSON requests, streamed JSON lines, and blob uploads to the embedded
registry. An error answer becomes the matching exception, with the API's message."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
from typing import Any, Dict, Iterator, Optional, Tuple
from urllib.parse import urlsplit

from . import _config
from .exception import ApiError, AuthError, ConflictError, InvalidError, NotFoundError

#: Seconds a request may wait for its answer: long polls ask the API for at most 55 s.
REQUEST_TIMEOUT = 120.0


class Client:
    """One coordinator. Cheap to share between threads: each thread keeps its own
    connection."""

    def __init__(self, cfg: _config.Config):
        self.cfg = cfg
        parts = urlsplit(cfg.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 80)
        self._local = threading.local()
        self._ssl: Optional[ssl.SSLContext] = None
        if self._https:
            self._ssl = ssl.create_default_context(cafile=cfg.ca_file)

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._https:
                conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=REQUEST_TIMEOUT, context=self._ssl
                )
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=REQUEST_TIMEOUT)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def raw(
        self,
        method: str,
        path: str,
        body: Optional[bytes] = None,
        headers: Optional[Dict[str, str]] = None,
        stream: bool = False,
    ) -> http.client.HTTPResponse:
        """Sends one request and returns the response with its body unread. A connection the
        server closed while idle is dialled again, once."""
        h = {"Authorization": f"Bearer {self.cfg.token}"}
        if headers:
            h.update(headers)
        if body is not None:
            h.setdefault("Content-Length", str(len(body)))
        for attempt in (0, 1):
            conn = self._conn()
            try:
                conn.request(method, path, body=body, headers=h)
                resp = conn.getresponse()
                if stream:
                    # The caller reads it to its end; a streamed answer is not reused.
                    self._local.conn = None
                return resp
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine) as e:
                self._drop()
                if attempt == 1:
                    raise ConnectionError(f"cannot reach the coordinator at {self.cfg.url}: {e}") from None
            except OSError as e:
                self._drop()
                raise ConnectionError(f"cannot reach the coordinator at {self.cfg.url}: {e}") from None
        raise AssertionError("unreachable")

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        ok: Tuple[int, ...] = (200, 201, 202, 204),
        headers: Optional[Dict[str, str]] = None,
    ) -> Tuple[int, Any]:
        """A JSON request; returns (status, parsed body). Statuses outside `ok` raise."""
        data = None
        h = dict(headers or {})
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            h["Content-Type"] = "application/json"
        resp = self.raw(method, path, data, h)
        raw = resp.read()
        if resp.status not in ok:
            raise error_of(resp.status, raw)
        if not raw:
            return resp.status, None
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode("utf-8", "replace")

    def json_lines(self, method: str, path: str, body: Any) -> Iterator[dict]:
        """A request whose answer is a stream of JSON lines (an image build)."""
        data = json.dumps(body).encode()
        resp = self.raw(method, path, data, {"Content-Type": "application/json"}, stream=True)
        try:
            if resp.status != 200:
                raise error_of(resp.status, resp.read())
            for line in resp:
                line = line.strip()
                if line:
                    yield json.loads(line)
        finally:
            resp.close()

    def has_blob(self, digest: str) -> bool:
        resp = self.raw("HEAD", f"/v2/gantry-code/blobs/{digest}")
        resp.read()
        if resp.status in (200, 404):
            return resp.status == 200
        raise error_of(resp.status, b"")

    def upload_blob(self, repo: str, digest: str, data: bytes) -> None:
        """A monolithic upload into the embedded registry, verified there against `digest`."""
        resp = self.raw(
            "POST",
            f"/v2/{repo}/blobs/uploads/?digest={digest}",
            data,
            {"Content-Type": "application/octet-stream"},
        )
        raw = resp.read()
        if resp.status not in (201, 202):
            raise error_of(resp.status, raw)


def error_of(status: int, raw: bytes) -> Exception:
    """The exception for an error answer: the API's `{"error": {code, message, field}}`, or
    the registry's `{"errors": [...]}`."""
    code, message, field = "error", raw.decode("utf-8", "replace").strip() or f"HTTP {status}", None
    try:
        body = json.loads(raw)
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            e = body["error"]
            code, message, field = e.get("code", code), e.get("message", message), e.get("field")
        elif isinstance(body, dict) and body.get("errors"):
            e = body["errors"][0]
            code, message = e.get("code", code), e.get("message", message)
    except (ValueError, TypeError, KeyError, IndexError):
        pass
    err = ApiError(status, code, message, field)
    kind = {
        400: InvalidError,
        401: AuthError,
        403: AuthError,
        404: NotFoundError,
        409: ConflictError,
        422: InvalidError,
    }.get(status)
    if kind is None:
        return err
    wrapped = kind(str(err))
    wrapped.api = err  # type: ignore[attr-defined]
    return wrapped


_client: Optional[Client] = None
_client_lock = threading.Lock()


def client() -> Client:
    """The process's client, made on first use from the configuration."""
    global _client
    with _client_lock:
        if _client is None:
            _client = Client(_config.load())
        return _client
