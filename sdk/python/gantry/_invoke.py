"""Calls to a deployed function through the coordinator's API: one input (`remote`,
`spawn`), or many streamed into one open map (`map`, `starmap`, `for_each`) with outputs
read in pages as they end (docs/functions.md, "Streamed maps")."""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
import time
import uuid
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

from . import _http, _serialization
from .exception import InputCancellation, InvalidError, TimeoutError

#: Inputs one append carries, and the most a map holds outstanding (the API's limits).
CHUNK = 1000
#: The longest one long poll asks for.
LONG_POLL = 55.0


#: How many `enable_output()` blocks are open (`gantry run` opens one).
_OUTPUT = [0]
#: The content type of what a function printed, as the runtime streams it.
LOG_TYPE = "text/x-gantry-log"


@contextlib.contextmanager
def enable_output(show_progress: bool = True) -> Iterator[None]:
    """Within the block, what remote functions print is shown here as they print it."""
    _OUTPUT[0] += 1
    try:
        yield
    finally:
        _OUTPUT[0] -= 1


def output_enabled() -> bool:
    return _OUTPUT[0] > 0


def show(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def follow(call_id: str, on_item: Optional[Callable[[Any], None]] = None, index: int = 0) -> bool:
    """Reads the chunks input `index` of the call streams while it runs (docs/functions.md,
    "Streamed chunks"): what it prints is shown (with output enabled), a generator's items
    go to `on_item`. Returns once the input ended and every chunk was read; False when
    the coordinator keeps no chunks for it."""
    client = _http.client()
    seq = 0
    while True:
        status, page = client.request(
            "GET", f"/v1/calls/{call_id}/stream?index={index}&from={seq}&wait=30s", ok=(200, 404))
        if status == 404:
            return False
        for chunk in page["chunks"]:
            ct = chunk.get("content_type", "")
            if ct.startswith(LOG_TYPE):
                if output_enabled():
                    show(_serialization.payload_bytes(chunk).decode("utf-8", "replace"))
            elif on_item is not None:
                on_item(_serialization.from_payload(chunk))
        seq = page["next"]
        if page["done"]:
            return True


def call_path(app: str, function: str) -> str:
    return f"/v1/apps/{app}/functions/{function}/calls"


def new_call(app: str, function: str, body: Dict[str, Any]) -> Any:
    """Creates a call. Its `Idempotency-Key` makes the client's one resend (a keep-alive
    connection the server had closed) return the same call instead of a second one."""
    return _http.client().request("POST", call_path(app, function), body,
                                  headers={"Idempotency-Key": uuid.uuid4().hex})


def result_of(view: Dict[str, Any], followed: bool = False) -> Any:
    """An ended input's value, or the exception it raised (returned, not raised). What
    the input printed is shown here (with output enabled) unless it was `followed`."""
    if view.get("error"):
        return _serialization.exception_of(view["error"])
    if view.get("state") == "cancelled":
        return InputCancellation(f"input {view.get('index', 0)} of the call was cancelled")
    out = view.get("output")
    if out is None:
        return None
    return unwrap(_serialization.from_payload(out), followed)


def unwrap(value: Any, followed: bool = False) -> Any:
    """The runtime's envelope: `{"v": value}`, or for a generator `{"g": [items not
    streamed], "s": items streamed}`; `"o"` is what the input printed."""
    if isinstance(value, dict) and ("v" in value or "g" in value):
        printed = value.get("o")
        if printed and output_enabled() and not followed:
            show(printed)
        return value["g"] if "g" in value else value["v"]
    return value


def wait_call(call_id: str, timeout: Optional[float] = None) -> Dict[str, Any]:
    """Waits for every input of the call to end; returns its view. `timeout` (seconds)
    raises `TimeoutError` when it passes first."""
    client = _http.client()
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        wait = LONG_POLL
        if deadline is not None:
            wait = max(0.0, min(LONG_POLL, deadline - time.monotonic()))
        ms = int(wait * 1000)
        _, view = client.request("GET", f"/v1/calls/{call_id}?wait={ms}ms")
        if view["state"] != "running":
            return view
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"call {call_id} has not finished within {timeout} s")


def single(app: str, function: str, envelope: Any) -> Any:
    """`.remote()`: one input, waited for; the value, or its exception raised. With
    output enabled, what it prints is shown while it runs."""
    if output_enabled():
        call_id = spawn(app, function, envelope)
        followed = follow(call_id)
        return raise_or_value(wait_call(call_id)["results"][0], followed)
    status, view = new_call(app, function, {"input": _serialization.payload(envelope), "wait": True})
    if status == 202 or view["state"] == "running":
        view = wait_call(view["id"])
    return raise_or_value(view["results"][0])


def generator(app: str, function: str, envelope: Any) -> Iterator[Any]:
    """`.remote_gen()`: a generator function's items, as it yields them."""
    call_id = spawn(app, function, envelope)
    items: "queue.Queue[Any]" = queue.Queue()
    done = object()
    failure: List[BaseException] = []
    followed: List[bool] = []

    def read() -> None:
        try:
            followed.append(follow(call_id, items.put))
        except BaseException as e:
            failure.append(e)
        finally:
            items.put(done)

    threading.Thread(target=read, name="gantry-stream", daemon=True).start()
    try:
        while True:
            item = items.get()
            if item is done:
                break
            yield item
    except GeneratorExit:
        _http.client().request("POST", f"/v1/calls/{call_id}/cancel")
        raise
    if failure:
        raise failure[0]
    # Items the runtime could not stream come with the answer.
    yield from raise_or_value(wait_call(call_id)["results"][0], bool(followed and followed[0]))


def failed(result: Dict[str, Any]) -> bool:
    return bool(result.get("error")) or result.get("state") == "cancelled"


def raise_or_value(result: Dict[str, Any], followed: bool = False) -> Any:
    value = result_of(result, followed)
    if failed(result):
        raise value
    return value


def spawn(app: str, function: str, envelope: Any) -> str:
    _, view = new_call(app, function, {"input": _serialization.payload(envelope), "wait": False})
    return view["id"]


def mapped(app: str, function: str, envelopes: Iterable[Any], order_outputs: bool,
           return_exceptions: bool) -> Iterator[Any]:
    """Streams `envelopes` into one open map and yields each output as it ends, in input
    order or in completion order. An input's exception is raised (the map is cancelled),
    or yielded with `return_exceptions`."""
    client = _http.client()
    _, view = new_call(app, function, {"inputs": [], "open": True, "wait": False})
    call_id = view["id"]
    failure: List[BaseException] = []
    sent = [0]
    closed = threading.Event()

    def feed() -> None:
        try:
            batch: List[Dict[str, str]] = []
            for env in envelopes:
                batch.append(_serialization.payload(env))
                if len(batch) == CHUNK:
                    append(batch, False)
                    batch = []
            append(batch, True)
        except BaseException as e:  # surfaced by the reader
            failure.append(e)
            try:
                client.request("POST", f"/v1/calls/{call_id}/cancel")
            except Exception:
                pass
        finally:
            closed.set()

    def append(batch: List[Dict[str, str]], close: bool) -> None:
        while True:
            status, answer = client.request(
                "POST",
                f"/v1/calls/{call_id}/inputs",
                {"start": sent[0], "inputs": batch, "close": close},
                ok=(200, 429),
            )
            if status == 200:
                sent[0] = answer["inputs"]
                return
            time.sleep(0.05)

    feeder = threading.Thread(target=feed, name="gantry-map-feed", daemon=True)
    feeder.start()
    order = "input" if order_outputs else "completion"
    cursor = 0
    try:
        while True:
            _, page = client.request(
                "GET",
                f"/v1/calls/{call_id}/outputs?from={cursor}&order={order}&limit={CHUNK}&wait=30s",
            )
            if failure:
                raise failure[0]
            for r in page["results"]:
                value = result_of(r)
                if failed(r) and not return_exceptions:
                    raise value
                yield value
            cursor = page["next"]
            if page["done"]:
                break
    except BaseException:
        try:
            client.request("POST", f"/v1/calls/{call_id}/cancel")
        except Exception:
            pass
        raise
    finally:
        feeder.join(timeout=1)
    if failure:
        raise failure[0]


class FunctionCall:
    """A spawned call: `get(timeout)` waits for its value, `cancel()` ends it."""

    def __init__(self, object_id: str):
        self.object_id = object_id

    @staticmethod
    def from_id(function_call_id: str) -> "FunctionCall":
        if not isinstance(function_call_id, str) or not function_call_id:
            raise InvalidError(f"not a call id: {function_call_id!r}")
        return FunctionCall(function_call_id)

    def get(self, timeout: Optional[float] = None) -> Any:
        view = wait_call(self.object_id, timeout)
        results = view["results"]
        if len(results) == 1:
            return raise_or_value(results[0])
        return [raise_or_value(r) for r in results]

    def get_gen(self) -> Iterator[Any]:
        yield from self.get()

    def cancel(self, terminate_containers: bool = False) -> None:
        _http.client().request("POST", f"/v1/calls/{self.object_id}/cancel")

    def __repr__(self) -> str:
        return f"FunctionCall({self.object_id!r})"
