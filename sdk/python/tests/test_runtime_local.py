"""The in-container runtime (gantry/_container.py) as a plain process against a fake
runtime API: calls, classes, batches, generators, errors, web requests, a Python version
that does not match, and drain. No cluster needed."""

import json
import os
import subprocess
import sys
import time


HERE = os.path.dirname(os.path.abspath(__file__))
SDK = os.path.dirname(HERE)
sys.path.insert(0, SDK)

from gantry import _serialization  # noqa: E402

from fake_api import FakeRuntimeApi  # noqa: E402

PICKLE = {"Content-Type": _serialization.CONTENT_TYPE}


def start(tmp_path, obj, max_inputs=1, python=None):
    sock = str(tmp_path / "runtime.sock")
    api = FakeRuntimeApi(sock)
    spec = {"module": "apps.basics", "object": obj, "python": python or _serialization.PY}
    boot = (f"import sys;sys.path[:0]=[{SDK!r},{HERE!r}];"
            "import gantry._container as c;c.main(sys.argv[1])")
    env = dict(os.environ, GANTRY_RUNTIME_API=sock, GANTRY_MAX_INPUTS=str(max_inputs))
    proc = subprocess.Popen([sys.executable, "-c", boot, json.dumps(spec)], env=env, cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return api, proc


def call(api, envelope):
    return api.send(_serialization.dumps(envelope), PICKLE)


def value(answer):
    kind, headers, body = answer
    assert kind == "response", (kind, body)
    return _serialization.from_payload({"content_type": headers["Content-Type"],
                                        "base64": __import__("base64").b64encode(body).decode()})


def stop(api, proc):
    api.drain()
    try:
        out, err = proc.communicate(timeout=20)
    finally:
        api.close()
    return proc.returncode, out.decode(), err.decode()


def test_calls_errors_and_generators(tmp_path):
    api, proc = start(tmp_path, "square")
    assert api.ready.wait(20), proc.stderr.read1().decode() if proc.poll() is not None else "no ready"
    assert value(api.wait(call(api, {"a": (7,), "k": {}}))) == {"v": 49}
    # Not from the SDK: JSON in, JSON out.
    kind, headers, body = api.wait(api.send(b"12", {"Content-Type": "application/json"}))
    assert (kind, headers["Content-Type"], body) == ("response", "application/json", b"144")
    code, _, err = stop(api, proc)
    assert code == 0, err


def test_error_names_its_type_and_keeps_output(tmp_path):
    api, proc = start(tmp_path, "fail")
    assert api.ready.wait(20)
    kind, _, body = api.wait(call(api, {"a": ("custom",), "k": {}}))
    assert kind == "error"
    err = json.loads(body)
    assert err["type"] == "apps.basics.Custom"
    assert err["message"] == "custom failure"
    assert "Traceback" in err["traceback"]
    exc = _serialization.exception_of(dict(err, cause="user"))
    from apps.basics import Custom

    assert isinstance(exc, Custom)
    kind, _, body = api.wait(call(api, {"a": ("value",), "k": {}}))
    assert json.loads(body)["type"] == "ValueError"
    stop(api, proc)


def test_prints_stream_and_come_back_with_the_output(tmp_path):
    api, proc = start(tmp_path, "shout")
    assert api.ready.wait(20)
    rid = call(api, {"a": ("hi",), "k": {"suffix": "?"}})
    out = value(api.wait(rid))
    assert out == {"v": "HI?", "o": "shouting hi\n"}
    # Streamed before the answer, as text the SDK shows as it comes.
    assert [(ct.split(";")[0], data) for ct, data in api.chunks[rid]] == [
        ("text/x-gantry-log", b"shouting hi\n")]
    stop(api, proc)


def test_generator_items_stream_and_the_rest_comes_with_the_answer(tmp_path):
    api, proc = start(tmp_path, "count")
    assert api.ready.wait(20)
    rid = call(api, {"a": (3,), "k": {}})
    assert value(api.wait(rid)) == {"g": [], "s": 3}
    assert [_serialization.loads(data) for _, data in api.chunks[rid]] == [0, 1, 2]
    # Once the agent refuses a chunk (429: too many), the items left travel in the answer.
    api.max_chunks = 5
    rid = call(api, {"a": (8,), "k": {}})
    assert value(api.wait(rid)) == {"g": [5, 6, 7], "s": 5}
    assert [_serialization.loads(data) for _, data in api.chunks[rid]] == [0, 1, 2, 3, 4]
    # A chunk refused with 404 (the input was cancelled) stops the generator.
    api.max_chunks = 10000
    api.gone.add("cancelled-input")
    api.inputs.put(("cancelled-input", PICKLE, _serialization.dumps({"a": (1000,), "k": {}})))
    kind, _, body = api.wait("cancelled-input")
    assert kind == "error" and json.loads(body)["type"] == "gantry.exception.InputCancellation"
    stop(api, proc)


def test_class_enter_runs_once_and_state_persists(tmp_path):
    api, proc = start(tmp_path, "Counter")
    assert api.ready.wait(20)
    first = value(api.wait(call(api, {"m": "bump", "p": {}, "a": (), "k": {}})))
    second = value(api.wait(call(api, {"m": "bump", "p": {}, "a": (), "k": {}})))
    assert (first["v"], second["v"]) == (1, 2)
    other = value(api.wait(call(api, {"m": "bump", "p": {"start": 10}, "a": (), "k": {}})))
    assert other["v"] == 11
    code, out, _ = stop(api, proc)
    assert code == 0
    assert out.count("bye") == 2  # @exit on each instance at drain


def test_batches_gather_inputs(tmp_path):
    api, proc = start(tmp_path, "double_all", max_inputs=4)
    assert api.ready.wait(20)
    ids = [call(api, {"a": (i,), "k": {}}) for i in range(4)]
    results = [value(api.wait(i))["v"] for i in ids]
    assert [r[0] for r in results] == [0, 2, 4, 6]
    assert max(r[1] for r in results) > 1  # at least one batch held several inputs
    stop(api, proc)


def test_concurrent_inputs_run_at_once(tmp_path):
    api, proc = start(tmp_path, "slow", max_inputs=3)
    assert api.ready.wait(20)
    t = time.monotonic()
    ids = [call(api, {"a": (i,), "k": {}}) for i in range(3)]
    assert [value(api.wait(i))["v"] for i in ids] == [0, 1, 2]
    assert time.monotonic() - t < 0.85  # three 0.3 s inputs overlapped
    stop(api, proc)


def test_wsgi_request(tmp_path):
    api, proc = start(tmp_path, "web")
    assert api.ready.wait(20)
    rid = api.send(b"", {"Gantry-Input-Kind": "http", "Gantry-Http-Method": "GET",
                         "Gantry-Http-Path": "/a%20b", "Gantry-Http-Query": "q=1",
                         "Content-Type": "text/plain"})
    kind, headers, body = api.wait(rid)
    assert kind == "response"
    assert headers["Gantry-Http-Status"] == "200"
    assert body == b"GET /a b q=1"
    assert "X-Gantry-Test: yes" in json.loads(headers["_all_http_headers"])
    stop(api, proc)


def test_asgi_request(tmp_path):
    api, proc = start(tmp_path, "asgi", max_inputs=4)
    assert api.ready.wait(20)
    rid = api.send(b"payload", {"Gantry-Input-Kind": "http", "Gantry-Http-Method": "POST",
                                "Gantry-Http-Path": "/x", "Content-Type": "text/plain"})
    kind, headers, body = api.wait(rid)
    assert kind == "response"
    assert headers["Gantry-Http-Status"] == "201"
    assert body == b"POST /x  payload"
    assert headers["Content-Type"] == "text/plain"
    stop(api, proc)


def test_python_mismatch_is_a_setup_error(tmp_path):
    api, proc = start(tmp_path, "square", python="2.7")
    assert api.init_failed.wait(20)
    assert api.init_error["type"] == "PythonVersionMismatch"
    assert "Python 2.7" in api.init_error["message"]
    proc.wait(10)
    assert proc.returncode == 1
    api.close()


def test_import_failure_is_a_setup_error(tmp_path):
    api, proc = start(tmp_path, "no_such_function")
    assert api.init_failed.wait(20)
    assert "no function `no_such_function`" in api.init_error["message"]
    proc.wait(10)
    api.close()
