"""A stand-in for the agent's runtime API on a unix socket (docs/functions.md), so the
in-container runtime can be tested as a plain process: it hands out queued inputs and
records answers."""

from __future__ import annotations

import json
import os
import queue
import socketserver
import threading
import uuid
from http.server import BaseHTTPRequestHandler
from typing import Dict, List, Optional, Tuple


class FakeRuntimeApi:
    def __init__(self, path: str):
        self.path = path
        self.inputs: "queue.Queue[Optional[Tuple[str, Dict[str, str], bytes]]]" = queue.Queue()
        self.answers: Dict[str, Tuple[str, Dict[str, str], bytes]] = {}
        #: Streamed chunks per input: (content type, bytes); more than `max_chunks` get 429.
        self.chunks: Dict[str, List[Tuple[str, bytes]]] = {}
        self.max_chunks = 10000
        #: Inputs whose chunks get 404, as a cancelled input's do.
        self.gone: set = set()
        self.answered = threading.Condition()
        self.ready = threading.Event()
        self.init_error: Optional[dict] = None
        self.init_failed = threading.Event()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def reply(self, status: int, body: bytes = b"", headers=()):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def body(self) -> bytes:
                n = int(self.headers.get("Content-Length", "0"))
                return self.rfile.read(n)

            def do_POST(self):
                data = self.body()
                if self.path == "/v1/ready":
                    api.ready.set()
                    return self.reply(204)
                if self.path == "/v1/init/error":
                    api.init_error = json.loads(data)
                    api.init_failed.set()
                    return self.reply(202)
                parts = self.path.split("/")
                if len(parts) == 5 and parts[2] == "inputs" and parts[4] == "stream":
                    if parts[3] in api.gone:
                        return self.reply(404)
                    with api.answered:
                        chunks = api.chunks.setdefault(parts[3], [])
                        if len(chunks) >= api.max_chunks:
                            return self.reply(429)
                        chunks.append((self.headers.get("Content-Type", ""), data))
                    return self.reply(202)
                if len(parts) == 5 and parts[2] == "inputs":
                    headers = {k: v for k, v in self.headers.items()}
                    headers["_all_http_headers"] = json.dumps(self.headers.get_all("Gantry-Http-Header") or [])
                    with api.answered:
                        api.answers[parts[3]] = (parts[4], headers, data)
                        api.answered.notify_all()
                    return self.reply(202)
                self.reply(404)

            def do_GET(self):
                if self.path == "/v1/inputs/next":
                    item = api.inputs.get()
                    if item is None:
                        api.inputs.put(None)  # every waiting worker learns of the drain
                        return self.reply(410)
                    input_id, headers, body = item
                    hs = [("Gantry-Input-Id", input_id), ("Gantry-Call-Id", "fc-1"),
                          ("Gantry-Attempt", "1")] + list(headers.items())
                    return self.reply(200, body, hs)
                self.reply(404)

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        if os.path.exists(path):
            os.unlink(path)
        self.server = Server(path, Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def send(self, body: bytes, headers: Dict[str, str], extra: List[Tuple[str, str]] = ()) -> str:
        input_id = "in-" + uuid.uuid4().hex[:12]
        h = dict(headers)
        self.inputs.put((input_id, h, body))
        return input_id

    def wait(self, input_id: str, timeout: float = 30) -> Tuple[str, Dict[str, str], bytes]:
        with self.answered:
            ok = self.answered.wait_for(lambda: input_id in self.answers, timeout)
            assert ok, f"no answer for {input_id}"
            return self.answers[input_id]

    def drain(self) -> None:
        self.inputs.put(None)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
