"""The in-container runtime for Python functions: speaks the runtime API (docs/functions.md)
on its unix socket with the standard library, imports the app's module by name, finds
its function or class, and serves inputs: pickled calls, batches, and web requests as
`http` inputs (ASGI, WSGI, FastAPI); or, for `@web_server`, starts the user's server and
waits. What an input prints comes back with its output."""

from __future__ import annotations

import asyncio
import http.client
import importlib
import inspect
import io
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import unquote

#: True in a function's container (`gantry.is_local()` says the opposite).
IN_CONTAINER = False

PICKLE = "application/x-gantry-pickle"


#: What a function prints, as streamed chunks (the SDK shows them as they come).
LOG_TYPE = "text/x-gantry-log; charset=utf-8"
#: At most this much of an input's printed text also travels in its answer.
MAX_PRINTED = 64 * 1024


class _Stream:
    """One running input's streamed chunks: what it prints (sent every 0.1 s by the
    flusher, and at its end) and a generator's items. The lock keeps chunks in order."""

    def __init__(self, input_id: str):
        self.input_id = input_id
        self.lock = threading.Lock()
        self.pending: List[str] = []
        self.printed: List[str] = []
        self.size = 0
        #: False once the agent refused a chunk (too many, or no stream endpoint).
        self.ok = True
        #: The agent no longer holds the input (cancelled): a generator stops.
        self.gone = False

    def add(self, text: str) -> None:
        with self.lock:
            self.pending.append(text)
            if self.size < MAX_PRINTED:
                self.printed.append(text)
                self.size += len(text)

    def text(self) -> str:
        return "".join(self.printed)[-MAX_PRINTED:]


class _Capture(io.TextIOBase):
    """sys.stdout/sys.stderr: text written while a thread runs an input goes to that
    input's stream; all of it also goes to the real stream (the container's log)."""

    def __init__(self, real: Any, local: threading.local):
        self._real = real
        self._local = local

    def write(self, s: str) -> int:
        stream = getattr(self._local, "stream", None)
        if stream is not None:
            stream.add(s)
        try:
            self._real.write(s)
        except Exception:
            pass
        return len(s)

    def flush(self) -> None:
        try:
            self._real.flush()
        except Exception:
            pass

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._real, "encoding", "utf-8")

    def fileno(self) -> int:
        return self._real.fileno()


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("gantry", timeout=None)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self._path)
        self.sock = s


class RuntimeApi:
    """The agent's runtime API, one keep-alive connection per thread."""

    def __init__(self, path: str):
        self.path = path
        self._local = threading.local()

    def _conn(self) -> _UnixConnection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = _UnixConnection(self.path)
            self._local.conn = c
        return c

    def request(self, method: str, path: str, body: bytes = b"",
                headers: Optional[List[Tuple[str, str]]] = None) -> Tuple[int, Any, bytes]:
        for attempt in (0, 1):
            c = self._conn()
            try:
                c.putrequest(method, path, skip_accept_encoding=True)
                for k, v in headers or []:
                    c.putheader(k, v)
                c.putheader("Content-Length", str(len(body)))
                c.endheaders(body)
                r = c.getresponse()
                data = r.read()
                return r.status, r.msg, data
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                c.close()
                self._local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def post_json(self, path: str, body: Dict[str, Any]) -> int:
        status, _, _ = self.request(
            "POST", path, json.dumps(body).encode(), [("Content-Type", "application/json")])
        return status


class _Input:
    def __init__(self, headers: Any, body: bytes):
        self.id = headers.get("Gantry-Input-Id", "")
        self.kind = headers.get("Gantry-Input-Kind", "call")
        self.content_type = headers.get("Content-Type", "application/octet-stream")
        self.headers = headers
        self.body = body


def _init_error(api: RuntimeApi, kind: str, message: str, tb: str = "") -> None:
    sys.stderr.write(f"gantry: setup failed: {kind}: {message}\n{tb}")
    try:
        api.post_json("/v1/init/error", {"type": kind[:256], "message": message[:8000],
                                         "traceback": tb[-8000:]})
    finally:
        sys.stderr.flush()
        os._exit(1)


class Runtime:
    def __init__(self, spec: Dict[str, Any], local: threading.local):
        self.spec = spec
        self.api = RuntimeApi(os.environ.get("GANTRY_RUNTIME_API", ""))
        self.max_inputs = max(1, int(os.environ.get("GANTRY_MAX_INPUTS", "1") or 1))
        #: Per thread: the stream of the input it runs (what `_Capture` writes to).
        self.local = local
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.instances: Dict[str, Any] = {}
        self.instances_lock = threading.Lock()
        self.obj: Any = None
        self.web_app: Any = None
        self.web_kind: Optional[str] = None
        self.draining = threading.Event()
        self.streams: Dict[str, _Stream] = {}
        self.streams_lock = threading.Lock()

    # Streams.

    def send_chunk(self, stream: _Stream, body: bytes, content_type: str) -> bool:
        """Posts one chunk (the caller holds the stream's lock); False once refused."""
        if not stream.ok:
            return False
        status, _, _ = self.api.request("POST", f"/v1/inputs/{stream.input_id}/stream", body,
                                        [("Content-Type", content_type)])
        stream.ok = status == 202
        stream.gone = status == 404
        return stream.ok

    def flush(self, stream: _Stream) -> None:
        with stream.lock:
            self.flush_locked(stream)

    def flush_locked(self, stream: _Stream) -> None:
        text, stream.pending = "".join(stream.pending), []
        if text:
            self.send_chunk(stream, text.encode("utf-8", "replace"), LOG_TYPE)

    def flusher(self) -> None:
        while True:
            time.sleep(0.1)
            with self.streams_lock:
                streams = list(self.streams.values())
            for stream in streams:
                if stream.pending:
                    try:
                        self.flush(stream)
                    except Exception:
                        stream.ok = False

    def begin(self, input_id: str) -> _Stream:
        stream = _Stream(input_id)
        with self.streams_lock:
            self.streams[input_id] = stream
        self.local.stream = stream
        return stream

    def end(self, stream: _Stream) -> str:
        """Stops capturing, sends what is left; returns what the input printed."""
        self.local.stream = None
        with self.streams_lock:
            self.streams.pop(stream.input_id, None)
        self.flush(stream)
        return stream.text()

    # Setup.

    def setup(self) -> None:
        from . import _app, _functions

        mod_name = self.spec["module"]
        try:
            importlib.import_module(mod_name)
            self.obj = _app.find(self.spec["object"])
        except BaseException as e:
            _init_error(self.api, type(e).__name__, f"importing `{mod_name}`: {e}",
                        traceback.format_exc())
        flags = self.obj._flags
        self.batched = flags.get("batched")
        web = flags.get("web")
        try:
            if isinstance(self.obj, _functions.Cls):
                if not self.obj._params:
                    self.instance({})  # @enter runs before `ready`
            elif web:
                self.web_kind = web["kind"]
                self.setup_web(web)
        except BaseException as e:
            _init_error(self.api, type(e).__name__, str(e), traceback.format_exc())

    def setup_web(self, web: Dict[str, Any]) -> None:
        f = self.obj.raw_f
        kind = web["kind"]
        if kind == "server":
            return
        if kind == "wsgi":
            self.web_app = f()
        elif kind == "asgi":
            self.web_app = f()
        elif kind == "fastapi":
            try:
                from fastapi import FastAPI
            except ImportError:
                raise ImportError(
                    "@fastapi_endpoint needs FastAPI in the image: "
                    "image.pip_install(\"fastapi\")") from None
            app = FastAPI(docs_url="/docs" if web.get("docs") else None, redoc_url=None,
                          openapi_url="/openapi.json" if web.get("docs") else None)
            app.add_api_route("/", f, methods=[web.get("method", "GET")])
            self.web_app = app
            self.web_kind = "asgi"
        if self.web_kind == "asgi":
            self.asgi_lifespan_start()

    def run_async(self, coro: Any) -> Any:
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
            t = threading.Thread(target=self.loop.run_forever, name="gantry-loop", daemon=True)
            t.start()
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def asgi_lifespan_start(self) -> None:
        incoming: "asyncio.Queue[Any]"
        started = threading.Event()
        state: Dict[str, Any] = {}

        async def lifespan() -> None:
            nonlocal incoming
            incoming = asyncio.Queue()
            await incoming.put({"type": "lifespan.startup"})

            async def receive() -> Dict[str, Any]:
                return await incoming.get()

            async def send(message: Dict[str, Any]) -> None:
                state["last"] = message
                if message["type"].startswith("lifespan.startup"):
                    started.set()

            try:
                await self.web_app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                   receive, send)
            except Exception as e:  # an app without lifespan support
                state["error"] = e
            finally:
                started.set()

        if self.loop is None:
            self.run_async(asyncio.sleep(0))
        assert self.loop is not None
        asyncio.run_coroutine_threadsafe(lifespan(), self.loop)
        started.wait(timeout=300)
        if state.get("last", {}).get("type") == "lifespan.startup.failed":
            raise RuntimeError(f"the ASGI app's startup failed: {state['last'].get('message')}")

    def instance(self, params: Dict[str, Any]) -> Any:
        key = repr(sorted(params.items()))
        with self.instances_lock:
            inst = self.instances.get(key)
            if inst is None:
                inst = self.obj._instantiate(params, run_enter=False)
                self.instances[key] = inst
                for name in self.obj._enter:
                    self.call(getattr(inst, name), (), {})
            return inst

    def call(self, f: Callable, args: tuple, kwargs: Dict[str, Any],
             on_item: Optional[Callable[[Any], None]] = None) -> Any:
        """Calls `f`; a generator's items go to `on_item` as it yields them (or, without
        one, are returned as a list)."""
        if inspect.iscoroutinefunction(f):
            return self.run_async(f(*args, **kwargs))
        if inspect.isasyncgenfunction(f):
            async def collect() -> List[Any]:
                return [x async for x in f(*args, **kwargs)]
            items = self.run_async(collect())
            if on_item is None:
                return items
            for item in items:
                on_item(item)
            return None
        result = f(*args, **kwargs)
        if inspect.isgenerator(result):
            if on_item is None:
                return list(result)
            for item in result:
                on_item(item)
            return None
        return result

    def target(self, envelope: Dict[str, Any]) -> Tuple[Callable, bool]:
        from . import _functions

        if isinstance(self.obj, _functions.Cls):
            name = envelope.get("m")
            if name not in (self.obj._methods or {}):
                raise AttributeError(f"{self.obj.tag} has no @method {name!r}")
            inst = self.instance(envelope.get("p") or {})
            f = getattr(inst, name)
            return f, self.obj._methods[name]
        f = self.obj.raw_f
        return f, inspect.isgeneratorfunction(f) or inspect.isasyncgenfunction(f)

    # Serving.

    def serve(self) -> None:
        if self.web_kind == "server":
            self.serve_web_server()
            return
        status = self.api.post_json("/v1/ready", {})
        if status not in (200, 202, 204):
            sys.stderr.write(f"gantry: POST /v1/ready answered {status}\n")
            os._exit(1)
        threading.Thread(target=self.flusher, name="gantry-flush", daemon=True).start()
        workers: List[threading.Thread] = []
        if self.batched:
            size, wait_ms = self.batched
            work: "queue.Queue[_Input]" = queue.Queue()
            slots = threading.Semaphore(size)
            for i in range(size):
                workers.append(threading.Thread(target=self.fetch_loop, args=(work, slots),
                                                name=f"gantry-fetch-{i}", daemon=True))
            batcher = threading.Thread(target=self.batch_loop, args=(work, slots, size, wait_ms),
                                       name="gantry-batch", daemon=True)
            batcher.start()
        else:
            for i in range(self.max_inputs):
                workers.append(threading.Thread(target=self.worker_loop,
                                                name=f"gantry-worker-{i}", daemon=True))
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if self.batched:
            work.join()
        self.shutdown(0)

    def next_input(self) -> Optional[_Input]:
        while True:
            status, headers, body = self.api.request("GET", "/v1/inputs/next")
            if status == 200:
                return _Input(headers, body)
            if status == 429:
                time.sleep(0.01)
                continue
            if status in (410, 503):
                self.draining.set()
                return None
            sys.stderr.write(f"gantry: GET /v1/inputs/next answered {status}: {body[:200]!r}\n")
            time.sleep(0.5)

    def worker_loop(self) -> None:
        while True:
            inp = self.next_input()
            if inp is None:
                return
            if inp.kind == "http":
                self.answer_http(inp)
            else:
                self.answer_call(inp)

    def decode(self, inp: _Input) -> Tuple[Dict[str, Any], bool]:
        """The input's envelope, and whether the caller speaks pickle (else JSON)."""
        from . import _serialization

        if inp.content_type.startswith(PICKLE):
            theirs = _serialization.python_of(inp.content_type)
            if theirs and theirs != _serialization.PY:
                raise RuntimeError(
                    f"the caller pickled with Python {theirs} but this image has Python "
                    f"{_serialization.PY}: use an image with Python {theirs}"
                )
            return _serialization.loads(inp.body), True
        # A caller that is not the SDK (`gantry call`, a schedule): text or JSON, or nothing.
        if not inp.body:
            return {"a": (), "k": {}}, False
        if inp.content_type.startswith("application/json"):
            return {"a": (json.loads(inp.body),), "k": {}}, False
        if inp.content_type.startswith("text/"):
            return {"a": (inp.body.decode("utf-8", "replace"),), "k": {}}, False
        return {"a": (inp.body,), "k": {}}, False

    def answer_call(self, inp: _Input) -> None:
        from . import _serialization
        from .exception import InputCancellation

        stream = self.begin(inp.id)
        pickled = True
        try:
            envelope, pickled = self.decode(inp)
            f, generator = self.target(envelope)
            args, kwargs = tuple(envelope.get("a", ())), dict(envelope.get("k", {}))
            if generator and pickled:
                # Items stream as they are yielded; those the agent refused come with the
                # answer, after the count of those streamed.
                left: List[Any] = []
                streamed = [0]

                def on_item(item: Any) -> None:
                    body = _serialization.dumps(item)
                    with stream.lock:
                        # What it printed before yielding goes first.
                        self.flush_locked(stream)
                        if left or not self.send_chunk(stream, body, _serialization.CONTENT_TYPE):
                            if stream.gone:
                                raise InputCancellation("the input is no longer held: cancelled")
                            left.append(item)
                        else:
                            streamed[0] += 1

                self.call(f, args, kwargs, on_item)
                value: Any = {"g": left, "s": streamed[0]}
            else:
                value = self.call(f, args, kwargs)
            out = self.end(stream)
            self.respond(inp.id, value, out, pickled, generator and pickled)
        except BaseException as e:
            out = self.end(stream)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                e = RuntimeError(f"the function raised {type(e).__name__}")
            self.api.post_json(f"/v1/inputs/{inp.id}/error", _serialization.error_body(e, out))

    def respond(self, input_id: str, value: Any, out: str, pickled: bool,
                generator: bool = False) -> None:
        """Answers an input: for the SDK, the pickled envelope (`{"v": value}`, a
        generator's `{"g": items left, "s": items streamed}`, and `"o"`, what it printed);
        for other callers, JSON."""
        from . import _serialization

        if pickled:
            envelope: Dict[str, Any] = dict(value) if generator else {"v": value}
            if out:
                envelope["o"] = out
            body = _serialization.dumps(envelope)
            ct = _serialization.CONTENT_TYPE
        else:
            try:
                body, ct = json.dumps(value).encode(), "application/json"
            except (TypeError, ValueError):
                body, ct = repr(value).encode(), "text/plain; charset=utf-8"
        status, _, data = self.api.request(
            "POST", f"/v1/inputs/{input_id}/response", body, [("Content-Type", ct)])
        if status == 413:
            raise_later = RuntimeError(
                f"the output is {len(body)} bytes; at most 2 MiB travel inline (write larger "
                f"data to a volume and return its path)")
            self.api.post_json(f"/v1/inputs/{input_id}/error",
                               _serialization.error_body(raise_later, out))

    # Batches.

    def fetch_loop(self, work: "queue.Queue[_Input]", slots: threading.Semaphore) -> None:
        while True:
            slots.acquire()
            inp = self.next_input()
            if inp is None:
                slots.release()
                return
            work.put(inp)

    def batch_loop(self, work: "queue.Queue[_Input]", slots: threading.Semaphore, size: int,
                   wait_ms: int) -> None:
        from . import _serialization

        while True:
            try:
                first = work.get(timeout=0.2)
            except queue.Empty:
                if self.draining.is_set() and work.empty():
                    return
                continue
            batch = [first]
            deadline = time.monotonic() + wait_ms / 1000.0
            while len(batch) < size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(work.get(timeout=left))
                except queue.Empty:
                    break
            stream = self.begin(batch[0].id)
            decoded = []
            try:
                decoded = [self.decode(i) for i in batch]
                envelopes = [d[0] for d in decoded]
                f, _ = self.target(envelopes[0])
                columns = [list(col) for col in zip(*[tuple(e.get("a", ())) for e in envelopes])]
                kw_names = set().union(*[set(e.get("k", {})) for e in envelopes])
                kwargs = {k: [e.get("k", {}).get(k) for e in envelopes] for k in kw_names}
                results = self.call(f, tuple(columns), kwargs)
                if not isinstance(results, list) or len(results) != len(batch):
                    raise TypeError(
                        f"a @batched function returns a list as long as its inputs "
                        f"({len(batch)}); it returned {type(results).__name__}"
                        + (f" of {len(results)}" if isinstance(results, list) else ""))
                out = self.end(stream)
                for inp, value, (_, pickled) in zip(batch, results, decoded):
                    self.respond(inp.id, value, out, pickled)
                    out = ""
            except BaseException as e:
                out = self.end(stream)
                for inp in batch:
                    self.api.post_json(f"/v1/inputs/{inp.id}/error", _serialization.error_body(e, out))
            finally:
                for _ in batch:
                    work.task_done()
                    slots.release()

    # Web requests.

    def answer_http(self, inp: _Input) -> None:
        h = inp.headers
        method = h.get("Gantry-Http-Method", "GET")
        raw_path = h.get("Gantry-Http-Path", "/") or "/"
        query = h.get("Gantry-Http-Query", "") or ""
        headers: List[Tuple[str, str]] = []
        for line in h.get_all("Gantry-Http-Header") or []:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
        try:
            if self.web_kind == "wsgi":
                status, out_headers, body = self.wsgi(method, raw_path, query, headers, inp.body)
            else:
                status, out_headers, body = self.asgi(method, raw_path, query, headers, inp.body)
        except BaseException as e:
            traceback.print_exc()
            status, out_headers, body = 500, [("Content-Type", "text/plain")], \
                f"Internal Server Error: {type(e).__name__}".encode()
        content_type = "application/octet-stream"
        send: List[Tuple[str, str]] = [("Gantry-Http-Status", str(status))]
        for name, value in out_headers:
            lname = name.lower()
            if lname in ("content-length", "transfer-encoding", "connection"):
                continue
            if lname == "content-type":
                content_type = value
            send.append(("Gantry-Http-Header", f"{name}: {value}"))
        send.append(("Content-Type", content_type))
        self.api.request("POST", f"/v1/inputs/{inp.id}/response", body, send)

    def wsgi(self, method: str, raw_path: str, query: str, headers: List[Tuple[str, str]],
             body: bytes) -> Tuple[int, List[Tuple[str, str]], bytes]:
        environ: Dict[str, Any] = {
            "REQUEST_METHOD": method,
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote(raw_path, encoding="latin-1"),
            "QUERY_STRING": query,
            "SERVER_NAME": "gantry",
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "CONTENT_LENGTH": str(len(body)),
        }
        for name, value in headers:
            key = name.upper().replace("-", "_")
            if key == "CONTENT_TYPE":
                environ["CONTENT_TYPE"] = value
            elif key != "CONTENT_LENGTH":
                k = "HTTP_" + key
                environ[k] = f"{environ[k]},{value}" if k in environ else value
        started: Dict[str, Any] = {}

        def start_response(status: str, response_headers: List[Tuple[str, str]], exc_info=None):
            started["status"] = int(status.split()[0])
            started["headers"] = list(response_headers)
            return lambda data: started.setdefault("written", []).append(data)

        result = self.web_app(environ, start_response)
        try:
            chunks = list(started.get("written", [])) + [bytes(c) for c in result]
        finally:
            close = getattr(result, "close", None)
            if close:
                close()
        return started.get("status", 500), started.get("headers", []), b"".join(chunks)

    def asgi(self, method: str, raw_path: str, query: str, headers: List[Tuple[str, str]],
             body: bytes) -> Tuple[int, List[Tuple[str, str]], bytes]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": unquote(raw_path),
            "raw_path": raw_path.encode("latin-1", "replace"),
            "root_path": "",
            "query_string": query.encode("latin-1", "replace"),
            "headers": [(n.lower().encode("latin-1"), v.encode("latin-1", "replace"))
                        for n, v in headers],
            "server": ("gantry", 80),
            "client": ("127.0.0.1", 0),
            "state": {},
        }
        result: Dict[str, Any] = {"status": 500, "headers": [], "body": []}

        async def run() -> None:
            sent_body = False

            async def receive() -> Dict[str, Any]:
                nonlocal sent_body
                if not sent_body:
                    sent_body = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await asyncio.sleep(3600)
                return {"type": "http.disconnect"}

            async def send(message: Dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    result["status"] = message["status"]
                    result["headers"] = [(k.decode("latin-1"), v.decode("latin-1"))
                                         for k, v in message.get("headers", [])]
                elif message["type"] == "http.response.body":
                    result["body"].append(message.get("body", b""))

            await self.web_app(scope, receive, send)

        self.run_async(run())
        return result["status"], result["headers"], b"".join(result["body"])

    def serve_web_server(self) -> None:
        """`@web_server`: the function starts the server; the agent probes its port."""
        try:
            self.obj.raw_f()
        except BaseException as e:
            traceback.print_exc()
            sys.stderr.write(f"gantry: the @web_server function failed: {e}\n")
            os._exit(1)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        while not stop.wait(3600):
            pass
        self.shutdown(0)

    def shutdown(self, code: int) -> None:
        """@exit methods of every instance, then exit."""
        if self.obj is not None and hasattr(self.obj, "_exit"):
            for inst in list(self.instances.values()):
                for name in self.obj._exit:
                    try:
                        self.call(getattr(inst, name), (), {})
                    except BaseException:
                        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(spec_json: str) -> None:
    global IN_CONTAINER
    IN_CONTAINER = True
    spec = json.loads(spec_json)
    local = threading.local()
    sys.stdout = _Capture(sys.stdout, local)
    sys.stderr = _Capture(sys.stderr, local)
    rt = Runtime(spec, local)
    if not rt.api.path or not os.path.exists(rt.api.path):
        print("gantry: GANTRY_RUNTIME_API is not set or its socket is missing; "
              "this runtime runs in a Gantry function container", file=sys.__stderr__)
        sys.exit(2)
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if spec.get("python") and spec["python"] != here:
        _init_error(rt.api, "PythonVersionMismatch",
                    f"this image has Python {here} but the app was deployed from Python "
                    f"{spec['python']}; arguments and results are pickled, which needs equal "
                    f"minor versions: use Image.debian_slim(python_version=\"{spec['python']}\") "
                    f"or an image with Python {spec['python']}, or deploy from Python {here}")
    if os.getcwd() == "/":
        os.chdir("/root")

    def on_term(*_: Any) -> None:
        rt.draining.set()
        threading.Thread(target=rt.shutdown, args=(0,), daemon=True).start()

    rt.setup()
    if rt.web_kind != "server":
        signal.signal(signal.SIGTERM, on_term)
    rt.serve()
