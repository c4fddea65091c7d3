"""The SDK against a real cluster (`gantry dev`, real containers): calls, maps, spawns,
classes, retries, errors, web endpoints, schedules, volumes, secrets, images, the CLI."""

import json
import os
import subprocess
import time
import urllib.request
import uuid

import pytest

import gantry as modal
from devcluster import gantry_bin
from gantry.exception import InvalidError, NotFoundError


@pytest.fixture(scope="module")
def basics(cluster):
    from apps import basics

    with basics.app.run() as app:
        yield basics, app


def test_remote_map_starmap_spawn(basics):
    b, _ = basics
    assert b.square.remote(9) == 81
    assert b.shout.remote("hey", suffix="?") == "HEY?"
    assert list(b.square.map(range(50))) == [x * x for x in range(50)]
    assert sorted(b.square.map(range(20), order_outputs=False)) == sorted(x * x for x in range(20))
    assert list(b.shout.starmap([("a", "1"), ("b", "2")])) == ["A1", "B2"]
    call = b.square.spawn(12)
    assert modal.FunctionCall.from_id(call.object_id).get(timeout=60) == 144
    b.square.for_each(range(5))


def test_a_spawned_call_is_cancelled(basics):
    b, _ = basics
    call = b.ticks.spawn(30, 1.0)
    time.sleep(1)
    call.cancel()
    with pytest.raises(modal.exception.InputCancellation):
        call.get(timeout=60)


def test_remote_errors_keep_their_type(basics):
    b, _ = basics
    with pytest.raises(ValueError, match="bad value") as e:
        b.fail.remote("value")
    assert "Traceback" in str(e.value.__cause__)
    with pytest.raises(b.Custom, match="custom failure"):
        b.fail.remote("custom")
    out = list(b.fail.map(["value", "custom"], return_exceptions=True))
    assert isinstance(out[0], ValueError) and isinstance(out[1], b.Custom)


def test_generators_and_batches_and_where(basics):
    b, _ = basics
    assert list(b.count.remote_gen(4)) == [0, 1, 2, 3]
    with pytest.raises(InvalidError):
        b.count.remote(2)
    doubled = list(b.double_all.map(range(8)))
    assert [d[0] for d in doubled] == [x * 2 for x in range(8)]
    assert b.where.remote() == {"local": False, "cwd": "/root"}
    assert modal.is_local()


def test_generator_items_and_prints_stream_while_it_runs(basics, capsys):
    b, _ = basics
    with modal.enable_output():
        seen = []
        for item in b.ticks.remote_gen(3, 1.0):
            seen.append((item, time.monotonic(), capsys.readouterr().out))
    assert [s[0] for s in seen] == [0, 1, 2]
    # Each item arrived as it was yielded, a second apart, not all at the end.
    assert seen[2][1] - seen[0][1] >= 1.5
    # What it printed before yielding was shown before the item.
    assert "tick 0" in seen[0][2] and "tick 1" in seen[1][2]


def test_class_enter_state_persists(basics):
    b, _ = basics
    counter = b.Counter()
    assert [counter.bump.remote() for _ in range(3)] == [1, 2, 3]
    assert b.Counter(start=100).bump.remote() == 101


def test_retries_use_the_functions_policy(basics):
    b, _ = basics
    assert b.flaky.remote(f"/data/tried-{uuid.uuid4().hex}") == "second try"


def test_volume_and_secret(basics):
    b, _ = basics
    listed = b.volume_and_secret.remote("note.txt", "written")
    assert "note.txt" in listed
    assert b.volume.read_file("note.txt") == b"written s3cret"


def test_web_endpoint(basics, cluster):
    b, app = basics
    url = b.web.get_web_url()
    assert url.startswith(cluster.ingress)
    with urllib.request.urlopen(url + "/hello?q=1", timeout=120) as r:
        assert r.status == 200
        assert r.headers["X-Gantry-Test"] == "yes"
        assert r.read() == b"GET /hello q=1"


def test_web_server_endpoint(basics):
    b, _ = basics
    with urllib.request.urlopen(b.files.get_web_url() + "/data.txt", timeout=120) as r:
        assert r.read() == b"data from the client\n"


def test_asgi_endpoint(basics, cluster):
    b, _ = basics
    url = b.asgi.get_web_url()
    assert url.endswith("/asgi-echo")
    req = urllib.request.Request(url + "/p", data=b"body", method="POST")
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 201
        assert r.read() == b"POST /p  body"


def test_deployed_lookups_and_options(cluster):
    from apps import basics

    basics.app.deploy(name="sdk-deployed")
    f = modal.Function.from_name("sdk-deployed", "square")
    assert f.remote(5) == 25
    c = modal.Cls.from_name("sdk-deployed", "Counter")
    assert c(start=1).bump.remote() == 2
    with pytest.raises(NotFoundError):
        modal.Function.from_name("sdk-deployed", "nope")
    bigger = basics.square.with_options(memory=256, timeout=60)
    assert bigger.remote(6) == 36
    assert any("square--" in n for n in _functions_of(cluster, "sdk-deployed"))
    cluster.gantry("apps", "stop", "sdk-deployed")


def _functions_of(cluster, app):
    import json

    out = cluster.gantry("--output", "json", "apps", "show", app)
    return [f["name"] for f in json.loads(out.stdout)["functions"]]


def test_schedule(cluster):
    from apps import scheduled

    with scheduled.app.run():
        deadline = time.monotonic() + 120
        ticks = b""
        while time.monotonic() < deadline:
            try:
                ticks = scheduled.volume.read_file("ticks")
            except NotFoundError:
                ticks = b""
            if ticks.count(b"\n") >= 2:
                break
            time.sleep(1)
    assert ticks.count(b"\n") >= 2, ticks


def test_image_from_the_builder(cluster):
    from apps import custom_image

    with custom_image.app.run():
        assert custom_image.inspect_image.remote() == {
            "built": "built",
            "data": "data from the client",
            "asset": "an asset",
            "greeting": "hi",
            "six": "six",
            "helper": "hello image",
        }
        # A FastAPI endpoint (FastAPI from the image's pip_install).
        req = urllib.request.Request(custom_image.square.get_web_url(), data=b'{"x": 7}',
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=120) as r:
            assert json.loads(r.read()) == {"square": 49}


def test_cli_run_hands_over_to_the_sdk(cluster):
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(cluster.env, PYTHONPATH=os.path.dirname(here) + os.pathsep + here)
    before = {a["app"] for a in _apps(cluster)}
    out = subprocess.run(
        [gantry_bin(), "run",
         os.path.join(here, "apps", "basics.py"), "--x", "4", "--name", "you"],
        env=env, capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr.decode()
    text = out.stdout.decode()
    assert "shouting you" in text  # printed in the container, shown here
    assert "square 16 YOU!" in text
    # A function named after `::` is called with options from its signature (strings,
    # without annotations, as Modal's CLI does).
    out = subprocess.run(
        [gantry_bin(), "run",
         os.path.join(here, "apps", "basics.py") + "::shout", "--text", "cli"],
        env=env, capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip().endswith("CLI!")
    # `::Class.method`: the class with its parameters' defaults.
    out = subprocess.run(
        [gantry_bin(), "run",
         os.path.join(here, "apps", "basics.py") + "::Counter.bump"],
        env=env, capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip().endswith("1")
    # Each run deployed its own ephemeral app and stopped it when it ended.
    made = [a for a in _apps(cluster) if a["app"] not in before]
    assert len(made) == 3 and all(a["app"].startswith("sdk-basics-run-") for a in made), made
    assert all(a["active_version"] is None for a in made), made


def _apps(cluster):
    return json.loads(cluster.gantry("--output", "json", "apps", "list").stdout)


SERVED = '''
import gantry as modal

app = modal.App("served")


@app.function(scaledown_window=2)
def answer():
    return {answer}
'''


def test_serve_deploys_again_when_a_file_changes(cluster, tmp_path):
    import signal
    import threading

    here = os.path.dirname(os.path.abspath(__file__))
    app_file = tmp_path / "served.py"
    app_file.write_text(SERVED.format(answer=1))
    env = dict(cluster.env, PYTHONPATH=os.path.dirname(here))
    proc = subprocess.Popen([gantry_bin(), "serve", str(app_file), "--timeout", "120"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()

    def served_name():
        for line in lines:
            if line.startswith(b"serving "):
                return line.split()[1].rstrip(b";").decode()
        return None

    def answer_is(name, value):
        try:
            return modal.Function.from_name(name, "answer").remote() == value
        except NotFoundError:
            return False

    try:
        deadline = time.monotonic() + 120
        while served_name() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        name = served_name()
        assert name and name.startswith("served-serve-"), lines
        assert answer_is(name, 1)
        app_file.write_text(SERVED.format(answer=2))
        while not answer_is(name, 2):
            assert time.monotonic() < deadline, lines
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    # Ctrl-C stopped the ephemeral app.
    out = cluster.gantry("--output", "json", "apps", "show", name)
    assert json.loads(out.stdout)["active_version"] is None
